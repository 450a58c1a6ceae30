"""
Compare training runs: a table of what differs between them and how each ended, their loss curves
in one picture beside the final validation loss against the setting that was swept, and the
prompts each run completed at step 0 and at its last evaluation. For sweeps and ablations: run
train.py once per setting, each into its own --out-dir, then

    python runs.py --runs out/lr_*                   # the table; runs.png if matplotlib is installed
    python runs.py --runs out/ablate_* --plot=ablations.png
    python runs.py --runs out/shakespeare --samples  # train.py --sample-prompts: step 0 against the end

Each folder is one train.py run (its config.json and log.jsonl). The table's "settings" column
shows only the settings that are not the same in every run, and so does the picture's legend.
"""
import collections
import json
import os
from dataclasses import dataclass

from common import check, die, parse_config, parse_flags, run_main, setting
from report import pyplot, read_log

@dataclass
class RunsConfig:
    runs: list[str] | None = setting(None, "the runs' output folders (train.py --out-dir of each)")
    plot: str = setting("runs.png", "where the curves and the sweep go (needs matplotlib); empty = no picture")
    samples: bool = setting(False, "print each run's prompted samples at step 0 and at its last evaluation")

    def __post_init__(self):
        check(self.runs, "name the runs' folders, e.g. python runs.py --runs out/ablate_*")

def read_run(folder):
    """(settings, [log records]) of a train.py run folder."""
    try:
        with open(os.path.join(folder, "config.json")) as f:
            config = json.load(f)
        records = read_log(os.path.join(folder, "log.jsonl"))
    except (OSError, ValueError) as e:
        die(f"{folder} is not a finished train.py run folder ({type(e).__name__}: {e}); pass run folders")
    return {**config["train"], **config["model"]}, records

def evals_of(records):
    return [r for r in records if "val_loss" in r and "step" in r and "eval_only" not in r]

def labels(runs, keys):
    """{folder: the settings that set it apart}: of each setting that differs, the value of every run
    in a sweep (no two runs alike), else only where a run leaves the most common value (an ablation
    from a baseline: its one change; the baseline: "-")."""
    shown = {}
    for k in keys:
        values = collections.Counter(json.dumps(settings.get(k)) for settings, _ in runs.values())
        common, count = values.most_common(1)[0]
        shown[k] = None if count == 1 else common  # None: a sweep, always shown
    return {folder: " ".join(f"{k}={settings.get(k)}" for k in keys
                             if shown[k] is None or json.dumps(settings.get(k)) != shown[k]) or "-"
            for folder, (settings, _) in runs.items()}

def print_table(runs, keys):
    rows, label = [], labels(runs, keys)
    for folder, (settings, records) in runs.items():
        evals = evals_of(records)
        speeds = sorted(r["tokens_per_s"] for r in records if "tokens_per_s" in r)
        rows.append([folder, label[folder],
                     str(evals[-1]["step"] if evals else "-"),
                     f"{min(r['val_loss'] for r in evals):.4f}" if evals else "-",
                     f"{evals[-1]['val_loss']:.4f}" if evals else "-",
                     f"{speeds[len(speeds) // 2]:,.0f}" if speeds else "-"])
    header = ["run", "settings", "steps", "best val", "last val", "tokens/s"]
    widths = [max(len(row[i]) for row in rows + [header]) for i in range(len(header))]
    for row in [header] + sorted(rows, key=lambda r: r[3]):
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())

def print_samples(runs):
    """A Markdown table per run: each prompt, its completion at the first evaluation and at the last."""
    for folder, (_, records) in runs.items():
        sampled = [r for r in evals_of(records) if r.get("samples")]
        if not sampled:
            print(f"\n{folder}: no samples recorded (train.py --sample-tokens=N, --sample-prompts='A|B')")
            continue
        first, last = sampled[0], sampled[-1]
        print(f"\n{folder}\n\n| prompt | step {first['step']} | step {last['step']} |\n|---|---|---|")
        for prompt in last["samples"]:
            cells = [prompt or "(a new document)", first["samples"].get(prompt, ""), last["samples"][prompt]]
            print("| " + " | ".join(" ".join(cell.replace("|", "\\|").split()) for cell in cells) + " |")

def plot_runs(runs, keys, path):
    """Left: each run's validation loss over tokens (its training loss faint beside it). Right: the
    last validation loss against the one setting swept (a log axis for a numeric sweep over a wide
    range, as learning rates are), or per run when several settings differ."""
    plt = pyplot()
    if plt is None:
        print("note: no picture: pip install matplotlib")
        return
    fig, (curves, sweep) = plt.subplots(1, 2, figsize=(14, 5.5), gridspec_kw={"width_ratios": [3, 2]})
    finals, names = [], labels(runs, keys)
    for folder, (settings, records) in runs.items():
        label = names[folder] if names[folder] != "-" else "baseline"
        evals, steps = evals_of(records), [r for r in records if "loss" in r]
        line, = curves.plot([r["tokens"] for r in evals], [r["val_loss"] for r in evals], "o-", ms=3, label=label)
        curves.plot([r["tokens"] for r in steps], [r["loss"] for r in steps], color=line.get_color(), alpha=0.3, lw=1)
        if evals:
            finals.append((settings.get(keys[0]) if len(keys) == 1 else label, evals[-1]["val_loss"]))
    curves.set(xlabel="tokens", ylabel="loss (val: points; train: faint)", title="loss curves")
    curves.legend(fontsize=8)
    if not finals:
        sweep.set_axis_off()
    numeric = bool(finals) and len(keys) == 1 and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x, _ in finals)
    if numeric:
        finals.sort()
        sweep.plot(*zip(*finals), "o-")
        xs = [x for x, _ in finals]
        if min(xs) > 0 and max(xs) >= 10 * min(xs):
            sweep.set_xscale("log")
    elif finals:  # one bar per run, best at the top
        finals.sort(key=lambda f: -f[1])
        sweep.barh(range(len(finals)), [y for _, y in finals])
        sweep.set_yticks(range(len(finals)), [str(x) for x, _ in finals], fontsize=8)
        sweep.set_xlim(min(y for _, y in finals) * 0.98, max(y for _, y in finals) * 1.01)
    if numeric or not finals:
        sweep.set(xlabel=keys[0] if len(keys) == 1 else "run", ylabel="last validation loss", title="the sweep")
    else:
        sweep.set(xlabel="last validation loss", title="each run's last validation loss")
    for ax in (curves, sweep):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"wrote {path}")

def main(argv):
    cfg = parse_config(RunsConfig, parse_flags(argv, [RunsConfig], __doc__))
    runs = {folder: read_run(folder) for folder in cfg.runs}
    keys = [k for k in next(iter(runs.values()))[0] if k not in ("out_dir", "resume", "overwrite")
            and len({json.dumps(settings.get(k)) for settings, _ in runs.values()}) > 1]
    print_table(runs, keys)
    if cfg.samples:
        print_samples(runs)
    if cfg.plot:
        plot_runs(runs, keys, cfg.plot)

if __name__ == "__main__":
    run_main(main)
