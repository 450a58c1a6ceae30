"""
How good is the model: the validation loss and bits per byte on a fixed set of windows, spread
over the ranks; a sample from it; and train.py --eval-only (these and HellaSwag for a checkpoint).

    record = evaluate_val(model, val, enc, cfg, rt)   # {"val_loss", "val_bpb", "val_loss[FOLDER]"...}
"""
import functools
import math
import os

import numpy as np
import torch
import torch.distributed as dist

import hellaswag
from checkpoint import check_tokenizer, tokenizer_from_checkpoint
from common import die, printable
from data import Mixture, tokenizer_of
from report import RunLog, perplexity

@functools.lru_cache(maxsize=4)
def token_bytes(enc, device):
    """(V,) the UTF-8 bytes each token id of enc stands for; 0 for special tokens and unused ids."""
    specials = set(enc._special_tokens.values())
    lengths = []
    for i in range(enc.n_vocab):
        try:
            lengths.append(0 if i in specials else len(enc.decode_single_token_bytes(i)))
        except KeyError:  # a gap in the ranks
            lengths.append(0)
    return torch.tensor(lengths, dtype=torch.float64, device=device)

@torch.no_grad()
def evaluate_loss(model, windows, cfg, rt, nbytes):
    """(mean loss, bits per byte) over the fixed validation set (the first eval_batches * batch_size
    windows), spread over the ranks and summed across them, so it does not depend on the world size.
    Bits per byte (nanochat's measure) do not depend on the tokenizer: the loss of the targets that
    stand for text, in bits, over the bytes of that text; nbytes (V,) gives each id's bytes."""
    model.eval()
    n = min(windows.n, cfg.eval_batches * cfg.batch_size)
    ids = np.arange(n)[rt.rank::rt.world]
    total = torch.zeros(4, dtype=torch.float64, device=rt.device)  # (loss sum, targets, loss on text, bytes)
    # Every rank runs as many batches, an empty one as window 0 counted 0 times: under FSDP each
    # forward gathers weights from all ranks, and one that stops early would leave the others waiting.
    for i in range(0, math.ceil(n / rt.world), cfg.batch_size):
        mine = ids[i:i + cfg.batch_size]
        x, y = windows.batch(mine if len(mine) else [0], rt.device)
        with rt.amp:
            _, losses = model(x, y, reduction="none")                               # (B, T), 0 where y = -1
        text = nbytes[y.clamp(min=0)] * (y >= 0)                                    # (B, T) bytes per target
        if len(mine):
            total += torch.stack([losses.double().sum(), (y >= 0).sum().double(),
                                  (losses.double() * (text > 0)).sum(), text.sum()])
    if rt.world > 1:
        dist.all_reduce(total)
    model.train()
    if total[1] == 0:  # (on every rank alike: the counts are summed) a loss of 0 / 0 would read as NaN
        die(f"the validation set of {windows.folder} ({n} windows of {windows.seq_len} tokens) holds no token to "
            "learn: its replies are too short or too few there; raise --eval-batches, or prepare the data with a "
            "larger --val-fraction")
    return (total[0] / total[1]).item(), (total[2] / (math.log(2) * total[3])).item()

def evaluate_val(model, val, enc, cfg, rt):
    """{"val_loss": the mixture's (its sources' losses by weight), "val_bpb": the same in bits per
    byte, "val_loss[FOLDER]": each source's when there are several}."""
    nbytes = token_bytes(enc, rt.device)
    results = [evaluate_loss(model, windows, cfg, rt, nbytes) for windows in val.windows]
    record = {"val_loss": sum(w * loss for w, (loss, _) in zip(val.weights, results)),
              "val_bpb": sum(w * bpb for w, (_, bpb) in zip(val.weights, results))}
    record["val_ppl"] = perplexity(record["val_loss"])
    if len(results) > 1:
        record |= {f"val_loss[{name}]": loss for name, (loss, _) in zip(val.names, results)}
    return record

def samples(model, enc, eot_id, prompts, n_tokens, seed, rt):
    """{prompt: its completion} for each prompt ("" = a new document, from end-of-text), seeded the
    same at every evaluation: the same prompts at step 0 and at the end show what training taught.
    The text is printable (control bytes escaped)."""
    completions = {}
    for prompt in prompts:
        ids = [eot_id] + enc.encode_ordinary(prompt)[-(model.config.max_seq_len - 1):]
        with rt.amp:
            out = model.generate(torch.tensor([ids], device=rt.device), n_tokens, temperature=0.8, top_k=200,
                                 vocab_size=enc.n_vocab, generator=torch.Generator(rt.device).manual_seed(seed))
        completions[prompt] = printable(enc.decode(out[0, len(ids):].tolist()))
    return completions

def evaluate_only(cfg, model, ckpt, meta, rt):
    """--eval-only: val loss (when the data folder exists) and HellaSwag of a checkpoint; one log line."""
    enc = tokenizer_from_checkpoint(ckpt, cfg.ckpt, model.config.vocab_size)
    if meta is not None:
        check_tokenizer(ckpt, cfg.ckpt, tokenizer_of(meta)[0], cfg.data)
    # HellaSwag when asked for, or when its file is at hand: an offline machine still gets the val loss
    wanted = (cfg.hellaswag_path or cfg.hellaswag_items or cfg.hellaswag_every
              or os.path.isfile(hellaswag.DEFAULT_PATH))
    items = (hellaswag.get_items(cfg.hellaswag_path, cfg.hellaswag_items, rt.rank, rt.world, cfg.hellaswag_style)
             if wanted else [])
    if meta is None and not items:
        die(f"nothing to evaluate: no data at --data={cfg.data} and no HellaSwag asked for (--hellaswag-items=N "
            "downloads it)")
    record = {"step": ckpt["step"], "eval_only": cfg.ckpt}
    if meta is not None:
        record |= evaluate_val(model, Mixture(meta, "val", model.config.max_seq_len, cfg.seed), enc, cfg, rt)
    T = model.config.max_seq_len
    if items:
        record |= hellaswag.evaluate(model, enc, items, rt.device, rt.amp, T, rt.rank, rt.world)
    log = RunLog(os.path.join(os.path.dirname(os.path.abspath(cfg.ckpt)), "log.jsonl"), rt.master)
    log.print(" | ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()))
    log.record(record)
