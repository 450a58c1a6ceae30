"""Tests for prepare.py, offline: python -m pytest -q test_prepare.py (data from ../shared)."""

import base64
import collections
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent
SHARED = REPO.parent / "shared"
os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED / "tiktoken_cache"))
SHAKESPEARE = SHARED / "data" / "tinyshakespeare.txt"

import prepare  # noqa: E402  (after TIKTOKEN_CACHE_DIR is set)
import tiktoken  # noqa: E402


def run(tmp_path, *args, expect=0):
    """Run prepare.py as a user would, from tmp_path (so data/ is there); datasets stays offline."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_CACHE=str(tmp_path / "hf_cache"))
    result = subprocess.run([sys.executable, REPO / "prepare.py", *map(str, args)], cwd=tmp_path,
                            capture_output=True, text=True, env=env)
    assert result.returncode == expect, result.stderr
    return result


def load(out):
    """meta.json and each split's tokens, checking that meta agrees with the files."""
    meta = json.loads((out / "meta.json").read_text())
    assert meta["format"] == "llama-shards-v1"
    splits = {}
    for split in ("train", "val"):
        parts = []
        for shard in meta["shards"][split]:
            ids = np.memmap(out / shard["file"], dtype=meta["dtype"], mode="r")
            assert len(ids) == shard["tokens"] > 0
            parts.append(np.array(ids))
        splits[split] = np.concatenate(parts) if parts else np.zeros(0, meta["dtype"])
        assert meta["tokens"][split] == len(splits[split])
        assert meta["documents"][split] == np.count_nonzero(splits[split] == meta["eot_id"])
        assert all(shard["tokens"] <= meta["config"]["shard_tokens"] for shard in meta["shards"][split])
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted([s["file"] for sp in ("train", "val") for s in meta["shards"][sp]] + ["meta.json"]
                           + (["tokenizer.tiktoken"] if meta["tokenizer"]["kind"] == "bpe" else []))
    return meta, splits


def documents(tokens, eot):
    """Split a token stream at its eot tokens (each document starts with one)."""
    starts = np.flatnonzero(tokens == eot)
    return [tokens[a + 1:b].tolist() for a, b in zip(starts, [*starts[1:], len(tokens)])]


# ----------------------------------------------------------------------------------------------------------
# Tiny Shakespeare with the GPT-2 tokenizer

def test_shakespeare_round_trip(tmp_path):
    out = tmp_path / "out"
    run(tmp_path, "--input", SHAKESPEARE, "--out", out, "--shard-tokens", 100_000, "--val-fraction", 0.1,
        "--chunk-chars", 100_000, "--num-proc", 1)
    meta, splits = load(out)
    enc = tiktoken.get_encoding("r50k_base")
    assert meta["tokenizer"] == {"kind": "tiktoken", "name": "r50k_base"}
    assert (meta["vocab_size"], meta["eot_id"], meta["dtype"]) == (50257, 50256, "uint16")
    stream = np.concatenate([splits["train"], splits["val"]])  # one document: val is the stream's tail
    assert len(stream) == 338_025 + 1 and stream[0] == 50256  # tiktoken's own count, plus one eot
    assert enc.decode(stream[1:].tolist()) == SHAKESPEARE.read_text()
    assert meta["tokens"]["val"] == round(0.1 * len(stream))
    assert [s["tokens"] for s in meta["shards"]["train"]] == [100_000] * 3 + [len(stream) - 100_000 * 3 - 33_803]
    assert meta["documents"] == {"train": 1, "val": 0}
    assert meta["replaced_bytes"] == 0 and "--val-fraction 0.1" in meta["command"]


def test_num_proc_gives_the_same_bytes(tmp_path):
    # paragraphs of Shakespeare as ~7k documents, so val holds documents out and batches span many of them
    outs = [tmp_path / f"np{n}" for n in (1, 2)]
    for n, out in zip((1, 2), outs):
        run(tmp_path, "--input", SHAKESPEARE, "--separator", r"\n\n", "--out", out, "--num-proc", n,
            "--shard-tokens", 50_000, "--chunk-chars", 20_000)
    files = sorted(p.name for p in outs[0].glob("*.bin"))
    assert len(files) > 6 and files == sorted(p.name for p in outs[1].glob("*.bin"))
    for name in files:
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes()
    meta, splits = load(outs[0])
    paragraphs = [p.strip() for p in SHAKESPEARE.read_text().split("\n\n") if p.strip()]
    enc = tiktoken.get_encoding("r50k_base")
    assert meta["documents"]["val"] == len(paragraphs) // 100  # every 100th (val_fraction 0.01)
    assert [enc.decode(d) for d in documents(splits["val"], enc.eot_token)] == paragraphs[99::100]


# ----------------------------------------------------------------------------------------------------------
# Cutting long documents: the pieces must tokenize exactly like the whole

def adversarial_text(rng, n):
    # runs of the characters the split regex cares about: whitespace of all kinds, letters, digits,
    # punctuation, contractions, non-ASCII letters and emoji, and characters Python and Rust disagree on
    atoms = [" ", "  ", "\n", "\n\n", "\t", "\r\n", "\u00a0", "\u2028", "\x1c", "a", "Zz", "é", "ß", "7", "42",
             ".", "?!", "'s", "'", "'ll", "😀", "中文", "-", "_", "\u0301"]
    return "".join(rng.choice(atoms) for _ in range(n))


def test_safe_cuts_tokenize_like_the_whole():
    enc = tiktoken.get_encoding("r50k_base")
    text = SHAKESPEARE.read_text()[:200_000]
    for chunk in (50, 1000, 30_000):
        pieces = list(prepare.split_document(text, chunk))
        assert "".join(p for p, _ in pieces) == text and len(pieces) > 5
        assert [first for _, first in pieces] == [True] + [False] * (len(pieces) - 1)
        assert sum((enc.encode_ordinary(p) for p, _ in pieces), []) == enc.encode_ordinary(text)
    rng = random.Random(0)
    for _ in range(500):
        text = adversarial_text(rng, 60)
        cuts = [m.start() for m in prepare.SAFE_CUT.finditer(text)]
        for cut in cuts:
            assert enc.encode_ordinary(text[:cut]) + enc.encode_ordinary(text[cut:]) == enc.encode_ordinary(text)
    # and cuts the rule excludes do change the tokens: after a newline that follows whitespace, between two
    # newlines, after a space instead of before it, inside a word
    for text, cut in [("a\n\nb", 3), ("a\n\n b", 2), ("aa ab", 3), ("aaaab", 2)]:
        assert not prepare.SAFE_CUT.match(text, cut)
        assert enc.encode_ordinary(text[:cut]) + enc.encode_ordinary(text[cut:]) != enc.encode_ordinary(text)


def test_read_txt_streams_blocks(tmp_path):
    stories = ["Once upon a time.\nThe end.", "Short.", "Bad byte: \ufffd here.\nAnd a second line here."]
    raw = b"\n<|endoftext|>\n".join(s.encode().replace("\ufffd".encode(), b"\xff") for s in stories)
    path = tmp_path / "stories.txt"
    path.write_bytes(b"\n\n" + raw + b"\n<|endoftext|>\n\n")  # blank edges and an empty last document
    for chunk in (3, 7, 16, 1000):  # tiny blocks: separators and pieces straddle block boundaries
        stats = {"replaced_bytes": 0}
        pieces = list(prepare.read_txt(path, "<|endoftext|>", chunk, stats))
        docs = []
        for text, new_doc in pieces:
            docs.append(text) if new_doc else docs.__setitem__(-1, docs[-1] + text)
        assert docs == stories and stats["replaced_bytes"] == 1
    text = SHAKESPEARE.read_text()  # without a separator the file is one document, kept byte for byte
    pieces = list(prepare.read_txt(SHAKESPEARE, None, 10_000, {"replaced_bytes": 0}))
    assert "".join(p for p, _ in pieces) == text and max(len(p) for p, _ in pieces) <= 20_000
    assert [first for _, first in pieces] == [True] + [False] * (len(pieces) - 1)


# ----------------------------------------------------------------------------------------------------------
# BPE training

def naive_bpe(text, vocab_size):
    """Reference: recount every pair of every pre-token before each merge."""
    import regex
    words = [list(w.encode()) for w in regex.findall(prepare.GPT2_PAT, text)]
    tokens = [bytes([b]) for b in range(256)]
    while len(tokens) < vocab_size:
        counts = collections.Counter(pair for w in words for pair in zip(w, w[1:]))
        if not counts:
            break
        best = min(counts, key=lambda pair: (-counts[pair], pair))  # most frequent, then smallest ids
        new = len(tokens)
        tokens.append(tokens[best[0]] + tokens[best[1]])
        merged = []
        for w in words:
            out = []
            for t in w:
                if out and out[-1] == best[0] and t == best[1]:
                    out[-1] = new
                else:
                    out.append(t)
            merged.append(out)
        words = merged
    return tokens


def test_bpe_matches_naive_reference():
    rng = random.Random(1)
    # few letters, many equal counts: ties everywhere, and runs like "aaaa" where pairs overlap
    tie_text = " ".join("".join(rng.choice("aab") for _ in range(rng.randint(1, 6))) for _ in range(300))
    tie_text += " ab ba cd dc ef fe " * 3 + "ééé 😀😀 12 12"
    for text, vocab_size in [(tie_text, 400), (SHAKESPEARE.read_text()[:20_000], 500)]:
        ours = prepare.train_bpe([text], vocab_size)
        assert ours == naive_bpe(text, vocab_size)
        assert len(set(ours)) == len(ours)  # every token's bytes are new, as tiktoken's ranks need


def test_bpe_round_trips_anything():
    tokens = prepare.train_bpe([SHAKESPEARE.read_text()[:50_000] + " naïve café 😀 中文"], 600)
    ranks = "".join(f"{base64.b64encode(t).decode()} {i}\n" for i, t in enumerate(tokens))  # tiktoken's format
    spec = dict(kind="bpe", name="bpe600", ranks=ranks, pat_str=prepare.GPT2_PAT, special_tokens={"<|endoftext|>": 600})
    byte_spec = dict(spec, name="bpe256", ranks="".join(ranks.splitlines(True)[:256]),
                     special_tokens={"<|endoftext|>": 256})
    rng = random.Random(2)
    samples = ["", "ROMEO: What light", "emoji 😀👍🏽 family 👨‍👩‍👧", "中文 日本語 한국어 العربية",
               "e\u0301 \u00a0 \t\r\n x",
               "lone \ud800 surrogate", "".join(chr(rng.randrange(1, 0x3000)) for _ in range(500))]
    for s in [*samples, adversarial_text(rng, 300)]:
        for enc in (prepare.load_tokenizer(spec), prepare.load_tokenizer(byte_spec)):
            expected = s.replace("\ud800", "\ufffd")  # a lone surrogate is no UTF-8: tiktoken replaces it
            assert enc.decode(enc.encode_ordinary(s)) == expected
    byte_level = prepare.load_tokenizer(byte_spec)
    assert byte_level.encode_ordinary("héllo 😀") == list("héllo 😀".encode())  # 256: no merges at all
    junk = bytes(rng.randrange(256) for _ in range(1000)) + b"\xff\xfe\xc3"  # not UTF-8
    for enc in (prepare.load_tokenizer(spec), byte_level):
        assert enc.decode_bytes(enc._encode_bytes(junk)) == junk


def test_bpe_cli_and_load_tokenizer(tmp_path):
    corpus = tmp_path / "small.txt"
    corpus.write_text(SHAKESPEARE.read_text()[:100_000])
    out = tmp_path / "out"
    run(tmp_path, "--input", corpus, "--out", out, "--vocab-size", 300, "--num-proc", 1)
    meta, splits = load(out)
    spec = meta["tokenizer"]
    assert spec["kind"] == "bpe" and spec["name"] == "bpe300" and spec["ranks_file"] == "tokenizer.tiktoken"
    assert spec["special_tokens"] == {"<|endoftext|>": 300} and (meta["vocab_size"], meta["eot_id"]) == (301, 300)
    enc = prepare.load_tokenizer(spec, str(out))
    from tiktoken.load import load_tiktoken_bpe  # tiktoken's own reader agrees on the file
    assert load_tiktoken_bpe(str(out / "tokenizer.tiktoken")) == enc._mergeable_ranks and enc.n_vocab == 301
    inline = prepare.tokenizer_spec_inline(meta, str(out))
    assert "ranks_file" not in inline
    assert prepare.load_tokenizer(inline).encode_ordinary("To be") == enc.encode_ordinary("To be")
    assert prepare.tokenizer_spec_inline({"tokenizer": {"kind": "tiktoken", "name": "r50k_base"}}, str(out)) == \
        {"kind": "tiktoken", "name": "r50k_base"}
    stream = np.concatenate([splits["train"], splits["val"]])
    assert stream[0] == 300 and enc.decode(stream[1:].tolist()) == corpus.read_text()


# ----------------------------------------------------------------------------------------------------------
# Other sources: jsonl, parquet, folders

ROWS = [f"Document {i}: " + ("naïve text 😀 " * (i % 5)) + "end." for i in range(30)]


def test_jsonl_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    rows = ROWS + [None, ""]  # missing and empty texts are no documents
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"id": i, "body": t}) + "\n" for i, t in enumerate(rows)))
    pq.write_table(pa.table({"id": list(range(len(rows))), "body": rows}), tmp_path / "docs.parquet")
    enc = tiktoken.get_encoding("r50k_base")
    for name in ("docs.jsonl", "docs.parquet"):
        run(tmp_path, "--input", tmp_path / name, "--text-field", "body", "--val-fraction", 0.1,
            "--out", tmp_path / name.replace(".", "_"))
    meta, splits = load(tmp_path / "docs_jsonl")
    assert meta["documents"] == {"train": 27, "val": 3}  # documents 9, 19 and 29 are held out
    assert [enc.decode(d) for d in documents(splits["val"], enc.eot_token)] == ROWS[9::10]
    assert [enc.decode(d) for d in documents(splits["train"], enc.eot_token)] == \
        [r for i, r in enumerate(ROWS) if i % 10 != 9]
    # --dataset takes what load_dataset takes: a hub name, or (offline) a folder of data files
    (tmp_path / "dataset").mkdir()
    (tmp_path / "docs.jsonl").rename(tmp_path / "dataset" / "train.jsonl")
    for streaming in ([], ["--streaming"]):
        run(tmp_path, "--dataset", tmp_path / "dataset", "--text-field", "body", "--val-fraction", 0.1,
            "--out", tmp_path / f"dataset{len(streaming)}", *streaming)
    for out in ("docs_parquet", "dataset0", "dataset1"):
        for split in ("train_0000.bin", "val_0000.bin"):
            assert (tmp_path / out / split).read_bytes() == (tmp_path / "docs_jsonl" / split).read_bytes()


def test_folder_of_files(tmp_path):
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    texts = {"b.txt": "Second file.\n", "a.txt": "First file,\n\nwith two paragraphs.", "sub/c.txt": "Third. 😀"}
    for name, text in texts.items():
        (folder / name).write_text(text)
    (folder / "notes.md").write_text("not a corpus file")
    (folder / "d.jsonl").write_text(json.dumps({"text": "From jsonl."}) + "\n")
    enc = tiktoken.get_encoding("r50k_base")
    run(tmp_path, "--input", folder, "--out", tmp_path / "out", "--val-fraction", 0)
    meta, splits = load(tmp_path / "out")
    docs = [enc.decode(d) for d in documents(splits["train"], enc.eot_token)]
    # files in sorted order (text files one after another, then jsonl rows), each file one document
    assert docs == [texts["a.txt"], texts["b.txt"], "From jsonl.", texts["sub/c.txt"]]
    assert meta["tokens"]["val"] == 0 and meta["shards"]["val"] == []
    run(tmp_path, "--input", str(folder / "**" / "*.txt"), "--out", tmp_path / "glob", "--val-fraction", 0)
    _, splits = load(tmp_path / "glob")
    assert [enc.decode(d) for d in documents(splits["train"], enc.eot_token)] == \
        [texts["a.txt"], texts["b.txt"], texts["sub/c.txt"]]


# ----------------------------------------------------------------------------------------------------------
# Errors: one line, exit status 2, no traceback

def test_errors(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text("\n \n<|endoftext|>\n")
    (tmp_path / "rows.jsonl").write_text(json.dumps({"text": "hello"}) + "\n")
    (tmp_path / "a_file").write_text("")
    import pyarrow as pa
    import pyarrow.parquet as pq
    bad = pa.array([b"ok", b"ba\xffd"], type=pa.binary()).cast(pa.string(), safe=False)  # parquet lets it in
    pq.write_table(pa.table({"text": bad}), tmp_path / "bad.parquet")
    ok = ["--input", SHAKESPEARE]
    cases = {
        "matches no files": ["--input", tmp_path / "missing.txt"],
        "corpus is empty": ["--input", tmp_path / "empty.txt"],
        "corpus is empty: ": ["--input", tmp_path / "blank.txt", "--separator", "<|endoftext|>"],
        "cannot load dataset": ["--dataset", "no-such-user/no-such-dataset"],
        "no field 'body'": ["--input", tmp_path / "rows.jsonl", "--text-field", "body"],
        "invalid UTF-8 in field 'text'": ["--input", tmp_path / "bad.parquet"],
        "too large for uint16": [*ok, "--vocab-size", 70_000, "--dtype", "uint16"],
        "cannot write to output folder": [*ok, "--out", tmp_path / "a_file" / "out"],
        "unknown preset": ["--preset", "no-such-preset"],
        "cannot load tiktoken encoding": [*ok, "--tokenizer", "no_such_encoding"],
        "one source": [*ok, "--dataset", "x/y"],
    }
    for message, args in cases.items():
        args = [*args, "--out", tmp_path / "out"] if "--out" not in args else args
        result = run(tmp_path, *args, expect=2)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())  # nothing half-written


def test_an_output_folder_is_not_overwritten_by_another_dataset(tmp_path):
    small = tmp_path / "small.txt"
    small.write_text("To be, or not to be.")
    out = tmp_path / "out"
    run(tmp_path, "--input", small, "--out", out)
    run(tmp_path, "--input", small, "--out", out, "--num-proc", 2)  # same dataset: fine to redo
    result = run(tmp_path, "--input", small, "--out", out, "--val-fraction", 0.2, expect=2)
    assert "already holds a different dataset" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    run(tmp_path, "--input", small, "--out", out, "--val-fraction", 0.2, "--force")
    assert load(out)[0]["config"]["val_fraction"] == 0.2


def test_invalid_utf8_is_replaced_and_counted(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"caf\xc3\xa9 \xff\xfe ok \xc3")  # 2 bad bytes + a truncated character
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "caf\xc3\xa9 \xff\xfe ok"}\n')
    enc = tiktoken.get_encoding("r50k_base")
    cases = [("bad.txt", 3, "café \ufffd\ufffd ok \ufffd"), ("bad.jsonl", 2, "café \ufffd\ufffd ok")]
    for name, replaced, text in cases:
        out = tmp_path / name.replace(".", "_")
        result = run(tmp_path, "--input", tmp_path / name, "--out", out, "--val-fraction", 0)
        assert f"replaced {replaced} invalid UTF-8 bytes" in result.stderr and "Traceback" not in result.stderr
        meta, splits = load(out)
        assert meta["replaced_bytes"] == replaced and enc.decode(splits["train"][1:].tolist()) == text


def test_no_arguments_means_shakespeare(tmp_path):
    result = subprocess.run([sys.executable, REPO / "prepare.py"], cwd=tmp_path, capture_output=True, text=True)
    if result.returncode == 0:  # a machine with internet
        meta, _ = load(tmp_path / "data" / "shakespeare-r50k_base")
        assert meta["tokens"]["train"] + meta["tokens"]["val"] == 338_025 + 1
    else:  # offline: it said what it tried, in one line
        assert result.returncode == 2 and "Traceback" not in result.stderr
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("error: cannot download https://raw.githubusercontent.com/karpathy/char-rnn/")


def test_url_input_is_downloaded_once(tmp_path):
    (tmp_path / "page.txt").write_text("Fetched text.")
    url = (tmp_path / "page.txt").as_uri()  # file://, which urllib fetches like http(s)://
    run(tmp_path, "--input", url, "--val-fraction", 0)
    meta, splits = load(tmp_path / "data" / "page-r50k_base")
    assert tiktoken.get_encoding("r50k_base").decode(splits["train"][1:].tolist()) == "Fetched text."
    (tmp_path / "page.txt").unlink()
    run(tmp_path, "--input", url, "--val-fraction", 0)  # from data/downloads/ this time


def test_import_needs_no_datasets():
    code = "import sys; sys.modules['datasets'] = None; import prepare; print('ok')"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.stdout.strip() == "ok", result.stderr
