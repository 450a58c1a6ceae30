"""
Text in, token shards out: turn a corpus into the files train.py reads.

    python prepare.py                                   # Tiny Shakespeare (downloaded once) -> data/shakespeare-r50k_base
    python prepare.py --input ../shared/data/tinyshakespeare.txt --out data/shakespeare   # the same file, offline
    python prepare.py --preset tinystories --num-proc 8
    python prepare.py --preset fineweb-edu --streaming --num-proc 16
    python prepare.py --dataset roneneldan/TinyStories --split validation
    python prepare.py --input my_corpus/ --vocab-size 4096     # and train a byte-level BPE tokenizer on it

Sources: --dataset NAME [--subset S] [--split train] [--text-field text] loads a Hugging Face hub dataset;
--input takes files, folders, globs or URLs (fetched once into data/downloads/) of .txt, .jsonl, .json and
.parquet. .jsonl/.json/.parquet go through datasets' packaged builders (offline); .txt files are read here,
block by block, so a huge one is streamed. --preset names a common corpus (PRESETS); with no source at all,
shakespeare.

Documents: each dataset row is a document; a .txt file is one document, or several with --separator (then
whitespace around each is stripped). Empty documents are dropped. One <|endoftext|> (eot) token goes BEFORE
every document, so every shard starts with eot and sampling can start from it.

Validation: document i (from 0, in source order) is held out when i % k == k - 1, k = round(1/val_fraction).
A corpus with fewer than k documents (one book) holds none out; val is then the last val_fraction of the
token stream, so that train followed by val is exactly the corpus' token stream.

Output (--out): train_0000.bin, ..., val_0000.bin, ...: raw little-endian uint16 tokens (uint32 only for a
vocabulary of more than 65536 ids), at most --shard-tokens per file, no header, so that
np.memmap(path, dtype=meta["dtype"], mode="r") reads them; meta.json says what they hold. --vocab-size N adds
tokenizer.tiktoken: 256 byte tokens + N - 256 merges in tiktoken's format, eot = N, so vocab_size = N + 1.
Files are written as *.tmp and renamed at the end; a folder that holds a different dataset needs --force.
"""

import argparse
import base64
import codecs
import collections
import glob
import hashlib
import heapq
import itertools
import json
import multiprocessing
import os
import re
import shlex
import shutil
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import tiktoken

EOT = "<|endoftext|>"
# GPT-2's pre-tokenizer: contractions, letter runs, digit runs and punctuation runs (each taking one leading
# space), then whitespace. BPE never merges across these pieces. The BPE trained here uses it too.
GPT2_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
SUFFIXES = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
PRESETS = {
    # one 1.1 MB document, so val is its last 10%, as in nanoGPT's shakespeare split
    "shakespeare": dict(input=["https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"],
                        val_fraction=0.1),
    # 2.7M short stories in one 2.2 GB text file, each followed by a line "<|endoftext|>"
    "tinystories": dict(input=["https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/TinyStoriesV2-GPT4-train.txt"],
                        separator=EOT, val_fraction=0.002),
    # 9.7M web pages, ~10B tokens; --streaming avoids a second copy of it in datasets' cache
    "fineweb-edu": dict(dataset="HuggingFaceFW/fineweb-edu", subset="sample-10BT", val_fraction=0.0005),
    # 8M web pages, ~9B tokens: nanoGPT's GPT-2 reproduction corpus
    "openwebtext": dict(dataset="Skylion007/openwebtext", val_fraction=0.0005),
}


def arg(default, help, **argparse_kwargs):
    """A Config field that is also a command-line option."""
    return field(default=default, metadata=dict(help=help, **argparse_kwargs))


@dataclass
class Config:
    preset: str = arg(None, f"named corpus: {', '.join(PRESETS)} (shakespeare if no source is given)")
    dataset: str = arg(None, "Hugging Face hub dataset, e.g. roneneldan/TinyStories")
    subset: str = arg(None, "the dataset's configuration, e.g. sample-10BT")
    split: str = arg("train", "the dataset's split to read")
    text_field: str = arg("text", "column holding the text (hub datasets, .jsonl/.json/.parquet)")
    streaming: bool = arg(False, "stream the hub dataset instead of downloading it first", action="store_true")
    input: list = arg(None, "files, folders, globs or URLs of .txt/.jsonl/.json/.parquet", nargs="+")
    separator: str = arg(None, r"string that separates documents in .txt files, e.g. '<|endoftext|>' or '\n\n'")
    out: str = arg(None, "output folder (default: data/<corpus>-<tokenizer>)")
    tokenizer: str = arg("r50k_base", "tiktoken encoding (r50k_base is GPT-2's)")
    vocab_size: int = arg(None, "instead, train a byte-level BPE of N >= 256 tokens; eot gets id N", type=int)
    bpe_train_chars: int = arg(10_000_000, "train the BPE on the first this many characters of the corpus")
    dtype: str = arg("auto", "token dtype: auto (uint16 if the vocabulary fits, else uint32), uint16 or uint32")
    val_fraction: float = arg(0.01, "fraction of documents (or of the tokens of too few documents) for val")
    shard_tokens: int = arg(100_000_000, "maximum tokens per .bin file")
    num_proc: int = arg(os.cpu_count(), "tokenizer processes")
    chunk_chars: int = arg(1_000_000, "characters per tokenizer task; longer documents are cut into pieces")
    force: bool = arg(False, "overwrite an --out folder that holds a different dataset", action="store_true")


class PrepareError(Exception):
    """A user mistake: main() prints it as one line, 'error: ...', and exits with status 2."""


def parse_args(argv=None) -> Config:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in fields(Config):
        kwargs = dict(f.metadata)
        if "action" not in kwargs:
            kwargs.setdefault("type", str if f.default is None else type(f.default))
        parser.add_argument("--" + f.name.replace("_", "-"), default=f.default, **kwargs)
    # a preset only supplies defaults, so that options given on the command line still win
    first, _ = parser.parse_known_args(argv)
    preset = first.preset or (None if first.dataset or first.input else "shakespeare")
    if preset not in (None, *PRESETS):
        raise PrepareError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if preset:
        parser.set_defaults(preset=preset, **PRESETS[preset])
    cfg = Config(**vars(parser.parse_args(argv)))
    # argument checking
    if cfg.separator:  # a shell passes '\n' as two characters
        cfg.separator = cfg.separator.replace("\\n", "\n").replace("\\t", "\t")
    if bool(cfg.dataset) == bool(cfg.input):
        raise PrepareError("give one source: --dataset NAME, --input FILES or --preset NAME")
    if cfg.vocab_size is not None and cfg.vocab_size < 256:
        raise PrepareError(f"--vocab-size {cfg.vocab_size} < 256: a byte-level BPE needs the 256 byte tokens")
    if cfg.dtype not in ("auto", "uint16", "uint32"):
        raise PrepareError(f"--dtype {cfg.dtype!r}: use auto, uint16 or uint32")
    if not 0 <= cfg.val_fraction <= 0.5 or min(cfg.shard_tokens, cfg.num_proc, cfg.chunk_chars) < 1:
        raise PrepareError("need 0 <= --val-fraction <= 0.5 and positive --shard-tokens, --num-proc, --chunk-chars")
    return cfg


def one_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


# ----------------------------------------------------------------------------------------------------------
# Reading: every source becomes one stream of (text, starts_document) pieces of about chunk_chars characters

# Cutting a document where GPT-2-family split regexes always start a new pre-token makes the tokens of the
# parts those of the whole: after a newline between two non-space characters ("a\n|b"), or before a space
# between two ("a| b"). The pre-token before the cut cannot run on into it, and the one after starts there
# whatever precedes it. test_safe_cuts_tokenize_like_the_whole checks this against tiktoken.
SAFE_CUT = re.compile(r"(?<=\S\n)(?=\S)|(?<=\S)(?= \S)")


def last_safe_cut(text: str, lo: int, hi: int) -> int:
    """Position of the last safe cut in the final 64K characters of text[lo:hi], 0 if there is none."""
    cut = 0
    for m in SAFE_CUT.finditer(text, max(lo + 1, hi - 65536), hi):
        cut = m.start()
    return cut


def split_document(text: str, chunk_chars: int):
    """Yield (piece, starts_document) for a document in memory, cut safely into ~chunk_chars pieces."""
    start = 0
    while len(text) - start > chunk_chars:
        cut = last_safe_cut(text, start, start + chunk_chars)
        if not cut:  # no newline or space for 64K characters: cut at the next safe place, however far
            m = SAFE_CUT.search(text, start + chunk_chars)
            cut = m.start() if m else len(text)
        yield text[start:cut], start == 0
        start = cut
    if start < len(text):
        yield text[start:], start == 0


def utf8_decoder(stats: dict):
    """An incremental UTF-8 decoder that, like errors="replace", puts U+FFFD for invalid bytes, counting them."""
    def replace(err):
        stats["replaced_bytes"] += err.end - err.start
        return "\ufffd", err.end
    codecs.register_error("prepare.replace", replace)  # files are decoded one at a time, so one name will do
    return codecs.getincrementaldecoder("utf-8")(errors="prepare.replace")


def read_txt(path: str, separator: str | None, chunk_chars: int, stats: dict):
    """Yield (piece, starts_document) from a .txt file read in blocks, so a huge file never sits in memory."""
    decoder, buf, new_doc = utf8_decoder(stats), "", True
    keep = len(separator or "")  # never cut into the last characters: they may begin a separator
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk_chars)
            buf += decoder.decode(block, final=not block)
            if separator:  # every separator ends a document, and so does the end of the file
                *docs, buf = buf.split(separator)
                if not block:
                    docs, buf = docs + [buf], ""
                for doc in docs:
                    doc = doc.strip() if new_doc else doc.rstrip()
                    if doc:
                        yield doc, new_doc
                    new_doc = True
            if not block:
                break
            cut = last_safe_cut(buf, 0, len(buf) - keep) if len(buf) > chunk_chars else 0
            if cut:  # a long document: pass on what we have of it, up to a safe cut
                yield (buf[:cut].lstrip() if separator and new_doc else buf[:cut]), new_doc
                buf, new_doc = buf[cut:], False
    if buf:
        yield buf, new_doc


def find_files(patterns: list[str]) -> list[tuple[str, str]]:
    """Expand --input into (local path, kind) pairs, in order, each folder or glob sorted; URLs are fetched."""
    files = []
    for pattern in patterns:
        if "://" in pattern:
            new = [(pattern, SUFFIXES.get(Path(urlparse(pattern).path).suffix))]
        elif os.path.isdir(pattern):  # a folder: its supported files, at any depth
            new = [(str(p), SUFFIXES[p.suffix]) for p in sorted(Path(pattern).rglob("*"))
                   if p.suffix in SUFFIXES and p.is_file()]
        else:
            new = [(p, SUFFIXES.get(Path(p).suffix)) for p in sorted(glob.glob(pattern, recursive=True))
                   if os.path.isfile(p)]
        if not new or any(kind is None for _, kind in new):
            raise PrepareError(f"--input {pattern!r} matches no files, or files not ending in "
                               f"{', '.join(SUFFIXES)}; check the path")
        files += new
    return [(download(path) if "://" in path else path, kind) for path, kind in files]


def download(url: str) -> str:
    """A copy of url in data/downloads/, fetched once. (datasets fetches only huggingface.co files without
    aiohttp, which it no longer installs; urllib fetches any URL, file:// included.)"""
    path = Path("data/downloads") / f"{hashlib.sha1(url.encode()).hexdigest()[:8]}-{Path(urlparse(url).path).name}"
    if not path.exists():
        print(f"downloading {url} to {path}", file=sys.stderr)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with urllib.request.urlopen(url) as response, open(f"{path}.tmp", "wb") as f:
                shutil.copyfileobj(response, f, 1 << 20)
        except (OSError, ValueError) as e:
            raise PrepareError(f"cannot download {url}: {one_line(e)}; check the URL and your internet connection, "
                               "or download it yourself and pass the file to --input")
        os.replace(f"{path}.tmp", path)
    return str(path)


def import_datasets():
    # a streamed dataset would import torch (2-3 s, 300 MB) just to share a counter with DataLoader workers
    os.environ.setdefault("USE_TORCH", "0")
    import datasets  # only here: train.py and sample.py import this module on machines without datasets
    datasets.logging.set_verbosity_error()
    return datasets


def load_hub(cfg: Config):
    try:
        return import_datasets().load_dataset(cfg.dataset, cfg.subset, split=cfg.split, streaming=cfg.streaming)
    except Exception as e:
        raise PrepareError(f"cannot load dataset {cfg.dataset!r}: {one_line(e)}; check --dataset, --subset and "
                           "--split (https://huggingface.co/datasets) and your internet connection")


def load_files(kind: str, paths: list[str], stats: dict):
    """Local .jsonl/.json ("json") or .parquet files, through datasets' packaged builders."""
    datasets = import_datasets()
    datasets.disable_progress_bars()  # keep stderr for our own progress line
    options, replaced = {}, stats["replaced_bytes"]
    if kind == "json":  # JSON must be UTF-8 but pyarrow lets bad bytes through: count them as for .txt
        for path in paths:
            decoder = utf8_decoder(stats)
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 24), b""):
                    decoder.decode(block)
            decoder.decode(b"", final=True)
    if stats["replaced_bytes"] > replaced:  # and have datasets replace them, which it only does for an
        options = dict(encoding="utf_8", encoding_errors="replace")  # encoding not spelled "utf-8"
    try:  # streamed: read once, in order, without first copying them into datasets' Arrow cache
        return datasets.load_dataset(kind, data_files=paths, split="train", streaming=True, **options)
    except Exception as e:
        raise PrepareError(f"cannot read {', '.join(paths)}: {one_line(e)}; check that it is valid {kind}")


def rows_to_pieces(rows, text_field: str, chunk_chars: int):
    try:
        for batch in rows.iter(batch_size=1000):
            if text_field not in batch:
                raise PrepareError(f"no field {text_field!r} in the dataset; pass --text-field, one of {list(batch)}")
            for text in batch[text_field]:
                if text is not None and not isinstance(text, str):
                    raise PrepareError(f"field {text_field!r} holds {type(text).__name__}, not text; pass "
                                       f"--text-field with a text column, one of {list(batch)}")
                yield from split_document(text or "", chunk_chars)
    except UnicodeDecodeError as e:  # parquet strings that are not UTF-8 after all
        raise PrepareError(f"invalid UTF-8 in field {text_field!r} ({e.reason}); re-encode the dataset as UTF-8")


def read_pieces(cfg: Config, files: list[tuple[str, str]], stats: dict):
    """The whole corpus as one stream of (text, starts_document), in a fixed order."""
    if cfg.dataset:
        yield from rows_to_pieces(load_hub(cfg), cfg.text_field, cfg.chunk_chars)
    for kind, group in itertools.groupby(files, key=lambda file: file[1]):
        paths = [path for path, _ in group]
        if kind == "text":
            for path in paths:
                yield from read_txt(path, cfg.separator, cfg.chunk_chars, stats)
        else:
            yield from rows_to_pieces(load_files(kind, paths, stats), cfg.text_field, cfg.chunk_chars)


def bpe_sample(cfg: Config, files: list[tuple[str, str]]):
    """The first bpe_train_chars characters of the corpus: BPE training time must not grow with the corpus."""
    n = 0
    for text, _ in read_pieces(cfg, files, {"replaced_bytes": 0}):
        yield text[:cfg.bpe_train_chars - n]
        n += len(text)
        if n >= cfg.bpe_train_chars:
            return


# ----------------------------------------------------------------------------------------------------------
# Tokenizers: a tiktoken encoding by name, or a byte-level BPE trained here and saved in tiktoken's format

def merge(ids: list[int], pair: tuple[int, int], new: int) -> list[int]:
    """Replace each occurrence of pair in ids, left to right, by new."""
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and (ids[i], ids[i + 1]) == pair:
            out.append(new)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def train_bpe(texts, vocab_size: int) -> list[bytes]:
    """Byte-level BPE: the bytes of each token in rank order, 256 single bytes then one token per merge.

    Each step merges the most frequent adjacent pair of tokens within GPT-2 pre-tokens; a tie goes to the
    smallest (left id, right id), i.e. to the older tokens. Instead of recounting the corpus at every step,
    we count pairs over the distinct pre-tokens once and then update only the words holding the merged pair,
    keeping a heap of (-count, pair) whose outdated entries are skipped as they surface."""
    import regex  # a dependency of tiktoken; Python's re has no \p{L}
    word_counts = collections.Counter()
    for text in texts:
        word_counts.update(regex.findall(GPT2_PAT, text))
    words = [list(word.encode("utf-8")) for word in word_counts]
    freqs = list(word_counts.values())
    pair_counts = collections.Counter()
    where = collections.defaultdict(set)  # pair -> words that hold it (or held it: harmless, just skipped)
    for i, (word, freq) in enumerate(zip(words, freqs)):
        for pair in zip(word, word[1:]):
            pair_counts[pair] += freq
            where[pair].add(i)
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)
    tokens = [bytes([b]) for b in range(256)]
    while len(tokens) < vocab_size and heap:
        neg_count, pair = heapq.heappop(heap)
        if pair_counts.get(pair) != -neg_count:
            continue  # outdated entry: the pair's count changed and was pushed again
        new = len(tokens)
        tokens.append(tokens[pair[0]] + tokens[pair[1]])
        changed = set()
        for i in where.pop(pair):
            word, freq = words[i], freqs[i]
            for p in zip(word, word[1:]):  # take the word's pairs out, merge, put the new pairs in
                pair_counts[p] -= freq
                changed.add(p)
            words[i] = word = merge(word, pair, new)
            for p in zip(word, word[1:]):
                pair_counts[p] += freq
                where[p].add(i)
                changed.add(p)
        for p in changed:
            if pair_counts[p] > 0:
                heapq.heappush(heap, (-pair_counts[p], p))
            else:
                del pair_counts[p]
    return tokens


def load_tokenizer(spec: dict, folder: str | None = None) -> tiktoken.Encoding:
    """The tiktoken.Encoding of a meta.json tokenizer spec. A "bpe" spec carries its ranks file's text
    ("ranks", as checkpoints do) or names the file ("ranks_file"), which is read from folder."""
    if spec["kind"] == "tiktoken":
        return tiktoken.get_encoding(spec["name"])
    text = spec["ranks"] if "ranks" in spec else Path(folder or ".", spec["ranks_file"]).read_text()
    ranks = {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in text.splitlines())}
    return tiktoken.Encoding(spec["name"], pat_str=spec["pat_str"], mergeable_ranks=ranks,
                             special_tokens=spec["special_tokens"])


def ranks_text(tokens: list[bytes]) -> str:
    """tiktoken's ranks-file format: one "base64(token) rank" line per token, tokens in rank order."""
    return "".join(f"{base64.b64encode(token).decode()} {rank}\n" for rank, token in enumerate(tokens))


def tokenizer_spec_inline(meta: dict, folder: str) -> dict:
    """meta's tokenizer spec with no file to go with it (what train.py stores in checkpoints)."""
    spec = dict(meta["tokenizer"])
    if "ranks_file" in spec:
        spec["ranks"] = Path(folder, spec.pop("ranks_file")).read_text()
    return spec


# ----------------------------------------------------------------------------------------------------------
# Tokenizing and writing

_enc, _dtype = None, None  # the tokenizer and token dtype of each worker process, set by init_worker


def init_worker(enc: tiktoken.Encoding, dtype: str):
    global _enc, _dtype
    _enc, _dtype = enc, dtype


def encode_batch(batch: list[tuple[str, bool]]) -> list[tuple[np.ndarray, bool]]:
    """Token ids of each (text, starts_document) piece; a document's first piece gets eot in front."""
    return [(np.array([_enc.eot_token] * new_doc + _enc.encode_ordinary(text), dtype=_dtype), new_doc)
            for text, new_doc in batch]


def tokenize_documents(enc, pieces, dtype="uint16", num_proc=1, batch_chars=1_000_000):
    """Yield (ids, starts_document) for each (text, starts_document) piece, in order, tokenizing batches of
    ~batch_chars characters in num_proc processes. At most 2 * num_proc batches are in flight (Pool.imap
    would read the whole corpus ahead into its task queue), so memory does not grow with the corpus."""
    def batches():
        batch, size = [], 0
        for piece in pieces:
            batch.append(piece)
            size += len(piece[0])
            if size >= batch_chars:
                yield batch
                batch, size = [], 0
        if batch:
            yield batch
    if num_proc == 1:
        init_worker(enc, dtype)
        for batch in batches():
            yield from encode_batch(batch)
        return
    with multiprocessing.Pool(num_proc, init_worker, (enc, dtype)) as pool:
        pending = collections.deque()
        for batch in batches():
            pending.append(pool.apply_async(encode_batch, (batch,)))
            if len(pending) >= 2 * num_proc:
                yield from pending.popleft().get()
        while pending:
            yield from pending.popleft().get()


class ShardWriter:
    """Appends one split's tokens to <split>_0000.bin.tmp, <split>_0001.bin.tmp, ... of at most shard_tokens
    tokens each, counting the tokens of each shard and the documents started in it."""

    def __init__(self, folder: Path, split: str, dtype: str, shard_tokens: int, eot: int):
        self.folder, self.split, self.dtype, self.shard_tokens, self.eot = folder, split, dtype, shard_tokens, eot
        self.counts, self.documents, self.file = [], 0, None
        self.file_dtype = np.dtype(dtype).newbyteorder("<")  # little-endian on any machine

    def path(self, i: int) -> Path:
        return self.folder / f"{self.split}_{i:04d}.bin.tmp"

    def write(self, ids: np.ndarray, documents: int = 0):
        """Append ids, which start `documents` new documents."""
        self.documents += documents
        ids = ids.astype(self.file_dtype, copy=False)
        while len(ids):
            if self.file is None or self.counts[-1] == self.shard_tokens:
                self.close()
                self.file = open(self.path(len(self.counts)), "wb")
                self.counts.append(0)
            n = min(len(ids), self.shard_tokens - self.counts[-1])
            self.file.write(ids[:n])
            self.counts[-1] += n
            ids = ids[n:]

    def close(self):
        if self.file:
            self.file.close()
        self.file = None

    def finish(self) -> list[dict]:
        """Give the shards their final names; their meta.json entries."""
        self.close()
        for i in range(len(self.counts)):
            self.path(i).rename(self.path(i).with_suffix(""))
        return [{"file": self.path(i).stem, "tokens": count} for i, count in enumerate(self.counts)]


def move_tail(train: ShardWriter, val: ShardWriter, n: int):
    """Move the last n tokens of train to val, 16 MB at a time."""
    train.close()
    itemsize = np.dtype(train.dtype).itemsize
    keep, start, counts, train.counts = sum(train.counts) - n, 0, train.counts, []
    for i, count in enumerate(counts):
        stay = min(max(keep - start, 0), count)  # tokens of shard i that stay in train
        if stay < count:
            with open(train.path(i), "rb") as f:
                f.seek(stay * itemsize)
                for block in iter(lambda: f.read(1 << 24), b""):
                    ids = np.frombuffer(block, dtype=train.file_dtype)
                    val.write(ids, int(np.count_nonzero(ids == train.eot)))  # eot starts each document
            if stay:
                os.truncate(train.path(i), stay * itemsize)
            else:
                os.remove(train.path(i))
        if stay:
            train.counts.append(stay)
        start += count
    train.documents -= val.documents


def remove_tmp_files(out: Path):
    for pattern in ("train_*.bin.tmp", "val_*.bin.tmp", "tokenizer.tiktoken.tmp", "meta.json.tmp"):
        for path in out.glob(pattern):
            path.unlink()


def open_output(out: Path, settings: dict, force: bool):
    """Check that out can be written and holds no other dataset (one prepared with the same settings may be
    redone); clear what an interrupted run left."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "meta.json.tmp").write_text("")  # fail now rather than after an hour of tokenizing
    except OSError as e:
        raise PrepareError(f"cannot write to output folder {out}: {e.strerror}; choose another --out")
    try:
        old = json.loads((out / "meta.json").read_text())["config"] if (out / "meta.json").exists() else None
    except (ValueError, KeyError):
        old = "unreadable"
    if not force and (old != settings if old else any(out.glob("train_*.bin"))):
        raise PrepareError(f"{out} already holds a different dataset; pass --force to overwrite it, or choose "
                           "another --out")
    remove_tmp_files(out)


# ----------------------------------------------------------------------------------------------------------

def prepare(cfg: Config) -> dict:
    source = (f"{cfg.dataset} subset={cfg.subset} split={cfg.split} field={cfg.text_field}" if cfg.dataset else
              " ".join(cfg.input) + (f" separator={cfg.separator!r}" if cfg.separator else ""))
    name = cfg.preset or (cfg.dataset.split("/")[-1] if cfg.dataset else Path(urlparse(cfg.input[0]).path).stem)
    tok_name = f"bpe{cfg.vocab_size}" if cfg.vocab_size else cfg.tokenizer
    out = Path(cfg.out or f"data/{name}-{tok_name}")
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("out", "num_proc", "chunk_chars", "force", "streaming")}

    # the tokenizer, and a token dtype it fits
    if cfg.vocab_size:
        enc, vocab_size = None, cfg.vocab_size + 1  # trained below, once the input is known to be fine
        spec = dict(kind="bpe", name=tok_name, ranks_file="tokenizer.tiktoken", pat_str=GPT2_PAT,
                    special_tokens={EOT: cfg.vocab_size})
    else:
        try:
            enc = tiktoken.get_encoding(cfg.tokenizer)
        except Exception as e:
            raise PrepareError(f"cannot load tiktoken encoding {cfg.tokenizer!r}: {one_line(e)}; "
                               f"use one of {tiktoken.list_encoding_names()}, or --vocab-size N")
        vocab_size, spec = enc.n_vocab, dict(kind="tiktoken", name=cfg.tokenizer)
    dtype = cfg.dtype if cfg.dtype != "auto" else "uint16" if vocab_size <= 1 << 16 else "uint32"
    if vocab_size > 1 << (8 * np.dtype(dtype).itemsize):
        raise PrepareError(f"a vocabulary of {vocab_size} ids is too large for {dtype}; use --dtype auto or uint32")

    files = find_files(cfg.input) if cfg.input else []
    open_output(out, settings, cfg.force)
    try:
        if cfg.vocab_size:
            t0 = time.time()
            tokens = train_bpe(bpe_sample(cfg, files), cfg.vocab_size)
            ranks = ranks_text(tokens)
            (out / "tokenizer.tiktoken.tmp").write_text(ranks)
            enc = load_tokenizer(spec | {"ranks": ranks})
            print(f"trained a BPE of {len(tokens)} tokens (+ eot) in {time.time() - t0:.1f}s", file=sys.stderr)

        # tokenize, holding out every k-th document for val
        k = round(1 / cfg.val_fraction) if cfg.val_fraction else 0
        train, val = (ShardWriter(out, split, dtype, cfg.shard_tokens, enc.eot_token) for split in ("train", "val"))
        stats, docs, ntok, writer = {"replaced_bytes": 0}, 0, 0, train
        t0 = shown = time.time()  # shown: when the progress line was last printed
        def progress(end=""):
            print(f"\r{docs:,} documents | {ntok:,} tokens | {ntok / (time.time() - t0):,.0f} tokens/s",
                  end=end, file=sys.stderr)
        for ids, new_doc in tokenize_documents(enc, read_pieces(cfg, files, stats), dtype, cfg.num_proc,
                                               cfg.chunk_chars):
            if new_doc:
                writer = val if k and docs % k == k - 1 else train
                docs += 1
            writer.write(ids, int(new_doc))
            ntok += len(ids)
            if time.time() - shown > 0.5:
                shown = time.time()
                progress()
        if shown > t0:
            progress("\n")
        if ntok == 0:
            raise PrepareError(f"the corpus is empty: no text in {source}; check --input, --dataset, --text-field")
        if k and docs < k:  # too few documents to hold any out: val is the token stream's tail
            n_val = max(1, round(cfg.val_fraction * ntok))
            move_tail(train, val, n_val)
            val_split = f"the last {n_val} tokens of the token stream ({docs} documents are fewer than {k})"
        else:
            val_split = f"documents i with i % {k} == {k - 1}, counting from 0" if k else "none"

        # swap the new dataset in; the old one's shards go first, as there may have been more of them
        for path in [*out.glob("train_*.bin"), *out.glob("val_*.bin"), out / "tokenizer.tiktoken"]:
            path.unlink(missing_ok=True)
        if cfg.vocab_size:
            (out / "tokenizer.tiktoken.tmp").rename(out / "tokenizer.tiktoken")
        meta = {
            "format": "llama-shards-v1", "tokenizer": spec, "vocab_size": vocab_size, "eot_id": enc.eot_token,
            "dtype": dtype, "eot_position": "before each document",
            "shards": {"train": train.finish(), "val": val.finish()},
            "documents": {"train": train.documents, "val": val.documents},
            "tokens": {"train": sum(train.counts), "val": sum(val.counts)},
            "val_split": val_split, "source": source, "command": shlex.join(["python", *sys.argv]),
            "replaced_bytes": stats["replaced_bytes"], "config": settings,
        }
        (out / "meta.json.tmp").write_text(json.dumps(meta, indent=2) + "\n")
        (out / "meta.json.tmp").rename(out / "meta.json")
    except BaseException:
        remove_tmp_files(out)
        raise
    if stats["replaced_bytes"]:
        print(f"note: replaced {stats['replaced_bytes']:,} invalid UTF-8 bytes with U+FFFD", file=sys.stderr)
    print(f"{out}: train {sum(train.counts):,} tokens, {train.documents:,} documents, {len(train.counts)} shard(s); "
          f"val {sum(val.counts):,} tokens, {val.documents:,} documents ({val_split})")
    return meta


def main(argv=None):
    try:
        prepare(parse_args(argv))
    except PrepareError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
