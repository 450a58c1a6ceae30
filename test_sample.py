"""
Tests of sample.py, CPU-only and offline, on tiny random models (to be merged into test_model.py):

    python -m pytest -q test_sample.py

Checkpoints are written in train.py's format by write_checkpoint() below; the tokenizers are GPT-2's
r50k_base (ranks from ../shared/tiktoken_cache) and a small BPE whose ranks the test builds.
"""
import base64
import dataclasses
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent
SHARED = ROOT.parent / "shared"
os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED / "tiktoken_cache"))
torch.set_num_threads(1)  # tiny models: a second thread only adds sync (3-6x slower on a busy machine)

import sample  # noqa: E402  (after TIKTOKEN_CACHE_DIR: sample imports tiktoken through prepare)
from model import ModelConfig, Transformer  # noqa: E402
from prepare import load_tokenizer  # noqa: E402

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


@pytest.mark.parametrize("options", [dict(temperature=0), dict(temperature=1.0, top_k=20),
                                     dict(temperature=0.9, top_p=0.8)], ids=["greedy", "top-k", "top-p"])
def test_stream_draws_what_model_generate_draws(small_ckpt, options):
    model, enc, _, eot = sample.load_checkpoint(small_ckpt)
    model.eval()
    # 50 prompt + 60 new tokens > max_seq_len=64: the cache restarts from the recent half on the way.
    prompt = torch.tensor([enc.encode(" the hello and you " * 20)[:50]])
    assert prompt.shape == (1, 50)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    streamed = list(sample.stream(model, prompt, 60, eos_id=eot, generator=g1, **{"top_k": None, "top_p": None, **options}))
    generated = model.generate(prompt, 60, eos_id=eot, generator=g2, **options)[0, 50:].tolist()
    until_eot = generated[:generated.index(eot)] if eot in generated else generated
    assert streamed == until_eot and len(streamed) > 20


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
        tokens = sample.stream(model.eval(), torch.tensor([enc.encode(" the")]), 5, 0, None, None, eot, None)
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
