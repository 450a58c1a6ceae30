"""
Sample from a trained model, or export it as a Hugging Face Llama.

    python sample.py --ckpt out/shakespeare/best.pt --prompt "ROMEO:"
    python sample.py --ckpt out/shakespeare/best.pt --prompt-file prompt.txt --num-samples 3 --top-p 0.9
    python sample.py --ckpt out/shakespeare/best.pt --prompt "To be" --temperature 0   # greedy
    python sample.py --ckpt out/shakespeare/best.pt             # interactive: type prompts, Ctrl-D quits
    python sample.py --ckpt out/shakespeare/best.pt --export-hf hf/shakespeare
    python sample.py --hf-dir hf/shakespeare --prompt "ROMEO:"

A checkpoint holds all that sampling needs: config, weights, tokenizer spec (tiktoken name or inlined
BPE ranks). --export-hf writes config.json + model.safetensors (LlamaForCausalLM), tokenizer.json +
tokenizer_config.json (AutoTokenizer, the same ids as tiktoken), generation_config.json, and our spec
as config.json["tiktoken_spec"] (BPE ranks beside it, in tokenizer.tiktoken): that is where --hf-dir
looks. Other Llama folders need --tokenizer.
"""
import argparse
import codecs
import itertools
import json
import os
import sys
from dataclasses import dataclass, fields

import torch

from model import ModelConfig, Transformer, from_hf, to_hf
from prepare import arg, load_tokenizer, ranks_text
from train import die, load_checkpoint as read_checkpoint


@dataclass
class SampleConfig:
    ckpt: str = arg("", "checkpoint written by train.py, e.g. out/<run>/best.pt", metavar="PATH")
    hf_dir: str = arg("", "instead of --ckpt: a Llama folder (config.json + model.safetensors)", metavar="DIR")
    tokenizer: str = arg("", "tiktoken encoding for an --hf-dir folder without our spec, e.g. r50k_base", metavar="NAME")
    prompt: str | None = arg(None, "text to continue; with neither prompt option, ask in the terminal", type=str,
                                metavar="TEXT")
    prompt_file: str = arg("", "read the prompt from this file", metavar="PATH")
    num_samples: int = arg(1, "completions per prompt")
    max_new_tokens: int = arg(200, "tokens per completion (fewer if end-of-text comes first)")
    temperature: float = arg(0.8, "softmax temperature; 0 = greedy")
    top_k: int | None = arg(None, "sample among the k most likely tokens only", type=int)
    top_p: float = arg(0.95, "sample among the most likely tokens whose probability reaches p; 1 = off")
    seed: int = arg(1337, "seed of the sampling generator: the same seed gives the same text")
    device: str = arg("auto", "auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps")
    dtype: str = arg("float32", "autocast dtype; the weights stay fp32", choices=("float32", "bfloat16", "float16"))
    compile: bool = arg(False, "torch.compile the model (pays off for long generations on a GPU)")
    export_hf: str = arg("", "write the model as a Hugging Face Llama folder here, then exit", metavar="DIR")


def one_line(e):
    return " ".join(str(e).split())[:300] or type(e).__name__

class Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors (bad number, bad choice) in the same one-line form
        die(f"{message} (see python sample.py --help)")

def parse_args(argv=None):
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(SampleConfig):
        flag, kwargs = "--" + f.name.replace("_", "-"), dict(f.metadata)
        if f.default not in ("", None) and f.type is not bool:
            kwargs["help"] += " (default: %(default)s)"
        if f.type is bool:
            parser.add_argument(flag, action="store_true", **kwargs)
        else:
            parser.add_argument(flag, default=f.default, type=kwargs.pop("type", type(f.default)), **kwargs)
    cfg = SampleConfig(**vars(parser.parse_args(argv)))
    # Argument checking, all in one place, before anything slow happens. `not x >= 0` also catches NaN.
    for bad, message in [
        (bool(cfg.ckpt) == bool(cfg.hf_dir), "give exactly one of --ckpt PATH and --hf-dir DIR"),
        (cfg.tokenizer and not cfg.hf_dir, "--tokenizer is for --hf-dir folders; a checkpoint names its own"),
        (cfg.prompt is not None and cfg.prompt_file, "give --prompt or --prompt-file, not both"),
        (not cfg.temperature >= 0, f"--temperature={cfg.temperature} must be >= 0 (0 = greedy)"),
        (cfg.top_k is not None and cfg.top_k < 1, f"--top-k={cfg.top_k} must be >= 1 (leave it out for all tokens)"),
        (not 0 < cfg.top_p <= 1, f"--top-p={cfg.top_p} must be in (0, 1] (1 = off)"),
        (cfg.num_samples < 1, f"--num-samples={cfg.num_samples} must be >= 1"),
        (cfg.max_new_tokens < 1, f"--max-new-tokens={cfg.max_new_tokens} must be >= 1"),
    ]:
        if bad:
            die(message)
    return cfg


def read_prompt(cfg):
    """The prompt text, or None for prompts typed at the terminal."""
    prompt = cfg.prompt
    if cfg.prompt_file:
        try:
            with open(cfg.prompt_file, encoding="utf-8") as f:
                prompt = f.read()
        except (OSError, UnicodeDecodeError) as e:
            die(f"cannot read --prompt-file: {one_line(e)}")
    if prompt == "":
        die("the prompt is empty; give the text to continue with --prompt or --prompt-file")
    if prompt is None and not cfg.export_hf and not sys.stdin.isatty():
        die("no prompt: give --prompt TEXT or --prompt-file FILE (or run in a terminal to type prompts)")
    return prompt

def pick_device(name):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        device = torch.device(name)
        torch.empty(0, device=device)  # a device this machine lacks fails here
    except (RuntimeError, AssertionError):
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        die(f"--device {name} is unknown or not on this machine; use auto, cpu, cuda, cuda:N or mps")
    return device

def safetensors_torch():
    try:  # optional: only the Hugging Face format needs it
        import safetensors.torch
    except ImportError:
        die("the Hugging Face format needs safetensors: pip install safetensors")
    return safetensors.torch

# --- Loading -----------------------------------------------------------------

def build_tokenizer(spec, folder, vocab_size):
    try:
        enc = load_tokenizer(spec, folder)
    except Exception as e:  # a bad spec, a missing ranks file, tiktoken offline without its cache
        die(f"cannot build the tokenizer from spec {json.dumps(spec)[:100]}: {one_line(e)}")
    if enc.n_vocab > vocab_size:
        die(f"the tokenizer has {enc.n_vocab} ids but the model only vocab_size={vocab_size}; wrong tokenizer?")
    return enc

def load_checkpoint(path):
    """(model, tokenizer, spec, eot_id) from a train.py checkpoint; the model is fp32, on the CPU."""
    ckpt = read_checkpoint(path)  # checks the file, its version and its keys
    try:
        model = Transformer(ModelConfig(**ckpt["model_config"]))
        model.load_state_dict(ckpt["model"])
    except (TypeError, ValueError, RuntimeError) as e:
        die(f"{path} does not fit this model.py: {one_line(e)}")
    spec = ckpt["tokenizer"]
    return model, build_tokenizer(spec, None, model.config.vocab_size), spec, ckpt["eot_id"]

def load_hf_dir(folder, tokenizer_name):
    """(model, tokenizer, spec, eot_id) from a Llama folder in Hugging Face's format."""
    load_file = safetensors_torch().load_file
    try:
        with open(os.path.join(folder, "config.json")) as f:
            hf_config = json.load(f)
        state, cfg = from_hf(load_file(os.path.join(folder, "model.safetensors")), hf_config)
        model = Transformer(cfg)
        model.load_state_dict(state)  # copies into the fp32 parameters, whatever the file's dtype
    except Exception as e:
        die(f"cannot load {folder} as a Llama (config.json + model.safetensors): {one_line(e)}")
    if tokenizer_name:
        spec = {"kind": "tiktoken", "name": tokenizer_name}
    elif "tiktoken_spec" in hf_config:
        spec = hf_config["tiktoken_spec"]
    else:
        die(f"{folder}/config.json has no tiktoken_spec (only --export-hf writes one); "
             f"name the tokenizer, e.g. --tokenizer r50k_base")
    enc = build_tokenizer(spec, folder, cfg.vocab_size)
    eot_id = enc.eot_token if tokenizer_name else hf_config.get("eos_token_id")
    return model, enc, spec, eot_id

# --- Generation --------------------------------------------------------------

def decode_stream(enc, ids):
    """Text of a stream of token ids, in pieces of complete characters: a token can end inside a
    multi-byte UTF-8 character (r50k_base splits most emoji over 2-3 tokens), so its bytes wait for
    the next token. Invalid bytes become U+FFFD, as in enc.decode()."""
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for t in ids:
        try:
            data = enc.decode_single_token_bytes(t)
        except KeyError:  # an id the tokenizer lacks (a gap in its ranks, a padding id)
            data = b""
        yield utf8.decode(data)
    yield utf8.decode(b"", final=True)

def typed_prompts():
    print("Type a prompt and press Enter; Ctrl-D quits.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            return
        if line:
            yield line

def complete(model, enc, prompt, cfg, eot_id, generator):
    """Print cfg.num_samples continuations of prompt, token by token."""
    ids, S = enc.encode(prompt, allowed_special="all"), model.config.max_seq_len
    if len(ids) > S:
        # Keep the last S tokens, not S - 1: the first new token is sampled from the prefill's last
        # position, and only the step after needs position S, where the cache restarts from the
        # recent half of the text, as in any generation that runs past the context.
        print(f"warning: the prompt has {len(ids)} tokens > max_seq_len={S}; keeping the last {S}", file=sys.stderr)
        ids = ids[-S:]
    idx = torch.tensor([ids], device=generator.device)                                   # (1, T)
    for _ in range(cfg.num_samples):
        print(prompt, end="", flush=True)
        steps = model.generate_stream(idx, cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                                      top_p=cfg.top_p, generator=generator, vocab_size=enc.n_vocab)
        new_ids = itertools.takewhile(lambda t: t != eot_id, (int(t) for t in steps))  # eot ends a sample
        for piece in decode_stream(enc, new_ids):
            print(piece, end="", flush=True)
        print("\n" + "-" * 40, flush=True)

# --- Hugging Face export -----------------------------------------------------

def bytes_to_unicode():
    """GPT-2's byte -> character map behind byte-level BPE files: printable Latin-1 bytes stand for
    themselves, the others (space, control bytes) move to U+0100 onwards, so tokens are visible strings."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(moved)}}

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
    tok = Tokenizer(models.BPE({**{as_str(t): i for t, i in ranks.items()}, **specials}, merges, ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([  # tiktoken's split regex, then bytes -> characters
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    tok.save(os.path.join(folder, "tokenizer.json"))
    eot = enc.decode_single_token_bytes(eot_id).decode()
    # The plain fast tokenizer: LlamaTokenizerFast, chosen from config.json otherwise, prepends BOS.
    write_json(folder, "tokenizer_config.json", dict(tokenizer_class="PreTrainedTokenizerFast", bos_token=eot,
               eos_token=eot, model_max_length=max_seq_len, clean_up_tokenization_spaces=False))

def write_json(folder, name, obj):
    with open(os.path.join(folder, name), "w") as f:
        json.dump(obj, f, indent=2)

def export_hf(model, enc, spec, eot_id, folder):
    save_file = safetensors_torch().save_file
    try:
        state, config = to_hf(model.state_dict(), model.config)
    except ValueError as e:
        die(f"cannot export: {e}; Hugging Face Llama has no such variant")
    os.makedirs(folder, exist_ok=True)
    if spec["kind"] == "bpe":  # the ranks go beside config.json rather than inside it
        with open(os.path.join(folder, "tokenizer.tiktoken"), "w") as f:
            f.write(ranks_text(sorted(enc._mergeable_ranks, key=enc._mergeable_ranks.get)))
        spec = {**{k: v for k, v in spec.items() if k not in ("ranks", "ranks_file")}, "ranks_file": "tokenizer.tiktoken"}
    save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(folder, "model.safetensors"),
              metadata={"format": "pt"})
    # "torch_dtype" for transformers < 5, "dtype" for >= 5; tiktoken_spec is for --hf-dir.
    write_json(folder, "config.json", {**config, "bos_token_id": eot_id, "eos_token_id": eot_id,
                                       "torch_dtype": "float32", "dtype": "float32", "tiktoken_spec": spec})
    write_json(folder, "generation_config.json", {"bos_token_id": eot_id, "eos_token_id": eot_id})
    write_hf_tokenizer(enc, eot_id, model.config.max_seq_len, folder)
    print(f"wrote {', '.join(sorted(os.listdir(folder)))} to {folder}")

# -----------------------------------------------------------------------------

def main(argv=None):
    cfg = parse_args(argv)
    prompt = read_prompt(cfg)
    device = pick_device(cfg.device)
    model, enc, spec, eot_id = load_checkpoint(cfg.ckpt) if cfg.ckpt else load_hf_dir(cfg.hf_dir, cfg.tokenizer)
    if cfg.export_hf:
        return export_hf(model, enc, spec, eot_id, cfg.export_hf)
    model.to(device).eval()
    if cfg.compile:  # in place, so the forward calls inside model.generate_stream are the compiled ones
        model.compile()
    generator = torch.Generator(device).manual_seed(cfg.seed)  # our own: no other code draws from it
    autocast = torch.autocast(device.type, dtype=getattr(torch, cfg.dtype), enabled=cfg.dtype != "float32")
    with autocast:
        for text in [prompt] if prompt is not None else typed_prompts():
            complete(model, enc, text, cfg, eot_id, generator)

if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:  # the reader left early (python sample.py ... | head): stop without a traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the flush at exit cannot fail again
        sys.exit(1)
