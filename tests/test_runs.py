"""Runs that survive: checkpoints and exact resume, every stop explained on the last line of the log. CPU."""

import dataclasses
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from test_recipe_2026 import tiny_args  # noqa: E402
from test_train_gpt import run_dumping_metrics  # noqa: E402

import train_gpt as tg  # noqa: E402


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("shards_runs")
    rng = np.random.default_rng(1)
    for name, n in (("r_val_000000.bin", 2048), ("r_train_000001.bin", 400_000)):
        docs = [np.concatenate([[tg.BOS_ID], (rng.integers(0, 64) + np.arange(rng.integers(10, 150))) % 64 + 1000])
                for _ in range(n // 40)]
        tg.write_shard(d / name, np.concatenate(docs)[:n])
    return d


def argv(shard_dir: Path, tmp: Path, **overrides) -> list[str]:
    settings = dataclasses.asdict(tiny_args())
    settings.update(train_files=str(shard_dir / "r_train_*.bin"), val_files=str(shard_dir / "r_val_*.bin"),
                    val_every=4, log_dir=str(tmp / "logs"), checkpoint_dir=str(tmp / "ckpt"), warmup_steps=0)
    settings.update(overrides)
    return [f"--{k}={v}" for k, v in settings.items()]


def log_lines(tmp: Path, run_id: str) -> list[str]:
    return (tmp / "logs" / f"{run_id}.txt").read_text().splitlines()


def test_stop_and_resume_equals_the_uninterrupted_run(shard_dir, tmp_path):
    """Checkpoints after steps 3 and 6 (one of them between two Adam steps, with gradients pending); resuming from
    either gives the uninterrupted run's val losses exactly, and the resumed log says from where."""
    full = tg.main(argv(shard_dir, tmp_path, run_id="full", save_every=3))
    for step in (3, 6):
        folder = tmp_path / "ckpt" / "full" / f"step_{step}"
        assert sorted(p.name for p in folder.iterdir()) == ["model.safetensors", "progress.json", "rank0.pt",
                                                            "settings.json"]
        resumed = tg.main(argv(shard_dir, tmp_path, run_id=f"resumed{step}", resume=str(folder)))
        assert resumed["val_losses"] == full["val_losses"]
        assert resumed["train_time_ms"] > json.loads((folder / "progress.json").read_text())["train_time_ms"]
        lines = log_lines(tmp_path, f"resumed{step}")
        assert any(s.startswith(f"resumed from {folder}: step {step} of run full") for s in lines)
        assert not any(s.startswith(f"step:{step}/11 train_time") for s in lines)  # steps before it are not redone
    assert not list((tmp_path / "ckpt" / "full").glob(".*"))  # no partial folder left behind
    loaded = tg.load_model(tmp_path / "ckpt" / "full" / "step_6")  # a checkpoint is also a model to use
    assert loaded.args == tg.parse_args(argv(shard_dir, tmp_path, run_id="full", save_every=3))


@pytest.mark.slow
def test_two_ranks_resume_exactly(shard_dir, tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    full = run_dumping_metrics(torchrun, argv(shard_dir, tmp_path, run_id="full2", save_every=5), tmp_path / "a.json")
    folder = tmp_path / "ckpt" / "full2" / "step_5"
    assert {p.name for p in folder.iterdir()} >= {"rank0.pt", "rank1.pt"}
    resumed = run_dumping_metrics(torchrun, argv(shard_dir, tmp_path, run_id="res2", resume=str(folder)),
                                  tmp_path / "b.json")
    assert resumed["val_losses"] == full["val_losses"]
    with pytest.raises(ValueError, match="written by 2 ranks; this run has 1"):
        tg.main(argv(shard_dir, tmp_path, run_id="res1", resume=str(folder)))


def test_resuming_other_settings_or_a_damaged_checkpoint_is_refused(shard_dir, tmp_path):
    tg.main(argv(shard_dir, tmp_path, run_id="base", save_every=4, num_iterations=6, extension_iterations=0))
    folder = tmp_path / "ckpt" / "base" / "step_4"
    common = dict(num_iterations=6, extension_iterations=0, resume=str(folder))
    with pytest.raises(ValueError, match="other settings or code: muon_lr. HINT"):
        tg.main(argv(shard_dir, tmp_path, run_id="other", muon_lr=0.5, **common))
    assert log_lines(tmp_path, "other")[-1].startswith("stopped: ") and "muon_lr" in log_lines(tmp_path, "other")[-1]
    result = tg.main(argv(shard_dir, tmp_path, run_id="anyway", muon_lr=0.5, resume_anyway=True, **common))
    assert list(result["val_losses"]) == [0, 4, 6]
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for f in folder.iterdir():
        (damaged / f.name).write_bytes(f.read_bytes())
    (damaged / "rank0.pt").write_bytes((folder / "rank0.pt").read_bytes()[:1000])
    with pytest.raises(ValueError, match="incomplete or corrupt"):
        tg.main(argv(shard_dir, tmp_path, run_id="damaged", **{**common, "resume": str(damaged)}))
    (damaged / "progress.json").unlink()
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        tg.main(argv(shard_dir, tmp_path, run_id="partial", **{**common, "resume": str(damaged)}))


def wait_for(path: Path, text: str, process: subprocess.Popen, timeout: float = 300):
    start = time.time()
    while time.time() - start < timeout and process.poll() is None:
        if path.exists() and text in path.read_text():
            return
        time.sleep(0.2)
    raise AssertionError(f"{text!r} never appeared in {path}; exit {process.poll()}")


@pytest.mark.parametrize("sig, last", [(signal.SIGTERM, "stopped: SIGTERM: stopped after step"),
                                       (signal.SIGINT, "stopped: interrupted (Ctrl-C)")])
def test_a_signal_mid_run_ends_the_log_with_its_reason(shard_dir, tmp_path, sig, last):
    command = [sys.executable, str(ROOT / "train_gpt.py")] + argv(shard_dir, tmp_path, run_id="sig", save_every=3,
                                                                   num_iterations=60, val_every=0)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    log = tmp_path / "logs" / "sig.txt"
    wait_for(log, "step:5/", process)
    process.send_signal(sig)
    out, err = process.communicate(timeout=300)
    lines = log.read_text().splitlines()
    assert lines[-1].startswith(last), lines[-3:]
    assert "Traceback" not in err and err.strip().splitlines() == [lines[-1]], err
    assert process.returncode == (143 if sig == signal.SIGTERM else 130)
    if sig == signal.SIGTERM:  # a checkpoint at the step where it stopped, which resumes
        step = int(lines[-1].split("stopped after step ")[1].split(";")[0])
        folder = tmp_path / "ckpt" / "sig" / f"step_{step}"
        assert f"checkpoint {folder}" in lines[-1] and lines[-2] == f"checkpoint: {folder} (step {step})"
        assert lines[-3].startswith(f"step:{step}/62 ")
        result = tg.main(argv(shard_dir, tmp_path, run_id="after", resume=str(folder), num_iterations=60,
                              val_every=0))
        assert list(result["val_losses"]) == [0, 62]  # step 0's from the checkpoint, the final one from the resume


def test_a_full_disk_keeps_every_complete_log_line(shard_dir, tmp_path, monkeypatch):
    real_write, written = os.write, []

    def filling_write(fd, data):  # the log's 16th write finds the disk full after half of its bytes
        if fd > 2 and len(written) == 15:
            real_write(fd, data[:len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        if fd > 2:
            written.append(data)
        return real_write(fd, data)

    monkeypatch.setattr(tg.os, "write", filling_write)
    with pytest.raises(tg.LogWriteError, match=r"cannot write the log .*full\.txt: No space left on device"):
        tg.main(argv(shard_dir, tmp_path, run_id="full"))
    text = (tmp_path / "logs" / "full.txt").read_bytes()
    assert text == b"".join(written) and text.endswith(b"\n")  # the half-written line is gone, the rest kept
    assert text.decode().splitlines()[-1].startswith("step:")


def test_an_unexpected_error_is_one_line_on_the_console_and_a_traceback_in_the_log(shard_dir, tmp_path, monkeypatch,
                                                                                     capsys):
    monkeypatch.setattr(tg.GPT, "hidden", lambda self, input_seq: 1 / 0)
    assert tg.cli(argv(shard_dir, tmp_path, run_id="bug")) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines() == ["error: ZeroDivisionError: division by zero (the traceback is in the run's "
                                        "log; --debug=true prints it)"], err
    lines = log_lines(tmp_path, "bug")
    assert lines[-1] == "stopped: ZeroDivisionError: division by zero"
    assert any(s.startswith("Traceback (most recent call last)") for s in lines)
