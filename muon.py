"""
Muon: momentum whose update for each weight matrix is orthogonalized (K. Jordan et al., "Muon: An
optimizer for hidden layers in neural networks", kellerjordan.github.io/posts/muon, 2024; used by
modded-nanogpt and nanochat).

For a matrix W with gradient momentum M = U S V^T, Muon steps along U V^T: the same directions, with
every singular value set to 1, so directions that the gradient rarely pushes learn as fast as the
common ones. U V^T comes from a few Newton-Schulz iterations (matmuls only, fine in bf16), not an
SVD. It suits the 2-D matrices inside the transformer blocks; embeddings, the output head and norm
weights stay with AdamW (train.py --optimizer=muon builds both). No weight layout changes, so a
model trained with it exports like any other.

    opt = Muon([w for name, w in model.named_parameters() if ...], lr=0.02, momentum=0.95)
"""
import torch

# Coefficients (a, b, c) of the quintic x -> a x + b x^3 + c x^5 applied to the singular values, from
# the post: chosen to pull every value in (0, 1] up fast (slope a = 3.4 at 0), landing in about
# [0.7, 1.2] after 5 steps rather than converging to exactly 1, which training does not need.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)

def orthogonalize(G, steps=5, dtype=torch.bfloat16):
    """~U V^T of each matrix G = U S V^T (its singular values pushed to about 1), by Newton-Schulz;
    G is (rows, cols) or a stack of them (n, rows, cols)."""
    a, b, c = NS_COEFFICIENTS
    X = G.to(dtype)
    tall = X.size(-2) > X.size(-1)
    if tall:  # iterate on the wide orientation, so that X X^T is the smaller square
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # spectral norm <= Frobenius norm = 1: in range
    for _ in range(steps):
        A = X @ X.mT                         # (..., rows, rows)
        X = a * X + (b * A + c * A @ A) @ X  # each singular value s -> a s + b s^3 + c s^5
    return X.mT if tall else X

class Muon(torch.optim.Optimizer):
    """Nesterov momentum, orthogonalized, for 2-D parameters. The update is scaled by
    sqrt(max(1, rows / cols)) as in the post, so a tall matrix moves its outputs as far as a square
    one; weight decay is decoupled, as in AdamW (multiplied by lr)."""

    def __init__(self, params, lr=0.02, momentum=0.95, weight_decay=0.0, nesterov=True, ns_steps=5,
                 ns_dtype=torch.bfloat16):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov,
                                      ns_steps=ns_steps))
        self.ns_dtype = ns_dtype  # not a group setting: it follows the device, so a checkpoint leaves it out

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            beta, by_shape = group["momentum"], {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.dim() != 2:
                    raise ValueError(f"Muon updates matrices; got a parameter of shape {tuple(p.shape)}")
                state = self.state[p]
                if not state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                m = state["momentum_buffer"]
                m.lerp_(p.grad, 1 - beta)  # m = beta * m + (1 - beta) * g: a mean of recent gradients
                # Nesterov: step along where the momentum is heading, g + beta * (m - g)
                direction = p.grad.lerp(m, beta) if group["nesterov"] else m
                by_shape.setdefault(p.shape, []).append((p, direction))
            # The matrices of one shape are orthogonalized together: on a CPU, the 28 small matrices
            # of the demo model cost half as much in 3 batched calls as one by one (measured).
            for (rows, cols), pairs in by_shape.items():
                directions = torch.stack([whole(d) for _, d in pairs])  # (n, rows, cols)
                updates = orthogonalize(directions, group["ns_steps"], self.ns_dtype)
                for (p, _), update in zip(pairs, updates):
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                    p.add_(shaped_like(p, update.to(p.dtype)), alpha=-group["lr"] * max(1, rows / cols) ** 0.5)

# Under FSDP (train.py --parallel=fsdp) each process holds a DTensor: some rows of each matrix. The
# momentum is elementwise and stays in pieces, but U V^T needs the whole matrix: every process gathers
# it, orthogonalizes it and keeps its own rows. Simple, and the same update on every process; large
# runs spread the matrices over the processes instead, so that each is orthogonalized once.
# (DTensor is known by its full_tensor(): importing torch.distributed.tensor costs every run 0.7 s.)
def whole(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t

def shaped_like(p, update):
    if not hasattr(p, "full_tensor"):
        return update
    from torch.distributed.tensor import distribute_tensor
    # src_data_rank=None: each process cuts its own piece of the update it holds; nothing is sent
    return distribute_tensor(update, p.device_mesh, p.placements, src_data_rank=None)
