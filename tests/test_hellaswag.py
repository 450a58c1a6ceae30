"""
hellaswag.py: scores against a naive per-ending loop, right answers from a model that learned
them, exact ties from a constant model, bad files, and 2 processes = 1 (train.py --eval-only).

    python -m pytest -q test_hellaswag.py
"""
import json
import shutil

import pytest
import tiktoken
import torch
import torch.nn.functional as F

import hellaswag
from conftest import full_logits, random_model, tiny_config, train, train_here
from model import Transformer

HELLASWAG_ITEMS = [  # the official format: ctx, 4 endings, label (other fields omitted)
    {"ctx": "The cat sat on the", "endings": ["mat.", "moon and sang", "violin", "of"], "label": 0},
    {"ctx": "She poured the tea into a", "endings": ["hat", "cup and smiled.", "cloud", "river bank"], "label": 1},
    {"ctx": "To open the door, he turned the", "endings": ["page", "music", "key.", "tide of war"], "label": 2},
    {"ctx": "After the rain, the children played in the", "endings": ["oven", "attic dust", "ledger", "puddles."],
     "label": 3},
    {"ctx": "The chef sliced the onions with a", "endings": ["sharp knife.", "pillow", "song", "glance"], "label": 0},
    {"ctx": "At night the sky was full of", "endings": ["soup", "stars.", "chairs", "paperwork"], "label": 1},
    {"ctx": "He wrote the letter with a", "endings": ["hammer", "fish", "pen.", "storm"], "label": 2},
]

def byte_encoding():
    pattern = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
    return tiktoken.Encoding("bytes", pat_str=pattern, mergeable_ranks={bytes([i]): i for i in range(256)},
                             special_tokens={"<|endoftext|>": 256})

def hellaswag_file(tmp_path, items=HELLASWAG_ITEMS):
    path = tmp_path / "hellaswag.jsonl"
    path.write_text("".join(json.dumps({"ind": i, "split": "val", **item}) + "\n" for i, item in enumerate(items)))
    return path

def test_hellaswag_scores_equal_a_naive_per_ending_loop():
    enc, model = byte_encoding(), random_model(vocab_size=320, max_seq_len=40)
    items = HELLASWAG_ITEMS + [{"ctx": "x" * 60, "endings": ["a", "bb", "ccc", "dddd"], "label": 0}]  # cropped
    sums, means, per_char = hellaswag.score(model, enc, items, "cpu", torch.autocast("cpu", enabled=False), 40,
                                            items_per_batch=3)
    assert sums.shape == means.shape == per_char.shape == (8, 4)
    for i, item in enumerate(items):
        for j, ending in enumerate(item["endings"]):
            ctx, end = enc.encode_ordinary(item["ctx"]), enc.encode_ordinary(" " + ending)
            row = torch.tensor([(ctx + end)[-41:]])
            with torch.no_grad():
                logp = F.log_softmax(full_logits(model, row[:, :-1])[0].double(), dim=-1)  # (L-1, V) float64
            picked = [logp[t - 1, row[0, t]].item() for t in range(row.size(1) - len(end), row.size(1))]
            assert sums[i, j].item() == pytest.approx(sum(picked), abs=1e-4)
            assert means[i, j].item() == pytest.approx(sum(picked) / len(picked), abs=1e-5)
            assert per_char[i, j].item() == pytest.approx(sum(picked) / len(ending), abs=1e-4)

def test_hellaswag_overfit_model_is_always_right_constant_model_breaks_ties_first(tmp_path):
    enc, path = byte_encoding(), hellaswag_file(tmp_path)
    items = hellaswag.load_items(path)
    torch.manual_seed(0)
    model = Transformer(tiny_config(vocab_size=320, n_embd=64, max_seq_len=64))
    texts = [enc.encode_ordinary(it["ctx"] + " " + it["endings"][it["label"]]) for it in HELLASWAG_ITEMS]
    L = max(map(len, texts))
    batch = torch.tensor([t + [256] * (L - len(t)) for t in texts])
    targets = batch[:, 1:].masked_fill(batch[:, 1:] == 256, -1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):  # learn the correct endings by heart
        _, loss = model(batch[:, :-1], targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
    result = hellaswag.evaluate(model, enc, items, "cpu", torch.autocast("cpu", enabled=False), 64)
    assert result == {"hellaswag_acc": 1.0, "hellaswag_acc_norm_tokens": 1.0, "hellaswag_acc_norm_chars": 1.0,
                      "hellaswag_items": 7}

    # All weights zero: every token gets probability 1/V. The mean per token ties everywhere, so
    # acc_norm always picks ending 0; the sum favours the ending with the fewest tokens.
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    result = hellaswag.evaluate(model, enc, items, "cpu", torch.autocast("cpu", enabled=False), 64)
    shortest = [min(range(4), key=lambda j: (len(enc.encode_ordinary(" " + it["endings"][j])), j))
                for it in HELLASWAG_ITEMS]
    expected_acc = sum(s == it["label"] for s, it in zip(shortest, HELLASWAG_ITEMS)) / 7
    assert result["hellaswag_acc_norm_tokens"] == pytest.approx(2 / 7)  # items whose label is 0
    assert result["hellaswag_acc"] == pytest.approx(expected_acc) and expected_acc != 2 / 7
    # per character: every token costs ln V, so the best ending has the most characters per token
    def density(ending):
        return len(ending) / len(enc.encode_ordinary(" " + ending))
    densest = [max(range(4), key=lambda j: (density(it["endings"][j]), -j)) for it in HELLASWAG_ITEMS]
    assert result["hellaswag_acc_norm_chars"] == pytest.approx(
        sum(d == it["label"] for d, it in zip(densest, HELLASWAG_ITEMS)) / 7)

@pytest.mark.slow
def test_eval_only_sharded_over_two_processes_equals_one(byte_data, tmp_path):
    out = tmp_path / "run"
    assert train_here(byte_data, out, "--max-iters=2", "--eval-every=2").returncode == 0
    path = hellaswag_file(tmp_path)
    records = []
    for procs in (None, 2):
        shutil.copy(out / "ckpt.pt", tmp_path / f"ckpt{procs}.pt")
        run = (lambda *a: train(*a, torchrun=2)) if procs else train_here  # one process: in this one
        result = run(byte_data, out, "--eval-only", f"--ckpt={tmp_path / f'ckpt{procs}.pt'}", f"--hellaswag-path={path}")
        assert result.returncode == 0, result.stderr
        assert "hellaswag_acc_norm_tokens" in result.stdout
        with open(tmp_path / "log.jsonl") as f:
            records.append(json.loads(f.readlines()[-1]))
    one, two = records
    assert one["hellaswag_items"] == two["hellaswag_items"] == 7
    for key in ("val_loss", "hellaswag_acc", "hellaswag_acc_norm_tokens", "hellaswag_acc_norm_chars"):
        assert one[key] == pytest.approx(two[key], abs=1e-6), key

def test_bad_files_are_one_line_errors(tmp_path, capsys):
    good = json.dumps({"ctx": "a", "endings": ["b", "c", "d", "e"], "label": 1})
    cases = {
        "not-json": (good + "\n{\"ctx\": \"cut off", "line 2 is not a HellaSwag item"),
        "three-endings": (json.dumps({"ctx": "a", "endings": ["b", "c", "d"], "label": 0}), "line 1 is not"),
        "label": (json.dumps({"ctx": "a", "endings": ["b", "c", "d", "e"], "label": 7}), "line 1 is not"),
        "empty": ("\n", "holds no items"),
    }
    for name, (text, fragment) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(SystemExit):
            hellaswag.load_items(tmp_path / name)
        err = capsys.readouterr().err
        assert err.startswith(f"error: {tmp_path / name}") and fragment in err and err.count("\n") == 1, err
    with pytest.raises(SystemExit):
        hellaswag.load_items(tmp_path / "missing.jsonl")
    assert "no HellaSwag file" in capsys.readouterr().err
    (tmp_path / "ok").write_text(good + "\n" + good + "\n")
    assert len(hellaswag.load_items(tmp_path / "ok", limit=1)) == 1

def test_lm_eval_style_prepares_the_text_as_lm_eval_does(tmp_path):
    item = {"activity_label": "Making a cake", "ctx_a": "A woman cracks eggs into a bowl.",
            "ctx_b": "she", "ctx": "A woman cracks eggs into a bowl. she",
            "endings": ["whisks them [step] quickly.", "  drops the bowl [title] Oops", "c", "d"], "label": 0}
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps(item) + "\n")
    [styled] = hellaswag.get_items(str(path), style="lm-eval")
    assert styled["ctx"] == "Making a cake: A woman cracks eggs into a bowl. She"
    assert styled["endings"][:2] == ["whisks them quickly.", "drops the bowl. Oops"]
    assert hellaswag.get_items(str(path))[0]["ctx"] == item["ctx"]  # build-nanogpt's: as given
