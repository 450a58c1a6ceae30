"""
prepare.py: exact round trips through the shards, the val split, the BPE trainer against a naive
reference, every input format and its errors, and an output folder that is always either the old
dataset or the new one (locks, kills, full disks, Ctrl-C).

    python -m pytest -q test_prepare.py
    python -m pytest -q test_prepare.py -m "not slow"   # in-process only
"""
import base64
import collections
import json
import os
import random
import resource
import signal
import subprocess
import sys
import time
from dataclasses import fields

import numpy as np
import pytest
import tiktoken

import common
import tokenizer
import prepare
from conftest import ROOT, SHAKESPEARE, assert_user_error, python

R50K = tiktoken.get_encoding("r50k_base")

pytestmark = pytest.mark.usefixtures("corpus")  # these tests read Tiny Shakespeare

def prepare_cli(tmp_path, *args, expect=0, **kwargs):
    """python prepare.py ARGS from tmp_path (so data/ is there), as a user would; datasets stays offline."""
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "hf_cache")}
    result = python("prepare.py", *args, cwd=tmp_path, env=env, **kwargs)
    assert result.returncode == expect, result.stderr
    return result

def start(tmp_path, *args):
    """prepare.py in the background, in a process group of its own."""
    return subprocess.Popen([sys.executable, ROOT / "prepare.py", *map(str, args)], cwd=tmp_path, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)

def prepare_here(capsys, *args):
    """prepare.py's work in this process (no interpreter to start) -> (meta, stdout, stderr)."""
    meta = prepare.prepare(prepare.parse_settings(list(map(str, args))), "test")
    out, err = capsys.readouterr()
    return meta, out, err

def user_error(capsys, *args):
    """prepare.main(args) in this process must fail with one 'error: ...' line and exit code 2."""
    with pytest.raises(SystemExit) as exit:
        prepare.main(list(map(str, args)))
    err = capsys.readouterr().err
    assert exit.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    return err.strip()

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
    enc = tokenizer.load_tokenizer(meta["tokenizer"], out)
    assert meta["tokenizer_fingerprint"] == tokenizer.tokenizer_fingerprint(enc)  # what train.py checks
    return meta, splits

def documents(tokens, eot):
    """Split a token stream at its eot tokens (each document starts with one)."""
    starts = np.flatnonzero(tokens == eot)
    return [tokens[a + 1:b].tolist() for a, b in zip(starts, [*starts[1:], len(tokens)])]

def leftovers(folder):
    """What a run may never leave behind: partial folders and temporary files."""
    return [p.name for p in folder.rglob("*") if p.name.endswith((".partial", ".tmp"))]

# --- Tiny Shakespeare with the GPT-2 tokenizer ----------------------------------------------------
@pytest.mark.slow
def test_shakespeare_round_trip(tmp_path):
    out = tmp_path / "out"
    prepare_cli(tmp_path, "--input", SHAKESPEARE, "--out", out, "--shard-tokens", 100_000, "--val-fraction", 0.1,
                "--chunk-chars", 100_000, "--num-proc", 1)
    meta, splits = load(out)
    assert meta["tokenizer"] == {"kind": "tiktoken", "name": "r50k_base"}
    assert meta["config"]["tokenizer"] == "r50k_base"
    assert (meta["vocab_size"], meta["eot_id"], meta["dtype"]) == (50257, 50256, "uint16")
    stream = np.concatenate([splits["train"], splits["val"]])  # one document: val is the stream's tail
    assert len(stream) == 338_025 + 1 and stream[0] == 50256  # tiktoken's own count, plus one eot
    assert R50K.decode(stream[1:].tolist()) == SHAKESPEARE.read_text()
    assert meta["tokens"]["val"] == round(0.1 * len(stream))
    assert [s["tokens"] for s in meta["shards"]["train"]] == [100_000] * 3 + [len(stream) - 100_000 * 3 - 33_803]
    assert meta["documents"] == {"train": 1, "val": 0}
    assert meta["replaced_bytes"] == 0 and "--val-fraction 0.1" in meta["command"]

@pytest.mark.slow
def test_num_proc_gives_the_same_bytes(tmp_path):
    # paragraphs of Shakespeare as ~7k documents, so val holds documents out and batches span many of them
    outs = [tmp_path / f"np{n}" for n in (1, 2)]
    for n, out in zip((1, 2), outs):
        prepare_cli(tmp_path, "--input", SHAKESPEARE, "--separator", r"\n\n", "--out", out, "--num-proc", n,
                    "--shard-tokens", 50_000, "--chunk-chars", 20_000)
    files = sorted(p.name for p in outs[0].glob("*.bin"))
    assert len(files) > 6 and files == sorted(p.name for p in outs[1].glob("*.bin"))
    for name in files:
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes()
    meta, splits = load(outs[0])
    paragraphs = [p.strip() for p in SHAKESPEARE.read_text().split("\n\n") if p.strip()]
    assert meta["documents"]["val"] == len(paragraphs) // 100  # every 100th (val_fraction 0.01)
    assert [R50K.decode(d) for d in documents(splits["val"], R50K.eot_token)] == paragraphs[99::100]

@pytest.mark.slow
def test_the_shakespeare_preset_writes_the_data_train_py_reads(tmp_path):
    # the README's offline demo command: the preset's BPE, val split and folder, with a local file
    result = prepare_cli(tmp_path, "--preset", "shakespeare", "--input", SHAKESPEARE, "--num-proc", 1)
    meta, splits = load(tmp_path / "data" / "shakespeare")
    assert meta["tokenizer"]["name"] == meta["config"]["tokenizer"] == "bpe4096"
    assert (meta["vocab_size"], meta["eot_id"]) == (4097, 4096) and "data/shakespeare" in result.stdout
    enc = tokenizer.load_tokenizer(meta["tokenizer"], tmp_path / "data" / "shakespeare")
    stream = np.concatenate([splits["train"], splits["val"]])
    assert enc.decode(stream[1:].tolist()) == SHAKESPEARE.read_text()
    assert meta["tokens"]["val"] == round(0.1 * len(stream))

# --- Cutting long documents: the pieces must tokenize exactly like the whole ----------------------
def adversarial_text(rng, n):
    # runs of the characters the split regex cares about: whitespace of all kinds, letters, digits,
    # punctuation, contractions, non-ASCII letters and emoji, and characters Python and Rust disagree on
    atoms = [" ", "  ", "\n", "\n\n", "\t", "\r\n", "\u00a0", "\u2028", "\x1c", "a", "Zz", "é", "ß", "7", "42",
             ".", "?!", "'s", "'", "'ll", "😀", "中文", "-", "_", "\u0301"]
    return "".join(rng.choice(atoms) for _ in range(n))

def test_safe_cuts_tokenize_like_the_whole():
    text = SHAKESPEARE.read_text()[:200_000]
    for chunk in (50, 1000, 30_000):
        pieces = list(prepare.split_document(text, chunk))
        assert "".join(p for p, _ in pieces) == text and len(pieces) > 5
        assert [first for _, first in pieces] == [True] + [False] * (len(pieces) - 1)
        assert sum((R50K.encode_ordinary(p) for p, _ in pieces), []) == R50K.encode_ordinary(text)
    rng = random.Random(0)
    for _ in range(500):
        text = adversarial_text(rng, 60)
        cuts = [m.start() for m in prepare.SAFE_CUT.finditer(text)]
        for cut in cuts:
            assert R50K.encode_ordinary(text[:cut]) + R50K.encode_ordinary(text[cut:]) == R50K.encode_ordinary(text)
    # and cuts the rule excludes do change the tokens: after a newline that follows whitespace, between two
    # newlines, after a space instead of before it, inside a word
    for text, cut in [("a\n\nb", 3), ("a\n\n b", 2), ("aa ab", 3), ("aaaab", 2)]:
        assert not prepare.SAFE_CUT.match(text, cut)
        assert R50K.encode_ordinary(text[:cut]) + R50K.encode_ordinary(text[cut:]) != R50K.encode_ordinary(text)

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
    crlf = tmp_path / "crlf.txt"  # read as stored: no newline translation
    crlf.write_bytes(b"one\r\ntwo\rthree\n")
    assert list(prepare.read_txt(crlf, None, 4, {"replaced_bytes": 0})) == [("one\r\ntwo\rthree\n", True)]

# --- BPE training ---------------------------------------------------------------------------------
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
        ours = tokenizer.train_bpe([text], vocab_size)
        assert ours == naive_bpe(text, vocab_size)
        assert len(set(ours)) == len(ours)  # every token's bytes are new, as tiktoken's ranks need

def test_bpe_round_trips_anything():
    tokens = tokenizer.train_bpe([SHAKESPEARE.read_text()[:50_000] + " naïve café 😀 中文"], 600)
    ranks = "".join(f"{base64.b64encode(t).decode()} {i}\n" for i, t in enumerate(tokens))  # tiktoken's format
    spec = dict(kind="bpe", name="bpe600", ranks=ranks, pat_str=prepare.GPT2_PAT, special_tokens={"<|endoftext|>": 600})
    byte_spec = dict(spec, name="bpe256", ranks="".join(ranks.splitlines(True)[:256]),
                     special_tokens={"<|endoftext|>": 256})
    rng = random.Random(2)
    samples = ["", "ROMEO: What light", "emoji 😀👍🏽 family 👨‍👩‍👧", "中文 日本語 한국어 العربية",
               "e\u0301 \u00a0 \t\r\n x",
               "lone \ud800 surrogate", "".join(chr(rng.randrange(1, 0x3000)) for _ in range(500))]
    for s in [*samples, adversarial_text(rng, 300)]:
        for enc in (tokenizer.load_tokenizer(spec), tokenizer.load_tokenizer(byte_spec)):
            expected = s.replace("\ud800", "\ufffd")  # a lone surrogate is no UTF-8: tiktoken replaces it
            assert enc.decode(enc.encode_ordinary(s)) == expected
    byte_level = tokenizer.load_tokenizer(byte_spec)
    assert byte_level.encode_ordinary("héllo 😀") == list("héllo 😀".encode())  # 256: no merges at all
    junk = bytes(rng.randrange(256) for _ in range(1000)) + b"\xff\xfe\xc3"  # not UTF-8
    for enc in (tokenizer.load_tokenizer(spec), byte_level):
        assert enc.decode_bytes(enc._encode_bytes(junk)) == junk

def test_bpe_time_is_bounded_on_text_without_whitespace():
    # one 300k-letter "word": every merge used to rewrite all of it (about a minute here, 35x the cost of
    # normal text per merge); pieces longer than MAX_WORD_BYTES are now counted in chunks
    rng = random.Random(3)
    text = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(300_000))
    t0 = time.time()
    tokens = tokenizer.train_bpe([text], 512)
    assert time.time() - t0 < 15 and len(tokens) == len(set(tokens)) == 512
    enc = tokenizer.load_tokenizer(dict(kind="bpe", name="bpe512", ranks=tokenizer.ranks_text(tokens),
                                     pat_str=prepare.GPT2_PAT, special_tokens={"<|endoftext|>": 512}))
    ids = enc.encode_ordinary(text)
    assert enc.decode(ids) == text and len(ids) < 0.8 * len(text)  # and the merges it learned do compress

@pytest.mark.slow
def test_bpe_cli_and_meta_record_the_trained_tokenizer(tmp_path):
    corpus = tmp_path / "small.txt"
    corpus.write_text(SHAKESPEARE.read_text()[:100_000])
    out = tmp_path / "out"
    prepare_cli(tmp_path, "--input", corpus, "--out", out, "--vocab-size", 300, "--num-proc", 1)
    meta, splits = load(out)
    spec = meta["tokenizer"]
    assert spec["kind"] == "bpe" and spec["name"] == "bpe300" and spec["ranks_file"] == "tokenizer.tiktoken"
    assert spec["special_tokens"] == {"<|endoftext|>": 300} and (meta["vocab_size"], meta["eot_id"]) == (301, 300)
    assert meta["config"]["tokenizer"] == "bpe300" and meta["config"]["vocab_size"] == 300  # not r50k_base
    enc = tokenizer.load_tokenizer(spec, out)
    assert meta["tokenizer_fingerprint"] == tokenizer.tokenizer_fingerprint(enc) != tokenizer.tokenizer_fingerprint(R50K)
    from tiktoken.load import load_tiktoken_bpe  # tiktoken's own reader agrees on the file
    assert load_tiktoken_bpe(str(out / "tokenizer.tiktoken")) == enc._mergeable_ranks and enc.n_vocab == 301
    inline = {k: v for k, v in spec.items() if k != "ranks_file"}  # as checkpoints carry it
    inline["ranks"] = (out / "tokenizer.tiktoken").read_text()
    assert tokenizer.load_tokenizer(inline).encode_ordinary("To be") == enc.encode_ordinary("To be")
    stream = np.concatenate([splits["train"], splits["val"]])
    assert stream[0] == 300 and enc.decode(stream[1:].tolist()) == corpus.read_text()

def test_a_corpus_with_fewer_merges_than_asked_gives_a_smaller_bpe_and_says_so(tmp_path, capsys):
    corpus = tmp_path / "tiny.txt"
    corpus.write_text("the cat sat on the mat. " * 40)
    meta, _, err = prepare_here(capsys, "--input", corpus, "--out", tmp_path / "out", "--vocab-size", 70000,
                                "--num-proc", 1)
    enc = tokenizer.load_tokenizer(meta["tokenizer"], tmp_path / "out")
    learned = enc.n_vocab - 1  # end-of-text comes right after the last token learned: no ids for nothing
    assert learned < 300 and meta["eot_id"] == learned and meta["vocab_size"] == learned + 1
    assert meta["tokenizer"]["name"] == f"bpe{learned}" and meta["dtype"] == "uint16"
    assert f"the BPE has {learned} tokens, not --vocab-size 70,000" in err

# --- Other sources: jsonl, json, parquet, folders -------------------------------------------------
ROWS = [f"Document {i}: " + ("naïve text 😀 " * (i % 5)) + "end." for i in range(30)]

@pytest.mark.slow
def test_jsonl_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    rows = ROWS + [None, ""]  # missing and empty texts are no documents
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"id": i, "body": t}) + "\n" for i, t in enumerate(rows)))
    pq.write_table(pa.table({"id": list(range(len(rows))), "body": rows}), tmp_path / "docs.parquet")
    for name in ("docs.jsonl", "docs.parquet"):
        prepare_cli(tmp_path, "--input", tmp_path / name, "--text-field", "body", "--val-fraction", 0.1,
                    "--out", tmp_path / name.replace(".", "_"))
    meta, splits = load(tmp_path / "docs_jsonl")
    assert meta["documents"] == {"train": 27, "val": 3}  # documents 9, 19 and 29 are held out
    assert meta["rows_with_empty_text"] == 2 and meta["rows_without_text"] == 0
    assert [R50K.decode(d) for d in documents(splits["val"], R50K.eot_token)] == ROWS[9::10]
    assert [R50K.decode(d) for d in documents(splits["train"], R50K.eot_token)] == \
        [r for i, r in enumerate(ROWS) if i % 10 != 9]
    # --dataset takes what load_dataset takes: a hub name, or (offline) a folder of data files
    (tmp_path / "dataset").mkdir()
    (tmp_path / "docs.jsonl").rename(tmp_path / "dataset" / "train.jsonl")
    for streaming in ([], ["--streaming"]):
        prepare_cli(tmp_path, "--dataset", tmp_path / "dataset", "--text-field", "body", "--val-fraction", 0.1,
                    "--out", tmp_path / f"dataset{len(streaming)}", *streaming)
    for out in ("docs_parquet", "dataset0", "dataset1"):
        for split in ("train_0000.bin", "val_0000.bin"):
            assert (tmp_path / out / split).read_bytes() == (tmp_path / "docs_jsonl" / split).read_bytes()
    result = prepare_cli(tmp_path, "--dataset", tmp_path / "dataset", "--out", tmp_path / "nofield", expect=2)
    assert_user_error(result, "no field 'text'", "'body'")  # from the dataset's columns, before reading rows
    result = prepare_cli(tmp_path, "--dataset", "no-such-user/no-such-dataset", "--out", tmp_path / "hub", expect=2)
    assert_user_error(result, "cannot load dataset 'no-such-user/no-such-dataset'")
    assert leftovers(tmp_path) == [] and not (tmp_path / "nofield").exists() and not (tmp_path / "hub").exists()

def test_rows_without_the_text_field_are_counted_not_lost(tmp_path, capsys):
    rows = [{"text": "first"}, {"body": "no text field"}, {"text": None}, {"text": ""}, {"text": "second"},
            {"id": 6}, {"text": "third 😀", "id": 7}]
    (tmp_path / "rows.jsonl").write_text("\n".join(map(json.dumps, rows)) + "\n\n")  # and a blank line
    (tmp_path / "rows.json").write_text(json.dumps(rows, indent=2))  # one array, over many lines
    for name in ("rows.jsonl", "rows.json"):
        out = tmp_path / name.replace(".", "_")
        meta, stdout, stderr = prepare_here(capsys, "--input", tmp_path / name, "--out", out, "--val-fraction", 0,
                                        "--num-proc", 1)
        assert (meta["rows_without_text"], meta["rows_with_empty_text"]) == (2, 2) == \
            (load(out)[0]["rows_without_text"], load(out)[0]["rows_with_empty_text"])
        assert "skipped 2 rows without the field 'text' and 2 rows whose text is empty or null" in stderr
        assert [R50K.decode(d) for d in documents(load(out)[1]["train"], R50K.eot_token)] == \
            ["first", "second", "third 😀"]

@pytest.mark.parametrize("name, content, fragments", [
    ("bad.jsonl", '{"text": "a"}\n{"text": "b"\n{"text": "c"}\n', ["bad.jsonl line 2: not valid JSON"]),
    ("cut.json", json.dumps([{"text": "a" * 50}] * 5, indent=1)[:-30], ["cut.json line", "is the file complete"]),
    ("list.jsonl", '{"text": "a"}\n[1, 2]\n', ["list.jsonl line 2: a JSON list"]),
    ("numbers.jsonl", '{"text": "a"}\n{"text": 3}\n', ["field 'text'", "numbers.jsonl", "holds int, not text"]),
    ("nofield.json", '[{"body": "a"}, {"body": "b"}]', ["no field 'text' in", "nofield.json", "['body']"]),
    ("junk.parquet", "not a parquet file\n" * 10, ["cannot load", "junk.parquet", "complete .parquet"]),
    ("half.parquet", None, ["cannot load", "half.parquet"]),
])
def test_malformed_inputs_are_one_line_errors_naming_the_file(tmp_path, capsys, name, content, fragments):
    path = tmp_path / name
    if content is None:  # a real parquet file, cut in half
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.table({"text": ROWS}), path)
        path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])
    else:
        path.write_text(content)
    error = user_error(capsys, "--input", path, "--out", tmp_path / "out", "--num-proc", 1)
    assert all(fragment in error for fragment in fragments), error
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []

def test_folder_of_files(tmp_path, capsys):
    folder = tmp_path / "corpus"
    (folder / "sub" / "deeper" / "deepest").mkdir(parents=True)
    texts = {"b.txt": "Second file.\n", "a.txt": "First file,\n\nwith two paragraphs.", "sub/c.txt": "Third. 😀"}
    for name, text in texts.items():
        (folder / name).write_text(text)
    (folder / "notes.md").write_text("not a corpus file")
    (folder / "d.jsonl").write_text(json.dumps({"text": "From jsonl."}) + "\n")
    (folder / "sub" / "deeper" / "deepest" / "e.jsonl").write_text(json.dumps({"text": "Deep down."}) + "\n")
    meta, out, _ = prepare_here(capsys, "--input", folder, "--out", tmp_path / "out", "--val-fraction", 0,
                                "--num-proc", 1)
    assert meta["files"] == 5 and "5 + 0 document(s) from 5 file(s)" in out
    meta, splits = load(tmp_path / "out")
    docs = [R50K.decode(d) for d in documents(splits["train"], R50K.eot_token)]
    # files in sorted order at any depth (text files one after another, then jsonl rows), each one a document
    assert docs == [texts["a.txt"], texts["b.txt"], "From jsonl.", texts["sub/c.txt"], "Deep down."]
    assert meta["tokens"]["val"] == 0 and meta["shards"]["val"] == []
    prepare_here(capsys, "--input", str(folder / "**" / "*.txt"), "--out", tmp_path / "glob", "--val-fraction", 0,
             "--num-proc", 1)
    _, splits = load(tmp_path / "glob")
    assert [R50K.decode(d) for d in documents(splits["train"], R50K.eot_token)] == \
        [texts["a.txt"], texts["b.txt"], texts["sub/c.txt"]]

def test_invalid_utf8_is_replaced_and_counted(tmp_path, capsys):
    (tmp_path / "bad.txt").write_bytes(b"caf\xc3\xa9 \xff\xfe ok \xc3")  # 2 bad bytes + a truncated character
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "caf\xc3\xa9 \xff\xfe ok"}\n')
    cases = [("bad.txt", 3, "café \ufffd\ufffd ok \ufffd"), ("bad.jsonl", 2, "café \ufffd\ufffd ok")]
    for name, replaced, text in cases:
        out = tmp_path / name.replace(".", "_")
        _, _, stderr = prepare_here(capsys, "--input", tmp_path / name, "--out", out, "--val-fraction", 0,
                                    "--num-proc", 1)
        assert f"replaced {replaced} invalid UTF-8 bytes" in stderr and "Traceback" not in stderr
        meta, splits = load(out)
        assert meta["replaced_bytes"] == replaced and R50K.decode(splits["train"][1:].tolist()) == text

# --- Settings and presets -------------------------------------------------------------------------
def test_presets_carry_the_folders_train_py_reads_and_flags_win():
    url = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
    cfg = prepare.parse_settings([])  # bare: the CPU demo's data
    assert (cfg.preset, cfg.input, cfg.vocab_size, cfg.val_fraction, cfg.out) == \
        ("shakespeare", [url], 4096, 0.1, "data/shakespeare")
    cfg = prepare.parse_settings(["--preset", "shakespeare", "--input", str(SHAKESPEARE)])  # offline
    assert (cfg.input, cfg.vocab_size, cfg.out) == ([str(SHAKESPEARE)], 4096, "data/shakespeare")
    cfg = prepare.parse_settings(["--preset", "shakespeare", "--vocab-size", "0", "--out", "x", "--val-fraction=.2"])
    assert (cfg.vocab_size, cfg.out, cfg.val_fraction) == (0, "x", 0.2)
    cfg = prepare.parse_settings(["--input", "a.txt"])  # no preset: data/<name>-<tokenizer>
    assert (cfg.preset, cfg.out, cfg.vocab_size, cfg.val_fraction) == (None, None, 0, 0.01)
    cfg = prepare.parse_settings(["--preset", "fineweb-edu", "--input", "local.parquet"])  # a source replaces one
    assert (cfg.dataset, cfg.input, cfg.out) == (None, ["local.parquet"], "data/fineweb_edu")
    # train.py reads data/shakespeare (its defaults), data/tinystories (lillm_39m, 8192 ids) and
    # data/fineweb_edu (lf_llm_269m, gpt2_small)
    outs = {name: p["out"] for name, p in prepare.PRESETS.items()}
    assert outs == {"shakespeare": "data/shakespeare", "tinystories": "data/tinystories",
                    "fineweb-edu": "data/fineweb_edu", "openwebtext": "data/openwebtext", "openwebtext-8k":
                    "data/openwebtext_8k",
                    "shakespeare_chat": "data/shakespeare_chat", "shakespeare_dpo": "data/shakespeare_dpo",
                    "tinystories-10k": "data/tinystories_10k"}
    assert prepare.PRESETS["tinystories-10k"]["vocab_size"] + 1 == 10000  # tinystories_23m's 10k ids
    # and the chat preset reuses the demo's tokenizer, for train.py's shakespeare_chat preset
    assert prepare.PRESETS["shakespeare_chat"]["tokenizer"] == "data/shakespeare"
    assert prepare.PRESETS["tinystories"]["vocab_size"] + 1 == prepare.PRESETS["openwebtext-8k"]["vocab_size"] + 1 == 8192

@pytest.mark.parametrize("args, fragment", [
    (["--vocab-size", 100], "--vocab-size 100"),
    (["--vocab-size", 2_000_000], "--vocab-size 2000000"),
    (["--dtype", "int8"], "--dtype 'int8'"),
    (["--val-fraction", 0.6], "--val-fraction 0.6 is not in [0, 0.5]"),
    (["--val-fraction", -0.1], "--val-fraction -0.1"),
    (["--val-fraction", "nan"], "not a finite number"),
    (["--shard-tokens", 0], "--shard-tokens 0 must be positive"),
    (["--num-proc", 0], "--num-proc 0 must be positive"),
    (["--num-proc", 1.5], "not a whole number"),
    (["--chunk-chars", -1], "--chunk-chars -1 must be positive"),
    (["--bpe-train-chars", 0], "--bpe-train-chars 0 must be positive"),
    (["--no-such-setting", 1], "unknown setting '--no-such-setting'"),
    (["--preset", "no-such-preset"], "unknown preset 'no-such-preset'"),
    (["--dataset", "x/y"], "give one source"),
])
def test_bad_settings_are_one_line_errors(tmp_path, capsys, args, fragment):
    assert fragment in user_error(capsys, "--input", SHAKESPEARE, *args, "--out", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []  # refused before touching anything

def test_the_current_folder_the_root_and_their_kin_are_never_an_output(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for out in (".", "/", ".."):  # swapped away whole they would pull the floor; and no lock beside them
        assert "is the current folder or holds it" in user_error(capsys, "--input", SHAKESPEARE, "--out", out)
    assert list(tmp_path.iterdir()) == [] and not os.path.exists("/..lock")

@pytest.mark.slow
def test_help_lists_every_setting_and_the_presets():
    result = python("prepare.py", "--help", env={"COLUMNS": "250"})
    assert result.returncode == 0 and result.stderr == "", result.stderr
    text, lines = " ".join(result.stdout.split()), result.stdout.splitlines()  # argparse wraps long lines
    for f in fields(prepare.PrepareConfig):
        assert common.flag(f.name) in text and f"{f.metadata['help']} (default: {f.default!r})" in text, f.name
    for name, preset in prepare.PRESETS.items():
        assert any(line.startswith(f"  {name}: ") and f"--out {preset['out']}" in line for line in lines), name
    assert "python prepare.py --preset shakespeare --input" in result.stdout  # the docstring's commands

# --- Errors: one line, exit status 2, no traceback, nothing left behind ---------------------------
def test_errors(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text("\n \n<|endoftext|>\n")
    (tmp_path / "rows.jsonl").write_text(json.dumps({"text": "hello"}) + "\n")
    (tmp_path / "a_file").write_text("")
    bad = pa.array([b"ok", b"ba\xffd"], type=pa.binary()).cast(pa.string(), safe=False)  # parquet lets it in
    pq.write_table(pa.table({"text": bad}), tmp_path / "bad.parquet")
    ok = ["--input", SHAKESPEARE]
    cases = {
        "matches no files": ["--input", tmp_path / "missing.txt"],
        "corpus is empty": ["--input", tmp_path / "empty.txt"],
        "corpus is empty: ": ["--input", tmp_path / "blank.txt", "--separator", "<|endoftext|>"],
        "no field 'body'": ["--input", tmp_path / "rows.jsonl", "--text-field", "body"],
        "invalid UTF-8 in field 'text'": ["--input", tmp_path / "bad.parquet"],
        "too large for uint16": [*ok, "--vocab-size", 70_000, "--dtype", "uint16"],
        f"cannot write {tmp_path / 'a_file'}": [*ok, "--out", tmp_path / "a_file" / "out"],
        "cannot load tiktoken encoding": [*ok, "--tokenizer", "no_such_encoding"],
    }
    for i, (message, args) in enumerate(cases.items()):
        args = [*args, "--out", tmp_path / f"out{i}"] if "--out" not in args else args
        assert message in user_error(capsys, *args, "--num-proc", 1)
        assert not (tmp_path / f"out{i}").exists()  # nothing half-written
    assert leftovers(tmp_path) == []

@pytest.mark.slow
def test_an_output_folder_is_not_overwritten_by_another_dataset(tmp_path):
    small = tmp_path / "small.txt"
    small.write_text("To be, or not to be.")
    out = tmp_path / "out"
    prepare_cli(tmp_path, "--input", small, "--out", out)
    prepare_cli(tmp_path, "--input", small, "--out", out, "--num-proc", 2)  # same dataset: fine to redo
    result = prepare_cli(tmp_path, "--input", small, "--out", out, "--val-fraction", 0.2, expect=2)
    assert_user_error(result, "already holds a different dataset", "--force")
    assert load(out)[0]["config"]["val_fraction"] == 0.01
    prepare_cli(tmp_path, "--input", small, "--out", out, "--val-fraction", 0.2, "--force")
    assert load(out)[0]["config"]["val_fraction"] == 0.2
    (out / "notes.txt").write_text("mine")  # a file prepare.py did not write: never deleted, even with --force
    result = prepare_cli(tmp_path, "--input", small, "--out", out, "--force", expect=2)
    assert_user_error(result, "notes.txt", "does not write")
    assert (out / "notes.txt").read_text() == "mine" and leftovers(tmp_path) == []

@pytest.mark.slow
def test_no_arguments_means_shakespeare(tmp_path):
    result = python("prepare.py", cwd=tmp_path)
    if result.returncode == 0:  # a machine with internet: the CPU demo's data
        meta, splits = load(tmp_path / "data" / "shakespeare")
        assert meta["config"]["tokenizer"] == "bpe4096" and meta["vocab_size"] == 4097
    else:  # offline: it said what it tried, in one line, and left nothing
        assert result.returncode == 2 and "Traceback" not in result.stderr
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("error: cannot download https://raw.githubusercontent.com/karpathy/char-rnn/")
        assert not (tmp_path / "data" / "shakespeare").exists() and leftovers(tmp_path) == []

@pytest.mark.slow
def test_url_input_is_downloaded_once(tmp_path):
    (tmp_path / "page.txt").write_text("Fetched text.")
    url = (tmp_path / "page.txt").as_uri()  # file://, which urllib fetches like http(s)://
    prepare_cli(tmp_path, "--input", url, "--val-fraction", 0)
    meta, splits = load(tmp_path / "data" / "page-r50k_base")
    assert R50K.decode(splits["train"][1:].tolist()) == "Fetched text."
    (tmp_path / "page.txt").unlink()
    prepare_cli(tmp_path, "--input", url, "--val-fraction", 0)  # from data/downloads/ this time

@pytest.mark.slow
def test_import_needs_no_datasets():
    code = "import sys; sys.modules['datasets'] = None; import prepare; print('ok')"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.stdout.strip() == "ok", result.stderr

# --- The output folder is always the old dataset or the new one -----------------------------------
def wait_for(condition, timeout=600):
    t0 = time.time()
    while not condition():
        assert time.time() - t0 < timeout, "timed out"
        time.sleep(0.005)

@pytest.fixture
def big_corpus(tmp_path):
    """Tiny Shakespeare eight times over: a run that lasts a few seconds."""
    path = tmp_path / "big.txt"
    path.write_text(SHAKESPEARE.read_text() * 8)
    return path

@pytest.fixture
def gate(tmp_path):
    """A named pipe to give last to --input: prepare.py reads what comes before it, then waits at it
    until the test opens it (open_gate). What the test does meanwhile happens mid-run, for certain."""
    path = tmp_path / "gate.txt"
    os.mkfifo(path)
    return path

def open_gate(path, proc):
    """Let proc go on past the gate, an empty last file, once it reads there (it may still be busy before)."""
    def opened():
        assert proc.poll() is None, "the run ended before it reached the gate"
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))  # fails while no one reads the pipe
        except OSError:
            return False
        return True
    wait_for(opened, timeout=900)

@pytest.mark.slow
def test_a_second_run_into_the_same_folder_is_refused(tmp_path, big_corpus, gate):
    out, partial = tmp_path / "out", tmp_path / ".out.partial"
    first = start(tmp_path, "--input", big_corpus, gate, "--out", out, "--num-proc", 1, "--chunk-chars", 10_000)
    try:
        wait_for(partial.exists)  # the first run holds the lock and builds; it cannot end before the gate opens
        second = prepare_cli(tmp_path, "--input", SHAKESPEARE, "--out", out, expect=2)
        assert_user_error(second, f"{out.resolve()} is in use by another run (pid {first.pid})")
        assert partial.exists() and not out.exists()  # the first run's work is untouched
        open_gate(gate, first)
        stdout, stderr = first.communicate(timeout=900)
    finally:
        os.killpg(first.pid, signal.SIGKILL) if first.poll() is None else None
    assert first.returncode == 0, stderr
    meta, splits = load(out)
    assert R50K.decode(np.concatenate([splits["train"], splits["val"]])[1:].tolist()) == big_corpus.read_text()

@pytest.mark.slow
def test_a_killed_replacement_leaves_the_old_or_the_new_dataset(tmp_path, gate):
    out, partial = tmp_path / "out", tmp_path / ".out.partial"
    # ~7k documents in 68 shards: kills land while reading, tokenizing, writing or swapping
    args = ["--input", SHAKESPEARE, "--out", out, "--separator", r"\n\n", "--chunk-chars", 2000,
            "--shard-tokens", 5000, "--num-proc", 1, "--force"]
    prepare_cli(tmp_path, *args, "--val-fraction", 0.05)
    first_meta = (out / "meta.json").stat().st_mtime_ns
    moments = [partial.exists, lambda: (partial / "train_0003.bin").exists(),
               lambda: (partial / "meta.json").exists(),
               lambda: (out / "meta.json").exists() and (out / "meta.json").stat().st_mtime_ns != first_meta]
    for i, moment in enumerate(moments + ["at the gate"]):
        before = load(out)[0]["config"]["val_fraction"]
        at_gate = moment == "at the gate"  # a kill that surely lands while the new dataset is built
        proc = start(tmp_path, *args[:2], *([gate] if at_gate else []), *args[2:],
                     "--val-fraction", 0.1 if before == 0.05 else 0.05)
        wait_for(lambda: (partial / "val_0000.bin").exists() if at_gate else moment() or proc.poll() is not None)
        os.killpg(proc.pid, signal.SIGKILL)  # the moment is seen: kill at once, whatever the run does next
        proc.communicate()
        meta, _ = load(out)  # complete: every shard meta.json names, of its length, and no other file
        assert meta["config"]["val_fraction"] in (0.05, 0.1), i
        assert not at_gate or meta["config"]["val_fraction"] == before  # killed mid-build: the old one stands
    prepare_cli(tmp_path, *args, "--val-fraction", 0.2)  # the next run clears what the killed ones left
    meta, splits = load(out)
    assert meta["config"]["val_fraction"] == 0.2 and leftovers(tmp_path) == []
    assert meta["documents"]["val"] == len([p for p in SHAKESPEARE.read_text().split("\n\n") if p.strip()]) // 5

@pytest.mark.slow
def test_a_failing_write_keeps_the_old_dataset(tmp_path):
    out = tmp_path / "out"
    (tmp_path / "small.txt").write_text("To be, or not to be.")
    prepare_cli(tmp_path, "--input", tmp_path / "small.txt", "--out", out)
    old = {p.name: p.read_bytes() for p in out.iterdir()}

    def small_files():  # in the child: files may not grow past 100 kB, as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) instead of killing
    result = prepare_cli(tmp_path, "--input", SHAKESPEARE, "--out", out, "--force", "--num-proc", 1, expect=2,
                         preexec_fn=small_files)
    assert_user_error(result, "File too large", f"{out} is as it was before")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == old and leftovers(tmp_path) == []
    load(out)

@pytest.mark.slow
def test_ctrl_c_is_one_line_and_keeps_the_old_dataset(tmp_path, big_corpus, gate):
    out, partial = tmp_path / "out", tmp_path / ".out.partial"
    (tmp_path / "small.txt").write_text("To be, or not to be.")
    prepare_cli(tmp_path, "--input", tmp_path / "small.txt", "--out", out)
    old = {p.name: p.read_bytes() for p in out.iterdir()}
    proc = start(tmp_path, "--input", big_corpus, gate, "--out", out, "--force", "--num-proc", 2,
                 "--chunk-chars", 20_000)
    wait_for(lambda: (partial / "train_0000.bin").exists())  # tokenizing, with two worker processes
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole process group
    stdout, stderr = proc.communicate(timeout=600)  # (the run could not end by itself: it waits at the gate)
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr
    assert stderr.strip().splitlines()[-1] == "interrupted", stderr  # on a line of its own
    assert {p.name: p.read_bytes() for p in out.iterdir()} == old and leftovers(tmp_path) == []
