"""
Size a model for a compute budget, Chinchilla-style, and print the train.py flags for it.

    python plan.py --flops=3.2e17                        # the "$50" GPT-2-style run: ~50M params, ~1B tokens
    python plan.py --gpu-hours=24 --gpu=H100 --mfu=0.4   # one H100 for a day
    python plan.py --flops=1e19 --tokens-per-param=40    # past the compute-optimal point: smaller, longer

Training costs C = 6 N D FLOPs for N parameters and D tokens (6 per parameter per token: 2 forward,
4 backward). Hoffmann et al. 2022 ("Chinchilla") found the loss for a given C lowest near D = 20 N,
so N = sqrt(C / (6 * 20)) and D = 20 N. A model shape is then picked among Llama-style ones (head
dim 64, width a multiple of 64) whose parameter count, from model.py, is nearest to N, at a width
per layer near GPT-2's and Llama's (n_embd / n_layer = 48 to 96, 64 preferred). The time estimate
uses train.py's FLOP count, which adds attention to 6 N D.
"""
import math
from dataclasses import dataclass

from common import check, die, parse_config, parse_flags, run_main, setting
from hardware import PEAK_FLOPS

@dataclass
class PlanConfig:
    flops: float = setting(0.0, "the training budget in FLOPs (or give --gpu-hours)")
    gpu_hours: float = setting(0.0, "the budget in GPU-hours, at --mfu of --gpu's peak")
    gpu: str = setting("H100", "a GPU of hardware.PEAK_FLOPS, for --gpu-hours and the time estimate")
    mfu: float = setting(0.4, "the fraction of the GPU's peak bf16 FLOP/s that training reaches")
    tokens_per_param: float = setting(20.0, "D / N; 20 is Chinchilla's compute-optimal ratio")
    vocab_size: int = setting(50304, "the vocabulary (50304: GPT-2's, rounded up to a multiple of 64)")
    seq_len: int = setting(1024, "the context length")
    tie_embeddings: bool = setting(True, "one matrix for the embedding and the output head")

    def __post_init__(self):
        check((self.flops > 0) != (self.gpu_hours > 0), "give one budget: --flops or --gpu-hours")
        check(0 < self.mfu <= 1 and self.tokens_per_param > 0 and self.vocab_size > 0 and self.seq_len > 0,
              "need 0 < --mfu <= 1 and positive --tokens-per-param, --vocab-size and --seq-len")
        check(any(name == self.gpu for name, _ in PEAK_FLOPS),
              f"unknown --gpu={self.gpu}; use one of {', '.join(name for name, _ in PEAK_FLOPS)}")

def chinchilla(flops, tokens_per_param=20.0):
    """(parameters N, tokens D) that spend flops = 6 N D with D = tokens_per_param * N."""
    n = math.sqrt(flops / (6 * tokens_per_param))
    return n, tokens_per_param * n

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

def main(argv):
    cfg = parse_config(PlanConfig, parse_flags(argv, [PlanConfig], __doc__))
    peak = dict(PEAK_FLOPS)[cfg.gpu]
    flops = cfg.flops or cfg.gpu_hours * 3600 * peak * cfg.mfu
    n, d = chinchilla(flops, cfg.tokens_per_param)
    if n < 1e6:
        die(f"{flops:.2e} FLOPs buys a model of {n:,.0f} parameters; plan.py sizes models from 1M up")
    mc = nearest_shape(n, cfg)
    import torch

    from model import Transformer
    with torch.device("meta"):  # shapes only: nothing is allocated
        model = Transformer(mc)
    tokens = flops / (6 * model.num_params())  # the shape's own count, so that 6 N D stays the budget
    seconds = model.flops_per_token(cfg.seq_len) * tokens / (peak * cfg.mfu)
    print(f"budget  {flops:.3g} FLOPs" + (f" ({cfg.gpu_hours:g} {cfg.gpu}-hours at {cfg.mfu:.0%} MFU)"
                                         if cfg.gpu_hours else ""))
    print(f"optimum N = {n / 1e6:,.1f}M parameters, D = {d / 1e9:,.3g}B tokens ({cfg.tokens_per_param:g} per parameter)")
    print(f"shape   {mc.n_layer} layers, d{mc.n_embd}, {mc.n_head} heads of 64, ffn {mc.ffn_hidden}: "
          f"{model.num_params() / 1e6:,.1f}M parameters ({model.num_params(embeddings=False) / 1e6:,.1f}M "
          f"without embeddings), {tokens / 1e9:,.3g}B tokens")
    print(f"time    {seconds / 3600:,.2f} h on one {cfg.gpu} at {cfg.mfu:.0%} MFU, {seconds / 3600 / 8:,.2f} h on 8 "
          "(the FLOPs of train.py's count, attention included)")
    print(f"flags   --n-layer={mc.n_layer} --n-embd={mc.n_embd} --n-head={mc.n_head} --n-kv-head={mc.n_kv_head} "
          f"--ffn-hidden={mc.ffn_hidden} --max-seq-len={cfg.seq_len} --tie-embeddings={cfg.tie_embeddings} "
          f"--vocab-size={cfg.vocab_size} --max-tokens={tokens:.3g}")

if __name__ == "__main__":
    run_main(main)
