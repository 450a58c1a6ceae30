"""A Llama-style decoder-only transformer, written to be read top to bottom.

    from model import ModelConfig, Transformer
    model = Transformer(ModelConfig())          # the CPU demo's 1.27M; presets.py holds larger shapes
    logits, loss = model(idx, targets)          # training: idx, targets (B, T) int64
    out = model.generate(idx, max_new_tokens=100, temperature=0.8, top_k=200)

Llama is GPT-2 with rotary positions (RoPE), pre-norm RMSNorm in fp32, grouped-query attention,
a SwiGLU MLP and no biases. Ablations put GPT-2's parts back or take parts out: pos_emb, mlp,
norm. Parameter names are Hugging Face LlamaForCausalLM's without "model.", so hf.py converts by
renaming.

Dimensions: B batch, T positions in this call, S cached positions, C = n_embd, H query heads,
Hkv key/value heads, D = C // H head dim, V vocab size.
"""
import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

# --- Config ---------------------------------------------------------------------------------------
@dataclass
class ModelConfig:
    """The defaults are the CPU demo's model (python train.py): 1.27M parameters on Tiny Shakespeare with
    a 4096-token BPE. presets.py holds the larger shapes of the seed runs."""
    vocab_size: int = 4160     # train.py: the data's vocabulary (4097 ids here) rounded up to a multiple of 64
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 2         # = n_head: multi-head; < n_head: grouped-query (GQA); 1: multi-query
    n_embd: int = 128
    ffn_hidden: int = 0        # 0: derived (Llama's rule for the gated MLPs, 4 * n_embd for gelu and silu)
    multiple_of: int = 32      # Llama rounds the derived ffn_hidden up to a multiple of this (fast matmuls)
    max_seq_len: int = 128
    rope_theta: float = 10000.0  # Llama 2: 1e4, Llama 3: 5e5
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    dropout: float = 0.0
    pos_emb: str = "rope"      # ablations: rope | learned | none
    mlp: str = "swiglu"        # swiglu | geglu (gated) | gelu | silu (no gate)
    norm: str = "rmsnorm"      # rmsnorm | layernorm | none
    norm_position: str = "pre"  # pre: x + f(norm(x)) (Llama, GPT-2) | post: norm(x + f(x)) (the 2017 Transformer)
    attention: str = "sdpa"    # sdpa: torch's fused kernel | manual: the same math written out (attention_by_hand)

    @property
    def head_dim(self):  # D; a property, so not a field
        return self.n_embd // self.n_head

    def __post_init__(self):
        def check(ok, problem):  # each message names the values, so the fix is obvious
            if not ok:
                raise ValueError(problem)
        for name in ("vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "multiple_of", "max_seq_len"):
            check(getattr(self, name) > 0, f"{name}={getattr(self, name)} must be positive")
        for name, choices in [("pos_emb", ("rope", "learned", "none")), ("mlp", ("swiglu", "geglu", "gelu", "silu")),
                              ("norm", ("rmsnorm", "layernorm", "none")), ("norm_position", ("pre", "post")),
                              ("attention", ("sdpa", "manual"))]:
            check(getattr(self, name) in choices, f"{name}={getattr(self, name)!r} is not one of {choices}")
        check(self.n_embd % self.n_head == 0, f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        check(self.n_head % self.n_kv_head == 0, f"n_head={self.n_head} is not divisible by n_kv_head={self.n_kv_head}")
        check(self.pos_emb != "rope" or self.head_dim % 2 == 0,
              f"head dim n_embd/n_head={self.head_dim} is odd; RoPE rotates pairs of channels")
        check(0 <= self.dropout < 1 and self.rope_theta > 0 and self.norm_eps > 0 and self.ffn_hidden >= 0,
              f"need 0 <= dropout < 1, rope_theta > 0, norm_eps > 0, ffn_hidden >= 0; got dropout={self.dropout}, "
              f"rope_theta={self.rope_theta}, norm_eps={self.norm_eps}, ffn_hidden={self.ffn_hidden}")
        if self.ffn_hidden == 0:  # a gated MLP has 3 matrices to GELU's 2: 2/3 of 4C keeps the parameter count
            hidden = int(2 * 4 * self.n_embd / 3) if self.mlp in ("swiglu", "geglu") else 4 * self.n_embd
            self.ffn_hidden = self.multiple_of * math.ceil(hidden / self.multiple_of)

# --- Normalization --------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """x / rms(x) * weight (Zhang & Sennrich 2019): LayerNorm without the mean and the bias."""
    def __init__(self, dim, eps):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # fp32 math: the mean of squares of bf16 activations loses too many bits; HF does the same.
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)

def make_norm(cfg):  # ablations: "layernorm" is GPT-2's norm (without bias), "none" no norm at all
    if cfg.norm == "none":
        return nn.Identity()
    norm = RMSNorm if cfg.norm == "rmsnorm" else lambda dim, eps: nn.LayerNorm(dim, eps, bias=False)
    return norm(cfg.n_embd, cfg.norm_eps)

# --- Rotary position embedding (Su et al. 2021) ---------------------------------------------------
def rope_tables(head_dim, max_seq_len, theta):
    """cos and sin tables (max_seq_len, D) in fp32 for every position and channel."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)  # (D/2,)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)         # (S, D/2)
    # HF's "rotate_half" layout: channel i is paired with channel i + D/2 (not with i + 1 as in
    # Meta's complex-number code), so HF checkpoints load without permuting q_proj and k_proj.
    angles = torch.cat([angles, angles], dim=-1)                                            # (S, D)
    return angles.cos(), angles.sin()

def apply_rope(x, cos, sin):
    """Rotate each pair (x_i, x_{i+D/2}) of x (B, H, T, D) by its position's angle; cos, sin (T, D)."""
    x1, x2 = x.chunk(2, dim=-1)                  # (B, H, T, D/2) each
    rotated = torch.cat([-x2, x1], dim=-1)       # (B, H, T, D)
    return (x.float() * cos + rotated.float() * sin).type_as(x)

# --- KV cache and attention -----------------------------------------------------------------------
class KVCache:
    """Keys and values of past positions in buffers (B, Hkv, S_max, D), written in place, allocated by
    the first update in k's dtype (under autocast bf16 or fp16: half of fp32's memory). pos: an int, or
    for the compiled step a (1,) tensor (the whole buffer comes back; the attention masks the rest)."""
    def __init__(self, max_len):
        self.max_len, self.k, self.v = max_len, None, None

    def update(self, pos, k, v):
        """Store k, v (B, Hkv, T, D) at positions pos..pos+T-1; return all keys/values so far."""
        B, Hkv, T, D = k.size()
        if self.k is None or self.k.dtype != k.dtype:
            self.k, self.v = k.new_zeros(B, Hkv, self.max_len, D), v.new_zeros(B, Hkv, self.max_len, D)
        if torch.is_tensor(pos):  # one token, at a position the compiled graph reads from a tensor
            self.k.index_copy_(2, pos, k)
            self.v.index_copy_(2, pos, v)
            return self.k, self.v                                   # (B, Hkv, S_max, D) each
        self.k[:, :, pos:pos + T], self.v[:, :, pos:pos + T] = k, v
        return self.k[:, :, :pos + T], self.v[:, :, :pos + T]   # (B, Hkv, pos+T, D) each

def attention_by_hand(q, k, v, mask=None, causal=False, dropout=0.0):
    """What F.scaled_dot_product_attention computes, written out (--attention=manual): every query's
    scores against every key, scaled by 1/sqrt(D), masked, softmaxed in fp32, then the values summed
    by those weights. q (B, H, T, D); k, v (B, Hkv, S, D); mask (T, S), True where a query may look."""
    B, H, T, D = q.size()
    S = k.size(2)
    k = k.repeat_interleave(H // k.size(1), dim=1)                      # (B, H, S, D): each group's K/V head
    v = v.repeat_interleave(H // v.size(1), dim=1)                      # (B, H, S, D)
    scores = q @ k.transpose(-2, -1) / math.sqrt(D)                     # (B, H, T, S)
    if causal:  # query t sees keys 0..t
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))               # the future gets weight 0
    weights = F.softmax(scores.float(), dim=-1).type_as(q)              # (B, H, T, S), each row sums to 1
    if dropout:
        weights = F.dropout(weights, dropout)
    return weights @ v                                                  # (B, H, T, D)

class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_head * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=False)
        self.dropout, self.use_rope, self.by_hand = cfg.dropout, cfg.pos_emb == "rope", cfg.attention == "manual"
        self.cache = None  # a KVCache while generate() runs

    def forward(self, x, cos, sin, pos):
        B, T, C = x.size()
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)     # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        if self.use_rope:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.cache is not None:
            k, v = self.cache.update(pos, k, v)  # (B, Hkv, S, D) with S = pos + T
        # Query t sits at position pos + t and sees keys 0..pos+t, whatever S = pos + T is:
        S = k.size(2)
        if torch.is_tensor(pos):  # the compiled decode step: the whole static cache, masked past pos
            mask, causal = (torch.arange(S, device=x.device) <= pos)[None, :], False     # (1, S)
        elif T == 1:  # decoding one token: it sees every key
            mask, causal = None, False
        elif S == T:  # a block from position 0: the plain causal triangle
            mask, causal = None, True
        else:         # a block after S - T cached keys: the triangle shifted right by them
            mask, causal = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(S - T), False
        # On a CPU, torch's attention kernels are 1.1-2.5x slower in bf16 than in fp32 (forward and
        # backward, measured), and autocast would lower fp32 inputs to bf16: there they stay fp32.
        cpu_amp = x.device.type == "cpu" and torch.is_autocast_enabled("cpu")
        if cpu_amp:
            q, k, v = q.float(), k.float(), v.float()
        dropout = self.dropout if self.training else 0.0
        # enable_gqa: each group of H/Hkv query heads reads its K/V head in place (HF's repeat_kv copies).
        with torch.autocast("cpu", enabled=False) if cpu_amp else nullcontext():
            if self.by_hand:
                y = attention_by_hand(q, k, v, mask, causal, dropout)                   # (B, H, T, D)
            else:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, dropout_p=dropout,
                                                   enable_gqa=self.n_kv_head != self.n_head)  # (B, H, T, D)
        y = y.transpose(1, 2).contiguous().view(B, T, self.n_head * self.head_dim)       # (B, T, C)
        return self.o_proj(y)

# --- MLP and block --------------------------------------------------------------------------------
class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.act = cfg.mlp
        if self.act in ("swiglu", "geglu"):  # the gate (Shazeer 2020, "GLU Variants Improve Transformer")
            self.gate_proj = nn.Linear(cfg.n_embd, cfg.ffn_hidden, bias=False)
        self.up_proj = nn.Linear(cfg.n_embd, cfg.ffn_hidden, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_hidden, cfg.n_embd, bias=False)

    def forward(self, x):
        act = F.silu if self.act in ("swiglu", "silu") else F.gelu  # SiLU (Swish-1) or GELU (exact, as GPT-2's)
        if self.act in ("swiglu", "geglu"):  # the activated gate scales the up projection, channel by channel
            return self.down_proj(act(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(act(self.up_proj(x)))  # ablations without a gate: GPT-2's MLP, or SiLU's

class Block(nn.Module):
    """A residual block. Pre-norm (Llama, GPT-2): each sublayer reads a normalized copy of the stream
    and adds to it. Post-norm (the 2017 Transformer): each sublayer reads the stream, and the sum is
    normalized; the same two norms, applied after the adds."""
    def __init__(self, cfg):
        super().__init__()
        self.input_layernorm = make_norm(cfg)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = make_norm(cfg)
        self.mlp = MLP(cfg)
        self.dropout = nn.Dropout(cfg.dropout)
        self.post_norm = cfg.norm_position == "post"

    def forward(self, x, cos, sin, pos):
        if self.post_norm:
            x = self.input_layernorm(x + self.dropout(self.self_attn(x, cos, sin, pos)))
            return self.post_attention_layernorm(x + self.dropout(self.mlp(x)))
        x = x + self.dropout(self.self_attn(self.input_layernorm(x), cos, sin, pos))
        return x + self.dropout(self.mlp(self.post_attention_layernorm(x)))

# --- The model ------------------------------------------------------------------------------------
LOSS_CHUNK = 1024  # positions per chunk of train.py --chunked-loss: their fp32 logits over 50k tokens take 200 MB

class Transformer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.embed_positions = nn.Embedding(cfg.max_seq_len, cfg.n_embd) if cfg.pos_emb == "learned" else None
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        # pre-norm's stream is never normalized as a whole until here; post-norm's last block ends with a norm
        self.norm = make_norm(cfg) if cfg.norm_position == "pre" else nn.Identity()
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:  # one (V, C) matrix both embeds and unembeds (GPT-2, small Llamas)
            self.lm_head.weight = self.embed_tokens.weight
        self.checkpointing, self.loss_chunk = False, 0  # train.py --activation-checkpointing, --chunked-loss
        # Not persistent: derived from the config, and the state dict stays exactly HF's. Keep the
        # model in fp32 under autocast: model.to(torch.bfloat16) would round these tables too.
        for name, table in zip(("rope_cos", "rope_sin"), rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)):
            self.register_buffer(name, table, persistent=False)  # (max_seq_len, D)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """Every matrix ~ N(0, 0.02) as in GPT-2 and Llama, norm weights 1; the two matrices that write
        into the residual stream get 0.02 / sqrt(2 * n_layer), so its variance does not grow with depth."""
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layer)  # GPT-2 paper, section 2.3
        for name, p in self.named_parameters():  # a tied matrix is listed once
            std = residual_std if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
            nn.init.ones_(p) if p.dim() == 1 else nn.init.normal_(p, std=std)

    def forward(self, idx, targets=None, pos=0, reduction="mean"):
        """idx (B, T) token ids at positions pos..pos+T-1 -> (logits, loss). With targets (B, T), -1 =
        ignore: all logits (B, T, V) and the mean loss (reduction="none": per position, (B, T));
        without: (B, 1, V) for the last position only."""
        B, T = idx.size()
        if torch.is_tensor(pos):  # the compiled decode step: one token, its position a (1,) tensor
            positions, cos, sin = pos, self.rope_cos[pos], self.rope_sin[pos]             # (1,), (1, D)
        elif pos + T > self.config.max_seq_len:
            raise ValueError(f"positions up to {pos + T} > max_seq_len={self.config.max_seq_len}; crop from the left")
        else:  # (cos and sin as views of the tables: nothing to copy or keep for backward)
            positions, cos, sin = torch.arange(pos, pos + T, device=idx.device), self.rope_cos[pos:pos + T], \
                self.rope_sin[pos:pos + T]                                                # (T,), (T, D)
        x = self.embed_tokens(idx)                                                        # (B, T, C)
        if self.embed_positions is not None:
            x = x + self.embed_positions(positions)                                       # (B, T, C)
        for layer in self.layers:
            if self.checkpointing and torch.is_grad_enabled():  # keep the block's input, redo it in backward
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, pos, use_reentrant=False)
            else:
                x = layer(x, cos, sin, pos)
        x = self.norm(x)
        if targets is None:
            return self.lm_head(x[:, [-1], :]), None                                      # (B, 1, V)
        if self.loss_chunk and torch.is_grad_enabled():
            return None, self.chunked_loss(x, targets, reduction)
        logits = self.lm_head(x)                                                          # (B, T, V)
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-1,  # (B*T, V), (B*T,)
                               reduction=reduction)
        return logits, loss if reduction != "none" else loss.view(B, T)

    def chunked_loss(self, x, targets, reduction):
        """forward()'s loss without its largest tensors, the fp32 logits (B*T, V) and their log-probabilities
        (8 bytes per position per vocabulary entry: 3.3 GB for 16 x 1024 positions of GPT-2's 50k), made
        loss_chunk positions at a time and again in backward (one more lm_head matmul)."""
        def chunk_losses(xc, tc):                                                         # (N, C), (N,)
            return F.cross_entropy(self.lm_head(xc).float(), tc, ignore_index=-1, reduction="none")  # (N,)
        pieces = zip(x.flatten(0, 1).split(self.loss_chunk), targets.flatten().split(self.loss_chunk))
        losses = torch.cat([torch.utils.checkpoint.checkpoint(chunk_losses, xc, tc, use_reentrant=False)
                            for xc, tc in pieces])                                        # (B*T,), 0 where -1
        if reduction == "none":
            return losses.view(targets.shape)
        return losses.sum() if reduction == "sum" else losses.sum() / (targets != -1).sum()

    def generate(self, idx, max_new_tokens, **sampling):
        """idx (B, T) plus up to max_new_tokens sampled tokens (B, T + new); options: generate_stream's."""
        return torch.cat([idx, *self.generate_stream(idx, max_new_tokens, **sampling)], dim=1)

    @torch.no_grad()
    def generate_stream(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos_id=None,
                        generator=None, vocab_size=None, step=None):
        """Yield next ids (B, 1) after idx (B, T), one step at a time. A row that emits eos_id repeats it
        and the stream ends when all have; vocab_size keeps sampling off ids padded past the tokenizer's.
        step: decode.compiled_step(model), run for each one-token step over a static cache of the whole
        context (the prefill and the cache's restarts run eagerly)."""
        B, T = idx.size()
        S_max, was_training = self.config.max_seq_len, self.training
        static = step is not None
        if static and getattr(self, "_static", (None,))[0] != B:  # one cache of the whole context, kept:
            self._static = B, [KVCache(S_max) for _ in self.layers]  # the compiled step sees the same buffers
        caches = self._static[1] if static else [KVCache(min(S_max, T + max_new_tokens)) for _ in self.layers]
        for layer, cache in zip(self.layers, caches):
            layer.self_attn.cache = cache
        try:
            self.eval()
            logits, _ = self(idx)  # "prefill": one pass over the prompt fills the cache   (B, 1, V)
            pos, done = T, torch.zeros(B, dtype=torch.bool, device=idx.device)
            pieces = [idx]  # the sequence so far, in pieces: concatenated only when the cache restarts
            for i in range(max_new_tokens):
                next_id = sample_next(logits[:, -1, :vocab_size], temperature, top_k, top_p, generator)  # (B, 1)
                if eos_id is not None:
                    next_id = next_id.masked_fill(done[:, None], eos_id)
                    done |= next_id[:, 0] == eos_id
                yield next_id
                if i == max_new_tokens - 1 or (eos_id is not None and done.all()):  # (a GPU sync)
                    break
                pieces.append(next_id)
                new_input = next_id  # "decode": only the new token goes in; the rest is cached
                if pos == S_max:  # context full: restart the cache from the most recent half
                    new_input = torch.cat(pieces, dim=1)[:, -max(1, S_max // 2):]
                    pieces, pos = [new_input], 0
                if static and new_input.size(1) == 1:
                    logits = step(new_input, torch.tensor([pos], device=idx.device))
                else:
                    logits, _ = self(new_input, pos=pos)
                pos += new_input.size(1)
        finally:
            for layer in self.layers:
                layer.self_attn.cache = None
            self.train(was_training)

    def num_params(self, embeddings=True):
        """Parameter count; embeddings=False leaves out the embedding tables and an untied lm_head."""
        n = sum(p.numel() for p in self.parameters())  # a tied matrix counts once
        if not embeddings:  # Kaplan et al.'s "non-embedding" N of the scaling laws
            tables = [self.embed_tokens, self.embed_positions, None if self.config.tie_embeddings else self.lm_head]
            n -= sum(m.weight.numel() for m in tables if m is not None)
        return n

    def flops_per_token(self, seq_len):
        """Training FLOPs per token (forward + backward; PaLM, appendix B): 6 per matmul weight (lm_head
        included, embedding lookup not) + 12 * L * C * T for attention (C = H * D), without the causal saving."""
        matmul_weights = self.num_params(embeddings=False) + self.lm_head.weight.numel()
        return 6 * matmul_weights + 12 * self.config.n_layer * self.config.n_embd * seq_len

def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """Next ids (B, 1) from logits (B, V): the argmax at temperature 0, else a draw after top-k and top-p."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth_largest = torch.topk(logits, top_k, dim=-1).values[:, [-1]]                   # (B, 1)
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    probs = F.softmax(logits, dim=-1)                                                     # (B, V)
    if top_p is not None and top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)                         # (B, V)
        # Nucleus: the fewest most likely ids that reach top_p; drop ids whose betters already reach it.
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))
    return torch.multinomial(probs, num_samples=1, generator=generator)                   # (B, 1)
