"""
The compiled one-token decoding step that `sample.py --compile` and bench.py decode with.

    step = decode.compiled_step(model)                    # the weights as they are (fp32)
    step = decode.compiled_step(model, torch.bfloat16)    # a bf16 copy: half the bytes per token
    model.generate(idx, 200, step=step)                   # the prefill eager, then step per token

Decoding reads every weight once per token and does two FLOPs per weight read, so it is bound by
memory bandwidth, not arithmetic: a 53M-parameter model in fp32 reads 212 MB a token. What keeps
it from that bound is overhead, and gpt-fast's remedy removes the first kind: one graph per token
over a static KV cache of the whole context (the position is a tensor, so no shape ever changes),
compiled once, with no Python per layer. On a GPU the graph is replayed as a CUDA graph.

On a CPU a second kind remains: the matrix-vector products themselves. MKL's x @ W.T for one row
streams at 10-20 GB/s here (2-core AMD EPYC, AVX2), and each is a call that inductor cannot fuse
with the norm before it or the activation after it. Written as multiply-and-sum, (W * x).sum(-1),
the same product becomes a reduction that inductor compiles into one loop over W's rows, fused
with its neighbours (q, k and v share one loop and one normalized x): what llama.cpp's CPU
kernels do. ProductsAsSums rewrites the step that way while torch.compile traces it; on this
machine that took a 53M model from 52 to 100 tokens/s in fp32 (bench.py, batch 1), the step alone
to 0.92x llama.cpp's speed on the same weights (docs/speed.md). With more than MAX_ROWS rows the
arithmetic, not the memory, is the limit and MKL's blocked matrix products win, so those stay.
"""
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from model import attention_by_hand

# Rows (sequences decoded together) up to which a product is a sum; above it MKL's matrix product
# is faster (53M model, fp32, the step alone: sums 410 vs MKL 301 tokens/s at 16 rows, 300 vs 371 at 32).
MAX_ROWS = 16
# W's rows are summed in this many blocks at once: with one running sum per row, each add waits for
# the last (4 blocks against 1: 124 vs 101 tokens/s at 1 row, 374 vs 206 at 8; 8 blocks: no faster,
# and twice the compile time).
ROW_BLOCKS = 4

class ProductsAsSums(TorchFunctionMode):
    """While active: F.linear with at most MAX_ROWS rows, and any product whose left side is a single
    row (attention's scores and its weighted sum of values, per head), as multiply-and-sum; attention
    as attention_by_hand, so that its products are rewritten too. The same numbers up to rounding."""
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and args[0].numel() > MAX_ROWS * args[0].size(-1):
            x, w, *rest = args  # many rows: the BLAS's product, over weights in x's dtype (a bf16 copy too)
            return func(x, w.to(x.dtype), *rest, **kwargs)
        if func is F.linear:
            x, w = args[0], args[1]                                        # (..., C), (N, C)
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            rows = x.reshape(-1, x.size(-1))                                # (R, C)
            # (N/4, 1, C) * (R, C) for each quarter of W's rows: each row is read once for all R rows,
            # and inductor runs the four sums in one loop, so four running totals are in flight
            y = torch.cat([(block[:, None, :] * rows).sum(-1) for block in w.chunk(ROW_BLOCKS)])  # (N, R)
            y = y.t().reshape(*x.shape[:-1], w.size(0))                     # (..., N)
            if torch.is_autocast_enabled(x.device.type):  # what F.linear gives under autocast, so
                y = y.to(torch.get_autocast_dtype(x.device.type))  # the KV cache keeps its dtype
            return y if bias is None else y + bias
        if func in (torch.matmul, torch.Tensor.__matmul__) and args[0].dim() >= 2 and args[0].size(-2) == 1:
            a, b = args                                                     # (..., 1, K), (..., K, N)
            return (a.transpose(-2, -1) * b).sum(-2, keepdim=True)          # (..., 1, N)
        if func is F.scaled_dot_product_attention:
            q, k, v = args[:3]
            with self:  # a mode is off inside its own handler: back on, for attention's two products
                return attention_by_hand(q, k, v, kwargs.get("attn_mask"), kwargs.get("is_causal", False),
                                         kwargs.get("dropout_p", 0.0))
        return func(*args, **kwargs)

def compiled_step(model, weights_dtype=None):
    """token (B, 1), pos (1,) -> logits (B, 1, V): the model's forward for one token at position pos
    over its static cache (model.generate(..., step=) sets it up), compiled on its first call and
    again for each new batch size. weights_dtype: on a CPU, the step reads a copy of the weight
    matrices in this dtype (bf16: half the bytes; the arithmetic stays fp32). Elsewhere the model runs
    as it is (under the caller's autocast); on CUDA as a CUDA graph."""
    device = next(model.parameters()).device
    if device.type != "cpu":
        how = {"mode": "reduce-overhead"} if device.type == "cuda" else {}
        return torch.compile(lambda token, pos: model(token, pos=pos)[0], fullgraph=True, dynamic=False, **how)
    narrow = weights_dtype not in (None, torch.float32)
    # The embedding table stays: the step reads one row of it. A tied lm_head gets its own copy.
    weights = {name: p.to(weights_dtype) if narrow and p.dim() == 2 and not name.startswith("embed_") else p
               for name, p in model.named_parameters(remove_duplicate=False)}

    def step(token, pos):
        with ProductsAsSums():
            return torch.func.functional_call(model, weights, (token,), {"pos": pos}, tie_weights=False)[0]
    return torch.compile(step, fullgraph=True, dynamic=False)
