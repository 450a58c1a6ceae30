"""
sample.py: generation against reference decoding, the streaming output, prompts and bad input.

    python -m pytest -q test_sample.py
"""
import json
import os
import pickle
import re
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

import decode
import sample
from checkpoint import load_for_inference
from common import printable
from model import Transformer
from tokenizer import load_tokenizer
from conftest import (random_model, R50K, R50K_EOT, ROOT, SMALL_BPE, SMALL_EOT, full_forward_greedy, full_logits, python,
                      write_checkpoint)

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
    return full_logits(model, idx)[0, -1]

# --- Generation -----------------------------------------------------------------------------------
def test_greedy_cli_is_the_argmax_of_full_forwards(r50k_ckpt, capsys):
    model, enc, _, _ = load_for_inference(r50k_ckpt)
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
    model, enc, _, _ = load_for_inference(ckpt)
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
    assert out == " the hello" + printable(enc.decode(idx[0, len(prompt):].tolist())) + "\n" + "-" * 40 + "\n"

def test_same_seed_same_text(small_ckpt, capsys):
    args = ["--ckpt", small_ckpt, "--prompt", "To be, or not", "--max-new-tokens", 30, "--temperature", 1.0,
            "--num-samples", 2]
    a, b, c = (run_main(capsys, *args, "--seed", seed).out for seed in (7, 7, 8))
    assert a == b and a != c
    first, second = a.split("-" * 40 + "\n")[:2]
    assert first != second  # the samples of one run differ: the generator runs on

@pytest.mark.slow
def test_a_reader_that_leaves_early_gets_no_traceback(small_ckpt):
    """python sample.py ... | head: the closed pipe ends the run quietly."""
    proc = subprocess.Popen([sys.executable, "sample.py", "--ckpt", str(small_ckpt), "--prompt", "To be",
                             "--max-new-tokens", "400", "--num-samples", "20", "--temperature", "1.0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    proc.stdout.read(5)  # the first characters, then hang up
    proc.stdout.close()
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=600) == 1 and "Traceback" not in stderr and "BrokenPipe" not in stderr, stderr

@pytest.mark.slow  # compiling costs ~10-20 s, though in this process
def test_the_compiled_step_decodes_the_same_tokens_as_eager(capsys, tmp_path):
    import torch._dynamo
    model = random_model(n_kv_head=2)  # GQA, fp32, a 64-token context
    step = decode.compiled_step(model)
    prompts = [torch.randint(0, 96, (1, n), generator=torch.Generator().manual_seed(n)) for n in (1, 9)]
    for prompt in prompts:  # one token, and a longer prompt; 100 new tokens run past the context twice
        eager = model.generate(prompt, 100, temperature=0)
        torch._dynamo.utils.counters.clear()
        compiled = model.generate(prompt, 100, temperature=0, step=step)
        assert torch.equal(eager, compiled)
    # compiled once: the second prompt reused the first's graph and its static cache
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 0
    # and through sample.py, with its speed line on stderr
    ckpt = write_checkpoint(tmp_path / "c.pt", SMALL_BPE, SMALL_EOT)
    args = ["--ckpt", ckpt, "--prompt", " the", "--max-new-tokens", 12, "--temperature", 0]
    assert run_main(capsys, *args).out == run_main(capsys, *args, "--compile").out

@pytest.mark.slow  # a compile per batch size and for autocast
def test_the_compiled_step_over_bf16_weights_decodes_as_the_rounded_model_does():
    model = random_model(n_kv_head=2)
    rounded = random_model(n_kv_head=2)  # the reference: every weight matrix rounded to bf16, all else fp32
    with torch.no_grad():
        for name, p in rounded.named_parameters():
            if p.dim() == 2 and not name.startswith("embed_"):
                p.copy_(p.bfloat16().float())
    prompts = torch.randint(0, 96, (3, 5), generator=torch.Generator().manual_seed(5))
    step = decode.compiled_step(model, torch.bfloat16)
    for rows in (prompts[:1], prompts):  # batch 1, and 3 rows decoded together
        assert torch.equal(model.generate(rows, 40, temperature=0, step=step), rounded.generate(rows, 40, temperature=0))
    # and under bf16 autocast (sample.py --dtype=bfloat16 --compile): the cache keeps the prefill's dtype
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.generate(prompts[:1], 70, temperature=0, step=step)  # past the 64-token context
    assert out.shape == (1, 75)

def test_products_as_sums_compute_what_the_products_do():
    """decode.ProductsAsSums, run eagerly: the rewritten linear, single-row products and attention
    against F.linear, matmul and F.scaled_dot_product_attention."""
    g = torch.Generator().manual_seed(0)
    w, q = torch.randn(24, 16, generator=g), torch.randn(2, 4, 1, 8, generator=g)     # (N, C), (B, H, 1, D)
    k, v = torch.randn(2, 2, 6, 8, generator=g), torch.randn(2, 2, 6, 8, generator=g)  # (B, Hkv, S, D)
    mask = torch.tensor([[True] * 4 + [False] * 2])                                   # (1, S)
    cases = [(F.linear, (torch.randn(3, 1, 16, generator=g), w), {}),  # 3 rows: each a dot with each of W's rows
             (F.linear, (torch.randn(16, generator=g), w), {}),
             (torch.matmul, (q, k.repeat(1, 2, 1, 1).transpose(-2, -1)), {}),     # (B, H, 1, S)
             (F.scaled_dot_product_attention, (q, k, v), {"attn_mask": mask, "enable_gqa": True})]
    for func, args, kwargs in cases:
        with decode.ProductsAsSums():
            got = func(*args, **kwargs)
        torch.testing.assert_close(got, func(*args, **kwargs), rtol=1e-5, atol=1e-5)
    x = torch.randn(decode.MAX_ROWS + 1, 16, generator=g)  # more rows than MAX_ROWS: F.linear itself,
    with decode.ProductsAsSums():                          # over the weights in x's dtype
        assert torch.equal(F.linear(x, w), x @ w.t())
        assert torch.equal(F.linear(x, w.bfloat16()), x @ w.bfloat16().float().t())

def test_batch_decoding_equals_decoding_each_row_alone():
    model = random_model()
    prompts = torch.randint(0, 96, (4, 7), generator=torch.Generator().manual_seed(3))
    eos = int(model.generate(prompts[:1], 3, temperature=0)[0, -1])  # a token row 0 soon writes: it stops early
    together = torch.cat(list(model.generate_stream(prompts, 20, temperature=0, eos_id=eos)), dim=1)
    for row, prompt in enumerate(prompts):
        alone = torch.cat(list(model.generate_stream(prompt[None], 20, temperature=0, eos_id=eos)), dim=1)[0]
        n = len(alone)
        assert torch.equal(together[row, :n], alone)  # the same tokens, to its own end ...
        assert (together[row, n:] == eos).all()  # ... and after its end, eos while the others go on
    assert (together == eos).any(dim=1).sum() >= 1 and together.size(1) > 3

def test_the_speed_line_goes_to_stderr(small_ckpt, capsys):
    sample.main(["--ckpt", str(small_ckpt), "--prompt", "the hell", "--max-new-tokens", "8", "--num-samples", "3"])
    out, err = capsys.readouterr()
    assert out.count("-" * 40) == 3 and "speed" not in out  # the text alone on stdout
    assert re.fullmatch(r"speed: [\d,]+ prompt tokens, prefill [\d,]+ ms; decoding [\d,]+ tokens/s over [\d,]+ tokens\n",
                        err), err

def test_long_prompt_is_cropped_from_the_left(small_ckpt, capsys):
    model, enc, eot, _ = load_for_inference(small_ckpt)
    prompt = " and you the hell" * 30
    ids = enc.encode(prompt)
    assert len(ids) > 100
    got = run_main(capsys, "--ckpt", small_ckpt, "--prompt", prompt, "--max-new-tokens", 40, "--temperature", 0)
    assert got.err.startswith(f"warning: the prompt has {len(ids)} tokens > max_seq_len=64; keeping the last 64\nspeed: ")
    new = model.generate(torch.tensor([ids[-64:]]), 40, temperature=0, eos_id=eot)[0, 64:].tolist()
    new = new[:new.index(eot)] if eot in new else new
    assert got.out == prompt + printable(enc.decode(new)) + "\n" + "-" * 40 + "\n"

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
    model, enc, eot, _ = load_for_inference(small_ckpt)
    with torch.autocast("cpu", dtype=getattr(torch, dtype)):
        tokens = model.generate_stream(torch.tensor([enc.encode(" the")]), 5, temperature=0, eos_id=eot)
        next(tokens)  # paused after the first new token, with its cache in place
        assert model.layers[0].self_attn.cache.k.dtype == getattr(torch, dtype)
        list(tokens)
    assert all(layer.self_attn.cache is None for layer in model.layers)  # and gone when done

def test_no_prompt_starts_a_new_document(small_ckpt, capsys):
    """Without a prompt the text starts from end-of-text, as every document in the data does."""
    model, enc, eot, _ = load_for_inference(small_ckpt)
    new = full_forward_greedy(model, [eot], 30, eot)
    assert len(new) > 5
    out = run_main(capsys, "--ckpt", small_ckpt, "--max-new-tokens", 30, "--temperature", 0).out
    assert out == printable(enc.decode(new)) + "\n" + "-" * 40 + "\n"

@pytest.mark.slow
def test_interactive_prompts_in_a_terminal_and_from_a_pipe(r50k_ckpt):
    pty = pytest.importorskip("pty")
    model, enc, _, _ = load_for_inference(r50k_ckpt)
    completions = ["".join([p, enc.decode(full_forward_greedy(model, enc.encode(p), 10, R50K_EOT))])
                   for p in ("Hello", "World")]
    args = [sys.executable, "sample.py", "--ckpt", r50k_ckpt, "--temperature", "0", "--max-new-tokens", "10",
            "--interactive"]
    main_fd, terminal_fd = pty.openpty()  # stdin is a terminal: sample.py asks for prompts after "> "
    proc = subprocess.Popen(args, cwd=ROOT, stdin=terminal_fd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    os.close(terminal_fd)
    os.write(main_fd, b"Hello\n\x04")  # a prompt, then Ctrl-D
    out, err = proc.communicate(timeout=600)
    os.close(main_fd)
    assert proc.returncode == 0, err
    assert out == "> " + completions[0] + "\n" + "-" * 40 + "\n> "
    piped = subprocess.run(args, cwd=ROOT, input="Hello\n\nWorld\n", capture_output=True, text=True, timeout=600)
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout == "".join(c + "\n" + "-" * 40 + "\n" for c in completions)

# --- Bad input: one line, exit code 2 -------------------------------------------------------------
P = ["--prompt", "hi"]
ERRORS = {  # name: (arguments, with {d} for the folder of files bad_files writes; part of the message)
    "missing": (["--ckpt", "{d}/nope.pt", *P], "checkpoint {d}/nope.pt not found"),
    "truncated": (["--ckpt", "{d}/truncated.pt", *P], "a damaged file, or not one train.py wrote"),
    # a plain pickle, even one that would call code: refused in one line, without torch's warnings first
    "raw-pickle": (["--ckpt", "{d}/raw.pt", *P], "cannot read checkpoint {d}/raw.pt (UnpicklingError)"),
    "version": (["--ckpt", "{d}/v2.pt", *P], "not a version-1 checkpoint of this repo (version=2"),
    "missing-keys": (["--ckpt", "{d}/no_tokenizer.pt", *P], "missing keys: ['tokenizer']"),
    "bad-spec": (["--ckpt", "{d}/bad_spec.pt", *P], "cannot build the tokenizer of {d}/bad_spec.pt"),
    "empty-prompt": (["--ckpt", "{d}/good.pt", "--prompt", ""], "the prompt is empty"),
    "empty-prompt-file": (["--ckpt", "{d}/good.pt", "--prompt-file", "{d}/empty.txt"], "the prompt is empty"),
    "no-prompt-file": (["--ckpt", "{d}/good.pt", "--prompt-file", "{d}/none.txt"], "cannot read --prompt-file"),
    "both": (["--ckpt", "{d}/good.pt", "--hf-dir", "{d}/hf", *P], "not both"),
    "temperature": (["--ckpt", "{d}/good.pt", *P, "--temperature", "-0.5"], "--temperature=-0.5 must be >= 0"),
    "temperature-nan": (["--ckpt", "{d}/good.pt", *P, "--temperature", "nan"], "'nan' is not a finite number"),
    "top-p-0": (["--ckpt", "{d}/good.pt", *P, "--top-p", "0"], "--top-p=0.0 must be in (0, 1]"),
    "top-p-big": (["--ckpt", "{d}/good.pt", *P, "--top-p", "1.5"], "--top-p=1.5 must be in (0, 1]"),
    "top-k": (["--ckpt", "{d}/good.pt", *P, "--top-k", "0"], "--top-k=0 must be >= 1"),
    "num-samples": (["--ckpt", "{d}/good.pt", *P, "--num-samples", "0"], "--num-samples=0 must be >= 1"),
    "max-new-tokens": (["--ckpt", "{d}/good.pt", *P, "--max-new-tokens", "0"], "--max-new-tokens=0 must be >= 1"),
    "device": (["--ckpt", "{d}/good.pt", *P, "--device", "tpu"], "--device=tpu is unknown or not on this machine"),
    "dtype": (["--ckpt", "{d}/good.pt", *P, "--dtype", "float8"], "--dtype=float8 must be"),
    "not-a-number": (["--ckpt", "{d}/good.pt", *P, "--top-k", "many"], "'many' is not a valid int"),
    "unknown": (["--ckpt", "{d}/good.pt", *P, "--topk", "5"], "unknown setting '--topk'"),
    "hf-dir-broken": (["--hf-dir", "{d}/broken_hf", *P], "cannot load {d}/broken_hf as a Llama"),
    "hf-dir-no-tokenizer": (["--hf-dir", "{d}/hf", *P], "has no tokenizer (tokenizer.json"),
    "hf-dir-wrong-tokenizer": (["--hf-dir", "{d}/hf", "--tokenizer", "r50k_base", *P], "wrong tokenizer?"),
}

@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("errors")
    good = write_checkpoint(d / "good.pt", SMALL_BPE, SMALL_EOT)
    data = open(good, "rb").read()
    (d / "truncated.pt").write_bytes(data[:len(data) // 2])
    (d / "raw.pt").write_bytes(pickle.dumps({"model": os.system}, protocol=4))
    ckpt = torch.load(good, weights_only=True)
    torch.save({**ckpt, "version": 2}, d / "v2.pt")
    torch.save({k: v for k, v in ckpt.items() if k != "tokenizer"}, d / "no_tokenizer.pt")
    torch.save({**ckpt, "tokenizer": {**SMALL_BPE, "ranks": "not base64 ranks"}}, d / "bad_spec.pt")
    (d / "empty.txt").write_text("")
    (d / "broken_hf").mkdir()
    (d / "broken_hf" / "config.json").write_text("{}")
    (d / "broken_hf" / "model.safetensors").write_bytes(b"")
    import hf  # a good folder, minus any tokenizer (our spec and tokenizer.json)
    (d / "hf").mkdir()
    hf.export_hf(*load_for_inference(good), d / "hf")
    config = json.loads((d / "hf" / "config.json").read_text())
    (d / "hf" / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "tiktoken_spec"}))
    (d / "hf" / "tokenizer.json").unlink(missing_ok=True)
    return d

@pytest.mark.parametrize("name", ERRORS)
def test_bad_input_is_one_line(bad_files, capsys, name):
    args, expected = ERRORS[name]
    with pytest.raises(SystemExit) as exit, warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")  # a warning would print before the one line
        sample.main([a.format(d=bad_files) for a in args])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert not warned, [str(w.message) for w in warned]
    assert expected.format(d=bad_files) in err, err

@pytest.mark.slow
def test_help_and_a_bad_flag_from_the_command_line(small_ckpt):
    result = python("sample.py", "--help")
    assert result.returncode == 0 and all("--" + f.replace("_", "-") in result.stdout
                                          for f in sample.SampleConfig.__dataclass_fields__)
    result = python("sample.py", "--ckpt", small_ckpt, "--top-k", "many")
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "'many' is not a valid int" in result.stderr

def test_the_decoding_dtype_follows_the_width_and_the_cpu_never_a_timing(small_ckpt, monkeypatch):
    import dataclasses

    import hardware
    model = load_for_inference(small_ckpt)[0].eval()
    wide = Transformer(dataclasses.replace(model.config, n_embd=256, n_head=4, n_kv_head=2, ffn_hidden=0))
    cpu = torch.device("cpu")
    assert sample.decode_dtype(model, "bfloat16", cpu) == torch.bfloat16  # asked for: given
    for has_bf16 in (False, True):
        monkeypatch.setattr(hardware, "cpu_has_bf16", lambda: has_bf16)
        assert sample.decode_dtype(model, "auto", cpu) == torch.float32  # d32: fp32 decodes faster
        assert sample.decode_dtype(wide, "auto", cpu) == (torch.bfloat16 if has_bf16 else torch.float32)

def test_control_bytes_from_the_model_or_the_prompt_never_reach_the_terminal(tmp_path, capsys):
    # a model whose every logit is 0 picks id 0 greedily: the byte NUL, a control character
    ckpt = torch.load(write_checkpoint(tmp_path / "c.pt", SMALL_BPE, SMALL_EOT), weights_only=True)
    ckpt["model"]["lm_head.weight"].zero_()
    torch.save(ckpt, tmp_path / "nul.pt")
    out = run_main(capsys, "--ckpt", tmp_path / "nul.pt", "--prompt", "\x1b[31mred", "--temperature", 0,
                   "--max-new-tokens", 3).out
    assert out.startswith("\\x1b[31mred\\x00\\x00\\x00\n")  # shown, not obeyed
    assert not any(c != "\n" and not c.isprintable() for c in out)

@pytest.mark.slow
def test_the_same_command_and_seed_give_the_same_text(small_ckpt):
    args = ["--ckpt", small_ckpt, "--prompt", "the hell", "--seed", 1, "--max-new-tokens", 60]
    texts = {python("sample.py", *args).stdout for _ in range(2)}
    assert len(texts) == 1 and len(texts.pop()) > 60
