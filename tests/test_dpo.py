"""
DPO (dpo.py, train.py --objective=dpo, prepare.py --preferences): the loss against a computation
written out here, log 2 and zero rewards at the start, the public sets' row layouts, and a tiny model
that learns a preference while it keeps its replies likely; resume and two processes as for
pretraining.

    python -m pytest -q tests/test_dpo.py
"""
import copy
import json
import math
import random

import pytest
import tiktoken
import torch

import chat
import dpo
import prepare
from conftest import losses, python, random_model, train, train_here

def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path

# --- The objective --------------------------------------------------------------------------------
def test_the_loss_equals_a_computation_written_out():
    g = torch.Generator().manual_seed(0)
    chosen, rejected, ref_chosen, ref_rejected = (torch.randn(6, generator=g, dtype=torch.float64) * 20
                                                  for _ in range(4))
    beta = 0.3
    loss, chosen_rewards, rejected_rewards = dpo.dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta)
    by_hand = []
    for c, r, rc, rr in zip(chosen.tolist(), rejected.tolist(), ref_chosen.tolist(), ref_rejected.tolist()):
        margin = beta * ((c - rc) - (r - rr))
        by_hand.append(math.log1p(math.exp(-margin)))  # -log sigmoid(margin)
    assert loss.item() == pytest.approx(sum(by_hand) / 6, rel=1e-12)
    assert chosen_rewards.tolist() == pytest.approx([beta * (c - rc) for c, rc in zip(chosen, ref_chosen)])
    assert rejected_rewards.tolist() == pytest.approx([beta * (r - rr) for r, rr in zip(rejected, ref_rejected)])

def test_at_the_start_the_loss_is_log_2_and_the_rewards_are_0():
    model = random_model()
    objective = dpo.DPO(copy.deepcopy(model), beta=0.1)  # the reference: the model itself, frozen
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 96, (8, 16), generator=g)  # 4 pairs: chosen rows, then rejected rows
    y = torch.where(torch.rand(8, 16, generator=g) < 0.5, torch.randint(0, 96, (8, 16), generator=g), -1)
    loss, pairs = objective(model, x, y)
    assert pairs == 4 and loss.item() == pytest.approx(math.log(2), abs=1e-6)
    loss.backward()  # the model learns; the reference does not
    assert model.lm_head.weight.grad is not None and objective.reference.lm_head.weight.grad is None
    stats = objective.stats()
    assert stats["reward_chosen"] == stats["reward_rejected"] == stats["reward_margin"] == 0
    assert stats["accuracy"] == 0.5  # ties count half: chance

# --- Pairs in -------------------------------------------------------------------------------------
def test_the_public_sets_row_layouts_become_the_same_pair():
    want = ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}],
            [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Go away."}])
    hh = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello.", "rejected": "\n\nHuman: Hi\n\nAssistant: Go away."}
    ultrafeedback = {"prompt": "Hi", "chosen": want[0], "rejected": want[1]}
    plain = {"prompt": "Hi", "chosen": "Hello.", "rejected": "Go away."}
    messages = {"messages": [{"role": "user", "content": "Hi"}], "chosen": "Hello.", "rejected": "Go away."}
    for row in (hh, ultrafeedback, plain, messages):
        assert chat.preference(row, "x") == want, row
    # the mask covers the last reply only, not an earlier one the two conversations share
    enc = tiktoken.get_encoding("r50k_base")
    enc = tiktoken.Encoding("r50k-chat", pat_str=enc._pat_str, mergeable_ranks=enc._mergeable_ranks,
                            special_tokens={**enc._special_tokens, **chat.chat_tokens(enc.n_vocab)})
    longer = [{"role": "user", "content": "A"}, {"role": "assistant", "content": "B"}, *want[0]]
    ids, mask = chat.render_reply(enc, longer)
    assert enc.decode([t for t, m in zip(ids, mask) if m]) == "Hello.<|im_end|>"

@pytest.mark.parametrize("row, fragment", [
    ({"prompt": "Hi", "chosen": "Hello."}, "no preference pair"),
    ({"prompt": "Hi", "chosen": "", "rejected": "No."}, "has no text content"),
    ({"chosen": [{"role": "user", "content": "A"}, {"role": "assistant", "content": "B"}],
      "rejected": [{"role": "user", "content": "C"}, {"role": "assistant", "content": "D"}]}, "one conversation"),
])
def test_bad_pairs_are_one_line_errors_naming_the_row(tmp_path, capsys, row, fragment):
    good = {"prompt": "Hi", "chosen": "Hello.", "rejected": "Go away."}
    path = write_jsonl(tmp_path / "pairs.jsonl", [good, good, row])
    with pytest.raises(SystemExit) as exit:
        prepare.main(["--input", str(path), "--preferences", "--out", str(tmp_path / "out"), "--num-proc", "1"])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and err.count("\n") == 1 and fragment in err and "pairs.jsonl row 3" in err, err
    assert not (tmp_path / "out").exists()

# --- Training -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def preference_data(byte_data, tmp_path_factory):
    """An SFT model that answers "It is good." and "It is bad." equally often, and pairs that prefer
    the first: (folder of pairs, the SFT checkpoint)."""
    tmp = tmp_path_factory.mktemp("dpo")
    rng = random.Random(0)
    things = ["apple", "river", "stone", "cloud", "horse", "tower", "candle", "garden", "sword", "crown"]
    questions = [f"What do you think of the {rng.choice(things)}?" for _ in range(400)]
    sft = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": f"It is {a}."}]}
           for q, a in zip(questions, ["good", "bad"] * 200)]
    pairs = [{"prompt": q, "chosen": "It is good.", "rejected": "It is bad."} for q in questions]
    for name, rows, kind in [("sft", sft, "--chat"), ("pairs", pairs, "--preferences")]:
        tokenizer = byte_data if name == "sft" else tmp / "sft"
        prepare.main(["--input", str(write_jsonl(tmp / f"{name}.jsonl", rows)), kind, "--tokenizer", str(tokenizer),
                      "--out", str(tmp / name), "--num-proc", "1", "--val-fraction", "0.1"])
    shape = ["--max-seq-len=64", "--batch-size=8"]
    assert train_here(tmp / "sft", tmp / "sft_run", *shape, "--max-iters=150", "--eval-every=150").returncode == 0
    return tmp / "pairs", tmp / "sft_run" / "best.pt"

DPO_RUN = ["--max-seq-len=64", "--batch-size=8", "--objective=dpo", "--optimizer=adamw", "--beta=0.5"]

def test_a_tiny_model_learns_the_preference_and_keeps_its_replies_likely(preference_data, tmp_path):
    pairs, sft = preference_data
    run = train_here(pairs, tmp_path / "run", *DPO_RUN, f"--init-from={sft}", "--lr=1e-4", "--max-iters=60",
                     "--eval-every=30")
    assert run.returncode == 0, run.stderr
    evals = [r for r in map(json.loads, open(tmp_path / "run" / "log.jsonl")) if "val_loss" in r]
    first, last = evals[0], evals[-1]
    assert first["val_loss"] == pytest.approx(math.log(2), abs=1e-5) and first["val_accuracy"] == 0.5
    assert last["val_accuracy"] >= 0.9 and last["val_margin"] > 0.1
    assert last["val_chosen_logp"] > first["val_chosen_logp"] - 0.1  # the chosen replies stay as likely
    steps = [r for r in map(json.loads, open(tmp_path / "run" / "log.jsonl")) if "reward_margin" in r]
    assert steps and steps[-1]["accuracy"] > 0.5  # the training log holds the rewards too

@pytest.mark.slow
def test_stopped_and_resumed_equals_straight_and_two_processes_equal_one(preference_data, tmp_path):
    pairs, sft = preference_data
    run = [*DPO_RUN, f"--init-from={sft}", "--lr=1e-4", "--eval-every=2", "--batch-tokens=1024"]  # 2 x 8 pairs
    straight = train_here(pairs, tmp_path / "straight", *run, "--max-iters=4")
    half = train_here(pairs, tmp_path / "half", *run, "--max-iters=2")
    resumed = train_here(pairs, tmp_path / "half", *run, "--resume", "--max-iters=4")
    assert all(r.returncode == 0 for r in (straight, half, resumed)), resumed.stderr
    assert losses(tmp_path / "half") == losses(tmp_path / "straight") and len(losses(tmp_path / "straight")) == 4
    two = train(pairs, tmp_path / "two", *run, "--max-iters=4", torchrun=2)  # 2 x 1 micro-batch of 8 pairs
    assert two.returncode == 0, two.stderr
    assert max(abs(a[1] - b[1]) for a, b in zip(losses(tmp_path / "straight"), losses(tmp_path / "two"))) <= 1e-5
    # an exported DPO model is an ordinary checkpoint: it loads back and chats
    reply = python("sample.py", f"--ckpt={tmp_path / 'straight' / 'best.pt'}", "--chat", "--temperature=0",
                   "--max-new-tokens=20", input="What do you think of the river?\n")
    assert reply.returncode == 0 and reply.stdout.startswith("> What do you think of the river?\n"), reply.stderr

def test_the_objective_and_the_data_must_agree(preference_data, tmp_path):
    pairs, sft = preference_data
    assert "holds preference pairs: train on them with --objective=dpo" in \
        train_here(pairs, tmp_path / "a", "--max-iters=1").stderr
    conversations = pairs.parent / "sft"  # the SFT data: the same tokenizer, but no pairs
    assert "is not one" in train_here(conversations, tmp_path / "b", *DPO_RUN, f"--init-from={sft}", "--max-iters=1").stderr
    assert "give --init-from" in train_here(pairs, tmp_path / "c", *DPO_RUN, "--max-iters=1").stderr
