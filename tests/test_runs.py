"""
runs.py: the comparison table of a sweep, from run folders as train.py writes them.

    python -m pytest -q test_runs.py
"""
import json

import pytest

import runs

def write_run(folder, lr, losses):
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"train": {"lr": lr, "seed": 1, "out_dir": str(folder)},
                                                    "model": {"n_layer": 2}}))
    records = [{"step": 10 * i, "tokens": 1000 * i, "val_loss": loss} for i, loss in enumerate(losses)]
    records += [{"step": 5, "loss": 4.0, "tokens_per_s": s} for s in (100.0, 300.0, 200.0)]
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
