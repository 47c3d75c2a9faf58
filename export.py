"""export.py: a trained model as a folder to keep or share, optionally pushed to the Hugging Face Hub.

    python export.py --checkpoint=records/checkpoints/<run_id>/step_<N> --out=exports/<name>
    python export.py --checkpoint=DIR --out=exports/<name> --push_to_hub=<user>/<repo> [--private]

The folder holds:
  model.safetensors   weights and persistent state (safetensors: loading runs no pickle)
  settings.json       every Hyperparameters field: the config GPT(args) is built from
  train_gpt.py        the code that loads it (a copy of this repository's)
  training_log.txt    the run's log, when found (--log=FILE, else records/logs/<run_id>.txt)
  README.md           a model card: what the model is, how it was trained, how to load it, its limitations

Load it back, on a CPU or a GPU, with one call: `train_gpt.load_model("exports/<name>", device="cuda")`.

--push_to_hub creates the model repository if needed and uploads the folder with huggingface_hub; the token comes from
HF_TOKEN or the login cache (`hf auth login`), as for any huggingface_hub command, and is never printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import re
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
import cli_parser  # noqa: E402
import train_gpt  # noqa: E402
from sample import max_context, resolve_checkpoint  # noqa: E402

LOG_NAME, CARD_NAME = "training_log.txt", "README.md"
# Settings that never change the math, the data files and the seed: not recipe changes, when naming the closest preset.
RUN_SETTINGS = {*train_gpt.RUN_SETTINGS, "train_files", "val_files", "seed"}


class ExportError(RuntimeError):
    """The export or the upload failed; the message says why and how to fix it."""


# -----------------------------------------------------------------------------
# Facts for the model card


def read_run_log(path: Path, strict: bool = False):
    """records/compare.py's reading of a training log (final val loss, steps, hardware), or None if unreadable
    (strict: an ExportError that says why)."""
    compare = sys.modules.get("records_compare")  # records/ is not a package: load the file once, by path
    if compare is None:
        spec = importlib.util.spec_from_file_location("records_compare", ROOT / "records" / "compare.py")
        compare = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = compare  # its dataclasses look their module up while the file runs
        spec.loader.exec_module(compare)
    try:
        return compare.read_log(path)
    except compare.LogError as e:
        if strict:
            why = str(e).removesuffix(": not a training log")
            raise ExportError(f"--log={path} is not a training log: {why}. HINT: pass the run's log, "
                              "records/logs/<run_id>.txt, or leave --log out") from None
        return None


def find_log(checkpoint: Path, args: train_gpt.Hyperparameters) -> Path | None:
    """The run's log: <log_dir>/<run_id>.txt, with the run id from the settings or from the checkpoint's path
    (records/checkpoints/<run_id>/step_<N>)."""
    run_ids = [r for r in (args.run_id, checkpoint.parent.name, checkpoint.name) if r]
    log_dirs = [Path(args.log_dir)] if args.log_dir else []
    log_dirs.append(ROOT / "records" / "logs")
    return next((d / f"{r}.txt" for r in run_ids for d in log_dirs if (d / f"{r}.txt").is_file()), None)


def checkpoint_step(checkpoint: Path, args: train_gpt.Hyperparameters) -> int:
    """The training step a checkpoint folder holds (step_<N>); any other folder: the end of training."""
    m = re.fullmatch(r"step_(\d+)", checkpoint.name)
    return int(m.group(1)) if m else args.num_iterations + args.extension_iterations


def closest_preset(args: train_gpt.Hyperparameters) -> tuple[str, list[str]]:
    """(preset, [settings that differ from it]), ignoring where and how the run ran."""
    mine = dataclasses.asdict(args)
    best = None
    for name, preset in train_gpt.PRESETS.items():
        theirs = dataclasses.asdict(train_gpt.Hyperparameters(**preset))
        differ = [f"{k}={mine[k]}" for k in mine if k not in RUN_SETTINGS and mine[k] != theirs.get(k)]
        if best is None or len(differ) < len(best[1]):
            best = (name, differ)
    return best


def model_card(model: train_gpt.GPT, step: int, run_log, log_name: str | None, repo_id: str | None) -> str:
    args = model.args
    total = args.num_iterations + args.extension_iterations
    plans = train_gpt.full_schedule(args)
    tokens = sum(p.tokens for p in plans[:step])
    params = sum(p.numel() for p in model.parameters())
    tables = sum(p.numel() for name, p in model.named_parameters()  # a tied head is the token table (GPT-2)
                 if "embed" in name or name == "lm_head_w" and model.embed is None)
    preset, changed = closest_preset(args)
    recipe = {"speedrun": "the 2026-08 NanoGPT speedrun recipe", "smoke": "the 2026-08 recipe at CPU smoke-test size",
              "record_2025_08_23": "the NanoGPT speedrun record of 2025-08-23 (record #28)",
              "smoke_2025_08_23": "the 2025-08-23 recipe at CPU smoke-test size",
              "gpt2_baseline": "the GPT-2 (124M) baseline that the speedrun's records are measured against",
              "smoke_gpt2_baseline": "the GPT-2 baseline at CPU smoke-test size",
              "one_a100": "the one-A100 recipe (GPT-2's shape, 1500 steps on one A100)",
              "smoke_one_a100": "the one-A100 recipe at CPU smoke-test size",
              "optimization_track": "the speedrun optimization track's frozen model (its baseline: Muon + AdamW)",
              "smoke_optimization_track": "the optimization track's model at CPU smoke-test size"}[preset]
    recipe_line = f"preset `{preset}`: {recipe}" + (f", with {len(changed)} settings changed: "
                                                     f"`{', '.join(changed)}`" if changed else "")
    val = None
    if run_log is not None:
        val = next(((s, loss) for s, loss, _ in reversed(run_log.val) if s <= step), None)
    val_line = (f"{val[1]:.4f} at step {val[0]} (mean cross-entropy in nats per token over {args.val_tokens:,} "
                f"tokens of `{Path(args.val_files).name}`)" if val else "not known (the run's log was not found)")
    hardware = f"; hardware: {run_log.hardware}" if run_log is not None else ""
    where = repo_id or "<this folder>"
    lines = [
        "---", "library_name: pytorch", "pipeline_tag: text-generation", "tags:", "- gpt2", "- nanogpt-speedrun",
        "---", "",
        f"# {repo_id.split('/')[-1] if repo_id else 'GPT-2 speedrun model'}", "",
        f"A {'GPT-2-small-class' if params >= 100e6 else f'small ({params / 1e6:.0f}M-parameter) test'} language model "
        "trained by `train_gpt.py`, an open reimplementation of the NanoGPT "
        "speedrun: a model trained to a target validation loss on FineWeb as fast as possible, not a general-purpose "
        "or instruction-following model.", "",
        "## The model", "",
        f"- Recipe: {recipe_line}.",
        f"- {params:,} parameters, {tables:,} of them in embedding tables (token, position, value and bigram "
        "embeddings); "
        f"{args.num_layers} layers, width {args.model_dim}, {args.num_heads} heads of {args.head_dim}, "
        f"{args.dtype} activations.",
        f"- GPT-2 tokenizer (tiktoken `gpt2`); {args.vocab_size} output rows, of which ids 50257 and up are padding. "
        f"Every document starts with `<|endoftext|>` (id 50256). Context when sampling: {max_context(args):,} "
        f"tokens (the final attention window and the longest training document).",
        f"- Training: step {step} of {total}, {tokens:,} tokens from `{Path(args.train_files).name}`, seed {args.seed}"
        f"{hardware}.",
        f"- Validation loss: {val_line}.", "",
        "## Files", "",
        "- `model.safetensors`: weights and persistent state (safetensors; loading runs no pickle)",
        "- `settings.json`: every setting of `train_gpt.Hyperparameters`, the config the model is built from",
        "- `train_gpt.py`: the code that defines and loads the model",
    ]
    if log_name:
        lines.append(f"- `{log_name}`: the training run's log (its source code, environment, settings and losses)")
    lines += [
        "", "## Use it", "",
        "```python",
        "import train_gpt  # this folder's train_gpt.py, or the repository's",
        f'model = train_gpt.load_model("{where}", device="cuda")  # or "cpu"; evaluation mode',
        "logits = model.logits(tokens)  # one 1-D sequence of documents, each starting with 50256, padded to a "
        f"multiple of {args.block_size}",
        "```", "",
        "With the repository: `python sample.py --checkpoint=DIR --prompt=\"...\"` prints samples, "
        "`python evals/hellaswag.py --checkpoint=DIR` scores HellaSwag.", "",
        "## Limitations", "",
        "- Small and briefly trained: it continues web text, often fluently and often wrongly. It follows no "
        "instructions, and its statements of fact are unreliable.",
        "- It learned from web text (FineWeb for the speedrun presets) with no filtering for safety or bias beyond "
        "the dataset's own, and can repeat what such text contains.",
        "- Its architecture is this project's own (not `transformers`' GPT-2): load it with `train_gpt.py`.",
        "- The smoke presets are tests of the code, trained for seconds on a small sample: their output is noise.",
    ]
    return "\n".join(lines) + "\n"


# -----------------------------------------------------------------------------
# Export and upload


def check_out(out: Path, overwrite: bool) -> None:
    """--out is a new or empty folder; with overwrite, a folder whose files of our names may be replaced."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out={out} is a file, not a folder. HINT: give a new folder, e.g. --out=exports/NAME")
    if above := next((p for p in out.parents if p.exists() and not p.is_dir()), None):
        raise ExportError(f"--out={out} cannot be made: {above} is a file, not a folder. HINT: give a new folder, e.g. "
                          "--out=exports/NAME")
    held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if held and not overwrite:
        raise ExportError(f"--out={out} is not empty (it holds {', '.join(held[:4])}"
                          f"{f' and {len(held) - 4} more' if len(held) > 4 else ''}). HINT: choose a new folder, or "
                          "pass --overwrite=true to replace the files an export writes (other files stay, and are "
                          "never uploaded)")


def export(checkpoint: str | Path, out: str | Path, log: str | Path | None = None, repo_id: str | None = None,
           overwrite: bool = False) -> tuple[Path, list[str]]:
    """Writes the export folder (see the module docstring); returns it and the names of the files written."""
    checkpoint, out = resolve_checkpoint(checkpoint), Path(out)
    check_out(out, overwrite)
    if log and not Path(log).is_file():
        what = "is a folder, not a file" if Path(log).is_dir() else "no such file"
        raise ExportError(f"--log={log}: {what}. HINT: give the run's log, records/logs/<run_id>.txt, or leave "
                          "--log out to look there")
    model = train_gpt.load_model(checkpoint)  # checks that it loads before anything is written
    if out.resolve() == checkpoint.resolve():
        raise ExportError(f"--out={out} is the checkpoint folder itself. HINT: choose a new folder")
    log_path = Path(log) if log else find_log(checkpoint, model.args)
    run_log = read_run_log(log_path, strict=bool(log)) if log_path is not None else None
    ours = model.args.run_id
    if log and run_log is not None and run_log.run_id and ours and run_log.run_id != ours:
        raise ExportError(f"--log={log} is the log of run {run_log.run_id!r}; the checkpoint is of run {ours!r}. "
                          f"HINT: pass that run's log, records/logs/{ours}.txt, or leave --log out to look there")
    train_gpt.save_model(model, out)
    shutil.copyfile(ROOT / "train_gpt.py", out / "train_gpt.py")
    written = [train_gpt.MODEL_FILE, train_gpt.SETTINGS_FILE, "train_gpt.py", CARD_NAME]
    if log_path is not None:
        shutil.copyfile(log_path, out / LOG_NAME)
        written.append(LOG_NAME)
    else:
        print(f"export.py: no training log found for {checkpoint}; the model card will not give its losses. HINT: "
              "pass --log=records/logs/<run_id>.txt", file=sys.stderr)
    card = model_card(model, checkpoint_step(checkpoint, model.args), run_log, LOG_NAME if log_path else None, repo_id)
    (out / CARD_NAME).write_text(card)
    return out, sorted(written)


def push_to_hub(folder: Path, repo_id: str, private: bool = False, files: list[str] | None = None) -> str:
    """Creates the model repository (if needed) and uploads the folder's `files` (default: all) as one commit;
    returns the commit's URL."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi()  # endpoint from HF_ENDPOINT, token from HF_TOKEN or the login cache
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id, allow_patterns=files,
                                   commit_message=f"Upload {folder.name} (export.py)")
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        hint = ("log in with `hf auth login` or set HF_TOKEN to a token with write access" if status in (401, 403)
                else "check the repository name (<user or org>/<name>) and your network, then run again")
        raise ExportError(f"could not upload to {repo_id}: {str(e).splitlines()[0]}. HINT: {hint}") from None
    except Exception as e:  # no network: an OSError, or the HTTP client's own (httpx's ConnectError, timeouts)
        if not isinstance(e, (OSError, ValueError)) and not type(e).__module__.startswith(("httpx", "httpcore")):
            raise
        raise ExportError(f"could not upload to {repo_id}: {type(e).__name__}: {e}. HINT: check your network "
                          "connection (and HF_ENDPOINT if you use a mirror), then run again") from None
    return str(commit.commit_url) if hasattr(commit, "commit_url") else str(commit)


def yes_no(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def main(argv: list[str] | None = None) -> int:
    parser = cli_parser.ArgumentParser(prog="export.py", description="Write a trained model as safetensors weights, "
                                     "its settings, its code, its training log and a model card; optionally upload "
                                     "the folder to the Hugging Face Hub.")
    parser.add_argument("--checkpoint", required=True, metavar="PATH",
                        help="a checkpoint folder (records/checkpoints/<run_id>/step_<N>) or a run's checkpoint "
                             "folder (its latest step)")
    parser.add_argument("--out", required=True, metavar="DIR", help="the folder to write (created if needed)")
    parser.add_argument("--log", metavar="FILE", help="the run's log (default: records/logs/<run_id>.txt)")
    parser.add_argument("--push_to_hub", metavar="REPO", help="upload the folder to this Hub model repository, "
                        "<user or org>/<name> (token: HF_TOKEN or `hf auth login`)")
    parser.add_argument("--private", action="store_true", help="create the Hub repository as private")
    parser.add_argument("--overwrite", nargs="?", const="true", default="false", type=yes_no, metavar="true|false",
                        help="write into a folder that is not empty, replacing the files an export writes (default: "
                             "false, refuse)")
    args = parser.parse_args(argv)
    if not args.out.strip():
        parser.error("--out is empty. HINT: give a new folder, e.g. --out=exports/NAME")
    if args.push_to_hub and not re.fullmatch(r"[\w.-]+/[\w.-]+", args.push_to_hub):
        parser.error(f"--push_to_hub={args.push_to_hub}: give the repository as <user or org>/<name>")
    try:
        out, written = export(args.checkpoint, args.out, args.log, args.push_to_hub, args.overwrite)
        print(f"exported to {out}: " + ", ".join(written))
        if args.push_to_hub:
            print(f"uploaded to {args.push_to_hub}: {push_to_hub(out, args.push_to_hub, args.private, written)}")
    except (ExportError, ValueError, OSError) as e:
        print(f"export.py: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
