"""
Direct Preference Optimization (Rafailov et al. 2023, "Direct Preference Optimization: Your Language
Model is Secretly a Reward Model"): after supervised fine-tuning, teach the model to prefer one reply
over another, with no reward model and no sampling. train.py --objective=dpo uses this file: the
preference pairs prepare.py --preferences wrote, and the loss

    -log sigmoid(beta * [(log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))])

where y_w is the chosen reply, y_l the rejected one, log pi(y|x) the summed log-probabilities of the
reply's tokens (its <|im_end|> included) under the model being trained, and ref the model DPO started
from, frozen. beta * (log pi - log ref) is the reply's implicit reward: the loss pushes the chosen
reply's above the rejected one's, and beta sets how far the model may move from where it started.

The reference is a frozen copy of the starting checkpoint (--init-from), run beside the model on
every batch, rather than its log-probabilities computed once ahead: one more forward pass a step
(no backward), but nothing to store, and resuming, any number of processes and any data order need
nothing else. A resumed run rebuilds it from the same checkpoint.

    python prepare.py --preset shakespeare_dpo --input ../shared/data/tinyshakespeare.txt
    python train.py --preset shakespeare_dpo            # from out/shakespeare_chat/best.pt
"""
import math

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from common import die
from data import EpochOrder, to_device

def dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta):
    """(mean loss, chosen rewards, rejected rewards) of pairs of summed reply log-probabilities (N,)."""
    chosen_rewards = beta * (chosen - ref_chosen)                                  # (N,)
    rejected_rewards = beta * (rejected - ref_rejected)                            # (N,)
    return -F.logsigmoid(chosen_rewards - rejected_rewards).mean(), chosen_rewards, rejected_rewards

def won(chosen, rejected):
    """1 where the chosen reply's reward is the higher, 1/2 for a tie (as at the start), 0 else."""
    return (chosen > rejected).double() + 0.5 * (chosen == rejected).double()

def reply_logps(model, x, y):
    """(summed log-probability of each row's reply (R,), its token count (R,)): the targets y >= 0."""
    _, losses = model(x, y, reduction="none")                                      # (R, T), 0 where y = -1
    return -losses.sum(-1), (y >= 0).sum(-1)

class DPO:
    """The objective: called like train.py's masked_loss on a batch whose first half are the chosen
    conversations and second half the rejected ones, pair by pair. Keeps the rank's sums since the
    last log line (stats) for the training log."""

    def __init__(self, reference, beta):
        self.reference, self.beta = reference.eval().requires_grad_(False), beta
        self.sums = 0  # on the device: (pairs, chosen rewards, rejected rewards, right); read at log lines only

    def __call__(self, model, x, y):
        logps, _ = reply_logps(model, x, y)                                        # (2N,)
        with torch.no_grad():
            ref_logps, _ = reply_logps(self.reference, x, y)                       # (2N,)
        n = x.size(0) // 2
        loss, chosen, rejected = dpo_loss(logps[:n], logps[n:], ref_logps[:n], ref_logps[n:], self.beta)
        self.sums = self.sums + torch.stack([torch.full_like(chosen[0], n), chosen.sum(), rejected.sum(),
                                             won(chosen, rejected).sum()]).detach().double()
        return loss, n

    def stats(self):
        """The rank's mean rewards, margin and preference accuracy since the last call."""
        n, chosen, rejected, right = self.sums.tolist() if torch.is_tensor(self.sums) else (0, 0, 0, 0)
        self.sums = 0
        return {"reward_chosen": chosen / n, "reward_rejected": rejected / n, "reward_margin": (chosen - rejected) / n,
                "accuracy": right / n} if n else {}

    @torch.no_grad()
    def evaluate(self, model, val, cfg, rt):
        """On the fixed held-out pairs (the first eval_batches * batch_size), spread over the ranks:
        {"val_loss": the DPO loss, "val_accuracy": the share of pairs whose chosen reply has the higher
        reward, the mean rewards and margin, "val_chosen_logp": the log-likelihood per token of the
        chosen replies, which should not collapse while the margin grows}."""
        model.eval()
        n = min(val.n, cfg.eval_batches * cfg.batch_size)
        ids = np.arange(n)[rt.rank::rt.world]
        total = torch.zeros(6, dtype=torch.float64, device=rt.device)  # loss, right, chosen, rejected, logp, tokens
        for i in range(0, math.ceil(n / rt.world), cfg.batch_size):  # as many forwards on every rank (FSDP)
            mine = ids[i:i + cfg.batch_size]
            x, y = val.batch(mine if len(mine) else [0], rt.device, epoch_order=False)
            with rt.amp:
                logps, counts = reply_logps(model, x, y)
                ref_logps, _ = reply_logps(self.reference, x, y)
            k = x.size(0) // 2
            loss, chosen, rejected = dpo_loss(logps[:k], logps[k:], ref_logps[:k], ref_logps[k:], self.beta)
            if len(mine):
                total += torch.stack([loss * k, won(chosen, rejected).sum(), chosen.sum(), rejected.sum(),
                                      logps[:k].sum(), counts[:k].sum()]).double()
        if rt.world > 1:
            dist.all_reduce(total)
        model.train()
        loss, right, chosen, rejected, logp, tokens = total.tolist()
        return {"val_loss": loss / n, "val_accuracy": right / n, "val_reward_chosen": chosen / n,
                "val_reward_rejected": rejected / n, "val_margin": (chosen - rejected) / n,
                "val_chosen_logp": logp / tokens}

class Pairs:
    """The preference pairs of one split of a prepare.py --preferences folder, in the run's order:
    global sample g -> pair EpochOrder(g), as data.Mixture orders windows, so resuming and any number
    of processes see the same pairs. A batch of pairs is (2N, T): the chosen conversations, then the
    rejected ones, each cut to its last T + 1 tokens (the replies are at the end) and padded after."""

    def __init__(self, meta, split, seq_len, seed):
        folder = meta["folder"]
        if len(meta["sources"]) > 1 or "pairs" not in meta:
            die(f"--objective=dpo trains on one folder of preference pairs (prepare.py --preferences); {folder} "
                "is " + ("a mixture" if len(meta["sources"]) > 1 else "not one"))
        self.tokens = np.memmap(f"{folder}/{meta['shards'][split][0]['file']}", dtype=meta["dtype"], mode="r")
        self.masks = np.memmap(f"{folder}/{meta['loss_mask'][split][0]['file']}", dtype=np.uint8, mode="r")
        self.pairs = np.fromfile(f"{folder}/{meta['pairs'][split]['file']}", dtype="<i8").reshape(-1, 3)
        self.n, self.seq_len, self.eot = len(self.pairs), seq_len, meta["eot_id"]
        self.order, self.names, self.weights, self.windows = EpochOrder(self.n, seed), [folder], [1.0], [self]

    def row(self, start, length):
        """(tokens (T + 1,), mask of its targets (T,)) of one conversation, cut and padded."""
        start = max(start, start + length - self.seq_len - 1)  # the last T + 1 tokens
        tokens = np.full(self.seq_len + 1, self.eot, dtype=np.int64)
        mask = np.zeros(self.seq_len, dtype=np.uint8)
        n = min(length, self.seq_len + 1)
        tokens[:n] = self.tokens[start:start + n]
        mask[:n - 1] = self.masks[start + 1:start + n]
        return tokens, mask

    def batch(self, samples, device, epoch_order=True):
        """Inputs and targets (2N, T) of global samples (or, without epoch_order, pair numbers)."""
        pairs = [self.pairs[self.order(g) if epoch_order else g] for g in samples]
        rows = [self.row(start, n_chosen) for start, n_chosen, _ in pairs]
        rows += [self.row(start + n_chosen, n_rejected) for start, n_chosen, n_rejected in pairs]
        return to_device(rows, device)

    def news(self, g):
        return []
