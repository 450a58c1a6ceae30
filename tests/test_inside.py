"""
inside.py: the states it collects are the model's own, its projection is numpy's PCA of them, and
the picture is written.

    python -m pytest -q tests/test_inside.py
"""
import numpy as np
import pytest
import torch

import inside
from conftest import SMALL_BPE, SMALL_EOT, random_model, write_checkpoint

def test_the_states_are_the_residual_stream_after_each_layer():
    model = random_model(n_layer=3)
    idx = torch.randint(0, 96, (1, 12))
    states = inside.hidden_states(model, idx)
    with torch.no_grad():
        x = model.embed_tokens(idx)
        expected = [x[0]]
        for layer in model.layers:
            x = layer(x, model.rope_cos[:12], model.rope_sin[:12], 0)
            expected.append(x[0])
    assert len(states) == 4 and all(np.allclose(s, e.numpy(), atol=1e-6) for s, e in zip(states, expected))

def test_the_projection_is_the_principal_components_of_the_states():
    states = np.random.default_rng(0).normal(size=(30, 16)) @ np.diag(np.linspace(3, 0.1, 16))
    points, share = inside.principal_components(states, k=3)
    # independently: the eigenvectors of the covariance matrix, largest eigenvalues first
    centred = states - states.mean(axis=0)
    values, vectors = np.linalg.eigh(centred.T @ centred)
    order = np.argsort(values)[::-1][:3]
    reference = centred @ vectors[:, order]
    assert np.allclose(np.abs(points), np.abs(reference), atol=1e-8)  # each component up to its sign
    assert np.allclose(share, values[order] / values.sum())

def test_the_picture_is_drawn(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    ckpt = write_checkpoint(tmp_path / "ckpt.pt", SMALL_BPE, SMALL_EOT)
    inside.main(["--ckpt", ckpt, "--prompt", "the hell", "--layers", "0,1,2", "--new-tokens", "5",
                 "--out", str(tmp_path / "in.png")])
    assert f"wrote {tmp_path / 'in.png'}" in capsys.readouterr().out
    assert (tmp_path / "in.png").read_bytes().startswith(b"\x89PNG")
    with pytest.raises(SystemExit):
        inside.main(["--ckpt", ckpt, "--layers", "0,9"])
    assert "this model has layers 0 (embeddings) to 2" in capsys.readouterr().err
