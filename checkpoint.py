"""
The checkpoint: one file with a model, its tokenizer and, from train.py, all that resumes its run.
Written atomically, read with torch.load(weights_only=True): a checkpoint is data, never code.

    save_checkpoint("out/x/ckpt.pt", model, tokenizer_spec, eot_id)     # what sampling needs
    model, enc, eot_id, spec = load_for_inference("out/x/best.pt")      # sample.py, export.py

train.py's side: save() and restore() of the whole training state under one process, DDP or FSDP
(weights and optimizer states gathered whole and keyed by parameter name, so any of the three
resumes any other's file), the checks before a resume, and --init-from / --init-from-hf as the
starting point of a fine-tune.
"""
import dataclasses
import math
import os
import warnings

import torch

from common import atomic_write, die, one_line
from hf import load_hf_folder
from model import ModelConfig, Transformer
from tokenizer import load_tokenizer, tokenizer_fingerprint

# --- The file -------------------------------------------------------------------------------------
CHECKPOINT_VERSION = 1
CHECKPOINT_KEYS = {"version": int, "model": dict, "model_config": dict, "train_config": dict, "step": int,
                   "tokens_seen": int, "best_val_loss": float, "tokenizer": dict, "eot_id": int}

def save_checkpoint(path, model, tokenizer, eot_id, weights=None, **training_state):
    """Write a checkpoint atomically (see atomic_write): the model's weights (pass the uncompiled
    module, or its state dict as weights) and config, the tokenizer spec and end-of-text id, so
    sampling needs nothing else, plus what train.py adds to resume (train_config, optimizer, step, ...)."""
    state = {"version": CHECKPOINT_VERSION, "model": model.state_dict() if weights is None else weights,
             "model_config": dataclasses.asdict(model.config), "tokenizer": tokenizer, "eot_id": eot_id,
             "train_config": {}, "step": 0, "tokens_seen": 0, "best_val_loss": math.inf, **training_state}
    with atomic_write(path) as f:
        torch.save(state, f)

def load_checkpoint(path):
    """The dict train.py saved at path, after checking the file, its version and its keys; anything
    else is a one-line error. weights_only: a checkpoint is data, and unpickling objects could run code."""
    if not os.path.isfile(path):
        die(f"checkpoint {path} not found (train.py writes OUT_DIR/ckpt.pt and OUT_DIR/best.pt)")
    try:
        with warnings.catch_warnings():  # torch warns about pickles of other protocols before it refuses them
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several kinds for a damaged file
        die(f"cannot read checkpoint {path} ({type(e).__name__}): a damaged file, or not one train.py wrote "
            "(checkpoints load as data, never as code)")
    ckpt = ckpt if isinstance(ckpt, dict) else {}
    missing = [k for k in CHECKPOINT_KEYS if k not in ckpt]
    if missing or ckpt["version"] != CHECKPOINT_VERSION:
        die(f"{path} is not a version-{CHECKPOINT_VERSION} checkpoint of this repo "
            f"(version={ckpt.get('version')}, missing keys: {missing or 'none'}); "
            "use the code of the version that wrote it")
    wrong = [k for k, kind in CHECKPOINT_KEYS.items() if not isinstance(ckpt[k], kind)]
    if wrong:
        die(f"{path} is damaged: {', '.join(wrong)} of the wrong type")
    return ckpt

def model_from_checkpoint(ckpt, path):
    """The fp32 Transformer a checkpoint holds, on the CPU; weights that do not fit it are an error."""
    try:
        model = Transformer(ModelConfig(**ckpt["model_config"]))
        model.load_state_dict(ckpt["model"])
    except (TypeError, ValueError, RuntimeError) as e:
        die(f"{path} does not fit this model.py: {one_line(e)}")
    return model

def tokenizer_from_checkpoint(ckpt, path, vocab_size):
    """The checkpoint's tokenizer, checked against the model's vocabulary and end-of-text id."""
    try:
        enc = load_tokenizer(ckpt["tokenizer"])
    except Exception as e:  # a damaged spec, or tiktoken offline without its cache
        die(f"cannot build the tokenizer of {path}: {one_line(e)}")
    if enc.n_vocab > vocab_size or not 0 <= ckpt["eot_id"] < enc.n_vocab:
        die(f"{path} is damaged: its tokenizer has {enc.n_vocab} ids, the model {vocab_size}, "
            f"end-of-text is {ckpt['eot_id']}")
    return enc

def load_for_inference(path):
    """(model, tokenizer, end-of-text id, tokenizer spec) of a train.py checkpoint; fp32, on the CPU."""
    ckpt = load_checkpoint(path)
    model = model_from_checkpoint(ckpt, path)
    enc = tokenizer_from_checkpoint(ckpt, path, model.config.vocab_size)
    return model, enc, ckpt["eot_id"], ckpt["tokenizer"]


# --- train.py: the whole training state, under one process, DDP or FSDP ---------------------------
def save(paths, model, optimizers, improved, rt, **state):
    """ckpt.pt, and best.pt if improved, called on every rank: the weights and optimizer states are
    gathered whole onto rank 0's CPU (FSDP holds them in pieces) and keyed by parameter name, so a
    checkpoint written under FSDP resumes under DDP or on one process, and the other way round."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=options)
    optimizer_states = [get_optimizer_state_dict(model, optimizer, options=options) for optimizer in optimizers]
    if not rt.master:
        return
    save_checkpoint(paths["ckpt.pt"], model, weights=weights, optimizer=optimizer_states,
                    scaler=rt.scaler.state_dict(), rng=rng_state(rt), **state)
    if improved:  # best.pt: the same bytes, written atomically too
        with open(paths["ckpt.pt"], "rb") as src, atomic_write(paths["best.pt"]) as dst:
            dst.write(src.read())

def rng_state(rt):
    return {"torch": torch.get_rng_state(),
            "cuda": [torch.cuda.get_rng_state(rt.device)] if rt.device.type == "cuda" else []}

def restore(ckpt, model, optimizers, rt):
    """Put back what ckpt saved besides the weights (those went in before sharding): the optimizer
    states (each process takes its pieces under FSDP), the scaler, rank 0's RNG -> (step, tokens, best val)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    states = ckpt["optimizer"] if isinstance(ckpt["optimizer"], list) else [ckpt["optimizer"]]  # older: one
    for optimizer, state in zip(optimizers, states, strict=True):
        if all(isinstance(k, str) for k in state["state"]):  # by parameter name
            set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
        elif rt.fsdp:
            die("this checkpoint's optimizer state predates FSDP: resume it once without --parallel=fsdp")
        else:  # older checkpoints: by the parameter's position in the optimizer
            optimizer.load_state_dict(state)
    rt.scaler.load_state_dict(ckpt["scaler"])
    if rt.master:
        torch.set_rng_state(ckpt["rng"]["torch"])
        if rt.device.type == "cuda" and ckpt["rng"]["cuda"]:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"][0], rt.device)
    return ckpt["step"], ckpt["tokens_seen"], ckpt["best_val_loss"]

def check_resume(ckpt, path, enc, folder):
    """A checkpoint to resume holds the whole training state, and the data its tokenizer's ids."""
    for key in ("optimizer", "scaler", "rng"):
        if key not in ckpt:
            die(f"{path} has no {key} state, so it cannot be resumed exactly")
    check_tokenizer(ckpt, path, enc, folder)

def check_tokenizer(ckpt, path, enc, folder):
    """Refuse data whose ids mean other text than the checkpoint's tokenizer made them mean."""
    if tokenizer_fingerprint(enc) != tokenizer_fingerprint(tokenizer_from_checkpoint(ckpt, path, math.inf)):
        die(f"{folder} was tokenized with another tokenizer than {path} ({ckpt['tokenizer']['name']}); point "
            "--data at data prepared with the checkpoint's tokenizer")

# --- Starting points of a fine-tune: --init-from and --init-from-hf ---------------------------------
def hf_as_checkpoint(folder):
    """--init-from-hf: a Hugging Face Llama folder as the parts of a checkpoint that --init-from uses."""
    model, _, eot_id, spec = load_hf_folder(folder)
    return {"model": model.state_dict(), "model_config": dataclasses.asdict(model.config), "tokenizer": spec, "eot_id": eot_id}

def load_pretrained(model, init, path, enc):
    """--init-from: the checkpoint's weights into model. Rows of tokens its tokenizer lacks (chat.py's,
    added by prepare.py --chat) start at the mean of the known tokens' rows: an average token, rather
    than noise the model has never seen. -> what was done, for the log."""
    base = tokenizer_from_checkpoint(init, path, math.inf)
    same = base._pat_str == enc._pat_str and base._mergeable_ranks == enc._mergeable_ranks
    if not same or not base._special_tokens.items() <= enc._special_tokens.items():
        die(f"the data was tokenized with another tokenizer than {path} ({base.name}); prepare it with "
            "that tokenizer (prepare.py --tokenizer DATA_FOLDER or NAME)")
    new = sorted(set(enc._special_tokens.values()) - set(base._special_tokens.values()))
    state = dict(init["model"])
    for name in ("embed_tokens.weight", "lm_head.weight"):
        rows = model.state_dict()[name].clone()                                     # (V, C), V may have grown
        old = state[name]
        rows[:len(old)] = old
        rows[new] = old[:base.n_vocab].mean(0)
        state[name] = rows
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        die(f"{path} does not fit this model: {one_line(e)}")
    names = ", ".join(k for k, v in enc._special_tokens.items() if v in new)
    return f"init    weights of {path}" + (f"; new tokens {names} start at the mean embedding" if new else "")
