"""Tests of setup.sh, the set-up behind README's two commands (run.sh, test.sh), and of how CI calls them.

setup.sh runs here in a copy of the repository whose .venv/bin/python is a stand-in: `python -m pip ...` is recorded
instead of run, anything else runs in this test's Python (which has torch 2.13.0). A fake nvidia-smi says whether the
machine has a GPU, and SPEEDRUN_TORCH_INDEX points at a local server (reachable) or a closed port (unreachable). The
real thing, a new .venv from nothing, is what CI does on every run: .ci/run calls ./test.sh in a fresh clone.
"""

import functools
import http.server
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
TORCH_HERE = torch.__version__  # what the stand-in python reports when setup.sh asks for torch's version
CUDA_HERE = torch.version.cuda or "none"
UNREACHABLE = "http://127.0.0.1:1/whl"  # nothing listens on port 1: refused at once


@pytest.fixture
def repo(tmp_path) -> Path:
    """A copy of setup.sh and requirements.txt with a stand-in .venv; pip calls go to tmp_path/pip.log."""
    repo = tmp_path / "repo"
    (repo / ".venv" / "bin").mkdir(parents=True)
    shutil.copy(ROOT / "setup.sh", repo)
    shutil.copy(ROOT / "requirements.txt", repo)
    python = repo / ".venv" / "bin" / "python"
    python.write_text(f'#!/bin/sh\nif [ "$1" = -m ] && [ "$2" = pip ]; then\n    echo "$*" >> "{tmp_path}/pip.log"\n'
                      f'    exit 0\nfi\nexec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    return repo


def fake_nvidia_smi(folder: Path, gpus: int) -> Path:
    folder.mkdir(exist_ok=True)
    script = folder / "nvidia-smi"
    lines = "".join(f'echo "GPU {i}: NVIDIA H100 80GB HBM3 (UUID: GPU-{i})"\n' for i in range(gpus))
    script.write_text("#!/bin/sh\n" + (lines or 'echo "NVIDIA-SMI has failed: no driver" >&2\nexit 9\n'))
    script.chmod(0o755)
    return folder


def setup(repo: Path, *, gpus: int = 0, index: str = UNREACHABLE, **env) -> tuple[subprocess.CompletedProcess, list]:
    """Runs `bash setup.sh` in repo; returns the result and the pip calls it made (each as an argument string)."""
    fake_bin = fake_nvidia_smi(repo.parent / "bin", gpus)
    environment = {"PATH": f"{fake_bin}:/usr/bin:/bin", "HOME": str(repo.parent), "SPEEDRUN_TORCH_INDEX": index,
                   **env}
    log = repo.parent / "pip.log"
    log.unlink(missing_ok=True)
    result = subprocess.run(["bash", str(repo / "setup.sh")], capture_output=True, text=True, env=environment,
                            timeout=300)
    return result, log.read_text().splitlines() if log.exists() else []


@pytest.fixture
def torch_index(tmp_path):
    """A local stand-in for the PyTorch wheel index: /whl/cpu/torch/ and /whl/cu128/torch/ answer 200."""
    root = tmp_path / "index"
    for variant in ("cpu", "cu128"):
        (root / "whl" / variant / "torch").mkdir(parents=True)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/whl"
    server.shutdown()


def test_installs_what_is_missing_then_is_a_no_op(repo):
    result, pip = setup(repo)
    assert result.returncode == 0, result.stderr
    assert f"setup: torch {TORCH_HERE} is already installed" in result.stderr
    assert pip == [f"-m pip install -q -r {repo}/requirements.txt"]  # torch 2.13.0 was there: only the requirements
    assert "setup: .venv is ready (torch" in result.stderr
    assert (repo / ".venv" / ".speedrun-setup").is_file()

    again, pip = setup(repo)
    assert again.returncode == 0 and pip == [], again.stderr
    assert again.stderr.splitlines() == [f"setup: .venv is ready (torch {TORCH_HERE}, CUDA {CUDA_HERE}, Python "
                                         f"{sys.version.split()[0]}); nothing to install",
                                         "setup: to use .venv in your shell: . .venv/bin/activate"]  # run on its own

    with (repo / "requirements.txt").open("a") as f:  # a new requirement: installed, torch left alone
        f.write("tabulate\n")
    changed, pip = setup(repo)
    assert changed.returncode == 0 and pip == [f"-m pip install -q -r {repo}/requirements.txt"], changed.stderr


@pytest.mark.skipif(torch.version.cuda is not None, reason="the stand-in's torch must be a CPU build")
def test_a_gpu_machine_gets_the_cuda_build_from_the_pytorch_index(repo, torch_index):
    result, pip = setup(repo, gpus=2, index=torch_index)
    assert result.returncode == 0, result.stderr
    assert "but this machine wants cu128" in result.stderr and "2 GPU(s) found: the CUDA build" in result.stderr
    assert pip == [f"-m pip install torch==2.13.0+cu128 --index-url {torch_index}/cu128",
                   f"-m pip install -q -r {repo}/requirements.txt"]


@pytest.mark.skipif(torch.version.cuda is not None, reason="the stand-in's torch must be a CPU build")
def test_without_the_pytorch_index_torch_comes_from_pips_own_index(repo):
    result, pip = setup(repo, gpus=1)
    assert result.returncode == 0, result.stderr
    assert f"{UNREACHABLE}/cu128 cannot be reached from here: installing torch==2.13.0 from pip's configured index" \
        in result.stderr
    assert pip[0] == "-m pip install torch==2.13.0"


def test_a_cpu_machine_without_torch_gets_the_cpu_build(repo, torch_index):
    python = repo / ".venv" / "bin" / "python"  # a venv whose python has no torch at all
    python.write_text(python.read_text().replace('exec "', 'case "$*" in *"import torch"*) exit 1;; esac\nexec "'))
    result, pip = setup(repo, index=torch_index)
    assert "no GPU found: the CPU build" in result.stderr
    assert pip[0] == f"-m pip install torch==2.13.0+cpu --index-url {torch_index}/cpu"


def test_the_docker_image_installs_nothing(tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(ROOT / "setup.sh", bare)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')  # one with torch
    (tmp_path / "bin" / "python").chmod(0o755)
    result, pip = setup(bare, SPEEDRUN_USE_SYSTEM_PYTHON="1")
    assert result.returncode == 0 and pip == []
    assert "SPEEDRUN_USE_SYSTEM_PYTHON=1: using" in result.stderr and "nothing installed" in result.stderr
    assert not (bare / ".venv").exists()
    assert "ENV SPEEDRUN_USE_SYSTEM_PYTHON=1" in (ROOT / "Dockerfile").read_text().splitlines()


def test_a_system_python_without_torch_is_refused_with_what_to_install(tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(ROOT / "setup.sh", bare)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "python").write_text("#!/bin/sh\nexit 1\n")  # a python that cannot import torch
    (tmp_path / "bin" / "python").chmod(0o755)
    result, pip = setup(bare, SPEEDRUN_USE_SYSTEM_PYTHON="1")
    assert result.returncode == 1 and pip == [] and not (bare / ".venv").exists()
    assert "cannot import torch and numpy. HINT: pip install torch==2.13.0" in result.stderr


def test_too_old_a_python_is_refused_with_a_hint(tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(ROOT / "setup.sh", bare)
    old = tmp_path / "python3.8"
    old.write_text('#!/bin/sh\n[ "$1" = -V ] && echo "Python 3.8.10" && exit 0\nexit 1\n')
    old.chmod(0o755)
    result, pip = setup(bare, PYTHON=str(old))
    assert result.returncode == 1 and pip == []
    assert "Python 3.8.10" in result.stderr and "needs Python 3.10 or newer" in result.stderr
    assert not (bare / ".venv").exists()


def test_a_broken_venv_is_named(repo):
    (repo / ".venv" / "bin" / "python").write_text("#!/bin/sh\nexit 127\n")
    result, _ = setup(repo)
    assert result.returncode == 1 and "exists but its python does not run" in result.stderr
    assert "rm -rf .venv" in result.stderr


def test_ci_runs_exactly_the_readme_commands():
    readme = (ROOT / "README.md").read_text()
    block = readme.split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in block.splitlines() if line.strip()]
    assert commands == ["./run.sh", "./test.sh"]
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.lstrip().startswith("#")]
    assert ci[-1] == "exec ./test.sh"
    for script in ("run.sh", "test.sh", "setup.sh", ".ci/run"):
        assert os.access(ROOT / script, os.X_OK), f"{script} is not executable"
    for script in ("run.sh", "test.sh"):  # both set up first
        assert ". ./setup.sh" in (ROOT / script).read_text().splitlines()
