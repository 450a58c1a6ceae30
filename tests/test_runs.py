"""
runs.py: the comparison table of a sweep, its picture, and the prompts of a run at step 0 and at
the end, from run folders as train.py writes them.

    python -m pytest -q test_runs.py
"""
import json

import pytest

import runs
from conftest import train_here

def write_run(folder, lr, losses):
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"train": {"lr": lr, "seed": 1, "out_dir": str(folder)},
                                                    "model": {"n_layer": 2}}))
    records = [{"step": 10 * i, "tokens": 1000 * i, "val_loss": loss} for i, loss in enumerate(losses)]
    records += [{"step": 5, "tokens": 500, "loss": 4.0, "tokens_per_s": s} for s in (100.0, 300.0, 200.0)]
    (folder / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))

def test_the_table_shows_what_differs_best_run_first(tmp_path, capsys):
    write_run(tmp_path / "lr_high", 0.01, [5.0, 3.5, 3.6])
    write_run(tmp_path / "lr_low", 0.001, [5.0, 3.2, 3.1])
    runs.main(["--runs", str(tmp_path / "lr_high"), str(tmp_path / "lr_low"), "--plot="])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["run", "settings", "steps", "best", "val", "last", "val", "tokens/s"]
    assert lines[1].split() == [str(tmp_path / "lr_low"), "lr=0.001", "20", "3.1000", "3.1000", "200"]
    assert lines[2].split() == [str(tmp_path / "lr_high"), "lr=0.01", "20", "3.5000", "3.6000", "200"]
    with pytest.raises(SystemExit):
        runs.main(["--runs", str(tmp_path)])
    assert "not a finished train.py run folder" in capsys.readouterr().err

def test_the_picture_holds_the_curves_and_the_sweep(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    folders = []
    for lr, losses in [(0.01, [5.0, 3.5, 3.6]), (0.003, [5.0, 3.3, 3.2]), (0.001, [5.0, 3.2, 3.1])]:
        folders.append(tmp_path / f"lr_{lr}")
        write_run(folders[-1], lr, losses)
    runs.main(["--runs", *map(str, folders), f"--plot={tmp_path / 'sweep.png'}"])
    assert f"wrote {tmp_path / 'sweep.png'}" in capsys.readouterr().out
    assert (tmp_path / "sweep.png").read_bytes().startswith(b"\x89PNG")

def test_a_tiny_run_records_its_prompts_at_step_0_and_at_the_end(byte_data, tmp_path, capsys):
    out = tmp_path / "run"
    result = train_here(byte_data, out, "--max-iters=4", "--eval-every=2", "--sample-tokens=6",
                        "--sample-prompts=ROMEO:|To be")
    assert result.returncode == 0, result.stderr
    evals = [r for r in map(json.loads, open(out / "log.jsonl")) if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 2, 4] and all(set(r["samples"]) == {"ROMEO:", "To be"} for r in evals)
    assert "  | ROMEO:" in result.stdout  # printed under its prompt
    runs.main(["--runs", str(out), "--samples", "--plot="])
    table = capsys.readouterr().out.split(f"{out}\n\n")[1].splitlines()
    assert table[0] == "| prompt | step 0 | step 4 |"
    first, last = evals[0]["samples"], evals[-1]["samples"]
    assert table[2] == f"| ROMEO: | {' '.join(first['ROMEO:'].split())} | {' '.join(last['ROMEO:'].split())} |"
    assert table[3].startswith("| To be | ")
