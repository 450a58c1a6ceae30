"""
Chat fine-tuning: the template and its loss mask (chat.py), conversations through prepare.py --chat,
the masked loss and --init-from in train.py, and sample.py --chat.

    python -m pytest -q test_chat.py

The Hugging Face side (apply_chat_template, generate) is in test_export.py.
"""
import json
import random

import numpy as np
import pytest
import tiktoken
import torch

import chat
import prepare
import sample as sample_py
import data as data_py
import train as train_py
from conftest import R50K, R50K_EOT, SMALL_BPE, TINY_RUN, losses, python, train_here, write_checkpoint

ENC = tiktoken.get_encoding("r50k_base")
CHAT_ENC = tiktoken.Encoding("r50k-chat", pat_str=ENC._pat_str, mergeable_ranks=ENC._mergeable_ranks,
                             special_tokens={**ENC._special_tokens, **chat.chat_tokens(ENC.n_vocab)})
TALK = [{"role": "system", "content": "You answer in rhyme."},
        {"role": "user", "content": "Good morrow!"},
        {"role": "assistant", "content": " Good day,\nsay what you may."},
        {"role": "user", "content": "Fare well."},
        {"role": "assistant", "content": "\n\nAnd you as well."}]

def refused(capsys, main, *args):
    """main(args) in this process ends in one 'error: ...' line and exit code 2 -> the line."""
    with pytest.raises(SystemExit) as exit:
        main([str(a) for a in args])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    return err

def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path

# --- The template and its mask ----------------------------------------------------------------------
def test_the_mask_covers_each_reply_and_its_end_of_turn_only():
    ids, mask = chat.render(CHAT_ENC, TALK)
    assert len(ids) == len(mask)
    # the text, written out by hand
    assert CHAT_ENC.decode(ids) == ("<|endoftext|><|im_start|>system\nYou answer in rhyme.<|im_end|>\n"
                                    "<|im_start|>user\nGood morrow!<|im_end|>\n<|im_start|>assistant\n"
                                    " Good day,\nsay what you may.<|im_end|>\n<|im_start|>user\nFare well."
                                    "<|im_end|>\n<|im_start|>assistant\n\n\nAnd you as well.<|im_end|>\n")
    # the learned tokens are the two replies, each ending in <|im_end|>; the reply that starts with
    # newlines shares a token with its header's newline, which is learned as part of the reply
    learned = CHAT_ENC.decode([t for t, m in zip(ids, mask) if m])
    assert learned in (" Good day,\nsay what you may.<|im_end|>\n\nAnd you as well.<|im_end|>",
                       " Good day,\nsay what you may.<|im_end|>\n\n\nAnd you as well.<|im_end|>")
    end = CHAT_ENC.encode_single_token(chat.TURN_END)
    assert [m for t, m in zip(ids, mask) if t == end] == [0, 0, 1, 0, 1]  # system, user, reply, user, reply
    # the prompt for a reply: the same ids, then the header of the assistant's turn
    prompt, _ = chat.render(CHAT_ENC, TALK[:2], reply=True)
    assert CHAT_ENC.decode(prompt).endswith("Good morrow!<|im_end|>\n<|im_start|>assistant\n")
    assert prompt == chat.render(CHAT_ENC, TALK[:3])[0][:len(prompt)]

def test_literal_markers_in_text_stay_text():
    said = "I typed <|im_end|> and <|im_start|>assistant\n and <|endoftext|> myself"
    ids, mask = chat.render(CHAT_ENC, [{"role": "user", "content": said}, {"role": "assistant", "content": said}])
    specials = [t for t in ids if t >= ENC.n_vocab - 1]  # eot and the two chat tokens
    assert len(specials) == 5  # eot + (start, end) per turn: none came from the text
    assert CHAT_ENC.decode(ids).count(said) == 2

@pytest.mark.parametrize("row, fragment", [
    ({"text": "no conversation"}, "no conversation"),
    ({"messages": [{"role": "robot", "content": "beep"}]}, "role 'robot'"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]}, "no text content"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}]}, "no text content"),
    ({"messages": [{"role": "user", "content": "anyone?"}]}, "no assistant turn"),
    ({"messages": ["hi"]}, "message 0"),
])
def test_bad_conversations_are_one_line_errors_and_write_nothing(tmp_path, capsys, row, fragment):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    path = write_jsonl(tmp_path / "talk.jsonl", [good, good, row])
    err = refused(capsys, prepare.main, "--input", path, "--chat", "--out", tmp_path / "out", "--num-proc", 1)
    assert fragment in err and "talk.jsonl row 3" in err, err
    assert not (tmp_path / "out").exists()

def test_alpaca_rows_become_a_user_and_an_assistant_turn(capsys):
    row = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}
    assert chat.conversation(row, "x") == [{"role": "user", "content": "Add the numbers.\n\n2 and 3"},
                                           {"role": "assistant", "content": "5"}]
    # an input that is not text is refused, not turned into text
    with pytest.raises(SystemExit):
        chat.conversation({**row, "input": 23}, "talk.jsonl row 7")
    assert 'talk.jsonl row 7: "input" is 23 (int), not text' in capsys.readouterr().err

def test_a_play_with_an_odd_last_speech_says_it_is_left_out(tmp_path, capsys):
    play = tmp_path / "play.txt"
    play.write_text("A:\nHail.\n\nB:\nWell met.\n\nA:\nFarewell, unanswered.\n")
    prepare.main(["--input", str(play), "--chat", "--out", str(tmp_path / "out"), "--num-proc", "1",
                  "--val-fraction", "0"])
    assert "left out 1 last speech(es) of a play" in capsys.readouterr().err
    assert json.loads((tmp_path / "out" / "meta.json").read_text())["documents"]["train"] == 1

# --- Conversations as training data --------------------------------------------------------------
@pytest.fixture(scope="module")
def chat_data(tmp_path_factory):
    """A few hundred short conversations through prepare.py --chat, GPT-2 tokens plus the chat tokens."""
    tmp = tmp_path_factory.mktemp("chat")
    rng = random.Random(0)
    def words(choices):  # 1 to 30 of them: some conversations are longer than a window
        return " ".join(rng.choices(choices, k=rng.randint(1, 30)))
    rows = [{"messages": [{"role": "user", "content": words(["how", "now", "brown", "cow"])},
                          {"role": "assistant", "content": words(["yes", "no", "maybe"])}]} for _ in range(300)]
    out = tmp / "data"
    prepare.prepare(prepare.parse_settings(["--input", str(write_jsonl(tmp / "talk.jsonl", rows)), "--chat",
                                            "--out", str(out), "--num-proc", "1"]), "test")
    return out, rows

def test_packed_windows_keep_each_target_with_its_mask(chat_data):
    out, rows = chat_data
    meta = json.loads((out / "meta.json").read_text())
    assert meta["tokenizer"]["special_tokens"] == chat.chat_tokens(ENC.n_vocab) and meta["vocab_size"] == 50259
    # the reference: every train conversation rendered on its own, concatenated
    enc = CHAT_ENC
    ids, mask = [], []
    for i, row in enumerate(rows):
        if i % 100 != 99:  # val holds every 100th
            a, b = chat.render(enc, row["messages"])
            ids, mask = ids + a, mask + b
    T = 48  # windows of 49 tokens cut conversations anywhere
    windows = data_py.TokenWindows(str(out), meta, "train", T)
    x, y = windows.batch(np.arange(windows.n), torch.device("cpu"))
    for w in range(windows.n):
        span = slice(w * T, w * T + T + 1)
        want = np.where(np.array(mask[span][1:]) == 1, ids[span][1:], -1)
        assert x[w].tolist() == ids[span][:-1] and y[w].tolist() == want.tolist(), w

def test_the_loss_sees_reply_targets_only(chat_data):
    out, _ = chat_data
    meta = json.loads((out / "meta.json").read_text())
    T = 48
    windows = data_py.TokenWindows(str(out), meta, "train", T)
    mask = np.memmap(out / "train_0000.mask", dtype=np.uint8, mode="r")
    # a window whose last target is a user token, and one whose last target is a reply token: the
    # last token of a window is a target only, never an input
    ends = {m: next(w for w in range(windows.n) if mask[w * T + T] == m) for m in (0, 1)}
    torch.manual_seed(0)
    model = train_py.Transformer(train_py.ModelConfig(vocab_size=50304, n_layer=1, n_head=2, n_kv_head=1,
                                                      n_embd=16, max_seq_len=T, multiple_of=16))
    for m, w in ends.items():
        x, y = windows.batch([w], torch.device("cpu"))
        raw = torch.from_numpy(np.array(np.memmap(out / "train_0000.bin", dtype=np.uint16, mode="r")
                                        [w * T + 1:w * T + T + 1], dtype=np.int64))[None]
        changed = raw.clone()
        changed[0, -1] = (changed[0, -1] + 1) % ENC.n_vocab  # another target at the last position
        results = []
        for targets in (raw, changed):
            targets = torch.where(y >= 0, targets, -1)  # the mask, as TokenWindows applies it
            model.zero_grad()
            loss, _ = train_py.masked_loss(model, x, targets)
            loss.backward()
            results.append((loss.item(), [p.grad.clone() for p in model.parameters()]))
        same = results[0][0] == results[1][0] and all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))
        assert same == (m == 0), (m, results[0][0], results[1][0])

def test_a_window_without_reply_targets_has_zero_loss_not_nan():
    model = train_py.Transformer(train_py.ModelConfig(vocab_size=64, n_layer=1, n_head=2, n_kv_head=1,
                                                      n_embd=16, max_seq_len=8, multiple_of=16))
    loss, count = train_py.masked_loss(model, torch.zeros(2, 8, dtype=torch.long), torch.full((2, 8), -1))
    assert loss.item() == 0 and count.item() == 0

# --- Fine-tuning and chatting ----------------------------------------------------------------------
def test_init_from_refuses_a_missing_or_mismatched_checkpoint(chat_data, tmp_path, capsys):
    out, _ = chat_data
    args = [f"--data={out}", f"--out-dir={tmp_path / 'run'}", "--max-iters=1", "--device=cpu"]
    assert "not found" in refused(capsys, train_py.main, *args, f"--init-from={tmp_path / 'none.pt'}")
    r50k = write_checkpoint(tmp_path / "r50k.pt", R50K, R50K_EOT)
    assert "cannot change --n-layer" in refused(capsys, train_py.main, *args, f"--init-from={r50k}", "--n-layer=3")
    # the vocabulary is the checkpoint's (grown for the data's new tokens), never a flag silently replaced
    assert "cannot change --vocab-size" in refused(capsys, train_py.main, *args, f"--init-from={r50k}",
                                                   "--vocab-size=60000")
    small = write_checkpoint(tmp_path / "small.pt", SMALL_BPE, SMALL_BPE["special_tokens"]["<|endoftext|>"])
    assert "another tokenizer" in refused(capsys, train_py.main, *args, f"--init-from={small}")
    assert not (tmp_path / "run" / "ckpt.pt").exists()

def test_a_validation_set_without_replies_is_refused_at_the_start(tmp_path, capsys):
    # long questions and "ok": the fixed validation windows hold questions only. The masked loss
    # would be 0 / 0 there: a plain error that says what to change, before any training
    rows = [{"messages": [{"role": "user", "content": " ".join(["why"] * 300)},
                          {"role": "assistant", "content": "ok"}]} for _ in range(60)]
    out = tmp_path / "data"
    prepare.main(["--input", str(write_jsonl(tmp_path / "talk.jsonl", rows)), "--chat", "--out", str(out),
                  "--num-proc", "1", "--val-fraction", "0.1"])
    err = refused(capsys, train_py.main, f"--data={out}", f"--out-dir={tmp_path / 'run'}", *TINY_RUN,
                  "--max-iters=5")
    assert "holds no token to learn" in err and "--eval-batches" in err and "--val-fraction" in err, err
    assert not (tmp_path / "run" / "ckpt.pt").exists()

def test_chat_needs_a_chat_model(tmp_path, capsys):
    base = write_checkpoint(tmp_path / "base.pt", R50K, R50K_EOT)
    assert "not a chat model" in refused(capsys, sample_py.main, f"--ckpt={base}", "--chat")
    assert "--system is for --chat" in refused(capsys, sample_py.main, f"--ckpt={base}", "--system=hi")

@pytest.mark.slow
def test_a_fine_tuned_model_answers_a_new_question_in_the_trained_format(byte_data, tmp_path):
    rng = random.Random(0)
    things = ["apple", "river", "stone", "cloud", "horse", "tower", "candle", "garden", "sword", "crown"]
    rows = [{"messages": [{"role": "user", "content": f"What colour is the {rng.choice(things[:-2])}?"},
                          {"role": "assistant", "content": f"The answer is {rng.choice(['red', 'blue', 'gold'])}."}]}
            for _ in range(300)]
    talk = write_jsonl(tmp_path / "talk.jsonl", rows)
    result = python("prepare.py", "--input", talk, "--chat", "--tokenizer", byte_data, "--out", tmp_path / "chat")
    assert result.returncode == 0, result.stderr
    base = train_here(byte_data, tmp_path / "base", "--max-iters=20")
    assert base.returncode == 0, base.stderr
    def fine_tune(out, *args):  # (in this process: the model's settings come from the base checkpoint)
        return train_here(tmp_path / "chat", out, "--batch-size=8", "--lr=3e-3", "--eval-every=150", *args)
    tuned = fine_tune(tmp_path / "tuned", f"--init-from={tmp_path / 'base' / 'ckpt.pt'}", "--max-iters=150")
    assert tuned.returncode == 0, tuned.stderr
    # stopped halfway and resumed: the same losses, masks and new token rows included
    half = fine_tune(tmp_path / "half", f"--init-from={tmp_path / 'base' / 'ckpt.pt'}", "--max-iters=75")
    assert half.returncode == 0, half.stderr
    resumed = fine_tune(tmp_path / "half", "--resume", "--max-iters=150")
    assert resumed.returncode == 0, resumed.stderr
    assert losses(tmp_path / "half") == losses(tmp_path / "tuned")
    assert "new tokens <|im_start|>, <|im_end|> start at the mean embedding" in tuned.stdout
    evals = [json.loads(line)["val_loss"] for line in open(tmp_path / "tuned" / "log.jsonl") if "val_loss" in line]
    assert evals[-1] < evals[0] / 4, evals  # the masked val loss: the replies are learned
    # things the conversations never asked about, answered in the trained form, each turn ended
    reply = python("sample.py", f"--ckpt={tmp_path / 'tuned' / 'ckpt.pt'}", "--chat", "--temperature=0",
                   "--max-new-tokens=40", input="What colour is the sword?\nWhat colour is the crown?\n")
    assert reply.returncode == 0, reply.stderr
    lines = reply.stdout.splitlines()
    assert lines[0] == "> What colour is the sword?" and lines[2] == "> What colour is the crown?", lines
    for answer in (lines[1], lines[3]):
        assert answer.startswith("The answer is ") and answer.endswith(".") and len(answer) < 30, lines
