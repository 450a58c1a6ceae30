"""
The project's tests, CPU-only and offline, tiny models and few steps:

    python -m pytest -q test_model.py

Sections: model (against Hugging Face Llama and naive references), prepare, train, sample, eval.
Shared inputs come from ../shared beside the repository (Tiny Shakespeare, GPT-2 BPE ranks).
"""
import base64
import collections
import dataclasses
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent
SHARED = ROOT.parent / "shared"
SHAKESPEARE = SHARED / "data" / "tinyshakespeare.txt"
os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED / "tiktoken_cache"))  # offline GPT-2 tokenizer

import prepare  # noqa: E402  (after TIKTOKEN_CACHE_DIR is set)
import sample  # noqa: E402
import tiktoken  # noqa: E402
import train as train_py  # noqa: E402
from prepare import load_tokenizer  # noqa: E402
from model import KVCache, ModelConfig, Transformer, apply_rope, from_hf, rope_tables, sample_next, to_hf  # noqa: E402
torch.set_num_threads(1)  # tiny models: a second thread only adds synchronisation


def tiny_config(**overrides):
    base = dict(vocab_size=96, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, max_seq_len=64, multiple_of=16)
    return ModelConfig(**{**base, **overrides})


def random_model(seed=0, **overrides):
    """A tiny model whose norm weights are random too, so a wrong norm mapping cannot hide."""
    torch.manual_seed(seed)
    model = Transformer(tiny_config(**overrides))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    return model.eval()


def full_logits(model, idx):
    """Logits at every position; forward() only computes them all when given targets."""
    return model(idx, targets=torch.zeros_like(idx))[0]

# -----------------------------------------------------------------------------
# model.py


def hf_llama(hf_config):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(**hf_config)
    config._attn_implementation = "sdpa"
    return transformers.LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("n_kv_head", [4, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("theta", [10000.0, 500000.0])
def test_logits_match_hf_llama(tie, n_kv_head, theta):
    model = random_model(n_kv_head=n_kv_head, rope_theta=theta, tie_embeddings=tie)
    hf_state, hf_config = to_hf(model.state_dict(), model.config)
    hf = hf_llama(hf_config)
    assert hf.config.rope_parameters["rope_theta"] == theta
    hf.load_state_dict(hf_state, strict=not tie)  # tied: lm_head comes from embed_tokens
    assert torch.equal(hf.lm_head.weight, model.lm_head.weight)
    idx = torch.randint(0, 96, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = full_logits(model, idx), hf(idx).logits
    assert (ours - theirs).abs().max().item() <= 1e-5

    # The reverse: a model that HF initialised, imported, gives HF's logits ...
    torch.manual_seed(2)
    hf2 = hf_llama(hf_config)
    state, cfg = from_hf(hf2.state_dict(), hf2.config.to_dict())
    assert replace(cfg, multiple_of=16) == model.config  # multiple_of only derives ffn_hidden
    imported = Transformer(cfg).eval()
    imported.load_state_dict(state)
    with torch.no_grad():
        assert (full_logits(imported, idx) - hf2(idx).logits).abs().max().item() <= 1e-5
    # ... and our export imported back is the very same model.
    state, cfg = from_hf(hf_state, hf_config)
    back = Transformer(cfg).eval()
    back.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(full_logits(back, idx), ours)


def test_causality():
    model = random_model()
    idx = torch.randint(0, 96, (2, 30), generator=torch.Generator().manual_seed(0))
    changed = idx.clone()
    t = 17
    changed[:, t] = (idx[:, t] + 1) % 96
    with torch.no_grad():
        a, b = full_logits(model, idx), full_logits(model, changed)
    assert torch.equal(a[:, :t], b[:, :t])
    assert (a[:, t:] - b[:, t:]).abs().amax(dim=-1).min() > 1e-4  # every later position sees it


def test_kv_cache_decode_equals_full_forward():
    model = random_model(n_kv_head=2)  # GQA
    prompt = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    out = model.generate(prompt, max_new_tokens=20, temperature=0)
    assert out.shape == (2, 29)
    # Reference: greedy decoding with a full forward over the whole sequence at every step.
    ref = prompt
    with torch.no_grad():
        for _ in range(20):
            ref = torch.cat([ref, full_logits(model, ref)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, ref)

    # Step by step: prefill, one-token steps, and a 5-token chunk after cached positions (the
    # shifted causal mask); each step's logits equal the full forward's at those positions.
    with torch.no_grad():
        full = full_logits(model, ref)
        for layer in model.layers:
            layer.self_attn.cache = KVCache(max_len=29)
        got = [model(ref[:, :9], targets=torch.zeros_like(ref[:, :9]))[0]]
        for t in range(9, 24):
            got.append(model(ref[:, t:t + 1], pos=t)[0])
        got.append(model(ref[:, 24:], targets=torch.zeros_like(ref[:, 24:]), pos=24)[0])
        for layer in model.layers:
            layer.self_attn.cache = None
    assert (torch.cat(got, dim=1) - full).abs().max().item() <= 1e-5


def test_generate_past_the_context_and_eos():
    model = random_model(max_seq_len=16)
    prompt = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(0))
    out = model.generate(prompt, max_new_tokens=40, temperature=0)
    assert out.shape == (2, 50)  # the cache restarted from the recent half, twice or more
    with torch.no_grad():  # the first 6 new tokens fit in the context: plain greedy
        ref = prompt
        for _ in range(6):
            ref = torch.cat([ref, full_logits(model, ref)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out[:, :16], ref)
    # eos: row 0 is known to produce token `eos` at step 2; every row stops at its first eos
    # and pads with eos until all rows are done.
    eos = int(out[0, 12])
    first = [int((row[10:] == eos).nonzero()[0]) if (row[10:] == eos).any() else None for row in out]
    stopped = model.generate(prompt, max_new_tokens=40, temperature=0, eos_id=eos)
    ends = [40 if f is None else f + 1 for f in first]
    assert stopped.size(1) == 10 + max(ends)
    for row, end in enumerate(ends):
        assert torch.equal(stopped[row, :10 + end], out[row, :10 + end])
        assert (stopped[row, 10 + end:] == eos).all()


def test_rope_scores_depend_only_on_relative_position():
    D = 16
    cos, sin = rope_tables(D, 128, 10000.0)
    q, k = torch.randn(2, 1, 1, 1, D).unbind(0)  # (1, 1, 1, D) each

    def score(m, n):  # <rope(q at m), rope(k at n)>
        return (apply_rope(q, cos[m:m + 1], sin[m:m + 1]) * apply_rope(k, cos[n:n + 1], sin[n:n + 1])).sum()

    for m, n in [(5, 2), (40, 3), (9, 9)]:
        for shift in (1, 17, 80):
            assert abs(score(m, n) - score(m + shift, n + shift)) < 1e-4
    assert abs(score(5, 2) - score(5, 3)) > 1e-3  # and it does depend on the offset
    assert torch.allclose(apply_rope(q, cos[:1], sin[:1]), q)  # position 0 is the identity


def test_loss_at_init_and_overfitting_one_batch():
    torch.manual_seed(0)
    model = Transformer(tiny_config(vocab_size=256))
    idx = torch.randint(0, 256, (4, 33))
    x, y = idx[:, :-1], idx[:, 1:]
    _, loss = model(x, y)
    assert abs(loss.item() - math.log(256)) < 0.1
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    for _ in range(50):
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5


def test_ignore_index_and_inference_logits():
    model = random_model()
    idx = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    targets = idx.roll(-1, dims=1)
    targets[:, -4:] = -1
    logits, loss = model(idx, targets)
    ref = F.cross_entropy(logits[:, :-4].reshape(-1, 96), targets[:, :-4].reshape(-1))
    assert torch.allclose(loss, ref, atol=1e-6)
    last, no_loss = model(idx)
    assert no_loss is None and last.shape == (2, 1, 96)
    assert torch.allclose(last[:, 0], logits[:, -1], atol=1e-6)


@pytest.mark.parametrize("pos_emb", ["rope", "learned", "none"])
@pytest.mark.parametrize("mlp", ["swiglu", "gelu"])
@pytest.mark.parametrize("norm", ["rmsnorm", "layernorm"])
def test_ablations_run_forward_and_backward(pos_emb, mlp, norm):
    torch.manual_seed(0)
    model = Transformer(tiny_config(pos_emb=pos_emb, mlp=mlp, norm=norm, dropout=0.1))
    idx = torch.randint(0, 96, (2, 16))
    _, loss = model(idx, idx)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert model.generate(idx[:, :4], 6, temperature=0).shape == (2, 10)
    if (pos_emb, mlp, norm) != ("rope", "swiglu", "rmsnorm"):
        with pytest.raises(ValueError, match="only Llama exports"):
            to_hf(model.state_dict(), model.config)


def test_parameter_count_and_flops_against_hand_count():
    for tie in (False, True):
        cfg = tiny_config(tie_embeddings=tie)
        model = Transformer(cfg)
        V, C, L, F_, D = 96, 32, 2, cfg.ffn_hidden, 8
        per_layer = C * 4 * D + 2 * C * 2 * D + C * 4 * D + 3 * C * F_ + 2 * C  # q, k+v, o, mlp, norms
        body = L * per_layer + C
        assert F_ == 96  # 2/3 * 4 * 32 = 85.3, rounded up to a multiple of 16
        assert model.num_params() == body + V * C * (1 if tie else 2)
        assert model.num_params(embeddings=False) == body
        assert model.flops_per_token(64) == 6 * (body + V * C) + 12 * L * 4 * D * 64


@pytest.mark.parametrize("overrides, message", [
    (dict(n_embd=30), "n_embd=30 is not divisible by n_head=4"),
    (dict(n_kv_head=3), "n_head=4 is not divisible by n_kv_head=3"),
    (dict(n_embd=36, n_head=12, n_kv_head=4), "head dim n_embd/n_head=3 is odd"),
    (dict(pos_emb="alibi"), "pos_emb='alibi' is not one of"),
    (dict(mlp="relu"), "mlp='relu' is not one of"),
    (dict(norm="batchnorm"), "norm='batchnorm' is not one of"),
    (dict(n_layer=0), "n_layer=0 must be positive"),
    (dict(dropout=1.5), "dropout=1.5"),
    (dict(ffn_hidden=-1), "ffn_hidden=-1"),
    (dict(rope_theta=0.0), "rope_theta=0.0"),
])
def test_config_errors_name_the_values(overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        tiny_config(**overrides)


def test_sequence_longer_than_context_is_an_error():
    model = random_model(max_seq_len=16)
    with pytest.raises(ValueError, match="positions up to 17 > max_seq_len=16; crop from the left"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="positions up to 17 > max_seq_len=16"):  # a prompt too long to prefill
        model.generate(torch.zeros(1, 17, dtype=torch.long), 5)
    assert all(layer.self_attn.cache is None for layer in model.layers)  # cleaned up after the error


@pytest.mark.parametrize("change, message", [
    (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}), "RoPE scaling"),
    (dict(rope_parameters=None, rope_scaling={"type": "linear", "factor": 2.0}), "RoPE scaling"),  # transformers 4
    (dict(hidden_act="gelu"), "silu and no biases"),
    (dict(attention_bias=True), "silu and no biases"),
    (dict(head_dim=16), "head_dim \\* heads = hidden_size"),
])
def test_from_hf_refuses_what_it_cannot_represent(change, message):
    """A config our model cannot express exactly is an error, not a silently different model."""
    state, config = to_hf(random_model().state_dict(), tiny_config())
    from_hf(state, config)  # the unchanged config imports
    with pytest.raises(ValueError, match=message):
        from_hf(state, {**config, **change})

# -----------------------------------------------------------------------------
# sampling (model.sample_next)


def test_greedy_and_top_k_1_are_argmax():
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(0))
    greedy = sample_next(logits, temperature=0)
    assert torch.equal(greedy[:, 0], logits.argmax(-1))
    g = torch.Generator().manual_seed(3)
    assert torch.equal(sample_next(logits, temperature=1.3, top_k=1, generator=g), greedy)


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.05, 0.4, 0.1, 0.3, 0.15]])
    logits = probs.log()
    g = torch.Generator().manual_seed(0)

    def support(top_p):
        draws = torch.cat([sample_next(logits, top_p=top_p, generator=g) for _ in range(400)])
        return set(draws[:, 0].tolist())

    assert support(0.35) == {1}           # 0.4 alone reaches 0.35
    assert support(0.6) == {1, 3}         # 0.4 + 0.3 = 0.7 >= 0.6
    assert support(0.75) == {1, 3, 4}     # 0.7 < 0.75; adding 0.15 reaches it
    assert support(0.9) == {1, 3, 4, 2}   # 0.85 < 0.9 <= 0.95
    assert support(1.0) == {0, 1, 2, 3, 4}


def test_generate_never_samples_padding_ids():
    model = random_model()
    with torch.no_grad():  # final norm weight 0: every logit is 0, all 96 ids equally likely
        model.norm.weight.zero_()
    prompt = torch.zeros(4, 1, dtype=torch.long)
    limited = model.generate(prompt, 30, generator=torch.Generator().manual_seed(0), vocab_size=90)
    unlimited = model.generate(prompt, 30, generator=torch.Generator().manual_seed(0))
    assert limited.max() < 90 <= unlimited.max()  # ids 90..95 pad the embedding past the tokenizer


def test_sampling_with_a_seeded_generator_repeats():
    model = random_model()
    prompt = torch.zeros(1, 1, dtype=torch.long)
    runs = [model.generate(prompt, 30, temperature=1.0, top_k=20,
                           generator=torch.Generator().manual_seed(s)) for s in (7, 7, 8)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])

# -----------------------------------------------------------------------------
# prepare.py


def prepare_cli(tmp_path, *args, expect=0):
    """Run prepare.py as a user would, from tmp_path (so data/ is there); datasets stays offline."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_CACHE=str(tmp_path / "hf_cache"))
    result = subprocess.run([sys.executable, ROOT / "prepare.py", *map(str, args)], cwd=tmp_path,
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


# -----------------------------------------------------------------------------
# Tiny Shakespeare with the GPT-2 tokenizer

def test_shakespeare_round_trip(tmp_path):
    out = tmp_path / "out"
    prepare_cli(tmp_path, "--input", SHAKESPEARE, "--out", out, "--shard-tokens", 100_000, "--val-fraction", 0.1,
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
        prepare_cli(tmp_path, "--input", SHAKESPEARE, "--separator", r"\n\n", "--out", out, "--num-proc", n,
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


# -----------------------------------------------------------------------------
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


# -----------------------------------------------------------------------------
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
    prepare_cli(tmp_path, "--input", corpus, "--out", out, "--vocab-size", 300, "--num-proc", 1)
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


# -----------------------------------------------------------------------------
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
        prepare_cli(tmp_path, "--input", tmp_path / name, "--text-field", "body", "--val-fraction", 0.1,
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
        prepare_cli(tmp_path, "--dataset", tmp_path / "dataset", "--text-field", "body", "--val-fraction", 0.1,
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
    prepare_cli(tmp_path, "--input", folder, "--out", tmp_path / "out", "--val-fraction", 0)
    meta, splits = load(tmp_path / "out")
    docs = [enc.decode(d) for d in documents(splits["train"], enc.eot_token)]
    # files in sorted order (text files one after another, then jsonl rows), each file one document
    assert docs == [texts["a.txt"], texts["b.txt"], "From jsonl.", texts["sub/c.txt"]]
    assert meta["tokens"]["val"] == 0 and meta["shards"]["val"] == []
    prepare_cli(tmp_path, "--input", str(folder / "**" / "*.txt"), "--out", tmp_path / "glob", "--val-fraction", 0)
    _, splits = load(tmp_path / "glob")
    assert [enc.decode(d) for d in documents(splits["train"], enc.eot_token)] == \
        [texts["a.txt"], texts["b.txt"], texts["sub/c.txt"]]


# -----------------------------------------------------------------------------
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
        result = prepare_cli(tmp_path, *args, expect=2)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())  # nothing half-written


def test_an_output_folder_is_not_overwritten_by_another_dataset(tmp_path):
    small = tmp_path / "small.txt"
    small.write_text("To be, or not to be.")
    out = tmp_path / "out"
    prepare_cli(tmp_path, "--input", small, "--out", out)
    prepare_cli(tmp_path, "--input", small, "--out", out, "--num-proc", 2)  # same dataset: fine to redo
    result = prepare_cli(tmp_path, "--input", small, "--out", out, "--val-fraction", 0.2, expect=2)
    assert "already holds a different dataset" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    prepare_cli(tmp_path, "--input", small, "--out", out, "--val-fraction", 0.2, "--force")
    assert load(out)[0]["config"]["val_fraction"] == 0.2


def test_invalid_utf8_is_replaced_and_counted(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"caf\xc3\xa9 \xff\xfe ok \xc3")  # 2 bad bytes + a truncated character
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "caf\xc3\xa9 \xff\xfe ok"}\n')
    enc = tiktoken.get_encoding("r50k_base")
    cases = [("bad.txt", 3, "café \ufffd\ufffd ok \ufffd"), ("bad.jsonl", 2, "café \ufffd\ufffd ok")]
    for name, replaced, text in cases:
        out = tmp_path / name.replace(".", "_")
        result = prepare_cli(tmp_path, "--input", tmp_path / name, "--out", out, "--val-fraction", 0)
        assert f"replaced {replaced} invalid UTF-8 bytes" in result.stderr and "Traceback" not in result.stderr
        meta, splits = load(out)
        assert meta["replaced_bytes"] == replaced and enc.decode(splits["train"][1:].tolist()) == text


def test_no_arguments_means_shakespeare(tmp_path):
    result = subprocess.run([sys.executable, ROOT / "prepare.py"], cwd=tmp_path, capture_output=True, text=True)
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
    prepare_cli(tmp_path, "--input", url, "--val-fraction", 0)
    meta, splits = load(tmp_path / "data" / "page-r50k_base")
    assert tiktoken.get_encoding("r50k_base").decode(splits["train"][1:].tolist()) == "Fetched text."
    (tmp_path / "page.txt").unlink()
    prepare_cli(tmp_path, "--input", url, "--val-fraction", 0)  # from data/downloads/ this time


def test_import_needs_no_datasets():
    code = "import sys; sys.modules['datasets'] = None; import prepare; print('ok')"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.stdout.strip() == "ok", result.stderr


# -----------------------------------------------------------------------------
# train.py


def run(args, timeout=300, **kwargs):
    """Run a command in the repository; CompletedProcess with text output."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, **kwargs)


def assert_user_error(result, *fragments):
    """Exit code 2 and a single 'error: ...' line that names the problem; no traceback."""
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="session")
def byte_data(tmp_path_factory):
    """Tiny Shakespeare as a byte-level corpus (vocab 256 + end-of-text), written by prepare.py."""
    out = tmp_path_factory.mktemp("data") / "shakespeare_bytes"
    result = run([sys.executable, "prepare.py", "--input", str(SHAKESPEARE), "--vocab-size", "256",
                  "--out", str(out)])
    assert result.returncode == 0, result.stderr
    return out


TINY_RUN = ["--n-layer=2", "--n-embd=32", "--n-head=4", "--n-kv-head=2", "--max-seq-len=32", "--batch-size=4",
            "--log-every=1", "--eval-batches=2", "--sample-tokens=0", "--warmup-iters=0", "--min-lr-ratio=1"]


def train(data, out, *args, torchrun=None, **kwargs):
    launcher = [sys.executable, "train.py"] if torchrun is None else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}", "train.py"]
    return run(launcher + [f"--data={data}", f"--out-dir={out}", *TINY_RUN, *args], **kwargs)


def losses(out):
    with open(Path(out) / "log.jsonl") as f:
        return [(r["step"], r["loss"]) for r in map(json.loads, f) if "loss" in r]


def test_resume_continues_exactly(byte_data, tmp_path):
    # Dropout makes the run depend on the RNG state too, which the checkpoint must restore.
    common = ["--dropout=0.1", "--eval-every=3"]
    straight = train(byte_data, tmp_path / "a", "--max-iters=6", *common)
    assert straight.returncode == 0, straight.stderr
    first = train(byte_data, tmp_path / "b", "--max-iters=3", *common)
    assert first.returncode == 0, first.stderr
    second = train(byte_data, tmp_path / "b", "--resume", "--max-iters=6")
    assert second.returncode == 0, second.stderr
    assert len(losses(tmp_path / "a")) == 6
    assert losses(tmp_path / "b") == losses(tmp_path / "a")  # exact equality on CPU


def test_two_processes_equal_one_process_with_accumulation(byte_data, tmp_path):
    one = train(byte_data, tmp_path / "one", "--max-iters=4", "--batch-tokens=256", "--eval-every=2")
    assert one.returncode == 0, one.stderr
    two = train(byte_data, tmp_path / "two", "--max-iters=4", "--eval-every=2", torchrun=2)
    assert two.returncode == 0, two.stderr
    assert "2 process(es), 1 micro-batch" in two.stdout and "1 process(es), 2 micro-batch" in one.stdout
    # A run started on one process and resumed on two continues the same way.
    half = train(byte_data, tmp_path / "half", "--max-iters=2", "--batch-tokens=256", "--eval-every=2")
    assert half.returncode == 0, half.stderr
    resumed = train(byte_data, tmp_path / "half", "--resume", "--max-iters=4", torchrun=2)
    assert resumed.returncode == 0, resumed.stderr
    a, b, c = losses(tmp_path / "one"), losses(tmp_path / "two"), losses(tmp_path / "half")
    assert [s for s, _ in a] == [s for s, _ in b] == [s for s, _ in c] == [1, 2, 3, 4]
    assert max(abs(x[1] - y[1]) for x, y in zip(a, b)) <= 1e-5
    assert max(abs(x[1] - y[1]) for x, y in zip(a, c)) <= 1e-5


def test_loss_falls_and_checkpoint_loads_with_weights_only(byte_data, tmp_path):
    result = train(byte_data, tmp_path / "run", "--max-iters=40", "--eval-every=20", "--lr=3e-3")
    assert result.returncode == 0, result.stderr
    with open(tmp_path / "run" / "log.jsonl") as f:
        vals = [r["val_loss"] for r in map(json.loads, f) if "val_loss" in r]
    assert len(vals) == 3 and vals[2] < vals[0] - 1.0  # from ~ln(320) = 5.8 to well below
    for name in ("ckpt.pt", "best.pt"):
        ckpt = torch.load(tmp_path / "run" / name, weights_only=True)
        assert ckpt["step"] == 40 and ckpt["tokenizer"]["kind"] == "bpe"
        model = Transformer(ModelConfig(**ckpt["model_config"]))
        model.load_state_dict(ckpt["model"])


def test_sigterm_saves_a_checkpoint_and_resume_continues(byte_data, tmp_path):
    out = tmp_path / "run"
    args = [sys.executable, "train.py", f"--data={byte_data}", f"--out-dir={out}", *TINY_RUN,
            "--max-iters=100000", "--eval-every=100000"]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not ((out / "log.jsonl").exists() and len(losses(out)) >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert "stopped by signal" in stdout
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    saved = ckpt["step"]
    assert saved >= 3 and [s for s, _ in losses(out)][-1] == saved
    resumed = train(byte_data, out, "--resume", f"--max-iters={saved + 2}")
    assert resumed.returncode == 0, resumed.stderr
    assert [s for s, _ in losses(out)][-2:] == [saved + 1, saved + 2]


def test_nonfinite_loss_stops_and_keeps_the_checkpoint(byte_data, tmp_path):
    out = tmp_path / "run"
    assert train(byte_data, out, "--max-iters=2", "--eval-every=2").returncode == 0
    # An absurd learning rate without clipping blows the weights up within a few steps.
    result = train(byte_data, out, "--resume", "--max-iters=50", "--lr=1e6", "--grad-clip=0", "--eval-every=1")
    assert result.returncode == 1, result.stdout + result.stderr
    bad_step = int(re.search(r"loss is nan at step (\d+)", result.stderr).group(1))
    # The checkpoint on disk is the last good state: saved before the bad step, and finite.
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert 2 <= ckpt["step"] <= bad_step
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values())


def test_train_errors_are_one_line(byte_data, tmp_path):
    assert_user_error(train(byte_data, tmp_path / "x", "--max-iters=1", "--learning-rate=1"),
                      "unknown setting '--learning-rate=1'", "--lr")
    assert_user_error(train(byte_data, tmp_path / "x", "--max-iters=1", "--lr=fast"), "--lr='fast' is not a valid float")
    assert_user_error(train(byte_data, tmp_path / "x", "--max-iters=1", "--n-head=3"),
                      "n_embd=32 is not divisible by n_head=3")
    assert_user_error(train(byte_data, tmp_path / "x", "--max-iters=1", "--vocab-size=200"),
                      "vocabulary (257 tokens", "vocab_size=200")
    assert_user_error(train(byte_data, tmp_path / "x", "--max-iters=1", "--batch_tokens=100"),  # underscores work too
                      "--batch-tokens=100 is not a multiple")
    assert_user_error(train(tmp_path / "nowhere", tmp_path / "x", "--max-iters=1"), "meta.json", "prepare.py")
    # A truncated shard, then one whose tokens do not fit the vocabulary.
    bad = tmp_path / "bad"
    shutil.copytree(byte_data, bad)
    shard = bad / "train_0000.bin"
    shard.write_bytes(shard.read_bytes()[:-10])
    assert_user_error(train(bad, tmp_path / "x", "--max-iters=1"), "train_0000.bin", "truncated or corrupt")
    shard.write_bytes(np.full(len(shard.read_bytes()) // 2 + 5, 60000, dtype=np.uint16).tobytes())
    assert_user_error(train(bad, tmp_path / "x", "--max-iters=1"), "token id 60000 >= vocab_size=320")
    assert_user_error(train(byte_data, tmp_path / "none", "--resume", "--max-iters=1"), "ckpt.pt not found")


def test_lr_schedule_and_epoch_order():
    cfg = train_py.TrainConfig(lr=1.0, warmup_iters=10, min_lr_ratio=0.1)
    lrs = [train_py.lr_at(s, cfg, 110) for s in range(111)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)  # linear warmup to the peak
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))               # then only down ...
    assert lrs[60] == pytest.approx(0.55) and lrs[110] == pytest.approx(0.1)  # ... a cosine to 10 %
    order = train_py.EpochOrder(50, seed=3)
    epoch0, epoch1 = [order(g) for g in range(50)], [order(g) for g in range(50, 100)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(50)) and epoch0 != epoch1
    assert [train_py.EpochOrder(50, seed=3)(g) for g in range(50)] == epoch0

# -----------------------------------------------------------------------------
# sample.py

R50K = {"kind": "tiktoken", "name": "r50k_base"}
R50K_EOT = 50256
# A small byte-level BPE: the 256 bytes, then merges, each made of earlier tokens, several in more
# than one way (" the" = " t" + "he" = " " + "the"; "hell" = "h" + "ell" = "he" + "ll"), and a 4-byte
# emoji built from partial UTF-8 sequences.
LLAMA = "🦙".encode()
MERGES = [b"th", b"he", b"the", b" t", b" the", b"in", b"ing", b" s", b"an", b"and", b" and", b"ou",
          b"you", b" you", b"ll", b"ell", b"hell", b"\n\n", b"er", b" h", b" her", "é".encode(),
          LLAMA[:2], LLAMA[:3], LLAMA, b"  ", b"    "]
SMALL_EOT = 256 + len(MERGES)
SMALL_BPE = {
    "kind": "bpe", "name": "small-test-bpe",
    # GPT-2's split, except that digits go one at a time: the exported tokenizer must use this one.
    "pat_str": r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
    "special_tokens": {"<|endoftext|>": SMALL_EOT},
    "ranks": "".join(f"{base64.b64encode(t).decode()} {rank}\n"
                     for rank, t in enumerate([bytes([b]) for b in range(256)] + MERGES)),
}
UNICODE = ("héllo wörld — “quoted” naïve café 日本語のテキスト 🦙🦙 👍🏽 👨‍👩‍👧 Ω≈ç√ ﬁ\n\n\n"
           "\ttabs\t\tand   spaces   \n12345 6.02e23 it's they'll we've I'd")


def write_checkpoint(path, spec, eot_id, seed=0, **overrides):
    """A checkpoint exactly in train.py's format (notes/CONTEXT.md) holding a tiny random model."""
    cfg = dict(vocab_size=50257 if spec is R50K else SMALL_EOT + 1, n_layer=2, n_head=4, n_kv_head=2,
               n_embd=32, max_seq_len=64, multiple_of=16)
    cfg = ModelConfig(**{**cfg, **overrides})
    torch.manual_seed(seed)
    model = Transformer(cfg)
    with torch.no_grad():  # random norm weights, so that an export that dropped them would show
        for p in model.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    torch.save({
        "version": 1, "model": model.state_dict(), "model_config": dataclasses.asdict(cfg),
        "train_config": {"seed": seed}, "optimizer": torch.optim.AdamW(model.parameters()).state_dict(),
        "step": 0, "tokens_seen": 0, "best_val_loss": float("inf"),
        "rng": {"torch": torch.get_rng_state(), "cuda": []},
        "tokenizer": spec, "eot_id": eot_id,
    }, path)
    return str(path)


@pytest.fixture(scope="module")
def r50k_ckpt(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("r50k") / "ckpt.pt", R50K, R50K_EOT)


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("small") / "ckpt.pt", SMALL_BPE, SMALL_EOT)


def run_main(capsys, *args):
    sample.main([str(a) for a in args])
    return capsys.readouterr()


def full_logits_last(model, idx):
    """Logits (V,) at the last position of idx (1, T), from a forward over all of idx (no cache)."""
    return model(idx, targets=torch.zeros_like(idx))[0][0, -1]


def full_forward_greedy(model, ids, n, eot_id):
    """Reference greedy decoding: a full forward over the whole sequence for every new token."""
    idx = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(n):
            next_id = full_logits_last(model, idx).argmax()
            if next_id == eot_id:
                break
            idx = torch.cat([idx, next_id.view(1, 1)], dim=1)
    return idx[0, len(ids):].tolist()

# -----------------------------------------------------------------------------
# generation


def test_greedy_cli_is_the_argmax_of_full_forwards(r50k_ckpt, capsys):
    model, enc, _, _ = sample.load_checkpoint(r50k_ckpt)
    prompt = "First Citizen:\nBefore we proceed"
    new = full_forward_greedy(model.eval(), enc.encode(prompt), 25, R50K_EOT)
    assert len(new) > 10
    expected = prompt + enc.decode(new) + "\n" + "-" * 40 + "\n"
    greedy = run_main(capsys, "--ckpt", r50k_ckpt, "--prompt", prompt, "--max-new-tokens", 25, "--temperature", 0)
    assert greedy.out == expected
    # Sampling restricted to one token is greedy whatever the temperature: top-k 1, and a top-p
    # so small that the most likely token alone reaches it.
    for option, value in [("--top-k", 1), ("--top-p", 1e-9)]:
        out = run_main(capsys, "--ckpt", r50k_ckpt, "--prompt", prompt, "--max-new-tokens", 25,
                       "--temperature", 1.5, option, value).out
        assert out == expected, option


def test_padding_ids_are_never_sampled(tmp_path, capsys):
    """vocab_size rounded up past the tokenizer (50257 -> 50304 for speed) adds ids that no text has;
    sampling skips them. Here 40 padding ids on top of the small BPE's."""
    ckpt = write_checkpoint(tmp_path / "ckpt.pt", SMALL_BPE, SMALL_EOT, seed=1, vocab_size=SMALL_EOT + 41)
    model, enc, _, _ = sample.load_checkpoint(ckpt)
    prompt = enc.encode(" the hello")
    unrestricted = model.eval().generate(torch.tensor([prompt]), 30, temperature=0)[0, len(prompt):]
    assert (unrestricted > SMALL_EOT).any()  # this random model would pick padding ids
    with torch.no_grad():  # reference: greedy over the tokenizer's ids, full forward each step
        idx = torch.tensor([prompt])
        for _ in range(30):
            next_id = full_logits_last(model, idx)[:SMALL_EOT + 1].argmax()
            if next_id == SMALL_EOT:
                break
            idx = torch.cat([idx, next_id.view(1, 1)], dim=1)
    out = run_main(capsys, "--ckpt", ckpt, "--prompt", " the hello", "--max-new-tokens", 30, "--temperature", 0).out
    assert out == " the hello" + enc.decode(idx[0, len(prompt):].tolist()) + "\n" + "-" * 40 + "\n"


def test_same_seed_same_text(small_ckpt, capsys):
    args = ["--ckpt", small_ckpt, "--prompt", "To be, or not", "--max-new-tokens", 30, "--temperature", 1.0,
            "--num-samples", 2]
    a, b, c = (run_main(capsys, *args, "--seed", seed).out for seed in (7, 7, 8))
    assert a == b and a != c
    first, second = a.split("-" * 40 + "\n")[:2]
    assert first != second  # the samples of one run differ: the generator runs on


def test_a_reader_that_leaves_early_gets_no_traceback(small_ckpt):
    """python sample.py ... | head: the closed pipe ends the run quietly."""
    proc = subprocess.Popen([sys.executable, "sample.py", "--ckpt", str(small_ckpt), "--prompt", "To be",
                             "--max-new-tokens", "400", "--num-samples", "20", "--temperature", "1.0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    proc.stdout.read(5)  # the first characters, then hang up
    proc.stdout.close()
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 1 and "Traceback" not in stderr and "BrokenPipe" not in stderr, stderr


def test_compile_compiles_the_forward_generate_calls(small_ckpt, capsys):
    import torch._dynamo
    args = ["--ckpt", small_ckpt, "--prompt", " the", "--max-new-tokens", 12, "--temperature", 0]
    eager = run_main(capsys, *args).out
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = run_main(capsys, *args, "--compile").out
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the model really went through dynamo
    assert compiled == eager


def test_long_prompt_is_cropped_from_the_left(small_ckpt, capsys):
    model, enc, _, eot = sample.load_checkpoint(small_ckpt)
    prompt = " and you the hell" * 30
    ids = enc.encode(prompt)
    assert len(ids) > 100
    got = run_main(capsys, "--ckpt", small_ckpt, "--prompt", prompt, "--max-new-tokens", 40, "--temperature", 0)
    assert got.err == f"warning: the prompt has {len(ids)} tokens > max_seq_len=64; keeping the last 64\n"
    new = model.generate(torch.tensor([ids[-64:]]), 40, temperature=0, eos_id=eot)[0, 64:].tolist()
    new = new[:new.index(eot)] if eot in new else new
    assert got.out == prompt + enc.decode(new) + "\n" + "-" * 40 + "\n"


def test_decode_stream_never_prints_half_characters():
    enc = load_tokenizer(R50K)
    text = "naïve 🦙 and 👍🏽!"
    ids = enc.encode(text)
    pieces = list(sample.decode_stream(enc, ids + [50300]))  # 50300: a padding id past the vocabulary
    assert len(ids) > len(text.split())  # the emoji are split over several tokens ...
    assert "".join(pieces) == text and "\ufffd" not in "".join(pieces)
    assert "" in pieces  # ... so some tokens print nothing until their character completes
    half = enc.encode("🦙")[0]  # b"\xf0\x9f": the start of a 4-byte character, never completed
    assert "".join(sample.decode_stream(enc, [half])) == enc.decode([half]) == "\ufffd"


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_autocast(small_ckpt, capsys, dtype):
    """--dtype samples under autocast, where k and v come out in the low dtype and the KV cache
    stores them so (as in model.generate): half the memory of fp32."""
    out = run_main(capsys, "--ckpt", small_ckpt, "--prompt", " the", "--max-new-tokens", 20, "--temperature", 0,
                   "--dtype", dtype).out
    assert out.startswith(" the") and len(out) > len(" the\n" + "-" * 40) + 10
    model, enc, _, eot = sample.load_checkpoint(small_ckpt)
    with torch.autocast("cpu", dtype=getattr(torch, dtype)):
        tokens = model.generate_stream(torch.tensor([enc.encode(" the")]), 5, temperature=0, eos_id=eot)
        next(tokens)  # paused after the first new token, with its cache in place
        assert model.layers[0].self_attn.cache.k.dtype == getattr(torch, dtype)
        list(tokens)
    assert all(layer.self_attn.cache is None for layer in model.layers)  # and gone when done

# -----------------------------------------------------------------------------
# Hugging Face export and --hf-dir


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_export_generates_like_transformers(tmp_path, capsys, tie):
    transformers = pytest.importorskip("transformers")
    ckpt = write_checkpoint(tmp_path / "ckpt.pt", SMALL_BPE, SMALL_EOT, seed=3, tie_embeddings=tie, n_kv_head=2)
    folder = tmp_path / "hf"
    run_main(capsys, "--ckpt", ckpt, "--export-hf", folder)
    assert sorted(os.listdir(folder)) == ["config.json", "generation_config.json", "model.safetensors",
                                          "tokenizer.json", "tokenizer.tiktoken", "tokenizer_config.json"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    assert type(hf).__name__ == "LlamaForCausalLM" and hf.dtype == torch.float32
    assert hf.config.num_key_value_heads == 2 and hf.config.eos_token_id == SMALL_EOT
    assert (hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()) == tie

    model, enc, _, _ = sample.load_checkpoint(ckpt)
    for text in [" the hello", "and you 🦙"]:
        prompt = torch.tensor([enc.encode(text)])
        ours = model.generate(prompt, 30, temperature=0, eos_id=SMALL_EOT)
        theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=30,
                             do_sample=False, pad_token_id=SMALL_EOT)
        assert ours.size(1) > prompt.size(1) + 5 and torch.equal(theirs, ours)


@pytest.mark.parametrize("spec", [R50K, SMALL_BPE], ids=["r50k_base", "small-bpe"])
def test_exported_tokenizer_encodes_like_tiktoken(tmp_path, capsys, spec):
    transformers = pytest.importorskip("transformers")
    eot = R50K_EOT if spec is R50K else SMALL_EOT
    run_main(capsys, "--ckpt", write_checkpoint(tmp_path / "ckpt.pt", spec, eot), "--export-hf", tmp_path / "hf")
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    enc = load_tokenizer(spec)
    shakespeare = (SHARED / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")[:20_000]
    for text in [shakespeare, UNICODE, "  leading spaces", "x" + "<|endoftext|>" + "y"]:
        ids = enc.encode(text, allowed_special="all")
        assert tok.encode(text) == ids, text[:40]
        assert tok.decode(ids) == text
    assert tok.eos_token_id == eot and tok.bos_token_id == eot


def test_hf_dir_samples_like_the_checkpoint(tmp_path, r50k_ckpt, small_ckpt, capsys):
    pytest.importorskip("safetensors")
    greedy = ["--prompt", "Hello there, and", "--max-new-tokens", 30, "--temperature", 0]
    for name, ckpt in [("r50k", r50k_ckpt), ("small", small_ckpt)]:
        folder = tmp_path / name
        run_main(capsys, "--ckpt", ckpt, "--export-hf", folder)
        expected = run_main(capsys, "--ckpt", ckpt, *greedy).out
        assert run_main(capsys, "--hf-dir", folder, *greedy).out == expected
    # A Llama folder that carries no spec of ours: the tokenizer is named on the command line.
    config = json.loads((tmp_path / "r50k" / "config.json").read_text())
    del config["tiktoken_spec"]
    (tmp_path / "r50k" / "config.json").write_text(json.dumps(config))
    r50k_expected = run_main(capsys, "--ckpt", r50k_ckpt, *greedy).out
    assert run_main(capsys, "--hf-dir", tmp_path / "r50k", "--tokenizer", "r50k_base", *greedy).out == r50k_expected


def test_interactive_prompt_in_a_terminal(r50k_ckpt):
    pty = pytest.importorskip("pty")
    main_fd, terminal_fd = pty.openpty()  # stdin is a terminal: sample.py asks for prompts
    proc = subprocess.Popen([sys.executable, "sample.py", "--ckpt", r50k_ckpt, "--temperature", "0",
                             "--max-new-tokens", "10"], cwd=ROOT, stdin=terminal_fd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    os.close(terminal_fd)
    os.write(main_fd, b"Hello\n\x04")  # a prompt, then Ctrl-D
    out, err = proc.communicate(timeout=60)
    os.close(main_fd)
    model, enc, _, _ = sample.load_checkpoint(r50k_ckpt)
    completion = "Hello" + enc.decode(full_forward_greedy(model.eval(), enc.encode("Hello"), 10, R50K_EOT))
    assert proc.returncode == 0, err
    assert out == "> " + completion + "\n" + "-" * 40 + "\n> "

# -----------------------------------------------------------------------------
# errors: one line, exit code 2, no traceback


P = ["--prompt", "hi"]
ERRORS = {  # name: (arguments, with {d} for the folder of files error_runs writes; part of the message)
    "missing": (["--ckpt", "{d}/nope.pt", *P], "checkpoint {d}/nope.pt not found"),
    "truncated": (["--ckpt", "{d}/truncated.pt", *P], "is the file complete?"),
    "version": (["--ckpt", "{d}/v2.pt", *P], "not a version-1 checkpoint of this repo (version=2"),
    "missing-keys": (["--ckpt", "{d}/no_tokenizer.pt", *P], "missing keys: ['tokenizer']"),
    "empty-prompt": (["--ckpt", "{d}/good.pt", "--prompt", ""], "the prompt is empty"),
    "empty-prompt-file": (["--ckpt", "{d}/good.pt", "--prompt-file", "{d}/empty.txt"], "the prompt is empty"),
    "no-prompt": (["--ckpt", "{d}/good.pt"], "no prompt"),  # and stdin is not a terminal
    "temperature": (["--ckpt", "{d}/good.pt", *P, "--temperature", "-0.5"], "--temperature=-0.5 must be >= 0"),
    "top-p-0": (["--ckpt", "{d}/good.pt", *P, "--top-p", "0"], "--top-p=0.0 must be in (0, 1]"),
    "top-p-big": (["--ckpt", "{d}/good.pt", *P, "--top-p", "1.5"], "--top-p=1.5 must be in (0, 1]"),
    "top-k": (["--ckpt", "{d}/good.pt", *P, "--top-k", "0"], "--top-k=0 must be >= 1"),
    "num-samples": (["--ckpt", "{d}/good.pt", *P, "--num-samples", "0"], "--num-samples=0 must be >= 1"),
    "max-new-tokens": (["--ckpt", "{d}/good.pt", *P, "--max-new-tokens", "0"], "--max-new-tokens=0 must be >= 1"),
    "device": (["--ckpt", "{d}/good.pt", *P, "--device", "tpu"], "--device tpu is unknown or not on this machine"),
    "dtype": (["--ckpt", "{d}/good.pt", *P, "--dtype", "float8"], "invalid choice: 'float8'"),
    "not-a-number": (["--ckpt", "{d}/good.pt", *P, "--top-k", "many"], "invalid int value: 'many'"),
    "export-ablation": (["--ckpt", "{d}/learned.pt", "--export-hf", "{d}/out"], "pos_emb=learned"),
    "hf-dir-broken": (["--hf-dir", "{d}/broken_hf", *P], "cannot load {d}/broken_hf as a Llama"),
    "hf-dir-no-tokenizer": (["--hf-dir", "{d}/hf", *P], "name the tokenizer, e.g. --tokenizer r50k_base"),
}


@pytest.fixture(scope="module")
def error_runs(tmp_path_factory):
    """Runs every case of ERRORS in its own python process, four at a time (each spends seconds
    importing torch); returns {name: (exit code, stderr, expected message)}."""
    d = tmp_path_factory.mktemp("errors")
    good = write_checkpoint(d / "good.pt", SMALL_BPE, SMALL_EOT)
    data = Path(good).read_bytes()
    (d / "truncated.pt").write_bytes(data[:len(data) // 2])
    ckpt = torch.load(good, weights_only=True)
    torch.save({**ckpt, "version": 2}, d / "v2.pt")
    torch.save({k: v for k, v in ckpt.items() if k != "tokenizer"}, d / "no_tokenizer.pt")
    write_checkpoint(d / "learned.pt", SMALL_BPE, SMALL_EOT, pos_emb="learned")
    (d / "empty.txt").write_text("")
    (d / "broken_hf").mkdir()
    (d / "broken_hf" / "config.json").write_text("{}")
    (d / "broken_hf" / "model.safetensors").write_bytes(b"")
    sample.export_hf(*sample.load_checkpoint(good), d / "hf")  # a good folder, minus our tokenizer spec
    config = json.loads((d / "hf" / "config.json").read_text())
    (d / "hf" / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "tiktoken_spec"}))

    def run(name):
        args, expected = ERRORS[name]
        proc = subprocess.run([sys.executable, "sample.py", *(a.format(d=d) for a in args)], cwd=ROOT,
                              capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120)
        return name, (proc.returncode, proc.stderr, expected.format(d=d))

    with ThreadPoolExecutor(4) as pool:
        return dict(pool.map(run, ERRORS))


@pytest.mark.parametrize("name", ERRORS)
def test_errors_are_one_line(error_runs, name):
    returncode, stderr, expected = error_runs[name]
    assert returncode == 2 and "Traceback" not in stderr, stderr
    assert stderr.startswith("error: ") and stderr.count("\n") == 1, stderr
    assert expected in stderr, stderr


# -----------------------------------------------------------------------------
# Evaluation: HellaSwag (train.py)

HELLASWAG_ITEMS = [  # the official format: ctx, 4 endings, label (other fields omitted)
    {"ctx": "The cat sat on the", "endings": ["mat.", "moon and sang", "violin", "of"], "label": 0},
    {"ctx": "She poured the tea into a", "endings": ["hat", "cup and smiled.", "cloud", "river bank"], "label": 1},
    {"ctx": "To open the door, he turned the", "endings": ["page", "music", "key.", "tide of war"], "label": 2},
    {"ctx": "After the rain, the children played in the", "endings": ["oven", "attic dust", "ledger", "puddles."],
     "label": 3},
    {"ctx": "The chef sliced the onions with a", "endings": ["sharp knife.", "pillow", "song", "glance"], "label": 0},
    {"ctx": "At night the sky was full of", "endings": ["soup", "stars.", "chairs", "paperwork"], "label": 1},
    {"ctx": "He wrote the letter with a", "endings": ["hammer", "fish", "pen.", "storm"], "label": 2},
]


def byte_encoding():
    import tiktoken
    pattern = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
    return tiktoken.Encoding("bytes", pat_str=pattern, mergeable_ranks={bytes([i]): i for i in range(256)},
                             special_tokens={"<|endoftext|>": 256})


def hellaswag_file(tmp_path, items=HELLASWAG_ITEMS):
    path = tmp_path / "hellaswag.jsonl"
    path.write_text("".join(json.dumps({"ind": i, "split": "val", **item}) + "\n" for i, item in enumerate(items)))
    return path


def test_hellaswag_scores_equal_a_naive_per_ending_loop():
    enc, model = byte_encoding(), random_model(vocab_size=320, max_seq_len=40)
    items = HELLASWAG_ITEMS + [{"ctx": "x" * 60, "endings": ["a", "bb", "ccc", "dddd"], "label": 0}]  # cropped
    sums, means = train_py.score_hellaswag(model, enc, items, "cpu", nullcontext(), 40, items_per_batch=3)
    assert sums.shape == means.shape == (8, 4)
    for i, item in enumerate(items):
        for j, ending in enumerate(item["endings"]):
            ctx, end = enc.encode_ordinary(item["ctx"]), enc.encode_ordinary(" " + ending)
            row = torch.tensor([(ctx + end)[-41:]])
            with torch.no_grad():
                logp = F.log_softmax(full_logits(model, row[:, :-1])[0], dim=-1)  # (L-1, V)
            picked = [logp[t - 1, row[0, t]].item() for t in range(row.size(1) - len(end), row.size(1))]
            assert sums[i, j].item() == pytest.approx(sum(picked), abs=1e-4)
            assert means[i, j].item() == pytest.approx(sum(picked) / len(picked), abs=1e-5)


def test_hellaswag_overfit_model_is_always_right_constant_model_breaks_ties_first(tmp_path):
    enc, path = byte_encoding(), hellaswag_file(tmp_path)
    cfg = train_py.TrainConfig(hellaswag_path=str(path))
    torch.manual_seed(0)
    model = Transformer(tiny_config(vocab_size=320, n_embd=64, max_seq_len=64))
    texts = [enc.encode_ordinary(it["ctx"] + " " + it["endings"][it["label"]]) for it in HELLASWAG_ITEMS]
    L = max(map(len, texts))
    batch = torch.tensor([t + [256] * (L - len(t)) for t in texts])
    targets = batch[:, 1:].masked_fill(batch[:, 1:] == 256, -1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):  # learn the correct endings by heart
        _, loss = model(batch[:, :-1], targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
    result = train_py.evaluate_hellaswag(model, enc, cfg, 0, 1, "cpu", nullcontext(), 64)
    assert result == {"hellaswag_acc": 1.0, "hellaswag_acc_norm": 1.0, "hellaswag_items": 7}

    # All weights zero: every token gets probability 1/V. The mean per token ties everywhere, so
    # acc_norm always picks ending 0; the sum favours the ending with the fewest tokens.
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    result = train_py.evaluate_hellaswag(model, enc, cfg, 0, 1, "cpu", nullcontext(), 64)
    shortest = [min(range(4), key=lambda j: (len(enc.encode_ordinary(" " + it["endings"][j])), j))
                for it in HELLASWAG_ITEMS]
    expected_acc = sum(s == it["label"] for s, it in zip(shortest, HELLASWAG_ITEMS)) / 7
    assert result["hellaswag_acc_norm"] == pytest.approx(2 / 7)  # items whose label is 0
    assert result["hellaswag_acc"] == pytest.approx(expected_acc) and expected_acc != result["hellaswag_acc_norm"]


def test_eval_only_sharded_over_two_processes_equals_one(byte_data, tmp_path):
    out = tmp_path / "run"
    assert train(byte_data, out, "--max-iters=2", "--eval-every=2").returncode == 0
    path = hellaswag_file(tmp_path)
    records = []
    for procs in (None, 2):
        shutil.copy(out / "ckpt.pt", tmp_path / f"ckpt{procs}.pt")
        result = train(byte_data, out, "--eval-only", f"--ckpt={tmp_path / f'ckpt{procs}.pt'}",
                       f"--hellaswag-path={path}", torchrun=procs)
        assert result.returncode == 0, result.stderr
        assert "hellaswag_acc_norm" in result.stdout
        with open(tmp_path / "log.jsonl") as f:
            records.append(json.loads(f.readlines()[-1]))
    one, two = records
    assert one["hellaswag_items"] == two["hellaswag_items"] == 7
    for key in ("val_loss", "hellaswag_acc", "hellaswag_acc_norm"):
        assert one[key] == pytest.approx(two[key], abs=1e-6), key

# -----------------------------------------------------------------------------
# bench.py


def test_bench_runs_and_its_two_models_agree():
    """A tiny bench run: valid JSON, and the two models it races compute the same thing."""
    result = run([sys.executable, "bench.py", "--n-layer=1", "--n-embd=32", "--n-head=2", "--n-kv-head=1",
                  "--vocab-size=256", "--batch-size=2", "--seq-len=16", "--steps=1", "--repeats=1",
                  "--decode-new-tokens=8", "--sections=train,decode,tokenize", f"--text-file={SHAKESPEARE}"])
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["train_eager"]["first_loss"]["ours"] == pytest.approx(report["train_eager"]["first_loss"]["hf"],
                                                                         abs=1e-5)
    assert report["decode"]["same_tokens_as_hf"] and report["decode"]["same_tokens_as_no_cache"]
    paragraphs = [p for p in SHAKESPEARE.read_text().split("\n\n") if p.strip()]  # bench's documents
    enc = tiktoken.get_encoding("r50k_base")
    assert report["tokenize"]["tokens"] == sum(len(enc.encode_ordinary(p)) for p in paragraphs)
    assert report["tokenize"]["prepare_tok_s"] > 0 and report["tokenize"]["ratio"] > 0
    assert_user_error(run([sys.executable, "bench.py", "--sections=everything"]), "--sections=everything")
