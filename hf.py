"""
Hugging Face Llama folders, in and out: our state dict and ModelConfig <-> LlamaForCausalLM's
(a rename: model.py uses HF's names and RoPE layout), safetensors files, and our tiktoken tokenizer
<-> a byte-level BPE tokenizer.json. export.py writes folders, sample.py --hf-dir and train.py
--init-from-hf read them, prepare.py --tokenizer hf:DIR reads a folder's tokenizer.

    state, config = to_hf(model.state_dict(), model.config)      # pure functions: no I/O
    model, enc, eot_id, spec = load_hf_folder("hf/shakespeare")  # config.json + safetensors + tokenizer
    export_hf(model, enc, eot_id, spec, folder)                  # the reverse, into an empty folder

safetensors and tokenizers are optional packages, imported where they are needed.
"""
import base64
import importlib.util
import json
import os

import chat
from common import die, file_in, one_line
from model import ModelConfig, Transformer
from tokenizer import GPT2_PAT, load_tokenizer, ranks_text, with_ranks

# --- State dicts and configs: pure functions --------------------------------------------------------
def to_hf(state_dict, cfg):
    """Our state dict + ModelConfig -> (LlamaForCausalLM state dict, config.json dict)."""
    if (cfg.pos_emb, cfg.mlp, cfg.norm, cfg.norm_position) != ("rope", "swiglu", "rmsnorm", "pre"):
        raise ValueError(f"only Llama exports; got pos_emb={cfg.pos_emb}, mlp={cfg.mlp}, norm={cfg.norm}, "
                         f"norm_position={cfg.norm_position}")
    hf = {("" if name == "lm_head.weight" else "model.") + name: t for name, t in state_dict.items()}
    if cfg.tie_embeddings:
        del hf["lm_head.weight"]  # HF ties lm_head to embed_tokens again when it loads
    config = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu", attention_bias=False,
                  mlp_bias=False, vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, intermediate_size=cfg.ffn_hidden,
                  num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head,
                  head_dim=cfg.head_dim, max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
                  tie_word_embeddings=cfg.tie_embeddings, rope_theta=cfg.rope_theta,  # read by transformers < 5;
                  rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta})  # by >= 5
    return hf, config

def from_hf(hf_state_dict, hf_config):
    """LlamaForCausalLM state dict + config.json dict -> (our state dict, ModelConfig)."""
    rope = hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ValueError(f"RoPE scaling {rope} is not supported; only plain RoPE")
    n_head, C = hf_config["num_attention_heads"], hf_config["hidden_size"]
    if (hf_config.get("head_dim", C // n_head) * n_head != C or hf_config.get("hidden_act", "silu") != "silu"
            or hf_config.get("attention_bias") or hf_config.get("mlp_bias")):
        raise ValueError("only Llama with head_dim * heads = hidden_size, silu and no biases is supported")
    cfg = ModelConfig(vocab_size=hf_config["vocab_size"], n_layer=hf_config["num_hidden_layers"], n_head=n_head,
                      n_kv_head=hf_config.get("num_key_value_heads") or n_head, n_embd=C,
                      ffn_hidden=hf_config["intermediate_size"], max_seq_len=hf_config["max_position_embeddings"],
                      rope_theta=float(rope.get("rope_theta", hf_config.get("rope_theta", 10000.0))),
                      norm_eps=hf_config.get("rms_norm_eps", 1e-6),  # LlamaConfig's defaults
                      tie_embeddings=bool(hf_config.get("tie_word_embeddings", False)))
    # Anything else (rotary_emb.inv_freq in old checkpoints) is derived from the config, not learned.
    state_dict = {name.removeprefix("model."): t for name, t in hf_state_dict.items()
                  if name.startswith("model.") or name == "lm_head.weight"}
    if cfg.tie_embeddings:
        state_dict["lm_head.weight"] = state_dict["embed_tokens.weight"]
    return state_dict, cfg

# --- Tokenizers: tiktoken ranks <-> tokenizer.json ---------------------------------------------------
def bytes_to_unicode():
    """GPT-2's byte -> character map behind byte-level BPE files: printable Latin-1 bytes stand for
    themselves, the others (space, control bytes) move to U+0100 onwards, so tokens are visible strings."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(moved)}}

# The text a converted tokenizer must encode exactly as the folder's own tokenizer does.
PROBE = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"
         "  It's 2026; they'll pay $1,234.56 -- naïve café, 日本語, emoji 🦙👍🏽, tabs\t\tand   spaces\r\n")

def tokenizer_from_hf(folder):
    """A tokenizer spec (kind "bpe", ranks inline) for a Hugging Face folder's byte-level BPE
    tokenizer.json (GPT-2's family: GPT-2, SmolLM, our exports), checked against the `tokenizers`
    package on PROBE. Others (SentencePiece, as in Llama 2 and TinyLlama) are refused."""
    try:
        import tokenizers
    except ImportError:
        die("reading a Hugging Face tokenizer.json needs the tokenizers package: pip install tokenizers")
    path = os.path.join(folder, "tokenizer.json")
    try:
        with open(path, encoding="utf-8") as f:
            spec = json.load(f)
        hf = tokenizers.Tokenizer.from_file(path)
        model, pre = spec["model"], json.dumps(spec.get("pre_tokenizer"))
        assert model["type"] == "BPE" and "ByteLevel" in pre, "not a byte-level BPE"
        # the split pattern: an explicit Split regex, or ByteLevel's own (GPT-2's)
        steps = spec["pre_tokenizer"].get("pretokenizers") or [spec["pre_tokenizer"]]
        splits = [p["pattern"]["Regex"] for p in steps
                  if p.get("type") == "Split" and "Regex" in p.get("pattern", {})]
        pattern = splits[0] if splits else GPT2_PAT
        if any(p.get("type") == "Digits" and p.get("individual_digits") for p in steps):  # SmolLM's
            pattern = pattern.replace(r" ?\p{N}+", r"\p{N}")  # each digit its own piece
        byte_of = {c: b for b, c in bytes_to_unicode().items()}
        specials = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
        ranks = {bytes(byte_of[c] for c in token): rank for token, rank in model["vocab"].items()
                 if token not in specials}
    except Exception as e:  # a missing or malformed file, or another kind of tokenizer
        die(f"cannot use the tokenizer of {folder}: {one_line(e)}; byte-level BPE tokenizers (GPT-2, SmolLM, "
            "export.py folders) work")
    if "<|endoftext|>" not in specials:  # the token that starts each document here
        die(f"the tokenizer of {folder} has no <|endoftext|> special token, which the scripts need")
    lines = "".join(f"{base64.b64encode(t).decode()} {rank}\n"
                    for t, rank in sorted(ranks.items(), key=lambda x: x[1]))
    ours = {"kind": "bpe", "name": "hf:" + os.path.basename(os.path.abspath(folder)), "pat_str": pattern,
            "special_tokens": specials, "ranks": lines}
    enc = load_tokenizer(ours)
    if enc.encode_ordinary(PROBE) != hf.encode(PROBE, add_special_tokens=False).ids:
        die(f"the tokenizer of {folder} does not give the same ids through tiktoken; it is not supported")
    return ours

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

# --- Folders ---------------------------------------------------------------------------------------
# What export_hf writes: export.py replaces a folder only if it holds nothing else.
FOLDER_FILES = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                "tokenizer_config.json", "tokenizer.tiktoken"}

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

def load_hf_state(folder):
    """The tensors of model.safetensors, or of the shards model.safetensors.index.json lists (plain
    file names in folder: an index cannot make us read elsewhere)."""
    from safetensors.torch import load_file
    index = os.path.join(folder, "model.safetensors.index.json")
    if not os.path.exists(index):
        return load_file(file_in(folder, "model.safetensors", folder))
    with open(index) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
    return {name: t for shard in shards for name, t in load_file(file_in(folder, shard, index)).items()}

def load_hf_folder(folder, tokenizer_name=""):
    """The same four from a Llama folder in Hugging Face's format (config.json + safetensors, sharded
    or not). The tokenizer: tiktoken's tokenizer_name if given, else our spec that export.py stores in
    config.json, else the folder's tokenizer.json (a byte-level BPE; tokenizer_from_hf)."""
    if importlib.util.find_spec("safetensors") is None:  # optional: only the Hugging Face format needs it
        die("reading a Hugging Face folder needs safetensors: pip install safetensors")
    try:
        with open(os.path.join(folder, "config.json")) as f:
            hf_config = json.load(f)
        state, cfg = from_hf(load_hf_state(folder), hf_config)
        model = Transformer(cfg)
        model.load_state_dict(state)  # copies into the fp32 parameters, whatever the file's dtype
    except Exception as e:
        die(f"cannot load {folder} as a Llama (config.json + model.safetensors): {one_line(e)}")
    ours = hf_config.get("tiktoken_spec")  # a transformers re-save keeps it, but not the ranks file beside it
    if not (isinstance(ours, dict) and ("ranks_file" not in ours or
                                        os.path.isfile(os.path.join(folder, str(ours["ranks_file"]))))):
        ours = None
    if tokenizer_name:
        spec = {"kind": "tiktoken", "name": tokenizer_name}
    elif ours:
        spec = ours
    elif os.path.exists(os.path.join(folder, "tokenizer.json")):
        spec = tokenizer_from_hf(folder)
    else:
        die(f"{folder} has no tokenizer (tokenizer.json, or the tiktoken_spec export.py writes); name one, "
            "e.g. --tokenizer r50k_base")
    try:  # the ranks inline: the spec then works from any working directory, as checkpoints carry it
        spec = with_ranks(spec, folder)
        enc = load_tokenizer(spec)
    except Exception as e:
        die(f"cannot build the tokenizer of {folder} from {json.dumps(spec)[:80]}: {one_line(e)}")
    eot_id = hf_config.get("eos_token_id") if ours and not tokenizer_name else enc.eot_token
    if enc.n_vocab > cfg.vocab_size or not isinstance(eot_id, int) or not 0 <= eot_id < enc.n_vocab:
        die(f"{folder}: the tokenizer has {enc.n_vocab} ids and end-of-text {eot_id}, the model "
            f"vocab_size={cfg.vocab_size}; wrong tokenizer?")
    return model, enc, eot_id, spec
