"""
Our tokenizers: a spec (what meta.json and checkpoints store) -> a tiktoken Encoding, a fingerprint
of what decides the ids, and the byte-level BPE trainer that prepare.py --vocab-size runs.

    enc = load_tokenizer({"kind": "tiktoken", "name": "r50k_base"})      # GPT-2's, by name
    enc = load_tokenizer(meta["tokenizer"], folder)                     # a BPE prepare.py trained
    tokens = train_bpe(texts, vocab_size=4096)                          # bytes of each token, by rank

A spec is {"kind": "tiktoken", "name"} (plus "special_tokens" to add, if any), or {"kind": "bpe",
"name", "pat_str", "special_tokens"} with the ranks file's text in "ranks" (as checkpoints carry it)
or its file name in "ranks_file" (beside meta.json, as data folders keep it).
"""
import base64
import collections
import hashlib
import heapq
import json
import time

import tiktoken

from common import end_progress, file_in, progress

# GPT-2's pre-tokenizer: contractions, letter runs, digit runs and punctuation runs (each taking one
# leading space), then whitespace. BPE never merges across these pieces. prepare.py's BPE uses it, and
# llama.cpp knows it as the "gpt-2" pre-tokenizer.
GPT2_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

def load_tokenizer(spec, folder=None):
    """The tiktoken.Encoding of a tokenizer spec; a "ranks_file" is read from folder."""
    if spec["kind"] == "tiktoken":  # a named encoding, with the special tokens added by chat.py if any
        enc = tiktoken.get_encoding(spec["name"])
        extra = spec.get("special_tokens", {})
        if extra.items() <= enc._special_tokens.items():
            return enc
        return tiktoken.Encoding(spec["name"] + "-chat", pat_str=enc._pat_str,
                                 mergeable_ranks=enc._mergeable_ranks, special_tokens={**enc._special_tokens, **extra})
    text = spec["ranks"] if "ranks" in spec else with_ranks(spec, folder)["ranks"]
    ranks = {base64.b64decode(token): int(rank)
             for token, rank in (line.split() for line in text.splitlines())}
    return tiktoken.Encoding(spec["name"], pat_str=spec["pat_str"], mergeable_ranks=ranks,
                             special_tokens=spec["special_tokens"])

def with_ranks(spec, folder):
    """spec with its ranks file's text inline (as checkpoints carry it): then it no longer depends on
    the folder, or on the working directory, wherever it goes. The file's name must be a plain one."""
    if "ranks_file" not in spec:
        return spec
    if folder is None:
        raise ValueError(f"the spec names the file {spec['ranks_file']!r} but not the folder it is in")
    with open(file_in(folder, spec["ranks_file"], "the tokenizer spec"), encoding="utf-8") as f:
        return {**{k: v for k, v in spec.items() if k != "ranks_file"}, "ranks": f.read()}

def ranks_text(tokens):
    """tiktoken's ranks-file format: one "base64(token) rank" line per token, tokens in rank order."""
    return "".join(f"{base64.b64encode(token).decode()} {rank}\n" for rank, token in enumerate(tokens))

def tokenizer_fingerprint(enc):
    """A short hash of what decides the ids (ranks, split pattern, special tokens), not of names:
    two tokenizers with the same fingerprint turn every text into the same ids."""
    h = hashlib.sha256(enc._pat_str.encode())
    for token, rank in sorted(enc._mergeable_ranks.items(), key=lambda kv: kv[1]):
        h.update(b"%d %s\n" % (rank, base64.b64encode(token)))
    h.update(json.dumps(sorted(enc._special_tokens.items())).encode())
    return h.hexdigest()[:16]

# --- BPE trainer ----------------------------------------------------------------------------------
# A pre-token longer than this many bytes is cut into pieces of this size for counting: a merge scans each
# word that holds its pair, so one huge word (text without whitespace: a long run of letters or digits)
# would be scanned whole at almost every merge. Real words are far shorter; only pairs across the cuts of
# such absurdly long pieces go uncounted.
MAX_WORD_BYTES = 256

def train_bpe(texts, vocab_size: int) -> list[bytes]:
    """Byte-level BPE: the bytes of each token in rank order, 256 single bytes then one token per merge.
    Each step merges the most frequent adjacent pair of tokens within GPT-2 pre-tokens (a tie goes to the
    smallest (left id, right id): the older tokens). Pairs are counted once over the distinct pre-tokens;
    a merge then moves only the counts at and beside it, and a heap of (-count, pair) gives the next one
    (outdated entries are skipped as they surface)."""
    import regex  # a dependency of tiktoken; Python's re has no \p{L}
    word_counts = collections.Counter()
    for piece, count in collections.Counter(p for text in texts for p in regex.findall(GPT2_PAT, text)).items():
        b = piece.encode("utf-8")
        for i in range(0, len(b), MAX_WORD_BYTES):
            word_counts[b[i:i + MAX_WORD_BYTES]] += count
    words, freqs = [list(word) for word in word_counts], list(word_counts.values())
    pair_counts, where = collections.Counter(), collections.defaultdict(set)  # where: pair -> words holding it
    for i, (word, freq) in enumerate(zip(words, freqs)):
        for pair in zip(word, word[1:]):
            pair_counts[pair] += freq
            where[pair].add(i)
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)
    tokens = [bytes([b]) for b in range(256)]
    t0 = shown = time.time()  # shown: when the progress line was last printed
    while len(tokens) < vocab_size and heap:
        neg_count, pair = heapq.heappop(heap)
        if pair_counts.get(pair) != -neg_count:
            continue  # outdated entry: the pair's count changed and was pushed again
        (a, b), new, changed = pair, len(tokens), set()
        tokens.append(tokens[a] + tokens[b])
        for i in where.pop(pair):  # (a word that no longer holds the pair stays as it is: harmless)
            out, freq = [], freqs[i]
            for t in words[i]:  # merge left to right, as tiktoken applies the merges
                if t == b and out and out[-1] == a:  # (x, a, b) -> (x, new)
                    moves = [((a, b), -1)] + ([((out[-2], a), -1), ((out[-2], new), 1)] if len(out) > 1 else [])
                    out[-1] = new
                elif out and out[-1] == new:  # (new, t) was (b, t): new is in no word before this merge
                    moves = [((b, t), -1), ((new, t), 1)]
                    out.append(t)
                else:
                    out.append(t)
                    continue
                for p, sign in moves:
                    pair_counts[p] += sign * freq
                    changed.add(p)
                    if sign > 0:
                        where[p].add(i)
            words[i] = out
        for p in changed:
            if pair_counts[p] > 0:
                heapq.heappush(heap, (-pair_counts[p], p))
            else:
                del pair_counts[p]
        if time.time() - shown > 0.5:
            shown = time.time()
            progress(f"BPE: {new - 255:,} / {vocab_size - 256:,} merges | {shown - t0:.0f}s")
    end_progress()
    return tokens

