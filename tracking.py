"""tracking.py: optional Weights & Biases logging of a training run's step metrics.

    python train_extras.py --wandb_project=gpt2-speedrun --preset=smoke                   # needs `wandb login` once
    WANDB_MODE=offline python train_extras.py --wandb_project=gpt2-speedrun --preset=smoke  # no account or network

The run's log stays the record; W&B gets a copy of what its step lines say. WandbLog wraps the trainer's RunLog: every
line goes to the log file as before, and each step line ("step:S/N val_loss:... train_time:...ms ...") is also sent to
W&B as metrics at step S (val_loss, train_loss, train_time_ms, step_avg_ms). The settings become the W&B run's config.
wandb is imported only when asked for (`pip install wandb`); W&B's own variables (WANDB_MODE, WANDB_DIR,
WANDB_API_KEY, WANDB_ENTITY) work as usual. Offline runs are uploaded later with `wandb sync <run folder>`.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import urllib.parse

INIT_TIMEOUT_S = 30
REACH_TIMEOUT_S = 5
STEP_LINE = re.compile(r"step:(\d+)/(\d+)\s+(.*)")


def step_metrics(line: str) -> tuple[int, dict[str, float]] | None:
    """(step, {metric: value}) from a step line of the log; None for any other line. 'train_time:1234ms' becomes
    train_time_ms=1234.0."""
    m = STEP_LINE.fullmatch(line.strip())
    if not m:
        return None
    metrics = {}
    for field in m.group(3).split():
        name, _, text = field.partition(":")
        unit = "_ms" if text.endswith("ms") else ""
        try:
            metrics[name + unit] = float(text.removesuffix("ms"))
        except ValueError:
            continue
    return int(m.group(1)), metrics


def unreachable(url: str, mode: str | None = None) -> str | None:
    """Why W&B's server cannot be reached (no TCP connection to it within REACH_TIMEOUT_S), or None; None too where
    nothing is sent (WANDB_MODE offline or disabled) or a proxy carries the traffic."""
    if (mode or os.environ.get("WANDB_MODE", "")) in ("offline", "dryrun", "disabled") or any(
            os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    parts = urllib.parse.urlsplit(url)
    try:
        socket.create_connection((parts.hostname, parts.port or (80 if parts.scheme == "http" else 443)),
                                 timeout=REACH_TIMEOUT_S).close()
    except OSError as e:
        return f"{parts.hostname}: {e.strerror or type(e).__name__}"
    return None


class WandbLog:
    """The trainer's RunLog, also sending each step line's metrics to a W&B run; close() finishes the run."""

    def __init__(self, log, args, project: str, **init_kwargs):
        try:
            import wandb
        except ImportError:
            raise ValueError("--wandb_project needs the wandb package. HINT: pip install wandb (or leave "
                             "--wandb_project empty)") from None
        self.log, self.path = log, log.path
        name = args.run_id or (log.path.stem if log.path else None)
        why = unreachable(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"), init_kwargs.get("mode"))
        if why:  # no network: one line at once, not W&B's own lines and retries for most of a minute
            raise ValueError(f"W&B is out of reach ({why}). HINT: WANDB_MODE=offline keeps the metrics on disk "
                             "(`wandb sync` uploads them later); or check the network")
        try:  # no key: one line within INIT_TIMEOUT_S, not W&B's retries for minutes
            self.run = wandb.init(project=project, name=name, config=dataclasses.asdict(args),
                                  settings=wandb.Settings(init_timeout=INIT_TIMEOUT_S), **init_kwargs)
        except Exception as e:
            reason = (str(e).strip().splitlines() or [""])[0]
            raise ValueError(f"W&B could not start a run ({type(e).__name__}: {reason}). HINT: WANDB_MODE=offline "
                             "keeps the metrics on disk (`wandb sync` uploads them later); or check `wandb login` "
                             "and the network") from None

    def __call__(self, text: str, console: bool = True):
        self.log(text, console)
        parsed = step_metrics(text)
        if parsed and parsed[1]:
            self.run.log(parsed[1], step=parsed[0])

    def close(self):
        try:
            self.run.finish()
        finally:
            self.log.close()
