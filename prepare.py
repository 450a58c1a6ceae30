"""
Text in, token shards out: turn a corpus into the folder train.py reads.

    python prepare.py                                 # Tiny Shakespeare, own 4096-token BPE -> data/shakespeare
    python prepare.py --preset shakespeare --input ../shared/data/tinyshakespeare.txt   # the same, offline
    python prepare.py --preset tinystories --num-proc 8               # own 8192-token BPE -> data/tinystories
    python prepare.py --preset fineweb-edu --streaming --num-proc 16  # GPT-2 tokens -> data/fineweb_edu
    python prepare.py --dataset roneneldan/TinyStories --split validation   # -> data/TinyStories-r50k_base
    python prepare.py --input my_corpus/ --vocab-size 8191   # files, folders, globs, URLs; train a BPE

Each row (or .txt file, or part of one between --separator strings) is a document, with one <|endoftext|>
(eot) token before it. Document i goes to val when i % k == k - 1, k = round(1/val_fraction); with fewer than
k documents (one book), the last val_fraction of the token stream does. Output: train_0000.bin, ...,
val_0000.bin, ... (raw little-endian uint16, uint32 beyond 65536 ids), meta.json, and for --vocab-size N
tokenizer.tiktoken (256 bytes + N - 256 merges, eot = N), built beside --out and swapped in when complete.
"""
import codecs
import collections
import glob
import hashlib
import json
import multiprocessing
import os
import random
import re
import shlex
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

import chat
import common
import tokenizer
from common import check, die, flag, one_line, setting

EOT = "<|endoftext|>"
GPT2_PAT = tokenizer.GPT2_PAT  # GPT-2's pre-tokenizer; the BPE trained here uses it too
SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")

# --- Settings -------------------------------------------------------------------------------------
PRESETS = {  # each writes the folder that train.py's preset for the corpus reads
    # one 1.1 MB document, so val is its last 10%, as in nanoGPT's shakespeare split
    "shakespeare": dict(input=["https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"],
                        vocab_size=4096, val_fraction=0.1, out="data/shakespeare"),
    # 2.7M short stories in one 2.2 GB text file, each followed by a line "<|endoftext|>"; lilLM's 8192 ids
    "tinystories": dict(input=["https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/TinyStoriesV2-GPT4-train.txt"],
                        separator=EOT, vocab_size=8191, val_fraction=0.002, out="data/tinystories"),
    # the same stories, with the 10k BPE of the CS336-style model (10,000 ids with eot)
    "tinystories-10k": dict(input=["https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/TinyStoriesV2-GPT4-train.txt"],
                            separator=EOT, vocab_size=9999, val_fraction=0.002, out="data/tinystories_10k"),
    # 9.7M web pages, ~10B tokens; --streaming avoids a second copy of it in datasets' cache
    "fineweb-edu": dict(dataset="HuggingFaceFW/fineweb-edu", subset="sample-10BT", val_fraction=0.0005,
                        out="data/fineweb_edu"),
    # 8M web pages, ~9B tokens: nanoGPT's GPT-2 reproduction corpus
    "openwebtext": dict(dataset="Skylion007/openwebtext", val_fraction=0.0005, out="data/openwebtext"),
    # the same pages with lilLM's own 8192-token BPE (8191 merges and tokens + eot)
    "openwebtext-8k": dict(dataset="Skylion007/openwebtext", vocab_size=8191, val_fraction=0.0005,
                           out="data/openwebtext_8k"),
    # conversations made from the play for the chat demo: each speech is a user turn and the next one
    # the assistant's reply, tokenized by data/shakespeare's BPE so that its model can be fine-tuned
    "shakespeare_chat": dict(input=["https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"],
                             chat=True, tokenizer="data/shakespeare", val_fraction=0.1,
                             out="data/shakespeare_chat"),
    # preference pairs from the play for the DPO demo: a speech, the next one as the chosen reply, a
    # speech from elsewhere as the rejected one; the chat data's tokenizer, chat tokens included
    "shakespeare_dpo": dict(input=["https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"],
                            preferences=True, tokenizer="data/shakespeare_chat", val_fraction=0.05,
                            out="data/shakespeare_dpo"),
}
PRESETS_HELP = "presets (values replace the defaults above; flags given win; no source given: shakespeare):\n" \
    + "\n".join(f"  {name}: " + " ".join(f"{flag(k)} {shlex.join(v if isinstance(v, list) else [str(v)])}"
                                         for k, v in p.items()) for name, p in PRESETS.items())

@dataclass
class PrepareConfig:
    preset: str | None = setting(None, f"a named corpus: {', '.join(PRESETS)} (see below)")
    dataset: str | None = setting(None, "Hugging Face hub dataset, e.g. roneneldan/TinyStories")
    subset: str | None = setting(None, "the dataset's configuration, e.g. sample-10BT")
    split: str = setting("train", "the dataset's split to read")
    streaming: bool = setting(False, "stream the hub dataset instead of downloading it first")
    input: list[str] | None = setting(None, "files, folders, globs or URLs of .txt/.jsonl/.json/.parquet")
    text_field: str = setting("text", "the field holding the text (hub datasets, .jsonl/.json/.parquet)")
    separator: str | None = setting(None, r"what separates documents in .txt files, e.g. '<|endoftext|>', '\n\n'")
    out: str | None = setting(None, "output folder; None: the preset's, else data/<corpus>-<tokenizer>")
    tokenizer: str = setting("r50k_base", "tiktoken encoding (r50k_base is GPT-2's), a folder written by "
                             "prepare.py whose tokenizer to use, or hf:DIR, a Hugging Face model's (byte-level BPE)")
    chat: bool = setting(False, "rows are conversations (\"messages\", or \"instruction\" + \"output\"); "
                         "render them with chat.py's template and write a loss mask; a .txt is a play")
    preferences: bool = setting(False, "rows are preference pairs (\"chosen\" and \"rejected\", with a \"prompt\" "
                                "or \"messages\", or as whole conversations) for DPO; a .txt play gives the true "
                                "answer as chosen, a speech from elsewhere as rejected")
    vocab_size: int = setting(0, "train a byte-level BPE of N >= 256 tokens, eot = N (0: use --tokenizer)")
    bpe_train_chars: int = setting(10_000_000, "train the BPE on the first this many characters of the corpus")
    dtype: str = setting("auto", "token dtype: auto (uint16 if the vocabulary fits, else uint32), uint16, uint32")
    val_fraction: float = setting(0.01, "fraction of documents (or of the tokens of too few documents) for val")
    shard_tokens: int = setting(100_000_000, "maximum tokens per .bin file")
    num_proc: int = setting(os.cpu_count() or 1, "tokenizer processes")
    chunk_chars: int = setting(1_000_000, "characters per tokenizer task; longer documents are cut into pieces")
    force: bool = setting(False, "replace an --out folder that holds a dataset made with other settings")

    def __post_init__(self):
        if self.separator:  # a shell passes '\n' as two characters
            self.separator = self.separator.replace("\\n", "\n").replace("\\t", "\t")
        check(bool(self.dataset) != bool(self.input), "give one source: --dataset, --input or --preset")
        self.chat = self.chat or self.preferences  # pairs are two conversations each
        check(not (self.chat and self.separator), "--chat reads conversations; drop --separator")
        check(self.vocab_size == 0 or 256 <= self.vocab_size <= 1 << 20, f"--vocab-size {self.vocab_size}: a "
              "byte-level BPE has 256 (the bytes) to 1,048,576 tokens; 0 uses --tokenizer")
        check(self.dtype in ("auto", "uint16", "uint32"), f"--dtype {self.dtype!r}: use auto, uint16 or uint32")
        check(0 <= self.val_fraction <= 0.5, f"--val-fraction {self.val_fraction} is not in [0, 0.5]")
        for name in ("bpe_train_chars", "shard_tokens", "num_proc", "chunk_chars"):
            check(getattr(self, name) > 0, f"{flag(name)} {getattr(self, name)} must be positive")

def parse_settings(argv) -> PrepareConfig:
    """Field defaults < the preset's values < the flags given; a source given replaces the preset's."""
    given = common.parse_flags(argv, [PrepareConfig], __doc__, epilog=PRESETS_HELP)
    sources = {"dataset", "input"} & given.keys()
    preset = given.get("preset") or (None if sources else "shakespeare")
    if preset is not None and preset not in PRESETS:
        die(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    values = {k: v for k, v in PRESETS.get(preset, {}).items() if not (sources and k in ("dataset", "input"))}
    return common.parse_config(PrepareConfig, {**values, **given, "preset": preset})

# --- Sources: files, URLs and datasets become rows ------------------------------------------------
def find_files(patterns: list[str]) -> list[str]:
    """Expand --input into local paths, in order, each folder or glob sorted; URLs are fetched."""
    files = []
    for pattern in patterns:
        if "://" in pattern:
            new = [pattern]
        elif os.path.isdir(pattern):  # a folder: its supported files, at any depth
            new = [str(p) for p in sorted(Path(pattern).rglob("*")) if p.suffix in SUFFIXES and p.is_file()]
        else:
            new = [p for p in sorted(glob.glob(pattern, recursive=True)) if not os.path.isdir(p)]  # a named pipe too
        if not new or any(Path(urlparse(p).path if "://" in p else p).suffix not in SUFFIXES for p in new):
            die(f"--input {pattern!r} matches no files, or files not ending in {', '.join(SUFFIXES)}")
        files += new
    return [download(p) if "://" in p else p for p in files]

def download(url: str) -> str:
    """A copy of url in data/downloads/, fetched once (by urllib: datasets fetches only from huggingface.co)."""
    name = f"{hashlib.sha1(url.encode()).hexdigest()[:8]}-{Path(urlparse(url).path).name}"
    return common.download(url, os.path.join("data", "downloads", name), "check the URL and your internet "
                           "connection, or download it yourself and pass the file to --input")

def open_text(path: str, stats: dict):
    """path as UTF-8 text as stored (newlines too); invalid bytes become U+FFFD, counted in stats."""
    def replace(err):
        stats["replaced_bytes"] += err.end - err.start
        return "\ufffd", err.end
    codecs.register_error("prepare.replace", replace)  # files are read one at a time, so one name will do
    return open(path, encoding="utf-8", errors="prepare.replace", newline="")

# JSON is read here rather than by datasets' json builder: one json.loads per line keeps memory flat, an
# error names the file and line, and rows that lack the text field can be counted.
def read_json(path: str, stats: dict):
    """The rows of a JSON-lines file, or of a .json file holding one array (parsed whole)."""
    with open(path, "rb") as f:
        whole = path.endswith(".json") and f.read(1 << 16).lstrip().startswith(b"[")  # else JSON lines
    with open_text(path, stats) as f:
        for number, line in [(0, f.read())] if whole else enumerate(f, 1):
            try:
                rows = json.loads(line) if whole else [json.loads(line)] if line.strip() else []
            except ValueError as e:
                die(f"{path} line {number or e.lineno}: not valid JSON ({e.msg}); is the file complete?")
            for i, row in enumerate(rows):
                if not isinstance(row, dict):
                    die(f"{path} {f'line {number}' if number else f'item {i}'}: a JSON {type(row).__name__}, "
                        "not an object with the text")
                yield row

# A .parquet file goes through datasets like a hub dataset: it reads parquet with pyarrow, as we would, and
# both share one path and its errors.
def dataset_rows(cfg: PrepareConfig, path: str | None = None):
    """The rows of the hub dataset, or of a .parquet file, read in batches."""
    # a streamed dataset would import torch (2-3 s) just to share a counter; a process that has it keeps it
    os.environ.setdefault("USE_TORCH", "AUTO" if "torch" in sys.modules else "0")
    import datasets  # only here: .txt and JSON files and tokenizing need no datasets
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its errors reach us as exceptions
    where, field = path or f"dataset {cfg.dataset!r}", cfg.text_field
    try:  # a file is streamed: no copy of it in datasets' cache
        rows = (datasets.load_dataset("parquet", data_files=[path], split="train", streaming=True) if path else
                datasets.load_dataset(cfg.dataset, cfg.subset, split=cfg.split, streaming=cfg.streaming))
        if not cfg.chat and rows.column_names is not None and field not in rows.column_names:  # known early
            die(f"no field {field!r} in {where}; pass --text-field, one of {rows.column_names}")
        for batch in rows.iter(batch_size=1000):
            yield from (dict(zip(batch, values)) for values in zip(*batch.values()))
    except UnicodeDecodeError as e:  # parquet strings that are not UTF-8 after all
        die(f"{where}: invalid UTF-8 in field {field!r} ({e.reason}); re-encode the dataset as UTF-8")
    except Exception as e:
        die(f"cannot load {where}: {one_line(e)}; " + ("is it a complete .parquet file?" if path else
            "check --dataset (https://huggingface.co/datasets), --subset, --split and your internet connection"))

# --- Documents: the corpus as one stream of (text, starts_document) pieces ------------------------
# Cutting a document where GPT-2-family split regexes always start a new pre-token makes the tokens of the
# parts those of the whole: after a newline between two non-space characters ("a\n|b"), or before a space
# between two ("a| b"). The pre-token before the cut cannot run on into it, and the one after starts there
# whatever precedes it. test_safe_cuts_tokenize_like_the_whole checks this against tiktoken.
SAFE_CUT = re.compile(r"(?<=\S\n)(?=\S)|(?<=\S)(?= \S)")

def last_safe_cut(text: str, lo: int, hi: int) -> int:
    """Position of the last safe cut in the final 64K characters of text[lo:hi], 0 if there is none."""
    return max((m.start() for m in SAFE_CUT.finditer(text, max(lo + 1, hi - 65536), hi)), default=0)

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

def read_txt(path: str, separator: str | None, chunk_chars: int, stats: dict):
    """Yield (piece, starts_document) from a .txt file read in blocks; separated documents are stripped."""
    buf, new_doc = "", True
    keep = len(separator or "")  # never cut into the last characters: they may begin a separator
    with open_text(path, stats) as f:
        while True:
            block = f.read(chunk_chars)
            buf += block
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

def documents_of(rows, where: str, field: str, chunk_chars: int, stats: dict):
    """Yield (piece, starts_document) for each row's text; rows without it, or with "" or null, are counted."""
    keys, found = None, False
    for row in rows:
        if field not in row:
            stats["rows_without_text"] += 1
            keys = keys or list(row)
            continue
        found, text = True, row[field]
        if text is not None and not isinstance(text, str):
            die(f"field {field!r} in {where} holds {type(text).__name__}, not text; pass --text-field, one of "
                f"{list(row)}")
        stats["rows_with_empty_text"] += not text
        yield from split_document(text or "", chunk_chars)
    if keys is not None and not found:
        die(f"no field {field!r} in {where}; pass --text-field, one of {keys}")

def read_pieces(cfg: PrepareConfig, files: list[str], stats: dict):
    """The whole corpus as one stream of (text, starts_document), in a fixed order."""
    if cfg.chat:  # the turns' text, for training a BPE on
        for messages in conversations(cfg, files, stats):
            yield from ((m["role"] + "\n" + m["content"], True) for m in messages)
        return
    if cfg.dataset:
        yield from documents_of(dataset_rows(cfg), cfg.dataset, cfg.text_field, cfg.chunk_chars, stats)
    for path in files:
        if path.endswith(".txt"):
            yield from read_txt(path, cfg.separator, cfg.chunk_chars, stats)
        else:
            rows = dataset_rows(cfg, path) if path.endswith(".parquet") else read_json(path, stats)
            yield from documents_of(rows, path, cfg.text_field, cfg.chunk_chars, stats)

def play_rows(path: str, stats: dict):
    """A play as conversations: its speeches (blocks between blank lines), two at a time, the first
    said by the user and the second answered by the assistant."""
    with open_text(path, stats) as f:
        speeches = [block.strip() for block in f.read().split("\n\n") if block.strip()]
    for i in range(0, len(speeches) - 1, 2):
        yield {"messages": [{"role": "user", "content": speeches[i]},
                            {"role": "assistant", "content": speeches[i + 1]}], "speeches": speeches}
    stats["unanswered_speeches"] += len(speeches) % 2  # an odd last speech has no reply: said in a note

def reused_tokenizer(folder: str):
    """(tokenizer spec, its ranks file's text or None) of another prepare.py folder: --tokenizer FOLDER."""
    try:
        spec = json.loads((Path(folder) / "meta.json").read_text())["tokenizer"]
        ranks = tokenizer.with_ranks(spec, folder)["ranks"] if "ranks_file" in spec else None
    except (OSError, ValueError, KeyError, TypeError) as e:
        die(f"--tokenizer {folder}: no tokenizer of a folder written by prepare.py there ({one_line(e)})")
    return spec, ranks

def chat_rows(cfg: PrepareConfig, files: list[str], stats: dict):
    """--chat, --preferences: (where, row) of every row of the corpus; a .txt file is a play."""
    play = play_pairs if cfg.preferences else play_rows
    sources = [(f"dataset {cfg.dataset!r}", dataset_rows(cfg))] if cfg.dataset else []
    sources += [(path, play(path, stats) if path.endswith(".txt") else dataset_rows(cfg, path)
                 if path.endswith(".parquet") else read_json(path, stats)) for path in files]
    for where, rows in sources:
        for i, row in enumerate(rows):
            yield f"{where} row {i + 1}", row

def conversations(cfg: PrepareConfig, files: list[str], stats: dict):
    """--chat: the messages of each conversation in the corpus (both of a pair's), checked by chat.py."""
    for where, row in chat_rows(cfg, files, stats):
        yield from chat.preference(row, where) if cfg.preferences else [chat.conversation(row, where)]

def play_pairs(path: str, stats: dict):
    """A play as preference pairs: a speech, the next one as the chosen answer, and a speech drawn
    from anywhere else in the play (seeded: the same every time) as the rejected one."""
    rng = random.Random(0)
    for row in play_rows(path, stats):
        speech, answer = (m["content"] for m in row["messages"])
        while (other := rng.choice(row["speeches"])) in (speech, answer):
            pass
        yield {"prompt": speech, "chosen": answer, "rejected": other}

def bpe_sample(cfg: PrepareConfig, files: list[str]):
    """The first bpe_train_chars characters of the corpus: BPE training time must not grow with the corpus."""
    n = 0
    for text, _ in read_pieces(cfg, files, collections.Counter()):
        if n >= cfg.bpe_train_chars:
            return
        yield text[:cfg.bpe_train_chars - n]
        n += len(text)

# --- Tokens ---------------------------------------------------------------------------------------
_enc, _dtype = None, None  # the tokenizer and token dtype of each worker process, set by init_worker

def init_worker(enc, dtype: str, pool: bool = False):
    global _enc, _dtype
    _enc, _dtype = enc, dtype
    if pool:  # Ctrl-C reaches the whole process group: only the parent reports it, in one line
        signal.signal(signal.SIGINT, signal.SIG_IGN)

def encode_batch(batch: list[tuple[str, bool]]) -> list[tuple[np.ndarray, bool]]:
    """Token ids of each (text, starts_document) piece; a document's first piece gets eot in front."""
    return [(np.array([_enc.eot_token] * new_doc + _enc.encode_ordinary(text), dtype=_dtype), new_doc)
            for text, new_doc in batch]

def tokenize_documents(enc, pieces, dtype="uint16", num_proc=1, batch_chars=1_000_000):
    """Yield (ids, starts_document) for each piece, in order, tokenized in num_proc processes. At most 2 *
    num_proc tasks are in flight (Pool.imap reads all its input ahead), so memory stays flat."""
    def batches():  # the tasks: consecutive pieces of about batch_chars characters in all
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
    with multiprocessing.Pool(num_proc, init_worker, (enc, dtype, True)) as pool:
        pending = collections.deque()
        for batch in batches():
            pending.append(pool.apply_async(encode_batch, (batch,)))
            if len(pending) >= 2 * num_proc:
                yield from pending.popleft().get()
        while pending:
            yield from pending.popleft().get()

# --- Shards ---------------------------------------------------------------------------------------
class ShardWriter:
    """Appends one split's tokens to <split>_0000.bin, <split>_0001.bin, ... of at most shard_tokens tokens
    each; shards lists them as meta.json does, {"file", "tokens"}, and documents counts those started."""
    def __init__(self, folder: Path, split: str, dtype: str, shard_tokens: int, suffix: str = ".bin"):
        self.folder, self.split, self.shard_tokens, self.shards, self.documents, self.file = \
            folder, split, shard_tokens, [], 0, None
        self.suffix = suffix
        self.dtype = np.dtype(dtype).newbyteorder("<")  # little-endian on any machine

    def write(self, ids: np.ndarray, documents: int = 0):
        """Append ids, which start `documents` new documents."""
        self.documents += documents
        ids = ids.astype(self.dtype, copy=False)
        while len(ids):
            if not self.shards or self.shards[-1]["tokens"] == self.shard_tokens:
                self.close()
                self.shards.append({"file": f"{self.split}_{len(self.shards):04d}{self.suffix}", "tokens": 0})
                self.file = open(self.folder / self.shards[-1]["file"], "wb")
            n = min(len(ids), self.shard_tokens - self.shards[-1]["tokens"])
            self.file.write(ids[:n])
            self.shards[-1]["tokens"] += n
            ids = ids[n:]

    def close(self):
        if self.file:
            self.file.flush()
            os.fsync(self.file.fileno())  # on disk before a meta.json names it, even if the power fails
            self.file.close()
        self.file = None

    def tokens(self) -> int:
        return sum(shard["tokens"] for shard in self.shards)

def move_tail(train: ShardWriter, val: ShardWriter, n: int, eot: int):
    """Move the last n tokens of train to val, in order, through a memory map of each shard concerned."""
    train.close()
    keep = train.tokens() - n  # tokens that stay in train
    for shard in train.shards:
        path, stay = train.folder / shard["file"], min(max(keep, 0), shard["tokens"])
        keep -= shard["tokens"]
        if stay < shard["tokens"]:
            ids = np.memmap(path, dtype=train.dtype, mode="r")[stay:]
            val.write(ids, int(np.count_nonzero(ids == eot)))  # eot starts each document
            del ids  # the map goes before its file shrinks
            if stay:
                os.truncate(path, stay * train.dtype.itemsize)
            else:
                os.remove(path)
            shard["tokens"] = stay
    train.shards = [shard for shard in train.shards if shard["tokens"]]
    train.documents -= val.documents

# --- The run --------------------------------------------------------------------------------------
DATASET_FILE = re.compile(r"((train|val)_(\d+\.(bin|mask)|pairs\.bin)|meta\.json|tokenizer\.tiktoken)(\.tmp)?")  # .tmp: older runs'

def open_output(out: Path, settings: dict, force: bool) -> tuple[Path, Path]:
    """Lock out; check that it may be replaced -> (out with symlinks resolved, a new empty folder beside it)."""
    final = common.own_folder(out, "--out")  # resolved: a symlinked data folder is replaced where it lives
    common.lock(final, "--out")
    names = sorted(p.name for p in final.iterdir()) if final.exists() else []
    strangers = [name for name in names if not DATASET_FILE.fullmatch(name)]
    if strangers:
        die(f"{out} holds {strangers[0]}, which prepare.py does not write; move it away or choose another --out")
    try:
        old = json.loads((final / "meta.json").read_text())["config"] if names else settings
    except (OSError, ValueError, KeyError, TypeError):
        old = None  # shards without a readable meta.json: some other dataset
    if old != settings and not force:
        die(f"{out} already holds a different dataset; pass --force to replace it, or choose another --out")
    partial = final.with_name(f".{final.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)  # what a killed run left
    partial.mkdir()
    return final, partial

def choose_tokenizer(cfg: PrepareConfig):
    """(spec, ranks text or None, tiktoken encoding or None, vocab size) of the tokenizer: a BPE to train
    (no encoding yet: trained once the input is known to be fine), another dataset's, a Hugging Face
    folder's or a tiktoken encoding; --chat adds chat.py's two special tokens to it."""
    ranks = None  # the ranks file's text of another dataset's BPE
    if cfg.vocab_size:
        spec = dict(kind="bpe", name=f"bpe{cfg.vocab_size}", ranks_file="tokenizer.tiktoken", pat_str=GPT2_PAT,
                    special_tokens={EOT: cfg.vocab_size})
    elif os.path.isdir(cfg.tokenizer):
        spec, ranks = reused_tokenizer(cfg.tokenizer)
    elif cfg.tokenizer.startswith("hf:"):  # a Hugging Face folder's tokenizer.json, as tiktoken ranks
        from hf import tokenizer_from_hf  # (imports torch, which the other paths do without)
        spec = tokenizer_from_hf(cfg.tokenizer[3:])
        ranks = spec.pop("ranks")
    else:
        spec = dict(kind="tiktoken", name=cfg.tokenizer)
    try:
        enc = None if cfg.vocab_size else tokenizer.load_tokenizer({**spec, "ranks": ranks} if ranks else spec)
    except Exception as e:  # an unknown name, or no internet and no cache
        die(f"cannot load tiktoken encoding {cfg.tokenizer!r}: {one_line(e)}; try r50k_base, or --vocab-size N")
    vocab_size = enc.n_vocab if enc else cfg.vocab_size + 1
    if cfg.chat and chat.TURN_START not in spec.get("special_tokens", {}):
        spec["special_tokens"] = {**spec.get("special_tokens", {}), **chat.chat_tokens(vocab_size)}
        vocab_size += 2
        enc = enc and tokenizer.load_tokenizer({**spec, "ranks": ranks} if ranks else spec)
    return spec, ranks, enc, vocab_size

def prepare(cfg: PrepareConfig, command: str) -> dict:
    """Write the dataset that cfg describes; its meta.json."""
    source = cfg.dataset or " ".join(cfg.input)  # (subset, split, field and separator are in settings)
    spec, ranks, enc, vocab_size = choose_tokenizer(cfg)
    name = cfg.dataset.split("/")[-1] if cfg.dataset else Path(cfg.input[0]).stem
    out = Path(cfg.out or f"data/{name}-{spec['name']}")
    # the settings that decide the tokens: a dataset made with the same ones may be redone without --force
    skip = ("preset", "out", "num_proc", "chunk_chars", "force", "streaming")
    settings = {k: v for k, v in asdict(cfg).items() if k not in skip} | {"tokenizer": spec["name"]}
    dtype = cfg.dtype if cfg.dtype != "auto" else "uint16" if vocab_size <= 1 << 16 else "uint32"
    if vocab_size > 1 << (8 * np.dtype(dtype).itemsize):
        die(f"a vocabulary of {vocab_size} ids is too large for {dtype}; use --dtype auto or uint32")

    final, partial = open_output(out, settings, cfg.force)
    stats = collections.Counter()
    try:
        files = find_files(cfg.input) if cfg.input else []
        if ranks:  # the other dataset's BPE, copied: a dataset folder holds its own tokenizer
            with common.atomic_write(partial / "tokenizer.tiktoken", "w") as f:
                f.write(ranks)
            spec["ranks_file"] = "tokenizer.tiktoken"
        if cfg.vocab_size:
            spec, enc, vocab_size = train_tokenizer(cfg, files, spec, partial)
            dtype = cfg.dtype if cfg.dtype != "auto" else "uint16" if vocab_size <= 1 << 16 else "uint32"
        write = write_pairs if cfg.preferences else write_splits
        train, val, masks, val_split = write(cfg, enc, files, partial, dtype, stats, source)
        meta = {
            "format": "llama-shards-v1", "tokenizer": spec,
            "tokenizer_fingerprint": tokenizer.tokenizer_fingerprint(enc), "vocab_size": vocab_size,
            "eot_id": enc.eot_token, "dtype": dtype, "eot_position": "before each document",
            "shards": {"train": train.shards, "val": val.shards},
            "documents": {"train": train.documents, "val": val.documents},
            "tokens": {"train": train.tokens(), "val": val.tokens()},
            **({"loss_mask": {split: masks[split].shards for split in ("train", "val")},
                "chat_template": "chatml"} if cfg.chat else {}),
            **({"pairs": {split: {"file": f"{split}_pairs.bin", "pairs": masks[split].pairs}
                          for split in ("train", "val")}} if cfg.preferences else {}),
            "val_split": val_split, "source": source, "files": len(files), "command": command,
            **{key: stats[key] for key in ("replaced_bytes", "rows_without_text", "rows_with_empty_text")},
            "config": settings,
        }
        with common.atomic_write(partial / "meta.json", "w") as f:  # last: a folder with meta.json is complete
            f.write(json.dumps(meta, indent=2) + "\n")
        common.swap_in(partial, final)
    except OSError as e:  # a full disk, a failing drive, an unreadable input: the new dataset is dropped
        die(f"{e.filename or 'writing ' + str(out)}: {e.strerror or one_line(e)}; {out} is as it was before")
    finally:
        shutil.rmtree(partial, ignore_errors=True)  # a failed run's (after swap_in there is none)
        common.end_progress()
    print_notes(cfg, stats)
    read = f" from {len(files):,} file(s)" if files else ""
    print(f"{out}: train {train.tokens():,} tokens in {len(train.shards)} shard(s), val {val.tokens():,} tokens; "
          f"{train.documents:,} + {val.documents:,} document(s){read}; val = {val_split}")
    return meta

def train_tokenizer(cfg: PrepareConfig, files: list[str], spec: dict, folder: Path):
    """Train the BPE on the start of the corpus and write its ranks into folder -> (spec, encoding,
    vocab size). A corpus with fewer distinct merges than asked gives a smaller BPE: end-of-text
    then comes right after its last token, and a note says so (no ids that stand for nothing)."""
    t0 = time.time()
    tokens = tokenizer.train_bpe(bpe_sample(cfg, files), cfg.vocab_size)
    with common.atomic_write(folder / "tokenizer.tiktoken", "w") as f:
        f.write(tokenizer.ranks_text(tokens))
    print(f"trained a BPE of {len(tokens)} tokens (+ eot) in {time.time() - t0:.1f}s", file=sys.stderr)
    if len(tokens) < cfg.vocab_size:
        print(f"note: the corpus holds only {len(tokens) - 256:,} merges, so the BPE has {len(tokens):,} tokens, "
              f"not --vocab-size {cfg.vocab_size:,}; end-of-text is id {len(tokens)}", file=sys.stderr)
    spec = {**spec, "name": f"bpe{len(tokens)}", "special_tokens": {EOT: len(tokens)}}
    if cfg.chat:
        spec["special_tokens"] |= chat.chat_tokens(len(tokens) + 1)
    enc = tokenizer.load_tokenizer(spec, folder)
    return spec, enc, enc.n_vocab

def write_splits(cfg: PrepareConfig, enc, files: list[str], folder: Path, dtype: str, stats: dict, source: str):
    """Tokenize the corpus into folder's train and val shards (and loss masks), holding out every k-th
    document for val -> (train, val, {split: masks}, how val was chosen)."""
    k = round(1 / cfg.val_fraction) if cfg.val_fraction else 0
    train, val = (ShardWriter(folder, split, dtype, cfg.shard_tokens) for split in ("train", "val"))
    masks = {split: ShardWriter(folder, split, "uint8", cfg.shard_tokens, ".mask") for split in ("train", "val")}
    docs, ntok, writer = 0, 0, train
    t0 = shown = time.time()  # shown: when the progress line was last printed
    # (ids, starts_document, loss mask or None); conversations are few and short: tokenized right here
    tokenized = (((np.array(ids, dtype), True, np.array(mask, np.uint8)) for ids, mask in
                  (chat.render(enc, messages) for messages in conversations(cfg, files, stats))) if cfg.chat else
                 ((ids, new_doc, None) for ids, new_doc in tokenize_documents(
                     enc, read_pieces(cfg, files, stats), dtype, cfg.num_proc, cfg.chunk_chars)))
    for ids, new_doc, mask in tokenized:
        if new_doc:
            writer = val if k and docs % k == k - 1 else train
            docs += 1
        writer.write(ids, int(new_doc))
        if mask is not None:  # 1 = a target to learn, the token at the same place in the .bin
            masks[writer.split].write(mask)
        ntok += len(ids)
        if time.time() - shown > 0.5:
            shown = time.time()
            common.progress(f"{docs:,} documents | {ntok:,} tokens | {ntok / (shown - t0):,.0f} tokens/s")
    if ntok == 0:
        die(f"the corpus is empty: no text in {source}; check --input, --dataset, --text-field")
    if k and docs < k and cfg.chat:
        die(f"{docs} conversation(s) are too few to hold every {k}th out for val; give more, or a "
            "larger --val-fraction")
    if k and docs < k:  # too few documents to hold any out: val is the token stream's tail
        n_val = max(1, round(cfg.val_fraction * ntok))
        move_tail(train, val, n_val, enc.eot_token)
        val_split = f"the last {n_val} tokens of the token stream: {docs} document(s) are too few to hold any out"
    else:
        val_split = f"documents i with i % {k} == {k - 1}, counting from 0" if k else "none"
    for shards in (train, val, *masks.values()):
        shards.close()
    return train, val, masks, val_split

def write_pairs(cfg: PrepareConfig, enc, files: list[str], folder: Path, dtype: str, stats: dict, source: str):
    """--preferences: each pair's chosen and then rejected conversation into one split's shard (every
    k-th pair to val), their masks on the two replies, and <split>_pairs.bin: (start, chosen tokens,
    rejected tokens) per pair, int64 -> as write_splits (masks[split].pairs: the split's pair count)."""
    k = round(1 / cfg.val_fraction) if cfg.val_fraction else 0
    shards = {split: ShardWriter(folder, split, dtype, cfg.shard_tokens) for split in ("train", "val")}
    masks = {split: ShardWriter(folder, split, "uint8", cfg.shard_tokens, ".mask") for split in ("train", "val")}
    index = {"train": [], "val": []}
    for n, (chosen, rejected) in enumerate(chat.preference(row, where) for where, row in chat_rows(cfg, files, stats)):
        split = "val" if k and n % k == k - 1 else "train"
        (a, mask_a), (b, mask_b) = chat.render_reply(enc, chosen), chat.render_reply(enc, rejected)
        index[split].append((shards[split].tokens(), len(a), len(b)))
        shards[split].write(np.array(a + b, dtype), documents=2)
        masks[split].write(np.array(mask_a + mask_b, np.uint8))
    if not index["train"] or (k and not index["val"]):
        die(f"{len(index['train']) + len(index['val'])} preference pair(s) in {source} are too few for a train and a "
            "val split; give more, or a larger --val-fraction")
    for split in ("train", "val"):
        if len(shards[split].shards) > 1:  # a pair must not straddle two shards
            die(f"the {split} pairs hold more than --shard-tokens {cfg.shard_tokens:,} tokens; raise it")
        shards[split].close()
        masks[split].close()
        np.array(index[split], dtype="<i8").reshape(-1, 3).tofile(folder / f"{split}_pairs.bin")
        masks[split].pairs = len(index[split])
    return shards["train"], shards["val"], masks, f"pairs i with i % {k} == {k - 1}, counting from 0" if k else "none"

def print_notes(cfg: PrepareConfig, stats: dict):
    """What was replaced or skipped on the way, so that nothing is lost without a word."""
    if stats["unanswered_speeches"]:
        print(f"note: left out {stats['unanswered_speeches']} last speech(es) of a play: no speech answers them",
              file=sys.stderr)
    if stats["replaced_bytes"]:
        print(f"note: replaced {stats['replaced_bytes']:,} invalid UTF-8 bytes with U+FFFD", file=sys.stderr)
    if stats["rows_without_text"] or stats["rows_with_empty_text"]:
        print(f"note: skipped {stats['rows_without_text']:,} rows without the field {cfg.text_field!r} and "
              f"{stats['rows_with_empty_text']:,} rows whose text is empty or null", file=sys.stderr)

def main(argv):
    prepare(parse_settings(argv), shlex.join(["python", "prepare.py", *argv]))

if __name__ == "__main__":
    common.run_main(main)
