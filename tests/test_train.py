"""
train.py: exact resume, 2 processes = 1 process with accumulation, signals, faults and bad input.

    python -m pytest -q test_train.py

Runs are tiny (2 layers, d32, T=32) on byte-level Tiny Shakespeare (conftest.byte_data). Bad
input is checked in-process where train.py refuses it before training; everything that trains
runs as a subprocess, as a user starts it (marked slow).
"""
import collections
import json
import math
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import fields

import numpy as np
import pytest
import torch

import prepare
import data as data_py
import evaluate
import hf
import presets
import train as train_py
from checkpoint import load_for_inference, save_checkpoint
import hardware
from conftest import (SHAKESPEARE, TINY_RUN, ROOT, assert_user_error, losses, python, tiny_config, train,
                      train_here)
from model import ModelConfig, Transformer

def refused(capsys, *args):
    """train.py's one-line error for args, run in this process: it refuses before training starts."""
    with pytest.raises(SystemExit) as exit:
        train_py.main([str(a) for a in args])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    return err

# --- Training runs --------------------------------------------------------------------------------
@pytest.mark.slow
def test_resume_continues_exactly(byte_data, tmp_path):
    # Dropout makes the run depend on the RNG state too, which the checkpoint must restore. (Muon's
    # resume: test_ddp_and_fsdp_equal_one_process_and_resume_across_each_other.)
    common = ["--dropout=0.1", "--eval-every=3"]
    straight = train_here(byte_data, tmp_path / "a", "--max-iters=6", *common)
    assert straight.returncode == 0, straight.stderr
    first = train_here(byte_data, tmp_path / "b", "--max-iters=3", *common)
    assert first.returncode == 0, first.stderr
    second = train_here(byte_data, tmp_path / "b", "--resume", "--max-iters=6")
    assert second.returncode == 0, second.stderr
    assert len(losses(tmp_path / "a")) == 6
    assert losses(tmp_path / "b") == losses(tmp_path / "a")  # exact equality on CPU
    # A run at its length already: nothing to do, said so, exit 0, nothing written.
    before = {p.name: p.read_bytes() for p in (tmp_path / "b").iterdir()}
    done = train_here(byte_data, tmp_path / "b", "--resume", "--max-iters=4")
    assert done.returncode == 0 and "is at step 6, the run has 4 steps: nothing to do" in done.stdout, done.stderr
    assert {p.name: p.read_bytes() for p in (tmp_path / "b").iterdir()} == before

@pytest.mark.slow
def test_a_mixture_resumes_exactly_and_two_processes_equal_one(byte_mixture, tmp_path):
    one = train_here(byte_mixture, tmp_path / "one", "--max-iters=4", "--batch-tokens=256", "--eval-every=2")
    assert one.returncode == 0, one.stderr
    assert "(70% of the batches)" in one.stdout and "(30% of the batches)" in one.stdout
    two = train(byte_mixture, tmp_path / "two", "--max-iters=4", "--eval-every=2", torchrun=2)
    assert two.returncode == 0, two.stderr
    # FSDP in bf16 (its mixed precision: bf16 weights gathered, fp32 gradients reduced), with both memory
    # savers: the same run as DDP's autocast but for rounding
    lean = train(byte_mixture, tmp_path / "lean", "--max-iters=4", "--eval-every=2", "--dtype=bfloat16",
                 "--parallel=fsdp", "--activation-checkpointing", "--chunked-loss", torchrun=2)
    assert lean.returncode == 0 and "bfloat16, compile off, 2 process(es) (FSDP)" in lean.stdout, lean.stderr
    half = train_here(byte_mixture, tmp_path / "half", "--max-iters=2", "--batch-tokens=256", "--eval-every=2")
    assert half.returncode == 0, half.stderr
    resumed = train_here(byte_mixture, tmp_path / "half", "--resume", "--max-iters=4")
    assert resumed.returncode == 0, resumed.stderr
    a, b, c = losses(tmp_path / "one"), losses(tmp_path / "two"), losses(tmp_path / "half")
    assert a == c and len(a) == 4  # resumed: exactly the same
    assert max(abs(x[1] - y[1]) for x, y in zip(a, b)) <= 1e-5
    assert max(abs(x[1] - y[1]) for x, y in zip(b, losses(tmp_path / "lean"))) <= 1e-2
    evals = [json.loads(line) for line in open(tmp_path / "one" / "log.jsonl") if "val_loss" in line]
    sources = [k for k in evals[-1] if k.startswith("val_loss[")]  # each source's, and the weighted mean
    assert len(sources) == 2
    assert evals[-1]["val_loss"] == pytest.approx(0.7 * evals[-1][sources[0]] + 0.3 * evals[-1][sources[1]])

def weights(out):
    return torch.load(out / "ckpt.pt", weights_only=True)["model"]

@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_ddp_and_fsdp_equal_one_process_and_resume_across_each_other(byte_data, tmp_path, optimizer):
    # fp32: FSDP's bf16 mixed precision would round differently from DDP's autocast
    opt = [f"--optimizer={optimizer}", "--eval-every=2", "--dtype=float32", "--batch-tokens=256"]
    two = dict(torchrun=2)
    runs = {"one": train_here(byte_data, tmp_path / "one", "--max-iters=4", *opt),
            "ddp": train(byte_data, tmp_path / "ddp", "--max-iters=4", *opt, **two),
            # and the memory savers, which must not change a thing either
            "fsdp": train(byte_data, tmp_path / "fsdp", "--max-iters=2", "--parallel=fsdp",
                          "--activation-checkpointing", "--chunked-loss", *opt, **two)}
    assert all(r.returncode == 0 for r in runs.values()), [r.stderr for r in runs.values()]
    assert "1 process(es) x 2 micro-batch" in runs["one"].stdout and "2 process(es) x 1 micro" in runs["ddp"].stdout
    assert "2 process(es) (FSDP) x 1 micro-batch" in runs["fsdp"].stdout
    # FSDP's checkpoint at step 2 resumes under FSDP, under DDP and on one process: the same steps 3, 4.
    # (Muon: on one process only; its states go through the same calls as AdamW's.) fsdp_one's log
    # holds FSDP's steps 1, 2 too.
    resumes = {"fsdp": ["--parallel=fsdp"], "fsdp_ddp": ["--parallel=ddp"], "fsdp_one": []}
    if optimizer == "muon":
        resumes = {"fsdp_one": []}
    for name in resumes:
        if name != "fsdp":
            shutil.copytree(tmp_path / "fsdp", tmp_path / name)
    for name, flags in resumes.items():
        run = train if flags else train_here  # (one process: in this one)
        resumed = run(byte_data, tmp_path / name, "--resume", "--max-iters=4", *flags, **(two if flags else {}))
        assert resumed.returncode == 0, resumed.stderr
    one = losses(tmp_path / "one")
    assert [s for s, _ in one] == [1, 2, 3, 4]
    for name in ["ddp", *resumes]:
        assert [s for s, _ in losses(tmp_path / name)] == [1, 2, 3, 4], name
        assert max(abs(x[1] - y[1]) for x, y in zip(one, losses(tmp_path / name))) <= 1e-5, name
        # the final weights too (the checkpoint holds them whole, whoever wrote it)
        reference, final = weights(tmp_path / "one"), weights(tmp_path / name)
        assert reference.keys() == final.keys()
        assert max((reference[k] - final[k]).abs().max().item() for k in reference) <= 1e-5, name
    # what FSDP wrote is an ordinary checkpoint: sample.py's loader and export.py take it
    model, enc, eot_id, spec = load_for_inference(str(tmp_path / "fsdp" / "ckpt.pt"))
    (tmp_path / "hf").mkdir()
    hf.export_hf(model, enc, eot_id, spec, str(tmp_path / "hf"))
    assert (tmp_path / "hf" / "model.safetensors").is_file() and (tmp_path / "hf" / "tokenizer.json").is_file()

@pytest.mark.slow
def test_loss_falls_and_checkpoint_loads_with_weights_only(byte_data, tmp_path):
    result = train_here(byte_data, tmp_path / "run", "--max-iters=40", "--eval-every=20", "--lr=3e-3",
                   "--sample-tokens=20", "--plot=true")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "run" / "loss.png").read_bytes().startswith(b"\x89PNG")  # drawn, as the banner said
    with open(tmp_path / "run" / "log.jsonl") as f:
        vals = [r["val_loss"] for r in map(json.loads, f) if "val_loss" in r]
    assert len(vals) == 3 and vals[2] < vals[0] - 1.0  # from ~ln(320) = 5.8 to well below
    for name in ("ckpt.pt", "best.pt"):
        ckpt = torch.load(tmp_path / "run" / name, weights_only=True)
        assert ckpt["step"] == 40 and ckpt["tokenizer"]["kind"] == "bpe"
        model = Transformer(ModelConfig(**ckpt["model_config"]))
        model.load_state_dict(ckpt["model"])
    # The console: a banner, samples as indented text, and a closing summary with the next commands.
    out = result.stdout
    assert out.startswith("settings ") and "\nmodel " in out and "\nplan " in out and "\noutput " in out
    assert "sample:\n  | " in out and "\\x" not in out.split("eval step 40")[1].split("done:")[0].replace(
        "\\x", "") and f"python sample.py --ckpt {tmp_path / 'run' / 'best.pt'}" in out
    assert "done: 40 steps" in out and f"best val loss {min(vals):.4f}" in out
    # --eval-only offline, with no HellaSwag file at hand: the val loss and bits per byte, no download
    offline = {"NO_PROXY": "*", "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"}
    again = train(byte_data, tmp_path / "run", "--eval-only", f"--ckpt={tmp_path / 'run' / 'best.pt'}",
                  cwd=tmp_path, env=offline)
    assert again.returncode == 0, again.stderr
    assert f"val_loss {min(vals):.4f}" in again.stdout and "val_bpb" in again.stdout
    assert "hellaswag" not in again.stdout and not (tmp_path / "data").exists()

@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_resume_continues(byte_data, tmp_path):
    out = tmp_path / "run"
    args = [sys.executable, "train.py", f"--data={byte_data}", f"--out-dir={out}", *TINY_RUN,
            "--max-iters=100000", "--eval-every=100000"]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.time() + 600
        while time.time() < deadline and not ((out / "log.jsonl").exists() and len(losses(out)) >= 3):
            time.sleep(0.2)
        # A second run on the same out_dir meanwhile: refused, naming the first one's pid.
        assert_user_error(train_here(byte_data, out, "--max-iters=5"), "is in use by another run", f"pid {proc.pid}")
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, stderr
    assert "stopped by signal" in stdout
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    saved = ckpt["step"]
    assert saved >= 3 and [s for s, _ in losses(out)][-1] == saved
    resumed = train_here(byte_data, out, "--resume", f"--max-iters={saved + 2}")
    assert resumed.returncode == 0, resumed.stderr
    assert [s for s, _ in losses(out)][-2:] == [saved + 1, saved + 2]

@pytest.mark.slow
def test_nonfinite_loss_stops_and_keeps_the_checkpoint(byte_data, tmp_path):
    out = tmp_path / "run"
    assert train_here(byte_data, out, "--max-iters=2", "--eval-every=2").returncode == 0
    # An absurd learning rate without clipping blows the weights up within a few steps.
    blowup = ["--lr=1e6", "--grad-clip=0", "--eval-every=1", "--dtype=float32"]  # bf16 saturates instead
    result = train_here(byte_data, out, "--resume", "--max-iters=50", *blowup)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "still holds the last good state" in result.stderr
    bad_step = int(result.stderr.split("at step ")[1].split(";")[0])
    # The checkpoint on disk is the last good state: saved before the bad step, and finite.
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert 2 <= ckpt["step"] <= bad_step
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values())
    # A fresh run that blows up before its first checkpoint does not claim one.
    fresh = train_here(byte_data, tmp_path / "fresh", "--max-iters=50", *blowup[:2], "--eval-every=100")
    assert fresh.returncode == 1 and "no checkpoint was written" in fresh.stderr, fresh.stderr
    assert not (tmp_path / "fresh" / "ckpt.pt").exists()

@pytest.mark.slow
def test_a_full_disk_while_saving_keeps_the_previous_checkpoint(byte_data, tmp_path):
    out = tmp_path / "run"
    assert train_here(byte_data, out, "--max-iters=2", "--eval-every=2").returncode == 0
    before = (out / "ckpt.pt").read_bytes()

    def small_disk():  # files may grow to 100 kB: the 450 kB checkpoint does not fit
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
    result = train(byte_data, out, "--resume", "--max-iters=4", "--eval-every=2", preexec_fn=small_disk)
    assert_user_error(result, f"cannot write {out / 'ckpt.pt'}", "is as it was before")
    assert (out / "ckpt.pt").read_bytes() == before and not list(out.glob("*.tmp"))

@pytest.mark.slow
def test_runs_do_not_mix_in_one_out_dir(byte_data, tmp_path):
    out = tmp_path / "run"
    assert train_here(byte_data, out, "--max-iters=2", "--eval-every=2").returncode == 0
    before = (out / "ckpt.pt").read_bytes()
    assert_user_error(train_here(byte_data, out, "--max-iters=2"), "holds a run already", "--resume", "--overwrite")
    assert (out / "ckpt.pt").read_bytes() == before
    again = train_here(byte_data, out, "--max-iters=3", "--eval-every=3", "--overwrite")
    assert again.returncode == 0, again.stderr
    assert [s for s, _ in losses(out)] == [1, 2, 3]  # the old run's records are gone, not mixed in
    # under torchrun the reason ends the output too: its failure summary, not 30 lines above it
    refused = train(byte_data, out, "--max-iters=3", torchrun=2)
    assert refused.returncode != 0 and (out / "ckpt.pt").exists()
    tail = refused.stderr.strip().splitlines()[-3:]
    assert any("error: " in line and "holds a run already" in line for line in tail), refused.stderr

@pytest.mark.slow
def test_corrupt_token_ids_are_found_in_the_shard_that_holds_them(byte_data, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(byte_data, bad)
    # 300 is past the data's vocabulary (257) but inside the model's padded one (320): only a check
    # against the data's size finds it.
    shard = bad / "train_0000.bin"
    shard.write_bytes(np.full(len(shard.read_bytes()) // 2, 300, dtype=np.uint16).tobytes())
    assert_user_error(train_here(bad, tmp_path / "x", "--max-iters=1"), "token id 300 >= the data's vocab_size=257",
                      "train_0000.bin")

@pytest.mark.slow
def test_help_lists_every_setting_and_the_presets():
    result = python("train.py", "--help")
    assert result.returncode == 0, result.stderr
    for f in [*train_py.TrainConfig.__dataclass_fields__, *ModelConfig.__dataclass_fields__]:
        assert "--" + f.replace("_", "-") in result.stdout, f
    for preset in presets.PRESETS:
        assert f"  {preset}: " in result.stdout
    assert "(default: 1337)" in result.stdout  # --seed

@pytest.mark.slow
def test_help_shows_the_values_a_run_uses_and_the_banner_names_the_rest(byte_data, tmp_path):
    # wide enough that argparse puts each help on one line; a long flag's goes on the next, joined here
    shown = re.sub(r"\n {20,}", " ", python("train.py", "--help", env={"COLUMNS": "2000"}).stdout)
    defaults = dict(re.findall(r"^  --([a-z0-9-]+) \S+ +.*\(default: (.*)\)$", shown, re.M))
    assert defaults["optimizer"] == "'muon'" and defaults["max-iters"] == "250"  # the demo's, not generic ones
    given = ["--max-iters=2", "--n-layer=1", "--n-embd=32", "--n-head=2", "--n-kv-head=1", "--eval-batches=2",
             "--sample-tokens=0", "--lr=0.005", "--peak-flops=1e11"]
    result = python("train.py", f"--data={byte_data}", f"--out-dir={tmp_path}", *given)
    assert result.returncode == 0, result.stderr
    banner = result.stdout[result.stdout.index("settings "):result.stdout.index("(the rest: python train.py --help)")]
    named = dict(re.findall(r"--([a-z0-9-]+)=(\S+)", banner))
    # what the banner names: the flags given, and the vocabulary, which comes from the data
    assert set(named) == {a[2:].split("=")[0] for a in given} | {"data", "out-dir", "vocab-size"}
    config = json.loads((tmp_path / "config.json").read_text())
    used = {k.replace("_", "-"): v for k, v in {**config["train"], **config["model"]}.items()}
    assert named["vocab-size"] == str(used["vocab-size"]) == "320"  # 257 byte-level ids, rounded up to 64s
    # everything else the run used is what --help printed (ffn_hidden: 0 derives it, as its help says)
    for name, value in used.items():
        if name not in named and name != "ffn-hidden":
            assert repr(value) == defaults[name], (name, value, defaults[name])

# --- Refused before training: one line, exit code 2 -----------------------------------------------
def test_bad_settings_are_one_line_errors(byte_data, tmp_path, capsys):
    data, x = f"--data={byte_data}", f"--out-dir={tmp_path / 'x'}"
    tiny = [data, x, *TINY_RUN, "--max-iters=1"]
    cases = [
        (["--learning-rate=1"], ["unknown setting '--learning-rate=1'", "--lr"]),
        (["--lr=fast"], ["--lr", "'fast' is not a valid float"]),
        (["--lr=nan"], ["--lr", "'nan' is not a finite number"]),
        (["--weight-decay=inf"], ["--weight-decay", "is not a finite number"]),
        (["--seed=-1"], ["--seed=-1 must not be negative"]),
        (["--n-head=3"], ["n_embd=32 is not divisible by n_head=3"]),
        (["--vocab-size=200"], ["vocabulary (257 tokens", "vocab_size=200"]),
        (["--batch_tokens=100"], ["--batch-tokens=100 is not a multiple"]),  # underscores work too
        (["--max-tokens=1000"], ["exactly one of --max-iters and --max-tokens"]),
        (["--preset=huge"], ["unknown --preset=huge", "gpt2_small"]),
        (["--dtype=float8"], ["--dtype=float8 must be"]),
        (["--optimizer=lion"], ["--optimizer=lion must be one of muon, adamw"]),
        (["--muon-momentum=1"], ["--muon-momentum=1.0"]),
    ]
    for extra, fragments in cases:
        err = refused(capsys, *tiny, *extra)
        assert all(f in err for f in fragments), (extra, err)
    assert "meta.json" in refused(capsys, f"--data={tmp_path / 'nowhere'}", x, "--max-iters=1")
    assert "is a file" in refused(capsys, f"--data={byte_data / 'meta.json'}", x, "--max-iters=1")
    assert "ckpt.pt not found" in refused(capsys, data, f"--out-dir={tmp_path / 'none'}", "--resume", "--max-iters=1")

def damaged_copy(byte_data, folder, edit_meta=None, edit_files=None):
    shutil.copytree(byte_data, folder)
    meta = json.loads((folder / "meta.json").read_text())
    if edit_meta:
        edit_meta(meta)
    (folder / "meta.json").write_text(json.dumps(meta))
    if edit_files:
        edit_files(folder)
    return folder

def test_damaged_data_folders_are_one_line_errors(byte_data, tmp_path, capsys):
    def truncate(folder):
        shard = folder / "train_0000.bin"
        shard.write_bytes(shard.read_bytes()[:-10])

    def swap_two_ranks(folder):  # another tokenizer of the same size: bytes 'a' and 'b' trade ids
        lines = (folder / "tokenizer.tiktoken").read_text().splitlines()
        lines[97], lines[98] = lines[98].split()[0] + " 97", lines[97].split()[0] + " 98"
        (folder / "tokenizer.tiktoken").write_text("\n".join(lines) + "\n")
    cases = {
        "truncated": (None, truncate, ["train_0000.bin", "truncated or corrupt"]),
        # a damaged meta.json names the field that is wrong
        "vocab-type": (lambda m: m.update(vocab_size="257"), None, ['"vocab_size"', "re-run prepare.py"]),
        "eot-range": (lambda m: m.update(eot_id=70000), None, ['"eot_id"']),
        "no-dtype": (lambda m: m.pop("dtype"), None, ['"dtype"']),
        "no-count": (lambda m: m["shards"]["train"][0].pop("tokens"), None, ['"shards" of train']),
        # file names read from meta.json stay inside the folder: plain names, no symbolic links
        "path-in-file": (lambda m: m["shards"]["train"][0].update(file="../x.bin"), None, ["'../x.bin', not a plain"]),
        "ranks-outside": (lambda m: m["tokenizer"].update(ranks_file="../../etc/hostname"), None,
                          ["'../../etc/hostname', not a plain file name"]),
        "linked-shard": (None, lambda f: (f / "train_0000.bin").unlink() or os.symlink(byte_data / "train_0000.bin",
                                                                                       f / "train_0000.bin"),
                         ["train_0000.bin is a symbolic link"]),
        "no-val": (lambda m: m["shards"].update(val=[]), None, ["lists no val shards"]),
        "no-ranks": (None, lambda f: (f / "tokenizer.tiktoken").unlink(), ["cannot load the tokenizer"]),
        "bad-ranks": (None, lambda f: (f / "tokenizer.tiktoken").write_text("garbage\n"), ["cannot load the tokenizer"]),
    }
    for name, (edit_meta, edit_files, fragments) in cases.items():
        folder = damaged_copy(byte_data, tmp_path / name, edit_meta, edit_files)
        err = refused(capsys, f"--data={folder}", f"--out-dir={tmp_path / 'x'}", *TINY_RUN, "--max-iters=1")
        assert all(f in err for f in fragments), (name, err)
    (tmp_path / "json").mkdir()
    (tmp_path / "json" / "meta.json").write_text('{"format": "llama-sha')
    assert "is not readable JSON" in refused(capsys, f"--data={tmp_path / 'json'}", "--max-iters=1")

    # Resuming, or evaluating, on data from another tokenizer of the same size is refused.
    other = damaged_copy(byte_data, tmp_path / "other", None, swap_two_ranks)
    out = tmp_path / "run"
    out.mkdir()
    model = Transformer(tiny_config(vocab_size=320, max_seq_len=32))
    meta = json.loads((byte_data / "meta.json").read_text())
    spec = {**meta["tokenizer"], "ranks": (byte_data / "tokenizer.tiktoken").read_text()}
    spec.pop("ranks_file")
    opt = torch.optim.AdamW(model.parameters())
    save_checkpoint(out / "ckpt.pt", model, spec, meta["eot_id"], train_config={"max_iters": 5},
                    optimizer=opt.state_dict(), scaler={}, rng={"torch": torch.get_rng_state(), "cuda": []})
    err = refused(capsys, f"--data={other}", f"--out-dir={out}", "--resume")
    assert "was tokenized with another tokenizer" in err, err
    err = refused(capsys, f"--data={other}", "--eval-only", f"--ckpt={out / 'ckpt.pt'}")
    assert "was tokenized with another tokenizer" in err, err
    # The optimizer whose state the checkpoint holds, like the model, stays what it was.
    err = refused(capsys, f"--data={byte_data}", f"--out-dir={out}", "--resume", "--optimizer=muon")
    assert "cannot change --optimizer of" in err, err

def test_damaged_checkpoints_are_one_line_errors(byte_data, tmp_path, capsys):
    model = Transformer(tiny_config(vocab_size=320, max_seq_len=32))
    meta = json.loads((byte_data / "meta.json").read_text())
    spec = {**meta["tokenizer"], "ranks": (byte_data / "tokenizer.tiktoken").read_text()}
    spec.pop("ranks_file")
    good = tmp_path / "good.pt"
    save_checkpoint(good, model, spec, meta["eot_id"], train_config={"max_iters": 5})
    ckpt = torch.load(good, weights_only=True)
    bad = {
        "weights": ({**ckpt, "model": {k: v[:1] for k, v in ckpt["model"].items()}}, "does not fit this model.py"),
        "config-key": ({**ckpt, "model_config": {**ckpt["model_config"], "n_expert": 8}}, "n_expert"),
        "train-key": ({**ckpt, "train_config": {"max_iters": 5, "moe_lr": 0.1}}, "does not know (moe_lr)"),
        "eot": ({**ckpt, "eot_id": 9999}, "end-of-text is 9999"),
        "type": ({**ckpt, "step": "five"}, "step of the wrong type"),
    }
    for name, (state, fragment) in bad.items():
        torch.save(state, tmp_path / f"{name}.pt")
        err = refused(capsys, f"--data={byte_data}", "--eval-only", f"--ckpt={tmp_path / name}.pt",
                      "--hellaswag-path=none.jsonl")
        assert fragment in err, (name, err)
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(good, out / "ckpt.pt")  # no optimizer state: it cannot be resumed exactly
    err = refused(capsys, f"--data={byte_data}", f"--out-dir={out}", "--resume")
    assert "has no optimizer state" in err, err

# --- Pieces ---------------------------------------------------------------------------------------
def test_lr_schedule_and_epoch_order():
    cfg = train_py.TrainConfig(warmup_iters=10, min_lr_ratio=0.1, max_iters=110)
    lrs = [train_py.lr_factor(s, cfg, 110) for s in range(111)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)  # linear warmup to the peak
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))               # then only down ...
    assert lrs[60] == pytest.approx(0.55) and lrs[110] == pytest.approx(0.1)  # ... a cosine to 10 %
    order = data_py.EpochOrder(50, seed=3)
    epoch0, epoch1 = [order(g) for g in range(50)], [order(g) for g in range(50, 100)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(50)) and epoch0 != epoch1
    assert [data_py.EpochOrder(50, seed=3)(g) for g in range(50)] == epoch0

def test_the_runtime_picks_precision_compile_and_the_mfu_peak(monkeypatch):
    before = torch.get_float32_matmul_precision()
    try:
        for has_bf16, dtype in [(True, torch.bfloat16), (False, torch.float32)]:
            monkeypatch.setattr(hardware, "cpu_has_bf16", lambda: has_bf16)
            measured = []  # (device, dtype) of each peak measurement; bf16 for real only on a bf16 CPU
            monkeypatch.setattr(train_py, "matmul_flops", lambda *args: measured.append(args) or 1e9)
            rt = train_py.Runtime(distributed=False, rank=0, local_rank=0, world=1)
            train_py.start(rt, train_py.TrainConfig(device="cpu", dtype="auto", compile="auto", max_iters=1))
            # "high", not "medium": on CPUs "medium" hands fp32 matmuls to oneDNN, slower here
            assert (rt.dtype, rt.compile, torch.get_float32_matmul_precision()) == (dtype, False, "high")
            assert measured == [(torch.device("cpu"), dtype)] and rt.peak_flops == 1e9  # this CPU's, in rt.dtype
        monkeypatch.undo()
        assert hardware.matmul_flops(torch.device("cpu"), torch.float32, n=256, repeats=1) > 1e8  # a real figure
        rt = train_py.Runtime(distributed=False, rank=0, local_rank=0, world=1)
        train_py.start(rt, train_py.TrainConfig(device="cpu", dtype="float32", compile="true", peak_flops=5e9,
                                                max_iters=1))
        assert (rt.dtype, rt.compile, rt.peak_flops) == (torch.float32, True, 5e9)
    finally:
        torch.set_float32_matmul_precision(before)

def test_a_mixture_keeps_its_shares_and_repeats_a_short_source(byte_mixture):
    meta = data_py.load_data(byte_mixture)
    mix = data_py.Mixture(meta, "train", 32, seed=5)
    assert mix.quota == [700, 300]
    picks = collections.defaultdict(list)  # source -> the windows it gave, in order
    for g in range(5000):
        block, at = divmod(g, mix.BLOCK)
        picks[int(mix.layout(block)[0][at])].append(g)
    assert [len(picks[0]), len(picks[1])] == [3500, 1500]  # exact in every block of 1000
    assert 0.25 < len([g for g in picks[1] if g < 100]) / 100 < 0.35  # and well mixed within one
    # the short source: each epoch shows every window once, in a new order
    small, cpu = mix.windows[1], torch.device("cpu")
    seen = [mix.orders[1](k) for k in range(2 * small.n)]  # the windows of its first 2 * n samples
    first, second = seen[:small.n], seen[small.n:]
    assert sorted(first) == sorted(second) == list(range(small.n)) and first != second
    for k in (0, small.n - 1, small.n, 2 * small.n - 1):  # the k-th sample of the source is that window
        x, y = mix.batch([picks[1][k]], cpu)
        tokens = torch.from_numpy(small.window(seen[k])[0].astype(np.int64))
        assert torch.equal(x[0], tokens[:-1]) and torch.equal(y[0], tokens[1:])
    assert mix.news(0) == [] and mix.news(picks[1][small.n] + 1) == [
        f"{mix.names[1]}: epoch 2 begins (its windows repeat, reshuffled)"]
    # any sample, asked in any order, gives the same window (so resuming needs only the step)
    again = data_py.Mixture(meta, "train", 32, seed=5)
    for g in [4999, 17, 2500, 0]:
        assert torch.equal(again.batch([g], torch.device("cpu"))[0], mix.batch([g], torch.device("cpu"))[0])

def test_mixture_settings(byte_data, tmp_path, capsys):
    assert data_py.data_sources("a:3,b:1") == [("a", 0.75), ("b", 0.25)]
    assert data_py.data_sources("data/x") == [("data/x", 1.0)]
    assert data_py.data_sources("c:/data:2,d:2") == [("c:/data", 0.5), ("d", 0.5)]
    tiny = ["--max-iters=1", f"--out-dir={tmp_path / 'run'}"]
    assert "must be a positive number" in refused(capsys, f"--data={byte_data}:1,{byte_data}x:-1", *tiny)
    assert "names a folder twice" in refused(capsys, f"--data={byte_data}:1,{byte_data}:2", *tiny)
    assert "names a folder twice" in refused(capsys, f"--data={byte_data}:0.5,{byte_data}/:0.5", *tiny)
    # any number of folders: a weight of 0, NaN, or weights whose sum overflows are one line, not a traceback
    for weights in (f"{byte_data}:0", f"{byte_data}:nan", f"{byte_data}:inf", f"{byte_data}:1e308,{tmp_path}:1e308"):
        assert "every weight must be a positive number" in refused(capsys, f"--data={weights}", *tiny), weights
    r50k = tmp_path / "r50k"
    prepare_args = ["--input", str(SHAKESPEARE), "--out", str(r50k), "--num-proc", "1"]
    prepare.prepare(prepare.parse_settings(prepare_args), "test")
    assert "another tokenizer" in refused(capsys, f"--data={byte_data}:1,{r50k}:1", *tiny)

def test_without_matplotlib_the_banner_says_how_to_get_the_picture(byte_data, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed: import fails
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    with pytest.raises(SystemExit) as exit:
        train_py.main([f"--data={byte_data}", f"--out-dir={tmp_path}", *TINY_RUN, "--max-iters=2", "--plot=true"])
    for signum, handler in handlers.items():  # the run's own handlers go when the test ends
        signal.signal(signum, handler)
    out = capsys.readouterr().out
    assert exit.value.code == 0 and "(loss.png needs matplotlib: pip install matplotlib)" in out
    assert not (tmp_path / "loss.png").exists() and f"{tmp_path}/loss.png" not in out

def test_each_preset_is_the_size_its_seed_states():
    # ModelConfig() alone is the CPU demo's model, vocabulary included; each seed run's preset is the
    # size its author states, counted as the seed counts (LF_LLM-269M without its tied embedding)
    model_keys = {f.name for f in fields(ModelConfig)}

    def model(settings):
        with torch.device("meta"):
            return Transformer(ModelConfig(**{k: v for k, v in settings.items() if k in model_keys}))
    demo = model({})
    assert (round(demo.num_params() / 1e6, 2), round(demo.num_params(embeddings=False) / 1e6, 2)) == (1.27, 0.74)
    assert set(presets.SEEDS) | {"shakespeare_chat", "shakespeare_dpo"} == set(presets.PRESETS)  # the demo's model
    for name, seed in presets.SEEDS.items():
        stated, counted = seed["params"]
        ours = model(presets.PRESETS[name]).num_params(embeddings=counted == "total")
        assert ours == pytest.approx(stated, rel=0.03 if counted == "total" else 0.001), name
    lf = model(presets.PRESETS["lf_llm_269m"])  # 16 x d1024 with a 4096-wide SwiGLU: 320M in all
    assert round(lf.num_params() / 1e6) == 320 and presets.PRESETS["lf_llm_269m"]["warmup_iters"] * 524288 \
        == pytest.approx(119e6, rel=0.005)  # its warmup: 119M tokens

@pytest.mark.slow
def test_init_from_hf_starts_where_transformers_is(byte_data, tmp_path):
    transformers = pytest.importorskip("transformers")
    import tiktoken

    # a random Llama as transformers makes it (GQA, untied, another rope_theta), saved in shards, with
    # GPT-2's tokenizer.json beside it as Hugging Face folders carry one
    config = transformers.LlamaConfig(vocab_size=50304, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                      rope_theta=5e5, tie_word_embeddings=False)
    torch.manual_seed(0)
    theirs = transformers.LlamaForCausalLM(config).eval()
    folder = tmp_path / "hf"
    theirs.save_pretrained(folder, max_shard_size="4MB")
    assert (folder / "model.safetensors.index.json").exists()
    enc = tiktoken.get_encoding("r50k_base")
    hf.write_hf_tokenizer(enc, enc.eot_token, 32, folder)
    data = tmp_path / "data"
    made = python("prepare.py", "--input", SHAKESPEARE, "--tokenizer", f"hf:{folder}", "--out", data)
    assert made.returncode == 0, made.stderr
    run = python("train.py", f"--data={data}", f"--out-dir={tmp_path / 'run'}", f"--init-from-hf={folder}",
                 "--max-iters=1", "--batch-size=4", "--log-every=1", "--eval-batches=1", "--sample-tokens=0",
                 "--dtype=float32", "--device=cpu", "--warmup-iters=0")
    assert run.returncode == 0, run.stderr
    assert f"init    weights of {folder}" in run.stdout
    # the first step's loss is transformers' loss on the same batch
    mix = data_py.Mixture(data_py.load_data(str(data)), "train", 32, seed=1337)
    x, y = mix.batch(range(4), torch.device("cpu"))
    with torch.no_grad():
        ref = torch.nn.functional.cross_entropy(theirs(x).logits.flatten(0, 1), y.flatten()).item()
    assert losses(tmp_path / "run")[0][1] == pytest.approx(ref, abs=1e-4)
    # data from another tokenizer is refused
    other = python("train.py", f"--data={byte_data}", f"--out-dir={tmp_path / 'other'}", f"--init-from-hf={folder}",
                   "--max-iters=1", "--device=cpu")
    assert_user_error(other, "another tokenizer")

def test_bits_per_byte_against_a_direct_count(byte_data):
    # byte-level data: every token but <|endoftext|> is one byte, so bpb = the loss on those targets / ln 2
    meta = data_py.load_data(str(byte_data))
    enc, _ = data_py.tokenizer_of(meta)
    val = data_py.Mixture(meta, "val", 32, seed=0)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=320, n_layer=1, n_head=2, n_kv_head=1, n_embd=16, max_seq_len=32,
                                    multiple_of=16))
    cfg = train_py.TrainConfig(max_iters=1, batch_size=4, eval_batches=3)
    rt = train_py.Runtime(distributed=False, rank=0, local_rank=0, world=1, device=torch.device("cpu"), amp=nullcontext())
    record = evaluate.evaluate_val(model, val, enc, cfg, rt)
    x, y = val.windows[0].batch(range(12), rt.device)
    with torch.no_grad():
        losses = torch.nn.functional.cross_entropy(model(x, y)[0].flatten(0, 1), y.flatten(), reduction="none")
    text = y.flatten() != enc.eot_token
    assert record["val_loss"] == pytest.approx(losses.mean().item(), rel=1e-5)
    assert record["val_bpb"] == pytest.approx((losses[text].sum() / text.sum() / math.log(2)).item(), rel=1e-5)
    assert evaluate.token_bytes(enc, rt.device).tolist() == [1.0] * 256 + [0.0]
