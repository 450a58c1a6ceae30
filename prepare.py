"""
Stub for the sample branch: only load_tokenizer, to the contract of the real prepare.py,
which replaces this file at merge time.

    from prepare import load_tokenizer
    enc = load_tokenizer({"kind": "tiktoken", "name": "r50k_base"})
"""
import base64
import os

import tiktoken


def load_tokenizer(spec, folder=None):
    """tiktoken.Encoding from a tokenizer spec: {"kind": "tiktoken", "name": ...} or {"kind": "bpe",
    "name", "pat_str", "special_tokens", and "ranks" (the text of a ranks file) or "ranks_file"
    (a path relative to folder)}. A ranks file has one "base64(token bytes) rank" per line."""
    if spec["kind"] == "tiktoken":
        return tiktoken.get_encoding(spec["name"])
    if spec["kind"] != "bpe":
        raise ValueError(f"tokenizer kind {spec['kind']!r} is not 'tiktoken' or 'bpe'")
    if "ranks" in spec:
        text = spec["ranks"]
    else:
        with open(os.path.join(folder or ".", spec["ranks_file"]), encoding="ascii") as f:
            text = f.read()
    ranks = {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in text.splitlines() if line)}
    return tiktoken.Encoding(spec["name"], pat_str=spec["pat_str"], mergeable_ranks=ranks,
                             special_tokens=spec["special_tokens"])
