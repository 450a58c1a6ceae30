"""
HellaSwag (Zellers et al. 2019): for a short scene, pick the right ending of four by which one the
model finds most likely. train.py runs it with --hellaswag-every=N and --eval-only.

Data: hellaswag_val.jsonl from the authors' repository, 10,042 items, one JSON object per line
with "ctx" (the scene so far), "endings" (4 strings) and "label" (0-3, the right one); lm-eval's
style also reads "activity_label", "ctx_a" and "ctx_b". It is downloaded once to
data/hellaswag_val.jsonl.

Scoring: each ending follows the context after a space; its score is the log-likelihood of its
tokens. Three picks, as published tables use them: acc, the highest sum; acc_norm_tokens, the
highest mean per token (build-nanogpt's acc_norm); acc_norm_chars, the highest sum per character
of the ending (lm-eval's acc_norm). style="lm-eval" also prepares the text as lm-eval's hellaswag
task does (activity label first, "[title]" and other bracketed tags removed), so acc and
acc_norm_chars compare with its tables. Ties go to the first ending. What to expect
(acc_norm_tokens): random 25 %, GPT-2 124M about 29.5 %, LF_LLM-269M 35.6 % after 10B tokens.
"""
import json
import math
import os
import re

import torch
import torch.distributed as dist

from common import die, download

URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
DEFAULT_PATH = os.path.join("data", "hellaswag_val.jsonl")

def get_items(path="", limit=0, rank=0, world=1, style="nanogpt"):
    """The items to score, in the style's text: from path, or (empty path) downloaded once by rank 0
    while the others wait."""
    if not path:
        path = DEFAULT_PATH
        if rank == 0:
            download(URL, path, "pass a local copy with --hellaswag-path=FILE")
        if world > 1:
            dist.barrier()
    return [styled(item, style) for item in load_items(path, limit)]

def load_items(path, limit=0):
    """The items of a hellaswag .jsonl file (the first `limit` if > 0), each checked."""
    if not os.path.isfile(path):
        die(f"no HellaSwag file {path}; fix --hellaswag-path")
    items = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                ok = (isinstance(item, dict) and isinstance(item.get("ctx"), str) and
                      isinstance(item.get("endings"), list) and len(item["endings"]) == 4 and
                      all(isinstance(e, str) for e in item["endings"]) and
                      int(item.get("label", -1)) in range(4))
            except (ValueError, TypeError):
                ok = False
            if not ok:
                die(f"{path} line {n} is not a HellaSwag item (ctx, 4 endings, label 0-3); use the official "
                    "hellaswag_val.jsonl")
            items.append(item)
            if len(items) == limit:
                break
    if not items:
        die(f"{path} holds no items; use the official hellaswag_val.jsonl")
    return items

def lm_eval_text(text):
    """lm-eval's hellaswag preprocessing of one string (WikiHow's "[title]" becomes a sentence end,
    other bracketed tags go)."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")

def styled(item, style):
    """The item with its context and endings as the style scores them."""
    if style == "lm-eval" and all(isinstance(item.get(k), str) for k in ("activity_label", "ctx_a", "ctx_b")):
        ctx = item["activity_label"] + ": " + item["ctx_a"] + " " + item["ctx_b"].capitalize()
        return {**item, "ctx": lm_eval_text(ctx), "endings": [lm_eval_text(e) for e in item["endings"]]}
    return item

@torch.no_grad()
def score(model, enc, items, device, autocast, max_len, items_per_batch=8):
    """Log-likelihood of each item's 4 endings given its context -> (sum, mean per token, sum per
    character), each (n_items, 4) in float64. A row too long for the model loses context tokens
    from the left."""
    sums, means, per_char = [], [], []
    for start in range(0, len(items), items_per_batch):
        rows, spans, chars = [], [], []  # token rows, where each row's ending is, its characters
        for item in items[start:start + items_per_batch]:
            ctx = enc.encode_ordinary(item["ctx"])
            chars += [max(1, len(e)) for e in item["endings"]]
            for ending in item["endings"]:
                end = enc.encode_ordinary(" " + ending)
                row = (ctx + end)[-(max_len + 1):]
                rows.append(row)
                spans.append((max(1, len(row) - len(end)), len(row)))
        tokens = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)  # (R, L)
        targets = torch.full_like(tokens, -1)  # -1: not scored
        for r, (row, (a, b)) in enumerate(zip(rows, spans)):
            tokens[r, :len(row)] = torch.tensor(row)
            targets[r, a:b] = tokens[r, a:b]  # the ending's tokens only
        tokens, targets = tokens.to(device), targets.to(device)
        with autocast:
            _, losses = model(tokens[:, :-1], targets[:, 1:], reduction="none")        # (R, L-1)
        # Sum in float64: then equal per-token scores give exactly equal totals, and ties are ties.
        logp = -losses.double()
        n = (targets[:, 1:] >= 0).sum(dim=1)                                            # (R,)
        total = logp.sum(dim=1)
        sums.append(total.view(-1, 4).cpu())
        means.append((total / n).view(-1, 4).cpu())
        per_char.append((total.cpu() / torch.tensor(chars, dtype=torch.float64)).view(-1, 4))
    return torch.cat(sums), torch.cat(means), torch.cat(per_char)

def evaluate(model, enc, items, device, autocast, max_len, rank=0, world=1):
    """acc, acc_norm_tokens and acc_norm_chars over items, each rank scoring every world-th item,
    counts summed across ranks."""
    mine = items[rank::world]
    # Every rank scores as many items (a short one repeats item 0, not counted): under FSDP each
    # forward gathers weights from all ranks, so all must run the same number of them.
    padded = mine + items[:math.ceil(len(items) / world) - len(mine)]
    was_training = model.training
    model.eval()
    counts = torch.zeros(4, device=device)  # (right by each of the three picks, items)
    if padded:
        labels = torch.tensor([int(item["label"]) for item in mine], dtype=torch.long)
        scores = [s[:len(mine)] for s in score(model, enc, padded, device, autocast, max_len)]
        counts += torch.tensor([(s.argmax(1) == labels).sum().item() for s in scores] + [len(mine)], device=device)
    if world > 1:
        dist.all_reduce(counts)
    model.train(was_training)
    right, right_tokens, right_chars, n = counts.tolist()
    return {"hellaswag_acc": right / n, "hellaswag_acc_norm_tokens": right_tokens / n,
            "hellaswag_acc_norm_chars": right_chars / n, "hellaswag_items": int(n)}
