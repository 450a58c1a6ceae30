"""
Speed of our model against Hugging Face's LlamaForCausalLM on this machine, and against the
machine's own limit; prints one JSON object.

    python bench.py                                  # 10.5M params, B=4, T=256, fp32 (~2 min, 2 cores)
    python bench.py --compile                        # adds torch.compile'd training (both models)
    python bench.py --sections=decode --decode-new-tokens=512
    python bench.py --sections=limit --n-embd=512 --n-head=8 --n-kv-head=8 --batch-size=8
    python bench.py --sections=time_to_loss --ttl-run=demo --text-file=../shared/data/tinyshakespeare.txt
    python bench.py --sections=memory --dtype=bfloat16
    python bench.py --device=cuda --dtype=bfloat16 --n-layer=12 --n-embd=768 --n-head=12 --compile

Sections: train (forward + backward + AdamW step: tokens/s; MFU and peak memory on GPUs), decode
(greedy tokens/s: our KV cache, eager and compiled (decode.py; also over bf16 weights, and its
steps alone) vs HF generate vs our model without a cache; the share of the read bandwidth each
streams weights at), tokenize (prepare.py vs plain tiktoken; needs --text-file and
GPT-2's ranks, TIKTOKEN_CACHE_DIR offline), limit (peak matmul FLOP/s in fp32 and bf16 and the
training step's share of it), time_to_loss (steps and seconds to a validation loss for fp32
AdamW, bf16 AdamW and bf16 Muon, trained by train.py in turn) and memory (what activation
checkpointing and the chunked loss save, measured against memory.py's plan, and what they cost in
step time). Both models get the same weights
(model.to_hf), batch, dtype, threads and optimizer settings, and HF uses attn_implementation="sdpa".
Timed runs alternate ours, theirs, ours, theirs, ... after warm-up, so a busy machine slows both
alike; each row is the median of `repeats` runs with its spread [min, max], the ratio ours / theirs
of the medians, and ratio_paired [min, median, max] over neighbouring runs. Progress goes to stderr,
JSON to stdout.

The default model has 10.5M parameters counting the token embedding and the untied lm_head
(6.3M without them): vocab 8192 keeps the embeddings a realistic share of a small model instead
of a 50k-vocab lm_head outweighing the blocks; n_embd 256, 8 layers, 4 heads of 64 (Llama's head
dim), 2 key/value heads (grouped-query attention, as in Llama 3).
"""
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

import decode
from memory import kept_bytes, saved_bytes
from hf import to_hf
from model import ModelConfig, Transformer
from hardware import cpu_has_bf16, gpu_peak_flops, keep_freed_memory, matmul_flops, read_bandwidth, seconds
from common import (autocast, check, die, flag, one_line,
                    parse_config, parse_flags, pick_device, run_main, setting)

SECTIONS = ("train", "decode", "tokenize", "limit", "time_to_loss", "memory")
# The time_to_loss runs: train.py's flags and the val loss to reach. nanogpt: nanoGPT's published CPU
# config for character-level Shakespeare (val 1.88 after 2,000 steps), here on bytes (the same for
# this ASCII text); demo: train.py's defaults (the CPU demo) on the 4096-token BPE (4.44 before this change).
TTL_RUNS = {  # name: (train.py flags, more flags per optimizer, prepare.py flags, target val loss)
    "nanogpt": (["--n-layer=4", "--n-head=4", "--n-kv-head=4", "--n-embd=128", "--multiple-of=32",
                 "--max-seq-len=64", "--batch-size=12", "--max-iters=2000", "--lr=1e-3", "--min-lr-ratio=0.1",
                 "--warmup-iters=100", "--beta2=0.99", "--dropout=0", "--tie-embeddings", "--eval-every=100",
                 "--eval-batches=20"], {"adamw": [], "muon": ["--muon-lr=0.02", "--muon-momentum=0.95"]},
                ["--vocab-size", "256", "--val-fraction", "0.1"], 1.88),
    # the demo is Muon's; AdamW gets the recipe the demo had before Muon (600 steps at 2e-3)
    "demo": (["--eval-every=50"],
             {"adamw": ["--max-iters=600", "--lr=2e-3", "--warmup-iters=50"], "muon": []},
             ["--preset", "shakespeare"], 4.44),
}

@dataclass
class BenchConfig:
    n_layer: int = setting(8, "model depth")
    n_embd: int = setting(256, "model width")
    n_head: int = setting(4, "query heads")
    n_kv_head: int = setting(2, "key/value heads")
    vocab_size: int = setting(8192, "vocabulary size")
    multiple_of: int = setting(256, "round the MLP width up to a multiple of this (the CPU demo: 32)")
    tie_embeddings: bool = setting(False, "one matrix for the embedding and the output head (the CPU demo's)")
    batch_size: int = setting(4, "sequences per training step")
    seq_len: int = setting(256, "tokens per training sequence")
    steps: int = setting(2, "training steps per timed run")
    repeats: int = setting(7, "timed runs per model; rows report the median")
    compile: bool = setting(False, "also time torch.compile'd training of both models")
    device: str = setting("cpu", "cpu, cuda or cuda:N")
    dtype: str = setting("float32", "float32, bfloat16 or float16 (autocast; weights stay fp32)")
    threads: int = setting(0, "torch.set_num_threads; 0 = torch's default for this machine")
    decode_batches: str = setting("1,8", "comma list of how many sequences are decoded at once")
    decode_prompt_len: int = setting(32, "prompt tokens before decoding")
    decode_new_tokens: int = setting(128, "tokens decoded per run")
    sections: str = setting("train,decode,tokenize,limit", "comma list of " + ", ".join(SECTIONS))
    text_file: str = setting("", "text for the tokenize section")
    tokenize_copies: int = setting(10, "the tokenize section's corpus: this many copies of --text-file")
    peak_flops: float = setting(0.0, "accelerator peak FLOP/s for MFU; 0 = looked up in hardware.PEAK_FLOPS")
    seed: int = setting(0, "seed of weights and inputs")
    ttl_run: str = setting("nanogpt", "time_to_loss: nanogpt (nanoGPT's CPU config on bytes) or demo (train.py's defaults)")
    ttl_variants: str = setting("fp32-adamw,bf16-adamw,bf16-muon", "time_to_loss: the runs, dtype-optimizer")
    ttl_target: float = setting(0.0, "time_to_loss: the val loss to reach; 0 = 1.88 (nanogpt) or 4.44 (demo)")
    ttl_steps: int = setting(0, "time_to_loss: steps per run; 0 = the run's own (2,000, or the demo's 250)")

    def __post_init__(self):
        check(set(self.sections.split(",")) <= set(SECTIONS),
              f"--sections={self.sections}; use a comma list of {', '.join(SECTIONS)}")
        check(self.ttl_run in TTL_RUNS, f"--ttl-run={self.ttl_run}; use {' or '.join(TTL_RUNS)}")
        for variant in self.ttl_variants.split(","):
            dtype, _, optimizer = variant.partition("-")
            check(dtype in ("fp32", "bf16") and optimizer in ("adamw", "muon"),
                  f"--ttl-variants: {variant!r} is not fp32|bf16 - adamw|muon, e.g. bf16-muon")
        check("time_to_loss" not in self.sections or self.text_file,
              "the time_to_loss section trains on --text-file=PATH; give one")
        check(self.dtype in ("float32", "bfloat16", "float16"),
              f"--dtype={self.dtype}; use float32, bfloat16 or float16")
        check(all(b.isdigit() and int(b) > 0 for b in self.decode_batches.split(",")),
              f"--decode-batches={self.decode_batches}: a comma list of positive counts, e.g. 1,8")
        for name in ("batch_size", "seq_len", "steps", "repeats", "decode_prompt_len",
                     "decode_new_tokens", "tokenize_copies"):
            check(getattr(self, name) > 0, f"{flag(name)}={getattr(self, name)} must be positive")
        check(self.threads >= 0, f"--threads={self.threads}; use 0 for torch's default or a positive count")
        check(not self.text_file or os.path.isfile(self.text_file),
              f"--text-file={self.text_file} does not exist")

def log(msg):
    print(msg, file=sys.stderr, flush=True)

# --- Timing ---------------------------------------------------------------------------------------
def interleaved(runs, repeats, device):
    """Time each fn of runs (name -> fn) `repeats` times, taking turns: A B A B ..."""
    secs = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            secs[name].append(seconds(fn, device))
    return secs

def summary(ours, theirs, tokens):
    """Seconds per run of ours and (if any) theirs -> the tokens/s rows and the ratios."""
    out = {}
    for name, secs in [("ours", ours)] + ([("hf", theirs)] if theirs else []):
        out[f"{name}_tok_s"] = round(tokens / statistics.median(secs), 1)
        out[f"{name}_spread"] = [round(tokens / max(secs), 1), round(tokens / min(secs), 1)]
    if theirs:
        out["ratio"] = round(out["ours_tok_s"] / out["hf_tok_s"], 3)
        # Each run against its neighbour: cancels load that drifts over the whole benchmark.
        paired = sorted(t / o for o, t in zip(ours, theirs))
        out["ratio_paired"] = [round(r, 3) for r in (paired[0], statistics.median(paired), paired[-1])]
    return out

# --- Models ---------------------------------------------------------------------------------------
def build_models(cfg, device, with_hf=True):
    """Our Transformer and, if transformers is installed (and with_hf: the sections that race it),
    the same weights in LlamaForCausalLM."""
    torch.manual_seed(cfg.seed)
    mcfg = ModelConfig(vocab_size=cfg.vocab_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
                       n_kv_head=cfg.n_kv_head, n_embd=cfg.n_embd, multiple_of=cfg.multiple_of,
                       tie_embeddings=cfg.tie_embeddings,
                       max_seq_len=max(cfg.seq_len, cfg.decode_prompt_len + cfg.decode_new_tokens))
    ours = Transformer(mcfg).to(device)
    if not with_hf:
        return ours, None
    try:
        import transformers
    except ImportError:
        log("transformers is not installed: HF rows are skipped (pip install transformers)")
        return ours, None
    hf_state, hf_config = to_hf(ours.state_dict(), mcfg)
    # No eos: LlamaConfig's default (2) would let a random model stop HF's generate early.
    config = transformers.LlamaConfig(**hf_config, eos_token_id=None, bos_token_id=None, pad_token_id=0)
    config._attn_implementation = "sdpa"
    theirs = transformers.LlamaForCausalLM(config).to(device)
    if mcfg.tie_embeddings:  # transformers lists the tied matrix under both names
        hf_state["lm_head.weight"] = hf_state["model.embed_tokens.weight"]
    theirs.load_state_dict(hf_state)
    theirs.generation_config.eos_token_id = None
    return ours, theirs

# --- Training -------------------------------------------------------------------------------------
def loss_fn(model, is_hf):
    """(x, y) -> mean cross-entropy of the model's logits at every position against y."""
    if not is_hf:
        return lambda x, y: model(x, y)[1]
    def hf_loss(x, y):  # the loss as ours computes it: HF's labels= would shift y by one
        logits = model(input_ids=x, use_cache=False).logits                 # (B, T, V)
        return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
    return hf_loss

def train_step_fn(model, is_hf, x, y, amp, compiled):
    """A function doing one step: forward, loss, backward, AdamW, zero_grad(set_to_none=True)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    # Compile the loss function, not only the module, so both graphs hold the cross-entropy.
    loss_of = torch.compile(loss_fn(model, is_hf)) if compiled else loss_fn(model, is_hf)
    losses = []

    def step():
        with amp:
            loss = loss_of(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())  # a GPU sync, the same for both models
    return step, losses

def bench_train(cfg, ours, theirs, device, amp, compiled):
    g = torch.Generator().manual_seed(cfg.seed + 1)
    data = torch.randint(0, cfg.vocab_size, (cfg.batch_size, cfg.seq_len + 1), generator=g).to(device)
    x, y = data[:, :-1], data[:, 1:]  # one batch for every step of both models
    models = {"ours": (ours, False)} | ({"hf": (theirs, True)} if theirs is not None else {})
    steps, losses, result = {}, {}, {}
    for name, (model, is_hf) in models.items():
        model.train()
        steps[name], losses[name] = train_step_fn(model, is_hf, x, y, amp, compiled)
        # Untimed warm-up: allocations, AdamW state and, compiled, the compilation itself; the
        # second step does none of that, so the difference is the compile time.
        first, second = seconds(steps[name], device), seconds(steps[name], device)
        if compiled:  # a second run of bench.py compiles faster, from inductor's on-disk cache
            result[f"compile_s_{name}"] = round(first - second, 1)
        log(f"train{' compiled' if compiled else ''} {name}: warm-up steps {first:.2f}s, {second:.2f}s")
    result["first_loss"] = {name: round(v[0], 5) for name, v in losses.items()}  # should agree

    peak = dict.fromkeys(steps, 0)
    def run(name):
        def go():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            for _ in range(cfg.steps):
                steps[name]()
            if device.type == "cuda":
                peak[name] = max(peak[name], torch.cuda.max_memory_allocated(device))
        return go
    secs = interleaved({name: run(name) for name in steps}, cfg.repeats, device)
    result |= summary(secs["ours"], secs.get("hf"), cfg.steps * cfg.batch_size * cfg.seq_len)
    # On CPU one resident set holds both models and malloc's cache of freed blocks, so no fair
    # per-model figure exists: null.
    for name in steps:
        result[f"{name}_peak_mem_mb"] = round(peak[name] / 2**20, 1) if device.type == "cuda" else None
    if device.type == "cuda":
        peak_flops = cfg.peak_flops or gpu_peak_flops(device)
        result["peak_flops"] = peak_flops or None
        for name in steps:
            flops = result[f"{name}_tok_s"] * ours.flops_per_token(cfg.seq_len)
            result[f"{name}_mfu"] = round(flops / peak_flops, 4) if peak_flops else None
    return result

# --- Memory ---------------------------------------------------------------------------------------
def bench_memory(cfg, ours, device, amp, dtype):
    """For the plain step, --activation-checkpointing, --chunked-loss (a chunk per sequence), both, and
    attention written out (--attention=manual): the bytes autograd keeps for backward, measured and as
    memory.py plans them, and the step's time (interleaved) against the plain step's."""
    mc, B, T = ours.config, cfg.batch_size, cfg.seq_len
    is_amp, cpu_fp32_attention = dtype != torch.float32, device.type == "cpu"
    g = torch.Generator().manual_seed(cfg.seed + 2)
    idx = torch.randint(0, cfg.vocab_size, (B, T), generator=g).to(device)
    variants = {"plain": (False, 0, False), "checkpointing": (True, 0, False), "chunked_loss": (False, T, False),
                "both": (True, T, False), "manual_attention": (False, 0, True)}

    def use(checkpointing, chunk, by_hand):
        ours.checkpointing, ours.loss_chunk = checkpointing, chunk
        for layer in ours.layers:
            layer.self_attn.by_hand = by_hand
    out, steps = {}, {}
    for name, (checkpointing, chunk, by_hand) in variants.items():
        use(checkpointing, chunk, by_hand)
        # the chunked loss keeps no log-probabilities: it remakes them in the backward pass
        planned = kept_bytes(dataclasses.replace(mc, attention="manual" if by_hand else "sdpa"), B * T, is_amp,
                             cpu_fp32_attention, checkpointing, log_probs=not chunk)
        measured = saved_bytes(ours, idx, amp)
        out[name] = {"saved_mb": round(measured / 2**20, 2), "planned_mb": round(planned / 2**20, 2),
                     "measured_over_planned": round(measured / planned, 3)}
        step, _ = train_step_fn(ours, False, idx, idx, amp, compiled=False)
        step()  # warm-up: AdamW's state

        def run(step=step, variant=(checkpointing, chunk, by_hand)):
            use(*variant)
            for _ in range(cfg.steps):
                step()
        steps[name] = run
    secs = interleaved(steps, cfg.repeats, device)
    for name in variants:
        out[name]["step_time_vs_plain"] = round(statistics.median(secs[name]) / statistics.median(secs["plain"]), 3)
    use(False, 0, False)
    return out

# --- Decoding -------------------------------------------------------------------------------------
def naive_generate(model, idx, new_tokens):
    """Greedy decoding without a cache, nanoGPT-style: a full forward over the text per token."""
    for _ in range(new_tokens):
        logits, _ = model(idx)                                                     # (B, 1, V)
        idx = torch.cat([idx, logits[:, -1].argmax(dim=-1, keepdim=True)], dim=1)  # (B, T + 1)
    return idx

def bench_decode(cfg, ours, theirs, device, amp):
    """Greedy decoding at each of --decode-batches: tokens/s of ours eager (Python per layer, a KV
    cache), ours compiled (decode.compiled_step: one graph a token over a static cache; the one-off
    compile is timed apart), the same with a bf16 copy of the weights (CPU only), transformers'
    generate on the same weights, and at batch 1 ours without a cache; the fraction of the read
    bandwidth each streams the weights at, and for the compiled steps alone (no prefill, no
    sampling: the median step); runs interleaved."""
    g = torch.Generator().manual_seed(cfg.seed + 2)
    n, bandwidth = cfg.decode_new_tokens, read_bandwidth(device)
    # every matmul weight is read once a step for all the rows (fp32, also under autocast)
    weights = (ours.num_params(embeddings=False) + ours.lm_head.weight.numel()) * 4
    ours.eval()
    if theirs is not None:
        theirs.eval()
    steps = {"ours_compiled": decode.compiled_step(ours)}
    if device.type == "cpu":
        steps["ours_compiled_bf16_weights"] = decode.compiled_step(ours, torch.bfloat16)
    result, clocks = {"read_bandwidth_gb_s": round(bandwidth / 1e9, 1)}, {name: [] for name in steps}

    def clocked(name):  # the step, its seconds noted
        def step(token, pos):
            t0 = time.perf_counter()
            logits = steps[name](token, pos)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            clocks[name].append(time.perf_counter() - t0)
            return logits
        return step
    for batch in map(int, cfg.decode_batches.split(",")):
        prompt = torch.randint(0, cfg.vocab_size, (batch, cfg.decode_prompt_len), generator=g).to(device)
        outputs, fns = {}, {"ours": lambda: ours.generate(prompt, n, temperature=0.0)}
        for name in steps:
            fns[name] = lambda step=clocked(name): ours.generate(prompt, n, temperature=0.0, step=step)
        if theirs is not None:  # otherwise HF's defaults, its dynamic KV cache included
            mask = torch.ones_like(prompt)
            fns["hf"] = lambda: theirs.generate(prompt, max_new_tokens=n, do_sample=False, attention_mask=mask)
        if batch == 1:
            fns["ours_no_cache"] = lambda: naive_generate(ours, prompt, n)

        def run(name):
            def go():
                with torch.no_grad(), amp:
                    outputs[name] = fns[name]()
            return go
        runs, out = {name: run(name) for name in fns}, {}
        for name in steps:  # the first run compiles (a new batch size: again)
            t0 = time.perf_counter()
            runs[name]()
            out[f"{name}_compile_s"] = round(time.perf_counter() - t0, 1)
        for go in runs.values():  # warm-up
            go()
        for ticks in clocks.values():
            ticks.clear()
        secs = interleaved(runs, cfg.repeats, device)
        for name in runs:
            tok_s = batch * n / statistics.median(secs[name])
            out[f"{name}_tok_s"] = round(tok_s, 1)
            read = weights / 2 if name.endswith("bf16_weights") else weights
            out[f"{name}_bandwidth_fraction"] = float(f"{read * tok_s / batch / bandwidth:.3g}")  # 3 digits
            if name in steps:
                step_s = statistics.median(clocks[name])
                out[f"{name}_step_ms"] = round(step_s * 1e3, 2)
                out[f"{name}_step_bandwidth_fraction"] = float(f"{read / step_s / bandwidth:.3g}")
        out["compiled_vs_eager"] = round(out["ours_compiled_tok_s"] / out["ours_tok_s"], 3)
        # Same weights and greedy: the texts should agree, barring near-ties broken by fp rounding.
        out["same_tokens_compiled"] = torch.equal(outputs["ours"], outputs["ours_compiled"])
        if theirs is not None:
            out["same_tokens_as_hf"] = torch.equal(outputs["ours"], outputs["hf"])
            out["ratio_vs_hf"] = round(out["ours_tok_s"] / out["hf_tok_s"], 3)
        if batch == 1:
            out["same_tokens_as_no_cache"] = torch.equal(outputs["ours"], outputs["ours_no_cache"])
        result[f"batch_{batch}"] = out
    return result

# --- The limit: peak matmul FLOP/s against the training step's ------------------------------------
def bench_limit(cfg, ours, device):
    """For fp32 and bf16 (on CPUs and GPUs that have it): the peak matmul FLOP/s measured on this
    device and the FLOP/s of our training step (train.py's: fused AdamW, autocast), interleaved."""
    dtypes = {"float32": torch.float32}
    if device.type == "cuda" or cpu_has_bf16():
        dtypes["bfloat16"] = torch.bfloat16
    g = torch.Generator().manual_seed(cfg.seed + 3)
    data = torch.randint(0, cfg.vocab_size, (cfg.batch_size, cfg.seq_len + 1), generator=g).to(device)
    x, y = data[:, :-1], data[:, 1:]
    opt = torch.optim.AdamW(ours.parameters(), lr=1e-4, fused=True)

    def step_in(dtype):
        def step():
            with autocast(device, dtype):
                loss = ours(x, y)[1]
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step
    runs = {name: step_in(dtype) for name, dtype in dtypes.items()}
    for run in runs.values():  # warm-up
        run()
    secs = interleaved(runs, cfg.repeats, device)
    flops_per_step = ours.flops_per_token(cfg.seq_len) * cfg.batch_size * cfg.seq_len
    result = {}
    for name, dtype in dtypes.items():
        peak = matmul_flops(device, dtype, n=2048)
        achieved = flops_per_step / statistics.median(secs[name])
        result[name] = {"peak_matmul_gflops": round(peak / 1e9, 1), "train_gflops": round(achieved / 1e9, 1),
                        "fraction_of_peak": float(f"{achieved / peak:.3g}")}
    return result

# --- Time to a loss: train.py itself, run by run -----------------------------------------------------
def bench_time_to_loss(cfg):
    """Steps and seconds (from the start of training) for each variant of one run to reach the
    target val loss, one after another on the same data, plus where each one ended."""
    import tempfile
    train_flags, optimizer_flags, prepare_flags, target = TTL_RUNS[cfg.ttl_run]
    target = cfg.ttl_target or target
    here = os.path.dirname(os.path.abspath(__file__))
    result = {"target_val_loss": target}
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "data")
        prepared = subprocess.run([sys.executable, os.path.join(here, "prepare.py"), "--input", cfg.text_file,
                                   *prepare_flags, "--out", data], capture_output=True, text=True)
        if prepared.returncode:
            raise RuntimeError(f"prepare.py failed: {prepared.stderr.strip()[-200:]}")
        for variant in cfg.ttl_variants.split(","):
            dtype, _, optimizer = variant.partition("-")
            out = os.path.join(tmp, variant)
            log(f"time_to_loss: training {variant} ({cfg.ttl_run})")
            t0 = time.time()
            steps = [f"--max-iters={cfg.ttl_steps}", "--eval-every=10"] if cfg.ttl_steps else []
            run = subprocess.run([sys.executable, os.path.join(here, "train.py"), f"--data={data}",
                                  f"--out-dir={out}", *train_flags, *steps, "--sample-tokens=0", "--plot=false",
                                  f"--dtype={'float32' if dtype == 'fp32' else 'bfloat16'}",
                                  f"--optimizer={optimizer}", *optimizer_flags[optimizer]],
                                 capture_output=True, text=True)
            if run.returncode:
                raise RuntimeError(f"train.py failed: {run.stderr.strip()[-200:]}")
            with open(os.path.join(out, "log.jsonl")) as f:
                records = [json.loads(line) for line in f]
            evals = [r for r in records if "val_loss" in r]
            hit = next((r for r in evals if r["val_loss"] <= target), None)
            speeds = sorted(r["tokens_per_s"] for r in records if "tokens_per_s" in r)
            result[variant] = {"steps_to_target": hit and hit["step"],
                               "seconds_to_target": hit and round(hit["elapsed"], 1),
                               "final_val_loss": round(evals[-1]["val_loss"], 4),
                               "seconds_in_all": round(time.time() - t0, 1),
                               "tokens_per_s": round(speeds[len(speeds) // 2])}
    return result

# --- Tokenization ---------------------------------------------------------------------------------
def bench_tokenize(cfg, text):
    """prepare.py end to end (reading, tokenizing, writing shards; one worker, its start-up included)
    on `tokenize_copies` copies of the text against tiktoken's encode_ordinary over the same
    paragraphs in this process, the floor for any tokenizer written around tiktoken."""
    import tempfile

    import tiktoken
    try:
        enc = tiktoken.get_encoding("r50k_base")
    except Exception as e:  # offline without tiktoken's cache
        raise RuntimeError(f"cannot load r50k_base ({type(e).__name__}); offline, set TIKTOKEN_CACHE_DIR") \
            from e
    docs = [d for d in text.split("\n\n") if d.strip()] * cfg.tokenize_copies  # paragraphs as documents
    with tempfile.TemporaryDirectory() as tmp:
        corpus = os.path.join(tmp, "corpus.txt")
        with open(corpus, "w", encoding="utf-8") as f:
            f.write("\n\n".join(docs))
        command = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "prepare.py"),
                   "--input", corpus, "--separator", "\\n\\n", "--num-proc", "1", "--val-fraction", "0",
                   "--tokenizer", "r50k_base", "--force", "--out"]

        def prepare():
            result = subprocess.run(command + [os.path.join(tmp, "out")], capture_output=True, text=True)
            if result.returncode:
                raise RuntimeError(f"prepare.py failed: {result.stderr.strip()[-200:]}")
        runs = {"prepare": prepare, "tiktoken_loop": lambda: [enc.encode_ordinary(d) for d in docs]}
        tokens = sum(len(ids) for ids in runs["tiktoken_loop"]()) + len(docs)  # + one eot per document
        runs["prepare"]()  # warm-up: the page cache, Python's bytecode cache
        secs = interleaved(runs, cfg.repeats, torch.device("cpu"))
    tok_s = {k: tokens / statistics.median(secs[k]) for k in runs}
    return {"documents": len(docs), "tokens": tokens, **{f"{k}_tok_s": round(v, 1) for k, v in tok_s.items()},
            "ratio": round(tok_s["prepare"] / tok_s["tiktoken_loop"], 3)}

# --- Main -----------------------------------------------------------------------------------------
def main(argv):
    cfg = parse_config(BenchConfig, parse_flags(argv, [BenchConfig], __doc__))
    sections = cfg.sections.split(",")
    device = pick_device(cfg.device)
    if device.type == "cpu":  # the allocator setting train.py runs with
        keep_freed_memory()

    # One thread count for everything; HF runs in this process, so it shares it.
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dtype = getattr(torch, cfg.dtype)
    amp = autocast(device, dtype)  # as train.py does it: fp32 weights, autocast around forward and loss
    try:
        ours, theirs = build_models(cfg, device, with_hf=bool({"train", "decode"} & set(sections)))
    except ValueError as e:  # ModelConfig's message names the bad value
        die(str(e))
    report = {"config": asdict(cfg), "device": torch.cuda.get_device_name(device)
              if device.type == "cuda" else "cpu", "threads": torch.get_num_threads(),
              "torch": torch.__version__,
              "transformers": sys.modules["transformers"].__version__ if theirs is not None else None,
              "params": ours.num_params(), "params_non_embedding": ours.num_params(embeddings=False),
              "flops_per_token": ours.flops_per_token(cfg.seq_len),
              # Other processes skew the absolute numbers (the ratios much less): say how busy.
              "loadavg_start": os.getloadavg()[0]}

    def section(name, run):  # a section that fails is reported as such; the others' figures stay
        try:
            report[name] = run()
        except Exception as e:
            report[name] = {"failed": one_line(e)}
        log(f"{name}: {report[name]}")

    if "train" in sections:
        section("train_eager", lambda: bench_train(cfg, ours, theirs, device, amp, compiled=False))
        if cfg.compile:
            section("train_compiled", lambda: bench_train(cfg, ours, theirs, device, amp, compiled=True))
            if theirs is not None and "hf_tok_s" in report["train_eager"] | report["train_compiled"]:
                # what moving from HF as it is to our compiled model buys
                report["train_compiled"]["ratio_vs_hf_eager"] = round(
                    report["train_compiled"]["ours_tok_s"] / report["train_eager"]["hf_tok_s"], 3)
    if "decode" in sections:
        section("decode", lambda: bench_decode(cfg, ours, theirs, device, amp))
    if "limit" in sections:
        section("limit", lambda: bench_limit(cfg, ours, device))
    if "time_to_loss" in sections:
        section("time_to_loss", lambda: bench_time_to_loss(cfg))
    if "memory" in sections:
        section("memory", lambda: bench_memory(cfg, ours, device, amp, dtype))
    if "tokenize" in sections:
        if not cfg.text_file:
            report["tokenize"] = {"skipped": "no text given: pass --text-file=PATH"}
        else:
            with open(cfg.text_file, encoding="utf-8") as f:
                text = f.read()
            section("tokenize", lambda: bench_tokenize(cfg, text))
    report["loadavg_end"] = os.getloadavg()[0]
    print(json.dumps(report, indent=1))

if __name__ == "__main__":
    run_main(main)
