"""
Train a Llama-style model on the token shards written by prepare.py: one straight path from a
laptop CPU to many GPUs on many nodes, through torch.distributed (torchrun), nothing home-made.

    python train.py                                   # CPU demo on data/shakespeare, a few minutes
    python train.py --preset=gpt2_small --data=data/fineweb_edu            # one GPU
    torchrun --standalone --nproc_per_node=8 train.py --preset=gpt2_small  # 8 GPUs
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \\
        train.py --preset=gpt2_small                  # the same line on every node
    python train.py --out-dir=out/shakespeare --resume  # continue a run exactly where it stopped
    python train.py --eval-only --ckpt=out/shakespeare/best.pt --hellaswag-path=hellaswag_val.jsonl

Settings are the fields of TrainConfig below and of ModelConfig (model.py), given as --field-name=value
(--field-name value and --field_name work too; a bare --flag sets a bool). --preset picks a group first.
"""
import json
import math
import os
import shutil
import signal
import sys
import time
import urllib.request
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from model import ModelConfig, Transformer
from prepare import load_tokenizer, tokenizer_spec_inline

CHECKPOINT_VERSION = 1

# --- Settings ---------------------------------------------------------------


@dataclass
class TrainConfig:
    preset: str = "shakespeare_cpu"  # a name in PRESETS; flags given on the command line win
    data: str = "data/shakespeare"   # a folder written by prepare.py
    out_dir: str = "out/shakespeare"
    resume: bool = False             # continue from out_dir/ckpt.pt (its settings, plus the flags given)
    eval_only: bool = False          # evaluate --ckpt (val loss, perplexity, HellaSwag) and exit
    ckpt: str = ""                   # the checkpoint --eval-only reads
    seed: int = 1337
    # batch and length; the sequence length is the model's max_seq_len
    batch_size: int = 16             # sequences per micro-batch, per process
    batch_tokens: int = 0            # tokens per optimizer step over all processes; 0 = one micro-batch each
    max_iters: int = 0               # run length in optimizer steps ...
    max_tokens: int = 0              # ... or in tokens (exactly one of the two)
    # AdamW, linear warmup then cosine decay to min_lr_ratio * lr
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_iters: int = 100
    weight_decay: float = 0.1        # on matrices only; norm weights are not decayed
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0           # 0 disables clipping
    # evaluation and logging
    eval_every: int = 250
    eval_batches: int = 20           # the fixed validation set: eval_batches * batch_size sequences
    log_every: int = 10
    sample_tokens: int = 100         # a text sample this long at each evaluation; 0 = none
    hellaswag_every: int = 0         # HellaSwag accuracy every N steps (and at the end); 0 = never
    hellaswag_path: str = ""         # local hellaswag_val.jsonl; empty = download once to data/
    hellaswag_items: int = 0         # score only the first N items (quick checks); 0 = all 10,042
    wandb: bool = False
    wandb_project: str = "llama-from-scratch"
    # system
    device: str = "auto"             # auto | cpu | cuda | cuda:N | mps
    dtype: str = "auto"              # auto | float32 | bfloat16 | float16 (autocast; weights stay fp32)
    compile: str = "auto"            # auto (on for CUDA) | true | false
    peak_flops: float = 0.0          # per-device peak FLOP/s for MFU; 0 = look the GPU up in PEAK_FLOPS


# Named groups of settings (TrainConfig and ModelConfig fields). The model's vocab_size defaults
# to the data's vocabulary rounded up to a multiple of 64, so any tokenizer fits any preset.
PRESETS = {
    # Tiny Shakespeare on a laptop CPU: ~3.6M parameters, a few minutes (numbers in the README).
    "shakespeare_cpu": dict(n_layer=4, n_head=4, n_kv_head=2, n_embd=128, multiple_of=32, max_seq_len=128,
                            batch_size=16, max_iters=600, lr=2e-3, warmup_iters=50, eval_every=100,
                            eval_batches=10, tie_embeddings=True, device="cpu"),
    # lilLM (39M): vocab 8192, d512, 12 layers, 16 query / 8 kv heads, seq 512, tied embeddings.
    "lillm_39m": dict(vocab_size=8192, n_layer=12, n_head=16, n_kv_head=8, n_embd=512, multiple_of=64,
                      max_seq_len=512, tie_embeddings=True, batch_size=64, batch_tokens=262144,
                      max_tokens=2_000_000_000, lr=1e-3, warmup_iters=500, data="data/tinystories",
                      out_dir="out/lillm_39m"),
    # LF_LLM-269M: d1024, 16 layers, 16 heads, seq 2048, ~0.5M-token batches, lr 2.1e-3, 10B tokens.
    "lf_llm_269m": dict(n_layer=16, n_head=16, n_kv_head=16, n_embd=1024, ffn_hidden=3072, max_seq_len=2048,
                        tie_embeddings=True, batch_size=16, batch_tokens=524288, max_tokens=10_000_000_000,
                        lr=2.1e-3, warmup_iters=1000, eval_every=1000, hellaswag_every=2000,
                        data="data/fineweb_edu", out_dir="out/lf_llm_269m"),
    # GPT-2-small class (~124M) on FineWeb-Edu 10B, the build-nanogpt / llm.c recipe with Llama parts.
    # batch_size 16 keeps the fp32 logits of a micro-batch (16 x 1024 x 50304) near 3 GB; raise it on big GPUs.
    "gpt2_small": dict(n_layer=12, n_head=12, n_kv_head=12, n_embd=768, max_seq_len=1024, tie_embeddings=True,
                       batch_size=16, batch_tokens=524288, max_tokens=10_000_000_000, lr=6e-4,
                       warmup_iters=700, eval_every=500, hellaswag_every=2000, data="data/fineweb_edu",
                       out_dir="out/gpt2_small"),
}

# Dense (no sparsity) bf16/fp16 tensor-core peak FLOP/s per GPU from the vendors' datasheets: MFU
# is quoted against these whatever the dtype (pass --peak-flops for fp32/TF32 runs or other GPUs).
# The first name found in torch.cuda.get_device_name() wins: specific names before general ones.
PEAK_FLOPS = [("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12),
              ("B200", 2250e12), ("A100", 312e12), ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12),
              ("A10", 125e12), ("4090", 165e12), ("3090", 71e12), ("V100", 125e12), ("T4", 65e12)]


def gpu_peak_flops(device):
    """Peak FLOP/s of a CUDA device from PEAK_FLOPS; 0.0 when unknown (MFU is then not shown)."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    return next((flops for key, flops in PEAK_FLOPS if key in name), 0.0) if name else 0.0


def lr_at(step, cfg, max_iters):
    """Linear warmup over warmup_iters steps, then a cosine from lr down to min_lr_ratio * lr at max_iters."""
    if step < cfg.warmup_iters:
        return cfg.lr * (step + 1) / cfg.warmup_iters
    progress = min(1.0, (step - cfg.warmup_iters) / max(1, max_iters - cfg.warmup_iters))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def die(message):
    """A user error: one line naming the problem and the fix, exit code 2, no traceback."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def flag(key):
    return "--" + key.replace("_", "-")


def cast(key, text, kind):
    """Parse --key=text by the field's type."""
    if kind is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
    else:
        try:
            if kind is int:  # allow 10e9 and 1_000 for token counts
                value = float(text.replace("_", ""))
                if value.is_integer():
                    return int(value)
            else:
                return kind(text)
        except ValueError:
            pass
    die(f"{flag(key)}={text!r} is not a valid {kind.__name__}")


def parse_args(argv, configs=(TrainConfig, ModelConfig)):
    """Command line -> {setting: value} of the flags given, cast by the type of the field of that
    name in the config dataclasses (bench.py parses its own flags with this too)."""
    known = {f.name: f.type for c in configs for f in fields(c)}
    given, i = {}, 0
    while i < len(argv):
        key, has_value, text = argv[i].removeprefix("--").partition("=")
        key = key.replace("-", "_")
        if not argv[i].startswith("--") or key not in known:
            die(f"unknown setting {argv[i]!r}; valid settings: {' '.join(flag(k) for k in known)}")
        if not has_value:
            if known[key] is bool and (i + 1 == len(argv) or argv[i + 1].startswith("--")):
                text = "true"
            elif i + 1 < len(argv):
                i, text = i + 1, argv[i + 1]
            else:
                die(f"{flag(key)} needs a value: {flag(key)}=VALUE")
        given[key] = cast(key, text, known[key])
        i += 1
    return given


def split_settings(settings):
    """One flat dict -> (TrainConfig, dict of ModelConfig fields)."""
    train_keys = {f.name for f in fields(TrainConfig)}
    return (TrainConfig(**{k: v for k, v in settings.items() if k in train_keys}),
            {k: v for k, v in settings.items() if k not in train_keys})


# --- Data ---------------------------------------------------------------------


def load_meta(folder):
    """Read and check meta.json and the shards it lists; a clear error if anything is off."""
    path = os.path.join(folder, "meta.json")
    if not os.path.isfile(path):
        die(f"no {path}; write the data with prepare.py first (e.g. python prepare.py --out {folder})")
    try:
        with open(path) as f:
            meta = json.load(f)
        itemsize = np.dtype(meta["dtype"]).itemsize
        shards = meta["shards"]
    except (ValueError, KeyError, TypeError) as e:
        die(f"{path} is not a prepare.py meta.json ({e}); re-run prepare.py")
    for split in ("train", "val"):
        if not shards.get(split):
            die(f"{path} lists no {split} shards; re-run prepare.py")
        for shard in shards[split]:
            file = os.path.join(folder, shard["file"])
            size = os.path.getsize(file) if os.path.isfile(file) else -1
            if size != shard["tokens"] * itemsize:
                die(f"{file} has {size} bytes but meta.json says {shard['tokens']} tokens of {meta['dtype']}: "
                    f"the shard is missing, truncated or corrupt; re-run prepare.py")
    return meta


class TokenWindows:
    """The windows of seq_len + 1 tokens at stride seq_len over one split's shards (none crosses a
    shard boundary), numbered 0..n-1. Window w gives inputs x = tokens[:-1], targets y = tokens[1:]."""

    def __init__(self, folder, meta, split, seq_len, vocab_size):
        self.files = [s["file"] for s in meta["shards"][split]]
        self.shards = [np.memmap(os.path.join(folder, f), dtype=meta["dtype"], mode="r") for f in self.files]
        per_shard = [max(0, (len(s) - 1) // seq_len) for s in self.shards]
        self.first = np.cumsum([0] + per_shard)  # window number where each shard starts
        self.n, self.seq_len, self.vocab_size = int(self.first[-1]), seq_len, vocab_size
        if self.n == 0:
            die(f"the {split} split has fewer than {seq_len + 1} tokens; use a smaller --max-seq-len")

    def batch(self, windows, device):
        rows = []
        for w in windows:
            k = int(np.searchsorted(self.first, w, side="right")) - 1
            start = (int(w) - int(self.first[k])) * self.seq_len
            rows.append(self.shards[k][start:start + self.seq_len + 1])
        tokens = torch.from_numpy(np.stack(rows).astype(np.int64))                # (B, T + 1)
        if int(tokens.max()) >= self.vocab_size:  # cheap, and catches corrupt shards where it matters
            die(f"token id {int(tokens.max())} >= vocab_size={self.vocab_size} in {self.files[k]}: corrupt "
                f"shard or data from another tokenizer; re-run prepare.py")
        if device.type == "cuda":  # page-locked memory lets the copy run without blocking this process
            tokens = tokens.pin_memory()
        tokens = tokens.to(device, non_blocking=device.type == "cuda")
        return tokens[:, :-1], tokens[:, 1:]                                      # (B, T) each


class EpochOrder:
    """Global sample g of the run (g = step * sequences_per_step + row) -> a window number: each
    epoch visits every window once, in an order drawn from (seed, epoch). It depends on nothing
    else, so every rank computes the same global batch and takes its own slice, any number of
    processes sees the same data, and resuming needs only the step."""

    def __init__(self, n_windows, seed):
        self.n, self.seed, self.cache = n_windows, seed, {}

    def __call__(self, g):
        epoch = g // self.n
        if epoch not in self.cache:
            self.cache = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.n)}
        return self.cache[epoch][g % self.n]


# --- Evaluation: validation loss and HellaSwag ------------------------------------------------------


@torch.no_grad()
def evaluate_loss(model, windows, cfg, rank, world, device, autocast):
    """Mean loss over the fixed validation set (the first eval_batches * batch_size windows),
    spread over the ranks and summed across them, so it does not depend on the world size."""
    model.eval()
    ids = np.arange(min(windows.n, cfg.eval_batches * cfg.batch_size))[rank::world]
    total = torch.zeros(2, device=device)  # (sum of token losses, number of tokens)
    for i in range(0, len(ids), cfg.batch_size):
        x, y = windows.batch(ids[i:i + cfg.batch_size], device)
        with autocast:
            _, loss = model(x, y)
        total += torch.stack([loss.float() * y.numel(), torch.tensor(float(y.numel()), device=device)])
    if world > 1:
        dist.all_reduce(total)
    model.train()
    return (total[0] / total[1]).item()


HELLASWAG_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"


def hellaswag_items(path, rank, world):
    """The HellaSwag validation items (dicts with ctx, endings, label): from path, else downloaded
    once (by rank 0) to data/hellaswag_val.jsonl."""
    if not path:
        path = os.path.join("data", "hellaswag_val.jsonl")
        if rank == 0 and not os.path.exists(path):
            print(f"downloading HellaSwag validation set to {path}")
            os.makedirs("data", exist_ok=True)
            try:
                urllib.request.urlretrieve(HELLASWAG_URL, path + ".tmp")
            except OSError as e:
                die(f"cannot download {HELLASWAG_URL} ({e}); pass a local copy with --hellaswag-path=FILE")
            os.replace(path + ".tmp", path)
        if world > 1:
            dist.barrier()
    if not os.path.isfile(path):
        die(f"no HellaSwag file {path}; fix --hellaswag-path")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


@torch.no_grad()
def score_hellaswag(model, enc, items, device, autocast, max_len, items_per_batch=8):
    """For each item, the log-likelihood of each of its 4 endings given the context (the ending
    tokens only) -> (sum, mean per token) arrays of shape (n_items, 4). Endings follow the context
    after a space, as in the official data; too long rows lose context tokens from the left."""
    sums, means = [], []
    for start in range(0, len(items), items_per_batch):
        rows, spans = [], []  # token rows, and where each row's ending starts and ends
        for item in items[start:start + items_per_batch]:
            ctx = enc.encode_ordinary(item["ctx"])
            for ending in item["endings"]:
                end = enc.encode_ordinary(" " + ending)
                row = (ctx + end)[-(max_len + 1):]
                rows.append(row)
                spans.append((len(row) - len(end), len(row)))
        L = max(len(r) for r in rows)
        tokens = torch.zeros(len(rows), L, dtype=torch.long)
        for r, row in enumerate(rows):
            tokens[r, :len(row)] = torch.tensor(row)
        tokens = tokens.to(device)
        with autocast:
            logits, _ = model(tokens[:, :-1], targets=tokens[:, 1:])              # (R, L-1, V)
        logp = -F.cross_entropy(logits.float().transpose(1, 2), tokens[:, 1:], reduction="none")  # (R, L-1)
        # Sum in float64: n equal float32 terms then add up exactly, so equal scores tie exactly.
        logp = logp.double()
        # Token j of a row is predicted at position j - 1: the ending's log-probs sit at [a-1, b-1).
        mask = torch.zeros_like(logp)
        for r, (a, b) in enumerate(spans):
            mask[r, max(a, 1) - 1:b - 1] = 1.0
        total = (logp * mask).sum(dim=1)
        sums.append(total.view(-1, 4).cpu())
        means.append((total / mask.sum(dim=1)).view(-1, 4).cpu())
    return torch.cat(sums), torch.cat(means)


def evaluate_hellaswag(model, enc, cfg, rank, world, device, autocast, max_len):
    """HellaSwag accuracy over the items of this rank (every world-th item), summed across ranks.
    acc: the ending with the highest total log-probability; acc_norm (the headline number): the
    highest mean log-probability per token, as build-nanogpt computes it. Ties go to the first."""
    items = hellaswag_items(cfg.hellaswag_path, rank, world)
    if cfg.hellaswag_items:
        items = items[:cfg.hellaswag_items]
    mine = items[rank::world]
    model.eval()
    counts = torch.zeros(3, device=device)  # (correct by acc, correct by acc_norm, items)
    if mine:
        sums, means = score_hellaswag(model, enc, mine, device, autocast, max_len)
        labels = torch.tensor([int(item["label"]) for item in mine])
        counts += torch.tensor([(sums.argmax(1) == labels).sum().item(), (means.argmax(1) == labels).sum().item(),
                                len(mine)], device=device)
    if world > 1:
        dist.all_reduce(counts)
    model.train()
    correct, correct_norm, n = counts.tolist()
    return {"hellaswag_acc": correct / n, "hellaswag_acc_norm": correct_norm / n, "hellaswag_items": int(n)}


# --- Checkpoints and logs ---------------------------------------------------------------------------


def save_atomic(obj, path):
    """torch.save to a temporary file, fsync, then rename over path: a crash mid-write leaves the
    previous file intact, never a truncated one."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    folder = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    os.fsync(folder)  # make the rename itself durable
    os.close(folder)


def load_checkpoint(path):
    """The dict train.py saved at path (sample.py reads checkpoints through this too), after
    checking the file, its version and its keys: a clear one-line error for anything else."""
    if not os.path.isfile(path):
        die(f"checkpoint {path} not found (train.py writes OUT_DIR/ckpt.pt and OUT_DIR/best.pt)")
    try:  # weights_only: a checkpoint is data, and unpickling arbitrary objects could run code
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several kinds for a damaged file
        die(f"cannot read checkpoint {path} ({type(e).__name__}); is the file complete?")
    ckpt = ckpt if isinstance(ckpt, dict) else {}
    missing = [k for k in ("version", "model", "model_config", "tokenizer", "eot_id") if k not in ckpt]
    if missing or ckpt["version"] != CHECKPOINT_VERSION:
        die(f"{path} is not a version-{CHECKPOINT_VERSION} checkpoint of this repo (version={ckpt.get('version')}, "
            f"missing keys: {missing or 'none'}); use the code of the version that wrote it")
    return ckpt


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


# --- The run ----------------------------------------------------------------------------------------


def main(argv):
    given = parse_args(argv)
    # torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; without them this is one plain process.
    ddp = "RANK" in os.environ
    rank, local_rank, world = (int(os.environ.get(k, d)) for k, d in
                               (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1)))
    master = rank == 0

    def print0(*args, **kwargs):
        if master:
            print(*args, **kwargs, flush=True)

    # Settings: preset < flags; on --resume the checkpoint's settings < flags.
    ckpt = None
    out_dir = given.get("out_dir", PRESETS.get(given.get("preset", TrainConfig.preset), {}).get("out_dir"))
    if given.get("eval_only"):
        ckpt = load_checkpoint(given.get("ckpt") or die("--eval-only needs --ckpt=PATH"))
        settings = {**ckpt["train_config"], **ckpt["model_config"], **given}
    elif given.get("resume"):
        ckpt = load_checkpoint(os.path.join(out_dir or TrainConfig.out_dir, "ckpt.pt"))
        changed = [k for k in ckpt["model_config"] if k in given and given[k] != ckpt["model_config"][k]]
        if changed:
            die(f"cannot change model settings {changed} of a checkpoint when resuming; drop them")
        settings = {**ckpt["train_config"], **ckpt["model_config"], **given}
    else:
        preset = given.get("preset", TrainConfig.preset)
        if preset not in PRESETS:
            die(f"unknown --preset={preset}; choose one of {', '.join(PRESETS)}")
        settings = {**PRESETS[preset], **given}
    cfg, model_settings = split_settings(settings)

    # --- Checking the settings, once, before anything runs
    if cfg.device not in ("auto", "cpu", "cuda", "mps") and not cfg.device.startswith("cuda:"):
        die(f"--device={cfg.device} must be auto, cpu, cuda, cuda:N or mps")
    if cfg.dtype not in ("auto", "float32", "bfloat16", "float16"):
        die(f"--dtype={cfg.dtype} must be auto, float32, bfloat16 or float16")
    if cfg.compile not in ("auto", "true", "false"):
        die(f"--compile={cfg.compile} must be auto, true or false")
    for key in ("batch_size", "eval_every", "eval_batches", "log_every"):
        if getattr(cfg, key) <= 0:
            die(f"{flag(key)}={getattr(cfg, key)} must be positive")
    for key in ("lr", "batch_tokens", "max_iters", "max_tokens", "warmup_iters", "weight_decay", "grad_clip",
                "sample_tokens", "hellaswag_every", "hellaswag_items", "peak_flops"):
        if getattr(cfg, key) < 0:
            die(f"{flag(key)}={getattr(cfg, key)} must not be negative")
    if not 0 <= cfg.min_lr_ratio <= 1 or not 0 <= cfg.beta1 < 1 or not 0 <= cfg.beta2 < 1:
        die(f"need 0 <= min_lr_ratio <= 1 and 0 <= beta < 1; got --min-lr-ratio={cfg.min_lr_ratio} "
            f"--beta1={cfg.beta1} --beta2={cfg.beta2}")
    if not cfg.eval_only and (cfg.max_iters > 0) == (cfg.max_tokens > 0):
        die(f"give exactly one of --max-iters and --max-tokens (got {cfg.max_iters} and {cfg.max_tokens})")
    meta = load_meta(cfg.data) if not cfg.eval_only or os.path.isfile(os.path.join(cfg.data, "meta.json")) else None
    data_vocab = meta["vocab_size"] if meta else 0
    if not model_settings.get("vocab_size"):  # round up to a multiple of 64: faster matmuls
        model_settings["vocab_size"] = 64 * math.ceil(data_vocab / 64)
    if data_vocab > model_settings["vocab_size"]:
        die(f"the data's vocabulary ({data_vocab} tokens, {cfg.data}/meta.json) does not fit the model's "
            f"vocab_size={model_settings['vocab_size']}; raise --vocab-size or re-run prepare.py")
    try:
        model_cfg = ModelConfig(**model_settings)
    except ValueError as e:
        die(f"{e}; fix the model settings")
    T = model_cfg.max_seq_len
    micro_tokens = cfg.batch_size * T * world
    batch_tokens = cfg.batch_tokens or micro_tokens
    if batch_tokens % micro_tokens:
        die(f"--batch-tokens={batch_tokens} is not a multiple of batch_size * max_seq_len * processes = "
            f"{cfg.batch_size} * {T} * {world} = {micro_tokens}")
    accum = batch_tokens // micro_tokens  # micro-batches per optimizer step, per process
    max_iters = cfg.max_iters or math.ceil(cfg.max_tokens / batch_tokens)

    # --- Device, precision, processes
    if cfg.device == "auto":
        cfg.device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        die(f"--device={cfg.device} but CUDA is not available here; use --device=cpu")
    if ddp:
        if cfg.device.startswith("cuda"):
            cfg.device = f"cuda:{local_rank}"
            torch.cuda.set_device(cfg.device)
        # torch 2.13: importing torch._dynamo after init_process_group (torch.optim does, lazily) keeps
        # the group alive past destroy_process_group, and its gloo threads then abort the exit (see
        # shut_down_processes). Imported before, destroy frees it.
        from torch import _dynamo  # noqa: F401
        dist.init_process_group(backend="nccl" if cfg.device.startswith("cuda") else "gloo")
    device = torch.device(cfg.device)
    if cfg.dtype == "auto":  # bf16 needs no loss scaling; fp16 does (GradScaler); CPU and MPS stay fp32
        cfg.dtype = ("bfloat16" if torch.cuda.is_bf16_supported() else "float16") if device.type == "cuda" else "float32"
    dtype = getattr(torch, cfg.dtype)
    autocast = (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext())
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    torch.set_float32_matmul_precision("high")  # TF32 matmuls on Ampere and later
    use_compile = cfg.compile == "true" or (cfg.compile == "auto" and device.type == "cuda")

    # --- Model, optimizer, data. The same seed on every rank gives every rank the same init.
    torch.manual_seed(cfg.seed)
    raw_model = Transformer(model_cfg).to(device)
    decay = [p for p in raw_model.parameters() if p.dim() >= 2]
    no_decay = [p for p in raw_model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda")
    step, tokens_seen, best_val = 0, 0, float("inf")
    if ckpt is not None:
        raw_model.load_state_dict(ckpt["model"])
        step, tokens_seen, best_val = ckpt["step"], ckpt["tokens_seen"], ckpt["best_val_loss"]
        if cfg.resume:
            optimizer.load_state_dict(ckpt["optimizer"])
            scaler.load_state_dict(ckpt["scaler"])
    # Dropout randomness: per rank, restored exactly for rank 0 on resume.
    torch.manual_seed(cfg.seed + rank + 7919 * step)
    if ckpt is not None and master:
        torch.set_rng_state(ckpt["rng"]["torch"])
        if device.type == "cuda" and ckpt["rng"]["cuda"]:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"][0], device)
    tokenizer = ckpt["tokenizer"] if ckpt is not None else tokenizer_spec_inline(meta, cfg.data)
    eot_id = ckpt["eot_id"] if ckpt is not None else meta["eot_id"]
    enc = load_tokenizer(tokenizer)
    model = eval_model = torch.compile(raw_model) if use_compile else raw_model  # no DDP for evaluation:
    if ddp and not cfg.eval_only:  # its forward may sync buffers, and --eval-only needs no gradients
        model = DDP(model, device_ids=[local_rank] if device.type == "cuda" else None)
    val = TokenWindows(cfg.data, meta, "val", T, model_cfg.vocab_size) if meta else None
    os.makedirs(cfg.out_dir, exist_ok=True)
    log_path = os.path.join(cfg.out_dir, "log.jsonl")

    def log(record):
        if master:
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if cfg.wandb:
                wandb.log(record, step=record["step"])

    if cfg.wandb and master:
        try:
            import wandb
        except ImportError:
            die("--wandb needs the wandb package: pip install wandb")
        wandb.init(project=cfg.wandb_project, name=os.path.basename(cfg.out_dir),
                   config={**asdict(cfg), **asdict(model_cfg)})

    print0("model:", json.dumps(asdict(model_cfg)))
    print0("train:", json.dumps(asdict(cfg)))
    print0(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
           f"{cfg.dtype}, compile={use_compile}, {world} process(es), {accum} micro-batch(es) per step")

    if cfg.eval_only:
        record = {"step": step, "eval_only": cfg.ckpt}
        if val is not None:
            record["val_loss"] = evaluate_loss(eval_model, val, cfg, rank, world, device, autocast)
            record["val_ppl"] = math.exp(record["val_loss"])
        record.update(evaluate_hellaswag(eval_model, enc, cfg, rank, world, device, autocast, T))
        print0(" | ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()))
        log_path = os.path.join(os.path.dirname(os.path.abspath(cfg.ckpt)), "log.jsonl")
        log(record)
        if ddp:
            shut_down_processes()
        return

    train = TokenWindows(cfg.data, meta, "train", T, model_cfg.vocab_size)
    order = EpochOrder(train.n, cfg.seed)
    rows_per_step = batch_tokens // T
    if master:  # the resolved settings, for people (the checkpoint holds its own copy)
        with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
            json.dump({"train": asdict(cfg), "model": asdict(model_cfg)}, f, indent=2)

    # The compute plan, before spending it.
    n_params, n_body = raw_model.num_params(), raw_model.num_params(embeddings=False)
    flops_per_token = raw_model.flops_per_token(T)
    total_tokens = max_iters * batch_tokens
    print0(f"parameters: {n_params / 1e6:.2f}M ({n_body / 1e6:.2f}M without embeddings) | "
           f"tokens: {total_tokens / 1e6:,.1f}M = {max_iters} steps x {batch_tokens:,} | "
           f"{total_tokens / n_params:.1f} tokens per parameter (Chinchilla-optimal: ~20) | "
           f"{flops_per_token * total_tokens:.2e} FLOPs | train set {train.n * T / 1e6:,.1f}M tokens "
           f"({total_tokens / max(1, train.n * T):.2f} epochs)")
    peak = cfg.peak_flops or gpu_peak_flops(device)

    def checkpoint(path):
        if master:
            save_atomic({"version": CHECKPOINT_VERSION, "model": raw_model.state_dict(),
                         "model_config": asdict(model_cfg), "train_config": asdict(cfg),
                         "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                         "step": step, "tokens_seen": tokens_seen, "best_val_loss": best_val,
                         "rng": {"torch": torch.get_rng_state(),
                                 "cuda": [torch.cuda.get_rng_state(device)] if device.type == "cuda" else []},
                         "tokenizer": tokenizer, "eot_id": eot_id}, path)

    # SIGTERM (preemption, torchrun shutting down) or Ctrl-C: finish the step, save, exit 0.
    stop_requested = [False]

    def request_stop(signum, frame):
        stop_requested[0] = True
        signal.signal(signum, signal.SIG_DFL)  # a second Ctrl-C stops at once

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)

    def stop_nonfinite(what):
        print0(f"error: {what} at step {step}; stopped without saving, so {cfg.out_dir}/ckpt.pt still holds "
               f"the last good state. Lower --lr or raise --warmup-iters", file=sys.stderr)
        sys.exit(1)

    # --- Training
    start_step, t_log, tokens_at_log = step, time.time(), tokens_seen
    while True:
        last_step = step == max_iters
        if last_step or (step % cfg.eval_every == 0 and (step > start_step or step == 0)):
            val_loss = evaluate_loss(eval_model, val, cfg, rank, world, device, autocast)
            if not math.isfinite(val_loss):  # the last update broke the weights: do not save them
                stop_nonfinite(f"validation loss is {val_loss}")
            record = {"step": step, "tokens": tokens_seen, "val_loss": val_loss, "val_ppl": math.exp(val_loss)}
            if cfg.hellaswag_every and (last_step or step % cfg.hellaswag_every == 0):
                record.update(evaluate_hellaswag(eval_model, enc, cfg, rank, world, device, autocast, T))
            print0(" | ".join([f"eval step {step}", f"val loss {val_loss:.4f}", f"ppl {record['val_ppl']:.2f}"] +
                              [f"{k} {v:.4f}" for k, v in record.items() if k.startswith("hellaswag_acc")]))
            log(record)
            if master and cfg.sample_tokens:
                prompt = torch.full((1, 1), eot_id, dtype=torch.long, device=device)
                with autocast:
                    out = raw_model.generate(prompt, cfg.sample_tokens, temperature=0.8, top_k=200,
                                             generator=torch.Generator(device).manual_seed(cfg.seed),
                                             vocab_size=enc.n_vocab)
                print0("sample:", repr(enc.decode(out[0, 1:].tolist())))
            if step > start_step:
                improved = val_loss < best_val
                best_val = min(best_val, val_loss)
                checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"))
                if improved and master:
                    shutil.copyfile(os.path.join(cfg.out_dir, "ckpt.pt"), os.path.join(cfg.out_dir, "best.pt.tmp"))
                    os.replace(os.path.join(cfg.out_dir, "best.pt.tmp"), os.path.join(cfg.out_dir, "best.pt"))
                if master:
                    plot_losses(log_path, os.path.join(cfg.out_dir, "loss.png"))
        if last_step:
            break

        # One optimizer step: accum micro-batches on each of world processes. Rank r takes rows
        # [r * accum * B, (r + 1) * accum * B) of the step's global batch.
        lr = lr_at(step, cfg, max_iters)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=device)
        for micro in range(accum):
            first = step * rows_per_step + (rank * accum + micro) * cfg.batch_size
            x, y = train.batch([order(g) for g in range(first, first + cfg.batch_size)], device)
            # DDP all-reduces gradients on every backward unless told not to: only the last
            # micro-step needs it.
            with model.no_sync() if ddp and micro < accum - 1 else nullcontext():
                with autocast:
                    _, loss = model(x, y)
                scaler.scale(loss / accum).backward()
            loss_sum += loss.detach()
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip or float("inf"))
        # One small all-reduce a step: the mean loss, a non-finite loss anywhere, a stop request anywhere.
        flags = torch.stack([loss_sum / accum, (~torch.isfinite(loss_sum)).float(),
                             torch.tensor(float(stop_requested[0]), device=device)])
        if ddp:
            dist.all_reduce(flags)
        mean_loss, nonfinite, stop = flags.tolist()
        mean_loss /= world
        if nonfinite:
            stop_nonfinite(f"loss is {mean_loss}")
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += batch_tokens

        if step % cfg.log_every == 0 or step == max_iters:
            elapsed, t_log = time.time() - t_log, time.time()
            tok_s = (tokens_seen - tokens_at_log) / elapsed
            tokens_at_log = tokens_seen
            mfu = flops_per_token * tok_s / world / peak if peak else None
            eta = (max_iters - step) * batch_tokens / tok_s
            print0(f"step {step}/{max_iters} | loss {mean_loss:.4f} | lr {lr:.2e} | grad norm {grad_norm:.3f} | "
                   f"{tok_s:,.0f} tok/s" + (f" | MFU {mfu:.1%}" if mfu is not None else "") +
                   f" | ETA {eta / 60:.1f} min")
            log({"step": step, "tokens": tokens_seen, "loss": mean_loss, "lr": lr, "grad_norm": grad_norm.item(),
                 "tokens_per_s": tok_s, "mfu": mfu, "time": time.time()})
        if stop:
            checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"))
            print0(f"stopped by signal at step {step}; saved {cfg.out_dir}/ckpt.pt; continue with --resume")
            break

    if ddp:
        shut_down_processes()


def shut_down_processes():
    # The barrier lets every rank finish its last collective before any rank tears down. The group's
    # worker threads must be gone before the interpreter exits: one still freeing a finished
    # collective then needs the GIL and aborts the exit ("terminate called without an active
    # exception", seen with gloo in ~1 run of 20 under load).
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
