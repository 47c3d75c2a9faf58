"""train_gpt.py as a new user meets it: --help, the data path, the world-size refusal and warnings under torchrun."""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import train_gpt as tg  # noqa: E402

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]


def clean_env(**extra) -> dict:
    """This process's environment without the variables that would change where train_gpt looks or how it runs."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "DATA_PATH")}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


# ----------------------------------------------------------------------------- --help


def meaning_columns(text: str) -> list[int]:
    """Where the meaning starts on each setting's row (a row too long for the column has it on the next line)."""
    lines = text.splitlines()
    columns = []
    for i, line in enumerate(lines):
        if not line.startswith("  --"):
            continue
        m = re.match(r"  --\w+=(?:'[^']*'|[^'\s]\S*|)( +)\S", line)  # a value with spaces is quoted
        columns.append(m.end() - 1 if m else len(lines[i + 1]) - len(lines[i + 1].lstrip()))
    return columns


def test_help_columns_line_up():
    result = subprocess.run([sys.executable, str(ROOT / "train_gpt.py"), "--help"], capture_output=True, text=True,
                            timeout=120, env=clean_env())
    assert result.returncode == 0, result.stderr
    columns = meaning_columns(result.stdout)
    assert len(columns) == len(tg.dataclasses.fields(tg.Hyperparameters)) and len(set(columns)) == 1, columns
    assert "--num_layers=11" in result.stdout and "[speedrun:" not in result.stdout  # defaults: nothing differs
    assert "--adam_table='scalars:5:0.9:0.99:0 smear_gate:" in result.stdout  # quoted, ready for a shell


def test_help_of_a_preset_shows_its_values():
    text = tg.usage(["--preset=smoke"])
    assert "settings under --preset=smoke (value, meaning)" in text
    assert re.search(r"^  --num_layers=6 +transformer blocks \[speedrun: 11\]$", text, re.M)
    assert re.search(r"^  --use_compile=False +.*\[speedrun: True\]$", text, re.M)
    assert re.search(r"^  --attn_scale=0.1 +softmax scale \(not 1/sqrt\(head_dim\)\)$", text, re.M)  # the same
    assert len(set(meaning_columns(text))) == 1
    overridden = tg.usage(["--preset=smoke_2025_08_23", "--num_layers=2", "--attn_pattern=L-",
                           "--value_embed_pattern=0-", "--skip_connections=0>1"])
    assert "--preset=smoke_2025_08_23 and the overrides given" in overridden and "  --num_layers=2 " in overridden
    result = subprocess.run([sys.executable, str(ROOT / "train_gpt.py"), "--preset=smoke", "--help"],
                            capture_output=True, text=True, timeout=120, env=clean_env())
    assert result.returncode == 0 and "--num_layers=6 " in result.stdout
    bad = subprocess.run([sys.executable, str(ROOT / "train_gpt.py"), "--preset=tiny", "--help"],
                         capture_output=True, text=True, timeout=120, env=clean_env())
    assert bad.returncode == 1 and "unknown preset 'tiny'; choose one of speedrun, smoke" in bad.stderr
    assert "Traceback" not in bad.stderr


# ----------------------------------------------------------------------------- where the shards are looked up


def test_relative_shard_globs_fall_back_to_the_repository(tmp_path, monkeypatch):
    repo, elsewhere, data_path = tmp_path / "repo", tmp_path / "elsewhere", tmp_path / "data_path"
    for root in (repo, data_path):
        (root / "data" / "fineweb10B").mkdir(parents=True)
        tg.write_shard(root / "data" / "fineweb10B" / "fineweb_val_000000.bin", np.arange(10))
    elsewhere.mkdir()
    monkeypatch.setattr(tg, "__file__", str(repo / "train_gpt.py"))  # as if train_gpt.py lived in repo/
    monkeypatch.chdir(elsewhere)
    monkeypatch.delenv("DATA_PATH", raising=False)
    pattern = tg.Hyperparameters().val_files
    assert tg.find_shards(pattern) == [repo / pattern.replace("*", "000000")]  # nothing here: the repository's
    (elsewhere / "data" / "fineweb10B").mkdir(parents=True)
    tg.write_shard(elsewhere / "data" / "fineweb10B" / "fineweb_val_000001.bin", np.arange(10))
    assert tg.find_shards(pattern) == [elsewhere / "data" / "fineweb10B" / "fineweb_val_000001.bin"]  # here first
    monkeypatch.setenv("DATA_PATH", str(data_path))  # DATA_PATH, when set, is the only place
    assert tg.find_shards(pattern) == [data_path / pattern.replace("*", "000000")]
    monkeypatch.setenv("DATA_PATH", str(tmp_path / "empty"))
    with pytest.raises(tg.ShardError, match=re.escape(f"no shards match '{tmp_path / 'empty' / pattern}'")):
        tg.find_shards(pattern)
    monkeypatch.delenv("DATA_PATH")
    with pytest.raises(tg.ShardError) as e:
        tg.find_shards("data/none_*.bin")
    assert f"'{elsewhere / 'data/none_*.bin'}' or '{repo / 'data/none_*.bin'}'" in str(e.value)


@pytest.mark.slow
def test_a_run_started_in_another_directory_finds_the_repositorys_shards(tmp_path):
    argv = ["--preset=smoke_2025_08_23", "--train_files=data/sample/sample_train_*.bin",
            "--val_files=data/sample/sample_val_*.bin", "--val_tokens=4096", "--num_iterations=1", "--val_every=0",
            "--warmup_steps=0",
            f"--log_dir={tmp_path}"]
    result = subprocess.run([sys.executable, str(ROOT / "train_gpt.py"), *argv], capture_output=True, text=True,
                            cwd=tmp_path, timeout=600, env=clean_env())
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step:1/1 val_loss:" in result.stdout


# ----------------------------------------------------------------------------- torchrun


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["world_size", "no_shards"])
def test_a_run_refused_under_launch_py_ends_on_our_line_with_a_failing_status(tmp_path, fault):
    """launch.py (torchrun's parser and launcher): a world size that cannot keep the batch, or shards that are not
    there, are said once, by rank 0, and the last line is launch.py's, not torchrun's traceback; the exit status is the
    rank's 1."""
    nproc, extra = (3, []) if fault == "world_size" else (2, ["--train_files=nowhere/none_*.bin"])
    env = clean_env()
    if fault == "no_shards":  # unset: torchrun sets it for the ranks, and must not print its banner about it
        del env["OMP_NUM_THREADS"]
    result = subprocess.run([sys.executable, str(ROOT / "launch.py"), "--standalone", f"--nproc_per_node={nproc}",
                             str(ROOT / "train_gpt.py"), "--preset=smoke_2025_08_23", f"--log_dir={tmp_path}", *extra],
                            capture_output=True, text=True, timeout=600, env=env)
    output = result.stdout + result.stderr
    assert "OMP_NUM_THREADS" not in output and "*****" not in output, output
    said = ("world size 3 cannot keep the batch of windows_per_step=4 windows; use a world size among [1, 2, 4] (e.g. "
            "--nproc_per_node=2); nothing was run") if fault == "world_size" else "nowhere/none_*.bin"
    assert sum(said in line for line in output.splitlines()) == 1, output
    assert "Traceback" not in output and "ChildFailedError" not in output and "SIGTERM" not in output, output
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("launch: rank ") and "(exit status 1)" in lines[-1], output
    assert lines[-2].startswith("error: ") and said in lines[-2], output
    assert result.returncode == 1
    logs = list(tmp_path.iterdir())
    if fault == "world_size":
        assert logs == []
    else:  # the run had started: its log ends with the same reason
        last = logs[0].read_text().splitlines()[-1]
        assert len(logs) == 1 and last == "stopped: " + lines[-2].removeprefix("error: ")


@pytest.mark.slow
def test_torchrun_itself_ends_a_refused_world_size_with_a_failing_status(tmp_path):
    result = subprocess.run([*TORCHRUN, "--nproc_per_node=3", str(ROOT / "train_gpt.py"), "--preset=smoke_2025_08_23",
                             f"--log_dir={tmp_path}"], capture_output=True, text=True, timeout=600, env=clean_env())
    assert result.returncode != 0 and "world size 3 cannot keep the batch" in result.stderr


@pytest.mark.slow
def test_two_ranks_train_without_deprecation_warnings(tmp_path):
    """The collectives are the current ones: torch 2.13 deprecates reduce_scatter_tensor and all_gather_into_tensor."""
    shards = tmp_path / "shards"
    shards.mkdir()
    rng = np.random.default_rng(0)
    for name, n in (("t_val_000000.bin", 2048), ("t_train_000001.bin", 8192)):
        tokens = rng.integers(0, 1000, n)
        tokens[::50] = tg.BOS_ID
        tg.write_shard(shards / name, tokens)
    argv = ["--preset=smoke_2025_08_23", f"--train_files={shards}/t_train_*.bin", f"--val_files={shards}/t_val_*.bin",
            "--val_tokens=512", "--train_seq_len=128", "--val_seq_len=128", "--windows_per_step=4", "--num_layers=2",
            "--skip_connections=0>1", "--model_dim=64",
            "--num_heads=2", "--head_dim=32", "--mlp_hidden=128", "--attn_pattern=LS", "--value_embed_pattern=0-",
            "--block_size=32", "--max_window_tokens=64", "--num_iterations=2", "--val_every=0", "--warmup_steps=0",
            "--dtype=float32", "--use_fp8=false", "--use_compile=false", f"--log_dir={tmp_path}"]
    result = subprocess.run([*TORCHRUN, "--nproc_per_node=2", str(ROOT / "train_gpt.py"), *argv],
                            capture_output=True, text=True, timeout=600, env=clean_env())
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step:2/2 val_loss:" in result.stdout
    assert "Warning" not in result.stderr and "deprecated" not in result.stderr, result.stderr


# ----------------------------------------------------------------------------- every tool's bad command line

TOOLS = ["train_gpt.py", "launch.py", "train_extras.py", "sample.py", "export.py", "benchmark.py",
         "evals/hellaswag.py", "data/cached_fineweb10B.py", "data/tokenize_text.py", "data/shards.py",
         "data/make_sample.py", "data/fineweb.py", "records/compare.py", "records/curves.py"]


@pytest.mark.parametrize("tool", TOOLS)
def test_every_tool_answers_a_bad_command_line_in_one_line(tool):
    """An option no tool has: `error: ... HINT: ...` on one line, no usage text, no traceback; exit status 1 (2 for
    records/, whose 1 means that a claim does not hold)."""
    result = subprocess.run([sys.executable, tool, "--no_such_option=1"], cwd=ROOT, capture_output=True, text=True,
                            env=clean_env(), timeout=300)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == (2 if tool.startswith("records/") else 1), result.stderr
    assert len(lines) == 1 and "error: " in lines[0] and "HINT" in lines[0], lines  # (or a missing required one)


TWICE = {"sample.py": ["--checkpoint=x", "--temperature=1", "--temperature", "0.5"],
         "export.py": ["--checkpoint=x", "--out=a", "--out=b"],
         "evals/hellaswag.py": ["--checkpoint=x", "--limit=1", "--limit=2"],
         "data/tokenize_text.py": ["in.txt", "--out=o", "--name=x", "--name=y"],
         "data/shards.py": ["inspect", "x.bin", "--decode=1", "--decode=2"],
         "records/compare.py": ["runs", "--target=3", "--target=4"],
         "records/curves.py": ["run.txt", "--out=a.png", "--out=b.png"],
         "benchmark.py": ["--steps=2", "--steps=3"],
         "train_extras.py": ["--sample_tokens=1", "--sample_tokens=2"]}


@pytest.mark.parametrize("tool", TWICE)
def test_every_tool_refuses_an_option_given_twice(tool):
    """As train_gpt.py refuses a setting given twice: the last one is not silently taken; one line, no double HINT."""
    result = subprocess.run([sys.executable, tool, *TWICE[tool]], cwd=ROOT, capture_output=True, text=True,
                            env=clean_env(), timeout=300)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == (2 if tool.startswith("records/") else 1), result.stderr
    assert len(lines) == 1 and "is given twice" in lines[0] and lines[0].count("HINT") == 1, lines


def test_a_message_that_holds_its_own_hint_gets_no_second_one(tmp_path):
    (tmp_path / "a_file").write_text("x\n")
    result = subprocess.run([sys.executable, "data/tokenize_text.py", "in.txt", f"--out={tmp_path / 'a_file'}",
                             "--name=x"], cwd=ROOT, capture_output=True, text=True, env=clean_env(), timeout=300)
    assert result.returncode == 1 and result.stderr.count("HINT") == 1, result.stderr


def test_launch_py_answers_a_value_torchrun_refuses_in_one_line():
    result = subprocess.run([sys.executable, "launch.py", "--nproc_per_node=abc", "train_gpt.py"], cwd=ROOT,
                            capture_output=True, text=True, env=clean_env(), timeout=300)
    assert result.returncode == 1 and result.stderr.splitlines() == [
        "launch.py: error: Unsupported nproc_per_node value: abc. HINT: `torchrun --help` lists torchrun's options; "
        "then the script and its settings"], result.stderr
