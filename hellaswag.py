"""
HellaSwag (Zellers et al. 2019): for a short scene, pick the right ending of four by which one the
model finds most likely. train.py runs it with --hellaswag-every=N and --eval-only.

Data: hellaswag_val.jsonl from the authors' repository, 10,042 items, one JSON object per line
with "ctx" (the scene so far), "endings" (4 strings) and "label" (0-3, the right one); the other
fields are not used. It is downloaded once to data/hellaswag_val.jsonl.

Scoring: each ending follows the context after a space; its score is the log-likelihood of its
tokens. acc picks the highest sum, acc_norm (the headline) the highest mean per token, as
build-nanogpt does; lm-eval divides by the ending's length in bytes instead, so its acc_norm is
not the same number. Ties go to the first ending. What to expect (acc_norm): random 25 %, GPT-2
124M about 29.5 %, LF_LLM-269M 35.6 % after 10B tokens.
"""
import json
import os

import torch
import torch.distributed as dist

from common import die, download

URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
DEFAULT_PATH = os.path.join("data", "hellaswag_val.jsonl")

def get_items(path="", limit=0, rank=0, world=1):
    """The items to score: from path, or (empty path) downloaded once by rank 0 while the others wait."""
    if not path:
        path = DEFAULT_PATH
        if rank == 0:
            download(URL, path, "pass a local copy with --hellaswag-path=FILE")
        if world > 1:
            dist.barrier()
    return load_items(path, limit)

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

@torch.no_grad()
def score(model, enc, items, device, autocast, max_len, items_per_batch=8):
    """Log-likelihood of each item's 4 endings given its context -> (sum, mean per token), each
    (n_items, 4) in float64. A row too long for the model loses context tokens from the left."""
    sums, means = [], []
    for start in range(0, len(items), items_per_batch):
        rows, spans = [], []  # token rows, and where each row's ending starts and ends
        for item in items[start:start + items_per_batch]:
            ctx = enc.encode_ordinary(item["ctx"])
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
    return torch.cat(sums), torch.cat(means)

def evaluate(model, enc, items, device, autocast, max_len, rank=0, world=1):
    """acc and acc_norm over items, each rank scoring every world-th item, counts summed across ranks."""
    mine = items[rank::world]
    was_training = model.training
    model.eval()
    counts = torch.zeros(3, device=device)  # (right by acc, right by acc_norm, items)
    if mine:
        sums, means = score(model, enc, mine, device, autocast, max_len)
        labels = torch.tensor([int(item["label"]) for item in mine])
        right, right_norm = (sums.argmax(1) == labels).sum().item(), (means.argmax(1) == labels).sum().item()
        counts += torch.tensor([right, right_norm, len(mine)], device=device)
    if world > 1:
        dist.all_reduce(counts)
    model.train(was_training)
    right, right_norm, n = counts.tolist()
    return {"hellaswag_acc": right / n, "hellaswag_acc_norm": right_norm / n, "hellaswag_items": int(n)}
