"""
The chat format, in one place: conversations -> token ids and a loss mask. prepare.py --chat renders
training data with it, sample.py --chat renders prompts with it, and export.py writes it as the jinja
template that transformers' apply_chat_template renders to the same ids.

The layout is ChatML's (used by Qwen and by many fine-tuning sets), after the end-of-text token that
starts every document here:

    <|endoftext|><|im_start|>system\\nYou answer briefly.<|im_end|>\\n<|im_start|>user\\nHi!<|im_end|>\\n
    <|im_start|>assistant\\nHello.<|im_end|>\\n

<|im_start|> and <|im_end|> are two new special tokens, the next ids after the tokenizer's own; the
roles are plain text. The loss mask is 1 on the tokens the model must learn to write: an assistant's
content and its <|im_end|>, which is how a reply ends.
"""
from common import die

TURN_START, TURN_END = "<|im_start|>", "<|im_end|>"
ROLES = ("system", "user", "assistant")

# The same layout for transformers. The text between special tokens is tokenized in one piece on both
# sides (render() below encodes "role\ncontent" and "\n" separately for that reason).
MESSAGES_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
# transformers renders the end-of-text that starts every conversation from the template (our
# end-of-text is its bos_token). llama.cpp adds it as the GGUF's BOS token instead (add_bos = true),
# on its built-in ChatML path and on the --jinja path alike, so its template leaves it out.
JINJA_TEMPLATE = "{{ bos_token }}" + MESSAGES_TEMPLATE

def chat_tokens(n_vocab):
    """{marker: id} of the two chat tokens for a tokenizer of n_vocab ids: the next two ids."""
    return {TURN_START: n_vocab, TURN_END: n_vocab + 1}

def is_chat(enc):
    return TURN_START in enc.special_tokens_set and TURN_END in enc.special_tokens_set

def conversation(row, where):
    """The messages of one dataset row: {"messages": [{"role", "content"}, ...]} (Hugging Face and
    OpenAI style) or {"instruction", "input", "output"} (Alpaca style). Checked: known roles, text
    content that is not empty, at least one assistant turn to learn from."""
    if isinstance(row.get("messages"), list):
        messages = row["messages"]
    elif isinstance(row.get("instruction"), str) and isinstance(row.get("output"), str):
        if row.get("input") is not None and not isinstance(row["input"], str):
            die(f"{where}: \"input\" is {row['input']!r} ({type(row['input']).__name__}), not text; "
                "write it as a string")
        question = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": row["output"]}]
    else:
        die(f"{where}: no conversation; a row needs \"messages\": [{{\"role\", \"content\"}}, ...] or "
            f"\"instruction\" and \"output\" (it has {', '.join(map(repr, row)) or 'nothing'})")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            role = m.get("role") if isinstance(m, dict) else m
            die(f"{where}: message {i} has role {role!r}; use one of {', '.join(ROLES)}")
        if not isinstance(m.get("content"), str) or not m["content"].strip():
            die(f"{where}: message {i} ({m['role']}) has no text content")
    if not any(m["role"] == "assistant" for m in messages):
        die(f"{where}: the conversation has no assistant turn, so nothing to learn from it")
    return [{"role": m["role"], "content": m["content"]} for m in messages]

def render(enc, messages, reply=False):
    """(ids, mask) of a conversation, starting with end-of-text; with reply, ending with the header
    of the assistant's next turn. User text is encoded as ordinary text, so a literal "<|im_end|>"
    in it stays those characters and never becomes the special token."""
    start, end = enc.encode_single_token(TURN_START), enc.encode_single_token(TURN_END)
    newline = enc.encode_ordinary("\n")
    ids, mask = [enc.eot_token], [0]
    for m in messages:
        header = m["role"] + "\n"
        tokens = enc.encode_ordinary(header + m["content"])
        learn = m["role"] == "assistant"
        # A token that ends past the header holds content (the newline may merge into the first one)
        ends, at = [], 0
        for t in tokens:
            at += len(enc.decode_single_token_bytes(t))
            ends.append(at)
        ids += [start, *tokens, end, *newline]
        mask += [0, *(int(learn and e > len(header)) for e in ends), int(learn), *[0] * len(newline)]
    if reply:
        ids += [start, *enc.encode_ordinary("assistant\n")]
        mask += [0] * (len(ids) - len(mask))
    return ids, mask
