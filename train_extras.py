"""train_extras.py: train_gpt.py with extras at the start and end of the run, which the trainer itself never imports.

    python train_extras.py --sample_tokens=48 --preset=smoke             # then three samples of 48 tokens in the log
    python train_extras.py --hellaswag_items=10042 [any train_gpt.py setting]    # then the HellaSwag accuracy
    WANDB_MODE=offline python train_extras.py --wandb_project=NAME --preset=smoke # step metrics to W&B too
    torchrun --standalone --nproc_per_node=8 train_extras.py --sample_tokens=100   # extras run on rank 0 only

Its own options (any order among the trainer's settings, which pass through unchanged; see --help):
  --sample_tokens=N     after training, log one sample of N tokens for each of sample.py's three prompts (one
                        JSON-quoted line each); 0: none
  --hellaswag_items=N   after training, log `hellaswag: items:N acc:... acc_norm:...` on the first N validation items
                        (evals/hellaswag.py; downloads them once); 10042: all; 0: none
  --wandb_project=NAME  also send each step line's metrics to this Weights & Biases project (tracking.py;
                        WANDB_MODE=offline works); empty: none
Everything else is train_gpt.py's: the same settings, log, checkpoints, exit status and one-line errors.
"""

import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent)]
import train_gpt  # noqa: E402

OPTIONS = {"sample_tokens": int, "hellaswag_items": int, "wandb_project": str}


class Extras:
    """train_gpt.main's hooks: start() wraps the run's log, end() runs on the trained model (rank 0 only)."""

    def __init__(self, sample_tokens: int = 0, hellaswag_items: int = 0, wandb_project: str = ""):
        if sample_tokens < 0 or hellaswag_items < 0:
            raise ValueError("--sample_tokens and --hellaswag_items count tokens and items: 0 or more. HINT: 0 (the "
                             "default) turns each off")
        self.sample_tokens, self.hellaswag_items, self.wandb_project = sample_tokens, hellaswag_items, wandb_project

    def start(self, args, log):
        if self.wandb_project:
            from tracking import WandbLog
            log = WandbLog(log, args, self.wandb_project)
        return log

    def end(self, model, log):
        if self.sample_tokens:
            from sample import log_samples
            log_samples(model, self.sample_tokens, log)
        if self.hellaswag_items:
            from evals.hellaswag import log_hellaswag
            log_hellaswag(model, self.hellaswag_items, log)


def split_options(argv: list[str]) -> tuple[dict, list[str]]:
    """(this script's options, the trainer's settings); raises ValueError for a value that is not a number."""
    mine, rest = {}, []
    for arg in argv:
        name, eq, text = arg.removeprefix("--").partition("=")
        if arg.startswith("--") and eq and name in OPTIONS:
            if name in mine:
                raise ValueError(f"--{name} is given twice: which one is meant? HINT: give each option once")
            try:
                mine[name] = OPTIONS[name](text)
            except ValueError:
                raise ValueError(f"--{name}={text}: expected a whole number. HINT: python train_extras.py --help"
                                 ) from None
        else:
            rest.append(arg)
    return mine, rest


def main(argv: list[str]) -> int:
    if "--help" in argv or "-h" in argv:
        print(__doc__.strip() + "\n\ntrain_gpt.py's settings:")
    try:
        options, rest = split_options(argv)
        extras = Extras(**options)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return train_gpt.cli(rest, hooks=(extras,))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
