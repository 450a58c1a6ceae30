"""
Write a trained model as a Hugging Face Llama folder, which transformers, lm-eval, vLLM and
llama.cpp's converter load (pip install safetensors; tokenizers too, for tokenizer.json).

    python export.py                                    # out/shakespeare/best.pt -> hf/shakespeare
    python export.py --ckpt out/gpt2_small/best.pt --out hf/gpt2_small
    python sample.py --hf-dir hf/shakespeare --prompt "ROMEO:"      # and back into our sampler

The folder: config.json + model.safetensors (LlamaForCausalLM), generation_config.json,
tokenizer.json + tokenizer_config.json (the same ids as our tiktoken tokenizer), and our tokenizer
spec in config.json["tiktoken_spec"] (a trained BPE's ranks beside it, in tokenizer.tiktoken),
which sample.py --hf-dir reads. The folder is built beside --out and swapped in whole, so a
crash never leaves half an export; replacing an existing folder needs --force.
"""
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import chat
from common import (bytes_to_unicode, check, die, load_for_inference, lock, parse_config, parse_flags, ranks_text,
                    run_main, setting, swap_in)
from model import to_hf

@dataclass
class ExportConfig:
    ckpt: str = setting("out/shakespeare/best.pt", "the checkpoint to export (written by train.py)")
    out: str = setting("", "the folder to write; default: hf/<the checkpoint's folder name>")
    force: bool = setting(False, "replace --out if it holds something already")

    def __post_init__(self):
        check(self.ckpt, "--ckpt is empty; name a checkpoint written by train.py")

def write_hf_tokenizer(enc, eot_id, max_seq_len, folder):
    """tokenizer.json + tokenizer_config.json that encode like enc, if `tokenizers` is installed."""
    try:
        from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    except ImportError:
        print("note: no tokenizer.json: the `tokenizers` package is missing (pip install transformers)")
        return
    # {token bytes: id} and the split regex: tiktoken has no public getters for them
    char, ranks, pattern = bytes_to_unicode(), enc._mergeable_ranks, enc._pat_str

    def as_str(token):
        return "".join(char[b] for b in token)
    specials = {s: enc.encode_single_token(s) for s in enc.special_tokens_set}
    # tiktoken merges the adjacent pair whose concatenation has the lowest rank; tokenizers' BPE the
    # pair listed first. So list every split of every token into two tokens, in the order of ranks.
    merges = [(as_str(t[:i]), as_str(t[i:])) for t, _ in sorted(ranks.items(), key=lambda kv: kv[1])
              for i in range(1, len(t)) if t[:i] in ranks and t[i:] in ranks]
    # ignore_merges: a regex piece that is itself a token is taken whole, as tiktoken does.
    vocab = {**{as_str(t): i for t, i in ranks.items()}, **specials}
    tok = Tokenizer(models.BPE(vocab, merges, ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([  # tiktoken's split regex, then bytes -> characters
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    tok.save(os.path.join(folder, "tokenizer.json"))
    eot = enc.decode_single_token_bytes(eot_id).decode()
    # A chat model ends its replies with <|im_end|>, and transformers' apply_chat_template renders
    # chat.py's layout from the jinja template (our end-of-text as its bos_token).
    chat_files = dict(eos_token=chat.TURN_END, chat_template=chat.JINJA_TEMPLATE) if chat.is_chat(enc) else {}
    # The plain fast tokenizer: LlamaTokenizerFast, chosen from config.json otherwise, prepends BOS.
    write_json(folder, "tokenizer_config.json", dict(tokenizer_class="PreTrainedTokenizerFast", bos_token=eot,
               eos_token=eot, pad_token=eot, model_max_length=max_seq_len, clean_up_tokenization_spaces=False)
               | chat_files)

def write_json(folder, name, obj):
    with open(os.path.join(folder, name), "w") as f:
        json.dump(obj, f, indent=2)

def export_hf(model, enc, eot_id, spec, folder):
    """Write the Hugging Face files of model and its tokenizer into folder (which exists, empty)."""
    from safetensors.torch import save_file
    try:
        state, config = to_hf(model.state_dict(), model.config)
    except ValueError as e:
        die(f"cannot export: {e}; Hugging Face Llama has no such variant")
    # The rows past the tokenizer's ids (train.py rounds the vocabulary up to a multiple of 64) are
    # cut off: a sampler elsewhere could otherwise pick an id that stands for no text.
    n = enc.n_vocab
    state = {k: v[:n] if k in ("model.embed_tokens.weight", "lm_head.weight") else v for k, v in state.items()}
    config = {**config, "vocab_size": n}
    if spec["kind"] == "bpe":  # the ranks go beside config.json rather than inside it
        with open(os.path.join(folder, "tokenizer.tiktoken"), "w") as f:
            f.write(ranks_text(sorted(enc._mergeable_ranks, key=enc._mergeable_ranks.get)))
        spec = {**{k: v for k, v in spec.items() if k not in ("ranks", "ranks_file")},
                "ranks_file": "tokenizer.tiktoken"}
    weights = os.path.join(folder, "model.safetensors")
    save_file({k: v.contiguous() for k, v in state.items()}, weights, metadata={"format": "pt"})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(weights, 0o666 & ~umask)  # safetensors writes 0600; the folder's other files follow the umask
    # "torch_dtype" for transformers < 5, "dtype" for >= 5; tiktoken_spec is for sample.py --hf-dir.
    # End-of-text pads too: batched pipelines need a pad token, and attention masks hide it.
    ids = {"bos_token_id": eot_id, "eos_token_id": eot_id, "pad_token_id": eot_id}
    write_json(folder, "config.json", {**config, **ids, "torch_dtype": "float32", "dtype": "float32",
                                       "tiktoken_spec": spec})
    # generate() stops at any of these: end-of-text, and for a chat model the end of its turn
    stop = [eot_id, enc.encode_single_token(chat.TURN_END)] if chat.is_chat(enc) else eot_id
    write_json(folder, "generation_config.json", {**ids, "eos_token_id": stop})
    write_hf_tokenizer(enc, eot_id, model.config.max_seq_len, folder)

def main(argv):
    cfg = parse_config(ExportConfig, parse_flags(argv, [ExportConfig], __doc__))
    out = Path(cfg.out or Path("hf") / Path(cfg.ckpt).absolute().parent.name)
    if out.exists() and not out.is_dir():
        die(f"--out {out} is a file; choose a folder")
    if out.is_dir() and any(out.iterdir()) and not cfg.force:
        die(f"{out} is not empty; pass --force to replace it, or choose another --out")
    if importlib.util.find_spec("safetensors") is None:  # optional: only the Hugging Face format needs it
        die("the Hugging Face format needs safetensors: pip install safetensors")
    model, enc, eot_id, spec = load_for_inference(cfg.ckpt)
    lock(out, "--out")  # one export at a time into out
    partial = out.with_name(f".{out.name}.partial")  # built here, beside out, then swapped in whole
    try:
        partial.mkdir(parents=True, exist_ok=True)
        for stale in partial.iterdir():  # from an export that was killed
            stale.unlink()
        export_hf(model, enc, eot_id, spec, partial)
        swap_in(partial, out)
    except OSError as e:
        die(f"cannot write {e.filename or out}: {e.strerror}; {out} is as it was before")
    finally:
        if partial.exists():
            shutil.rmtree(partial, ignore_errors=True)
    print(f"wrote {', '.join(sorted(os.listdir(out)))} to {out}")

if __name__ == "__main__":
    run_main(main)
