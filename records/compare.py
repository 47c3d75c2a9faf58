"""records/compare.py: summarize speedrun logs and test a record claim (docs/recipes.md#rules).

    python records/compare.py RUNS... [--baseline RUNS...] [--target 3.28] [--alpha 0.01] [--json] [--plot FILE.png]

RUNS are log files or folders; folders are searched recursively for *.txt logs (anything else is ignored). Our logs
(records/logs/<run_id>.txt) and the reference project's record logs are read alike (docs/recipes.md#run-log): the
source, a line of 100 '=', the environment (versions, then nvidia-smi or our "CPU:" line), another line of 100 '=', then
the step lines. A run's official result is its final val line, the one at step N of N: its val_loss and its train_time.
A log without one (crashed, stopped, or still running) is listed as incomplete and left out, with the reason: our
trainer ends a run that stops early with a line 'stopped: <why>'. A run whose final val loss is not finite, or that
stopped on a loss that is not finite, diverged.

Logs of one run count once, never as independent samples: a copy of a log (the same bytes), logs with the same run id
(our logs' run_id setting, or a uuid file name) and a run resumed from another's checkpoint (our "resumed from ...: step
S of run R" line) are merged into one run, a complete log if there is one, and the report says what it merged. Each
run's ranks (processes that trained) are shown where the log records them (our "log: ... (world size N, ...)" line).

Per group: mean and sample std of the final val losses with the record rule's one-sided one-sample t-test that the mean
is below --target (scipy.stats.ttest_1samp(losses, target, alternative='less')); train time mean, median, min, max;
steps; runs of one group that differ in ranks are flagged. With --baseline: the time difference with Welch's t-test
(one-sided, H1: RUNS are faster; the two-sided p that some record READMEs quote is shown too), the loss difference, and
the mean val loss at every step both groups evaluated.

The claim holds when RUNS have at least 2 complete runs with p < alpha, nothing is flagged (runs of one group that
differ in step count, embedded source or hardware; a diverged run; a baseline on other hardware) and, with --baseline,
RUNS are faster with a one-sided Welch p < alpha.

With --track=optimization the question is steps, not time (docs/recipes.md#judging-a-claim): logs must be runs of
train_gpt.py --preset=optimization_track with its frozen settings (others are refused, named with the reason); the
verdict names the earliest step, evaluated by every run, whose mean val loss meets (3.28 - mean) * sqrt(n) >= 0.004
and, with --baseline (an earlier result), needs (dloss + dsteps/100 * 0.0045) / sqrt(1/n1 + 1/n2) >= 0.004.

Exit status: 0 the claim holds; 1 it does not (the verdict line says why); 2 bad arguments or no logs found.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import sys
import textwrap
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import stats

EXIT_HOLDS, EXIT_FAILS, EXIT_USAGE = 0, 1, 2

# -----------------------------------------------------------------------------
# Reading one log (layout: docs/recipes.md#run-log)

SECTION_RULE = "=" * 100  # separates the source, the environment block and the training output
FILE_RULE = "-" * 40  # embedded files after the script are introduced by FILE_RULE, "# name", FILE_RULE
STEP_RE = re.compile(r"step:(\d+)/(\d+)((?:\s.*)?)")
TRAIN_TIME_RE = re.compile(r"(\d+(?:\.\d*)?)ms")
NOT_FINITE_LOSS_RE = re.compile(r"\bloss\b[^.]*?\b(?:nan|-?inf)\b", re.IGNORECASE)  # in a 'stopped:' line
TRAIN_LOSS_RE = re.compile(r"\strain_loss:(\S+)")  # our step lines' training loss (records/curves.py)
RESUMED_RE = re.compile(r"resumed from .*: step \d+ of run (\S+), train_time")  # our trainer, after --resume
RANKS_RE = re.compile(r"log: .*\(world size (\d+), device")
UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
GPU_ROW_RE = re.compile(r"\|\s+\d+\s+(\S.*?)\s+(?:On|Off)\s+\|")  # one GPU's first row in the nvidia-smi table
VERSION_RES = (("Python", re.compile(r"Running Python (\S+)")),
               ("PyTorch", re.compile(r"Running PyTorch (\S+)", re.IGNORECASE)),  # 2024 logs say "pytorch"
               ("Triton", re.compile(r"Running Triton version (\S+)")),
               ("driver", re.compile(r"Driver Version: (\S+)")))


class LogError(ValueError):
    """A file that cannot be read as a training log; the message says why, and where."""


class UsageError(ValueError):
    """A command line that names nothing to read."""


@dataclass
class RunLog:
    path: Path
    status: str  # "complete", "incomplete" (crashed, stopped or running) or "diverged" (a loss not finite)
    reason: str  # why the run is not complete; "" when it is
    total_steps: int | None  # N, from the step lines
    val: list[tuple[int, float, float]]  # (step, val_loss, train_time_ms) of each val line, in file order
    source_sha256: str  # of everything above the environment block: the script and any embedded files
    embedded_files: list[str]
    hardware: str
    software: str
    hyperparameters: dict | None  # our logs print them as one JSON line; the reference's do not
    train: list[tuple[int, float]] = field(default_factory=list)  # (step, train_loss) of the lines that have one
    digest: str = ""  # sha256 of the file's bytes: a copy of a log is the same run
    run_id: str | None = None  # our logs' run_id setting, else a uuid file name (the reference's logs)
    resumes: str | None = None  # the run id this run resumed from a checkpoint of ("resumed from ...: step S of run R")
    ranks: int | None = None  # processes that trained (our logs' "log: ... (world size N, ...)" line)

    @property
    def final_val_loss(self) -> float:
        return self.val[-1][1]

    @property
    def train_time_ms(self) -> float:
        return self.val[-1][2]


def parse_step_line(line: str) -> tuple[int, int, float | None, float]:
    """'step:S/N key:value ...' -> (S, N, val_loss or None, train_time_ms). Fields we do not use are ignored."""
    m = STEP_RE.fullmatch(line.rstrip())
    if not m:
        raise ValueError("not a 'step:S/N key:value ...' line")
    fields = dict(token.split(":", 1) for token in m.group(3).split() if ":" in token)
    train_time = TRAIN_TIME_RE.fullmatch(fields.get("train_time", ""))
    if not train_time:
        raise ValueError("no train_time:<number>ms field")
    val_loss = None
    if "val_loss" in fields:
        try:
            val_loss = float(fields["val_loss"])
        except ValueError:
            raise ValueError(f"val_loss {fields['val_loss']!r} is not a number") from None
    return int(m.group(1)), int(m.group(2)), val_loss, float(train_time.group(1))


def describe_hardware(env: list[str]) -> str:
    """'8x NVIDIA H100 80GB HBM3' from the nvidia-smi table, else our 'CPU: ...' or 'GPU: ...' line, else 'unknown'."""
    gpus = Counter(m.group(1) for line in env if (m := GPU_ROW_RE.match(line)))
    if gpus:
        return ", ".join(f"{count}x {name}" for name, count in gpus.items())
    for line in env:
        if line.startswith("CPU:"):
            return line.strip()
        if line.startswith("nvidia-smi: not available") and "GPU:" in line:  # our trainer, when nvidia-smi fails
            return "GPU: " + line.split("GPU:", 1)[1].strip()
    return "unknown"


def describe_software(env: list[str]) -> str:
    found = []
    for name, pattern in VERSION_RES:
        m = next((m for line in env if (m := pattern.search(line))), None)
        if m:
            found.append(f"{name} {m.group(1)}")
    return ", ".join(found) or "unknown"


def parse_log(text: str, path: Path) -> RunLog:
    lines = text.splitlines()
    rules = [i for i, line in enumerate(lines) if line.rstrip() == SECTION_RULE]
    if not rules:
        raise LogError("no line of 100 '=' characters: not a training log (layout in docs/recipes.md#run-log)")
    # The environment block opens with "Running Python/PyTorch ..."; anchoring on that line keeps a line of '='
    # inside the embedded source from being taken for the separator.
    env_start = next((i for i in rules if i + 1 < len(lines) and lines[i + 1].startswith("Running")), rules[0])
    env_end = next((i for i in rules if i > env_start), len(lines))
    source, env = lines[:env_start], lines[env_start + 1:env_end]

    total = last_step = hyperparameters = stopped = resumes = ranks = None
    val: list[tuple[int, float, float]] = []
    train: list[tuple[int, float]] = []
    cut_off = False
    for i in range(env_end + 1, len(lines)):
        line = lines[i]
        if line.startswith("hyperparameters:"):
            try:
                hyperparameters = json.loads(line.split(":", 1)[1])
            except json.JSONDecodeError:
                raise LogError(f"line {i + 1}: the hyperparameters line is not valid JSON") from None
            continue
        if m := RESUMED_RE.match(line):
            resumes = m.group(1)
            continue
        if m := RANKS_RE.match(line):
            ranks = int(m.group(1))
            continue
        if line.startswith("stopped:"):  # our trainer's last line when a run ends early
            stopped = line.split(":", 1)[1].split(" HINT:", 1)[0].strip().rstrip(".")
            continue
        if not line.startswith("step:"):
            continue  # free-form lines: "Compiling model ...", "Resetting Model", "peak memory ..."
        quoted = repr(textwrap.shorten(line, 100, placeholder=" ..."))  # for a message: never cut mid-word
        try:
            step, n, val_loss, train_time_ms = parse_step_line(line)
        except ValueError as e:
            if i == len(lines) - 1 and not text.endswith(("\n", "\r")):
                cut_off = True  # the last line of a log that is still being written
                break
            raise LogError(f"line {i + 1}: {e}: {quoted}") from None
        if total is not None and n != total:
            raise LogError(f"line {i + 1}: total steps {n} differs from {total} on the lines above: {quoted}")
        if step > n:
            raise LogError(f"line {i + 1}: step {step} is past the total of {n}: {quoted}")
        total = n
        last_step = step if last_step is None else max(last_step, step)
        if val_loss is not None:
            val.append((step, val_loss, train_time_ms))
        if m := TRAIN_LOSS_RE.search(line):
            try:
                train.append((step, float(m.group(1))))
            except ValueError:
                pass  # a garbled loss is left out of the curves; it decides nothing here

    status, reason = "complete", ""
    if env_end == len(lines):
        status, reason = "incomplete", "the log ends inside the environment block: training had not begun"
    elif total is None:
        status, reason = "incomplete", "no step lines: training had not begun"
    elif not val:
        status, reason = "incomplete", f"no val line; the log stops at step {last_step}/{total}"
    elif val[-1][0] != total:
        status, reason = "incomplete", f"last val line at step {val[-1][0]}/{total}; the log stops at step {last_step}"
    elif not math.isfinite(val[-1][1]):
        status, reason = "diverged", f"final val loss is {val[-1][1]}"
    if cut_off and status == "incomplete":
        reason += " (its last line is cut off)"
    if stopped is not None and status == "incomplete":
        status = "diverged" if NOT_FINITE_LOSS_RE.search(stopped) else status
        reason = f"stopped: {stopped} ({reason})"

    embedded = [source[i + 1][2:].strip() for i in range(len(source) - 2)
                if source[i] == FILE_RULE and source[i + 2] == FILE_RULE and source[i + 1].startswith("# ")]
    return RunLog(path=path, status=status, reason=reason, total_steps=total, val=val,
                  source_sha256=hashlib.sha256("\n".join(source).encode()).hexdigest(), embedded_files=embedded,
                  hardware=describe_hardware(env), software=describe_software(env), hyperparameters=hyperparameters,
                  train=train, digest=hashlib.sha256(text.encode()).hexdigest(), resumes=resumes, ranks=ranks,
                  run_id=(hyperparameters or {}).get("run_id") or (path.stem if UUID_RE.fullmatch(path.stem) else None))


def read_log(path: str | Path) -> RunLog:
    """Reads one log; raises LogError for a file that is unreadable or not a training log."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise LogError(f"cannot read the file: {e.strerror or e}") from None
    if not raw.strip():
        raise LogError("the file is empty")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LogError(f"not UTF-8 text (bad byte at offset {e.start}): not a training log") from None
    return parse_log(text, path)


# -----------------------------------------------------------------------------
# Groups of runs


@dataclass
class Group:
    name: str  # "RUNS" or "BASELINE"
    complete: list[RunLog]
    left_out: list[RunLog]  # incomplete or diverged
    unreadable: list[tuple[Path, str]]
    merged: list[str] = field(default_factory=list)  # logs of a run counted once: what was merged, and why


def find_logs(args: list[str], repeats: list[str] | None = None) -> list[Path]:
    """The files named, and every *.txt under the folders named, in order and once each; a file named again (the
    same path, or a folder holding it) is said in `repeats`."""
    found: list[Path] = []
    for arg in args:
        path = Path(arg)
        if path.is_dir():
            found += sorted(p for p in path.rglob("*.txt") if p.is_file())
        elif path.is_file():
            found.append(path)
        else:
            raise UsageError(f"{arg}: no such file or folder")
    unique: dict[Path, Path] = {}
    for path in found:
        if path.resolve() in unique and repeats is not None:
            repeats.append(f"{path} is given more than once: read once")
        unique.setdefault(path.resolve(), path)
    return list(unique.values())


def load_group(name: str, paths: list[Path]) -> Group:
    group = Group(name, [], [], [])
    for path in paths:
        try:
            run = read_log(path)
        except LogError as e:
            group.unreadable.append((path, str(e)))
            continue
        (group.complete if run.status == "complete" else group.left_out).append(run)
    merge_same_runs(group)
    return group


def same_run(a: RunLog, b: RunLog) -> str | None:
    """Why logs a and b are of one run (a copy, one run id, one resumed from the other's checkpoint), else None."""
    if a.digest == b.digest:
        return f"{a.path} is a byte-identical copy of {b.path}"
    if a.run_id and a.run_id == b.run_id:
        return f"{a.path} has the same run id {a.run_id!r} as {b.path}"
    if b.resumes and b.resumes in {a.run_id, a.path.stem}:
        return f"{b.path} resumed the run of {a.path} from its checkpoint"
    if a.resumes and a.resumes in {b.run_id, b.path.stem}:
        return f"{a.path} resumed the run of {b.path} from its checkpoint"
    return None


def drop_baseline_runs(group: Group, base: Group) -> None:
    """A run given both as RUNS and as BASELINE (a copy of a log, its run id, its resumed part) is no sample of both:
    it counts as baseline only, and group.merged says so."""
    kept = []
    for run in group.complete + group.left_out:
        why = next((w for b in base.complete + base.left_out if (w := same_run(run, b))), None)
        if why:
            group.merged.append(f"{why}, given as BASELINE: one run, counted as baseline only")
        else:
            kept.append(run)
    group.complete = [r for r in kept if r.status == "complete"]
    group.left_out = [r for r in kept if r.status != "complete"]


def merge_same_runs(group: Group) -> None:
    """Logs of one run count once: copies (the same bytes), logs with the same run id, and a run resumed from another's
    checkpoint (its log says 'resumed from ...: step S of run R'), which is not an independent sample of it. Each set
    keeps one log, a complete one if there is one, and group.merged says what was merged and why."""
    runs = group.complete + group.left_out
    relation = lambda a, i, b, j: same_run(a, b)  # noqa: E731

    parent = list(range(len(runs)))

    def root(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    for i in range(len(runs)):
        for j in range(i):
            if relation(runs[i], i, runs[j], j):
                parent[root(i)] = root(j)
    clusters: dict[int, list[int]] = {}
    for i in range(len(runs)):
        clusters.setdefault(root(i), []).append(i)
    keep_of = {}
    for members in clusters.values():
        keep = min(members, key=lambda i: (runs[i].status != "complete", runs[i].resumes is None, i))
        keep_of.update({i: keep for i in members if i != keep})
    for i, keep in sorted(keep_of.items()):
        why = relation(runs[i], i, runs[keep], keep) or f"{runs[i].path} belongs to the run of {runs[keep].path}"
        group.merged.append(f"{why}: one run, counted once, as {runs[keep].path}")
    group.complete = [r for i, r in enumerate(runs) if r.status == "complete" and i not in keep_of]
    group.left_out = [r for i, r in enumerate(runs) if r.status != "complete" and i not in keep_of]


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _difference(runs: list[RunLog], key, what: str) -> str | None:
    """'runs differ in <what>: ...' naming the runs that differ from the most common value, or None."""
    counts = Counter(key(run) for run in runs)
    if len(counts) < 2:
        return None
    common, count = counts.most_common(1)[0]
    odd = [f"{run.path.name} ({key(run)})" for run in runs if key(run) != common]
    shown = ", ".join(odd[:5]) + (f" and {len(odd) - 5} more" if len(odd) > 5 else "")
    return f"runs differ in {what}: {count} of {len(runs)} have {common}; the others: {shown}"


def _the_one(values: list):
    """The value all runs share, or None when they differ (or there are none)."""
    return values[0] if values and all(v == values[0] for v in values) else None


def group_flags(group: Group) -> list[str]:
    """What makes the group's runs not one experiment on one machine; each flag fails the claim."""
    runs = group.complete
    flags = [_difference(runs, lambda r: r.total_steps, "step count"),
             _difference(runs, lambda r: r.source_sha256[:12], "embedded source (sha256)"),
             _difference(runs, lambda r: r.hardware, "hardware"),
             _difference([r for r in runs if r.ranks], lambda r: r.ranks, "ranks (processes that trained)")]
    diverged = [run.path.name for run in group.left_out if run.status == "diverged"]
    if diverged:  # dropping a diverged run would flatter the mean
        flags.append(f"{_plural(len(diverged), 'run')} diverged (loss not finite): {', '.join(diverged)}")
    return [flag for flag in flags if flag]


def group_notes(group: Group) -> list[str]:
    """Differences worth a look that do not fail the claim."""
    runs = group.complete
    notes = [_difference(runs, lambda r: r.software, "software")]
    settings = [run.hyperparameters for run in runs if isinstance(run.hyperparameters, dict)]
    if len(settings) >= 2:  # seeds and run ids differ from run to run by design
        keys = sorted({key for s in settings for key in s if "seed" not in key.lower() and key.lower() != "run_id"})
        differ = [key for key in keys if len({json.dumps(s.get(key), sort_keys=True) for s in settings}) > 1]
        if differ:
            notes.append(f"runs differ in hyperparameters: {', '.join(differ)}")
    return [note for note in notes if note]


# -----------------------------------------------------------------------------
# Statistics


def one_sample_test(losses: np.ndarray, target: float) -> dict:
    """The record rule (docs/recipes.md#rules): one-sample one-sided t-test, H1: mean final val loss < target."""
    n = len(losses)
    if n < 2:
        note = f"{_plural(n, 'complete run')}; the t-test needs at least 2"
        return {"t_statistic": None, "df": None, "p_value": None, "p_value_note": note}
    if np.ptp(losses) == 0:
        note = "every final val loss is the same: the t-test is undefined"
        return {"t_statistic": None, "df": None, "p_value": None, "p_value_note": note}
    result = stats.ttest_1samp(losses, target, alternative="less")
    return {"t_statistic": float(result.statistic), "df": n - 1, "p_value": float(result.pvalue), "p_value_note": None}


def welch_test(a: np.ndarray, b: np.ndarray, alternative: str) -> tuple[float | None, float | None, float | None]:
    """Welch's t-test of mean(a) against mean(b): (t, df, p), or Nones when it cannot be computed."""
    if len(a) < 2 or len(b) < 2 or (np.ptp(a) == 0 and np.ptp(b) == 0):
        return None, None, None
    result = stats.ttest_ind(a, b, equal_var=False, alternative=alternative)
    return float(result.statistic), float(result.df), float(result.pvalue)


def summarize(group: Group, target: float) -> dict:
    runs = group.complete
    losses = np.array([run.final_val_loss for run in runs])
    times = np.array([run.train_time_ms for run in runs])
    n = len(runs)
    summary = {
        "n": n,
        "mean_val_loss": float(losses.mean()) if n else None,
        "std_val_loss": float(losses.std(ddof=1)) if n >= 2 else None,
        **one_sample_test(losses, target),
        "mean_train_time_ms": float(times.mean()) if n else None,
        "std_train_time_ms": float(times.std(ddof=1)) if n >= 2 else None,
        "median_train_time_ms": float(np.median(times)) if n else None,
        "min_train_time_ms": float(times.min()) if n else None,
        "max_train_time_ms": float(times.max()) if n else None,
        "steps": _the_one([run.total_steps for run in runs]),
        "hardware": _the_one([run.hardware for run in runs]),
        "software": _the_one([run.software for run in runs]),
        "source_sha256": _the_one([run.source_sha256 for run in runs]),
        "files": [str(run.path) for run in runs],
        "per_run": [{"file": str(run.path), "steps": run.total_steps, "final_val_loss": run.final_val_loss,
                     "train_time_ms": run.train_time_ms, "hardware": run.hardware, "software": run.software,
                     "source_sha256": run.source_sha256, "embedded_files": run.embedded_files, "ranks": run.ranks}
                    for run in runs],
        "merged": list(group.merged),
        "incomplete": [{"file": str(run.path), "status": run.status, "reason": run.reason} for run in group.left_out],
        "unreadable": [{"file": str(path), "reason": why} for path, why in group.unreadable],
        "flags": group_flags(group),
        "notes": group_notes(group),
    }
    return summary


def mean_val_by_step(runs: list[RunLog]) -> dict[int, tuple[float, float]]:
    """step -> (mean val loss, mean train time ms) over the runs, at the steps every one of them evaluated."""
    if not runs:
        return {}
    per_run = [{step: (loss, ms) for step, loss, ms in run.val} for run in runs]
    steps = sorted(set.intersection(*(set(d) for d in per_run)))
    return {s: (float(np.mean([d[s][0] for d in per_run])), float(np.mean([d[s][1] for d in per_run]))) for s in steps}


def compare(runs: Group, base: Group, runs_summary: dict, base_summary: dict) -> dict:
    """RUNS minus BASELINE: time (Welch), loss, and val loss at every step both groups evaluated."""
    a = np.array([run.train_time_ms for run in runs.complete])
    b = np.array([run.train_time_ms for run in base.complete])
    la = np.array([run.final_val_loss for run in runs.complete])
    lb = np.array([run.final_val_loss for run in base.complete])
    both = bool(len(a) and len(b))
    t, df, p = welch_test(a, b, alternative="less")
    _, _, p_two = welch_test(a, b, alternative="two-sided")
    _, _, p_loss = welch_test(la, lb, alternative="two-sided")
    time_note = None
    if p is None:
        time_note = ("Welch's t-test needs at least 2 complete runs in each group" if len(a) < 2 or len(b) < 2
                     else "no spread in either group's times: Welch's t-test is undefined")
    curve_a, curve_b = mean_val_by_step(runs.complete), mean_val_by_step(base.complete)
    by_step = [{"step": s, "runs_mean_val_loss": curve_a[s][0], "baseline_mean_val_loss": curve_b[s][0],
                "val_loss_diff": curve_a[s][0] - curve_b[s][0], "runs_mean_train_time_ms": curve_a[s][1],
                "baseline_mean_train_time_ms": curve_b[s][1], "train_time_diff_ms": curve_a[s][1] - curve_b[s][1]}
               for s in sorted(set(curve_a) & set(curve_b))]
    flags, notes = [], []
    hardware_a, hardware_b = runs_summary["hardware"], base_summary["hardware"]
    if hardware_a and hardware_b and hardware_a != hardware_b:  # mixed groups are flagged on their own
        flags.append(f"RUNS and BASELINE ran on different hardware: {hardware_a} vs {hardware_b} "
                     "(rule 4 asks for a baseline on the same hardware)")
    software_a, software_b = runs_summary["software"], base_summary["software"]
    if software_a and software_b and software_a != software_b:
        notes.append(f"RUNS used {software_a}; BASELINE used {software_b}")
    mean_a, mean_b = runs_summary["mean_train_time_ms"], base_summary["mean_train_time_ms"]
    return {
        "time_diff_ms": mean_a - mean_b if both else None,
        "time_diff_pct": 100 * (mean_a - mean_b) / mean_b if both else None,
        "speedup": mean_b / mean_a if both else None,
        "time_test": "Welch's t-test, one-sided: H1 the mean train time of RUNS is below BASELINE's",
        "time_t_statistic": t,
        "time_df": df,
        "time_p_value": p,
        "time_p_value_two_sided": p_two,
        "time_p_value_note": time_note,
        "loss_diff": runs_summary["mean_val_loss"] - base_summary["mean_val_loss"] if both else None,
        "loss_p_value_two_sided": p_loss,
        "by_step": by_step,
        "flags": flags,
        "notes": notes,
    }


# -----------------------------------------------------------------------------
# The verdict


def _headline(flag: str) -> str:
    """A flag's text before its details, for the one-line verdict; the report lists the details."""
    return flag.split(": ", 1)[0]


def decide(runs: dict, base: dict | None, comparison: dict | None, target: float, alpha: float) -> dict:
    reasons = []
    n, p, mean = runs["n"], runs["p_value"], runs["mean_val_loss"]
    loss_ok = p is not None and p < alpha
    where = ("" if mean is None else
             f" (the mean val loss {mean:.5f} is {'below' if mean < target else 'not below'} the target {target:g})")
    if n == 0:
        reasons.append("no complete run in RUNS")
    elif n < 2:
        reasons.append(f"too few runs: {runs['p_value_note']}{where}")
    elif p is None:
        reasons.append(f"no loss test: {runs['p_value_note']}{where}")
    elif mean >= target:
        reasons.append(f"the mean val loss {mean:.5f} is not below the target {target:g} (p = {p:.2g}, {n} runs)")
    elif not loss_ok:
        reasons.append(f"p = {p:.2g} is not below alpha = {alpha:g}: the mean val loss {mean:.5f} is not "
                       f"significantly below {target:g} with {n} runs")
    reasons += [f"RUNS: {_headline(flag)}" for flag in runs["flags"]]
    loss_part = (f"mean val loss {mean:.5f} < {target:g} with p = {p:.2g} < {alpha:g} over {n} runs" if loss_ok
                 else "")

    speed_ok, speed_part = None, "speed not tested (no --baseline)"
    if base is not None:
        diff, pt = comparison["time_diff_ms"], comparison["time_p_value"]
        speed_ok = diff is not None and diff < 0 and pt is not None and pt < alpha
        if base["n"] == 0:
            reasons.append("no complete run in BASELINE")
        reasons += [f"BASELINE: {_headline(flag)}" for flag in base["flags"]]
        reasons += [_headline(flag) for flag in comparison["flags"]]
        if diff is not None and diff >= 0:
            reasons.append(f"RUNS are not faster than BASELINE ({diff / 1000:+.3f} s)")
        elif diff is not None and pt is None:
            reasons.append(f"speed not tested: {comparison['time_p_value_note']}")
        elif diff is not None and not speed_ok:
            reasons.append(f"the time gain of {diff / 1000:+.3f} s is not significant: "
                           f"Welch one-sided p = {pt:.2g} is not below alpha = {alpha:g}")
        if speed_ok:
            speed_part = (f"RUNS are {-diff / 1000:.3f} s ({-comparison['time_diff_pct']:.2f}%) faster than BASELINE "
                          f"with Welch one-sided p = {pt:.2g}")
    holds = not reasons
    if holds:
        summary = f"the claim holds: {loss_part}; {speed_part}"
    else:
        summary = "the claim does NOT hold: " + "; ".join(reasons)
    return {"claim_holds": holds, "loss_test_passed": loss_ok, "speed_test_passed": speed_ok, "reasons": reasons,
            "summary": summary, "target": target, "alpha": alpha}


# -----------------------------------------------------------------------------
# The text report


def _seconds(ms: float | None) -> str:
    return "-" if ms is None else f"{ms / 1000:.3f} s"


def _number(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def format_group(name: str, s: dict, target: float) -> list[str]:
    left_out, unreadable, merged = len(s["incomplete"]), len(s["unreadable"]), len(s["merged"])
    out = [f"{name}: {_plural(s['n'], 'complete run')} ({left_out} left out, {unreadable} unreadable"
           + (f", {merged} merged into the run they belong to" if merged else "") + ")"]
    if s["per_run"]:
        width = max(len("file"), *(len(r["file"]) for r in s["per_run"]))
        out.append(f"  {'file':<{width}}  {'steps':>6}  {'val_loss':>8}  {'train_time':>11}  ranks")
        for r in s["per_run"]:
            out.append(f"  {r['file']:<{width}}  {r['steps']:>6}  {r['final_val_loss']:>8.4f}  "
                       f"{_seconds(r['train_time_ms']):>11}  {r['ranks'] or 'not logged'}")
        if s["p_value"] is not None:
            test = (f"t = {s['t_statistic']:.3f}  df = {s['df']}  p = {s['p_value']:.2g}  "
                    f"(one-sided, H1: mean < {target:g})")
        else:
            test = f"no p-value: {s['p_value_note']}"
        out.append(f"  val_loss    mean {s['mean_val_loss']:.5f}  std {_number(s['std_val_loss'], '.5f')}  {test}")
        out.append(f"  train_time  mean {_seconds(s['mean_train_time_ms'])}"
                   f"  median {_seconds(s['median_train_time_ms'])}"
                   f"  min {_seconds(s['min_train_time_ms'])}  max {_seconds(s['max_train_time_ms'])}"
                   f"  std {_seconds(s['std_train_time_ms'])}")
        source = s["source_sha256"][:12] if s["source_sha256"] else "differs (see FLAG)"
        out.append(f"  steps {s['steps'] or 'differ (see FLAG)'} | source {source} | "
                   f"{s['hardware'] or 'hardware differs (see FLAG)'}")
        out.append(f"  software {s['software'] or 'differs (see note)'}")
    out += [f"  left out ({r['status']}): {r['file']}: {r['reason']}" for r in s["incomplete"]]
    out += [f"  unreadable: {r['file']}: {r['reason']}" for r in s["unreadable"]]
    out += [f"  merged: {m}" for m in s["merged"]]
    out += [f"  FLAG: {flag}" for flag in s["flags"]]
    out += [f"  note: {note}" for note in s["notes"]]
    return out


def format_comparison(c: dict, runs: dict, base: dict) -> list[str]:
    out = ["RUNS vs BASELINE"]
    if c["time_diff_ms"] is None:
        return out + ["  nothing to compare: a group has no complete run"]
    if c["time_p_value"] is not None:
        test = (f"Welch t = {c['time_t_statistic']:.3f}  df = {c['time_df']:.1f}  p = {c['time_p_value']:.2g} "
                f"(one-sided, H1: RUNS faster); two-sided p = {c['time_p_value_two_sided']:.2g}")
    else:
        test = f"Welch: {c['time_p_value_note']}"
    out.append(f"  train_time  {c['time_diff_ms'] / 1000:+.3f} s ({c['time_diff_pct']:+.2f}%, "
               f"speedup {c['speedup']:.4f}x)")
    out.append(f"              {test}")
    p_loss = c["loss_p_value_two_sided"]
    loss_test = "" if p_loss is None else f"  Welch two-sided p = {p_loss:.2g}"
    out.append(f"  val_loss    {c['loss_diff']:+.5f} ({runs['mean_val_loss']:.5f} vs {base['mean_val_loss']:.5f})"
               f"{loss_test}")
    if not c["by_step"]:
        out.append("  no step was evaluated by every complete run of both groups")
    else:
        out.append("  by step, means over complete runs:")
        out.append(f"  {'step':>7}  {'loss RUNS':>10}  {'BASELINE':>10}  {'diff':>8}  "
                   f"{'time RUNS':>11}  {'BASELINE':>11}  {'diff':>9}")
        for r in c["by_step"]:
            out.append(f"  {r['step']:>7}  {r['runs_mean_val_loss']:>10.4f}  {r['baseline_mean_val_loss']:>10.4f}  "
                       f"{r['val_loss_diff']:>+8.4f}  {_seconds(r['runs_mean_train_time_ms']):>11}  "
                       f"{_seconds(r['baseline_mean_train_time_ms']):>11}  {r['train_time_diff_ms'] / 1000:>+7.3f} s")
    out += [f"  FLAG: {flag}" for flag in c["flags"]]
    out += [f"  note: {note}" for note in c["notes"]]
    return out


def format_report(report: dict) -> str:
    target = report["verdict"]["target"]
    out = format_group("RUNS", report["runs"], target) + [""]
    if report["baseline"] is not None:
        out += format_group("BASELINE", report["baseline"], target) + [""]
        out += format_comparison(report["comparison"], report["runs"], report["baseline"]) + [""]
    out.append(f"VERDICT: {report['verdict']['summary']}")
    return "\n".join(out)


def _json_safe(x):
    """NaN and inf are not JSON: they become null."""
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_json_safe(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


# -----------------------------------------------------------------------------
# The optimization track (docs/recipes.md#the-optimization-track): the model, data and batch are frozen, steps count.

TRACK_SIGMA_BOUND = 0.004  # (3.28 - mean) * sqrt(n) >= 0.004: a one-sided z-test with sigma 0.0013 at p < 0.001
TRACK_LOSS_PER_100_STEPS = 0.0045  # the pairwise rule's exchange rate: 100 fewer steps are worth this much loss
TRACK_SETTINGS = dict(track="optimization", num_layers=12, model_dim=768, num_heads=6, head_dim=128, mlp_hidden=3072,
                      vocab_size=50304, context_len=1024, val_tokens=10_485_760, attn_scale=0.12, logit_softcap=15.0,
                      logit_softcap_fn="algebraic", norm_gain=True, head_bias=True, linear_bias=True, residual="plain")
TRACK_TOKENS_PER_STEP = 524_288


def track_refusal(run: RunLog) -> str | None:
    """Why a log is not a run of --preset=optimization_track with its frozen settings; None when it is one."""
    h = run.hyperparameters
    if h is None or h.get("track") != "optimization":
        return "not a run of --preset=optimization_track (its hyperparameters do not say track=optimization)"
    changed = [f"{k}={h.get(k)!r} (the track's: {v!r})" for k, v in TRACK_SETTINGS.items() if h.get(k) != v]
    tokens = h.get("windows_per_step", 0) * sum(int(n) for n in str(h.get("train_seq_len", 0)).split(",")[:1])
    if tokens != TRACK_TOKENS_PER_STEP:
        changed.append(f"{tokens:,} tokens per step (the track's: {TRACK_TOKENS_PER_STEP:,})")
    return f"changed a frozen setting: {', '.join(changed)}" if changed else None


def track_result(runs: list[RunLog]) -> dict:
    """The earliest step, evaluated by every run, whose mean val loss over the n runs meets (3.28 - mean) * sqrt(n) >=
    0.004; the final step when none does (valid: false)."""
    n = len(runs)
    common = sorted(set.intersection(*({step for step, _, _ in run.val} for run in runs)))
    rows = []
    for step in common:
        mean = float(np.mean([next(loss for s, loss, _ in run.val if s == step) for run in runs]))
        rows.append(dict(step=step, mean_val_loss=mean, statistic=(3.28 - mean) * math.sqrt(n)))
    valid = [r for r in rows if r["statistic"] >= TRACK_SIGMA_BOUND]
    last = rows[-1] if rows else dict(step=None, mean_val_loss=math.nan, statistic=-math.inf)  # no common step
    return dict(valid[0] if valid else last, valid=bool(valid), n=n)


def optimization_track(runs: Group, base: Group | None) -> dict:
    refused = [(str(run.path), why) for run in runs.complete + (base.complete if base else [])
               if (why := track_refusal(run))]
    report = dict(refused=refused, left_out=[(str(r.path), r.reason) for r in runs.left_out],
                  unreadable=[(str(p), why) for p, why in runs.unreadable], runs=None, baseline=None, pairwise=None)
    diverged = [r for r in runs.left_out if r.status == "diverged"]  # every run counts: none may quietly drop out
    if refused or diverged or not runs.complete or (base is not None and not base.complete):
        why = ("logs refused" if refused else f"{_plural(len(diverged), 'run')} diverged" if diverged else
               "no complete run" + (" in RUNS" if runs.complete == [] else " in BASELINE"))
        return dict(report, holds=False, summary=f"claim does not hold: {why}")
    report["runs"] = ours = track_result(runs.complete)
    holds, summary = ours["valid"], (
        f"valid at step {ours['step']}: mean val loss {ours['mean_val_loss']:.4f} over {ours['n']} runs, (3.28 - mean)"
        f" * sqrt(n) = {ours['statistic']:.4f} >= {TRACK_SIGMA_BOUND}" if ours["valid"] else
        f"not valid: at the last step evaluated by every run ({ours['step']}), (3.28 - {ours['mean_val_loss']:.4f}) *"
        f" sqrt({ours['n']}) = {ours['statistic']:.4f} < {TRACK_SIGMA_BOUND}")
    if base is not None and ours["step"] is not None and track_result(base.complete)["step"] is not None:
        report["baseline"] = theirs = track_result(base.complete)
        gain = (theirs["mean_val_loss"] - ours["mean_val_loss"]
                + (theirs["step"] - ours["step"]) / 100 * TRACK_LOSS_PER_100_STEPS)
        statistic = gain / math.sqrt(1 / ours["n"] + 1 / theirs["n"])
        report["pairwise"] = dict(statistic=statistic, holds=statistic >= TRACK_SIGMA_BOUND)
        holds = holds and statistic >= TRACK_SIGMA_BOUND
        summary += (f"; against the baseline (step {theirs['step']}, mean {theirs['mean_val_loss']:.4f}, n="
                    f"{theirs['n']}): (dloss + dsteps/100 * {TRACK_LOSS_PER_100_STEPS}) / sqrt(1/n1 + 1/n2) = "
                    f"{statistic:.4f} {'>=' if statistic >= TRACK_SIGMA_BOUND else '<'} {TRACK_SIGMA_BOUND}")
    return dict(report, holds=holds, summary=("claim holds: " if holds else "claim does not hold: ") + summary)


def format_track_report(report: dict) -> str:
    out = [f"refused {path}: {why}" for path, why in report["refused"]]
    out += [f"left out {path}: {why}" for path, why in report["left_out"] + report["unreadable"]]
    return "\n".join(out + [f"VERDICT (optimization track): {report['summary']}"])


# -----------------------------------------------------------------------------
# The plot


def build_plot(groups: list[tuple[str, list[RunLog]]], target: float, title: str):
    """A matplotlib figure: val loss against train time and against step, every complete run in a colour of its own
    (RUNS solid with dots, BASELINE dashed with squares), named in the legend with its final loss and time, the target
    as a dashed line. The bottom row zooms in on the end of training, where the claim is decided."""
    import matplotlib

    matplotlib.use("Agg")  # write files; no display needed
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(16, 9))
    count = sum(len(runs) for _, runs in groups)
    palette = plt.get_cmap("tab10" if count <= 10 else "tab20")
    colors = ([palette(i) for i in range(count)] if count <= 20
              else [plt.get_cmap("turbo")(x) for x in np.linspace(0.03, 0.97, count)])
    curves = []  # (x by time in s, x by step, loss) per run, for the zoom
    handles = []
    for (label, runs), (ls, marker) in zip(groups, (("-", "o"), ("--", "s"))):
        for run in runs:
            steps, losses, ms = (np.array(column, dtype=float) for column in zip(*run.val))
            style = dict(color=colors[len(handles)], ls=ls, marker=marker, lw=1, alpha=0.8, ms=2.5)
            for row in axes:
                row[0].plot(ms / 1000, losses, **style)
                row[1].plot(steps, losses, **style)
            name = f"{label}: {run.path.name} ({run.final_val_loss:.4f}, {run.train_time_ms / 1000:.1f} s)"
            handles.append(matplotlib.lines.Line2D([], [], label=name, **style))
            curves.append((ms / 1000, steps, losses))
    for ax in axes.flat:
        ax.axhline(target, color="crimson", ls="--", lw=1.2)
        ax.grid(alpha=0.3)
        ax.set_ylabel("val loss")
    handles.append(matplotlib.lines.Line2D([], [], color="crimson", ls="--", lw=1.2, label=f"target {target:g}"))
    for row in axes:
        row[0].set_xlabel("train time (s)")
        row[1].set_xlabel("step")
    axes[0, 0].set_title("val loss vs train time")
    axes[0, 1].set_title("val loss vs step")
    axes[1, 0].set_title("close-up on the end of training")
    axes[1, 1].set_title("close-up on the end of training")

    finite = [c for c in curves if np.isfinite(c[2][-1])]
    if finite:
        finals = [c[2][-1] for c in finite] + [target]
        span = max(max(finals) - min(finals), 0.01)
        y_low, y_high = min(finals) - 0.5 * span, max(finals) + 1.5 * span
        # x: from the first point inside the y window to the end; at least 3% of the time axis (final times differ)
        # and 15% of the step axis (final steps are usually all the same).
        for col, least in ((0, 0.03), (1, 0.15)):
            xs = np.concatenate([c[col] for c in finite])
            near = np.concatenate([c[col][c[2] <= y_high] for c in finite])
            x_last = xs.max()
            width = max(x_last - (near.min() if len(near) else xs.min()), least * (x_last - xs.min()), 1e-9)
            axes[1, col].set_xlim(x_last - 1.1 * width, x_last + 0.1 * width)
            axes[1, col].set_ylim(y_low, y_high)
    else:
        for ax in axes.flat:
            ax.text(0.5, 0.5, "no complete runs", ha="center", va="center", transform=ax.transAxes)
    columns = 1 + len(handles) // 46  # about 45 names fit the height in one column
    fig.suptitle("\n".join(textwrap.fill(part, 150) for part in title.split("; ")), fontsize=10)
    legend = fig.legend(handles=handles, loc="center right", fontsize=7, ncol=columns, title_fontsize=7,
                        title="final val loss, train time")
    fig.canvas.draw()  # the legend's width is known once drawn: the plots take the rest
    fig.tight_layout(rect=(0, 0, 1 - legend.get_window_extent().width / fig.bbox.width - 0.01, 1))
    return fig


def write_plot(path: str | Path, groups: list[tuple[str, list[RunLog]]], target: float, title: str) -> None:
    """Writes build_plot's figure as a PNG."""
    import matplotlib.pyplot as plt

    fig = build_plot(groups, target, title)
    try:
        fig.savefig(path, dpi=100, format="png")
    finally:
        plt.close(fig)


# -----------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="records/compare.py",
        description="Summarize speedrun logs and test a record claim (docs/recipes.md#rules): mean final val loss "
                    "below --target with a one-sided t-test p < --alpha and, with --baseline, faster than the baseline "
                    "with a one-sided Welch p < --alpha, on the same hardware.",
        epilog="Exit status: 0 the claim holds; 1 it does not (the verdict line says why); 2 bad arguments or no "
               "logs found. Folders are searched recursively for *.txt logs; a log given both as RUNS and as "
               "--baseline counts as baseline only. Give --baseline after RUNS.")
    parser.add_argument("runs", nargs="+", metavar="RUNS", help="log files or folders of the claimed record")
    parser.add_argument("--baseline", nargs="+", metavar="RUNS", help="log files or folders of the baseline")
    parser.add_argument("--target", type=float, default=3.28, help="val loss to beat (default: %(default)s)")
    parser.add_argument("--alpha", type=float, default=0.01, help="significance level (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the text report")
    parser.add_argument("--track", choices=("time", "optimization"), default="time", help="time: the record rule "
                        "above; optimization: the optimization track's rule on steps, (3.28 - mean) * sqrt(n) >= "
                        "0.004 and, with --baseline, the pairwise rule (docs/recipes.md#judging-a-claim)")
    parser.add_argument("--plot", metavar="FILE.png", help="write a PNG of val loss against train time and step")
    return parser


def given_twice(parser: argparse.ArgumentParser, args: list[str]) -> str | None:
    """'--name is given twice (a, then b)...' for the first single-valued option args give twice, else None."""
    seen: dict[argparse.Action, list[str]] = {}
    for i, arg in enumerate(args):
        if arg == "--":
            break
        name, eq, value = arg.partition("=")
        if not eq:  # --name VALUE, or a bare --name (nargs="?")
            value = args[i + 1] if i + 1 < len(args) and not args[i + 1].startswith("-") else arg
        matches = [a for s, a in parser._option_string_actions.items() if s == name or
                   (parser.allow_abbrev and name.startswith("--") and len(name) > 2 and s.startswith(name))]
        if len({id(a) for a in matches}) != 1 or not isinstance(matches[0], argparse._StoreAction):
            continue
        seen.setdefault(matches[0], []).append(value)
        if len(seen[matches[0]]) == 2:
            values = ", then ".join(seen[matches[0]])
            return (f"{matches[0].option_strings[-1]} is given twice ({values}): which one is meant? HINT: give each "
                    "option once")
    return None


class ArgumentParser(argparse.ArgumentParser):
    """A bad command line is one line, as in every tool of the project (its cli_parser.py, written here again so that
    this file stands alone), with exit status EXIT_USAGE: 1 means that a claim does not hold."""

    def parse_known_args(self, args=None, namespace=None):
        twice = given_twice(self, sys.argv[1:] if args is None else list(args))
        if twice:
            self.error(twice)
        return super().parse_known_args(args, namespace)

    def error(self, message: str):
        hint = "" if "HINT:" in message else f". HINT: `{self.prog} --help` lists every option"
        print(f"{self.prog}: error: {message}{hint}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not math.isfinite(args.target):
        parser.error(f"--target must be a finite number, got {args.target}")
    if not 0 < args.alpha < 1:
        parser.error(f"--alpha must be between 0 and 1 (the rules use 0.01), got {args.alpha}")
    if args.plot:
        if Path(args.plot).suffix.lower() != ".png":
            parser.error(f"--plot writes a PNG: give a file name ending in .png, got {args.plot}")
        if not Path(args.plot).parent.is_dir():
            parser.error(f"--plot: folder {Path(args.plot).parent} does not exist")
    try:
        run_repeats, base_repeats = [], []
        run_paths = find_logs(args.runs, run_repeats)
        base_paths = find_logs(args.baseline, base_repeats) if args.baseline else None
    except UsageError as e:
        parser.error(str(e))

    moved = []
    if base_paths is not None:  # e.g. RUNS = a record folder, --baseline = its baseline/ sub-folder
        in_baseline = {p.resolve() for p in base_paths}
        moved = [p for p in run_paths if p.resolve() in in_baseline]
        run_paths = [p for p in run_paths if p.resolve() not in in_baseline]
        if not base_paths:
            parser.error(f"no .txt logs found in --baseline {' '.join(args.baseline)}")
    if not run_paths:
        parser.error(f"no .txt logs found in RUNS {' '.join(args.runs)}"
                     + (" (besides those given as --baseline)" if moved else ""))

    runs = load_group("RUNS", run_paths)
    base = load_group("BASELINE", base_paths) if base_paths is not None else None
    runs.merged[:0] = run_repeats
    if base is not None:
        base.merged[:0] = base_repeats
    if base is not None:
        drop_baseline_runs(runs, base)
        if not runs.complete + runs.left_out + runs.unreadable:
            parser.error(f"every log in RUNS {' '.join(args.runs)} is a run given as --baseline too")
    if args.track == "optimization":
        report = optimization_track(runs, base)
        print(json.dumps(_json_safe(report), indent=2) if args.json else format_track_report(report))
        return EXIT_HOLDS if report["holds"] else EXIT_FAILS
    runs_summary = summarize(runs, args.target)
    if moved:
        runs_summary["notes"].append(f"{_plural(len(moved), 'log')} given both as RUNS and as --baseline "
                                     "counted as baseline only")
    base_summary = summarize(base, args.target) if base else None
    comparison = compare(runs, base, runs_summary, base_summary) if base else None
    verdict = decide(runs_summary, base_summary, comparison, args.target, args.alpha)
    report = {"runs": runs_summary, "baseline": base_summary, "comparison": comparison, "verdict": verdict}

    if args.json:
        print(json.dumps(_json_safe(report), indent=2, allow_nan=False))
    else:
        print(format_report(report))
    if args.plot:
        groups = [("RUNS", runs.complete)] + ([("BASELINE", base.complete)] if base else [])
        try:
            write_plot(args.plot, groups, args.target, verdict["summary"])
        except OSError as e:
            print(f"records/compare.py: error: cannot write the plot {args.plot}: {e.strerror or e}", file=sys.stderr)
            return EXIT_USAGE
        print(f"plot written to {args.plot}", file=sys.stderr if args.json else sys.stdout)
    return EXIT_HOLDS if verdict["claim_holds"] else EXIT_FAILS


if __name__ == "__main__":
    sys.exit(main())
