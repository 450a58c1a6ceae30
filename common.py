"""
The helpers every script shares, each written once: settings from the command line, the error
path, device and precision, tokenizers, checkpoints, and writes that never leave a file half done.

    from common import die, setting, parse_flags, pick_device, load_checkpoint, save_checkpoint

torch is imported inside the functions that need it, so prepare.py starts without it.
"""
import argparse
import base64
import contextlib
import ctypes
import dataclasses
import hashlib
import importlib.util
import json
import math
import os
import shutil
import sys
import types
import typing
from pathlib import Path

import tiktoken

# --- The error path -------------------------------------------------------------------------------
_progress_shown = False  # a progress line drawn with \r is on screen: the next message needs a new line

def progress(text):
    """Redraw the one progress line on stderr (callers draw it at most a few times a second)."""
    global _progress_shown
    print("\r" + text, end="", file=sys.stderr, flush=True)
    _progress_shown = True

def end_progress():
    """Move past the progress line, if one is on screen."""
    global _progress_shown
    if _progress_shown:
        print(file=sys.stderr, flush=True)
    _progress_shown = False

def die(message):
    """A user error: one line naming the problem and the fix, exit code 2, no traceback."""
    end_progress()
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)

def one_line(e):
    """An exception as a short single line, for messages that quote it."""
    return " ".join(str(e).split())[:300] or type(e).__name__

def run_main(main):
    """Run main(argv) as a script: Ctrl-C, a closed pipe and a failing disk end without a traceback."""
    try:
        main(sys.argv[1:])
    except KeyboardInterrupt:
        end_progress()
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # the reader left early (python sample.py | head)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the flush at exit must not fail too
        sys.exit(1)
    except OSError as e:  # a disk that filled up, a folder that went read-only, ...
        die(f"{e.filename or 'a file'}: {e.strerror or one_line(e)}")
    except (MemoryError, RuntimeError) as e:  # torch.OutOfMemoryError is a RuntimeError
        if not isinstance(e, MemoryError) and type(e).__name__ != "OutOfMemoryError":
            raise
        die(f"out of memory ({one_line(e)[:120]}); use a smaller --batch-size (the same --batch-tokens keeps "
            "the steps the same) or a smaller model")

# --- Settings: dataclass fields become --flags ----------------------------------------------------
def setting(default, help, **kwargs):
    """A dataclass field that is also a command-line flag; help says what it means."""
    return dataclasses.field(default=default, metadata={"help": help, **kwargs})

def check(ok, message):
    """For __post_init__ checks: a ValueError that parse_config turns into a one-line error."""
    if not ok:
        raise ValueError(message)

def flag(name):
    return "--" + name.replace("_", "-")

def _caster(kind):
    """The str -> value function of a field type; its errors read '--flag: <message>'."""
    def cast(text):
        if kind is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise argparse.ArgumentTypeError(f"{text!r} is not true or false")
        try:
            value = float(text.replace("_", "")) if kind in (int, float) else kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a valid {kind.__name__}") from None
        if kind is float and not math.isfinite(value):  # NaN passes every `<` check: refuse it here
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if kind is int:  # 1e9 and 2_000_000 are fine for token counts, 0.5 is not
            if not value.is_integer():
                raise argparse.ArgumentTypeError(f"{text!r} is not a whole number")
            value = int(value)
        return value
    return cast

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors take the one error path too
        die(f"{message} (python {self.prog} --help lists the settings)")

def parse_flags(argv, configs, doc, epilog="", helps=None):
    """--name=value or --name value for every field of the config dataclasses (a bare --name sets a
    bool; --field_name works too) -> {field: value} of the flags given, cast by field type. --help
    prints every setting with its default and meaning (field metadata, or helps[name])."""
    prog = os.path.basename(sys.argv[0]) or "script"
    parser = _Parser(prog=prog, usage=f"python {prog} [--setting=value ...]", description=doc, epilog=epilog,
                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False,
                     argument_default=argparse.SUPPRESS)  # absent flags stay absent: presets can fill them
    for config in configs:
        group = parser.add_argument_group(f"{config.__name__} settings")
        for f in dataclasses.fields(config):
            kind, meta = f.type, dict(f.metadata)
            if isinstance(kind, types.UnionType):  # int | None -> int
                kind = next(k for k in typing.get_args(kind) if k is not type(None))
            help = meta.pop("help", None) or (helps or {}).get(f.name, "")
            kwargs = dict(help=f"{help} (default: {f.default!r})".replace("%", "%%"), **meta)
            if kind is bool:
                kwargs.update(nargs="?", const=True, metavar="BOOL")
            elif typing.get_origin(kind) is list:
                kwargs.update(nargs="+", metavar="TEXT")
            else:
                kwargs.setdefault("metavar", {int: "N", float: "X"}.get(kind, "TEXT"))
            kwargs.setdefault("type", _caster(str if typing.get_origin(kind) is list else kind))
            group.add_argument(flag(f.name), **kwargs)
    # --field_name is --field-name; only the name part of --name=value changes
    argv = [a.split("=", 1)[0].replace("_", "-") + a[len(a.split("=", 1)[0]):] if a.startswith("--") else a
            for a in argv]
    given, unknown = parser.parse_known_args(argv)
    if unknown:
        valid = " ".join(flag(f.name) for c in configs for f in dataclasses.fields(c))
        die(f"unknown setting {unknown[0]!r}; valid settings: {valid}")
    return {k.replace("-", "_"): v for k, v in vars(given).items()}

def parse_config(config, values):
    """config(**values), with a bad value (its __post_init__ check) as a one-line error."""
    try:
        return config(**values)
    except (TypeError, ValueError) as e:
        die(f"{one_line(e)}; fix the settings")

# --- Device and precision -------------------------------------------------------------------------
def pick_device(name="auto"):
    """torch.device by name; auto: cuda, else mps, else cpu. A device this machine lacks is an error."""
    import torch
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        device = torch.device(name)
        torch.empty(0, device=device)  # fails for a device that is not here (cuda without a GPU, cuda:7)
    except (RuntimeError, AssertionError):
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        die(f"--device={name} is unknown or not on this machine; use auto, cpu, cuda, cuda:N or mps")
    return device

def cpu_has_bf16():
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX), read from /proc/cpuinfo: a
    capability check rather than a timing probe, so the choice is the same on every run. With it,
    oneDNN runs bf16 matmuls at twice the fp32 rate (training ran 2.6x faster on a 2-core EPYC);
    without it bf16 is emulated and slower than fp32. Not Linux: assume not."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags

def pick_dtype(name, device):
    """The autocast dtype by name; auto: bf16 on GPUs and CPUs that have it, fp16 on older GPUs,
    fp32 elsewhere (MPS included)."""
    import torch
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if device.type == "cpu" and cpu_has_bf16() else torch.float32

def matmul_flops(device, dtype, n=2048, repeats=3):
    """Measured peak matmul FLOP/s of device in dtype: the best of a few n x n products."""
    import time

    import torch
    g = torch.Generator().manual_seed(0)  # its own: drawing from torch's would shift a run's dropout
    a, b = (torch.randn(n, n, generator=g).to(device, dtype) for _ in range(2))
    best = math.inf
    for _ in range(repeats + 1):  # the first warms up
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best

def autocast(device, dtype):
    """Low precision where it is safe: matmuls in dtype, weights and reductions stay fp32."""
    import torch
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

# Dense (no sparsity) bf16/fp16 tensor-core peak FLOP/s per GPU from the vendors' datasheets: MFU
# is quoted against these whatever the dtype (pass --peak-flops for fp32/TF32 runs or other GPUs).
# The first name found in torch.cuda.get_device_name() wins: specific names before general ones.
PEAK_FLOPS = [("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12),
              ("B200", 2250e12), ("A100", 312e12), ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12),
              ("A10", 125e12), ("4090", 165e12), ("3090", 71e12), ("V100", 125e12), ("T4", 65e12)]

def gpu_peak_flops(device):
    """Peak FLOP/s of a CUDA device from PEAK_FLOPS; 0.0 when unknown (MFU is then not shown)."""
    import torch
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    return next((flops for key, flops in PEAK_FLOPS if key in name), 0.0) if name else 0.0

# --- Tokenizers: a tiktoken encoding by name, or BPE ranks in tiktoken's file format --------------
# GPT-2's pre-tokenizer: contractions, letter runs, digit runs and punctuation runs (each taking one
# leading space), then whitespace. BPE never merges across these pieces. prepare.py's BPE uses it, and
# llama.cpp knows it as the "gpt-2" pre-tokenizer.
GPT2_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

def load_tokenizer(spec, folder=None):
    """The tiktoken.Encoding of a tokenizer spec (meta.json's "tokenizer"): {"kind": "tiktoken",
    "name"} (plus "special_tokens" to add, if any), or {"kind": "bpe", "name", "pat_str",
    "special_tokens"} with the ranks file's text in "ranks" (as checkpoints carry it) or its name in
    "ranks_file" (read from folder)."""
    if spec["kind"] == "tiktoken":  # a named encoding, with the special tokens added by chat.py if any
        enc = tiktoken.get_encoding(spec["name"])
        extra = spec.get("special_tokens", {})
        if extra.items() <= enc._special_tokens.items():
            return enc
        return tiktoken.Encoding(spec["name"] + "-chat", pat_str=enc._pat_str,
                                 mergeable_ranks=enc._mergeable_ranks, special_tokens={**enc._special_tokens, **extra})
    text = spec["ranks"] if "ranks" in spec else Path(folder or ".", spec["ranks_file"]).read_text()
    ranks = {base64.b64decode(token): int(rank)
             for token, rank in (line.split() for line in text.splitlines())}
    return tiktoken.Encoding(spec["name"], pat_str=spec["pat_str"], mergeable_ranks=ranks,
                             special_tokens=spec["special_tokens"])

def ranks_text(tokens):
    """tiktoken's ranks-file format: one "base64(token) rank" line per token, tokens in rank order."""
    return "".join(f"{base64.b64encode(token).decode()} {rank}\n" for rank, token in enumerate(tokens))

def tokenizer_fingerprint(enc):
    """A short hash of what decides the ids (ranks, split pattern, special tokens), not of names:
    two tokenizers with the same fingerprint turn every text into the same ids."""
    h = hashlib.sha256(enc._pat_str.encode())
    for token, rank in sorted(enc._mergeable_ranks.items(), key=lambda kv: kv[1]):
        h.update(b"%d %s\n" % (rank, base64.b64encode(token)))
    h.update(json.dumps(sorted(enc._special_tokens.items())).encode())
    return h.hexdigest()[:16]

# --- Files: atomic writes, folder swaps, one run per folder ---------------------------------------
def download(url, path, hint):
    """url saved at path, fetched once; a failed fetch is one line ending in hint and leaves no file."""
    import urllib.request
    if not os.path.exists(path):
        print(f"downloading {url} to {path}", file=sys.stderr)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        try:
            urllib.request.urlretrieve(url, f"{path}.tmp")
        except (OSError, ValueError) as e:
            with contextlib.suppress(OSError):
                os.remove(f"{path}.tmp")
            die(f"cannot download {url}: {one_line(e)}; {hint}")
        os.replace(f"{path}.tmp", path)
    return path

@contextlib.contextmanager
def atomic_write(path, mode="wb"):
    """Open path for writing all at once: the data goes to path.tmp, is fsynced and renamed over
    path. A crash leaves the old path intact; a failed write (disk full) is a one-line error that
    also leaves no .tmp behind."""
    tmp = f"{path}.tmp"
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        with contextlib.suppress(OSError):
            os.remove(tmp)
        reason = (e.strerror if isinstance(e, OSError) and e.strerror else
                  "the write failed; is the disk full?")
        die(f"cannot write {path}: {reason}; {path} is as it was before")
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    fsync_folder(os.path.dirname(os.path.abspath(path)))  # make the rename itself durable

def fsync_folder(folder):
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

_held_locks = {}  # folder -> open lock file: a lock lasts as long as its descriptor, so until exit

def lock(folder, what):
    """Make this process the only writer of folder (which need not exist yet) until it exits, by an
    exclusive lock on the file .<name>.lock beside it; the kernel drops the lock when the process
    dies, so a killed run never blocks the next. A second run gets a one-line error with the pid."""
    import fcntl
    folder = Path(folder).absolute()
    if folder in _held_locks:
        return
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder.parent / f".{folder.name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        die(f"cannot write {folder.parent}: {e.strerror}; choose another {what}")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        die(f"{folder} is in use by another run (pid {pid}); wait for it to finish or choose another {what}")
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    _held_locks[folder] = fd

def swap_in(new, final):
    """Put the finished folder new in place of final in one step, then delete the old one: at every
    instant final is either the old folder or the new one. Linux does it with one renameat2
    (RENAME_EXCHANGE); elsewhere two renames leave a moment with no final."""
    new, final = Path(new), Path(final)
    if final.is_dir():
        libc = ctypes.CDLL(None, use_errno=True)
        exchange = getattr(libc, "renameat2", None)
        AT_FDCWD, RENAME_EXCHANGE = -100, 2
        if exchange is None or exchange(AT_FDCWD, bytes(new), AT_FDCWD, bytes(final), RENAME_EXCHANGE) != 0:
            old = final.with_name(final.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            new.rename(final)
            new = old
        shutil.rmtree(new)  # now the old folder
    else:
        new.rename(final)
    fsync_folder(final.parent)

# --- Checkpoints ----------------------------------------------------------------------------------
CHECKPOINT_VERSION = 1
CHECKPOINT_KEYS = {"version": int, "model": dict, "model_config": dict, "train_config": dict, "step": int,
                   "tokens_seen": int, "best_val_loss": float, "tokenizer": dict, "eot_id": int}

def save_checkpoint(path, model, tokenizer, eot_id, weights=None, **training_state):
    """Write a checkpoint atomically (see atomic_write): the model's weights (pass the uncompiled
    module, or its state dict as weights) and config, the tokenizer spec and end-of-text id, so
    sampling needs nothing else, plus what train.py adds to resume (train_config, optimizer, step, ...)."""
    import torch
    state = {"version": CHECKPOINT_VERSION, "model": model.state_dict() if weights is None else weights,
             "model_config": dataclasses.asdict(model.config), "tokenizer": tokenizer, "eot_id": eot_id,
             "train_config": {}, "step": 0, "tokens_seen": 0, "best_val_loss": math.inf, **training_state}
    with atomic_write(path) as f:
        torch.save(state, f)

def load_checkpoint(path):
    """The dict train.py saved at path, after checking the file, its version and its keys; anything
    else is a one-line error. weights_only: a checkpoint is data, and unpickling objects could run code."""
    import torch
    if not os.path.isfile(path):
        die(f"checkpoint {path} not found (train.py writes OUT_DIR/ckpt.pt and OUT_DIR/best.pt)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several kinds for a damaged file
        die(f"cannot read checkpoint {path} ({type(e).__name__}); is the file complete?")
    ckpt = ckpt if isinstance(ckpt, dict) else {}
    missing = [k for k in CHECKPOINT_KEYS if k not in ckpt]
    if missing or ckpt["version"] != CHECKPOINT_VERSION:
        die(f"{path} is not a version-{CHECKPOINT_VERSION} checkpoint of this repo "
            f"(version={ckpt.get('version')}, missing keys: {missing or 'none'}); "
            "use the code of the version that wrote it")
    wrong = [k for k, kind in CHECKPOINT_KEYS.items() if not isinstance(ckpt[k], kind)]
    if wrong:
        die(f"{path} is damaged: {', '.join(wrong)} of the wrong type")
    return ckpt

def model_from_checkpoint(ckpt, path):
    """The fp32 Transformer a checkpoint holds, on the CPU; weights that do not fit it are an error."""
    from model import ModelConfig, Transformer
    try:
        model = Transformer(ModelConfig(**ckpt["model_config"]))
        model.load_state_dict(ckpt["model"])
    except (TypeError, ValueError, RuntimeError) as e:
        die(f"{path} does not fit this model.py: {one_line(e)}")
    return model

def tokenizer_from_checkpoint(ckpt, path, vocab_size):
    """The checkpoint's tokenizer, checked against the model's vocabulary and end-of-text id."""
    try:
        enc = load_tokenizer(ckpt["tokenizer"])
    except Exception as e:  # a damaged spec, or tiktoken offline without its cache
        die(f"cannot build the tokenizer of {path}: {one_line(e)}")
    if enc.n_vocab > vocab_size or not 0 <= ckpt["eot_id"] < enc.n_vocab:
        die(f"{path} is damaged: its tokenizer has {enc.n_vocab} ids, the model {vocab_size}, "
            f"end-of-text is {ckpt['eot_id']}")
    return enc

def load_for_inference(path):
    """(model, tokenizer, end-of-text id, tokenizer spec) of a train.py checkpoint; fp32, on the CPU."""
    ckpt = load_checkpoint(path)
    model = model_from_checkpoint(ckpt, path)
    enc = tokenizer_from_checkpoint(ckpt, path, model.config.vocab_size)
    return model, enc, ckpt["eot_id"], ckpt["tokenizer"]

def bytes_to_unicode():
    """GPT-2's byte -> character map behind byte-level BPE files: printable Latin-1 bytes stand for
    themselves, the others (space, control bytes) move to U+0100 onwards, so tokens are visible strings."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(moved)}}

# The text a converted tokenizer must encode exactly as the folder's own tokenizer does.
PROBE = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"
         "  It's 2026; they'll pay $1,234.56 -- naïve café, 日本語, emoji 🦙👍🏽, tabs\t\tand   spaces\r\n")

def tokenizer_from_hf(folder):
    """A tokenizer spec (kind "bpe", ranks inline) for a Hugging Face folder's byte-level BPE
    tokenizer.json (GPT-2's family: GPT-2, SmolLM, our exports), checked against the `tokenizers`
    package on PROBE. Others (SentencePiece, as in Llama 2 and TinyLlama) are refused."""
    try:
        import tokenizers
    except ImportError:
        die("reading a Hugging Face tokenizer.json needs the tokenizers package: pip install tokenizers")
    path = os.path.join(folder, "tokenizer.json")
    try:
        with open(path, encoding="utf-8") as f:
            spec = json.load(f)
        hf = tokenizers.Tokenizer.from_file(path)
        model, pre = spec["model"], json.dumps(spec.get("pre_tokenizer"))
        assert model["type"] == "BPE" and "ByteLevel" in pre, "not a byte-level BPE"
        # the split pattern: an explicit Split regex, or ByteLevel's own (GPT-2's)
        steps = spec["pre_tokenizer"].get("pretokenizers") or [spec["pre_tokenizer"]]
        splits = [p["pattern"]["Regex"] for p in steps
                  if p.get("type") == "Split" and "Regex" in p.get("pattern", {})]
        pattern = splits[0] if splits else GPT2_PAT
        if any(p.get("type") == "Digits" and p.get("individual_digits") for p in steps):  # SmolLM's
            pattern = pattern.replace(r" ?\p{N}+", r"\p{N}")  # each digit its own piece
        byte_of = {c: b for b, c in bytes_to_unicode().items()}
        specials = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
        ranks = {bytes(byte_of[c] for c in token): rank for token, rank in model["vocab"].items()
                 if token not in specials}
    except Exception as e:  # a missing or malformed file, or another kind of tokenizer
        die(f"cannot use the tokenizer of {folder}: {one_line(e)}; byte-level BPE tokenizers (GPT-2, SmolLM, "
            "export.py folders) work")
    if "<|endoftext|>" not in specials:  # the token that starts each document here
        die(f"the tokenizer of {folder} has no <|endoftext|> special token, which the scripts need")
    lines = "".join(f"{base64.b64encode(t).decode()} {rank}\n"
                    for t, rank in sorted(ranks.items(), key=lambda x: x[1]))
    ours = {"kind": "bpe", "name": "hf:" + os.path.basename(os.path.abspath(folder)), "pat_str": pattern,
            "special_tokens": specials, "ranks": lines}
    enc = load_tokenizer(ours)
    if enc.encode_ordinary(PROBE) != hf.encode(PROBE, add_special_tokens=False).ids:
        die(f"the tokenizer of {folder} does not give the same ids through tiktoken; it is not supported")
    return ours

def load_hf_state(folder):
    """The tensors of model.safetensors, or of the shards model.safetensors.index.json lists."""
    from safetensors.torch import load_file
    index = os.path.join(folder, "model.safetensors.index.json")
    if not os.path.exists(index):
        return load_file(os.path.join(folder, "model.safetensors"))
    with open(index) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
    return {name: t for shard in shards for name, t in load_file(os.path.join(folder, shard)).items()}

def load_hf_folder(folder, tokenizer_name=""):
    """The same four from a Llama folder in Hugging Face's format (config.json + safetensors, sharded
    or not). The tokenizer: tiktoken's tokenizer_name if given, else our spec that export.py stores in
    config.json, else the folder's tokenizer.json (a byte-level BPE; tokenizer_from_hf)."""
    from model import Transformer, from_hf
    if importlib.util.find_spec("safetensors") is None:  # optional: only the Hugging Face format needs it
        die("reading a Hugging Face folder needs safetensors: pip install safetensors")
    try:
        with open(os.path.join(folder, "config.json")) as f:
            hf_config = json.load(f)
        state, cfg = from_hf(load_hf_state(folder), hf_config)
        model = Transformer(cfg)
        model.load_state_dict(state)  # copies into the fp32 parameters, whatever the file's dtype
    except Exception as e:
        die(f"cannot load {folder} as a Llama (config.json + model.safetensors): {one_line(e)}")
    ours = hf_config.get("tiktoken_spec")  # a transformers re-save keeps it, but not the ranks file beside it
    if not (isinstance(ours, dict) and os.path.exists(os.path.join(folder, ours.get("ranks_file", "")))):
        ours = None
    if tokenizer_name:
        spec = {"kind": "tiktoken", "name": tokenizer_name}
    elif ours:
        spec = ours
    elif os.path.exists(os.path.join(folder, "tokenizer.json")):
        spec = tokenizer_from_hf(folder)
    else:
        die(f"{folder} has no tokenizer (tokenizer.json, or the tiktoken_spec export.py writes); name one, "
            "e.g. --tokenizer r50k_base")
    try:
        enc = load_tokenizer(spec, folder)
    except Exception as e:
        die(f"cannot build the tokenizer of {folder} from {json.dumps(spec)[:80]}: {one_line(e)}")
    eot_id = hf_config.get("eos_token_id") if ours and not tokenizer_name else enc.eot_token
    if enc.n_vocab > cfg.vocab_size or not isinstance(eot_id, int) or not 0 <= eot_id < enc.n_vocab:
        die(f"{folder}: the tokenizer has {enc.n_vocab} ids and end-of-text {eot_id}, the model "
            f"vocab_size={cfg.vocab_size}; wrong tokenizer?")
    return model, enc, eot_id, spec
