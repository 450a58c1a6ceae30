"""
muon.py against a plain float64 reference: the Newton-Schulz iteration, the momentum and the step.

    python -m pytest -q test_muon.py
"""
import math

import pytest
import torch

from muon import NS_COEFFICIENTS, Muon, orthogonalize

def reference_steps(W, grads, lr, beta, weight_decay):
    """Muon written out plainly in float64: Nesterov momentum, 5 Newton-Schulz steps, scaled step."""
    a, b, c = NS_COEFFICIENTS
    W, m = W.double().clone(), torch.zeros_like(W, dtype=torch.float64)
    for g in grads:
        g = g.double()
        m = beta * m + (1 - beta) * g
        d = (1 - beta) * g + beta * m  # Nesterov
        X = d.T if d.size(0) > d.size(1) else d
        X = X / (X.norm() + 1e-7)
        for _ in range(5):
            A = X @ X.T
            X = a * X + b * A @ X + c * A @ A @ X
        X = X.T if d.size(0) > d.size(1) else X
        W = W * (1 - lr * weight_decay) - lr * math.sqrt(max(1, W.size(0) / W.size(1))) * X
    return W

@pytest.mark.parametrize("shape", [(8, 8), (12, 5), (5, 12)], ids=["square", "tall", "wide"])
def test_muon_steps_equal_the_plain_reference(shape):
    g = torch.Generator().manual_seed(0)
    W0 = torch.randn(shape, generator=g, dtype=torch.float64)
    grads = [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(4)]
    W = torch.nn.Parameter(W0.clone())
    opt = Muon([W], lr=0.05, momentum=0.9, weight_decay=0.1, ns_dtype=torch.float64)
    for grad in grads:
        W.grad = grad.clone()
        opt.step()
    expected = reference_steps(W0, grads, lr=0.05, beta=0.9, weight_decay=0.1)
    assert (W.detach() - expected).abs().max().item() < 1e-10

def test_orthogonalize_maps_each_singular_value_by_the_quintic():
    """X -> a X + b (X X^T) X + c (X X^T)^2 X keeps the singular vectors of G and sends each singular
    value s through the scalar quintic; 5 steps take the (normalized) values into about [0.6, 1.2]."""
    a, b, c = NS_COEFFICIENTS

    def quintic5(s):
        for _ in range(5):
            s = a * s + b * s ** 3 + c * s ** 5
        return s
    g = torch.Generator().manual_seed(1)
    for shape in [(64, 64), (256, 64), (32, 96)]:
        G = torch.randn(shape, generator=g)
        U, S, Vh = torch.linalg.svd(G.double(), full_matrices=False)
        expected = U @ torch.diag(quintic5(S / (G.norm() + 1e-7))) @ Vh
        assert (orthogonalize(G, dtype=torch.float32).double() - expected).abs().max() < 1e-4
        bf16 = orthogonalize(G).double()  # the default: bf16 matmuls, close to it
        assert (bf16 - expected).norm() / expected.norm() < 0.05
    s = quintic5(torch.linspace(0.02, 1, 1000, dtype=torch.float64))
    assert s.min() > 0.55 and s.max() < 1.25  # what the coefficients promise: about 1, not exactly

def test_muon_refuses_what_is_not_a_matrix():
    v = torch.nn.Parameter(torch.ones(4))
    v.grad = torch.ones(4)
    with pytest.raises(ValueError, match="Muon updates matrices"):
        Muon([v]).step()
