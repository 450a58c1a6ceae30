"""
The data train.py reads: the token shards prepare.py wrote (with their loss masks, for
conversations), checked; one folder or a weighted mixture of folders; and the order of the samples,
which depends only on (seed, step), so resuming and any number of processes see the same batches.

    meta = load_data("data/web:0.7,data/code:0.3")   # the first folder's meta.json, + "sources"
    train = Mixture(meta, "train", seq_len=1024, seed=1337)
    x, y = train.batch(range(0, 16), device)         # global samples 0..15: inputs, targets (16, T)
"""
import json
import math
import os

import numpy as np
import torch

from common import die, file_in, one_line
from tokenizer import load_tokenizer, tokenizer_fingerprint, with_ranks
def load_meta(folder):
    """meta.json of a prepare.py folder, every field train.py uses checked (a damaged one is named),
    and the shards' sizes."""
    path = os.path.join(folder, "meta.json")
    if os.path.isfile(folder):
        die(f"--data={folder} is a file; give the folder prepare.py wrote (python prepare.py --out FOLDER)")
    if not os.path.isfile(path):
        die(f"no {path}; write the data with prepare.py first (python prepare.py --out {folder})")
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        die(f"{path} is not readable JSON ({one_line(e)}); re-run prepare.py")

    def need(ok, field):
        if not ok:
            die(f"{path}: {field} is missing or wrong; it is damaged or not prepare.py's: re-run prepare.py")
    need(isinstance(meta, dict), "the top level (an object)")
    need(meta.get("dtype") in ("uint16", "uint32"), '"dtype" (uint16 or uint32)')
    itemsize = {"uint16": 2, "uint32": 4}[meta["dtype"]]
    vocab, eot, spec = meta.get("vocab_size"), meta.get("eot_id"), meta.get("tokenizer")
    need(isinstance(vocab, int) and 0 < vocab <= 256 ** itemsize, f'"vocab_size" (1 to {256 ** itemsize})')
    need(isinstance(eot, int) and 0 <= eot < vocab, '"eot_id" (an id below vocab_size)')
    need(isinstance(spec, dict) and spec.get("kind") in ("tiktoken", "bpe"), '"tokenizer" (a tiktoken or bpe spec)')
    files = {}  # (split, kind) -> [(file, tokens)]
    for key, kind in (("shards", "bin"), ("loss_mask", "mask")):
        if key == "loss_mask" and key not in meta:
            continue
        for split in ("train", "val"):
            entries = meta.get(key, {}).get(split) if isinstance(meta.get(key), dict) else None
            need(isinstance(entries, list) and all(isinstance(e, dict) and isinstance(e.get("tokens"), int)
                                                   and e.get("tokens", -1) >= 0 for e in entries),
                 f'"{key}" of {split} (a list of {{"file", "tokens"}})')
            files[split, kind] = [(file_in(folder, e.get("file"), path), e["tokens"]) for e in entries]
    for split in ("train", "val"):
        masks, shards = files.get((split, "mask")), files[split, "bin"]
        need(masks is None or [n for _, n in masks] == [n for _, n in shards],
             f'"loss_mask" of {split} (one mask file per shard, as long as it)')
        if not files[split, "bin"]:
            die(f"{path} lists no {split} shards; re-run prepare.py with --val-fraction > 0")
    for split, entry in meta.get("pairs", {}).items() if isinstance(meta.get("pairs"), dict) else []:
        need(isinstance(entry, dict) and isinstance(entry.get("pairs"), int) and len(files[split, "bin"]) == 1,
             f'"pairs" of {split} ({{"file", "pairs"}} beside one shard)')
        files[split, "pairs"] = [(file_in(folder, entry.get("file"), path), entry["pairs"])]
    for (split, kind), entries in files.items():
        for file, n in entries:
            each = {"bin": itemsize, "mask": 1, "pairs": 24}[kind]  # pairs: three int64 each
            size = os.path.getsize(file) if os.path.isfile(file) else -1
            if size != n * each:
                die(f"{file} has {size} bytes but meta.json says {n} entries of {each} byte(s): the file is missing, "
                    "truncated or corrupt; re-run prepare.py")
    return meta

def data_sources(data):
    """--data -> [(folder, weight)], weights summing to 1: "FOLDER" or "FOLDER:WEIGHT,FOLDER:WEIGHT,..."."""
    sources = []
    for part in data.split(","):
        folder, _, weight = part.rpartition(":")
        try:
            sources.append((folder, float(weight)) if folder else (part, 1.0))
        except ValueError:  # a colon in the folder's name, no weight
            sources.append((part, 1.0))
    total = sum(w for _, w in sources)
    if not all(0 < w < math.inf for _, w in sources) or not math.isfinite(total):
        die(f"--data={data}: every weight must be a positive number, and their sum finite")
    if len({os.path.realpath(f) for f, _ in sources}) < len(sources):  # data/x and data/x/ are one folder
        die(f"--data={data} names a folder twice; give each once, with its whole weight")
    return [(folder, w / total) for folder, w in sources]

def load_data(data):
    """--data's folders, checked -> the first one's meta.json, plus "folder" (its path) and "sources":
    [(folder, weight, meta)] of every folder. A mixture's folders must share one tokenizer."""
    sources = [(folder, weight, load_meta(folder)) for folder, weight in data_sources(data)]
    first = {**sources[0][2], "folder": sources[0][0], "sources": sources}
    fingerprint = tokenizer_fingerprint(tokenizer_of(first)[0]) if len(sources) > 1 else None
    for folder, _, meta in sources[1:]:  # the same ids for the same text: compare what decides them
        if tokenizer_fingerprint(tokenizer_of({**meta, "folder": folder})[0]) != fingerprint:
            die(f"{folder} was tokenized with another tokenizer than {first['folder']}; a mixture needs "
                "one tokenizer (prepare.py --tokenizer FOLDER reuses one)")
    return first

def tokenizer_of(meta):
    """(tiktoken encoding, spec with the ranks inline) of a data folder: checkpoints carry the spec."""
    folder = meta["folder"]
    try:
        spec = with_ranks(meta["tokenizer"], folder)
        enc = load_tokenizer(spec)
    except SystemExit:
        raise
    except Exception as e:  # a missing or damaged ranks file, tiktoken offline without its cache
        die(f"cannot load the tokenizer of {folder}: {one_line(e)}; re-run prepare.py")
    if enc.n_vocab != meta["vocab_size"] or enc.eot_token != meta["eot_id"]:
        die(f"{folder}/meta.json says vocab {meta['vocab_size']} and eot {meta['eot_id']}, its tokenizer "
            f"{enc.n_vocab} and {enc.eot_token}; re-run prepare.py")
    return enc, spec

class TokenWindows:
    """The windows of seq_len + 1 tokens at stride seq_len over one split's shards (none crosses a
    shard boundary), numbered 0..n-1. Window w gives inputs x = tokens[:-1], targets y = tokens[1:].
    With a loss mask (conversations, prepare.py --chat), a target whose mask byte is 0 becomes -1:
    the loss skips it. Documents are packed: a window may hold the end of one and the start of the
    next, or a piece of a long one, and its mask moves with its tokens."""

    def __init__(self, folder, meta, split, seq_len):
        self.folder, self.files = folder, [os.path.join(folder, s["file"]) for s in meta["shards"][split]]
        self.shards = [np.memmap(f, dtype=meta["dtype"], mode="r") for f in self.files]
        self.masks = [np.memmap(os.path.join(folder, s["file"]), dtype=np.uint8, mode="r")
                      for s in meta.get("loss_mask", {}).get(split, [])]
        per_shard = [max(0, (len(s) - 1) // seq_len) for s in self.shards]
        self.first = np.cumsum([0] + per_shard)  # window number where each shard starts
        self.n, self.seq_len, self.vocab_size = int(self.first[-1]), seq_len, meta["vocab_size"]
        if self.n == 0:
            die(f"the {split} split of {folder} has fewer than {seq_len + 1} tokens; "
                "use a smaller --max-seq-len")

    def window(self, w):
        """(tokens (T + 1,), mask bytes of the targets (T,) or None) of window w."""
        k = int(np.searchsorted(self.first, w, side="right")) - 1
        start = (int(w) - int(self.first[k])) * self.seq_len
        tokens = self.shards[k][start:start + self.seq_len + 1]
        if tokens.max() >= self.vocab_size:  # cheap, and catches corrupt shards where it matters
            die(f"token id {int(tokens.max())} >= the data's vocab_size={self.vocab_size} in "
                f"{self.files[k]}: a corrupt shard or data from another tokenizer; re-run prepare.py")
        return tokens, self.masks[k][start + 1:start + self.seq_len + 1] if self.masks else None

    def batch(self, windows, device):
        return to_device([self.window(w) for w in windows], device)

def to_device(rows, device):
    """Windows (tokens, mask or None) -> inputs x and targets y (B, T) on device; y = -1 where the
    mask says not to learn a target (the loss skips it)."""
    tokens = np.stack([t for t, _ in rows]).astype(np.int64)                  # (B, T + 1)
    xy = np.stack([tokens[:, :-1], tokens[:, 1:]])                            # (2, B, T)
    for row, (_, keep) in enumerate(rows):
        if keep is not None:
            xy[1, row][keep == 0] = -1
    xy = torch.from_numpy(xy)
    if device.type == "cuda":  # page-locked memory lets the copy run without blocking this process
        xy = xy.pin_memory()
    xy = xy.to(device, non_blocking=device.type == "cuda")  # one copy to the device
    return xy[0], xy[1]                                                       # (B, T) each

class Mixture:
    """The windows of one split of every --data source, and the run's order over them: global sample g
    (g = step * sequences_per_step + row) -> (source, k) -> window EpochOrder(k) of that source, k
    counting that source's samples so far. Samples come in blocks of BLOCK: in each, every source
    has its quota (its weight of BLOCK, rounded so the quotas add up), in an order drawn from (seed,
    block). So the shares hold in every block, and (source, k) of any g is found without replaying
    the run: resuming and any number of processes see the same data. A source that runs out starts
    its next epoch, reshuffled. One source: k = g, the plain epoch order."""
    BLOCK = 1000

    def __init__(self, meta, split, seq_len, seed):
        for folder, _, m in meta["sources"]:
            if "pairs" in m:
                die(f"{folder} holds preference pairs: train on them with --objective=dpo")
        self.names = [folder for folder, _, _ in meta["sources"]]
        self.weights = [weight for _, weight, _ in meta["sources"]]
        self.windows = [TokenWindows(folder, m, split, seq_len) for folder, _, m in meta["sources"]]
        # seed for the first source, as with one folder; the others' orders differ from it
        self.orders = [EpochOrder(w.n, seed + 7919 * i) for i, w in enumerate(self.windows)]
        exact = [weight * self.BLOCK for weight in self.weights]  # largest remainders get the rest
        quota = [math.floor(x) for x in exact]
        for i in sorted(range(len(exact)), key=lambda i: quota[i] - exact[i])[:self.BLOCK - sum(quota)]:
            quota[i] += 1
        self.quota, self.seed, self.cache, self.epochs = quota, seed, {}, None

    def layout(self, block):
        """The sources of a block's samples in order, and each sample's count within its source."""
        if block not in self.cache:
            layout = np.repeat(np.arange(len(self.quota)), self.quota)
            if len(self.quota) > 1:
                layout = np.random.default_rng([self.seed, 104729, block]).permutation(layout)
            before = np.zeros(len(layout), dtype=np.int64)
            for s, q in enumerate(self.quota):
                before[layout == s] = np.arange(q)
            self.cache = {block: (layout, before)}
        return self.cache[block]

    def seen(self, g):
        """How many samples each source gave before global sample g."""
        block, at = divmod(g, self.BLOCK)
        layout, _ = self.layout(block)
        return [block * q + int(np.count_nonzero(layout[:at] == s)) for s, q in enumerate(self.quota)]

    def news(self, g):
        """What changed since the last call, at global sample g: the sources that began a new epoch
        (all their windows seen: they repeat, reshuffled)."""
        epochs = [1 + n // w.n for n, w in zip(self.seen(g), self.windows)]
        said = [f"{name}: epoch {e} begins (its windows repeat, reshuffled)"
                for name, e, before in zip(self.names, epochs, self.epochs or epochs) if e > before]
        self.epochs = epochs
        return said

    def batch(self, samples, device):
        """Inputs and targets (B, T) of global samples, each from its source."""
        rows = []
        for g in samples:
            block, at = divmod(g, self.BLOCK)
            layout, before = self.layout(block)
            s = int(layout[at])
            k = block * self.quota[s] + int(before[at])  # this source's k-th sample
            rows.append(self.windows[s].window(self.orders[s](k)))
        return to_device(rows, device)

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
