"""Tests for records/compare.py: reading logs, the record statistics, the verdict, JSON, text and plot output.

The logs under tests/records_fixtures/ are hand-made in the log layout (make_fixtures.py writes them; README.md there
says what each folder holds). The statistics they must give are worked out here from the numbers written into them,
and p-values are checked against our own Student-t CDF (numerical integration), not against the scipy call the tool
makes. Drop real smoke logs from our trainer into tests/records_fixtures/golden/ and test_golden_smoke_logs reads them.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "records_fixtures"
TOOL = REPO / "records" / "compare.py"

_spec = importlib.util.spec_from_file_location("records_compare", TOOL)
compare = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = compare  # dataclasses look their module up while the file runs
_spec.loader.exec_module(compare)

# The final (val loss, train time ms) written into each fixture folder by make_fixtures.py.
CLAIM = [(3.2770, 5000), (3.2775, 5100), (3.2780, 5200), (3.2785, 5400)]
BASELINE = [(3.2779, 5600), (3.2781, 5650), (3.2786, 5750)]
WEAK = [(3.2770, 4000), (3.2780, 4100), (3.2790, 4200)]


# -----------------------------------------------------------------------------
# Independent statistics: Student's t CDF by numerical integration, t statistics by hand


def student_t_cdf(t: float, df: float, points: int = 200_001) -> float:
    """P(T <= t) for Student's t with df degrees of freedom, by Simpson's rule. With x = sqrt(df) tan(theta) the
    density becomes Gamma((df+1)/2) / (sqrt(pi) Gamma(df/2)) cos(theta)^(df-1) on (-pi/2, pi/2): a finite, smooth
    integral for df >= 1."""
    upper = math.atan(t / math.sqrt(df))
    theta = np.linspace(-math.pi / 2, upper, points)
    f = np.cos(theta) ** (df - 1)
    h = (upper + math.pi / 2) / (points - 1)
    integral = h / 3 * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum())
    return math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(math.pi) * integral


def one_sample_p(xs, target):
    """(t, p) of the one-sided one-sample t-test, H1: mean < target, from its definition (docs/recipes.md#rules)."""
    n = len(xs)
    mean = sum(xs) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    t = (mean - target) / (std / math.sqrt(n))
    return t, student_t_cdf(t, n - 1)


def welch_p(a, b):
    """(t, df, one-sided p) of Welch's t-test, H1: mean(a) < mean(b), from the Welch-Satterthwaite formulas."""
    va, vb = np.var(a, ddof=1) / len(a), np.var(b, ddof=1) / len(b)
    t = (np.mean(a) - np.mean(b)) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return t, df, student_t_cdf(t, df)


def test_independent_cdf_matches_closed_forms():
    # df = 1 is the Cauchy law, df = 2 has F(t) = 1/2 + t / (2 sqrt(2 + t^2)): checks the helper itself.
    for t in (-3.0, -0.5, 0.0, 1.2):
        assert student_t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, rel=1e-6)
        assert student_t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), rel=1e-9)


# -----------------------------------------------------------------------------
# Helpers


def run_tool(*args: str | Path, capsys) -> tuple[int, str]:
    code = compare.main([str(a) for a in args])
    return code, capsys.readouterr().out


def run_json(*args: str | Path, capsys) -> tuple[int, dict]:
    code, out = run_tool(*args, "--json", capsys=capsys)

    def no_nan(name):
        raise AssertionError(f"JSON output holds {name}")

    return code, json.loads(out, parse_constant=no_nan)


def names(paths) -> list[str]:
    return sorted(Path(p).name for p in paths)


# -----------------------------------------------------------------------------
# Reading one log


@pytest.mark.parametrize("line, expected", [
    ("step:0/1695 val_loss:10.8258 train_time:0ms step_avg:0.03ms", (0, 1695, 10.8258, 0.0)),
    ("step:1/1695 train_time:80ms step_avg:80.00ms", (1, 1695, None, 80.0)),
    ("step:7/40 train_time:872ms step_avg:124.57ms train_loss:7.6048 tokens_per_s:131072", (7, 40, None, 872.0)),
    ("step:3/3200 train_loss:9.9528 train_time:3899ms step_avg:nanms", (3, 3200, None, 3899.0)),
    ("step:40/40 val_loss:nan train_time:5000ms step_avg:125.00ms", (40, 40, math.nan, 5000.0)),
    ("step:5/9 val_loss:3.5 train_time:12.5ms", (5, 9, 3.5, 12.5)),
])
def test_step_lines(line, expected):
    got = compare.parse_step_line(line)
    assert got[:2] == expected[:2] and got[3] == expected[3]
    if expected[2] is not None and math.isnan(expected[2]):
        assert math.isnan(got[2])
    else:
        assert got[2] == expected[2]


@pytest.mark.parametrize("line", [
    "step:12/40 train_time:??ms step_avg:??ms",  # garbled time
    "step:12/40 step_avg:3.00ms",  # no train_time
    "step:12/40 val_loss:3.2x train_time:5ms",  # garbled loss
    "step:12/40 train_time:1234",  # no unit: a cut-off line
    "step:12 train_time:5ms",  # no total
    "steps:12/40 train_time:5ms",
])
def test_bad_step_lines_are_refused(line):
    with pytest.raises(ValueError):
        compare.parse_step_line(line)


def test_reads_our_log():
    run = compare.read_log(FIXTURES / "claim" / "run_a.txt")
    assert run.status == "complete" and run.reason == ""
    assert run.total_steps == 40
    assert [step for step, _, _ in run.val] == [0, 10, 20, 30, 40]
    assert (run.final_val_loss, run.train_time_ms) == CLAIM[0]
    assert run.hardware == "CPU: AMD EPYC 7B13 (2 cores)"
    assert run.software == "Python 3.12.3, PyTorch 2.13.0+cpu"
    assert run.hyperparameters["num_iterations"] == 40 and run.hyperparameters["preset"] == "smoke"
    assert run.embedded_files == []


def test_reads_reference_log_2025():
    run = compare.read_log(FIXTURES / "reference" / "020630eb-style-2025-08-23.txt")
    assert run.status == "complete"
    assert run.total_steps == 1695
    assert [step for step, _, _ in run.val] == list(range(0, 1695, 125)) + [1695]
    assert run.val[1] == (125, 4.6543, 11781.0)  # the record's example lines (docs/recipes.md#published-figures)
    assert (run.final_val_loss, run.train_time_ms) == (3.2772, 168938.0)
    assert run.hardware == "8x NVIDIA H100 80GB HBM3"
    assert run.software == "Python 3.10.12, PyTorch 2.9.0.dev20250713+cu126, Triton 3.4.0, driver 570.148.08"
    assert run.hyperparameters is None


def test_reads_reference_log_2024():
    # "Running pytorch ...", a "nvidia-smi:" line, train_loss before train_time, step_avg:nanms early on
    run = compare.read_log(FIXTURES / "reference" / "05b29e54-style-2024-11.txt")
    assert run.status == "complete"
    assert run.total_steps == 100
    assert [step for step, _, _ in run.val] == [0, 25, 50, 75, 100]
    assert run.final_val_loss == 3.2790
    assert run.hardware == "8x NVIDIA H100 80GB HBM3"
    assert run.software == "PyTorch 2.5.1+cu124, driver 555.42.06"


def test_embedded_files_and_source_hash():
    this_pr = sorted((FIXTURES / "fp8_record" / "this_pr").glob("*.txt"))
    baseline = sorted((FIXTURES / "fp8_record" / "baseline").glob("*.txt"))
    runs = [compare.read_log(p) for p in this_pr[:2] + baseline[:1]]
    assert runs[0].embedded_files == ["triton_kernels.py", "dc_triton_kernels.py"]
    assert runs[0].source_sha256 == runs[1].source_sha256 != runs[2].source_sha256
    text = this_pr[0].read_text()
    source = text[:text.index("=" * 100)].rstrip("\n")
    assert runs[0].source_sha256 == __import__("hashlib").sha256(source.encode()).hexdigest()


def test_a_line_of_equals_inside_the_source_is_not_the_separator(tmp_path):
    rule = "=" * 100
    log = tmp_path / "run.txt"
    log.write_text("\n".join(['"""docstring', rule, 'end of docstring"""', "print(1)", rule,
                              "Running Python 3.12.3", "Running PyTorch 2.11.0", "CPU: test (1 cores)", rule,
                              "step:0/2 val_loss:10.0000 train_time:0ms step_avg:0.00ms",
                              "step:1/2 train_time:10ms step_avg:10.00ms", "step:2/2 train_time:20ms step_avg:10.00ms",
                              "step:2/2 val_loss:3.5000 train_time:21ms step_avg:10.50ms"]) + "\n")
    run = compare.read_log(log)
    assert run.status == "complete" and run.final_val_loss == 3.5 and run.hardware == "CPU: test (1 cores)"
    assert run.software == "Python 3.12.3, PyTorch 2.11.0"


def test_hardware_without_an_nvidia_smi_table():
    # our trainer's fallback when nvidia-smi cannot run; a log with neither table nor CPU line is "unknown"
    assert compare.describe_hardware(["nvidia-smi: not available; GPU: NVIDIA H200"]) == "GPU: NVIDIA H200"
    assert compare.describe_hardware(["Running Python 3.12.3", "nvidia-smi: not available"]) == "unknown"


@pytest.mark.parametrize("name, status, reason", [
    ("crashed.txt", "incomplete", "last val line at step 20/40; the log stops at step 27"),
    ("running.txt", "incomplete", "last val line at step 20/40; the log stops at step 23 (its last line is cut off)"),
    ("env_only.txt", "incomplete", "environment block"),
    ("no_output.txt", "incomplete", "no step lines"),
    ("diverged.txt", "diverged", "final val loss is nan"),
    # our trainer's 'stopped: <why>' line gives the reason (its HINT is for the terminal, not for the report)
    ("stopped_nan.txt", "diverged", "stopped: validation loss is nan at step 20 (last val line at step 20/40; "),
    ("stopped_interrupted.txt", "incomplete",
     "stopped: interrupted (last val line at step 10/40; the log stops at step 13)"),
])
def test_incomplete_logs(name, status, reason):
    run = compare.read_log(FIXTURES / "broken" / name)
    assert run.status == status
    assert reason in run.reason
    assert "HINT" not in run.reason


def _line_number(path: Path, needle: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), start=1) if needle in line)


@pytest.mark.parametrize("name, message", [
    ("not_a_log.txt", "no line of 100 '='"),
    ("empty.txt", "empty"),
    ("binary.txt", "not UTF-8"),
    ("bad_step.txt", "line {n}: no train_time"),
    ("total_changes.txt", "line {n}: total steps 50 differs from 40"),
    ("bad_hyperparameters.txt", "line {n}: the hyperparameters line is not valid JSON"),
])
def test_malformed_logs_say_what_and_where(name, message):
    path = FIXTURES / "broken" / name
    needle = {"bad_step.txt": "??ms", "total_changes.txt": "/50 ", "bad_hyperparameters.txt": "hyperparameters:"}
    if name in needle:
        message = message.format(n=_line_number(path, needle[name]))
    with pytest.raises(compare.LogError, match=re.escape(message)):
        compare.read_log(path)


def test_missing_file_is_a_log_error(tmp_path):
    with pytest.raises(compare.LogError, match="cannot read"):
        compare.read_log(tmp_path / "gone.txt")


# -----------------------------------------------------------------------------
# Statistics with known answers


def test_claim_statistics_from_hand_computation(capsys):
    code, report = run_json(FIXTURES / "claim", capsys=capsys)
    runs = report["runs"]
    losses = [x for x, _ in CLAIM]
    assert runs["n"] == 4
    assert runs["mean_val_loss"] == pytest.approx(3.27775, abs=1e-12)
    assert runs["std_val_loss"] == pytest.approx(math.sqrt(1.25e-6 / 3), rel=1e-9)  # deviations +-0.00075, +-0.00025
    t, p = one_sample_p(losses, 3.28)
    assert runs["t_statistic"] == pytest.approx(t, rel=1e-9)
    assert runs["df"] == 3
    assert runs["p_value"] == pytest.approx(p, rel=1e-6)
    assert (runs["mean_train_time_ms"], runs["median_train_time_ms"]) == (5175.0, 5150.0)
    assert (runs["min_train_time_ms"], runs["max_train_time_ms"]) == (5000.0, 5400.0)
    assert runs["std_train_time_ms"] == pytest.approx(math.sqrt(87500 / 3), rel=1e-12)
    assert runs["steps"] == 40
    assert names(runs["files"]) == ["run_a.txt", "run_b.txt", "run_c.txt", "run_d.txt"]  # more/ is searched too
    assert [(Path(r["file"]).name, r["status"]) for r in runs["incomplete"]] == [("crashed.txt", "incomplete")]
    assert runs["unreadable"] == []  # notes.md is not a log
    assert runs["flags"] == [] and runs["notes"] == []  # seeds differ by design
    assert report["baseline"] is None and report["comparison"] is None
    assert report["verdict"]["claim_holds"] is True and code == compare.EXIT_HOLDS
    assert report["verdict"]["speed_test_passed"] is None


def test_df2_closed_form_and_alpha(capsys):
    # WEAK: mean 3.2780, std 0.0010, so t = -0.002 / (0.001 / sqrt 3) = -2 sqrt 3 and, with df = 2,
    # p = 1/2 + t / (2 sqrt(2 + t^2)) = 1/2 - sqrt(3/14) ~ 0.0371.
    code, report = run_json(FIXTURES / "weak", capsys=capsys)
    assert report["runs"]["t_statistic"] == pytest.approx(-2 * math.sqrt(3), rel=1e-9)
    assert report["runs"]["p_value"] == pytest.approx(0.5 - math.sqrt(3 / 14), rel=1e-9)
    assert code == compare.EXIT_FAILS
    verdict = report["verdict"]
    assert not verdict["claim_holds"] and not verdict["loss_test_passed"]
    assert verdict["reasons"] == ["p = 0.037 is not below alpha = 0.01: the mean val loss 3.27800 is not significantly "
                                  "below 3.28 with 3 runs"]
    code, report = run_json(FIXTURES / "weak", "--alpha", "0.05", capsys=capsys)
    assert code == compare.EXIT_HOLDS and report["verdict"]["claim_holds"]
    code, report = run_json(FIXTURES / "weak", "--target", "3.2775", capsys=capsys)  # mean above the target
    assert code == compare.EXIT_FAILS
    assert report["verdict"]["reasons"][0].startswith("the mean val loss 3.27800 is not below the target 3.2775")


def test_two_runs_cauchy_closed_form():
    # n = 2 gives df = 1, where the t law is Cauchy: P(T <= t) = 1/2 + atan(t) / pi.
    losses = np.array([3.2770, 3.2785])
    t = (losses.mean() - 3.28) / (losses.std(ddof=1) / math.sqrt(2))
    result = compare.one_sample_test(losses, 3.28)
    assert result["df"] == 1
    assert result["p_value"] == pytest.approx(0.5 + math.atan(t) / math.pi, rel=1e-9)


def test_no_p_value_without_two_distinct_losses():
    assert "at least 2" in compare.one_sample_test(np.array([3.27]), 3.28)["p_value_note"]
    assert compare.one_sample_test(np.array([]), 3.28)["p_value"] is None
    same = compare.one_sample_test(np.array([3.2770, 3.2770, 3.2770]), 3.28)
    assert same["p_value"] is None and "the same" in same["p_value_note"]


def test_single_run_is_too_few(capsys):
    code, report = run_json(FIXTURES / "single", capsys=capsys)
    assert code == compare.EXIT_FAILS
    assert report["runs"]["n"] == 1 and report["runs"]["p_value"] is None and report["runs"]["std_val_loss"] is None
    assert report["verdict"]["reasons"][0] == ("too few runs: 1 complete run; the t-test needs at least 2 (the mean "
                                               "val loss 3.27000 is below the target 3.28)")


def test_identical_losses_say_where_the_mean_stands(tmp_path, capsys):
    """No t-test without spread, but the verdict still says whether the mean is below the target."""
    for name in ("a.txt", "b.txt", "c.txt"):
        text = (FIXTURES / "claim" / "run_a.txt").read_text()  # three runs that differ only before the end
        (tmp_path / name).write_text(text.replace("step:40/40 val_loss", f"run {name}\nstep:40/40 val_loss"))
    code, report = run_json(tmp_path, capsys=capsys)
    assert code == compare.EXIT_FAILS and report["runs"]["p_value"] is None
    assert report["verdict"]["reasons"] == ["no loss test: every final val loss is the same: the t-test is undefined "
                                            "(the mean val loss 3.27700 is below the target 3.28)"]
    code, report = run_json(tmp_path, "--target", "3.2765", capsys=capsys)
    assert report["verdict"]["reasons"][0].endswith("(the mean val loss 3.27700 is not below the target 3.2765)")


def test_baseline_comparison_against_hand_computation(capsys):
    code, report = run_json(FIXTURES / "claim", "--baseline", FIXTURES / "baseline", capsys=capsys)
    c = report["comparison"]
    a, b = [t for _, t in CLAIM], [t for _, t in BASELINE]
    t, df, p = welch_p(a, b)
    assert c["time_diff_ms"] == pytest.approx(5175 - 5666.666666666667, rel=1e-12)
    assert c["time_t_statistic"] == pytest.approx(t, rel=1e-9)
    assert c["time_df"] == pytest.approx(df, rel=1e-9)
    assert c["time_p_value"] == pytest.approx(p, rel=1e-6)
    assert c["time_p_value_two_sided"] == pytest.approx(2 * p, rel=1e-6)
    assert c["loss_diff"] == pytest.approx(3.27775 - 3.2782, abs=1e-12)
    # val loss at each common step: the mean over each group's runs, read straight from the files here
    curves = {}
    for group in ("claim", "baseline"):
        per_step = {}
        for path in FIXTURES.joinpath(group).rglob("*.txt"):
            if path.name == "crashed.txt":
                continue
            for m in re.finditer(r"^step:(\d+)/40 val_loss:(\S+)", path.read_text(), re.M):
                per_step.setdefault(int(m.group(1)), []).append(float(m.group(2)))
        curves[group] = {step: np.mean(v) for step, v in per_step.items()}
    assert [row["step"] for row in c["by_step"]] == [0, 10, 20, 30, 40]
    for row in c["by_step"]:
        expected = curves["claim"][row["step"]] - curves["baseline"][row["step"]]
        assert row["val_loss_diff"] == pytest.approx(expected, abs=1e-12)
    assert c["by_step"][-1]["train_time_diff_ms"] == pytest.approx(c["time_diff_ms"])
    assert report["verdict"]["claim_holds"] and report["verdict"]["speed_test_passed"] and code == 0


def test_published_record_statistics(capsys):
    """The fp8_record fixtures carry the per-run final results published with record #89 (2026-07-17
    FP8DownProjection); the tool must give the figures its statistics.md states."""
    fp8 = FIXTURES / "fp8_record"
    code, report = run_json(fp8 / "this_pr", "--baseline", fp8 / "baseline", capsys=capsys)
    runs, base, c = report["runs"], report["baseline"], report["comparison"]
    assert runs["n"] == base["n"] == 13
    assert runs["mean_val_loss"] == pytest.approx(3.2783692308, abs=1e-10)
    assert runs["std_val_loss"] == pytest.approx(0.0014156180, abs=1e-10)
    assert runs["p_value"] == pytest.approx(0.0006690604, abs=1e-10)
    assert runs["mean_train_time_ms"] == pytest.approx(79684.923, abs=1e-3)
    assert runs["std_train_time_ms"] == pytest.approx(182.767, abs=1e-3)
    assert (runs["median_train_time_ms"], runs["min_train_time_ms"], runs["max_train_time_ms"]) == (79653, 79532, 80231)
    assert base["p_value"] == pytest.approx(0.0042976481, abs=1e-10)
    assert base["std_val_loss"] == pytest.approx(0.0020164389, abs=1e-10)
    assert base["mean_train_time_ms"] == pytest.approx(80728.615, abs=1e-3)
    assert c["time_diff_ms"] == pytest.approx(-1043.692, abs=1e-3)
    assert c["time_diff_pct"] == pytest.approx(-1.292841, abs=1e-6)
    assert c["speedup"] == pytest.approx(1.01309774, abs=1e-8)
    assert c["loss_diff"] == pytest.approx(0.0001230769, abs=1e-10)
    assert abs(c["time_t_statistic"]) == pytest.approx(19.394, abs=1e-3)
    assert c["time_p_value_two_sided"] == pytest.approx(4.9e-12, abs=0.05e-12)  # the record quotes the two-sided p
    assert c["loss_p_value_two_sided"] == pytest.approx(0.8587465, abs=1e-7)
    this_pr_times = [r["train_time_ms"] for r in runs["per_run"]]
    base_times = [r["train_time_ms"] for r in base["per_run"]]
    assert c["time_p_value"] == pytest.approx(welch_p(this_pr_times, base_times)[2], rel=1e-4)
    assert runs["steps"] == 1390 and runs["hardware"] == base["hardware"] == "8x NVIDIA H100 80GB HBM3"
    assert [row["step"] for row in c["by_step"]] == [0, 250, 500, 750, 1000, 1250, 1390]
    assert code == compare.EXIT_HOLDS


def test_recipe_soft_cap_and_sparse_attn_gate_examples():
    # Records #18 (2025-01-04 SoftCap) and #28 (2025-08-23 SparseAttnGate) quote only summaries (n, mean, std -> p);
    # losses with those moments must give those p's.
    for n, mean, std, quoted in ((80, 3.2791, 0.0019, 0.0001), (14, 3.27871, 0.00164, 0.0059)):
        z = np.random.default_rng(0).standard_normal(n)
        losses = mean + std * (z - z.mean()) / z.std(ddof=1)
        p = compare.one_sample_test(losses, 3.28)["p_value"]
        assert p == pytest.approx(student_t_cdf((mean - 3.28) / (std / math.sqrt(n)), n - 1), rel=1e-6)
        assert p == pytest.approx(quoted, abs=0.0005)  # the quotes are rounded, and so are the moments they came from


# -----------------------------------------------------------------------------
# Robust reading, flags, the verdict


def test_broken_folder_is_reported_not_crashed(capsys):
    code, report = run_json(FIXTURES / "broken", capsys=capsys)
    runs = report["runs"]
    assert names(runs["files"]) == ["good.txt"]
    assert {Path(r["file"]).name: r["status"] for r in runs["incomplete"]} == {
        "crashed.txt": "incomplete", "running.txt": "incomplete", "env_only.txt": "incomplete",
        "no_output.txt": "incomplete", "diverged.txt": "diverged", "stopped_nan.txt": "diverged",
        "stopped_interrupted.txt": "incomplete"}
    assert names(r["file"] for r in runs["unreadable"]) == [
        "bad_hyperparameters.txt", "bad_step.txt", "binary.txt", "empty.txt", "not_a_log.txt", "total_changes.txt"]
    assert all(r["reason"] for r in runs["unreadable"])
    assert runs["flags"] == ["2 runs diverged (loss not finite): diverged.txt, stopped_nan.txt"]
    assert code == compare.EXIT_FAILS
    assert report["verdict"]["reasons"] == [
        "too few runs: 1 complete run; the t-test needs at least 2 (the mean val loss 3.27750 is below the target "
        "3.28)",
        "RUNS: 2 runs diverged (loss not finite)"]


def test_groups_that_are_not_one_experiment_are_flagged(capsys):
    code, report = run_json(FIXTURES / "mixed", capsys=capsys)
    flags = report["runs"]["flags"]
    assert len(flags) == 3
    assert flags[0].startswith("runs differ in step count: 3 of 4 have 40") and "longer.txt (50)" in flags[0]
    assert flags[1].startswith("runs differ in embedded source") and "patched.txt" in flags[1]
    assert "ref.txt" not in flags[1] and "gpu.txt" not in flags[1]
    assert flags[2].startswith("runs differ in hardware: 3 of 4 have CPU: AMD EPYC 7B13 (2 cores)")
    assert "gpu.txt (1x NVIDIA H100 80GB HBM3)" in flags[2]
    assert report["runs"]["steps"] is None and report["runs"]["hardware"] is None
    assert report["runs"]["p_value"] < 0.01  # the losses alone would pass...
    assert code == compare.EXIT_FAILS  # ...but the runs are not one experiment
    assert report["verdict"]["reasons"] == ["RUNS: runs differ in step count",
                                            "RUNS: runs differ in embedded source (sha256)",
                                            "RUNS: runs differ in hardware"]
    assert any("software" in note for note in report["runs"]["notes"])


def test_baseline_on_other_hardware_is_flagged(capsys):
    fp8 = FIXTURES / "fp8_record"
    code, report = run_json(fp8 / "this_pr", "--baseline", FIXTURES / "claim", capsys=capsys)
    assert report["comparison"]["flags"] == [
        "RUNS and BASELINE ran on different hardware: 8x NVIDIA H100 80GB HBM3 vs CPU: AMD EPYC 7B13 (2 cores) "
        "(rule 4 asks for a baseline on the same hardware)"]
    assert "RUNS and BASELINE ran on different hardware" in report["verdict"]["reasons"]
    assert code == compare.EXIT_FAILS


def test_slower_runs_do_not_hold(capsys):
    code, report = run_json(FIXTURES / "baseline", "--baseline", FIXTURES / "claim", capsys=capsys)
    assert report["runs"]["p_value"] < 0.01 and report["verdict"]["speed_test_passed"] is False
    assert report["verdict"]["reasons"] == ["RUNS are not faster than BASELINE (+0.492 s)"]
    assert code == compare.EXIT_FAILS


def test_too_few_baseline_runs_for_welch(capsys):
    code, report = run_json(FIXTURES / "claim", "--baseline", FIXTURES / "baseline" / "base_a.txt", capsys=capsys)
    assert report["comparison"]["time_p_value"] is None
    assert report["verdict"]["reasons"] == [
        "speed not tested: Welch's t-test needs at least 2 complete runs in each group"]
    assert code == compare.EXIT_FAILS


def test_logs_given_to_both_groups_count_as_baseline(capsys):
    fp8 = FIXTURES / "fp8_record"
    code, report = run_json(fp8, "--baseline", fp8 / "baseline", capsys=capsys)
    assert report["runs"]["n"] == 13 and report["baseline"]["n"] == 13
    assert not set(report["runs"]["files"]) & set(report["baseline"]["files"])
    assert "13 logs given both as RUNS and as --baseline counted as baseline only" in report["runs"]["notes"]
    assert code == compare.EXIT_HOLDS


# -----------------------------------------------------------------------------
# Output: JSON schema, text report, plot, command line


GROUP_KEYS = {"n": int, "mean_val_loss": float, "std_val_loss": float, "p_value": float,
              "mean_train_time_ms": float, "median_train_time_ms": float, "min_train_time_ms": float,
              "max_train_time_ms": float, "steps": int, "files": list, "incomplete": list, "unreadable": list,
              "flags": list, "notes": list, "per_run": list}


def test_json_schema(capsys):
    _, report = run_json(FIXTURES / "claim", "--baseline", FIXTURES / "baseline", capsys=capsys)
    assert {"runs", "baseline", "verdict"} <= set(report)
    for group in (report["runs"], report["baseline"]):
        for key, kind in GROUP_KEYS.items():
            assert isinstance(group[key], kind), key
        assert set(group["per_run"][0]) >= {"file", "steps", "final_val_loss", "train_time_ms", "hardware"}
    verdict = report["verdict"]
    assert isinstance(verdict["claim_holds"], bool) and isinstance(verdict["summary"], str)
    assert isinstance(verdict["reasons"], list) and verdict["target"] == 3.28 and verdict["alpha"] == 0.01
    assert {"time_diff_ms", "time_p_value", "loss_diff", "by_step"} <= set(report["comparison"])
    _, report = run_json(FIXTURES / "single", capsys=capsys)  # what cannot be computed is null, never NaN
    assert report["baseline"] is None and report["runs"]["std_val_loss"] is None


def test_text_report(capsys):
    code, out = run_tool(FIXTURES / "claim", "--baseline", FIXTURES / "baseline", capsys=capsys)
    lines = out.rstrip("\n").splitlines()
    assert lines[0] == "RUNS: 4 complete runs (1 left out, 0 unreadable)"
    assert re.search(r"claim/run_a\.txt\s+40\s+3\.2770\s+5\.000 s  not logged$", out, re.M)
    assert "mean 3.27775  std 0.00065" in out
    assert "mean 5.175 s  median 5.150 s  min 5.000 s  max 5.400 s" in out
    assert "left out (incomplete):" in out and "crashed.txt: last val line at step 20/40" in out
    assert "BASELINE: 3 complete runs (0 left out, 0 unreadable)" in out
    assert "RUNS vs BASELINE" in out and "-0.492 s (-8.68%" in out and "(one-sided, H1: RUNS faster)" in out
    assert lines[-1].startswith("VERDICT: the claim holds: mean val loss 3.27775 < 3.28 with p = 0.003 < 0.01")
    assert sum(line.startswith("VERDICT") for line in lines) == 1
    assert code == 0


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_plot_is_written(tmp_path, capsys):
    png = tmp_path / "claim.png"
    code, out = run_tool(FIXTURES / "claim", "--baseline", FIXTURES / "baseline", "--plot", png, capsys=capsys)
    assert f"plot written to {png}" in out
    assert png.stat().st_size > 20_000 and _png_size(png) == (1600, 900)
    # nothing complete to draw: still a picture, no crash
    empty = tmp_path / "empty.png"
    code, report = run_json(FIXTURES / "broken" / "crashed.txt", "--plot", empty, capsys=capsys)
    assert report["runs"]["n"] == 0 and empty.stat().st_size > 0 and code == compare.EXIT_FAILS


def test_plot_gives_every_run_its_colour_and_legend_entry():
    groups = [(name, compare.load_group(name, compare.find_logs([FIXTURES / folder])).complete)
              for name, folder in (("RUNS", "claim"), ("BASELINE", "baseline"))]
    fig = compare.build_plot(groups, 3.28, "a title")
    try:
        runs = [run for _, group in groups for run in group]
        lines = [line for line in fig.axes[0].lines if len(line.get_xdata()) > 2]  # the runs, not the target line
        assert len(lines) == len(runs) == 7
        assert len({line.get_color() if isinstance(line.get_color(), str) else tuple(line.get_color())
                    for line in lines}) == 7
        assert [line.get_linestyle() for line in lines] == ["-"] * 4 + ["--"] * 3  # RUNS solid, BASELINE dashed
        labels = [text.get_text() for text in fig.legends[0].get_texts()]
        assert "RUNS: run_a.txt (3.2770, 5.0 s)" in labels[:4] and labels[4] == "BASELINE: base_a.txt (3.2779, 5.6 s)"
        assert labels[:-1] == [f"{'RUNS' if i < 4 else 'BASELINE'}: {run.path.name} ({run.final_val_loss:.4f}, "
                               f"{run.train_time_ms / 1000:.1f} s)" for i, run in enumerate(runs)]
        assert labels[-1] == "target 3.28"
        # the legend sits beside the plots, not over them
        legend_left = fig.legends[0].get_window_extent().x0
        assert all(ax.get_window_extent().x1 <= legend_left for ax in fig.axes)
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)


@pytest.mark.parametrize("args, message", [
    (["tests/records_fixtures/nowhere"], "tests/records_fixtures/nowhere: no such file or folder"),
    (["tests/records_fixtures/claim", "--baseline", "nowhere"], "nowhere: no such file or folder"),
    (["{empty}"], "no .txt logs found in RUNS"),
    (["tests/records_fixtures/claim/more", "--baseline", "tests/records_fixtures/claim"],
     "no .txt logs found in RUNS tests/records_fixtures/claim/more (besides those given as --baseline)"),
    (["tests/records_fixtures/claim", "--alpha", "1.5"], "--alpha must be between 0 and 1"),
    (["tests/records_fixtures/claim", "--target", "nan"], "--target must be a finite number"),
    (["tests/records_fixtures/claim", "--plot", "out.jpg"], "give a file name ending in .png"),
    (["tests/records_fixtures/claim", "--plot", "no/such/folder/out.png"], "folder no/such/folder does not exist"),
])
def test_usage_errors(args, message, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)
    (tmp_path / "notes.md").write_text("a folder with no logs in it")
    with pytest.raises(SystemExit) as exit_info:
        compare.main([arg.format(empty=tmp_path) for arg in args])
    assert exit_info.value.code == compare.EXIT_USAGE
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_command_line(tmp_path):
    """The script itself: exit codes, JSON on stdout, a clear message and no traceback on errors."""
    def run(*args):
        return subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True, text=True,
                              cwd=REPO, timeout=120)

    ok = run(FIXTURES / "claim", "--json")
    assert ok.returncode == 0 and json.loads(ok.stdout)["verdict"]["claim_holds"] is True
    failing = run(FIXTURES / "weak")
    assert failing.returncode == 1 and failing.stdout.splitlines()[-1].startswith("VERDICT: the claim does NOT hold")
    missing = run(tmp_path / "missing")
    assert missing.returncode == 2 and "no such file or folder" in missing.stderr and "Traceback" not in missing.stderr
    help_text = run("--help").stdout
    assert "Exit status: 0 the claim holds; 1 it does not" in " ".join(help_text.split())


# -----------------------------------------------------------------------------
# Golden logs from our own trainer


GOLDEN = FIXTURES / "golden"


def test_golden_smoke_logs(capsys):
    logs = sorted(GOLDEN.rglob("*.txt")) if GOLDEN.is_dir() else []
    if not logs:
        pytest.skip("no golden logs yet: copy smoke-preset logs from our trainer (records/logs/*.txt) into "
                    "tests/records_fixtures/golden/")
    for path in logs:
        run = compare.read_log(path)
        assert run.status == "complete", f"{path.name}: {run.reason}"
        # the last val line, found with a plain scan of the training output
        output = path.read_text().split("=" * 100)[-1]
        last_val = [line for line in output.splitlines() if line.startswith("step:") and " val_loss:" in line][-1]
        assert run.final_val_loss == float(re.search(r" val_loss:(\S+)", last_val).group(1))
        assert run.train_time_ms == float(re.search(r" train_time:([\d.]+)ms", last_val).group(1))
        assert last_val.startswith(f"step:{run.total_steps}/{run.total_steps} ")
        assert run.hardware != "unknown" and run.software != "unknown"
        if isinstance(run.hyperparameters, dict) and "num_iterations" in run.hyperparameters:
            h = run.hyperparameters  # the scheduled steps, then the extension's
            assert h["num_iterations"] + h.get("extension_iterations", 0) == run.total_steps
    _, report = run_json(GOLDEN, capsys=capsys)
    assert report["runs"]["n"] == len(logs)
    assert report["runs"]["incomplete"] == [] and report["runs"]["unreadable"] == []


def test_a_gpt2_baseline_log_compares_like_any_other(tmp_path, capsys):
    """A log of our trainer's GPT-2 baseline preset (4 steps on the sample shards) reads as any run, and serves as
    the BASELINE group against the golden smoke logs: final losses, the common steps, the one-run caveat."""
    sys.path.insert(0, str(REPO))
    import train_gpt

    result = train_gpt.main(["--preset=smoke_gpt2_baseline", "--num_iterations=4", "--val_every=4", "--val_tokens=2048",
                             "--windows_per_step=2", f"--log_dir={tmp_path / 'gpt2'}", "--run_id=gpt2"])
    run = compare.read_log(tmp_path / "gpt2" / "gpt2.txt")
    assert run.status == "complete" and run.total_steps == 4 and [step for step, _, _ in run.val] == [0, 4]
    assert run.final_val_loss == float(f"{result['val_loss']:.4f}") and run.train_time_ms > 0
    assert run.hyperparameters["residual"] == "plain" and run.hyperparameters["use_muon"] is False
    assert [step for step, _ in run.train] == [1, 2, 3, 4]
    capsys.readouterr()  # the run's own console lines
    code, report = run_json(GOLDEN, "--baseline", tmp_path / "gpt2", capsys=capsys)
    golden = [compare.read_log(path) for path in sorted(GOLDEN.glob("*.txt"))]
    assert report["baseline"]["n"] == 1 and report["baseline"]["mean_val_loss"] == run.final_val_loss
    c = report["comparison"]
    assert c["loss_diff"] == pytest.approx(np.mean([g.final_val_loss for g in golden]) - run.final_val_loss)
    assert [row["step"] for row in c["by_step"]] == [0, 4]
    assert c["by_step"][1]["baseline_mean_val_loss"] == run.final_val_loss
    assert c["time_p_value"] is None and "at least 2 complete runs" in c["time_p_value_note"] and code == 1


def test_the_same_run_given_twice_or_resumed_counts_once_and_says_so(tmp_path, capsys):
    """A record claim counts independent runs: a copy of a log, a log with another's run id and a run resumed from
    another's checkpoint are one run, merged with a line that says so; the ranks each run used are reported."""
    seed = {i: (GOLDEN / f"smoke_seed{i}.txt").read_text() for i in range(3)}
    runs = tmp_path / "runs"
    (runs / "copy").mkdir(parents=True)
    (runs / "seed0.txt").write_text(seed[0])
    (runs / "copy" / "seed0.txt").write_text(seed[0])  # the same file twice
    (runs / "seed1.txt").write_text(seed[1].replace("hyperparameters:", "log: x.txt  (world size 2, device cpu)\n"
                                                    "hyperparameters:"))
    (runs / "seed1_rerun.txt").write_text(seed[1].replace("step:14/14 val_loss:", "step:14/14 val_loss:1"))
    head, _, tail = seed[2].partition("step:5/14")  # stopped after step 4, then resumed as run 'after'
    (runs / "seed2.txt").write_text(head + "stopped: SIGTERM: stopped after step 4; checkpoint ckpt/step_4\n")
    (runs / "after.txt").write_text(head.replace('"run_id": "smoke_seed2"', '"run_id": "after"')
                                    + "resumed from ckpt/smoke_seed2/step_4: step 4 of run smoke_seed2, train_time "
                                      "4008ms\nstep:5/14" + tail)
    code, report = run_json(runs, capsys=capsys)
    r = report["runs"]
    assert r["n"] == 3 and sorted(Path(f).name for f in r["files"]) == ["after.txt", "seed0.txt", "seed1.txt"]
    assert r["incomplete"] == []  # the stopped half of the resumed run is part of it, not a run left out
    assert r["merged"] == [
        f"{runs / 'seed0.txt'} is a byte-identical copy of {runs / 'copy' / 'seed0.txt'}: one run, counted once, as "
        f"{runs / 'copy' / 'seed0.txt'}",
        f"{runs / 'seed1_rerun.txt'} has the same run id 'smoke_seed1' as {runs / 'seed1.txt'}: one run, counted "
        f"once, as {runs / 'seed1.txt'}",
        f"{runs / 'after.txt'} resumed the run of {runs / 'seed2.txt'} from its checkpoint: one run, counted once, "
        f"as {runs / 'after.txt'}"]
    assert [run["ranks"] for run in r["per_run"]] == [None, None, 2]
    code, out = run_tool(runs, capsys=capsys)
    assert out.splitlines()[0] == ("RUNS: 3 complete runs (0 left out, 0 unreadable, 3 merged into the run they "
                                   "belong to)")
    assert f"  merged: {runs / 'seed0.txt'} is a byte-identical copy" in out
    assert re.search(r"seed1\.txt\s+14\s+\S+\s+\S+ s  2$", out, re.M)
    for path in (runs / "seed0.txt", runs / "copy" / "seed0.txt"):
        path.write_text(seed[0].replace("hyperparameters:", "log: y.txt  (world size 1, device cpu)\nhyperparameters:"))
    _, report = run_json(runs, capsys=capsys)
    assert any(f.startswith("runs differ in ranks (processes that trained): ") for f in report["runs"]["flags"])
    _, report = run_json(runs / "seed1.txt", runs / "seed1.txt", runs, capsys=capsys)  # one file, named three times
    assert report["runs"]["n"] == 3 and report["runs"]["merged"][:2] == [
        f"{runs / 'seed1.txt'} is given more than once: read once"] * 2


@pytest.mark.parametrize("how", ["copy", "run id", "resumed"])
def test_a_run_given_as_runs_and_as_baseline_counts_as_baseline_only(tmp_path, capsys, how):
    """Not one sample in each group: a copy of a baseline log, a log with a baseline run's id, or a run resumed from
    a baseline run's checkpoint, given among RUNS, is the baseline's run (merged: says so)."""
    seed = {i: (GOLDEN / f"smoke_seed{i}.txt").read_text() for i in range(3)}
    runs, base = tmp_path / "runs", tmp_path / "base"
    runs.mkdir(), base.mkdir()
    (runs / "seed0.txt").write_text(seed[0])
    (base / "seed1.txt").write_text(seed[1])
    (base / "seed2.txt").write_text(seed[2])
    if how == "copy":
        (runs / "seed1.txt").write_text(seed[1])
    elif how == "run id":
        (runs / "seed1.txt").write_text(seed[1].replace("step:14/14 val_loss:", "step:14/14 val_loss:1"))
    else:
        head, _, tail = seed[0].partition("step:5/14")
        (runs / "after.txt").write_text(head.replace('"run_id": "smoke_seed0"', '"run_id": "after"').replace(
            "smoke_seed0", "x") + "resumed from ckpt/smoke_seed1/step_4: step 4 of run smoke_seed1, train_time 4008ms\n"
            "step:5/14" + tail)
    _, report = run_json(runs, "--baseline", base, capsys=capsys)
    assert report["runs"]["n"] == 1 and report["baseline"]["n"] == 2, report["runs"]
    assert [Path(f).name for f in report["runs"]["files"]] == ["seed0.txt"]
    (merged,) = report["runs"]["merged"]
    assert merged.endswith(", given as BASELINE: one run, counted as baseline only"), merged
    assert str(base / "seed1.txt") in merged
    (runs / "seed0.txt").unlink()
    with pytest.raises(SystemExit) as stop:
        compare.main([str(runs), "--baseline", str(base)])
    assert stop.value.code == compare.EXIT_USAGE and "is a run given as --baseline too" in capsys.readouterr().err


# -----------------------------------------------------------------------------
# records/curves.py: one run's loss curves

CURVES = REPO / "records" / "curves.py"


def test_train_losses_are_read_from_our_step_lines():
    fixture = compare.read_log(FIXTURES / "claim" / "run_a.txt")  # hand-made: one train line per step
    assert [step for step, _ in fixture.train] == list(range(1, 41)) and fixture.train[1] == (2, 10.8758)
    for path in sorted(GOLDEN.glob("*.txt")):  # our trainer's logs: every train loss, as a plain scan finds them
        run = compare.read_log(path)
        lines = [line for line in path.read_text().split("=" * 100)[-1].splitlines() if " train_loss:" in line]
        assert [step for step, _ in run.train] == list(range(1, run.total_steps + 1))
        assert run.train == [(int(re.match(r"step:(\d+)/", line).group(1)),
                              float(re.search(r" train_loss:(\S+)", line).group(1))) for line in lines]
    reference = compare.read_log(FIXTURES / "reference" / "020630eb-style-2025-08-23.txt")
    assert reference.train == [] and len(reference.val) > 0  # that layout logs no train loss


def test_curves_are_plotted(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, str(CURVES), *map(str, args)], capture_output=True, text=True,
                              cwd=REPO, timeout=120)

    png = tmp_path / "curves.png"
    ok = run(GOLDEN / "smoke_seed0.txt", GOLDEN / "smoke_seed1.txt", "--out", png)
    assert ok.returncode == 0, ok.stderr
    golden = compare.read_log(GOLDEN / "smoke_seed0.txt")
    counts = f"{len(golden.train)} train losses, {len(golden.val)} val losses (complete)"
    assert f"plot written to {png}" in ok.stdout and counts in ok.stdout and len(golden.train) > 5
    assert png.stat().st_size > 20_000 and _png_size(png) == (1000, 600)
    crashed = run(FIXTURES / "broken" / "crashed.txt", "--out", tmp_path / "crashed.png")  # incomplete: still drawn
    assert crashed.returncode == 0 and "(incomplete)" in crashed.stdout
    for args, message in ((["--out", tmp_path / "x.jpg"], "ending in .png"),
                          (["--out", tmp_path / "no" / "x.png"], "does not exist"),
                          ([FIXTURES / "broken" / "not_a_log.txt", "--out", png], "not a training log"),
                          ([FIXTURES / "broken" / "no_output.txt", "--out", png], "nothing to plot")):
        bad = run(*([GOLDEN / "smoke_seed0.txt"] if args[0] == "--out" else []), *args)
        assert bad.returncode == 2 and message in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
