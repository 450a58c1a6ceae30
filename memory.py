"""
What a training run will hold in each GPU's memory, by part, worked out before it starts (train.py
prints it beside the compute plan, and warns with the fixes when it will not fit).

    from memory import memory_plan, fixes, saved_bytes
    parts = memory_plan(model, batch_size=16, world=8, fsdp=False, optimizer="adamw", amp=True)
    measured = saved_bytes(model, idx, amp_context)   # what autograd really keeps (test_memory, bench.py)

Per parameter: fp32 weights (4 bytes), their gradients (4), AdamW's two moments (8) or Muon's one
(4); DDP adds gradient buckets of the same size as the gradients; FSDP divides all of it by the
number of processes and adds the weights it gathers for the block at work (and the next one).
Per position of a micro-batch: what autograd saves for the backward pass, counted tensor by tensor
from model.py (test_memory checks the count against the bytes actually saved), and the logits.
"""
from contextlib import nullcontext
from dataclasses import dataclass

import torch

GiB = 2 ** 30

def norm_bytes(mc):
    """Per position: RMSNorm keeps its fp32 input, the normalized copy and 1 / rms; LayerNorm its input,
    mean and 1 / std."""
    return {"rmsnorm": 8 * mc.n_embd + 4, "layernorm": 4 * mc.n_embd + 8, "none": 0}[mc.norm]

def block_bytes(mc, amp, attention_fp32):
    """Bytes one block saves for backward per position: amp = autocast (2-byte matmuls) on, and
    attention_fp32 = attention kept in fp32 under it (model.py does so on a CPU)."""
    C, Ckv, F, H = mc.n_embd, mc.n_kv_head * mc.head_dim, mc.ffn_hidden, mc.n_head
    a = 2 if amp else 4                     # a matmul's input or output
    att = 4 if attention_fp32 or not amp else 2
    gated = mc.mlp in ("swiglu", "geglu")
    # The inputs the matmuls keep for their weight gradients. Autocast casts the normed stream once per
    # matmul: q, k, v get three copies, gate and up two. In fp32 they share one tensor per sublayer.
    matmul_inputs = a * C * ((3 + (2 if gated else 1)) if amp else 2)
    if mc.attention == "manual":  # q, k and v with k, v repeated to H heads, the fp32 weights (H, T), and
        # o_proj's input (its output is kept by no one but o_proj)
        attention = att * 3 * C + 4 * H * mc.max_seq_len + a * C
    else:  # the fused kernel: q, k, v (after RoPE), the log-sum-exp per head, and its output, whose
        # memory is already in o_proj's input layout unless it is cast for o_proj
        attention = att * (C + 2 * Ckv) + 4 * H + att * C + (a * C if att != a else 0)
    # gated: gate, act(gate), up and their product (down's input); GELU/SiLU: up and act(up)
    mlp = (4 if gated else 2) * a * F
    return 2 * norm_bytes(mc) + matmul_inputs + attention + mlp

def kept_bytes(mc, tokens, amp, attention_fp32=False, checkpointing=False, log_probs=False):
    """Bytes autograd holds for the backward pass when a forward of tokens positions ends (what
    saved_bytes measures): each block's saved tensors, or checkpointed only its fp32 input; the ids,
    the last norm and lm_head's input; with log_probs the fp32 log-probabilities the plain loss keeps
    (the plan counts those with the logits)."""
    a = 2 if amp else 4
    per_block = 4 * mc.n_embd if checkpointing else block_bytes(mc, amp, attention_fp32)
    last_norm = norm_bytes(mc) if mc.norm_position == "pre" else 0  # post-norm: the last block's is the last
    head = 16 + last_norm + a * mc.n_embd + (4 * mc.vocab_size if log_probs else 0)
    return tokens * (mc.n_layer * per_block + head)

def logits_bytes(mc, amp, tokens, loss_chunk):
    """Peak bytes of the logits for tokens positions, loss_chunk at a time if given: in the compute
    dtype, their fp32 copy and the fp32 log-probabilities cross_entropy keeps."""
    rows = min(tokens, loss_chunk) if loss_chunk else tokens
    return rows * (2 + 4 + 4 if amp else 4 + 4) * mc.vocab_size  # fp32: the logits are their own copy

def size(n):
    """Bytes as GiB, or MiB below one GiB."""
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / 2 ** 20:.1f} MiB"

@dataclass
class MemoryPlan:
    """Bytes per process, by part."""
    weights: float
    grads: float
    optimizer: float
    comms: float        # DDP's gradient buckets, or the weights FSDP gathers (and their gradients)
    activations: float  # saved for backward by one micro-batch, plus the autocast copies of the weights
    logits: float

    @property
    def total(self):
        return self.weights + self.grads + self.optimizer + self.comms + self.activations + self.logits

    def line(self):
        unit, name = (GiB, "GiB") if self.total >= GiB else (2 ** 20, "MiB")
        part = {k: f"{v / unit:.2f}" for k, v in vars(self).items()}
        return (f"{self.total / unit:.1f} {name} per process = weights {part['weights']} + grads {part['grads']} + "
                f"optimizer {part['optimizer']} + buffers {part['comms']} + activations {part['activations']} + "
                f"logits {part['logits']}")

def memory_plan(model, batch_size, world, fsdp, optimizer, amp, attention_fp32=False, checkpointing=False,
                loss_chunk=0):
    """A MemoryPlan for training model (a Transformer, on any device, "meta" too) with micro-batches of
    batch_size sequences of its max_seq_len on each of world processes."""
    mc, T = model.config, model.config.max_seq_len
    names = dict(model.named_parameters())  # a tied matrix once
    n = sum(p.numel() for p in names.values())
    n_block = sum(p.numel() for p in model.layers[0].parameters())
    n_head = model.lm_head.weight.numel()
    n_matrices = sum(p.numel() for k, p in names.items() if k.startswith("layers.") and p.dim() == 2)
    n_muon = n_matrices if optimizer == "muon" else 0
    shards = world if fsdp else 1
    state = 8 * (n - n_muon) + 4 * n_muon  # AdamW: 2 moments; Muon: 1 momentum
    if fsdp:  # the root's weights (embeddings, head) stay gathered; one block at work, the next prefetched
        pbytes = 2 if amp else 4   # FSDP's mixed precision gathers bf16 weights
        comms = pbytes * (n - mc.n_layer * n_block + 2 * n_block) + 4 * n_block
    else:
        comms = 4 * n if world > 1 else 0
    tokens = batch_size * T
    kept = kept_bytes(mc, tokens, amp, attention_fp32, checkpointing)
    # Checkpointing redoes one block at a time in the backward pass: its tensors exist meanwhile.
    redone = tokens * block_bytes(mc, amp, attention_fp32) if checkpointing else 0
    # Autocast's bf16 copies of the weights, kept for backward (a checkpointed block remakes its own)
    held = n_head + (n_matrices / mc.n_layer if checkpointing else n_matrices)
    weight_copies = 2 * held if amp and not fsdp else 0
    return MemoryPlan(weights=4 * n / shards, grads=4 * n / shards, optimizer=state / shards, comms=comms,
                      activations=kept + redone + weight_copies, logits=logits_bytes(mc, amp, tokens, loss_chunk))

def fixes(plan, batch_size, fsdp, checkpointing, chunked):
    """The changes that shrink the largest parts, most effective first, as flags."""
    options = []
    if not chunked and plan.logits > plan.activations / 4:
        options.append("--chunked-loss")
    if not checkpointing:
        options.append("--activation-checkpointing")
    if batch_size > 1:
        options.append(f"--batch-size={batch_size // 2} (with the same --batch-tokens)")
    if not fsdp:
        options.append("--parallel=fsdp (under torchrun)")
    return options

def saved_bytes(model, idx, amp=None):
    """Bytes of the distinct tensors autograd keeps for the backward pass of one training forward of
    idx (B, T) under the autocast context amp: the measurement the plan is checked against. Weights,
    autocast's copies of them and the RoPE tables are not activations and are left out."""
    weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}  # + RoPE tables
    storages = {}

    def weight_copy(t):  # autocast's cast of a weight (saved as a view: its transpose): a copy of a parameter
        fn = (t if t._base is None else t._base).grad_fn
        return (type(fn).__name__ == "ToCopyBackward0" and
                type(fn.next_functions[0][0]).__name__ == "AccumulateGrad")

    def keep(t):
        storage = t.untyped_storage()  # views of one tensor (k and v are views of their matmuls) count once
        if storage.data_ptr() not in weights and not weight_copy(t):
            storages[storage.data_ptr()] = storage.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t), amp or nullcontext():
        model(idx, idx)
    return sum(storages.values())
