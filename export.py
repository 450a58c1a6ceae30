"""
Write a trained model as a Hugging Face Llama folder, which transformers, lm-eval and vLLM load
(pip install safetensors; tokenizers too, for tokenizer.json), or as a GGUF file for llama.cpp.

    python export.py                                    # out/shakespeare/best.pt -> hf/shakespeare
    python export.py --ckpt out/gpt2_small/best.pt --out hf/gpt2_small
    python sample.py --hf-dir hf/shakespeare --prompt "ROMEO:"      # and back into our sampler
    python export.py --gguf=f16                         # -> gguf/shakespeare-f16.gguf (pip install gguf)

GGUF: written with the gguf package (llama.cpp's own writer) rather than llama.cpp's converter,
which recognizes a tokenizer by a hash of its vocabulary and so refuses every BPE prepare.py
trains. Ours splits text with GPT-2's pattern, which llama.cpp knows as the "gpt-2" pre-tokenizer;
q_proj and k_proj rows move to llama.cpp's interleaved RoPE layout.

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
from common import (GPT2_PAT, bytes_to_unicode, check, die, load_for_inference, lock, parse_config, parse_flags,
                    ranks_text, run_main, setting, swap_in)
from model import to_hf

@dataclass
class ExportConfig:
    ckpt: str = setting("out/shakespeare/best.pt", "the checkpoint to export (written by train.py)")
    out: str = setting("", "the folder to write (a .gguf file with --gguf); default: hf/<the checkpoint's "
                       "folder name>, or gguf/<it>-<dtype>.gguf")
    force: bool = setting(False, "replace --out if it holds something already")
    gguf: str = setting("", "write one GGUF file for llama.cpp instead, its matrices in f32, f16 or bf16 "
                        "(pip install gguf)")

    def __post_init__(self):
        check(self.ckpt, "--ckpt is empty; name a checkpoint written by train.py")
        check(self.gguf in ("", "f32", "f16", "bf16"), f"--gguf={self.gguf} must be f32, f16 or bf16")

def vocab_and_merges(enc):
    """enc as byte-level BPE files have it: {token as GPT-2's visible characters: id} (special tokens
    as their text) and the merges [(left, right)], highest priority first."""
    # {token bytes: id} and the split regex: tiktoken has no public getters for them
    char, ranks = bytes_to_unicode(), enc._mergeable_ranks

    def as_str(token):
        return "".join(char[b] for b in token)
    specials = {s: enc.encode_single_token(s) for s in enc.special_tokens_set}
    # tiktoken merges the adjacent pair whose concatenation has the lowest rank; BPE files the pair
    # listed first. So list every split of every token into two tokens, in the order of ranks.
    merges = [(as_str(t[:i]), as_str(t[i:])) for t, _ in sorted(ranks.items(), key=lambda kv: kv[1])
              for i in range(1, len(t)) if t[:i] in ranks and t[i:] in ranks]
    return {**{as_str(t): i for t, i in ranks.items()}, **specials}, merges

def write_hf_tokenizer(enc, eot_id, max_seq_len, folder):
    """tokenizer.json + tokenizer_config.json that encode like enc, if `tokenizers` is installed."""
    try:
        from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    except ImportError:
        print("note: no tokenizer.json: the `tokenizers` package is missing (pip install transformers)")
        return
    vocab, merges = vocab_and_merges(enc)
    specials, pattern = enc.special_tokens_set, enc._pat_str
    # ignore_merges: a regex piece that is itself a token is taken whole, as tiktoken does.
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

# --- GGUF, llama.cpp's format ------------------------------------------------------------------------
GGUF_NAMES = {  # Hugging Face's name (after "model.", with {i} the layer) -> llama.cpp's
    "embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "layers.{i}.input_layernorm.weight": "blk.{i}.attn_norm.weight",
    "layers.{i}.self_attn.q_proj.weight": "blk.{i}.attn_q.weight",
    "layers.{i}.self_attn.k_proj.weight": "blk.{i}.attn_k.weight",
    "layers.{i}.self_attn.v_proj.weight": "blk.{i}.attn_v.weight",
    "layers.{i}.self_attn.o_proj.weight": "blk.{i}.attn_output.weight",
    "layers.{i}.post_attention_layernorm.weight": "blk.{i}.ffn_norm.weight",
    "layers.{i}.mlp.gate_proj.weight": "blk.{i}.ffn_gate.weight",
    "layers.{i}.mlp.up_proj.weight": "blk.{i}.ffn_up.weight",
    "layers.{i}.mlp.down_proj.weight": "blk.{i}.ffn_down.weight",
}

def rope_interleave(w, n_heads):
    """q_proj or k_proj rows from HF's rotate-half RoPE layout (channel i pairs with i + D/2) to the
    interleaved one llama.cpp's Llama uses (i pairs with i + 1), head by head."""
    rows, cols = w.shape
    return w.reshape(n_heads, 2, rows // n_heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)

def export_gguf(model, enc, eot_id, path, dtype, name="model"):
    """One GGUF file for llama.cpp: the weights (matrices in dtype, norms in f32) and the tokenizer as
    a GPT-2-style byte-level BPE ("gpt2" model, "gpt-2" pre-tokenizer: the split pattern ours use)."""
    try:
        import gguf
    except ImportError:
        die("GGUF export needs the gguf package (llama.cpp's writer): pip install gguf")
    import numpy as np
    if enc._pat_str != GPT2_PAT and enc.name.split("-")[0] not in ("r50k_base", "gpt2"):  # GPT-2's own: same split
        die("llama.cpp pre-tokenizes as GPT-2 does, and this tokenizer splits text another way; export it "
            "to a Hugging Face folder instead")
    try:
        state, _ = to_hf(model.state_dict(), model.config)
    except ValueError as e:
        die(f"cannot export: {e}; llama.cpp's Llama has no such variant")
    mc, n = model.config, enc.n_vocab
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name(name)
    writer.add_context_length(mc.max_seq_len)
    writer.add_embedding_length(mc.n_embd)
    writer.add_block_count(mc.n_layer)
    writer.add_feed_forward_length(mc.ffn_hidden)
    writer.add_head_count(mc.n_head)
    writer.add_head_count_kv(mc.n_kv_head)
    writer.add_rope_dimension_count(mc.head_dim)
    writer.add_rope_freq_base(mc.rope_theta)
    writer.add_layer_norm_rms_eps(mc.norm_eps)
    writer.add_vocab_size(n)
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "bf16": gguf.LlamaFileType.MOSTLY_BF16}[dtype])
    vocab, merges = vocab_and_merges(enc)
    tokens = sorted(vocab, key=vocab.get)
    assert [vocab[t] for t in tokens] == list(range(n)), "token ids with gaps"
    specials = set(enc.special_tokens_set)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in specials else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges([f"{a} {b}" for a, b in merges])
    writer.add_bos_token_id(eot_id)
    writer.add_eos_token_id(eot_id)
    writer.add_pad_token_id(eot_id)
    writer.add_add_bos_token(False)  # prompts are continued as given, as sample.py does
    if chat.is_chat(enc):  # a chat model ends its turns with <|im_end|>
        writer.add_eot_token_id(enc.encode_single_token(chat.TURN_END))
        writer.add_chat_template(chat.JINJA_TEMPLATE)
    for name, tensor in state.items():
        name = name.removeprefix("model.")
        layer = name.split(".")[1] if name.startswith("layers.") else None
        key = name.replace(f"layers.{layer}.", "layers.{i}.") if layer else name
        w = tensor.detach().float().numpy()
        if key.endswith(("embed_tokens.weight", "lm_head.weight")):
            w = w[:n]  # the rows of real token ids only (train.py pads the vocabulary)
        if key.endswith("q_proj.weight"):
            w = rope_interleave(w, mc.n_head)
        if key.endswith("k_proj.weight"):
            w = rope_interleave(w, mc.n_kv_head)
        if w.ndim == 1 or dtype == "f32":
            writer.add_tensor(GGUF_NAMES[key].format(i=layer), np.ascontiguousarray(w, dtype=np.float32))
        elif dtype == "f16":
            writer.add_tensor(GGUF_NAMES[key].format(i=layer), w.astype(np.float16))
        else:
            kind = gguf.GGMLQuantizationType.BF16
            writer.add_tensor(GGUF_NAMES[key].format(i=layer), gguf.quants.quantize(w, kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

def main_gguf(cfg):
    """--gguf: the checkpoint as one GGUF file, written beside its place and renamed into it."""
    name = Path(cfg.ckpt).absolute().parent.name
    out = Path(cfg.out or Path("gguf") / f"{name}-{cfg.gguf}.gguf")
    if out.is_dir():
        die(f"--out {out} is a folder; name a .gguf file")
    if out.exists() and not cfg.force:
        die(f"{out} exists; pass --force to replace it, or choose another --out")
    model, enc, eot_id, _ = load_for_inference(cfg.ckpt)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial")
    try:
        export_gguf(model, enc, eot_id, str(partial), cfg.gguf, name)
        os.replace(partial, out)
    except OSError as e:
        die(f"cannot write {e.filename or out}: {e.strerror}; {out} is as it was before")
    finally:
        partial.unlink(missing_ok=True)
    print(f"wrote {out} ({out.stat().st_size / 1e6:,.1f} MB); run it with llama.cpp, e.g. "
          f"llama-simple -m {out} -n 64 \"ROMEO:\"")

def main(argv):
    cfg = parse_config(ExportConfig, parse_flags(argv, [ExportConfig], __doc__))
    if cfg.gguf:
        return main_gguf(cfg)
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
