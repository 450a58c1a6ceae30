"""
The chat format, in one place: conversations -> token ids and a loss mask. prepare.py --chat renders
training data with it, sample.py --chat renders prompts with it, and export.py writes it as the jinja
template that transformers' apply_chat_template renders to the same ids.

Preference pairs (prepare.py --preferences, for DPO) are two such conversations that differ in
their last reply; their masks cover that reply only.

The layout is ChatML's (used by Qwen and by many fine-tuning sets), after the end-of-text token that
starts every document here:

    <|endoftext|><|im_start|>system\\nYou answer briefly.<|im_end|>\\n<|im_start|>user\\nHi!<|im_end|>\\n
    <|im_start|>assistant\\nHello.<|im_end|>\\n

<|im_start|> and <|im_end|> are two new special tokens, the next ids after the tokenizer's own; the
roles are plain text. The loss mask is 1 on the tokens the model must learn to write: an assistant's
content and its <|im_end|>, which is how a reply ends.
"""
import re

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

def preference(row, where):
    """The two conversations of a preference row, the same up to their last turn, the assistant's:
    (chosen, rejected). Rows as the public sets write them: {"chosen", "rejected"} as whole
    "\\n\\nHuman: ... \\n\\nAssistant: ..." transcripts (Anthropic HH), as message lists that hold the
    prompt too (UltraFeedback binarized), or as replies to a "prompt" (text) or "messages" (a list)."""
    chosen, rejected = row.get("chosen"), row.get("rejected")
    if isinstance(chosen, list) and isinstance(rejected, list):
        pair = chosen, rejected
    elif isinstance(chosen, str) and isinstance(rejected, str) and ("prompt" in row or "messages" in row):
        context = row.get("messages")
        if not isinstance(context, list):
            context = [{"role": "user", "content": row.get("prompt")}]
        pair = [context + [{"role": "assistant", "content": reply}] for reply in (chosen, rejected)]
    elif isinstance(chosen, str) and isinstance(rejected, str):
        pair = transcript(chosen), transcript(rejected)
    else:
        die(f"{where}: no preference pair; a row needs \"chosen\" and \"rejected\" (texts with a \"prompt\" or "
            f"\"messages\", whole transcripts, or message lists); it has {', '.join(map(repr, row)) or 'nothing'}")
    chosen, rejected = (conversation({"messages": messages}, where) for messages in pair)
    if chosen[:-1] != rejected[:-1] or chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
        die(f"{where}: chosen and rejected must be one conversation that ends in two different assistant replies")
    return chosen, rejected

def transcript(text):
    """Messages of an Anthropic HH transcript: turns after "\\n\\nHuman: " and "\\n\\nAssistant: "."""
    parts = re.split(r"\n\n(Human|Assistant): ", "\n\n" + text.lstrip("\n"))
    return [{"role": "user" if speaker == "Human" else "assistant", "content": content.strip()}
            for speaker, content in zip(parts[1::2], parts[2::2])]

def render_reply(enc, messages):
    """(ids, mask) of a conversation with the mask on its last reply only (and its <|im_end|>): what a
    preference compares. Each reply's mask is a run of ones that its turn's closing newline ends."""
    ids, mask = render(enc, messages)
    last = max(i for i, m in enumerate(mask) if m)
    first = last
    while first > 0 and mask[first - 1]:
        first -= 1
    return ids, [0] * first + mask[first:]
