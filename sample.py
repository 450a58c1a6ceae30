"""
Generate text with a trained model, token by token as it comes.

    python sample.py                                    # out/shakespeare/best.pt; a new document
    python sample.py --prompt "ROMEO:"
    python sample.py --prompt "To be" --temperature 0 --max-new-tokens 100         # greedy
    python sample.py --prompt-file prompt.txt --num-samples 8 --top-p 0.9 --seed 1   # 8 decoded together
    python sample.py --prompt "ROMEO:" --max-new-tokens 2000 --compile              # a compiled decode step
    python sample.py --interactive                      # type prompts (or pipe them, one per line)
    python sample.py --hf-dir hf/shakespeare --prompt "ROMEO:"     # a folder written by export.py
    python sample.py --ckpt out/shakespeare_chat/best.pt --chat    # a conversation with a chat model

A checkpoint holds all that sampling needs (config, weights, tokenizer). Generation stops at
<|endoftext|>; a prompt longer than the context keeps its last tokens, and generation can run past
the context (the KV cache restarts from the recent half of the text). The speed goes to stderr at
the end: prompt tokens, prefill time, decoding tokens/s.
"""
import codecs
import itertools
import sys
import time
from dataclasses import dataclass

import torch

import chat
import decode
from checkpoint import load_for_inference
from common import (autocast, check, die, one_line, parse_config, parse_flags, pick_device, pick_dtype, printable,
                    run_main, setting)
from hf import load_hf_folder

@dataclass
class SampleConfig:
    ckpt: str = setting("out/shakespeare/best.pt", "a checkpoint written by train.py")
    hf_dir: str = setting("", "instead of --ckpt: a Llama folder (config.json + model.safetensors)")
    tokenizer: str = setting("", "tiktoken encoding for an --hf-dir folder without our spec, e.g. r50k_base")
    prompt: str | None = setting(None, "text to continue; none: start from end-of-text, a new document")
    prompt_file: str = setting("", "read the prompt from this file instead")
    interactive: bool = setting(False, "read prompts from the terminal (or stdin, one a line) until the end")
    chat: bool = setting(False, "hold a conversation with a chat model (trained on prepare.py --chat data): "
                         "each line typed (or read from stdin) is a turn")
    system: str = setting("", "--chat: a system message to start the conversation with")
    num_samples: int = setting(1, "completions per prompt")
    max_new_tokens: int = setting(200, "tokens per completion (fewer if end-of-text comes first)")
    temperature: float = setting(0.8, "softmax temperature; 0 = greedy")
    top_k: int | None = setting(None, "sample among the k most likely tokens only")
    top_p: float = setting(0.95, "sample among the most likely tokens whose probability reaches p; 1 = off")
    seed: int = setting(1337, "seed of the sampling generator: the same seed gives the same text")
    device: str = setting("auto", "auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps")
    dtype: str = setting("auto", "autocast dtype: auto, float32, bfloat16 or float16; weights stay fp32 "
                         "(with --compile on a CPU, the step reads a copy of them in this dtype)")
    compile: bool = setting(False, "decode with a compiled one-token step over a static KV cache "
                            "(decode.py): ~10-45 s to compile on a CPU, then 2-5x eager's speed")

    def __post_init__(self):
        check(not (self.tokenizer and not self.hf_dir),
              "--tokenizer is for --hf-dir folders; a checkpoint names its own")
        check(not (self.prompt is not None and self.prompt_file), "give --prompt or --prompt-file, not both")
        check(not ((self.interactive or self.chat) and (self.prompt is not None or self.prompt_file)),
              "--interactive and --chat read what you type; drop --prompt and --prompt-file")
        check(not (self.system and not self.chat), "--system is for --chat")
        check(self.temperature >= 0, f"--temperature={self.temperature} must be >= 0 (0 = greedy)")
        check(self.top_k is None or self.top_k >= 1,
              f"--top-k={self.top_k} must be >= 1 (leave it out for all tokens)")
        check(0 < self.top_p <= 1, f"--top-p={self.top_p} must be in (0, 1] (1 = off)")
        check(self.num_samples >= 1, f"--num-samples={self.num_samples} must be >= 1")
        check(self.max_new_tokens >= 1, f"--max-new-tokens={self.max_new_tokens} must be >= 1")
        check(self.dtype in ("auto", "float32", "bfloat16", "float16"),
              f"--dtype={self.dtype} must be auto, float32, bfloat16 or float16")
        check(self.seed >= 0, f"--seed={self.seed} must not be negative")

def read_prompt(cfg):
    """The prompt text; "" means: start a new document."""
    prompt = cfg.prompt
    if cfg.prompt_file:
        try:
            with open(cfg.prompt_file, encoding="utf-8") as f:
                prompt = f.read()
        except (OSError, UnicodeDecodeError) as e:
            die(f"cannot read --prompt-file: {one_line(e)}")
    if prompt == "":
        die("the prompt is empty; give text to continue, or leave --prompt out to start a new document")
    return prompt or ""

def typed_prompts(what="a prompt"):
    """Prompts typed at the terminal after "> " (or lines of stdin when it is not one)."""
    if not sys.stdin.isatty():
        yield from (line.rstrip("\n") for line in sys.stdin if line.strip())
        return
    print(f"Type {what} and press Enter; Ctrl-D quits.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            return
        if line:
            yield line

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

class Speed:
    """How fast a run decodes, for one line on stderr at its end (so piped text stays clean): the wait
    for a sample's first token is its prefill, the rest is decoding; the first compiled step compiles
    and is counted apart."""
    def __init__(self):
        self.prompt = self.new = self.prefill = self.decode = self.compile = 0

    def timed(self, steps, prompt_tokens, compiled):
        """steps (next ids (B, 1), one step at a time), timed as they come."""
        t, self.prompt, first = time.perf_counter(), self.prompt + prompt_tokens, True
        for ids in steps:
            now = time.perf_counter()
            if first:
                self.prefill += now - t
            elif compiled and not self.compile:
                self.compile = now - t
            else:
                self.decode, self.new = self.decode + now - t, self.new + ids.size(0)
            first = False
            yield ids
            t = time.perf_counter()

    def line(self):
        rate = f"{self.new / self.decode:,.0f} tokens/s" if self.decode else "-"
        return (f"speed: {self.prompt:,} prompt tokens, prefill {self.prefill * 1000:,.0f} ms; decoding {rate} "
                f"over {self.new:,} tokens" + (f"; compiling took {self.compile:.1f} s" if self.compile else ""))

def complete(model, enc, eot_id, prompt, cfg, generator, speed, step):
    """Print cfg.num_samples continuations of prompt (or of end-of-text if it is ""): one sample token
    by token as it comes; several decoded together, a row each, printed when all have ended."""
    ids, S = enc.encode(prompt, allowed_special="all") if prompt else [eot_id], model.config.max_seq_len
    if len(ids) > S:
        # Keep the last S tokens, not S - 1: the first new token is sampled from the prefill's last
        # position, and only the step after needs position S, where the cache restarts from the
        # recent half of the text, as in any generation that runs past the context.
        print(f"warning: the prompt has {len(ids)} tokens > max_seq_len={S}; keeping the last {S}",
              file=sys.stderr)
        ids = ids[-S:]
    n = cfg.num_samples
    idx = torch.tensor([ids] * n, device=generator.device)                               # (n, T)
    steps = model.generate_stream(idx, cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                                  top_p=cfg.top_p, eos_id=eot_id, generator=generator, vocab_size=enc.n_vocab,
                                  step=step)
    steps = speed.timed(steps, len(ids) * n, step is not None)
    if n == 1:
        print(printable(prompt), end="", flush=True)
        new_ids = itertools.takewhile(lambda t: t != eot_id, (int(t) for t in steps))  # eot ends a sample
        for piece in decode_stream(enc, new_ids):
            print(printable(piece), end="", flush=True)
        print("\n" + "-" * 40, flush=True)
        return
    for row in torch.cat(list(steps), dim=1).tolist():                                   # (n, new)
        text = "".join(decode_stream(enc, itertools.takewhile(lambda t: t != eot_id, row)))
        print(printable(prompt + text) + "\n" + "-" * 40, flush=True)

def converse(model, enc, cfg, generator, speed, step):
    """--chat: a reply to each turn typed, streamed until the model ends its turn. The whole
    conversation is the prompt each time; when it and a reply would not fit in the context, the
    oldest turns go (the system message stays)."""
    messages = [{"role": "system", "content": cfg.system}] if cfg.system else []
    stop = {enc.encode_single_token(chat.TURN_END), enc.eot_token}
    S = model.config.max_seq_len
    for text in typed_prompts("a message"):
        if not sys.stdin.isatty():  # a transcript: show what was said
            print(f"> {printable(text)}")
        messages.append({"role": "user", "content": text})
        ids, _ = chat.render(enc, messages, reply=True)
        while len(ids) > S - min(cfg.max_new_tokens, S // 2) and len(messages) > 1 + bool(cfg.system):
            del messages[bool(cfg.system)]
            ids, _ = chat.render(enc, messages, reply=True)
        idx = torch.tensor([ids[-S:]], device=generator.device)                         # (1, T)
        steps = model.generate_stream(idx, cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                                      top_p=cfg.top_p, generator=generator, vocab_size=enc.n_vocab, step=step)
        steps, reply = speed.timed(steps, idx.size(1), step is not None), []
        for piece in decode_stream(enc, itertools.takewhile(lambda t: t not in stop, (int(t) for t in steps))):
            print(printable(piece), end="", flush=True)
            reply.append(piece)
        print(flush=True)
        messages.append({"role": "assistant", "content": "".join(reply)})

def decode_dtype(model, name, device):
    """The autocast dtype to decode in. auto: common.pick_dtype's, except that on a CPU a model
    narrower than 256 decodes in fp32: one token at a time, casting its weights to bf16 costs more
    than it saves (0.57x fp32's speed at the demo's d128, 1.1x at d256, 1.6x at d512, measured on a
    2-core EPYC with AVX512-BF16). Chosen by the model's width, never by a timing, so the same
    command gives the same tokens on every run."""
    dtype = pick_dtype(name, device)
    if name == "auto" and device.type == "cpu" and model.config.n_embd < 256:
        return torch.float32
    return dtype

def main(argv):
    given = parse_flags(argv, [SampleConfig], __doc__)
    cfg = parse_config(SampleConfig, given)
    if cfg.hf_dir and "ckpt" in given:
        die("give --ckpt PATH or --hf-dir DIR, not both")
    prompt = None if cfg.interactive or cfg.chat else read_prompt(cfg)
    device = pick_device(cfg.device)
    if cfg.hf_dir:
        model, enc, eot_id, _ = load_hf_folder(cfg.hf_dir, cfg.tokenizer)
    else:
        model, enc, eot_id, _ = load_for_inference(cfg.ckpt)
    if cfg.chat and not chat.is_chat(enc):
        die(f"{cfg.hf_dir or cfg.ckpt} is not a chat model (its tokenizer has no {chat.TURN_START}); fine-tune "
            "it on prepare.py --chat data first (README: Fine-tune into a chat model)")
    model.to(device).eval()
    generator = torch.Generator(device).manual_seed(cfg.seed)  # our own: no other code draws from it
    speed, dtype = Speed(), decode_dtype(model, cfg.dtype, device)
    # compiled on a CPU, the weights are read in the decoding dtype: a bf16 copy halves the bytes
    step = decode.compiled_step(model, dtype) if cfg.compile else None
    with autocast(device, dtype):
        if cfg.chat:
            converse(model, enc, cfg, generator, speed, step)
        for text in [] if cfg.chat else typed_prompts() if cfg.interactive else [prompt]:
            complete(model, enc, eot_id, text, cfg, generator, speed, step)
    print(speed.line(), file=sys.stderr)

if __name__ == "__main__":
    run_main(main)
