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
crash never leaves half an export; replacing an earlier export needs --force, and a folder that
holds files export.py does not write (a run's checkpoints, your notes) is never replaced.
"""
import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import chat
from checkpoint import load_for_inference
from common import check, die, lock, own_folder, parse_config, parse_flags, run_main, setting, swap_in
from hf import FOLDER_FILES, export_hf, to_hf, vocab_and_merges
from tokenizer import GPT2_PAT

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
    # A base model's prompts are continued as given, as sample.py does. A chat model's conversations
    # start with end-of-text, as in training: llama.cpp adds it as BOS on every chat path.
    writer.add_add_bos_token(chat.is_chat(enc))
    if chat.is_chat(enc):  # a chat model ends its turns with <|im_end|>
        writer.add_eot_token_id(enc.encode_single_token(chat.TURN_END))
        writer.add_chat_template(chat.MESSAGES_TEMPLATE)
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
    out = Path(cfg.out or Path("gguf") / f"{name}-{cfg.gguf}.gguf").absolute()
    if out.is_dir():
        die(f"--out {out} is a folder; name a .gguf file")
    if out.exists() and out.suffix != ".gguf":  # --force replaces an earlier export, not any file
        die(f"{out} exists and is not a .gguf file; name a .gguf file")
    if out.exists() and not cfg.force:
        die(f"{out} exists; pass --force to replace it, or choose another --out")
    model, enc, eot_id, _ = load_for_inference(cfg.ckpt)
    lock(out, "--out")  # one export at a time into out
    partial = out.with_name(f".{out.name}.partial")
    try:
        export_gguf(model, enc, eot_id, str(partial), cfg.gguf, name)
        os.replace(partial, out)
    except OSError as e:
        die(f"cannot write {e.filename or out}: {e.strerror}; {out} is as it was before")
    finally:
        partial.unlink(missing_ok=True)
    use = f"llama-cli -m {out} -cnv" if chat.is_chat(enc) else f"llama-simple -m {out} -n 64 \"ROMEO:\""
    print(f"wrote {out} ({out.stat().st_size / 1e6:,.1f} MB); run it with llama.cpp, e.g. {use}")

def main(argv):
    cfg = parse_config(ExportConfig, parse_flags(argv, [ExportConfig], __doc__))
    if cfg.gguf:
        return main_gguf(cfg)
    # resolved: the folder is swapped whole, so it must be one of its own (not ".")
    out = own_folder(cfg.out or Path("hf") / Path(cfg.ckpt).absolute().parent.name, "--out")
    if out.exists() and not out.is_dir():
        die(f"--out {out} is a file; choose a folder")
    names = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    strangers = [name for name in names if name not in FOLDER_FILES]
    if strangers:  # even with --force: it replaces an earlier export, never a run or a user's files
        die(f"{out} holds {strangers[0]}, which export.py does not write; choose another --out")
    if names and not cfg.force:
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
