#!/usr/bin/env bash
# setup.sh: make this project's Python environment, .venv, ready; run.sh and test.sh source it, and it can be run alone.
#   - creates .venv with python3 (or $PYTHON) if it is missing: Python 3.10 or newer;
#   - installs torch 2.13.0, the CUDA 12.8 build when `nvidia-smi -L` lists a GPU, else the CPU build, from the PyTorch
#     wheel index ($SPEEDRUN_TORCH_INDEX, default https://download.pytorch.org/whl); when that index cannot be reached,
#     torch==2.13.0 from pip's configured index instead, and it says so;
#   - installs requirements.txt;
#   - then writes .venv/.speedrun-setup: while torch's build, requirements.txt and the Python stay the same, the next
#     call installs nothing and takes well under a second.
# SPEEDRUN_USE_SYSTEM_PYTHON=1 (set in our Docker image) skips all of it: the python on PATH is used as it is.
# Sourced, it leaves .venv activated for the caller.

speedrun_setup() {
    local repo venv py key stamp variant gpus torch_now index pkg start=$SECONDS
    repo="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
    venv="$repo/.venv"
    stamp="$venv/.speedrun-setup"
    index="${SPEEDRUN_TORCH_INDEX:-https://download.pytorch.org/whl}"
    local torch_version=2.13.0 cuda_tag=cu128  # one tested torch for CI, the Docker image and users

    say() { echo "setup: $*" >&2; }

    if [ "${SPEEDRUN_USE_SYSTEM_PYTHON:-0}" = 1 ]; then
        say "SPEEDRUN_USE_SYSTEM_PYTHON=1: using $(command -v python || echo 'python (not found!)') as it is;" \
            "nothing installed"
        if ! python -c 'import torch, numpy' >/dev/null 2>&1; then
            say "error: that python cannot import torch and numpy. HINT: pip install torch==$torch_version and" \
                "pip install -r requirements.txt into it, or unset SPEEDRUN_USE_SYSTEM_PYTHON to let setup.sh make .venv"
            return 1
        fi
        return 0
    fi

    if [ -e "$venv" ] && ! "$venv/bin/python" -c "" >/dev/null 2>&1; then
        say "error: $venv exists but its python does not run (made by a Python that is gone?)." \
            "HINT: remove it (rm -rf .venv) and run this again"
        return 1
    fi
    if [ ! -e "$venv" ]; then
        py="${PYTHON:-python3}"
        if ! command -v "$py" >/dev/null 2>&1; then
            say "error: $py not found. HINT: install Python 3.10 or newer, or set PYTHON=/path/to/python3"
            return 1
        fi
        if ! "$py" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
            say "error: $("$py" -V 2>&1) at $(command -v "$py") is too old: this project needs Python 3.10 or newer." \
                "HINT: set PYTHON=/path/to/python3.12"
            return 1
        fi
        say "creating $venv with $("$py" -V 2>&1) ($(command -v "$py"))"
        if ! "$py" -m venv "$venv"; then
            rm -rf "$venv"
            say "error: could not create the virtual environment." \
                "HINT: on Debian or Ubuntu, apt-get install python3-venv; then run this again"
            return 1
        fi
    fi

    gpus=0
    if command -v nvidia-smi >/dev/null 2>&1; then
        gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    fi
    if [ "$(uname -s)" = Darwin ]; then
        variant=macos  # PyPI's macOS wheel is the CPU (and MPS) build
    elif [ "$gpus" -gt 0 ]; then
        variant="$cuda_tag"
    else
        variant=cpu
    fi
    key="torch $torch_version $variant; $("$venv/bin/python" -V 2>&1); requirements.txt $("$venv/bin/python" -c \
        'import hashlib, sys; print(hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest()[:16])' \
        "$repo/requirements.txt")"
    if [ -f "$stamp" ] && [ "$(head -n 1 "$stamp")" = "$key" ]; then
        say ".venv is ready ($(sed -n 2p "$stamp")); nothing to install"
        speedrun_activate "$venv"
        return 0
    fi
    rm -f "$stamp"

    torch_now=$("$venv/bin/python" -c 'import torch; print(torch.__version__, torch.version.cuda or "none")' \
        2>/dev/null || true)
    if [ "${torch_now%%[+ ]*}" = "$torch_version" ] && { [ "$variant" != "$cuda_tag" ] || \
            [ "${torch_now##* }" != none ]; }; then
        say "torch ${torch_now%% *} is already installed"
    else
        [ -n "$torch_now" ] && say "torch ${torch_now%% *} is installed, but this machine wants $variant"
        if [ "$variant" = macos ]; then
            pkg="torch==$torch_version"
            say "installing $pkg (macOS: PyPI's CPU build)"
            "$venv/bin/python" -m pip install "$pkg" || { say "error: pip could not install $pkg"; return 1; }
        elif "$venv/bin/python" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=15)' \
                "$index/$variant/torch/" >/dev/null 2>&1; then
            pkg="torch==$torch_version+$variant"
            say "installing $pkg from $index/$variant ($([ "$variant" = cpu ] && echo 'no GPU found: the CPU build,' \
                'about 0.2 GB' || echo "$gpus GPU(s) found: the CUDA build, several GB"))"
            "$venv/bin/python" -m pip install "$pkg" --index-url "$index/$variant" \
                || { say "error: pip could not install $pkg from $index/$variant"; return 1; }
        else
            pkg="torch==$torch_version"
            say "$index/$variant cannot be reached from here: installing $pkg from pip's configured index instead" \
                "(where that is PyPI, a CUDA build of several GB, which also runs on a CPU)"
            "$venv/bin/python" -m pip install "$pkg" || { say "error: pip could not install $pkg"; return 1; }
        fi
        torch_now=$("$venv/bin/python" -c 'import torch; print(torch.__version__, torch.version.cuda or "none")' \
            2>/dev/null)  # (without numpy yet, torch warns)
    fi

    say "installing requirements.txt"
    "$venv/bin/python" -m pip install -q -r "$repo/requirements.txt" \
        || { say "error: pip could not install requirements.txt (see above)"; return 1; }
    printf '%s\n%s\n' "$key" "torch ${torch_now%% *}, CUDA ${torch_now##* }, $("$venv/bin/python" -V 2>&1)" >"$stamp"
    say ".venv is ready ($(sed -n 2p "$stamp")), set up in $((SECONDS - start)) s"
    speedrun_activate "$venv"
}

speedrun_activate() {
    export VIRTUAL_ENV="$1"
    export PATH="$1/bin:$PATH"
    hash -r 2>/dev/null || true
}

speedrun_setup || { [ "${BASH_SOURCE[0]}" != "$0" ] && return 1; exit 1; }
if [ "${BASH_SOURCE[0]}" = "$0" ] && [ "${SPEEDRUN_USE_SYSTEM_PYTHON:-0}" != 1 ]; then  # run, not sourced
    echo "setup: to use .venv in your shell: . .venv/bin/activate" >&2
fi
