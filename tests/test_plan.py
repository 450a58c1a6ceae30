"""
plan.py: the Chinchilla arithmetic against hand-computed values, the closed-form parameter count
against model.py, and the shape it picks for the "$50" budget.

    python -m pytest -q test_plan.py
"""
import pytest
import torch

import plan
from model import ModelConfig, Transformer

def test_chinchilla_by_hand():
    # 3.2e17 = 6 N D, D = 20 N: N^2 = 3.2e17 / 120 = 2.667e15, N = 51.64M, D = 1.033B
    n, d = plan.chinchilla(3.2e17)
    assert n == pytest.approx(51.64e6, rel=1e-3) and d == pytest.approx(1.0328e9, rel=1e-3)
    n, d = plan.chinchilla(6e18, tokens_per_param=60)  # N^2 = 6e18 / 360: N = 129.1M, D = 7.746B
    assert n == pytest.approx(129.10e6, rel=1e-3) and d == pytest.approx(7.746e9, rel=1e-3)

@pytest.mark.parametrize("tie, kv", [(True, 8), (False, 2)])
def test_closed_form_count_equals_the_model(tie, kv):
    mc = ModelConfig(vocab_size=50304, n_layer=5, n_embd=512, n_head=8, n_kv_head=kv, tie_embeddings=tie)
    with torch.device("meta"):
        assert plan.param_count(mc) == Transformer(mc).num_params()

def test_the_50_dollar_budget_gives_its_shape(capsys):
    plan.main(["--flops=3.2e17"])
    out = capsys.readouterr().out
    assert "optimum N = 51.6M parameters, D = 1.03B tokens" in out
    assert "8 layers, d512, 8 heads of 64" in out and "--n-layer=8 --n-embd=512" in out
    plan.main(["--gpu-hours=24", "--gpu=H100", "--mfu=0.5"])  # 24 * 3600 * 989e12 * 0.5 = 4.27e19
    assert "budget  4.27e+19 FLOPs (24 H100-hours at 50% MFU)" in capsys.readouterr().out
