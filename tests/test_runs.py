"""Runs that survive: checkpoints and exact resume, every stop explained on the last line of the log. CPU."""

import dataclasses
import errno
import io
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


@pytest.mark.parametrize("progress, message", [
    ([1], "not a complete checkpoint (a file that is not a JSON object). HINT"),
    ({"run_id": "another"}, "not a complete checkpoint (its progress.json is of run 'another', its settings.json of "
                            "run 'base'). HINT"),
    ({"step": "4"}, "not a complete checkpoint (a damaged progress.json). HINT"),
    ({"loader": None}, "not a complete checkpoint (a damaged progress.json). HINT"),
    ({"step": 9}, "is at step 9, past this run's last step. HINT: resume with its --num_iterations"),
])
def test_a_progress_file_from_another_run_or_damaged_is_one_line(shard_dir, tmp_path, capsys, progress, message):
    """Not a KeyError or TypeError from the middle of the resume: the checkpoint's progress.json is checked first."""
    tg.main(argv(shard_dir, tmp_path, run_id="base", save_every=4, num_iterations=6, extension_iterations=0))
    folder = tmp_path / "ckpt" / "base" / "step_4"
    if isinstance(progress, dict):
        progress = {**json.loads((folder / "progress.json").read_text()), **progress}
    (folder / "progress.json").write_text(json.dumps(progress))
    assert tg.cli(argv(shard_dir, tmp_path, run_id="next", num_iterations=6, extension_iterations=0,
                       resume=str(folder), resume_anyway=True)) == 1
    err = capsys.readouterr().err
    assert err.splitlines() == [err.strip()] and err.startswith(f"error: {folder} ") and message in err, err


# --- Nothing a user made is lost: checkpoint folders belong to one run ----------------------------------------------

def test_a_run_id_whose_checkpoints_belong_to_another_run_is_refused_before_training(shard_dir, tmp_path, capsys):
    tg.main(argv(shard_dir, tmp_path, run_id="mine", save_every=3, num_iterations=4, extension_iterations=0))
    folder = tmp_path / "ckpt" / "mine"
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert json.loads((folder / "run.json").read_text())["run_id"] == "mine"
    other_logs = tmp_path / "other"  # another log folder: the log's own check cannot see the clash
    assert tg.cli(argv(shard_dir, tmp_path, run_id="mine", save_final=True, log_dir=str(other_logs))) == 1
    err = capsys.readouterr().err
    assert err.splitlines() == [err.strip()] and "Traceback" not in err, err
    assert err.startswith(f"error: the checkpoint folder {folder} belongs to run 'mine' (started ")
    assert f"log {tmp_path / 'logs' / 'mine.txt'}) and holds step_3. HINT: choose another --run_id" in err
    assert (other_logs / "mine.txt").read_text().splitlines()[-1].startswith("stopped: the checkpoint folder")
    assert not any(s.startswith("step:1/") for s in (other_logs / "mine.txt").read_text().splitlines())
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before  # untouched
    (folder / "run.json").unlink()  # checkpoints from before run.json existed are just as much another run's
    assert tg.cli(argv(shard_dir, tmp_path, run_id="mine", save_every=2, log_dir=str(tmp_path / "third"))) == 1
    assert "holds step_3. HINT" in capsys.readouterr().err


def test_two_runs_started_at_once_with_one_run_id_cannot_both_own_its_checkpoints(tmp_path):
    import threading
    start, answers = threading.Barrier(8), []

    def claim(i):
        start.wait()
        answers.append(tg.claim_checkpoints(tmp_path / "ckpt" / "same", "same", tmp_path / f"log{i}.txt"))

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert answers.count(None) == 1 and all("belongs to run 'same'" in a for a in answers if a), answers


@pytest.mark.parametrize("failure", ["full disk", "Ctrl-C"])
def test_a_checkpoint_that_fails_leaves_nothing_behind_and_names_the_disk(shard_dir, tmp_path, monkeypatch, capsys,
                                                                        failure):
    real_open = open

    class FullDisk(io.RawIOBase):  # what a file on a full disk does: the write raises ENOSPC
        def writable(self):
            return True

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def full_disk_open(path, mode="r", *a, **k):
        if ".partial" in str(path) and "w" in mode:
            if failure == "Ctrl-C":
                raise KeyboardInterrupt
            real_open(path, mode).close()  # the file exists, half written
            return FullDisk()
        return real_open(path, mode, *a, **k)

    monkeypatch.setattr(tg, "open", full_disk_open, raising=False)
    status = tg.cli(argv(shard_dir, tmp_path, run_id="disk", save_every=3))
    err = capsys.readouterr().err
    folder = tmp_path / "ckpt" / "disk"
    if failure == "full disk":
        assert status == 1 and err.strip() == (f"error: cannot write the checkpoint {folder / 'step_3'}: No "
                                               "space left on device. HINT: free disk space or choose another "
                                               "--checkpoint_dir"), err
    else:
        assert status == 130 and err.strip() == "stopped: interrupted (Ctrl-C)"
    assert sorted(p.name for p in folder.iterdir()) == ["run.json"]  # no .step_3.partial
    assert log_lines(tmp_path, "disk")[-1].startswith("stopped: ")


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
    # 30 steps: enough that the signal after step 5 arrives mid-run, and few to resume
    command = [sys.executable, str(ROOT / "train_gpt.py")] + argv(shard_dir, tmp_path, run_id="sig", save_every=3,
                                                                   num_iterations=30, val_every=0)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # Ctrl-C's default, whatever this test was started from: a shell's background job ignores SIGINT, and so would
    # the trainer, which inherits that
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
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
        total = 30 + tiny_args().extension_iterations
        assert lines[-3].startswith(f"step:{step}/{total} ")
        result = tg.main(argv(shard_dir, tmp_path, run_id="after", resume=str(folder), num_iterations=30,
                              val_every=0))
        assert list(result["val_losses"]) == [0, total]  # step 0's from the checkpoint, the final one from the resume


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


# --- Bad input is refused before training, with a message and no traceback ---------------------------------------

@pytest.mark.parametrize("overrides, message", [
    (dict(muon_lr="nan"), "muon_lr=nan must be a finite number above 0. HINT: see --help; the default is 0.023"),
    (dict(adam_lr=-0.01), "adam_lr=-0.01 must be a finite number above 0"),
    (dict(muon_weight_decay="nan"), "muon_weight_decay=nan must be a finite number >= 0"),
    (dict(logit_offset="inf"), "logit_offset=inf must be a finite number"),
    (dict(logit_softcap=-1), "logit_softcap=-1.0 must be a finite number >= 0"),  # 0: no soft-cap (GPT-2)
    (dict(logit_temperature=0), "logit_temperature=0.0 must be a finite number above 0"),
    (dict(rope_base=0), "rope_base=0.0 must be a finite number above 0"),
    (dict(model_dim=0), "model_dim=0 must be above 0"),
    (dict(stage_lr_mul="1,nan,1"), "stage_lr_mul='1,nan,1': each multiplier must be a finite number above 0"),
    (dict(mtp_weights="1,nan"), "mtp_weights='1,nan': weights must be finite numbers >= 0"),
    (dict(adam_table="scalars:nan:0.9:0.99:0"), "lr_mul and wd_mul must be finite numbers >= 0"),
    (dict(window_blocks="0/2"), "window_blocks pair '0/2' must be short/long, two whole numbers of blocks >= 1"),
    (dict(max_doc_len="0"), "max_doc_len must be at least 1 per stage"),
    (dict(bigram_vocab_size=1), "bigram_vocab_size=1 leaves no row for bigrams"),
    (dict(mudd_gate_layer=0), "mudd_gate_layer must be at least 1"),
    (dict(micro_batch_split=3), "micro_batch_split=3 must cut every train_seq_len (64) into whole mask blocks of 16: "
     "each must be a multiple of 48. HINT: try --micro_batch_split=2 or 4"),
    (dict(collective_timeout_s=0), "collective_timeout_s=0 must be above 0"),
    (dict(run_id="../../escaped"), "run_id='../../escaped' must be a plain name (letters, digits, - _ .; no leading "
     "dot): it names the log file and the checkpoint folder. HINT"),
    (dict(run_id=".hidden"), "run_id='.hidden' must be a plain name"),
    (dict(run_id="a/b"), "run_id='a/b' must be a plain name"),
    (dict(log_dir="A_FILE"), "log_dir='A_FILE' is a file, not a folder. HINT: give a folder"),
    (dict(checkpoint_dir="A_FILE"), "checkpoint_dir='A_FILE' is a file, not a folder. HINT: give a folder"),
])
def test_senseless_settings_are_refused_with_a_hint_and_no_traceback(shard_dir, tmp_path, capsys, overrides,
                                                                     message):
    work = tmp_path / "work"
    work.mkdir()
    (work / "A_FILE").write_text("not a folder\n")
    overrides = {k: (str(work / "A_FILE") if v == "A_FILE" else v) for k, v in overrides.items()}
    message = message.replace("'A_FILE'", repr(str(work / "A_FILE")))
    assert tg.cli(argv(shard_dir, work, **overrides)) == 1
    err = capsys.readouterr().err
    assert err.splitlines() == [err.strip()] and err.startswith("error: ") and message in err, err
    assert "Traceback" not in err
    assert not (work / "logs").exists() and not list(tmp_path.glob("*.txt"))  # refused before any log was made


def test_a_setting_given_twice_is_refused(capsys, tmp_path):
    assert tg.cli(["--preset=smoke", "--muon_lr=0.02", f"--log_dir={tmp_path}", "--muon_lr=0.03"]) == 1
    assert capsys.readouterr().err == ("error: --muon_lr is given twice (0.02, then 0.03): which one is meant? HINT: "
                                       "give each setting once\n")
    assert not list(tmp_path.iterdir())


def test_a_step_count_the_schedule_cannot_plan_is_refused_at_once_and_the_largest_accepted_plans_in_a_second():
    start = time.process_time()
    with pytest.raises(ValueError, match=r"num_iterations=1000000 \+ extension_iterations=15 is more than the 20,000 "
                                         r"steps a run plans before it starts \(in about a second\). HINT: lower "):
        tg.parse_args(["--num_iterations=1000000"])
    assert time.process_time() - start < 0.5
    for preset in tg.PRESETS:
        args = tg.parse_args([f"--preset={preset}", "--extension_iterations=0", f"--num_iterations={tg.MAX_STEPS}"])
        start = time.process_time()
        assert len(tg.full_schedule(args)) == tg.MAX_STEPS + 1
        assert time.process_time() - start < 1.0, preset


@pytest.mark.parametrize("argv, message", [
    (["--preset=smoke", "--model_dim=0"], "model_dim=0 must be above 0. HINT: see --help; --preset=smoke uses 128"),
    (["--preset=smoke", "--train_files="], "train_files is empty: it is the glob of the shards to read. HINT: see "
     "--help; --preset=smoke uses "),
    (["--val_files= "], "val_files is empty: it is the glob of the shards to read. HINT: see --help; the default is "
     "data/fineweb10B/fineweb_val_*.bin"),
    ([f"--run_id={'r' * 201}"], "run_id is 201 characters long: at most 200, as it names files (most file systems "
     "allow 255 bytes). HINT"),
    (["--preset=smoke", "--train_files=SHARD_FOLDER"], "'SHARD_FOLDER' names the folder SHARD_FOLDER, not shard files. "
     "HINT: give a glob of the files, e.g. 'SHARD_FOLDER/*_train_*.bin'"),
    (["--preset=smoke", "--resume=A_FILE", "--num_iterations=4"], "resume='A_FILE' is a file, not a folder. HINT"),
    (["--preset=smoke", "--resume=NOWHERE", "--num_iterations=4"], "resume='NOWHERE' is not a folder. HINT"),
    (["--preset=smoke", "--num_iterations=20001"], "num_iterations=20001 + extension_iterations=2 is more than the "
     "20,000 steps a run plans before it starts (in about a second). HINT: lower --num_iterations; --preset=smoke "
     "uses 12"),
])
def test_messages_name_the_real_cause(tmp_path, capsys, argv, message):
    (tmp_path / "A_FILE").write_text("x\n")
    (tmp_path / "SHARD_FOLDER").mkdir()
    names = {name: str(tmp_path / name) for name in ("A_FILE", "SHARD_FOLDER", "NOWHERE")}
    for name, path in names.items():
        argv = [a.replace(name, path) for a in argv]
        message = message.replace(name, path)
    assert tg.cli([*argv, f"--log_dir={tmp_path / 'logs'}"]) == 1
    err = capsys.readouterr().err
    assert err.splitlines() == [err.strip()] and err.startswith(f"error: {message}"), err


@pytest.mark.parametrize("preset, overrides", [
    ("smoke_2025_08_23", dict(attn_gate_dim=0)),  # the 2025-08-23 recipe without its sparse attention gate
    ("smoke", dict(ve_gate_dim=0, attn_gate_dim=4, mudd_gate_layer=5, dc_window=0, bigram_vocab_size=2)),
    # GPT-2 with document masks, positions counted from each BOS, BOS-aligned windows, Muon and no clipping
    ("smoke_gpt2_baseline", dict(context_len=0, bos_aligned=True, use_muon=True, grad_clip=0)),
    # the GPT-2 baseline's parts inside the records, one code path: each setting works on its own
    ("smoke_2025_08_23", dict(layer_norm=True, mlp_activation="gelu", linear_bias=True, use_rotary=False,
                              use_yarn=False, pos_embed_len=128, context_len=256, bos_aligned=False, use_muon=False,
                              adamw=True, grad_clip=1.0, lr_warmup_steps=2, cooldown_shape="cosine",
                              adam_table="embed:75:0.8:0.95:0 value_embeds:75:0.8:0.95:0 lm_head:1:0.8:0.95:0 "
                                         "scalars:5:0.8:0.95:0 pos_embed:1:0.9:0.95:1 matrices:1:0.9:0.95:1 "
                                         "biases:1:0.9:0.95:0 norms:1:0.9:0.95:0")),
    ("smoke", dict(tie_embed=True, tie_embed_stages=0, logit_softcap=0.0, use_qk_norm=False, use_embed_norm=False,
                   init_std=0.02)),
])
def test_settings_at_their_edges_still_train(shard_dir, tmp_path, preset, overrides):
    small = dict(num_iterations=4, extension_iterations=0, val_every=0, warmup_steps=0, val_tokens=1024,
                 val_seq_len=256, train_files=str(shard_dir / "r_train_*.bin"),
                 val_files=str(shard_dir / "r_val_*.bin"), log_dir=str(tmp_path),
                 **({"train_seq_len": "256"} if preset == "smoke" else {}))
    result = tg.main([f"--preset={preset}"] + [f"--{k}={v}" for k, v in {**small, **overrides}.items()])
    assert all(np.isfinite(list(result["val_losses"].values())))
    assert result["val_losses"][4] < result["val_losses"][0]


@pytest.mark.slow
def test_the_one_a100_recipe_at_4_layers_trains_on_the_sample_text(tmp_path):
    """smoke_one_a100 as CI runs it, on data/sample/: 10 steps, warm-up, hold and cosine cooldown; the loss falls
    from the uniform guess of the zero-init head, and the log states the parameter count."""
    result = tg.main(["--preset=smoke_one_a100", f"--log_dir={tmp_path}"])
    losses = result["val_losses"]
    assert list(losses) == [0, 5, 10] and losses[0] == pytest.approx(np.log(50304), abs=1e-4)
    assert losses[0] > losses[5] + 1 > losses[10] + 2  # measured: 10.826, 8.326, 6.413
    count = 2 * 50304 * 128 + 4 * (4 * 128**2 + 2 * 128 * 512)  # embedding, head, 4 blocks: no scalars
    assert f"model: {count:,} parameters" in Path(result["log_path"]).read_text().splitlines()


@pytest.mark.parametrize("which", ["train", "val"])
def test_a_token_id_beyond_the_vocabulary_is_refused_naming_the_file_and_the_id(shard_dir, tmp_path, capsys, which):
    bad = tmp_path / f"bad_{which}_000001.bin"
    tokens = tg.load_shard(shard_dir / f"r_{which}_00000{1 if which == 'train' else 0}.bin").numpy().copy()
    tokens[100] = 50304  # the first id past the padded vocabulary, early enough to be in the validation tokens
    tg.write_shard(bad, tokens)
    assert tg.cli(argv(shard_dir, tmp_path, run_id="bad", **{f"{which}_files": str(bad)})) == 1
    err = capsys.readouterr().err
    expected = (f"shard {bad} holds token id 50304 (token 100 of the file), but vocab_size=50304: it was made with "
                "another tokenizer, or is corrupt. HINT: rebuild it")
    assert err.startswith(f"error: {expected}") and "Traceback" not in err, err
    assert log_lines(tmp_path, "bad")[-1].startswith(f"stopped: {expected}")
    assert not any(s.startswith("step:1/") for s in log_lines(tmp_path, "bad"))  # before the first step
    tokens[100] = 50303  # a padding id is not GPT-2's either
    tg.write_shard(bad, tokens)
    with pytest.raises(tg.ShardError, match="holds token id 50303 .* one of the padding ids 50257-50303"):
        tg.check_token_ids(tokens, 50304, bad)
    tokens[100] = 50256  # the last id GPT-2 makes is fine
    tg.write_shard(bad, tokens)
    assert tg.check_token_ids(tokens, 50304, bad) is tokens


# --- Smaller GPUs: each window as micro_batch_split chunks ----------------------------------------------------------

class Recording:
    """The model as train_step sees it, recording the chunks and window indices it is given."""

    def __init__(self, model: tg.GPT):
        self.model, self.inputs, self.targets, self.indices = model, [], [], []

    def set_window_index(self, index: int):
        self.indices.append(index)
        self.model.set_window_index(index)

    def __call__(self, inputs, targets):
        self.inputs.append(inputs)
        self.targets.append(targets)
        return self.model(inputs, targets)


@pytest.mark.parametrize("split", [2, 4])
def test_split_windows_are_the_same_tokens_in_smaller_micro_steps(shard_dir, split):
    import torch

    losses, seen = {}, {}
    for k in (1, split):
        args = tiny_args(micro_batch_split=k, dtype="float32")
        torch.manual_seed(0)
        model = tg.GPT(args)
        rt = tg.Runtime(0, 1, torch.device("cpu"))
        loader = tg.TrainLoader(tg.find_shards(str(shard_dir / "r_train_*.bin")), 64, args.windows_per_step, 0, 1,
                                rt.device)
        plan = tg.plan_step(0, args)
        model.set_step(plan)
        recording = Recording(model)
        batches = loader.next_step(plan.seq_len, plan.max_doc_len)
        losses[k] = tg.train_step(recording, tg.build_optimizers(model, args, rt), batches, plan, args)[0].item()
        seen[k] = recording
        assert len(recording.inputs) == k * args.windows_per_step and recording.indices == list(range(k * 4))
        assert {len(x) for x in recording.inputs} == {plan.seq_len // k}
        assert torch.equal(torch.cat(recording.inputs), torch.cat([x for x, _ in batches]))
        assert torch.equal(torch.cat(recording.targets), torch.cat([y for _, y in batches]))
        assert sum(map(len, recording.inputs)) == plan.tokens == 4 * 64  # the step's tokens do not change
    assert all(torch.equal(a, b) for a, b in zip(torch.cat(seen[1].inputs), torch.cat(seen[split].inputs)))
    assert losses[split] == pytest.approx(losses[1], rel=0.05)  # only the chunk boundaries differ
    with torch.device("meta"):  # FP8 MLP scales: one pair per chunk of the step
        assert tg.GPT(tiny_args(micro_batch_split=split, use_fp8_mlp=True)).mlp_act_scales.shape == (6, 4 * split)


def test_a_split_run_trains_and_lands_close_to_the_unsplit_run(shard_dir, tmp_path):
    whole = tg.main(argv(shard_dir, tmp_path, run_id="whole"))
    split = tg.main(argv(shard_dir, tmp_path, run_id="split", micro_batch_split=2))
    assert split["val_losses"][11] < split["val_losses"][0] - 0.5
    assert split["val_losses"][0] == whole["val_losses"][0]  # validation is not split
    assert split["val_losses"][11] == pytest.approx(whole["val_losses"][11], rel=0.03)
    assert split["val_losses"][11] != whole["val_losses"][11]  # the chunks really were trained apart


@pytest.mark.parametrize("error", ["torch.OutOfMemoryError", "RuntimeError"])
def test_out_of_memory_names_the_micro_batch_split_knob(shard_dir, tmp_path, monkeypatch, capsys, error):
    import torch

    kind = torch.OutOfMemoryError if error == "torch.OutOfMemoryError" else RuntimeError
    text = ("CUDA out of memory. Tried to allocate 9.00 GiB" if kind is torch.OutOfMemoryError else
            "[enforce fail at alloc_cpu.cpp:117] out of memory")

    def hidden(self, input_seq):
        raise kind(text)

    monkeypatch.setattr(tg.GPT, "hidden", hidden)
    assert tg.cli(argv(shard_dir, tmp_path, run_id="oom")) == 1
    err = capsys.readouterr().err
    reason = (f"out of memory ({kind.__name__}: {text}). HINT: --micro_batch_split=2 (or 4) runs each window as 2 (4) "
              "chunks, with 1/2 (1/4) of the activation memory and the same batch (README: Smaller GPUs)")
    assert err.strip().splitlines() == [f"error: {reason}"], err
    assert log_lines(tmp_path, "oom")[-1] == f"stopped: {reason}"


# --- A dead rank ends the job; more nodes -------------------------------------------------------------------------

def worker_pid(launcher: subprocess.Popen, rank: int, timeout: float = 120) -> int:
    """The pid of torchrun's worker with RANK=rank, from /proc (Linux)."""
    start = time.time()
    while time.time() - start < timeout:
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == launcher.pid and \
                        f"\0RANK={rank}\0" in "\0" + (stat.parent / "environ").read_text():
                    return int(stat.parent.name)
            except (OSError, ValueError, IndexError):
                continue  # a process that ended while we looked
        time.sleep(0.2)
    raise AssertionError(f"no worker with RANK={rank} under pid {launcher.pid}")


FAILING_RANK = '''import os, sys
sys.path.insert(0, sys.argv[1])
import torch
import train_gpt as tg
if os.environ["RANK"] == "1":  # rank 1 runs out of memory in its 40th forward pass
    calls, hidden = [0], tg.GPT.hidden
    def failing(self, input_seq):
        calls[0] += 1
        if calls[0] == 40:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")
        return hidden(self, input_seq)
    tg.GPT.hidden = failing
sys.exit(tg.cli(sys.argv[2:]))
'''


@pytest.mark.slow
@pytest.mark.parametrize("fate", ["killed", "stopped", "out_of_memory"])
def test_a_lost_rank_ends_the_job_and_rank_0_names_it(shard_dir, tmp_path, fate):
    """torchrun --nproc_per_node=2 (gloo): rank 1 is killed (SIGKILL), stopped (SIGSTOP: hung), or fails on its own;
    rank 0's log ends with one stopped: line naming rank 1, within the collective timeout and the roll call."""
    timeout = 10
    script = tmp_path / "failing_rank.py"
    script.write_text(FAILING_RANK)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
               str(ROOT)] + argv(shard_dir, tmp_path, run_id="lost", num_iterations=200, val_every=0,
                                 collective_timeout_s=timeout)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    log = tmp_path / "logs" / "lost.txt"
    try:
        wait_for(log, "step:5/", launcher)
        rank1 = worker_pid(launcher, 1)
        start = time.time()
        if fate != "out_of_memory":
            os.kill(rank1, signal.SIGKILL if fate == "killed" else signal.SIGSTOP)
        wait_for(log, "\nstopped: ", launcher, timeout=timeout + 60)
        noticed = time.time() - start
        if fate == "stopped":
            assert noticed < timeout + 5 + 10, noticed  # the collective timeout, the roll call, a margin
            os.kill(rank1, signal.SIGKILL)  # else torchrun waits 30 s for the stopped process to take its SIGTERM
        out, err = launcher.communicate(timeout=60)
        ended = time.time() - start
    finally:
        launcher.kill()
    lines = log.read_text().splitlines()
    assert sum(s.startswith("stopped: ") for s in lines) == 1 and lines[-1].startswith("stopped: a collective failed: ")
    if fate == "out_of_memory":  # rank 1's own last word reaches rank 0's log
        assert "rank 1 said 'error: out of memory (OutOfMemoryError: CUDA out of memory. Tried to allocate 9.00 " \
               "GiB). HINT: --micro_batch_split=2" in lines[-1], lines[-1]
    else:
        assert "rank 1 died or hung (no word from it within 5 s); rank 0 saw RuntimeError" in lines[-1], lines[-1]
    assert lines[-1].endswith("HINT: look at the lost rank's own output and machine; with --save_every, continue "
                              "from the last checkpoint with --resume")
    assert f"error: {lines[-1].removeprefix('stopped: ')}" in err.splitlines()
    assert launcher.returncode != 0 and ended < timeout + 60, ended
    print(f"{fate}: stopped line after {noticed:.1f} s, job ended after {ended:.1f} s")


@pytest.mark.slow
def test_two_nodes_through_torchrun_rendezvous_train_as_one_process(shard_dir, tmp_path):
    """Two torchrun launches, one rank each, meet at a c10d rendezvous (as two machines would) and give the val
    losses of one process that accumulates over both ranks' windows."""
    import socket

    settings = argv(shard_dir, tmp_path, run_id="nodes", num_iterations=6, extension_iterations=0, val_every=3)
    one = run_dumping_metrics([sys.executable], [s for s in settings if "run_id" not in s], tmp_path / "one.json")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "dump_metrics.py"  # written by run_dumping_metrics: train_gpt.main, metrics to a JSON file
    start, env = time.time(), {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                               "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=test_nodes",
                               str(script), str(ROOT), str(tmp_path / "two.json")] + settings,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) for _ in range(2)]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    two = json.loads((tmp_path / "two.json").read_text())
    assert "(world size 2, device cpu)" in "".join(outputs)
    assert one["val_losses"].keys() == two["val_losses"].keys() == {"0", "3", "6"}
    for step, loss in one["val_losses"].items():
        assert abs(two["val_losses"][step] - loss) / loss < 1e-5, (step, loss, two["val_losses"][step])
    print(f"two nodes: {time.time() - start:.1f} s")
