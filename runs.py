"""
Compare training runs: a table of what differs between them and how each ended, and their
validation curves in one plot. For sweeps and ablations: run train.py once per setting, each into
its own --out-dir, then

    python runs.py --runs out/ablate_*               # the table; runs.png if matplotlib is installed
    python runs.py --runs out/lr_* --plot=lr.png

Each folder is one train.py run (its config.json and log.jsonl). The table's "settings" column
shows only the settings that are not the same in every run.
"""
import json
import os
from dataclasses import dataclass

from common import check, die, parse_config, parse_flags, run_main, setting

@dataclass
class RunsConfig:
    runs: list[str] | None = setting(None, "the runs' output folders (train.py --out-dir of each)")
    plot: str = setting("runs.png", "where the validation curves go (needs matplotlib); empty = no plot")

    def __post_init__(self):
        check(self.runs, "name the runs' folders, e.g. python runs.py --runs out/ablate_*")

def read_run(folder):
    """(settings, [log records]) of a train.py run folder."""
    try:
        with open(os.path.join(folder, "config.json")) as f:
            config = json.load(f)
        with open(os.path.join(folder, "log.jsonl")) as f:
            records = [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError) as e:
        die(f"{folder} is not a finished train.py run folder ({type(e).__name__}: {e}); pass run folders")
    return {**config["train"], **config["model"]}, records

def main(argv):
    cfg = parse_config(RunsConfig, parse_flags(argv, [RunsConfig], __doc__))
    runs = {folder: read_run(folder) for folder in cfg.runs}
    keys = [k for k in next(iter(runs.values()))[0] if k not in ("out_dir", "resume", "overwrite")
            and len({json.dumps(settings.get(k)) for settings, _ in runs.values()}) > 1]
    rows = []
    for folder, (settings, records) in runs.items():
        evals = [r for r in records if "val_loss" in r and "step" in r]
        speeds = sorted(r["tokens_per_s"] for r in records if "tokens_per_s" in r)
        rows.append([folder, " ".join(f"{k}={settings.get(k)}" for k in keys) or "-",
                     str(evals[-1]["step"] if evals else "-"),
                     f"{min(r['val_loss'] for r in evals):.4f}" if evals else "-",
                     f"{evals[-1]['val_loss']:.4f}" if evals else "-",
                     f"{speeds[len(speeds) // 2]:,.0f}" if speeds else "-"])
    header = ["run", "settings", "steps", "best val", "last val", "tokens/s"]
    widths = [max(len(row[i]) for row in rows + [header]) for i in range(len(header))]
    for row in [header] + sorted(rows, key=lambda r: r[3]):
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    if cfg.plot:
        try:
            import matplotlib
            matplotlib.use("Agg")  # files only: no display needed
            import matplotlib.pyplot as plt
        except ImportError:
            print("note: no plot: pip install matplotlib")
            return
        fig, ax = plt.subplots(figsize=(8, 5))
        for folder, (_, records) in runs.items():
            evals = [r for r in records if "val_loss" in r and "tokens" in r]
            ax.plot([r["tokens"] for r in evals], [r["val_loss"] for r in evals], marker=".", label=folder)
        ax.set(xlabel="tokens", ylabel="validation loss", title="runs")
        ax.legend()
        fig.savefig(cfg.plot, dpi=120, bbox_inches="tight")
        print(f"wrote {cfg.plot}")

if __name__ == "__main__":
    run_main(main)
