"""
plan.py: Chinchilla's loss model and its optimum against a dense numeric search, the rule of thumb
by hand, the closed-form parameter count against model.py, the shape it picks for the "$50"
budget, a budget in GPU-hours that plans a run of those hours, and the IsoFLOP picture.

    python -m pytest -q tests/test_plan.py
"""
import re

import numpy as np
import pytest
import torch

import plan
from model import ModelConfig, Transformer

def test_chinchilla_rule_of_thumb_by_hand():
    # 3.2e17 = 6 N D, D = 20 N: N^2 = 3.2e17 / 120 = 2.667e15, N = 51.64M, D = 1.033B
    n, d = plan.chinchilla(3.2e17)
    assert n == pytest.approx(51.64e6, rel=1e-3) and d == pytest.approx(1.0328e9, rel=1e-3)
    n, d = plan.chinchilla(6e18, tokens_per_param=60)  # N^2 = 6e18 / 360: N = 129.1M, D = 7.746B
    assert n == pytest.approx(129.10e6, rel=1e-3) and d == pytest.approx(7.746e9, rel=1e-3)

@pytest.mark.parametrize("flops", [1e16, 3.2e17, 1e19, 1e21])
def test_the_loss_optimum_is_the_lowest_point_of_a_dense_search(flops):
    n = np.logspace(5, 11, 600_001)  # every 0.0023 %: the minimum of the loss along 6 N D = flops
    loss = 1.69 + 406.4 / n ** 0.34 + 410.7 / (flops / (6 * n)) ** 0.28  # the paper's fit, written out
    n_opt, d_opt = plan.loss_optimal(flops)
    assert n_opt == pytest.approx(n[loss.argmin()], rel=1e-4) and 6 * n_opt * d_opt == pytest.approx(flops)
    assert plan.predicted_loss(n_opt, d_opt) == pytest.approx(loss.min(), abs=1e-9)

@pytest.mark.parametrize("tie, kv", [(True, 8), (False, 2)])
def test_closed_form_count_equals_the_model(tie, kv):
    mc = ModelConfig(vocab_size=50304, n_layer=5, n_embd=512, n_head=8, n_kv_head=kv, tie_embeddings=tie)
    with torch.device("meta"):
        assert plan.param_count(mc) == Transformer(mc).num_params()

def test_the_50_dollar_budget_gives_its_shape_and_its_picture(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    plan.main(["--flops=3.2e17", f"--plot={tmp_path / 'iso.png'}"])
    out = capsys.readouterr().out
    assert "optimum N = 48.2M parameters, D = 1.11B tokens" in out  # the "$50" GPT's ~50M and 1.1B
    assert "rule    N = 51.6M parameters, D = 1.03B tokens (20 per parameter)" in out
    assert "layers, d512, 8 heads of 64" in out and "predicted loss 3.888" in out
    assert (tmp_path / "iso.png").read_bytes().startswith(b"\x89PNG")

@pytest.mark.parametrize("hours", [24, 2])
def test_a_budget_in_gpu_hours_plans_a_run_of_those_hours(capsys, hours):
    plan.main([f"--gpu-hours={hours}", "--gpu=H100", "--mfu=0.5", "--plot="])
    out = capsys.readouterr().out
    assert f"({hours} H100-hours at 50% MFU)" in out
    assert float(re.search(r"time    ([\d.]+) h on one H100", out).group(1)) <= hours
