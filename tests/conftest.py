"""
What the test files share: paths, tiny models, the runner for scripts as a user starts them, and
the byte-level Tiny Shakespeare data set.

    python -m pytest -q                 # everything
    python -m pytest -q -m "not slow"   # the fast core: no subprocesses

Tests that start a script in a subprocess (each pays for importing torch) are marked slow.
"""
import base64
import contextlib
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent  # the repository: the scripts and modules
sys.path.insert(0, str(ROOT))
# Tiny Shakespeare and GPT-2's BPE ranks: from ../shared beside the repository where it exists (CI,
# offline machines), else downloaded once (to data/downloads/, and tiktoken's own cache).
SHARED = Path(os.environ.get("LLAMA_TEST_SHARED", ROOT.parent / "shared"))  # (a test points it elsewhere)
if (SHARED / "tiktoken_cache").is_dir():
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED / "tiktoken_cache"))
# One thread, here and in every script a test starts (as torchrun gives its workers): tiny models gain
# nothing from more, and a second thread that spins while other processes hold the cores slows a run
# on a busy machine many times over (a 20 s test took over 300 s beside two busy loops).
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")

from checkpoint import save_checkpoint  # noqa: E402
import common  # noqa: E402
from common import download  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402

SHAKESPEARE = SHARED / "data" / "tinyshakespeare.txt"
if not SHAKESPEARE.exists():  # fetched by the corpus fixture, for the tests that need it
    SHAKESPEARE = ROOT / "data" / "downloads" / "tinyshakespeare.txt"

@pytest.fixture(scope="session")
def corpus():
    """Tiny Shakespeare at SHAKESPEARE, for the tests that read it (they ask for this fixture): from
    ../shared, else downloaded once. Without both, those tests are skipped, saying why; the others,
    the model's numeric tests among them, need no corpus."""
    if not SHAKESPEARE.exists():
        try:
            download("https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
                     str(SHAKESPEARE), "put it at ../shared/data/tinyshakespeare.txt")
        except SystemExit:
            pytest.skip("needs Tiny Shakespeare: put it at ../shared/data/tinyshakespeare.txt, or go online")
    return SHAKESPEARE

def pytest_configure(config):
    config.addinivalue_line("markers", "slow: starts scripts in subprocesses (deselect with -m 'not slow')")

# --- Tiny models ----------------------------------------------------------------------------------
def tiny_config(**overrides):
    base = dict(vocab_size=96, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, max_seq_len=64, multiple_of=16,
                tie_embeddings=False)
    return ModelConfig(**{**base, **overrides})

def random_model(seed=0, **overrides):
    """A tiny model whose norm weights are random too, so a wrong norm mapping cannot hide."""
    torch.manual_seed(seed)
    model = Transformer(tiny_config(**overrides))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    return model.eval()

def full_logits(model, idx):
    """Logits at every position; forward() only computes them all when given targets."""
    return model(idx, targets=torch.zeros_like(idx))[0]

# --- Tokenizers and checkpoints -------------------------------------------------------------------
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

def write_checkpoint(path, spec, eot_id, seed=0, **overrides):
    """A checkpoint holding a tiny random model, written by the project's own writer."""
    cfg = dict(vocab_size=50257 if spec is R50K else SMALL_EOT + 1, n_layer=2, n_head=4, n_kv_head=2,
               n_embd=32, max_seq_len=64, multiple_of=16, tie_embeddings=False)
    # random norm weights: an export that dropped them would show
    model = random_model(seed, **{**cfg, **overrides})
    save_checkpoint(path, model, spec, eot_id, train_config={"seed": seed})
    return str(path)

def full_forward_greedy(model, ids, n, eot_id):
    """Reference greedy decoding: a full forward over the whole sequence for every new token."""
    idx = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(n):
            next_id = full_logits(model, idx)[0, -1].argmax()
            if next_id == eot_id:
                break
            idx = torch.cat([idx, next_id.view(1, 1)], dim=1)
    return idx[0, len(ids):].tolist()

# --- Scripts as a user runs them ------------------------------------------------------------------
def run(args, timeout=1200, cwd=ROOT, env=None, input=None, **kwargs):
    """Run a command (a list of strings or paths), with input as its stdin if given -> CompletedProcess
    with text output. It runs in a session of its own: on timeout (only there to end a hang, far past
    what a loaded machine needs) the whole group dies, torchrun's workers included."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.Popen([str(a) for a in args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.PIPE if input is not None else None,
                            text=True, start_new_session=True, **kwargs)
    try:
        stdout, stderr = proc.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"{' '.join(map(str, args))} still running after {timeout}s:\n{stdout}\n{stderr}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)

def python(script, *args, **kwargs):
    """python SCRIPT ARGS from the repository, like a user."""
    return run([sys.executable, ROOT / script, *args], **kwargs)

def assert_user_error(result, *fragments):
    """Exit code 2 and a single 'error: ...' line that names the problem; no traceback."""
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert str(fragment) in lines[0], lines[0]

@pytest.fixture(scope="session")
def byte_data(corpus, tmp_path_factory):
    """Tiny Shakespeare as a byte-level corpus (vocab 256 + end-of-text), written by prepare.py."""
    out = tmp_path_factory.mktemp("data") / "shakespeare_bytes"
    result = python("prepare.py", "--input", SHAKESPEARE, "--vocab-size", 256, "--out", out)
    assert result.returncode == 0, result.stderr
    return out

@pytest.fixture(scope="session")
def byte_mixture(byte_data, tmp_path_factory):
    """A second source beside byte_data, with its tokenizer: 40 short lines of four words, ~7,000 tokens
    (a source that runs out fast) -> the --data value of a 70/30 mixture of the two."""
    words = ["alpha", "beta", "gamma", "delta"]
    text = "\n\n".join(" ".join(words[(i * 7 + j * 3) % 4] for j in range(40)) for i in range(40))
    tmp = tmp_path_factory.mktemp("mix")
    (tmp / "words.txt").write_text(text)
    result = python("prepare.py", "--input", tmp / "words.txt", "--tokenizer", byte_data, "--val-fraction", 0.2,
                    "--out", tmp / "words")
    assert result.returncode == 0, result.stderr
    return f"{byte_data}:0.7,{tmp / 'words'}:0.3"

# --- train.py on a tiny model ---------------------------------------------------------------------
# --peak-flops: MFU against a stated peak; measuring this CPU's (0.2-0.4 s) in each of ~40 runs adds up
TINY_RUN = ["--n-layer=2", "--n-embd=32", "--n-head=4", "--n-kv-head=2", "--max-seq-len=32", "--batch-size=4",
            "--log-every=1", "--eval-batches=2", "--sample-tokens=0", "--warmup-iters=0", "--min-lr-ratio=1",
            "--peak-flops=1e11", "--plot=false"]  # --plot: importing matplotlib costs each run ~1 s

def train(data, out, *args, torchrun=None, **kwargs):
    """python train.py (or torchrun with that many processes) on a tiny model -> CompletedProcess."""
    script = ROOT / "train.py"
    launcher = [script] if torchrun is None else [
        "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}", script]
    return run([sys.executable, *launcher, f"--data={data}", f"--out-dir={out}", *TINY_RUN, *args], **kwargs)

def train_here(data, out, *args):
    """train.py's main() in this process, as train() runs it in a new one but without paying again for
    the interpreter, torch and torch.optim's dynamo import (~4 s a run) -> CompletedProcess. For runs
    whose point is what they compute; train() for what a user sees of a process (signals, torchrun)."""
    import train as train_py
    argv = [f"--data={data}", f"--out-dir={out}", *TINY_RUN, *map(str, args)]
    stdout, stderr, code = io.StringIO(), io.StringIO(), 0
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            train_py.main(argv)
    except SystemExit as e:
        code = e.code or 0
    finally:  # what the end of its process would do: its signal handlers and its locks go
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        common.release_locks()
    return subprocess.CompletedProcess(argv, code, stdout.getvalue(), stderr.getvalue())

def losses(out):
    """(step, training loss) of every log record of a run."""
    with open(Path(out) / "log.jsonl") as f:
        return [(r["step"], r["loss"]) for r in map(json.loads, f) if "loss" in r]
