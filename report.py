"""
What a training run prints and writes about itself, on rank 0: the banner (settings that differ
from the defaults, model, data, plan, runtime, memory), a line per --log-every steps, one per
evaluation, log.jsonl (every record, one JSON object a line), config.json, loss.png and the
closing summary with the commands that go on from there.

    log = RunLog("out/x/log.jsonl", master=True, cfg=cfg, model_cfg=model_cfg)
    print_plan(log, cfg, model, rt, plan, data)           # the banner, before any compute is spent
    log.step(step, loss, lr, grad_norm)                     # the training line and its record
"""
import functools
import json
import math
import os
import sys
import textwrap
import time
from dataclasses import asdict, fields, replace

import torch

from common import atomic_write, die, flag
from memory import GiB, fixes, memory_plan, size
from model import LOSS_CHUNK
from presets import SEEDS

def perplexity(loss):
    return math.exp(loss) if loss < 700 else math.inf  # exp overflows a float past 709

def minutes(seconds):
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"

def has_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True

class RunLog:
    """Lines on the console and records in log.jsonl (and wandb), rank 0 only; for a training run
    also its resolved settings in config.json (the checkpoint holds its own copy)."""

    def __init__(self, path, master, cfg=None, model_cfg=None):
        self.path, self.master, self.wandb = path, master, None
        if master and cfg is not None:
            with atomic_write(os.path.join(cfg.out_dir, "config.json"), "w") as f:
                json.dump({"train": asdict(cfg), "model": asdict(model_cfg)}, f, indent=2)
        if master and cfg is not None and cfg.wandb:
            try:
                import wandb
            except ImportError:
                die("--wandb needs the wandb package: pip install wandb")
            self.wandb = wandb
            name = os.path.basename(os.path.abspath(cfg.out_dir))
            wandb.init(project=cfg.wandb_project, name=name, config={**asdict(cfg), **asdict(model_cfg)})

    def print(self, *args, **kwargs):
        if self.master:
            print(*args, **kwargs, flush=True)

    def record(self, record):
        if self.master:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if self.wandb:
                self.wandb.log(record, step=record["step"])

    def start_clock(self, step, tokens, max_iters, flops_per_token, world, peak_flops):
        """The loop begins: tokens/s, MFU and the ETA count from here."""
        self.t_start = self.t_log = time.time()
        self.start_step, self.tokens_at_log, self.pace_from = step, tokens, None
        self.max_iters, self.flops_per_token = max_iters, flops_per_token
        self.world, self.peak_flops = world, peak_flops

    def step(self, step, tokens, loss, lr, grad_norm, news=(), extra=None):
        """The line of a training step: loss, lr, grad norm, tokens/s, MFU, ETA, the objective's own
        figures (extra: DPO's rewards); and its record."""
        now = time.time()
        tok_s = (tokens - self.tokens_at_log) / (now - self.t_log)
        # The ETA from the pace since the first log line, evaluations included: steadier than one
        # window's, and past compiling and warm-up, which only the first window holds.
        since = self.pace_from or (self.t_start, self.start_step)
        eta = (now - since[0]) / (step - since[1]) * (self.max_iters - step)
        self.pace_from = self.pace_from or (now, step)
        mfu = self.flops_per_token * tok_s / self.world / self.peak_flops if self.peak_flops else None
        self.print(f"step {step}/{self.max_iters} | loss {loss:.4f} | lr {lr:.2e} | grad norm {grad_norm:.3f} | "
                   f"{tok_s:,.0f} tok/s" + (f" | MFU {mfu:.1%}" if mfu is not None else "") +
                   "".join(f" | {k.replace('_', ' ')} {v:.3f}" for k, v in (extra or {}).items()) +
                   f" | ETA {minutes(eta)}" + "".join(f"\ndata    {line}" for line in news))
        self.record({"step": step, "tokens": tokens, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                     "tokens_per_s": tok_s, "mfu": mfu, "time": now, **(extra or {})})
        self.t_log, self.tokens_at_log = now, tokens

    def evaluation(self, record):
        """The line of an evaluation (loss, perplexity, bits per byte, HellaSwag, each source's loss),
        its record, and its samples, indented under their prompts."""
        record["elapsed"] = time.time() - self.t_start  # seconds since the loop began (bench.py reads it)
        shown = ("val_ppl", "val_bpb", "hellaswag_acc", "val_loss[", "val_accuracy", "val_margin", "val_chosen")
        self.print(f"eval step {record['step']} | val loss {record['val_loss']:.4f} | " +
                   " | ".join(f"{k} {v:.4f}" for k, v in record.items() if k.startswith(shown)))
        self.record(record)
        for prompt, text in record.get("samples", {}).items():
            self.print("sample:\n" + "\n".join("  | " + line for line in (prompt + text).split("\n")))

# --- The banner -----------------------------------------------------------------------------------
def changed_settings(*configs):
    """The values of configs that differ from their dataclass's defaults, as flags; not those derived
    from the others (ffn_hidden from n_embd), which a user did not set."""
    changed = []
    for config in configs:
        for f in fields(config):
            value, default = getattr(config, f.name), f.default
            if value == default:
                continue
            try:
                derived = getattr(replace(config, **{f.name: default}), f.name) == value
            except ValueError:  # the default does not go with the other values
                derived = False
            if not derived:
                changed.append(f"{flag(f.name)}={value:g}" if isinstance(value, float) else f"{flag(f.name)}={value}")
    return changed

def print_plan(log, cfg, model, rt, plan, data=None, start_step=0, init_note=None):
    """What the run will do, where, what it needs in memory and where its outputs go, before any of
    it is spent. plan: (tokens per step, micro-batches per step, steps); data: (train, val, tokenizer
    spec), None for a dry run."""
    mc, T, n_params = model.config, model.config.max_seq_len, model.num_params()
    batch_tokens, accum, max_iters = plan
    total = max_iters * batch_tokens
    changed = changed_settings(cfg, mc)
    log.print(textwrap.fill("settings " + (" ".join(changed) or "the defaults"), 110, subsequent_indent=" " * 9,
                            break_on_hyphens=False) + "  (the rest: python train.py --help)")
    log.print(f"model   {n_params / 1e6:.2f}M parameters ({model.num_params(embeddings=False) / 1e6:.2f}M without "
              f"embeddings): {mc.n_layer} layers, d{mc.n_embd}, {mc.n_head} heads / {mc.n_kv_head} kv, T={T}, "
              f"vocab {mc.vocab_size}")
    if data is None:
        log.print(f"data    {cfg.data}: not read (--dry-run)")
    train, val, tokenizer = data or (None, None, None)
    sources = zip(train.names, train.weights, train.windows, val.windows) if data else []
    for name, weight, windows, val_windows in sources:
        share = f" ({weight:.0%} of the batches)" if len(train.names) > 1 else ""
        log.print(f"data    {name}{share}: {windows.n * T / 1e6:,.2f}M train tokens, "
                  f"{val_windows.n * T / 1e6:,.2f}M val, tokenizer {tokenizer['name']}; "
                  f"{total * weight / (windows.n * T):.2f} epochs in this run")
    log.print(f"plan    {f'from step {start_step} to ' if start_step else ''}{max_iters} steps x {batch_tokens:,} "
              f"tokens = {total / 1e6:,.1f}M tokens ({total / n_params:.1f} per parameter; Chinchilla-optimal "
              f"~20), {model.flops_per_token(T) * total:.2e} FLOPs; warmup {cfg.warmup_iters} steps = "
              f"{cfg.warmup_iters * batch_tokens / 1e6:,.1f}M tokens")
    seed = SEEDS.get(cfg.preset)
    if seed:  # what the seed run is, as its author counts it, and where this preset differs
        stated, counted = seed["params"]
        log.print(textwrap.fill(f"seed    {seed['name']}: {stated / 1e6:,.1f}M parameters counted {counted} (here "
                                f"{model.num_params(embeddings=counted == 'total') / 1e6:,.1f}M); differs: "
                                f"{seed['differs']}", 110, subsequent_indent=" " * 8))
    name = rt.device.type if rt.device.type != "cuda" else "planned" if cfg.dry_run else \
        torch.cuda.get_device_name(rt.device)
    log.print(f"runtime {rt.device} ({name}), {str(rt.dtype).removeprefix('torch.')}, compile "
              f"{'on' if rt.compile else 'off'}, {rt.world} process(es){' (FSDP)' if rt.fsdp else ''} x {accum} "
              f"micro-batch(es) of {cfg.batch_size} sequences")
    print_memory(log, cfg, model, rt)
    if not cfg.dry_run:
        plot = ("" if not cfg.plot else ", loss.png" if has_matplotlib() else
                ", (loss.png needs matplotlib: pip install matplotlib)")
        log.print(f"output  {cfg.out_dir}/: ckpt.pt (latest), best.pt (lowest val loss), log.jsonl{plot}")
    if init_note:  # --init-from
        log.print(init_note)

def print_memory(log, cfg, model, rt):
    """The memory plan per process (memory.py), and against the GPU's memory, with the fixes when
    it will not fit."""
    plan_with = functools.partial(memory_plan, model, cfg.batch_size, rt.world, rt.fsdp, cfg.optimizer,
                                  amp=rt.dtype != torch.float32, attention_fp32=rt.device.type == "cpu")
    plan = plan_with(checkpointing=cfg.activation_checkpointing, loss_chunk=model.loss_chunk)
    log.print(f"memory  {plan.line()}")
    # each saver flipped: what turning it on would save, or what turning it off would cost
    flipped = plan_with(checkpointing=not cfg.activation_checkpointing,
                        loss_chunk=0 if model.loss_chunk else LOSS_CHUNK)
    word = {True: "without", False: "with"}
    log.print(f"        activations {size(flipped.activations)} {word[cfg.activation_checkpointing]} "
              f"--activation-checkpointing, logits {size(flipped.logits)} {word[cfg.chunked_loss]} --chunked-loss")
    capacity = cfg.gpu_memory * GiB or (torch.cuda.get_device_properties(rt.device).total_memory
                                        if rt.device.type == "cuda" else 0)
    if not capacity:
        return
    # Leave ~10 %: the CUDA context, the allocator's fragmentation and the kernels' workspaces take it.
    if plan.total <= 0.9 * capacity:
        log.print(f"        fits: {plan.total / capacity:.0%} of {capacity / GiB:.0f} GiB")
        return
    options = fixes(plan, cfg.batch_size, rt.fsdp, cfg.activation_checkpointing, cfg.chunked_loss)
    log.print(f"warning: {plan.total / GiB:.1f} GiB will not fit in {capacity / GiB:.0f} GiB less ~10 % for the "
              f"CUDA context and fragmentation; try {', '.join(options) or 'a smaller model'}", file=sys.stderr)

# --- The end --------------------------------------------------------------------------------------
def print_summary(log, cfg, paths, why, step, best_val, stopped, chat):
    """How the run ended (why: the error that stopped it, or ""), where its files are, and the
    commands that go on from there."""
    if why:
        kept = (f"{paths['ckpt.pt']} still holds the last good state" if os.path.isfile(paths["ckpt.pt"])
                else "no checkpoint was written")
        log.print(f"error: {why} at step {step}; stopped without saving, so {kept}. Lower --lr or raise "
                  "--warmup-iters", file=sys.stderr)
    elif stopped:
        log.print(f"stopped by signal at step {step}; saved {paths['ckpt.pt']}; continue with "
                  f"python train.py --resume --out-dir={cfg.out_dir}")
    else:
        ppl = f" (ppl {perplexity(best_val):.2f})" if cfg.objective == "lm" else ""  # (DPO's is no cross-entropy)
        log.print(f"done: {step - log.start_step} steps in {minutes(time.time() - log.t_start)}; best val loss "
                  f"{best_val:.4f}{ppl} in {paths['best.pt']}\n"
                  f"  sample:   python sample.py --ckpt {paths['best.pt']} " +
                  ("--chat\n" if chat else "--prompt \"...\"\n") +
                  f"  go on:    python train.py --resume --out-dir={cfg.out_dir} --max-iters=N  (N > {step})\n"
                  f"  records:  {paths['log.jsonl']}" +
                  (f", {paths['loss.png']}" if os.path.exists(paths["loss.png"]) else ""))

def pyplot():
    """matplotlib's pyplot drawing to files (no display needed), or None when it is not installed."""
    if not has_matplotlib():
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt

def read_log(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]

def plot_run(log_path, png_path):
    """loss.png: the run in six panels from log.jsonl, as LF_LLM-269M shows its training: train and
    val loss, learning rate, tokens/s, MFU, gradient norm, and HellaSwag when it was measured."""
    plt = pyplot()
    if plt is None:
        return
    records = read_log(log_path)
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "val_loss" in r and "eval_only" not in r]
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
    loss = axes[0, 0]
    loss.plot([r["step"] for r in steps], [r["loss"] for r in steps], lw=1, label="train")
    loss.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="val")
    loss.set(title="loss", xlabel="step")
    loss.legend()
    for ax, key, title in [(axes[0, 1], "lr", "learning rate (AdamW's)"), (axes[0, 2], "tokens_per_s", "tokens/s"),
                           (axes[1, 0], "mfu", "MFU"), (axes[1, 1], "grad_norm", "gradient norm")]:
        points = [(r["step"], r[key]) for r in steps if r.get(key) is not None]
        if points:
            ax.plot(*zip(*points), lw=1)
        ax.set(title=title, xlabel="step")
    hellaswag = [r for r in evals if "hellaswag_acc" in r]
    ax = axes[1, 2]
    for key in ("hellaswag_acc", "hellaswag_acc_norm_tokens", "hellaswag_acc_norm_chars"):
        if hellaswag:
            ax.plot([r["step"] for r in hellaswag], [r[key] for r in hellaswag], "o-", label=key[10:])
    ax.set(title="HellaSwag" if hellaswag else "HellaSwag (not measured: --hellaswag-every=N)", xlabel="step")
    if hellaswag:
        ax.legend()
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=90)
    plt.close(fig)
