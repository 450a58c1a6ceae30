"""
Train a Llama-style model on the token shards written by prepare.py: one straight path from a
laptop CPU to many GPUs on many nodes, through torch.distributed (torchrun), nothing home-made.

    python train.py                                   # the CPU demo: data/shakespeare, ~1 minute
    python train.py --preset=gpt2_small               # one GPU
    torchrun --standalone --nproc_per_node=8 train.py --preset=gpt2_small
    torchrun --standalone --nproc_per_node=8 train.py --preset=lf_llm_269m --parallel=fsdp  # shard the model
    python train.py --preset=gpt2_small --dry-run --gpu-memory=24   # the plans only: will it fit?
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \\
        train.py --preset=gpt2_small                  # the same line on every node
    python train.py --resume                          # continue out/shakespeare exactly where it stopped
    python train.py --preset=shakespeare_chat         # fine-tune the demo model on conversations
    python train.py --eval-only --ckpt=out/shakespeare/best.pt --hellaswag-path=hellaswag_val.jsonl

Settings are the fields of TrainConfig (below) and ModelConfig (model.py) as --name=value or
--name value. Their defaults are the CPU demo's: what --help shows is what the bare command runs.
--preset picks one of the seed runs' groups of settings (presets.py) first; flags given win, and
the banner prints every setting that differs from the defaults.

The file reads in run order: the settings, then main() (settings -> runtime -> model, optimizer,
data -> the loop -> the end), then the helpers in the order main() first calls them, so every jump
from main() goes down the file. Other files hold the rest, one job each: data.py (what the loop
reads), checkpoint.py (saving and resuming), evaluate.py (validation loss, samples), report.py
(what the run prints and writes), presets.py (the seed runs), muon.py, hellaswag.py, memory.py.
"""
import gc
import math
import os
import signal
import sys
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields

import torch
import torch.distributed as dist

import hellaswag
from checkpoint import check_resume, hf_as_checkpoint, load_checkpoint, load_pretrained, model_from_checkpoint, \
    restore, save
from common import (autocast, check, die, flag, lock, parse_config, parse_flags, pick_device, pick_dtype,
                    run_main, setting)
from data import Mixture, data_sources, load_data, tokenizer_of
from dpo import DPO, Pairs
from evaluate import evaluate_only, evaluate_val, samples
from hardware import gpu_peak_flops, keep_freed_memory, matmul_flops
from model import LOSS_CHUNK, ModelConfig, Transformer
from muon import Muon
from presets import HELP as PRESETS_HELP, PRESETS
from report import RunLog, plot_run, print_plan, print_summary

# --- Settings -------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    """The defaults are the CPU demo: Tiny Shakespeare (python prepare.py) on a 1.27M-parameter model
    (ModelConfig's defaults), 250 steps of 2,048 tokens in about a minute. Muon for the matrices of
    the blocks (AdamW at 1e-2 for the embedding and norms) reaches val 4.44 in 250 steps; AdamW alone
    needed 600 at its best lr, 2e-3 (bench.py --sections=time_to_loss --ttl-run=demo)."""
    preset: str = setting("", "start from a group of settings of presets.py (the seed runs); flags given win")
    data: str = setting("data/shakespeare", "a folder written by prepare.py, or a mixture of such folders with "
                        "weights: data/web:0.7,data/code:0.3")
    out_dir: str = setting("out/shakespeare", "where ckpt.pt, best.pt, log.jsonl and loss.png go")
    resume: bool = setting(False, "continue from out_dir/ckpt.pt, with its settings plus the flags given")
    overwrite: bool = setting(False, "start afresh in an out_dir that holds a run, replacing it")
    eval_only: bool = setting(False, "evaluate --ckpt (val loss, perplexity, HellaSwag) and exit")
    ckpt: str = setting("", "the checkpoint --eval-only reads")
    init_from: str = setting("", "fine-tune: start from this checkpoint's weights and model settings (step 0, "
                             "a new optimizer)")
    init_from_hf: str = setting("", "the same from a Hugging Face Llama folder (config.json, safetensors, "
                                "tokenizer.json), e.g. SmolLM's or one export.py wrote")
    seed: int = setting(1337, "model init, data order and dropout all follow from it")
    # batch and length; the sequence length is the model's max_seq_len
    batch_size: int = setting(16, "sequences per micro-batch, per process")
    batch_tokens: int = setting(0, "tokens per optimizer step over all processes; 0 = one micro-batch each")
    max_iters: int = setting(250, "run length in optimizer steps (--max-tokens given instead replaces it)")
    max_tokens: int = setting(0, "run length in tokens; 0 = use --max-iters")
    # the optimizers; every learning rate follows linear warmup, then cosine decay to min_lr_ratio of its peak
    optimizer: str = setting("muon", "muon: Muon for the matrices inside the blocks, AdamW for the rest; or adamw")
    lr: float = setting(1e-2, "peak learning rate of AdamW")
    min_lr_ratio: float = setting(0.1, "the cosine ends at lr * min_lr_ratio")
    warmup_iters: int = setting(25, "steps of linear warmup from 0 to lr")
    weight_decay: float = setting(0.1, "AdamW weight decay, on matrices only (not norm weights)")
    beta1: float = setting(0.9, "AdamW beta1")
    beta2: float = setting(0.95, "AdamW beta2")
    grad_clip: float = setting(1.0, "clip the gradient norm to this; 0 = no clipping")
    muon_lr: float = setting(0.03, "peak learning rate of Muon (--optimizer=muon)")
    muon_momentum: float = setting(0.9, "Muon's momentum")
    muon_weight_decay: float = setting(0.0, "Muon's decoupled weight decay")
    # evaluation and logging
    eval_every: int = setting(125, "steps between evaluations and checkpoints (and one at the end)")
    eval_batches: int = setting(10, "the fixed validation set: eval_batches * batch_size sequences")
    log_every: int = setting(10, "steps between log lines")
    objective: str = setting("lm", "lm: next-token loss (pretraining, chat fine-tuning); dpo: preference pairs "
                             "(prepare.py --preferences), from --init-from's model (dpo.py)")
    beta: float = setting(0.1, "DPO's beta: how far from the reference model the preferences may pull")
    sample_tokens: int = setting(100, "print a sample this long at each evaluation; 0 = none")
    sample_prompts: str = setting("", "prompts to complete at each evaluation, step 0 included, split by |, e.g. "
                                  "'HTML stands for|life is about'; empty: one sample from a new document")
    hellaswag_every: int = setting(0, "HellaSwag accuracy every N steps and at the end; 0 = never")
    hellaswag_path: str = setting("", "local hellaswag_val.jsonl; empty = download once to data/")
    hellaswag_items: int = setting(0, "score only the first N items (quick checks); 0 = all 10,042")
    hellaswag_style: str = setting("nanogpt", "nanogpt: the text as given; lm-eval: as lm-eval prepares it, to "
                                   "compare acc and acc_norm_chars with its tables")
    plot: bool = setting(True, "draw loss.png at each checkpoint (needs matplotlib)")
    wandb: bool = setting(False, "also log to Weights & Biases (pip install wandb)")
    wandb_project: str = setting("llama-from-scratch", "the wandb project")
    # system
    device: str = setting("auto", "auto (cuda > mps > cpu), cpu, cuda or mps; under torchrun cuda:LOCAL_RANK")
    dtype: str = setting("auto", "autocast dtype: auto, float32, bfloat16 or float16; weights stay fp32")
    compile: str = setting("auto", "torch.compile the model: auto (on for CUDA), true or false")
    parallel: str = setting("ddp", "how torchrun's processes share the work: ddp (each holds the whole model) or "
                            "fsdp (each holds 1/N of the weights, gradients and optimizer state)")
    activation_checkpointing: bool = setting(False, "recompute each block in the backward pass instead of keeping "
                                             "its activations: far less memory, one more forward pass")
    chunked_loss: bool = setting(False, "make the logits and the loss 1024 positions at a time, again in the "
                                 "backward pass: the fp32 logits never exist whole; one more lm_head matmul")
    gpu_memory: float = setting(0.0, "GiB per GPU for the memory plan; 0 = the GPU's own (CUDA)")
    dry_run: bool = setting(False, "print the plans (model, batches, FLOPs, memory per GPU) and exit; needs no "
                            "data or GPU")
    gpus: int = setting(0, "--dry-run: plan for this many processes; 0 = this launch's")
    peak_flops: float = setting(0.0, "per-device peak FLOP/s for MFU; 0 = the GPU's from hardware.PEAK_FLOPS")

    def __post_init__(self):
        check(not self.preset or self.preset in PRESETS,
              f"unknown --preset={self.preset}; choose one of {', '.join(PRESETS)}")
        for name, choices in [("dtype", ("auto", "float32", "bfloat16", "float16")), ("optimizer", ("muon", "adamw")),
                              ("compile", ("auto", "true", "false")), ("parallel", ("ddp", "fsdp")),
                              ("hellaswag_style", ("nanogpt", "lm-eval")), ("objective", ("lm", "dpo"))]:
            value = getattr(self, name)
            check(value in choices, f"{flag(name)}={value} must be one of {', '.join(choices)}")
        for name in ("batch_size", "eval_every", "eval_batches", "log_every"):
            check(getattr(self, name) > 0, f"{flag(name)}={getattr(self, name)} must be positive")
        for name in ("seed", "lr", "batch_tokens", "max_iters", "max_tokens", "warmup_iters", "weight_decay",
                     "grad_clip", "sample_tokens", "hellaswag_every", "hellaswag_items", "peak_flops", "muon_lr",
                     "muon_weight_decay", "gpu_memory", "gpus"):
            check(getattr(self, name) >= 0, f"{flag(name)}={getattr(self, name)} must not be negative")
        check(0 <= self.min_lr_ratio <= 1 and 0 <= min(self.beta1, self.beta2, self.muon_momentum) and
              max(self.beta1, self.beta2, self.muon_momentum) < 1, "need 0 <= min_lr_ratio <= 1 and 0 <= beta "
              f"< 1; got --min-lr-ratio={self.min_lr_ratio} --beta1={self.beta1} --beta2={self.beta2} "
              f"--muon-momentum={self.muon_momentum}")
        check(self.eval_only or (self.max_iters > 0) != (self.max_tokens > 0), "give exactly one of "
              f"--max-iters and --max-tokens (got {self.max_iters} and {self.max_tokens})")
        check(not self.eval_only or self.ckpt, "--eval-only needs --ckpt=PATH")
        check(self.objective == "lm" or self.init_from or self.init_from_hf, "--objective=dpo starts from a "
              "fine-tuned model, its reference: give --init-from=CKPT (or --init-from-hf=DIR)")

MODEL_HELP = {  # --help for ModelConfig's fields (model.py says the same in comments)
    "vocab_size": "embedding rows (default: the data's vocabulary rounded up to a multiple of 64; 4160 for the "
                  "demo's 4096-token BPE)",
    "n_layer": "transformer blocks", "n_head": "query heads H", "n_embd": "model width C",
    "n_kv_head": "key/value heads: = n_head multi-head, < n_head grouped-query, 1 multi-query",
    "ffn_hidden": "MLP width; 0 = Llama's rule (2/3 * 4C rounded up to multiple_of)",
    "multiple_of": "round the derived ffn_hidden up to a multiple of this",
    "max_seq_len": "context length, and the training sequence length",
    "rope_theta": "RoPE base (Llama 2: 1e4, Llama 3: 5e5)", "norm_eps": "RMSNorm epsilon",
    "tie_embeddings": "one matrix for the token embedding and the output head",
    "dropout": "attention and residual dropout (0 for pretraining)",
    "pos_emb": "ablation: rope, learned or none", "mlp": "ablation: swiglu, geglu, or gelu or silu (no gate)",
    "norm": "ablation: rmsnorm, layernorm or none", "norm_position": "ablation: pre (Llama) or post (2017)",
    "attention": "sdpa (fused) or manual (the same math written out, for reading)",
}

# --- The run --------------------------------------------------------------------------------------
def main(argv):
    # --- Settings: field defaults < preset < the checkpoint's own (resume, eval-only) < flags given
    given = parse_flags(argv, [TrainConfig, ModelConfig], __doc__, epilog=PRESETS_HELP, helps=MODEL_HELP)
    cfg, model_cfg, ckpt, meta, init = resolve_settings(given)
    rt = processes()
    if cfg.dry_run:
        return dry_run(cfg, model_cfg, rt)
    T = model_cfg.max_seq_len
    plan = batch_plan(cfg, T, rt.world)
    batch_tokens, accum, max_iters = plan
    if not cfg.eval_only:
        enc, tokenizer = tokenizer_of(meta)
        if ckpt is not None:
            check_resume(ckpt, os.path.join(cfg.out_dir, "ckpt.pt"), enc, cfg.data)
        if rt.master:  # only rank 0 writes out_dir
            check_out_dir(cfg, ckpt, max_iters)

    # --- Runtime: processes, device, precision
    start(rt, cfg)

    # --- Model, optimizer, data
    torch.manual_seed(cfg.seed)  # the same seed on every rank: every rank starts from the same init
    raw_model, init_note = build_model(cfg, model_cfg, ckpt, init, enc if init else None, rt)
    # Compiled or not, raw_model is what gets saved: its state dict has no "_orig_mod." prefixes.
    compiled = torch.compile(raw_model) if rt.compile else raw_model
    if cfg.eval_only:
        evaluate_only(cfg, compiled, ckpt, meta, rt)
        return stop_processes(rt)
    optimizers = build_optimizers(raw_model, cfg, rt)
    step, tokens_seen, best_val = restore(ckpt, raw_model, optimizers, rt) if ckpt else (0, 0, math.inf)
    # Dropout draws from torch's global generator, per rank; rank 0's state is restored exactly.
    if not (ckpt and rt.master):
        torch.manual_seed(cfg.seed + rt.rank + 7919 * step)
    # DDP averages the gradients of all ranks inside backward (FSDP reduce-scatters them in pieces);
    # evaluation uses the model without the DDP wrapper.
    ddp = wrap_ddp(compiled, rt)
    model = ddp or compiled
    data_of = Pairs if cfg.objective == "dpo" else Mixture  # preference pairs, or token windows
    train, val = (data_of(meta, split, T, cfg.seed) for split in ("train", "val"))
    # DPO compares the model with a frozen copy of the one it started from (dpo.py)
    loss_fn = DPO(reference(cfg, model_cfg, init, enc, rt), cfg.beta) if cfg.objective == "dpo" else masked_loss
    items = hellaswag.get_items(cfg.hellaswag_path, cfg.hellaswag_items, rt.rank, rt.world, cfg.hellaswag_style) \
        if cfg.hellaswag_every else None  # loaded (and checked) now, not after hours of training
    paths = {name: os.path.join(cfg.out_dir, name) for name in ("ckpt.pt", "best.pt", "log.jsonl", "loss.png")}
    log = RunLog(paths["log.jsonl"], rt.master, cfg, model_cfg)
    print_plan(log, cfg, raw_model, rt, plan, (train, val, tokenizer), step, init_note)
    log.start_clock(step, tokens_seen, max_iters, raw_model.flops_per_token(T), rt.world, rt.peak_flops)
    stop = StopSignal()  # from here on, SIGTERM and Ctrl-C end the run cleanly at the next step

    # --- The loop: evaluate and save when due, then one optimizer step
    start_step, stopped, why = step, False, ""
    while True:
        last_step = step == max_iters
        # Evaluate at step 0 (the baseline), every eval_every steps and at the end; a resumed run
        # skips its first step, which its checkpoint was evaluated and saved at.
        due = step % cfg.eval_every == 0 and (step > start_step or step == 0)
        evaluate = not stopped and (last_step or due)
        if evaluate:
            record = {"step": step, "tokens": tokens_seen, **(loss_fn.evaluate(compiled, val, cfg, rt) if
                      cfg.objective == "dpo" else evaluate_val(compiled, val, enc, cfg, rt))}
            if not math.isfinite(record["val_loss"]):  # the last update broke the weights: do not save them
                why = f"validation loss is {record['val_loss']}"
                break
            if items and (last_step or step % cfg.hellaswag_every == 0):
                record |= hellaswag.evaluate(compiled, enc, items, rt.device, rt.amp, T, rt.rank, rt.world)
            # From the uncompiled model (decoding shapes vary); on every rank under FSDP, whose
            # forward needs them all: they draw the same tokens from the same seed.
            if (rt.master or rt.fsdp) and cfg.sample_tokens:
                record["samples"] = samples(raw_model, enc, meta["eot_id"], cfg.sample_prompts.split("|"),
                                            cfg.sample_tokens, cfg.seed, rt)
            log.evaluation(record)
        if step > start_step and (evaluate or stopped):
            improved = evaluate and record["val_loss"] < best_val
            best_val = record["val_loss"] if improved else best_val
            save(paths, raw_model, optimizers, improved, rt, tokenizer=tokenizer, eot_id=meta["eot_id"],
                 train_config=asdict(cfg), step=step, tokens_seen=tokens_seen, best_val_loss=best_val)
            if rt.master and cfg.plot:
                plot_run(paths["log.jsonl"], paths["loss.png"])
        if last_step or stopped:
            break

        # One optimizer step: accum micro-batches on each of world processes. The step's global
        # batch is rows [step * rows_per_step, ...) of the epoch order; rank r takes its r-th slice.
        factor = lr_factor(step, cfg, max_iters)
        for optimizer in optimizers:  # from the settings, every step: a resumed run may change them
            for group in optimizer.param_groups:
                group["lr"] = (cfg.muon_lr if isinstance(optimizer, Muon) else cfg.lr) * factor
        loss_sum = torch.zeros((), device=rt.device)  # summed on the device: no sync per micro-step
        for micro in range(accum):
            first = step * (batch_tokens // T) + (rt.rank * accum + micro) * cfg.batch_size
            x, y = train.batch(range(first, first + cfg.batch_size), rt.device)
            # DDP all-reduces the gradients in every backward unless told not to: only the last
            # micro-step of an optimizer step needs it.
            # (FSDP reduce-scatters every micro-step: skipping it would keep whole gradients meanwhile.)
            with ddp.no_sync() if ddp and micro < accum - 1 else nullcontext():
                with rt.amp:  # the forward and the loss in low precision; the backward follows it
                    loss, _ = loss_fn(model, x, y)
                rt.scaler.scale(loss / accum).backward()  # / accum: the step's gradient is the mean
            loss_sum += loss.detach()
        for optimizer in optimizers:
            rt.scaler.unscale_(optimizer)  # clipping must see the true gradients, not scaled ones
        grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip or math.inf)
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP: the norm over all pieces, on every rank
            grad_norm = grad_norm.full_tensor()
        # One small all-reduce a step: the mean loss, a non-finite loss anywhere, a stop request
        # anywhere. Every rank then takes the same decision, so none waits for a rank that left.
        flags = torch.stack([loss_sum / accum, (~torch.isfinite(loss_sum)).float(),
                             torch.tensor(float(stop.requested), device=rt.device)])
        if rt.distributed:
            dist.all_reduce(flags)
        mean_loss, nonfinite, stopped = flags.tolist()  # .tolist(): the one host sync of the step
        mean_loss, stopped = mean_loss / rt.world, bool(stopped)
        if nonfinite:  # before the update: the weights (and ckpt.pt) stay the last good ones
            why = f"loss is {mean_loss}"
            break
        for optimizer in optimizers:
            rt.scaler.step(optimizer)
        rt.scaler.update()
        raw_model.zero_grad(set_to_none=True)  # None, not zeros: the next backward writes, not adds
        step += 1
        tokens_seen += batch_tokens
        if step % cfg.log_every == 0 or step == max_iters:
            log.step(step, tokens_seen, mean_loss, cfg.lr * factor, grad_norm.item(),
                     train.news(step * (batch_tokens // T)), loss_fn.stats() if cfg.objective == "dpo" else {})

    # --- The end
    print_summary(log, cfg, paths, why, step, best_val, stopped, chat="loss_mask" in meta)
    # The DDP wrapper's reducer holds the process group: free it before tearing the group down, or
    # a gloo worker thread can hang the exit waiting for the GIL.
    del model, ddp
    gc.collect()
    stop_processes(rt)
    sys.exit(1 if why else 0)

# --- Settings, resolved ---------------------------------------------------------------------------
def resolve_settings(given):
    """Flags -> (TrainConfig, ModelConfig, checkpoint or None, data meta or None, --init-from's
    checkpoint or None). Later wins: field defaults < the preset < the checkpoint's own settings
    (resume, eval-only) or the model settings of --init-from's < flags."""
    preset = PRESETS.get(given.get("preset", ""), {})
    ckpt_path = given.get("ckpt") if given.get("eval_only") else None
    if given.get("resume") and not given.get("eval_only"):
        ckpt_path = os.path.join(given.get("out_dir", preset.get("out_dir", TrainConfig.out_dir)), "ckpt.pt")
    ckpt, settings = None, layered(preset, given)
    if ckpt_path:
        ckpt = load_checkpoint(ckpt_path)
        # the model, and the optimizer whose state it saved, are what they were
        fixed = {**ckpt["model_config"], "optimizer": ckpt["train_config"].get("optimizer", "adamw")}
        changed = [k for k, v in fixed.items() if k in given and given[k] != v]
        if changed:
            die(f"cannot change {', '.join(flag(k) for k in changed)} of {ckpt_path}; drop them")
        unknown = set(ckpt["train_config"]) - {f.name for f in fields(TrainConfig)}
        if unknown:
            die(f"{ckpt_path} has settings this train.py does not know ({', '.join(sorted(unknown))}); "
                "use the code that wrote it")
        settings = layered(ckpt["train_config"], ckpt["model_config"], given)
    init, source = None, settings.get("init_from") or settings.get("init_from_hf")
    # a resumed fine-tune has its weights in ckpt already; DPO's reference is the start, again
    if source and (ckpt is None or settings.get("objective") == "dpo"):
        if settings.get("init_from") and settings.get("init_from_hf"):
            die("give --init-from or --init-from-hf, not both")
        init = load_checkpoint(source) if settings.get("init_from") else hf_as_checkpoint(source)
        # fine-tuning keeps the model; only dropout may change (the vocabulary grows by itself for the
        # data's new tokens)
        changed = [k for k, v in init["model_config"].items() if k in given and given[k] != v and k != "dropout"]
        if changed:
            die(f"cannot change {', '.join(flag(k) for k in changed)} of {source}; drop them")
        settings = {**settings, **init["model_config"], **given}
    train_keys = {f.name for f in fields(TrainConfig)}
    cfg = parse_config(TrainConfig, {k: v for k, v in settings.items() if k in train_keys})
    model_settings = {k: v for k, v in settings.items() if k not in train_keys}
    need_data = not (cfg.eval_only or cfg.dry_run) or all(os.path.isfile(os.path.join(folder, "meta.json"))
                                                          for folder, _ in data_sources(cfg.data))
    meta = load_data(cfg.data) if need_data else None
    grow = init and meta and meta["vocab_size"] > model_settings["vocab_size"]  # new tokens for a fine-tune
    if meta and ("vocab_size" not in model_settings or grow):
        model_settings["vocab_size"] = 64 * math.ceil(meta["vocab_size"] / 64)  # a multiple of 64: faster matmuls
    model_cfg = parse_config(ModelConfig, model_settings)
    if meta and meta["vocab_size"] > model_cfg.vocab_size:
        die(f"the data's vocabulary ({meta['vocab_size']} tokens, {cfg.data}/meta.json) does not fit the "
            f"model's vocab_size={model_cfg.vocab_size}; raise --vocab-size or re-run prepare.py")
    return cfg, model_cfg, ckpt, meta, init

def layered(*layers):
    """The layers of settings merged, later ones winning. The run's length is one setting given two
    ways: a layer that gives one of --max-iters and --max-tokens also clears the other."""
    settings = {}
    for layer in layers:
        settings |= layer
        for name, other in (("max_iters", "max_tokens"), ("max_tokens", "max_iters")):
            if layer.get(name) and other not in layer:
                settings[other] = 0
    return settings

def processes():
    """torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; without them this is one plain process."""
    env = {k: int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1))}
    return Runtime("RANK" in os.environ, env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"])

@dataclass
class Runtime:
    """Where and how this process computes: its rank among world processes, device and precision."""
    distributed: bool       # started by torchrun: DDP, or FSDP with fsdp
    rank: int
    local_rank: int
    world: int
    device: torch.device = None
    dtype: torch.dtype = None
    amp: object = None      # the autocast context
    scaler: object = None   # fp16's GradScaler (a no-op otherwise)
    compile: bool = False
    peak_flops: float = 0.0  # per device, for MFU; 0 = unknown
    fsdp: bool = False

    @property
    def master(self):
        return self.rank == 0

def dry_run(cfg, model_cfg, rt):
    """--dry-run: the run's plans without data, processes or a GPU. The model is built on the "meta"
    device: shapes without memory, so a 70B model costs nothing. --gpu-memory plans for a GPU."""
    with torch.device("meta"):
        model = Transformer(model_cfg)
    model.loss_chunk = LOSS_CHUNK if cfg.chunked_loss else 0
    rt.world, rt.fsdp = cfg.gpus or rt.world, cfg.parallel == "fsdp"
    rt.device = torch.device("cuda") if cfg.gpu_memory else pick_device(cfg.device)
    floats = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    rt.dtype = floats.get(cfg.dtype, torch.bfloat16) if cfg.gpu_memory else pick_dtype(cfg.dtype, rt.device)
    rt.compile = compiles(cfg, rt.device)
    print_plan(RunLog("", True), cfg, model, rt, batch_plan(cfg, model_cfg.max_seq_len, rt.world))

def batch_plan(cfg, T, world):
    """(tokens per optimizer step, micro-batches per step per process, run length in steps)."""
    micro_tokens = cfg.batch_size * T * world  # one micro-batch on every process
    batch_tokens = cfg.batch_tokens or micro_tokens
    if batch_tokens % micro_tokens:
        die(f"--batch-tokens={batch_tokens} is not a multiple of batch_size * max_seq_len * processes = "
            f"{cfg.batch_size} * {T} * {world} = {micro_tokens}")
    max_iters = math.ceil(cfg.max_tokens / batch_tokens) if cfg.max_tokens else cfg.max_iters
    return batch_tokens, batch_tokens // micro_tokens, max_iters

def check_out_dir(cfg, ckpt, max_iters):
    """Make this the only run writing out_dir; refuse to mix two runs there; exit early (0) when a
    resumed run has nothing left to do."""
    if os.path.exists(cfg.out_dir) and not os.path.isdir(cfg.out_dir):
        die(f"--out-dir={cfg.out_dir} is a file; choose a folder")
    lock(cfg.out_dir, "--out-dir")  # held until this process exits
    os.makedirs(cfg.out_dir, exist_ok=True)
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    if not cfg.resume and os.path.exists(ckpt_path) and not cfg.overwrite:
        die(f"{cfg.out_dir} holds a run already ({ckpt_path}); continue it with --resume, start afresh "
            "with --overwrite, or choose another --out-dir")
    if cfg.resume and ckpt["step"] >= max_iters:
        print(f"{ckpt_path} is at step {ckpt['step']}, the run has {max_iters} steps: nothing to do "
              f"(raise {'--max-tokens' if cfg.max_tokens else '--max-iters'} to train on)")
        sys.exit(0)
    if cfg.overwrite and not cfg.resume:  # the old run's records would run into this one's
        for name in ("log.jsonl", "loss.png"):
            if os.path.exists(os.path.join(cfg.out_dir, name)):
                os.remove(os.path.join(cfg.out_dir, name))

def start(rt, cfg):
    """Join the other processes (if any) and pick the device and precision."""
    rt.device = pick_device(cfg.device)
    rt.fsdp = cfg.parallel == "fsdp" and rt.distributed  # (one plain process has nothing to shard over)
    if rt.distributed:
        if rt.device.type == "cuda":
            rt.device = torch.device(f"cuda:{rt.local_rank}")
            torch.cuda.set_device(rt.device)
        # torch 2.13: importing torch._dynamo after init_process_group (torch.optim does, lazily) keeps
        # the group alive past destroy_process_group. Imported before, destroy frees it.
        from torch import _dynamo  # noqa: F401
        dist.init_process_group(backend="nccl" if rt.device.type == "cuda" else "gloo")
    if rt.device.type == "cpu":  # no page faults for the memory each step frees and takes back
        keep_freed_memory()
    rt.dtype = pick_dtype(cfg.dtype, rt.device)
    rt.amp = autocast(rt.device, rt.dtype)
    # bf16 needs no loss scaling; fp16's narrow range does: the scaler multiplies the loss up
    # before backward and skips the steps whose gradients overflowed.
    rt.scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.dtype == torch.float16)
    # TF32 for fp32 matmuls on Ampere and later GPUs. Not "medium" on CPUs: it moves fp32 matmuls to
    # oneDNN, which trained 0.77x as fast at d128 and 1.02x at d512 here (2-core EPYC, measured).
    torch.set_float32_matmul_precision("high")
    rt.compile = compiles(cfg, rt.device)
    # MFU against the GPU's datasheet peak, or on a CPU against its matmul peak, measured (~0.2 s)
    rt.peak_flops = cfg.peak_flops or gpu_peak_flops(rt.device) or (
        matmul_flops(rt.device, rt.dtype) if rt.device.type == "cpu" else 0.0)

def compiles(cfg, device):
    # torch.compile on a CPU: +53% tokens/s on the demo, but ~30 s to compile, more than it saves there
    return cfg.compile == "true" or (cfg.compile == "auto" and device.type == "cuda")

def build_model(cfg, model_cfg, ckpt, init, enc, rt):
    """The model on its device: new, or the weights of the checkpoint to resume or evaluate, or of
    --init-from's; sharded under FSDP (in place: the sharded model is the model from then on).
    -> (model, what --init-from did, for the log)."""
    path = cfg.ckpt if cfg.eval_only else os.path.join(cfg.out_dir, "ckpt.pt")
    model = model_from_checkpoint(ckpt, path) if ckpt else Transformer(model_cfg)
    init_note = load_pretrained(model, init, cfg.init_from or cfg.init_from_hf, enc) if init and not ckpt else None
    model.checkpointing = cfg.activation_checkpointing
    model.loss_chunk = LOSS_CHUNK if cfg.chunked_loss else 0
    if rt.fsdp:
        shard(model, rt)
    return model.to(rt.device), init_note

def shard(model, rt):
    """FSDP2 (--parallel=fsdp): cut each block's weights, and the rest's (embeddings, last norm, head),
    into one piece per process. A block's weights are gathered for its forward and again for its
    backward, and freed after; its gradients are reduce-scattered into pieces, and each process's
    optimizer updates its pieces. With bf16, FSDP gathers bf16 copies and reduces the gradients in
    fp32 (its mixed precision); the pieces, like DDP's weights, stay fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy()
    if rt.dtype == torch.bfloat16:  # cast_forward_inputs=False: the fp32 RoPE tables go in as they are
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False)
    for layer in model.layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)  # moves the pieces to the GPU of this process

def stop_processes(rt):
    # The barrier lets every rank finish its last collective before any rank tears down; then the
    # group's threads must be gone before the interpreter exits: one still freeing a finished
    # collective needs the GIL and aborts the exit ("terminate called without an active exception").
    if rt.distributed:
        dist.barrier()
        dist.destroy_process_group()

def build_optimizers(model, cfg, rt):
    """[AdamW] or [Muon, AdamW]. Muon takes the 2-D matrices inside the blocks; AdamW takes the rest
    (with Muon: the embedding, an untied output head and the norm weights), with weight decay on
    matrices, not on norm weights."""
    params = dict(model.named_parameters())  # a tied matrix once, as embed_tokens.weight
    muon = [n for n, p in params.items() if cfg.optimizer == "muon" and n.startswith("layers.") and p.dim() == 2]
    decay = [p for n, p in params.items() if n not in muon and p.dim() >= 2]
    no_decay = [p for n, p in params.items() if n not in muon and p.dim() < 2]
    # fused: one kernel for the whole update of all tensors, on CUDA and on CPUs (2.5x faster here)
    adamw = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                               {"params": no_decay, "weight_decay": 0.0}],
                              lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=rt.device.type in ("cuda", "cpu"))
    if not muon:
        return [adamw]
    # Newton-Schulz in bf16 where bf16 matmuls are fast (GPUs, CPUs that train in bf16), else in fp32
    ns_dtype = torch.bfloat16 if rt.device.type == "cuda" or rt.dtype == torch.bfloat16 else torch.float32
    return [Muon([params[n] for n in muon], lr=cfg.muon_lr, momentum=cfg.muon_momentum,
                 weight_decay=cfg.muon_weight_decay, ns_dtype=ns_dtype), adamw]

def wrap_ddp(model, rt):
    """The model under DDP when torchrun started several processes without FSDP; else None."""
    if not rt.distributed or rt.fsdp:
        return None
    from torch.nn.parallel import DistributedDataParallel as DDP
    return DDP(model, device_ids=[rt.local_rank] if rt.device.type == "cuda" else None)

def reference(cfg, model_cfg, init, enc, rt):
    """DPO's reference: the starting checkpoint's model, frozen, on this process's device."""
    model = Transformer(model_cfg)
    load_pretrained(model, init, cfg.init_from or cfg.init_from_hf, enc)
    return model.to(rt.device)

def masked_loss(model, x, y):
    """The mean loss over the targets to learn (y = -1: skip): a micro-batch with none gives 0, not
    the 0 / 0 of cross_entropy's mean. -> (loss, number of targets)."""
    _, loss_sum = model(x, y, reduction="sum")
    count = (y >= 0).sum()
    return loss_sum / count.clamp(min=1), count

class StopSignal:
    """SIGTERM (preemption, torchrun shutting down) or Ctrl-C sets .requested: the run finishes its
    step, saves and exits 0. A second Ctrl-C stops at once."""

    def __init__(self):
        self.requested = False
        signal.signal(signal.SIGTERM, self.request)
        signal.signal(signal.SIGINT, self.request)

    def request(self, signum, frame):
        self.requested = True
        signal.signal(signum, signal.SIG_DFL)

def lr_factor(step, cfg, max_iters):
    """The learning rates' fraction of their peak at step: a linear warmup over warmup_iters steps,
    then a cosine from 1 down to min_lr_ratio at max_iters."""
    if step < cfg.warmup_iters:
        return (step + 1) / cfg.warmup_iters
    progress = min(1.0, (step - cfg.warmup_iters) / max(1, max_iters - cfg.warmup_iters))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

if __name__ == "__main__":
    run_main(main)
