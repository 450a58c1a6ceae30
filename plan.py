"""
Size a model for a compute budget, Chinchilla-style: the loss-optimal split of the budget between
parameters and tokens, the predicted loss, the IsoFLOP curves around it, and the train.py flags.

    python plan.py --flops=3.2e17                        # the "$50" GPT-2-style run: ~50M params, ~1.1B tokens
    python plan.py --gpu-hours=24 --gpu=H100 --mfu=0.4   # one H100 for a day: a run that takes a day
    python plan.py --flops=1e19 --tokens-per-param=20    # the rule of thumb instead of the fitted optimum

Training costs C = 6 N D FLOPs for N parameters and D tokens (6 per parameter per token: 2 forward,
4 backward). Hoffmann et al. 2022 ("Training Compute-Optimal Large Language Models", approach 3)
fitted the final loss of ~400 runs as L(N, D) = E + A / N^alpha + B / D^beta, with E = 1.69,
A = 406.4, B = 410.7, alpha = 0.34, beta = 0.28 (their data and tokenizer: the predicted loss is in
their units, a guide for comparing shapes, not a promise for another corpus). On the line C = 6 N D
it is lowest at N = G (C/6)^(beta/(alpha+beta)), G = (alpha A / (beta B))^(1/(alpha+beta)): 23 tokens
per parameter at 3.2e17 FLOPs, 36 at 3.4e19, where the paper's other two approaches and its rule
of thumb say ~20 (Besiroglu et al. 2024 refit its data and found this fit off). A Llama-style
shape (head dim 64, width a multiple of 64) is then picked whose parameter count, from model.py, is
nearest N, at a width per layer near GPT-2's and Llama's (n_embd / n_layer = 48 to 96, 64 preferred).
A budget in GPU-hours is spent on train.py's FLOP count, which adds attention to 6 N D, so the run
it plans takes those hours at --mfu.
"""
import math
from dataclasses import dataclass

from common import check, die, parse_config, parse_flags, run_main, setting
from hardware import PEAK_FLOPS

@dataclass
class PlanConfig:
    flops: float = setting(0.0, "the training budget in FLOPs, C = 6 N D (or give --gpu-hours)")
    gpu_hours: float = setting(0.0, "the budget in GPU-hours, at --mfu of --gpu's peak; the run takes that long")
    gpu: str = setting("H100", "a GPU of hardware.PEAK_FLOPS, for --gpu-hours and the time estimate")
    mfu: float = setting(0.4, "the fraction of the GPU's peak bf16 FLOP/s that training reaches")
    tokens_per_param: float = setting(0.0, "D / N; 0 = Chinchilla's loss-optimal split (approach 3), 20 = the "
                                      "rule of thumb")
    vocab_size: int = setting(50304, "the vocabulary (50304: GPT-2's, rounded up to a multiple of 64)")
    seq_len: int = setting(1024, "the context length")
    tie_embeddings: bool = setting(True, "one matrix for the embedding and the output head")
    plot: str = setting("isoflop.png", "where the IsoFLOP curves go (needs matplotlib); empty = no picture")

    def __post_init__(self):
        check((self.flops > 0) != (self.gpu_hours > 0), "give one budget: --flops or --gpu-hours")
        check(0 < self.mfu <= 1 and self.tokens_per_param >= 0 and self.vocab_size > 0 and self.seq_len > 0,
              "need 0 < --mfu <= 1, --tokens-per-param >= 0 and positive --vocab-size and --seq-len")
        check(any(name == self.gpu for name, _ in PEAK_FLOPS),
              f"unknown --gpu={self.gpu}; use one of {', '.join(name for name, _ in PEAK_FLOPS)}")

# --- Chinchilla's loss model (Hoffmann et al. 2022, approach 3) ------------------------------------
E, A, B, ALPHA, BETA = 1.69, 406.4, 410.7, 0.34, 0.28

def predicted_loss(n, d):
    """L(N, D) = E + A / N^alpha + B / D^beta: the fitted final loss of N parameters trained on D tokens."""
    return E + A / n ** ALPHA + B / d ** BETA

def loss_optimal(flops):
    """(N, D) with 6 N D = flops where L(N, D) is lowest, in closed form: setting dL/dN = 0 along
    D = C / (6 N) gives alpha A / N^alpha = beta B / D^beta."""
    g = (ALPHA * A / (BETA * B)) ** (1 / (ALPHA + BETA))
    n = g * (flops / 6) ** (BETA / (ALPHA + BETA))
    return n, flops / (6 * n)

def chinchilla(flops, tokens_per_param=20.0):
    """(parameters N, tokens D) that spend flops = 6 N D with D = tokens_per_param * N."""
    n = math.sqrt(flops / (6 * tokens_per_param))
    return n, tokens_per_param * n

# --- A model of that size -------------------------------------------------------------------------
def param_count(mc):
    """Parameters of a Llama-style ModelConfig, in closed form (test_plan checks it against model.py)."""
    C, kv = mc.n_embd, mc.n_kv_head * mc.head_dim
    per_layer = 2 * C * C + 2 * C * kv + 3 * C * mc.ffn_hidden + 2 * C  # q, o; k, v; the MLP; 2 norms
    return mc.vocab_size * C * (1 if mc.tie_embeddings else 2) + mc.n_layer * per_layer + C

def nearest_shape(n_params, cfg):
    """The Llama-style ModelConfig nearest to n_params parameters: of the shapes within 5 % of it,
    the one whose width per layer is nearest 64 (GPT-2 small's 768 / 12); else the nearest count."""
    from model import ModelConfig
    shapes = []
    for n_layer in range(2, 65):
        for n_embd in range(64 * max(2, 48 * n_layer // 64), 96 * n_layer + 1, 64):
            mc = ModelConfig(vocab_size=cfg.vocab_size, n_layer=n_layer, n_embd=n_embd, n_head=n_embd // 64,
                             n_kv_head=n_embd // 64, multiple_of=256, max_seq_len=cfg.seq_len,
                             tie_embeddings=cfg.tie_embeddings)
            shapes.append((abs(param_count(mc) / n_params - 1), abs(n_embd / n_layer - 64), mc))
    close = [shape for shape in shapes if shape[0] <= 0.05]
    return min(close, key=lambda s: s[1])[2] if close else min(shapes, key=lambda s: s[0])[2]

def draw_isoflops(flops, chosen, path):
    """The loss along N for budgets around flops (each curve one budget, its optimum marked) and the
    chosen shape as a star: the picture that sizes the "$50" GPT."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: no IsoFLOP picture: pip install matplotlib")
        return
    import numpy as np
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for budget in flops * np.array([0.1, 0.3, 1.0, 3.0, 10.0]):
        best = loss_optimal(budget)[0]
        n = best * np.logspace(-1, 1, 200)
        ax.plot(n, predicted_loss(n, budget / (6 * n)), lw=2 if budget == flops else 1, label=f"{budget:.1e} FLOPs")
        ax.plot(best, predicted_loss(best, budget / (6 * best)), "k.")
    ax.plot(*chosen, "r*", ms=14, label="the shape picked")
    ax.set(xscale="log", xlabel="parameters N", ylabel="predicted loss L(N, C / 6N)",
           title="IsoFLOP curves (Chinchilla's fit, Hoffmann et al. 2022)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    print(f"wrote {path}")

def main(argv):
    cfg = parse_config(PlanConfig, parse_flags(argv, [PlanConfig], __doc__))
    peak = dict(PEAK_FLOPS)[cfg.gpu]
    # a budget in hours is spent on train.py's count (attention included); 6 N D is a little less
    budget = cfg.flops or cfg.gpu_hours * 3600 * peak * cfg.mfu
    n_opt, d_opt = loss_optimal(budget)
    n_rule, d_rule = chinchilla(budget, cfg.tokens_per_param or 20.0)
    n = n_rule if cfg.tokens_per_param else n_opt
    if n < 1e6:
        die(f"{budget:.2e} FLOPs buys a model of {n:,.0f} parameters; plan.py sizes models from 1M up")
    mc = nearest_shape(n, cfg)
    import torch

    from model import Transformer
    with torch.device("meta"):  # shapes only: nothing is allocated
        model = Transformer(mc)
    n_params, per_token = model.num_params(), model.flops_per_token(cfg.seq_len)
    tokens = budget / per_token if cfg.gpu_hours else budget / (6 * n_params)
    seconds = per_token * tokens / (peak * cfg.mfu)
    print(f"budget  {budget:.3g} FLOPs" + (f" ({cfg.gpu_hours:g} {cfg.gpu}-hours at {cfg.mfu:.0%} MFU)"
                                          if cfg.gpu_hours else ""))
    print(f"optimum N = {n_opt / 1e6:,.1f}M parameters, D = {d_opt / 1e9:,.3g}B tokens ({d_opt / n_opt:.1f} per "
          f"parameter): loss-optimal under Chinchilla's fit, predicted loss {predicted_loss(n_opt, d_opt):.3f}")
    print(f"rule    N = {n_rule / 1e6:,.1f}M parameters, D = {d_rule / 1e9:,.3g}B tokens "
          f"({cfg.tokens_per_param or 20:g} per parameter), predicted loss {predicted_loss(n_rule, d_rule):.3f}")
    print(f"shape   {mc.n_layer} layers, d{mc.n_embd}, {mc.n_head} heads of 64, ffn {mc.ffn_hidden}: "
          f"{n_params / 1e6:,.1f}M parameters ({model.num_params(embeddings=False) / 1e6:,.1f}M without "
          f"embeddings), {tokens / 1e9:,.3g}B tokens, predicted loss {predicted_loss(n_params, tokens):.3f}")
    print(f"time    {seconds / 3600:,.2f} h on one {cfg.gpu} at {cfg.mfu:.0%} MFU, {seconds / 3600 / 8:,.2f} h on 8 "
          "(the FLOPs of train.py's count, attention included)")
    print(f"flags   --n-layer={mc.n_layer} --n-embd={mc.n_embd} --n-head={mc.n_head} --n-kv-head={mc.n_kv_head} "
          f"--ffn-hidden={mc.ffn_hidden} --max-seq-len={cfg.seq_len} --tie-embeddings={cfg.tie_embeddings} "
          f"--vocab-size={cfg.vocab_size} --max-tokens={tokens:.3g}")
    if cfg.plot:
        draw_isoflops(budget, (n_params, predicted_loss(n_params, tokens)), cfg.plot)

if __name__ == "__main__":
    run_main(main)
