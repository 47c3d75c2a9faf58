"""Writes the hand-made logs under tests/records_fixtures/ (run from the repository root; deterministic).

    python tests/records_fixtures/make_fixtures.py

Every file is written in the log layout of docs/recipes.md#run-log, by this script and not by the parser under
test. The final val losses and times are chosen here (and restated in tests/test_records.py) so that the statistics are
known; the curves before the final step are made up. README.md in this folder says what each folder is for.
"""

from __future__ import annotations

import json
import random
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
RULE = "=" * 100
FILE_RULE = "-" * 40

# -----------------------------------------------------------------------------
# Pieces of a log


def stand_in_source(version: str, kernels: tuple[str, ...] = ()) -> str:
    """A short script standing in for the full train_gpt.py a real log embeds; `version` changes its text."""
    text = (f'"""train_gpt.py stand-in for the records/ tests ({version}). A real log embeds the whole script."""\n\n'
            "import sys\n\n\ndef main():\n    print('training', sys.argv[1:])\n\n\nif __name__ == '__main__':\n"
            "    main()\n")
    for name in kernels:
        text += f"{FILE_RULE}\n# {name}\n{FILE_RULE}\n# stand-in for {name} ({version})\nKERNELS = []\n"
    return text


def cpu_env(python="3.12.3", torch="2.13.0+cpu", cpu="AMD EPYC 7B13 (2 cores)") -> list[str]:
    return [f"Running Python {python} (main, Apr 10 2024, 05:33:47) [GCC 13.2.0]",
            f"Running PyTorch {torch} compiled for CUDA None", f"CPU: {cpu}", "nvidia-smi: not available"]


def nvidia_smi(n_gpus: int, name="NVIDIA H100 80GB HBM3", driver="570.148.08", cuda="12.8",
               date="Sat Aug 23 13:51:59 2025", persistence="On") -> list[str]:
    """The nvidia-smi table as the tool prints it, for n_gpus GPUs of one model."""
    bar = "+-----------------------------------------+------------------------+----------------------+"
    out = [f"{date}       ",
           "+" + "-" * 89 + "+",
           f"| NVIDIA-SMI {driver:<22} Driver Version: {driver:<14} CUDA Version: {cuda:<9}|",
           "|" + bar[1:],
           "| GPU  Name                 Persistence-M | Bus-Id          Disp.A | Volatile Uncorr. ECC |",
           "| Fan  Temp   Perf          Pwr:Usage/Cap |           Memory-Usage | GPU-Util  Compute M. |",
           "|                                         |                        |               MIG M. |",
           "|=========================================+========================+======================|"]
    for i in range(n_gpus):
        out += [f"|   {i}  {name:<29} {persistence:>3} |   00000000:{0x61 + i:02X}:00.0 Off |                    0 |",
                f"| N/A   {31 + i}C    P0            {117 + i}W /  700W |    1519MiB /  81559MiB |"
                "      0%      Default |",
                "|                                         |                        |             Disabled |",
                bar]
    out += ["                                                                                         ",
            "+" + "-" * 89 + "+",
            "| Processes:" + " " * 78 + "|",
            "|  GPU   GI   CI              PID   Type   Process name                        GPU Memory |",
            "|        ID   ID                                                               Usage      |",
            "|" + "=" * 89 + "|"]
    out += [f"|    {i}   N/A  N/A          {321540 + i}      C   /usr/bin/python3                       1510MiB |"
            for i in range(n_gpus)]
    out += ["+" + "-" * 89 + "+", ""]
    return out


def gpu_env(n_gpus=8, python="3.10.12 (main, May 27 2025, 17:12:29) [GCC 11.4.0]",
            torch="2.9.0.dev20250713+cu126 compiled for CUDA 12.6", triton="3.4.0", **smi) -> list[str]:
    return ([f"Running Python {python}", f"Running PyTorch {torch}"] + ([f"Running Triton version {triton}"]
            if triton else []) + nvidia_smi(n_gpus, **smi))


def val_curve(total: int, first_step: int, first_loss: float, final_loss: float, rng: random.Random | None,
              start_loss=10.8258):
    """A made-up val loss curve: a power law through (first_step, first_loss) that lands exactly on final_loss."""
    alpha = 0.72

    def loss(step: int) -> float:
        if step == 0:
            return start_loss
        if step == total:
            return final_loss
        shape = (step ** -alpha - total ** -alpha) / (first_step ** -alpha - total ** -alpha)
        noise = rng.uniform(-0.002, 0.002) if rng else 0.0
        return round(min(final_loss + (first_loss - final_loss) * shape + noise, start_loss), 4)

    return loss


def step_lines(total: int, val_every: int, loss, train_ms, val_ms, *, train_every=1, extra=None,
               stop_after: int | None = None, step_avg_nan_until=0) -> list[str]:
    """Val lines at 0, val_every, ... and total; train lines every train_every steps (and the last one), in the order
    the trainer prints them. `extra(step)` adds our key:value fields to train lines; stop_after ends the log early."""
    out = []
    last = total if stop_after is None else stop_after

    def avg(ms, step):  # early reference logs print nan until their timer starts
        return "nan" if step_avg_nan_until and step <= step_avg_nan_until else f"{ms / max(step, 1):.2f}"

    for step in range(0, last + 1):
        if step > 0 and (step % train_every == 0 or step == total):
            ms = train_ms(step)
            fields = extra(step) if extra else ""
            out.append(f"step:{step}/{total} train_time:{ms:.0f}ms step_avg:{avg(ms, step)}ms{fields}")
        if step % val_every == 0 or step == total:
            ms = val_ms(step)
            out.append(f"step:{step}/{total} val_loss:{loss(step):.4f} train_time:{ms:.0f}ms "
                       f"step_avg:{avg(ms, step)}ms")
    return out


def write(path: Path, source: str, env: list[str], output: list[str], *, newline_at_end=True) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join([source.rstrip("\n"), RULE, *env, RULE, *output])
    path.write_text(text + ("\n" if newline_at_end else ""))


# -----------------------------------------------------------------------------
# Our logs (CPU smoke runs): 40 steps, val every 10


def ours(final_loss: float, final_ms: float, *, seed: int, version="claim", total=40, stop_after=None,
         env=None, hyperparameters=None, final_loss_text=None) -> tuple[str, list[str], list[str]]:
    rng = random.Random(seed)
    loss = val_curve(total, 10, 6.2, final_loss, rng)
    per_step = final_ms / total

    def train_ms(step):
        return per_step * step - 3.0

    def val_ms(step):
        return final_ms if step == total else per_step * step

    def extra(step):
        return f" train_loss:{loss(max(step, 1)) + 0.05:.4f} tokens_per_s:{int(16384 / per_step * 1000)}"

    settings = {"preset": "smoke", "num_iterations": total, "val_loss_every": 10, "seed": seed}
    settings.update(hyperparameters or {})
    output = [f"hyperparameters: {json.dumps(settings)}"]
    output += step_lines(total, 10, loss, train_ms, val_ms, extra=extra, stop_after=stop_after)
    if final_loss_text is not None:  # e.g. a run that diverged
        output[-1] = output[-1].replace(f"val_loss:{final_loss:.4f}", f"val_loss:{final_loss_text}")
    if stop_after is None:
        output.append("peak memory allocated: 0 MiB reserved: 0 MiB")
    return stand_in_source(version), env or cpu_env(), output


def write_ours(path: Path, *args, **kwargs) -> None:
    write(path, *ours(*args, **kwargs))


# The statistics the tests check are the ones of these numbers (see tests/test_records.py).
CLAIM = [(3.2770, 5000), (3.2775, 5100), (3.2780, 5200), (3.2785, 5400)]
BASELINE = [(3.2779, 5600), (3.2781, 5650), (3.2786, 5750)]
WEAK = [(3.2770, 4000), (3.2780, 4100), (3.2790, 4200)]

# The 2026-07-17_FP8DownProjection record's published per-run results (its this_pr/ and baseline/ statistics.md):
# final val loss and train time in seconds. Only these numbers come from there.
FP8_THIS_PR = (
    [3.2791, 3.2773, 3.2783, 3.2775, 3.2781, 3.2775, 3.2793, 3.2772, 3.2769, 3.2775, 3.2806, 3.2779, 3.2816],
    [79.536, 79.740, 79.814, 79.658, 79.593, 79.629, 80.231, 79.653, 79.641, 79.532, 79.539, 79.682, 79.656])
FP8_BASELINE = (
    [3.2817, 3.2796, 3.2778, 3.2802, 3.2775, 3.2767, 3.2758, 3.2821, 3.2780, 3.2768, 3.2769, 3.2775, 3.2766],
    [80.610, 80.710, 80.678, 80.720, 80.747, 80.693, 80.659, 80.694, 80.763, 80.795, 80.818, 80.840, 80.745])


def make_ours() -> None:
    claim, base = HERE / "claim", HERE / "baseline"
    for seed, ((loss, ms), name) in enumerate(zip(CLAIM, ["run_a.txt", "run_b.txt", "more/run_c.txt",
                                                          "more/run_d.txt"]), start=1):
        write_ours(claim / name, loss, ms, seed=seed)
    write_ours(claim / "crashed.txt", 3.2790, 5300, seed=5, stop_after=27)
    (claim / "notes.md").write_text("Not a log: the tool reads only .txt files in folders.\n")
    for seed, ((loss, ms), name) in enumerate(zip(BASELINE, ["base_a.txt", "base_b.txt", "base_c.txt"]), start=11):
        write_ours(base / name, loss, ms, seed=seed, version="baseline")
    for seed, ((loss, ms), name) in enumerate(zip(WEAK, ["weak_a.txt", "weak_b.txt", "weak_c.txt"]), start=21):
        write_ours(HERE / "weak" / name, loss, ms, seed=seed)
    write_ours(HERE / "single" / "only.txt", 3.2700, 5000, seed=1)

    # One experiment except for one file each: step count, source, hardware.
    mixed = HERE / "mixed"
    write_ours(mixed / "ref.txt", 3.2775, 5000, seed=1)
    write_ours(mixed / "longer.txt", 3.2770, 6200, seed=2, total=50)
    write_ours(mixed / "patched.txt", 3.2776, 5050, seed=3, version="claim, patched")
    write_ours(mixed / "gpu.txt", 3.2774, 900, seed=4, env=gpu_env(1, python="3.12.3 (main) [GCC 13.2.0]",
                                                                         torch="2.11.0+cu130 compiled for CUDA 13.0",
                                                                         triton="3.6.0"))


def make_broken() -> None:
    broken = HERE / "broken"
    write_ours(broken / "good.txt", 3.2775, 5000, seed=1)
    source, env, output = ours(3.2775, 5000, seed=2, stop_after=23)
    write(broken / "running.txt", source, env, output + ["step:24/40 train_ti"], newline_at_end=False)
    (broken / "env_only.txt").write_text("\n".join([source.rstrip("\n"), RULE, *env[:2]]) + "\n")
    write(broken / "no_output.txt", source, env, output[:1])
    write_ours(broken / "crashed.txt", 3.2775, 5000, seed=3, stop_after=27)
    write_ours(broken / "diverged.txt", 3.2775, 5000, seed=4, final_loss_text="nan")
    (broken / "not_a_log.txt").write_text("Notes on the runs of Tuesday.\nstep:40/40 val_loss:3.1 train_time:1ms\n")
    (broken / "empty.txt").write_text("")
    (broken / "binary.txt").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00\x00 not text")
    source, env, output = ours(3.2775, 5000, seed=5)
    output[13] = "step:11/40 train_time:??ms step_avg:??ms"  # garbled mid-file, then the run goes on
    write(broken / "bad_step.txt", source, env, output)
    source, env, output = ours(3.2775, 5000, seed=6)
    output[17] = output[17].replace("/40 ", "/50 ")
    write(broken / "total_changes.txt", source, env, output)
    source, env, output = ours(3.2775, 5000, seed=7)
    output[0] = 'hyperparameters: {"preset": "smoke", "num_iterations": 40'
    write(broken / "bad_hyperparameters.txt", source, env, output)
    # Our trainer's last line when a run stops early: 'stopped: <why>', then a HINT meant for the terminal.
    source, env, output = ours(3.2775, 5000, seed=8, stop_after=20)
    output[-1] = output[-1].replace(output[-1].split()[1], "val_loss:nan")
    write(broken / "stopped_nan.txt", source, env, output + [
        "stopped: validation loss is nan at step 20. HINT: lower the learning rates, or check the data with "
        "`python data/shards.py inspect`"])
    source, env, output = ours(3.2775, 5000, seed=9, stop_after=13)
    write(broken / "stopped_interrupted.txt", source, env, output + ["stopped: interrupted"])


# -----------------------------------------------------------------------------
# Reference-style logs (the published figures in docs/recipes.md#published-figures)


def make_reference() -> None:
    ref = HERE / "reference"
    # 2025-08-23 style: 1695 steps, val every 125, every train line; step_avg drifts from ~94 ms to 99.67 ms.
    total = 1695
    loss = val_curve(total, 125, 4.6543, 3.2772, rng=None)
    a, c = 93.0265, 0.003884  # train_time(step) = a*step + c*step^2, through 11689 ms at 125 and 168839 ms at 1695

    def train_ms(step):
        return a * step + c * step * step

    def val_ms(step):
        return {0: 0.0, total: 168938.0}.get(step, train_ms(step) + 92)

    output = step_lines(total, 125, loss, train_ms, val_ms)
    output[0] = output[0].replace("step_avg:0.00ms", "step_avg:0.03ms")
    output.append("peak memory allocated: 34004 MiB reserved: 49660 MiB")
    write(ref / "020630eb-style-2025-08-23.txt", stand_in_source("reference, 2025-08-23"), gpu_env(), output)

    # 2024-11 style: "Running pytorch", "nvidia-smi:", train_loss before train_time, step_avg:nan early on.
    total = 100
    loss = val_curve(total, 25, 4.9, 3.2790, random.Random(1))
    env = ["Running pytorch 2.5.1+cu124 compiled for CUDA 12.4", "nvidia-smi:"]
    env += nvidia_smi(8, driver="555.42.06", cuda="12.5", date="Wed Nov  6 20:15:05 2024", persistence="Off")

    def old_train(step):
        return 150.0 * step + 515

    def with_train_loss(line):  # these logs print train_loss before train_time
        if "val_loss" in line:
            return line
        step = int(line[len("step:"):line.index("/")])
        return line.replace(" train_time:", f" train_loss:{loss(step) + 0.1:.4f} train_time:", 1)

    output = step_lines(total, 25, loss, old_train, old_train, step_avg_nan_until=10)
    output = [with_train_loss(line) for line in output]
    output.append("peak memory consumption: 22851 MiB")
    write(ref / "05b29e54-style-2024-11.txt", stand_in_source("reference, 2024-11"), env, output)


def make_fp8_record() -> None:
    """13 + 13 logs in the 2026 layout (embedded kernel files, warm-up lines, 1390 steps, val every 250) carrying the
    published final results of the 2026-07-17_FP8DownProjection record; everything else is made up."""
    total = 1390
    stage_ms = [(460, 31.5), (920, 56.8), (1380, 82.6), (1390, 83.0)]  # per-stage step times of that record's logs

    def nominal_ms(step):
        ms, prev = 0.0, 0
        for end, per_step in stage_ms:
            ms += per_step * (min(step, end) - prev)
            prev = end
            if step <= end:
                break
        return ms

    warmup = ["Compiling model and warming up kernels (~7 minutes on first execution)",
              "Sampling steps [0, 1, 458, 459, 460, 461, 918, 919, 920, 921, 1378, 1379, 1380, 1381] for warmup",
              "Resetting Model"]
    env = gpu_env(python="3.12.3 (main, Jun 18 2025, 17:59:45) [GCC 13.3.0]",
                  torch="2.10.0+cu128 compiled for CUDA 12.8", triton="3.6.0", driver="580.159.04",
                  date="Fri Jul 17 09:12:40 2026")
    rng = random.Random(2026)
    for folder, (losses, seconds), version in (("this_pr", FP8_THIS_PR, "FP8 down projection"),
                                               ("baseline", FP8_BASELINE, "bf16 down projection")):
        source = stand_in_source(version, kernels=("triton_kernels.py", "dc_triton_kernels.py"))
        for final_loss, final_s in zip(losses, seconds):
            scale = final_s * 1000 / nominal_ms(total)
            loss = val_curve(total, 250, 4.4888, final_loss, rng)
            def train_ms(step, k=scale):
                return k * nominal_ms(step)

            def val_ms(step, k=scale, final_ms=final_s * 1000):
                return final_ms if step == total else k * nominal_ms(step) + 32 * (step > 0)

            output = warmup + step_lines(total, 250, loss, train_ms, val_ms, train_every=10)
            output.append(f"peak memory allocated: {rng.randint(30220, 30935)} MiB "
                          f"reserved: {rng.randint(37892, 46072)} MiB")
            name = f"{uuid.UUID(int=rng.getrandbits(128), version=4)}.txt"
            write(HERE / "fp8_record" / folder / name, source, env, output)


if __name__ == "__main__":
    make_ours()
    make_broken()
    make_reference()
    make_fp8_record()
    print(f"fixtures written under {HERE}")
