"""records/curves.py: plot a run's loss curves, train and val loss against step, from its log.

    python records/curves.py records/logs/<run_id>.txt --out curves.png
    python records/curves.py LOG... --out curves.png        # several runs, one colour each

Logs are read as records/compare.py reads them (our logs and the reference project's): val loss from every
`val_loss:` line, train loss from every `train_loss:` line (our logs have one per step; the reference's 2025 logs have
none, so only their val curve is drawn). Exit status: 0 the plot is written; 2 bad arguments or an unreadable log.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_spec = importlib.util.spec_from_file_location("records_compare", Path(__file__).resolve().parent / "compare.py")
compare = sys.modules.get(_spec.name) or importlib.util.module_from_spec(_spec)
if _spec.name not in sys.modules:
    sys.modules[_spec.name] = compare  # its dataclasses look their module up while the file runs
    _spec.loader.exec_module(compare)


def write_curves(path: str | Path, runs: list) -> None:
    """PNG: per run, the train loss as a thin line and the val loss as a line with markers, against step. The y axis
    stops at the first val loss (or where 90% of the train losses lie, if higher), so that the loss at initialization
    does not squash the end of training. The train loss is the training objective: in the 2026-08 recipe it includes
    the multi-token and prefix terms, so it lies above the val loss early on."""
    import matplotlib

    matplotlib.use("Agg")  # write files; no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 6))
    lows, highs = [], []
    for i, run in enumerate(runs):
        color = f"C{i % 10}"
        name = run.path.stem
        if run.train:
            steps, losses = zip(*run.train)
            ax.plot(steps, losses, color=color, lw=0.8, alpha=0.6, label=f"{name} train")
            lows.append(min(losses))
            highs.append(sorted(losses)[int(0.9 * (len(losses) - 1))])
        if run.val:
            steps, losses, _ = zip(*run.val)
            ax.plot(steps, losses, color=color, lw=1.5, marker="o", ms=3.5, label=f"{name} val")
            lows.append(min(losses))
            highs.append(losses[0])
    if lows and highs:
        low, high = min(lows), max(highs)
        ax.set_ylim(low - 0.05 * (high - low), high + 0.05 * (high - low))
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    finals = ", ".join(f"{run.path.stem}: {run.val[-1][1]:.4f} at step {run.val[-1][0]}" for run in runs if run.val)
    ax.set_title(f"loss curves; final val loss {finals}" if finals else "loss curves", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = compare.ArgumentParser(prog="records/curves.py", description="Plot train and val loss against step "
                                     "from training logs.")
    parser.add_argument("logs", nargs="+", metavar="LOG", help="log files (records/logs/<run_id>.txt)")
    parser.add_argument("--out", required=True, metavar="FILE.png", help="the PNG to write")
    args = parser.parse_args(argv)
    if Path(args.out).suffix.lower() != ".png":
        parser.error(f"--out writes a PNG: give a file name ending in .png, got {args.out}")
    if not Path(args.out).parent.is_dir():
        parser.error(f"--out: folder {Path(args.out).parent} does not exist")
    runs = []
    for path in args.logs:
        try:
            runs.append(compare.read_log(path))
        except compare.LogError as e:
            parser.error(f"{path}: {e}")
        if not runs[-1].val and not runs[-1].train:
            parser.error(f"{path}: no loss on any step line yet ({runs[-1].reason}); nothing to plot")
    try:
        write_curves(args.out, runs)
    except OSError as e:
        print(f"records/curves.py: error: cannot write {args.out}: {e.strerror or e}", file=sys.stderr)
        return 2
    for run in runs:
        print(f"{run.path}: {len(run.train)} train losses, {len(run.val)} val losses ({run.status})")
    print(f"plot written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
