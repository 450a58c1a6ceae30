"""
Train a Llama-style model on the token shards written by prepare.py: one straight path from a
laptop CPU to many GPUs on many nodes, through torch.distributed (torchrun), nothing home-made.

    python train.py                                   # the CPU demo: data/shakespeare, ~1 minute
    python train.py --preset=gpt2_small               # one GPU
    torchrun --standalone --nproc_per_node=8 train.py --preset=gpt2_small
    torchrun --standalone --nproc_per_node=8 train.py --preset=lf_llm_269m --parallel=fsdp  # shard the model
    python train.py --preset=gpt2_small --dry-run --gpu-memory=24   # the plans only: will it fit?
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \\
        train.py --preset=gpt2_small                  # the same line on every node
    python train.py --resume                          # continue out/shakespeare exactly where it stopped
    python train.py --preset=shakespeare_chat         # fine-tune the demo model on conversations
    python train.py --eval-only --ckpt=out/shakespeare/best.pt --hellaswag-path=hellaswag_val.jsonl

Settings are the fields of TrainConfig (below) and ModelConfig (model.py) as --name=value or
--name value; --preset picks a group of them first, and flags given win.

The file reads top to bottom: settings and presets, the loss and evaluation, the pieces of the run,
then main(): settings -> runtime (processes, device, precision) -> model, optimizer, data -> the
loop -> the end. The data loader (prepared folders, mixtures, the sample order) is data.py.
"""
import functools
import gc
import json
import math
import os
import signal
import sys
import textwrap
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP

import hellaswag
from common import (atomic_write, autocast, check, die, flag, gpu_peak_flops, load_checkpoint, load_hf_folder,
                    lock, matmul_flops, model_from_checkpoint, one_line, parse_config, parse_flags,
                    pick_device, pick_dtype, run_main, save_checkpoint, setting, tokenizer_fingerprint,
                    tokenizer_from_checkpoint)
from data import Mixture, data_sources, load_data, tokenizer_of
from memory import GiB, fixes, memory_plan, size
from model import ModelConfig, Transformer
from muon import Muon

# --- Settings -------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    preset: str = setting("shakespeare_cpu", "a group of settings from PRESETS; flags given win")
    data: str = setting("data/shakespeare", "a folder written by prepare.py, or a mixture of such folders with "
                        "weights: data/web:0.7,data/code:0.3")
    out_dir: str = setting("out/shakespeare", "where ckpt.pt, best.pt, log.jsonl and loss.png go")
    resume: bool = setting(False, "continue from out_dir/ckpt.pt, with its settings plus the flags given")
    overwrite: bool = setting(False, "start afresh in an out_dir that holds a run, replacing it")
    eval_only: bool = setting(False, "evaluate --ckpt (val loss, perplexity, HellaSwag) and exit")
    ckpt: str = setting("", "the checkpoint --eval-only reads")
    init_from: str = setting("", "fine-tune: start from this checkpoint's weights and model settings (step 0, "
                             "a new optimizer)")
    init_from_hf: str = setting("", "the same from a Hugging Face Llama folder (config.json, safetensors, "
                                "tokenizer.json), e.g. SmolLM's or one export.py wrote")
    seed: int = setting(1337, "model init, data order and dropout all follow from it")
    # batch and length; the sequence length is the model's max_seq_len
    batch_size: int = setting(16, "sequences per micro-batch, per process")
    batch_tokens: int = setting(0, "tokens per optimizer step over all processes; 0 = one micro-batch each")
    max_iters: int = setting(0, "run length in optimizer steps (or give --max-tokens)")
    max_tokens: int = setting(0, "run length in tokens (or give --max-iters)")
    # the optimizer; every learning rate follows linear warmup, then cosine decay to min_lr_ratio of its peak
    optimizer: str = setting("adamw", "adamw, or muon: Muon for the matrices inside the blocks, AdamW for the rest")
    lr: float = setting(1e-3, "peak learning rate (of AdamW)")
    min_lr_ratio: float = setting(0.1, "the cosine ends at lr * min_lr_ratio")
    warmup_iters: int = setting(100, "steps of linear warmup from 0 to lr")
    weight_decay: float = setting(0.1, "AdamW weight decay, on matrices only (not norm weights)")
    beta1: float = setting(0.9, "AdamW beta1")
    beta2: float = setting(0.95, "AdamW beta2")
    grad_clip: float = setting(1.0, "clip the gradient norm to this; 0 = no clipping")
    muon_lr: float = setting(0.02, "peak learning rate of Muon (--optimizer=muon)")
    muon_momentum: float = setting(0.95, "Muon's momentum")
    muon_weight_decay: float = setting(0.0, "Muon's decoupled weight decay")
    # evaluation and logging
    eval_every: int = setting(250, "steps between evaluations and checkpoints (and one at the end)")
    eval_batches: int = setting(20, "the fixed validation set: eval_batches * batch_size sequences")
    log_every: int = setting(10, "steps between log lines")
    sample_tokens: int = setting(100, "print a sample this long at each evaluation; 0 = none")
    hellaswag_every: int = setting(0, "HellaSwag accuracy every N steps and at the end; 0 = never")
    hellaswag_path: str = setting("", "local hellaswag_val.jsonl; empty = download once to data/")
    hellaswag_items: int = setting(0, "score only the first N items (quick checks); 0 = all 10,042")
    hellaswag_style: str = setting("nanogpt", "nanogpt: the text as given; lm-eval: as lm-eval prepares it, to "
                                   "compare acc and acc_norm_chars with its tables")
    wandb: bool = setting(False, "also log to Weights & Biases (pip install wandb)")
    wandb_project: str = setting("llama-from-scratch", "the wandb project")
    # system
    device: str = setting("auto", "auto (cuda > mps > cpu), cpu, cuda or mps; under torchrun cuda:LOCAL_RANK")
    dtype: str = setting("auto", "autocast dtype: auto, float32, bfloat16 or float16; weights stay fp32")
    compile: str = setting("auto", "torch.compile the model: auto (on for CUDA), true or false")
    parallel: str = setting("ddp", "how torchrun's processes share the work: ddp (each holds the whole model) or "
                            "fsdp (each holds 1/N of the weights, gradients and optimizer state)")
    activation_checkpointing: bool = setting(False, "recompute each block in the backward pass instead of keeping "
                                             "its activations: far less memory, one more forward pass")
    chunked_loss: bool = setting(False, "make the logits and the loss 1024 positions at a time, again in the "
                                 "backward pass: the fp32 logits never exist whole; one more lm_head matmul")
    gpu_memory: float = setting(0.0, "GiB per GPU for the memory plan; 0 = the GPU's own (CUDA)")
    dry_run: bool = setting(False, "print the plans (model, batches, FLOPs, memory per GPU) and exit; needs no "
                            "data or GPU")
    gpus: int = setting(0, "--dry-run: plan for this many processes; 0 = this launch's")
    peak_flops: float = setting(0.0, "per-device peak FLOP/s for MFU; 0 = the GPU's from common.PEAK_FLOPS")

    def __post_init__(self):
        check(self.preset in PRESETS, f"unknown --preset={self.preset}; choose one of {', '.join(PRESETS)}")
        check(self.dtype in ("auto", "float32", "bfloat16", "float16"),
              f"--dtype={self.dtype} must be auto, float32, bfloat16 or float16")
        check(self.compile in ("auto", "true", "false"),
              f"--compile={self.compile} must be auto, true or false")
        check(self.optimizer in ("adamw", "muon"), f"--optimizer={self.optimizer} must be adamw or muon")
        check(self.parallel in ("ddp", "fsdp"), f"--parallel={self.parallel} must be ddp or fsdp")
        check(self.hellaswag_style in ("nanogpt", "lm-eval"),
              f"--hellaswag-style={self.hellaswag_style} must be nanogpt or lm-eval")
        for name in ("batch_size", "eval_every", "eval_batches", "log_every"):
            check(getattr(self, name) > 0, f"{flag(name)}={getattr(self, name)} must be positive")
        for name in ("seed", "lr", "batch_tokens", "max_iters", "max_tokens", "warmup_iters", "weight_decay",
                     "grad_clip", "sample_tokens", "hellaswag_every", "hellaswag_items", "peak_flops", "muon_lr",
                     "muon_weight_decay", "gpu_memory", "gpus"):
            check(getattr(self, name) >= 0, f"{flag(name)}={getattr(self, name)} must not be negative")
        check(0 <= self.min_lr_ratio <= 1 and 0 <= min(self.beta1, self.beta2, self.muon_momentum) and
              max(self.beta1, self.beta2, self.muon_momentum) < 1, "need 0 <= min_lr_ratio <= 1 and 0 <= beta "
              f"< 1; got --min-lr-ratio={self.min_lr_ratio} --beta1={self.beta1} --beta2={self.beta2} "
              f"--muon-momentum={self.muon_momentum}")
        check(self.eval_only or (self.max_iters > 0) != (self.max_tokens > 0), "give exactly one of "
              f"--max-iters and --max-tokens (got {self.max_iters} and {self.max_tokens})")
        check(not self.eval_only or self.ckpt, "--eval-only needs --ckpt=PATH")

LOSS_CHUNK = 1024  # positions per chunk of --chunked-loss: their fp32 logits over 50k tokens take 200 MB

MODEL_HELP = {  # --help for ModelConfig's fields (model.py says the same in comments)
    "vocab_size": "embedding rows; default: the data's vocabulary rounded up to a multiple of 64",
    "n_layer": "transformer blocks", "n_head": "query heads H", "n_embd": "model width C",
    "n_kv_head": "key/value heads: = n_head multi-head, < n_head grouped-query, 1 multi-query",
    "ffn_hidden": "MLP width; 0 = Llama's rule (2/3 * 4C rounded up to multiple_of)",
    "multiple_of": "round the derived ffn_hidden up to a multiple of this",
    "max_seq_len": "context length, and the training sequence length",
    "rope_theta": "RoPE base (Llama 2: 1e4, Llama 3: 5e5)", "norm_eps": "RMSNorm epsilon",
    "tie_embeddings": "one matrix for the token embedding and the output head",
    "dropout": "attention and residual dropout (0 for pretraining)",
    "pos_emb": "ablation: rope, learned or none", "mlp": "ablation: swiglu, gelu or silu (no gate)",
    "norm": "ablation: rmsnorm, layernorm or none",
}

# Named groups of settings (TrainConfig and ModelConfig fields). The model's vocab_size defaults
# to the data's vocabulary rounded up to a multiple of 64, so any tokenizer fits any preset.
PRESETS = {
    # Tiny Shakespeare on a laptop CPU: 1.27M parameters with the 4096 BPE, under a minute. Muon for
    # the blocks (AdamW at 1e-2 for the embedding and norms) reaches val 4.44 in 250 steps; AdamW alone
    # needed 600 at its best lr, 2e-3 (bench.py --sections=time_to_loss --ttl-run=demo).
    "shakespeare_cpu": dict(n_layer=4, n_head=4, n_kv_head=2, n_embd=128, multiple_of=32, max_seq_len=128,
                            batch_size=16, max_iters=250, optimizer="muon", muon_lr=0.03, muon_momentum=0.9,
                            lr=1e-2, warmup_iters=25, eval_every=125, eval_batches=10, tie_embeddings=True,
                            device="cpu"),
    # Fine-tune the demo model into a chat model on data/shakespeare_chat (prepare.py's preset of the
    # same name): loss on the replies only, from out/shakespeare/best.pt.
    "shakespeare_chat": dict(init_from="out/shakespeare/best.pt", data="data/shakespeare_chat",
                             out_dir="out/shakespeare_chat", batch_size=16, max_iters=200, optimizer="adamw",
                             lr=1e-3, warmup_iters=20, eval_every=100, eval_batches=10, device="cpu"),
    # lilLM (39M): vocab 8192, d512, 12 layers, 16 query / 8 kv heads, seq 512, tied embeddings.
    "lillm_39m": dict(vocab_size=8192, n_layer=12, n_head=16, n_kv_head=8, n_embd=512, multiple_of=64,
                      max_seq_len=512, tie_embeddings=True, batch_size=64, batch_tokens=262144,
                      max_tokens=2_000_000_000, lr=1e-3, warmup_iters=500, data="data/tinystories",
                      out_dir="out/lillm_39m"),
    # The TinyStories model of a CS336-style project (22.7M, 12.5M without embeddings): its own 10k
    # byte-level BPE (prepare.py --preset tinystories-10k), untied head, d512, 4 layers, 16 heads,
    # d_ff 1344, context 256, 32 x 256 tokens x 5000 steps = 41M tokens, warmup 2 %, cosine to lr/100.
    # Its ablations are flags: --norm=none, --pos-emb=none, --mlp=silu|gelu (README: ablations).
    "tinystories_23m": dict(n_layer=4, n_head=16, n_kv_head=16, n_embd=512, ffn_hidden=1344, max_seq_len=256,
                            batch_size=32, max_iters=5000, lr=3e-3, warmup_iters=100, min_lr_ratio=0.01,
                            eval_every=500, data="data/tinystories_10k", out_dir="out/tinystories_23m"),
    # The ~220M Llama-3-shaped model of a "one GPU in one day" harness (219M, 168M without
    # embeddings): GQA 16 q / 4 kv heads, SwiGLU, tied, GPT-2 tokens (vocab 50304), Muon + AdamW,
    # warmup then a constant lr, on a web/text mixture; 20 tokens per parameter (4.4B). Its exact
    # widths are not in our notes: d1024 x 16 layers, ffn 2560 gives its size with Llama 3's shape.
    "llama3_220m": dict(n_layer=16, n_head=16, n_kv_head=4, n_embd=1024, ffn_hidden=2560, max_seq_len=2048,
                        tie_embeddings=True, batch_size=8, batch_tokens=524288, max_tokens=4_400_000_000,
                        optimizer="muon", muon_lr=0.02, lr=3e-3, warmup_iters=300, min_lr_ratio=1.0,
                        eval_every=1000, hellaswag_every=2000, data="data/fineweb_edu:0.8,data/openwebtext:0.2",
                        out_dir="out/llama3_220m"),
    # The "$50" GPT-2-style model (51.0M, 25.2M without embeddings), sized by a Chinchilla IsoFLOP
    # argument: N ~ 50M and D ~ 1.1B tokens for ~320 PFLOPs (python plan.py --flops=3.2e17). GPT-2's
    # parts: learned positions, LayerNorm, GELU MLP, tied; d512, 8 layers, 8 heads, block 64. No
    # biases (ours has none anywhere), so it has ~0.05M fewer parameters than the original.
    "gpt2_51m": dict(n_layer=8, n_head=8, n_kv_head=8, n_embd=512, max_seq_len=64, tie_embeddings=True,
                     pos_emb="learned", norm="layernorm", mlp="gelu", batch_size=512, batch_tokens=524288,
                     max_tokens=1_100_000_000, lr=1e-3, warmup_iters=100, eval_every=250,
                     data="data/fineweb_edu", out_dir="out/gpt2_51m"),
    # LF_LLM-269M: d1024, 16 layers, 16 heads, seq 2048, ~0.5M-token batches, lr 2.1e-3, 10B tokens.
    "lf_llm_269m": dict(n_layer=16, n_head=16, n_kv_head=16, n_embd=1024, ffn_hidden=3072, max_seq_len=2048,
                        tie_embeddings=True, batch_size=16, batch_tokens=524288, max_tokens=10_000_000_000,
                        lr=2.1e-3, warmup_iters=1000, eval_every=1000, hellaswag_every=2000,
                        data="data/fineweb_edu", out_dir="out/lf_llm_269m"),
    # GPT-2-small class (~124M) on FineWeb-Edu 10B, the build-nanogpt / llm.c recipe with Llama parts.
    # batch_size 16 keeps the fp32 logits of a micro-batch (16 x 1024 x 50304) near 3 GB.
    "gpt2_small": dict(n_layer=12, n_head=12, n_kv_head=12, n_embd=768, max_seq_len=1024, tie_embeddings=True,
                       batch_size=16, batch_tokens=524288, max_tokens=10_000_000_000, lr=6e-4,
                       warmup_iters=700, eval_every=500, hellaswag_every=2000, data="data/fineweb_edu",
                       out_dir="out/gpt2_small"),
}
PRESETS_HELP = "presets (without --preset, shakespeare_cpu applies; its values replace the defaults):\n" + \
    "\n".join(textwrap.fill(" ".join(f"{flag(k)}={v}" for k, v in p.items()), 100, break_on_hyphens=False,
                             initial_indent=f"  {name}: ", subsequent_indent="      ")
              for name, p in PRESETS.items())

def lr_factor(step, cfg, max_iters):
    """The learning rates' fraction of their peak at step: a linear warmup over warmup_iters steps,
    then a cosine from 1 down to min_lr_ratio at max_iters."""
    if step < cfg.warmup_iters:
        return (step + 1) / cfg.warmup_iters
    progress = min(1.0, (step - cfg.warmup_iters) / max(1, max_iters - cfg.warmup_iters))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

# --- Loss and evaluation ----------------------------------------------------------------------------
def masked_loss(model, x, y):
    """The mean loss over the targets to learn (y = -1: skip): a micro-batch with none gives 0, not
    the 0 / 0 of cross_entropy's mean. -> (loss, number of targets)."""
    _, loss_sum = model(x, y, reduction="sum")
    count = (y >= 0).sum()
    return loss_sum / count.clamp(min=1), count

@functools.lru_cache(maxsize=4)
def token_bytes(enc, device):
    """(V,) the UTF-8 bytes each token id of enc stands for; 0 for special tokens and unused ids."""
    specials = set(enc._special_tokens.values())
    lengths = []
    for i in range(enc.n_vocab):
        try:
            lengths.append(0 if i in specials else len(enc.decode_single_token_bytes(i)))
        except KeyError:  # a gap in the ranks
            lengths.append(0)
    return torch.tensor(lengths, dtype=torch.float64, device=device)

@torch.no_grad()
def evaluate_loss(model, windows, cfg, rt, nbytes):
    """(mean loss, bits per byte) over the fixed validation set (the first eval_batches * batch_size
    windows), spread over the ranks and summed across them, so it does not depend on the world size.
    Bits per byte (nanochat's measure) do not depend on the tokenizer: the loss of the targets that
    stand for text, in bits, over the bytes of that text; nbytes (V,) gives each id's bytes."""
    model.eval()
    n = min(windows.n, cfg.eval_batches * cfg.batch_size)
    ids = np.arange(n)[rt.rank::rt.world]
    total = torch.zeros(4, dtype=torch.float64, device=rt.device)  # (loss sum, targets, loss on text, bytes)
    # Every rank runs as many batches, an empty one as window 0 counted 0 times: under FSDP each
    # forward gathers weights from all ranks, and one that stops early would leave the others waiting.
    for i in range(0, math.ceil(n / rt.world), cfg.batch_size):
        mine = ids[i:i + cfg.batch_size]
        x, y = windows.batch(mine if len(mine) else [0], rt.device)
        with rt.amp:
            _, losses = model(x, y, reduction="none")                               # (B, T), 0 where y = -1
        text = nbytes[y.clamp(min=0)] * (y >= 0)                                    # (B, T) bytes per target
        if len(mine):
            total += torch.stack([losses.double().sum(), (y >= 0).sum().double(),
                                  (losses.double() * (text > 0)).sum(), text.sum()])
    if rt.world > 1:
        dist.all_reduce(total)
    model.train()
    return (total[0] / total[1]).item(), (total[2] / (math.log(2) * total[3])).item()

def evaluate_val(model, val, enc, cfg, rt):
    """{"val_loss": the mixture's (its sources' losses by weight), "val_bpb": the same in bits per
    byte, "val_loss[FOLDER]": each source's when there are several}."""
    nbytes = token_bytes(enc, rt.device)
    results = [evaluate_loss(model, windows, cfg, rt, nbytes) for windows in val.windows]
    record = {"val_loss": sum(w * loss for w, (loss, _) in zip(val.weights, results)),
              "val_bpb": sum(w * bpb for w, (_, bpb) in zip(val.weights, results))}
    if len(results) > 1:
        record |= {f"val_loss[{name}]": loss for name, (loss, _) in zip(val.names, results)}
    return record

def eval_line(record):
    """The console line of an evaluation: loss, perplexity, bits per byte, HellaSwag, each source's loss."""
    shown = ("val_bpb", "hellaswag_acc", "val_loss[")
    return (f"eval step {record['step']} | val loss {record['val_loss']:.4f} | ppl {record['val_ppl']:.2f} | " +
            " | ".join(f"{k} {v:.4f}" for k, v in record.items() if k.startswith(shown)))

def sample_text(model, enc, eot_id, n_tokens, seed, rt):
    """A seeded sample from the start of a document, as printable text (control bytes escaped)."""
    prompt = torch.full((1, 1), eot_id, dtype=torch.long, device=rt.device)
    with rt.amp:
        out = model.generate(prompt, n_tokens, temperature=0.8, top_k=200, vocab_size=enc.n_vocab,
                             generator=torch.Generator(rt.device).manual_seed(seed))
    text = enc.decode(out[0, 1:].tolist())
    return "".join(c if c.isprintable() or c == "\n" else f"\\x{ord(c):02x}" for c in text)

# --- Pieces of the run ----------------------------------------------------------------------------
def resolve_settings(given):
    """Flags -> (TrainConfig, ModelConfig, checkpoint or None, data meta or None, --init-from's
    checkpoint or None). Later wins: field defaults < the preset < the checkpoint's own settings
    (resume, eval-only) or the model settings of --init-from's < flags."""
    preset = PRESETS.get(given.get("preset", TrainConfig.preset), {})
    ckpt_path = given.get("ckpt") if given.get("eval_only") else None
    if given.get("resume") and not given.get("eval_only"):
        ckpt_path = os.path.join(given.get("out_dir", preset.get("out_dir", TrainConfig.out_dir)), "ckpt.pt")
    ckpt, settings = None, {**preset, **given}
    if ckpt_path:
        ckpt = load_checkpoint(ckpt_path)
        # the model, and the optimizer whose state it saved, are what they were
        fixed = {**ckpt["model_config"], "optimizer": ckpt["train_config"].get("optimizer", "adamw")}
        changed = [k for k, v in fixed.items() if k in given and given[k] != v]
        if changed:
            die(f"cannot change {', '.join(flag(k) for k in changed)} of {ckpt_path}; drop them")
        unknown = set(ckpt["train_config"]) - {f.name for f in fields(TrainConfig)}
        if unknown:
            die(f"{ckpt_path} has settings this train.py does not know ({', '.join(sorted(unknown))}); "
                "use the code that wrote it")
        settings = {**ckpt["train_config"], **ckpt["model_config"], **given}
    init, source = None, settings.get("init_from") or settings.get("init_from_hf")
    if source and ckpt is None:  # a resumed fine-tune has its weights in ckpt already
        if settings.get("init_from") and settings.get("init_from_hf"):
            die("give --init-from or --init-from-hf, not both")
        init = load_checkpoint(source) if settings.get("init_from") else hf_as_checkpoint(source)
        # fine-tuning keeps the model; only dropout may change, and the vocabulary grow (new tokens)
        changed = [k for k, v in init["model_config"].items()
                   if k in given and given[k] != v and k not in ("dropout", "vocab_size")]
        if changed:
            die(f"cannot change {', '.join(flag(k) for k in changed)} of {source}; drop them")
        settings = {**settings, **init["model_config"], **given}
    train_keys = {f.name for f in fields(TrainConfig)}
    cfg = parse_config(TrainConfig, {k: v for k, v in settings.items() if k in train_keys})
    model_settings = {k: v for k, v in settings.items() if k not in train_keys}
    need_data = not (cfg.eval_only or cfg.dry_run) or all(os.path.isfile(os.path.join(folder, "meta.json"))
                                         for folder, _ in data_sources(cfg.data))
    meta = load_data(cfg.data) if need_data else None
    grow = init and meta and meta["vocab_size"] > model_settings["vocab_size"]  # new tokens for a fine-tune
    if meta and (not model_settings.get("vocab_size") or grow):
        model_settings["vocab_size"] = 64 * math.ceil(meta["vocab_size"] / 64)  # a multiple of 64: faster matmuls
    model_cfg = parse_config(ModelConfig, model_settings)
    if meta and meta["vocab_size"] > model_cfg.vocab_size:
        die(f"the data's vocabulary ({meta['vocab_size']} tokens, {cfg.data}/meta.json) does not fit the "
            f"model's vocab_size={model_cfg.vocab_size}; raise --vocab-size or re-run prepare.py")
    return cfg, model_cfg, ckpt, meta, init

def check_out_dir(cfg, ckpt, max_iters):
    """Make this the only run writing out_dir; refuse to mix two runs there; exit early (0) when a
    resumed run has nothing left to do."""
    if os.path.exists(cfg.out_dir) and not os.path.isdir(cfg.out_dir):
        die(f"--out-dir={cfg.out_dir} is a file; choose a folder")
    lock(cfg.out_dir, "--out-dir")  # held until this process exits
    os.makedirs(cfg.out_dir, exist_ok=True)
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    if not cfg.resume and os.path.exists(ckpt_path) and not cfg.overwrite:
        die(f"{cfg.out_dir} holds a run already ({ckpt_path}); continue it with --resume, start afresh "
            "with --overwrite, or choose another --out-dir")
    if cfg.resume and ckpt["step"] >= max_iters:
        print(f"{ckpt_path} is at step {ckpt['step']}, the run has {max_iters} steps: nothing to do "
              f"(raise {'--max-tokens' if cfg.max_tokens else '--max-iters'} to train on)")
        sys.exit(0)
    if cfg.overwrite and not cfg.resume:  # the old run's records would run into this one's
        for name in ("log.jsonl", "loss.png"):
            if os.path.exists(os.path.join(cfg.out_dir, name)):
                os.remove(os.path.join(cfg.out_dir, name))

def check_resume(ckpt, path, enc, folder):
    """A checkpoint to resume holds the whole training state, and the data its tokenizer's ids."""
    for key in ("optimizer", "scaler", "rng"):
        if key not in ckpt:
            die(f"{path} has no {key} state, so it cannot be resumed exactly")
    check_tokenizer(ckpt, path, enc, folder)

def hf_as_checkpoint(folder):
    """--init-from-hf: a Hugging Face Llama folder as the parts of a checkpoint that --init-from uses."""
    model, _, eot_id, spec = load_hf_folder(folder)
    return {"model": model.state_dict(), "model_config": asdict(model.config), "tokenizer": spec, "eot_id": eot_id}

def load_pretrained(model, init, path, enc):
    """--init-from: the checkpoint's weights into model. Rows of tokens its tokenizer lacks (chat.py's,
    added by prepare.py --chat) start at the mean of the known tokens' rows: an average token, rather
    than noise the model has never seen. -> what was done, for the log."""
    base = tokenizer_from_checkpoint(init, path, math.inf)
    same = base._pat_str == enc._pat_str and base._mergeable_ranks == enc._mergeable_ranks
    if not same or not base._special_tokens.items() <= enc._special_tokens.items():
        die(f"the data was tokenized with another tokenizer than {path} ({base.name}); prepare it with "
            "that tokenizer (prepare.py --tokenizer DATA_FOLDER or NAME)")
    new = sorted(set(enc._special_tokens.values()) - set(base._special_tokens.values()))
    state = dict(init["model"])
    for name in ("embed_tokens.weight", "lm_head.weight"):
        rows = model.state_dict()[name].clone()                                     # (V, C), V may have grown
        old = state[name]
        rows[:len(old)] = old
        rows[new] = old[:base.n_vocab].mean(0)
        state[name] = rows
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        die(f"{path} does not fit this model: {one_line(e)}")
    names = ", ".join(k for k, v in enc._special_tokens.items() if v in new)
    return f"init    weights of {path}" + (f"; new tokens {names} start at the mean embedding" if new else "")

def check_tokenizer(ckpt, path, enc, folder):
    """Refuse data whose ids mean other text than the checkpoint's tokenizer made them mean."""
    if tokenizer_fingerprint(enc) != tokenizer_fingerprint(tokenizer_from_checkpoint(ckpt, path, math.inf)):
        die(f"{folder} was tokenized with another tokenizer than {path} ({ckpt['tokenizer']['name']}); point "
            "--data at data prepared with the checkpoint's tokenizer")

@dataclass
class Runtime:
    """Where and how this process computes: its rank among world processes, device and precision."""
    distributed: bool       # started by torchrun: DDP, or FSDP with fsdp
    rank: int
    local_rank: int
    world: int
    device: torch.device = None
    dtype: torch.dtype = None
    amp: object = None      # the autocast context
    scaler: object = None   # fp16's GradScaler (a no-op otherwise)
    compile: bool = False
    peak_flops: float = 0.0  # per device, for MFU; 0 = unknown
    fsdp: bool = False

    @property
    def master(self):
        return self.rank == 0

def processes():
    """torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; without them this is one plain process."""
    env = {k: int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1))}
    return Runtime("RANK" in os.environ, env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"])

def start(rt, cfg):
    """Join the other processes (if any) and pick the device and precision."""
    rt.device = pick_device(cfg.device)
    rt.fsdp = cfg.parallel == "fsdp" and rt.distributed  # (one plain process has nothing to shard over)
    if rt.distributed:
        if rt.device.type == "cuda":
            rt.device = torch.device(f"cuda:{rt.local_rank}")
            torch.cuda.set_device(rt.device)
        # torch 2.13: importing torch._dynamo after init_process_group (torch.optim does, lazily) keeps
        # the group alive past destroy_process_group. Imported before, destroy frees it.
        from torch import _dynamo  # noqa: F401
        dist.init_process_group(backend="nccl" if rt.device.type == "cuda" else "gloo")
    rt.dtype = pick_dtype(cfg.dtype, rt.device)
    rt.amp = autocast(rt.device, rt.dtype)
    # bf16 needs no loss scaling; fp16's narrow range does: the scaler multiplies the loss up
    # before backward and skips the steps whose gradients overflowed.
    rt.scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.dtype == torch.float16)
    # TF32 for fp32 matmuls on Ampere and later GPUs. Not "medium" on CPUs: it moves fp32 matmuls to
    # oneDNN, which trained 0.77x as fast at d128 and 1.02x at d512 here (2-core EPYC, measured).
    torch.set_float32_matmul_precision("high")
    rt.compile = compiles(cfg, rt.device)
    # MFU against the GPU's datasheet peak, or on a CPU against its matmul peak, measured (~0.2 s)
    rt.peak_flops = cfg.peak_flops or gpu_peak_flops(rt.device) or (
        matmul_flops(rt.device, rt.dtype) if rt.device.type == "cpu" else 0.0)

def compiles(cfg, device):
    # torch.compile on a CPU: +53% tokens/s on the demo, but ~30 s to compile, more than it saves there
    return cfg.compile == "true" or (cfg.compile == "auto" and device.type == "cuda")

def stop_processes(rt):
    # The barrier lets every rank finish its last collective before any rank tears down; then the
    # group's threads must be gone before the interpreter exits: one still freeing a finished
    # collective needs the GIL and aborts the exit ("terminate called without an active exception").
    if rt.distributed:
        dist.barrier()
        dist.destroy_process_group()

def build_optimizers(model, cfg, rt):
    """[AdamW] or [Muon, AdamW]. Muon takes the 2-D matrices inside the blocks; AdamW takes the rest
    (with Muon: the embedding, an untied output head and the norm weights), with weight decay on
    matrices, not on norm weights."""
    params = dict(model.named_parameters())  # a tied matrix once, as embed_tokens.weight
    muon = [n for n, p in params.items() if cfg.optimizer == "muon" and n.startswith("layers.") and p.dim() == 2]
    decay = [p for n, p in params.items() if n not in muon and p.dim() >= 2]
    no_decay = [p for n, p in params.items() if n not in muon and p.dim() < 2]
    # fused: one kernel for the whole update of all tensors, on CUDA and on CPUs (2.5x faster here)
    adamw = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                               {"params": no_decay, "weight_decay": 0.0}],
                              lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=rt.device.type in ("cuda", "cpu"))
    if not muon:
        return [adamw]
    # Newton-Schulz in bf16 where bf16 matmuls are fast (GPUs, CPUs that train in bf16), else in fp32
    ns_dtype = torch.bfloat16 if rt.device.type == "cuda" or rt.dtype == torch.bfloat16 else torch.float32
    return [Muon([params[n] for n in muon], lr=cfg.muon_lr, momentum=cfg.muon_momentum,
                 weight_decay=cfg.muon_weight_decay, ns_dtype=ns_dtype), adamw]

def shard(model, rt):
    """FSDP2 (--parallel=fsdp): cut each block's weights, and the rest's (embeddings, last norm, head),
    into one piece per process. A block's weights are gathered for its forward and again for its
    backward, and freed after; its gradients are reduce-scattered into pieces, and each process's
    optimizer updates its pieces. With bf16, FSDP gathers bf16 copies and reduces the gradients in
    fp32 (its mixed precision); the pieces, like DDP's weights, stay fp32."""
    mp = MixedPrecisionPolicy()
    if rt.dtype == torch.bfloat16:  # cast_forward_inputs=False: the fp32 RoPE tables go in as they are
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False)
    for layer in model.layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)  # moves the pieces to the GPU of this process

def build_model(cfg, model_cfg, ckpt, init, enc, rt):
    """The model on its device: new, or the weights of the checkpoint to resume or evaluate, or of
    --init-from's; sharded under FSDP (in place: the sharded model is the model from then on).
    -> (model, what --init-from did, for the log)."""
    path = cfg.ckpt if cfg.eval_only else os.path.join(cfg.out_dir, "ckpt.pt")
    model = model_from_checkpoint(ckpt, path) if ckpt else Transformer(model_cfg)
    init_note = load_pretrained(model, init, cfg.init_from or cfg.init_from_hf, enc) if init else None
    model.checkpointing = cfg.activation_checkpointing
    model.loss_chunk = LOSS_CHUNK if cfg.chunked_loss else 0
    if rt.fsdp:
        shard(model, rt)
    return model.to(rt.device), init_note

def save(paths, model, optimizers, improved, rt, **state):
    """ckpt.pt, and best.pt if improved, called on every rank: the weights and optimizer states are
    gathered whole onto rank 0's CPU (FSDP holds them in pieces) and keyed by parameter name, so a
    checkpoint written under FSDP resumes under DDP or on one process, and the other way round."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=options)
    optimizer_states = [get_optimizer_state_dict(model, optimizer, options=options) for optimizer in optimizers]
    if not rt.master:
        return
    save_checkpoint(paths["ckpt.pt"], model, weights=weights, optimizer=optimizer_states,
                    scaler=rt.scaler.state_dict(), rng=rng_state(rt), **state)
    if improved:  # best.pt: the same bytes, written atomically too
        with open(paths["ckpt.pt"], "rb") as src, atomic_write(paths["best.pt"]) as dst:
            dst.write(src.read())
    plot_losses(paths["log.jsonl"], paths["loss.png"])

class RunLog:
    """What the run reports, rank 0 only: lines on the console, records in log.jsonl (and wandb),
    and for a training run its resolved settings in config.json (the checkpoint holds its own copy)."""

    def __init__(self, path, master, cfg=None, model_cfg=None):
        self.path, self.master, self.wandb = path, master, None
        if master and cfg is not None:
            with atomic_write(os.path.join(cfg.out_dir, "config.json"), "w") as f:
                json.dump({"train": asdict(cfg), "model": asdict(model_cfg)}, f, indent=2)
        if master and cfg is not None and cfg.wandb:
            try:
                import wandb
            except ImportError:
                die("--wandb needs the wandb package: pip install wandb")
            self.wandb = wandb
            name = os.path.basename(os.path.abspath(cfg.out_dir))
            wandb.init(project=cfg.wandb_project, name=name, config={**asdict(cfg), **asdict(model_cfg)})

    def print(self, *args, **kwargs):
        if self.master:
            print(*args, **kwargs, flush=True)

    def record(self, record):
        if self.master:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if self.wandb:
                self.wandb.log(record, step=record["step"])

class StopSignal:
    """SIGTERM (preemption, torchrun shutting down) or Ctrl-C sets .requested: the run finishes its
    step, saves and exits 0. A second Ctrl-C stops at once."""

    def __init__(self):
        self.requested = False
        signal.signal(signal.SIGTERM, self.request)
        signal.signal(signal.SIGINT, self.request)

    def request(self, signum, frame):
        self.requested = True
        signal.signal(signum, signal.SIG_DFL)

def plot_losses(log_path, png_path):
    """loss.png from the JSONL log, if matplotlib is installed (it is optional)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    with open(log_path) as f:
        records = [json.loads(line) for line in f]
    plt.figure(figsize=(7, 4))
    for key in ("loss", "val_loss"):
        points = [(r["step"], r[key]) for r in records if key in r]
        if points:
            plt.plot(*zip(*points), label=key, marker="o" if key == "val_loss" else None)
    plt.xlabel("step")
    plt.ylabel("loss")
    plt.legend()
    plt.grid(alpha=0.3)
    plt.savefig(png_path, dpi=100, bbox_inches="tight")
    plt.close()

def perplexity(loss):
    return math.exp(loss) if loss < 700 else math.inf  # exp overflows a float past 709

def minutes(seconds):
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"

def batch_plan(cfg, T, world):
    """(tokens per optimizer step, micro-batches per step per process, run length in steps)."""
    micro_tokens = cfg.batch_size * T * world  # one micro-batch on every process
    batch_tokens = cfg.batch_tokens or micro_tokens
    if batch_tokens % micro_tokens:
        die(f"--batch-tokens={batch_tokens} is not a multiple of batch_size * max_seq_len * processes = "
            f"{cfg.batch_size} * {T} * {world} = {micro_tokens}")
    max_iters = cfg.max_iters or math.ceil(cfg.max_tokens / batch_tokens)
    return batch_tokens, batch_tokens // micro_tokens, max_iters

def rng_state(rt):
    return {"torch": torch.get_rng_state(),
            "cuda": [torch.cuda.get_rng_state(rt.device)] if rt.device.type == "cuda" else []}

def restore(ckpt, model, optimizers, rt):
    """Put back what ckpt saved besides the weights (those went in before sharding): the optimizer
    states (each process takes its pieces under FSDP), the scaler, rank 0's RNG -> (step, tokens, best val)."""
    states = ckpt["optimizer"] if isinstance(ckpt["optimizer"], list) else [ckpt["optimizer"]]  # older: one
    for optimizer, state in zip(optimizers, states, strict=True):
        if all(isinstance(k, str) for k in state["state"]):  # by parameter name
            set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
        elif rt.fsdp:
            die("this checkpoint's optimizer state predates FSDP: resume it once without --parallel=fsdp")
        else:  # older checkpoints: by the parameter's position in the optimizer
            optimizer.load_state_dict(state)
    rt.scaler.load_state_dict(ckpt["scaler"])
    if rt.master:
        torch.set_rng_state(ckpt["rng"]["torch"])
        if rt.device.type == "cuda" and ckpt["rng"]["cuda"]:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"][0], rt.device)
    return ckpt["step"], ckpt["tokens_seen"], ckpt["best_val_loss"]

def evaluate_only(cfg, model, ckpt, meta, rt):
    """--eval-only: val loss (when the data folder exists) and HellaSwag of a checkpoint; one log line."""
    enc = tokenizer_from_checkpoint(ckpt, cfg.ckpt, model.config.vocab_size)
    if meta is not None:
        check_tokenizer(ckpt, cfg.ckpt, tokenizer_of(meta)[0], cfg.data)
    # HellaSwag when asked for, or when its file is at hand: an offline machine still gets the val loss
    wanted = (cfg.hellaswag_path or cfg.hellaswag_items or cfg.hellaswag_every
              or os.path.isfile(hellaswag.DEFAULT_PATH))
    items = (hellaswag.get_items(cfg.hellaswag_path, cfg.hellaswag_items, rt.rank, rt.world, cfg.hellaswag_style)
             if wanted else [])
    if meta is None and not items:
        die(f"nothing to evaluate: no data at --data={cfg.data} and no HellaSwag asked for (--hellaswag-items=N "
            "downloads it)")
    record = {"step": ckpt["step"], "eval_only": cfg.ckpt}
    if meta is not None:
        record |= evaluate_val(model, Mixture(meta, "val", model.config.max_seq_len, cfg.seed), enc, cfg, rt)
        record["val_ppl"] = perplexity(record["val_loss"])
    T = model.config.max_seq_len
    if items:
        record |= hellaswag.evaluate(model, enc, items, rt.device, rt.amp, T, rt.rank, rt.world)
    log = RunLog(os.path.join(os.path.dirname(os.path.abspath(cfg.ckpt)), "log.jsonl"), rt.master)
    log.print(" | ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()))
    log.record(record)

def print_plan(log, cfg, model, rt, train, val, tokenizer, step, max_iters, batch_tokens, accum, init_note):
    """What the run will do, where, what it needs in memory and where its outputs go, before any of
    it is spent (--dry-run: no data, train is None)."""
    mc, T, n_params = model.config, model.config.max_seq_len, model.num_params()
    total = max_iters * batch_tokens
    body = model.num_params(embeddings=False)
    log.print(f"model   {n_params / 1e6:.2f}M parameters ({body / 1e6:.2f}M without embeddings): "
              f"{mc.n_layer} layers, d{mc.n_embd}, {mc.n_head} heads / {mc.n_kv_head} kv, T={T}, "
              f"vocab {mc.vocab_size}")
    if train is None:
        log.print(f"data    {cfg.data}: not read (--dry-run)")
    sources = zip(train.names, train.weights, train.windows, val.windows) if train else []
    for name, weight, windows, val_windows in sources:
        share = f" ({weight:.0%} of the batches)" if len(train.names) > 1 else ""
        log.print(f"data    {name}{share}: {windows.n * T / 1e6:,.2f}M train tokens, "
                  f"{val_windows.n * T / 1e6:,.2f}M val, tokenizer {tokenizer['name']}; "
                  f"{total * weight / (windows.n * T):.2f} epochs in this run")
    log.print(f"plan    {f'from step {step} to ' if step else ''}{max_iters} steps x {batch_tokens:,} "
              f"tokens = {total / 1e6:,.1f}M tokens ({total / n_params:.1f} per parameter; Chinchilla-optimal "
              f"~20), {model.flops_per_token(T) * total:.2e} FLOPs")
    name = rt.device.type if rt.device.type != "cuda" else "planned" if cfg.dry_run else \
        torch.cuda.get_device_name(rt.device)
    log.print(f"runtime {rt.device} ({name}), "
              f"{str(rt.dtype).removeprefix('torch.')}, compile {'on' if rt.compile else 'off'}, "
              f"{rt.world} process(es){' (FSDP)' if rt.fsdp else ''} x {accum} micro-batch(es) of "
              f"{cfg.batch_size} sequences")
    print_memory(log, cfg, model, rt)
    if not cfg.dry_run:
        log.print(f"output  {cfg.out_dir}/: ckpt.pt (latest), best.pt (lowest val loss), log.jsonl, loss.png")
    if init_note:  # --init-from
        log.print(init_note)

def print_memory(log, cfg, model, rt):
    """The memory plan per process (memory.py), and against the GPU's memory, with the fixes when
    it will not fit."""
    plan_with = functools.partial(memory_plan, model, cfg.batch_size, rt.world, rt.fsdp, cfg.optimizer,
                                  amp=rt.dtype != torch.float32, attention_fp32=rt.device.type == "cpu")
    plan = plan_with(checkpointing=cfg.activation_checkpointing, loss_chunk=model.loss_chunk)
    log.print(f"memory  {plan.line()}")
    # each saver flipped: what turning it on would save, or what turning it off would cost
    flipped = plan_with(checkpointing=not cfg.activation_checkpointing,
                        loss_chunk=0 if model.loss_chunk else LOSS_CHUNK)
    word = {True: "without", False: "with"}
    log.print(f"        activations {size(flipped.activations)} {word[cfg.activation_checkpointing]} "
              f"--activation-checkpointing, logits {size(flipped.logits)} {word[cfg.chunked_loss]} --chunked-loss")
    capacity = cfg.gpu_memory * GiB or (torch.cuda.get_device_properties(rt.device).total_memory
                                        if rt.device.type == "cuda" else 0)
    if not capacity:
        return
    # Leave ~10 %: the CUDA context, the allocator's fragmentation and the kernels' workspaces take it.
    if plan.total <= 0.9 * capacity:
        log.print(f"        fits: {plan.total / capacity:.0%} of {capacity / GiB:.0f} GiB")
        return
    options = fixes(plan, cfg.batch_size, rt.fsdp, cfg.activation_checkpointing, cfg.chunked_loss)
    log.print(f"warning: {plan.total / GiB:.1f} GiB will not fit in {capacity / GiB:.0f} GiB less ~10 % for the "
              f"CUDA context and fragmentation; try {', '.join(options) or 'a smaller model'}", file=sys.stderr)

def dry_run(cfg, model_cfg, rt):
    """--dry-run: the run's plans without data, processes or a GPU. The model is built on the "meta"
    device: shapes without memory, so a 70B model costs nothing. --gpu-memory plans for a GPU."""
    with torch.device("meta"):
        model = Transformer(model_cfg)
    model.loss_chunk = LOSS_CHUNK if cfg.chunked_loss else 0
    rt.world, rt.fsdp = cfg.gpus or rt.world, cfg.parallel == "fsdp"
    rt.device = torch.device("cuda") if cfg.gpu_memory else pick_device(cfg.device)
    floats = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    rt.dtype = floats.get(cfg.dtype, torch.bfloat16) if cfg.gpu_memory else pick_dtype(cfg.dtype, rt.device)
    rt.compile = compiles(cfg, rt.device)
    batch_tokens, accum, max_iters = batch_plan(cfg, model_cfg.max_seq_len, rt.world)
    print_plan(RunLog("", True), cfg, model, rt, None, None, None, 0, max_iters, batch_tokens, accum, None)

def print_summary(log, cfg, paths, code, why, step, start_step, seconds, best_val, stopped, chat):
    """How the run ended, where its files are, and the commands that go on from there."""
    if code:
        kept = (f"{paths['ckpt.pt']} still holds the last good state" if os.path.isfile(paths["ckpt.pt"])
                else "no checkpoint was written")
        log.print(f"error: {why} at step {step}; stopped without saving, so {kept}. Lower --lr or raise "
                  "--warmup-iters", file=sys.stderr)
    elif stopped:
        log.print(f"stopped by signal at step {step}; saved {paths['ckpt.pt']}; continue with "
                  f"python train.py --resume --out-dir={cfg.out_dir}")
    else:
        log.print(f"done: {step - start_step} steps in {minutes(seconds)}; best val loss {best_val:.4f} "
                  f"(ppl {perplexity(best_val):.2f}) in {paths['best.pt']}\n"
                  f"  sample:   python sample.py --ckpt {paths['best.pt']} " +
                  ("--chat\n" if chat else "--prompt \"...\"\n") +
                  f"  go on:    python train.py --resume --out-dir={cfg.out_dir} --max-iters=N"
                  f"  (N > {step})\n"
                  f"  records:  {paths['log.jsonl']}" +
                  (f", {paths['loss.png']}" if os.path.exists(paths["loss.png"]) else ""))

# --- The run --------------------------------------------------------------------------------------
def main(argv):
    # --- Settings: field defaults < preset < the checkpoint's own (resume, eval-only) < flags given
    given = parse_flags(argv, [TrainConfig, ModelConfig], __doc__, epilog=PRESETS_HELP, helps=MODEL_HELP)
    cfg, model_cfg, ckpt, meta, init = resolve_settings(given)
    rt = processes()
    if cfg.dry_run:
        return dry_run(cfg, model_cfg, rt)
    T = model_cfg.max_seq_len
    batch_tokens, accum, max_iters = batch_plan(cfg, T, rt.world)
    if not cfg.eval_only:
        enc, tokenizer = tokenizer_of(meta)
        if ckpt is not None:
            check_resume(ckpt, os.path.join(cfg.out_dir, "ckpt.pt"), enc, cfg.data)
        if rt.master:  # only rank 0 writes out_dir
            check_out_dir(cfg, ckpt, max_iters)

    # --- Runtime: processes, device, precision
    start(rt, cfg)

    # --- Model, optimizer, data
    torch.manual_seed(cfg.seed)  # the same seed on every rank: every rank starts from the same init
    raw_model, init_note = build_model(cfg, model_cfg, ckpt, init, enc if init else None, rt)
    # Compiled or not, raw_model is what gets saved: its state dict has no "_orig_mod." prefixes.
    compiled = torch.compile(raw_model) if rt.compile else raw_model
    if cfg.eval_only:
        evaluate_only(cfg, compiled, ckpt, meta, rt)
        return stop_processes(rt)
    optimizers = build_optimizers(raw_model, cfg, rt)
    step, tokens_seen, best_val = restore(ckpt, raw_model, optimizers, rt) if ckpt else (0, 0, math.inf)
    # Dropout draws from torch's global generator, per rank; rank 0's state is restored exactly.
    if not (ckpt and rt.master):
        torch.manual_seed(cfg.seed + rt.rank + 7919 * step)
    # DDP averages the gradients of all ranks inside backward (FSDP reduce-scatters them in pieces);
    # evaluation uses the model without the DDP wrapper.
    ddp = DDP(compiled, device_ids=[rt.local_rank] if rt.device.type == "cuda" else None) \
        if rt.distributed and not rt.fsdp else None
    model = ddp or compiled
    train, val = (Mixture(meta, split, T, cfg.seed) for split in ("train", "val"))
    items = hellaswag.get_items(cfg.hellaswag_path, cfg.hellaswag_items, rt.rank, rt.world, cfg.hellaswag_style) \
        if cfg.hellaswag_every else None  # loaded (and checked) now, not after hours of training
    paths = {name: os.path.join(cfg.out_dir, name) for name in ("ckpt.pt", "best.pt", "log.jsonl", "loss.png")}
    log = RunLog(paths["log.jsonl"], rt.master, cfg, model_cfg)
    print_plan(log, cfg, raw_model, rt, train, val, tokenizer, step, max_iters, batch_tokens, accum, init_note)
    flops_per_token = raw_model.flops_per_token(T)
    stop = StopSignal()  # from here on, SIGTERM and Ctrl-C end the run cleanly at the next step

    # --- The loop: evaluate and save when due, then one optimizer step
    start_step, stopped, exit_code, why = step, False, 0, ""
    t_start = t_log = time.time()
    tokens_at_log, pace_from = tokens_seen, None  # pace_from: (time, step) of the first log line
    while True:
        last_step = step == max_iters
        # Evaluate at step 0 (the baseline), every eval_every steps and at the end; a resumed run
        # skips its first step, which its checkpoint was evaluated and saved at.
        due = step % cfg.eval_every == 0 and (step > start_step or step == 0)
        evaluate = not stopped and (last_step or due)
        if evaluate:
            vals = evaluate_val(compiled, val, enc, cfg, rt)  # the mixture's, and each source's
            val_loss = vals["val_loss"]
            if not math.isfinite(val_loss):  # the last update broke the weights: do not save them
                exit_code, why = 1, f"validation loss is {val_loss}"
                break
            record = {"step": step, "tokens": tokens_seen, **vals, "val_ppl": perplexity(val_loss),
                      "elapsed": time.time() - t_start}
            if items and (last_step or step % cfg.hellaswag_every == 0):
                record |= hellaswag.evaluate(compiled, enc, items, rt.device, rt.amp, T, rt.rank, rt.world)
            log.print(eval_line(record))
            log.record(record)
            # From the uncompiled model (decoding shapes vary); on every rank under FSDP, whose
            # forward needs them all: they draw the same tokens from the same seed.
            if (rt.master or rt.fsdp) and cfg.sample_tokens:
                text = sample_text(raw_model, enc, meta["eot_id"], cfg.sample_tokens, cfg.seed, rt)
                log.print("sample:\n" + "\n".join("  | " + line for line in text.split("\n")))
        if step > start_step and (evaluate or stopped):
            improved = evaluate and val_loss < best_val
            best_val = val_loss if improved else best_val
            save(paths, raw_model, optimizers, improved, rt, tokenizer=tokenizer, eot_id=meta["eot_id"],
                 train_config=asdict(cfg), step=step, tokens_seen=tokens_seen, best_val_loss=best_val)
        if last_step or stopped:
            break

        # One optimizer step: accum micro-batches on each of world processes. The step's global
        # batch is rows [step * rows_per_step, ...) of the epoch order; rank r takes its r-th slice.
        factor = lr_factor(step, cfg, max_iters)
        for optimizer in optimizers:  # from the settings, every step: a resumed run may change them
            for group in optimizer.param_groups:
                group["lr"] = (cfg.muon_lr if isinstance(optimizer, Muon) else cfg.lr) * factor
        lr = cfg.lr * factor  # AdamW's, for the log
        loss_sum = torch.zeros((), device=rt.device)  # summed on the device: no sync per micro-step
        for micro in range(accum):
            first = step * (batch_tokens // T) + (rt.rank * accum + micro) * cfg.batch_size
            x, y = train.batch(range(first, first + cfg.batch_size), rt.device)
            # DDP all-reduces the gradients in every backward unless told not to: only the last
            # micro-step of an optimizer step needs it.
            # (FSDP reduce-scatters every micro-step: skipping it would keep whole gradients meanwhile.)
            with ddp.no_sync() if ddp and micro < accum - 1 else nullcontext():
                with rt.amp:  # the forward and the loss in low precision; the backward follows it
                    loss, _ = masked_loss(model, x, y)
                rt.scaler.scale(loss / accum).backward()  # / accum: the step's gradient is the mean
            loss_sum += loss.detach()
        for optimizer in optimizers:
            rt.scaler.unscale_(optimizer)  # clipping must see the true gradients, not scaled ones
        grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip or math.inf)
        if isinstance(grad_norm, DTensor):  # under FSDP: the norm over all pieces, on every rank
            grad_norm = grad_norm.full_tensor()
        # One small all-reduce a step: the mean loss, a non-finite loss anywhere, a stop request
        # anywhere. Every rank then takes the same decision, so none waits for a rank that left.
        flags = torch.stack([loss_sum / accum, (~torch.isfinite(loss_sum)).float(),
                             torch.tensor(float(stop.requested), device=rt.device)])
        if rt.distributed:
            dist.all_reduce(flags)
        mean_loss, nonfinite, stopped = flags.tolist()  # .tolist(): the one host sync of the step
        mean_loss, stopped = mean_loss / rt.world, bool(stopped)
        if nonfinite:  # before the update: the weights (and ckpt.pt) stay the last good ones
            exit_code, why = 1, f"loss is {mean_loss}"
            break
        for optimizer in optimizers:
            rt.scaler.step(optimizer)
        rt.scaler.update()
        raw_model.zero_grad(set_to_none=True)  # None, not zeros: the next backward writes, not adds
        step += 1
        tokens_seen += batch_tokens

        if step % cfg.log_every == 0 or step == max_iters:
            now = time.time()
            tok_s = (tokens_seen - tokens_at_log) / (now - t_log)
            # The ETA from the pace since the first log line, evaluations included: steadier than one
            # window's, and past compiling and warm-up, which only the first window holds.
            since = pace_from or (t_start, start_step)
            eta = (now - since[0]) / (step - since[1]) * (max_iters - step)
            pace_from = pace_from or (now, step)
            mfu = flops_per_token * tok_s / rt.world / rt.peak_flops if rt.peak_flops else None
            log.print(f"step {step}/{max_iters} | loss {mean_loss:.4f} | lr {lr:.2e} | "
                      f"grad norm {grad_norm:.3f} | {tok_s:,.0f} tok/s" +
                      (f" | MFU {mfu:.1%}" if mfu is not None else "") + f" | ETA {minutes(eta)}" +
                      "".join(f"\ndata    {news}" for news in train.news(step * (batch_tokens // T))))
            log.record({"step": step, "tokens": tokens_seen, "loss": mean_loss, "lr": lr,
                        "grad_norm": grad_norm.item(), "tokens_per_s": tok_s, "mfu": mfu, "time": now})
            t_log, tokens_at_log = now, tokens_seen

    # --- The end
    print_summary(log, cfg, paths, exit_code, why, step, start_step, time.time() - t_start, best_val, stopped,
                  chat="loss_mask" in meta)
    # The DDP wrapper's reducer holds the process group: free it before tearing the group down, or
    # a gloo worker thread can hang the exit waiting for the GIL.
    del model, ddp
    gc.collect()
    stop_processes(rt)
    sys.exit(exit_code)

if __name__ == "__main__":
    run_main(main)
