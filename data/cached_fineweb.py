"""cached_fineweb.py: download pre-tokenized FineWeb shards from the Hugging Face Hub (docs/recipes.md#download).

    python data/cached_fineweb10B.py [N]     # the val shard + the first N train shards (default: all) of FineWeb 10B
    python data/cached_fineweb.py [N] --dataset {fineweb10B,fineweb100B,finewebedu10B}

Each dataset is a Hub dataset repo of shards in train_gpt.py's format, 100M tokens each: {prefix}_val_000000.bin and
{prefix}_train_000001.bin, ... They land in data/<dataset>/ (or $DATA_PATH/data/<dataset>/ when DATA_PATH is set, or
--dir). A shard already there with a valid header and size is skipped without asking the Hub; a truncated or corrupt one
is fetched again; every downloaded shard is validated. Downloads go through huggingface_hub, so HF_ENDPOINT (a mirror),
HF_TOKEN, HF_HOME (its cache, reused when it holds the file) and HF_HUB_OFFLINE behave as usual.
On any failure the exit status is 1 and one message names the shard and what to do; shards already here are kept, so
rerunning the same command continues where it stopped.
"""

from __future__ import annotations

import argparse
import errno
import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the shard format lives in train_gpt.py
import cli_parser  # noqa: E402
from train_gpt import ShardError, read_shard_header  # noqa: E402


@dataclass(frozen=True)
class HubDataset:
    repo_id: str
    prefix: str  # shard names: {prefix}_val_000000.bin, {prefix}_train_%06d.bin
    num_train: int  # train shards in the repo


# docs/recipes.md#download: the reference repos, their shard names and how many train shards each holds.
DATASETS = {
    "fineweb10B": HubDataset("kjj0/fineweb10B-gpt2", "fineweb", 103),
    "fineweb100B": HubDataset("kjj0/fineweb100B-gpt2", "fineweb", 1030),
    "finewebedu10B": HubDataset("kjj0/finewebedu10B-gpt2", "finewebedu", 99),
}


class DownloadError(RuntimeError):
    """A download that cannot go on; the message names the shard and what to do."""


def default_dir(dataset: str) -> Path:
    """data/<dataset>/ next to this script, or under $DATA_PATH/data/ where train_gpt.py looks when it is set."""
    if os.environ.get("DATA_PATH"):
        return Path(os.environ["DATA_PATH"]) / "data" / dataset
    return Path(__file__).resolve().parent / dataset


def shard_names(dataset: HubDataset, num_train: int) -> list[str]:
    return [f"{dataset.prefix}_val_000000.bin"] + [f"{dataset.prefix}_train_{i:06d}.bin"
                                                   for i in range(1, num_train + 1)]


def _first_sentence(error: BaseException) -> str:
    """An exception as one short line: our messages carry a HINT we replace, Hub errors carry request details."""
    text = " ".join(str(error).split(" HINT:")[0].split())
    return text if len(text) <= 300 else text[:297] + "..."


def explain(error: BaseException, filename: str, dataset: HubDataset, revision: str, local_dir: Path) -> str:
    """One paragraph for a failed download: what happened to which shard, and what to do."""
    from huggingface_hub import constants, errors

    chain, root = [error], error  # the error and the ones it arose from; root: the one huggingface_hub wrapped
    while (cause := chain[-1].__cause__ or chain[-1].__context__) is not None and cause not in chain:
        chain.append(cause)
    while root.__cause__ is not None:
        root = root.__cause__
    where = f"{filename} from dataset {dataset.repo_id} at {constants.ENDPOINT}"
    rerun = "rerun the same command to continue: the shards already here are kept and skipped."
    if any(isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT) for e in chain):
        free = shutil.disk_usage(local_dir).free / 1e6 if local_dir.exists() else float("nan")
        return (f"the disk is full: could not save {filename} in {local_dir} ({free:,.0f} MB free; a FineWeb shard is "
                f"about 200 MB). HINT: free some space, or download elsewhere with --dir or DATA_PATH, then {rerun}")
    if isinstance(error, errors.RemoteEntryNotFoundError):
        return (f"{where} does not exist (revision {revision}). HINT: {dataset.repo_id} should hold "
                f"{dataset.num_train} train shards: ask for fewer, check --revision, or check HF_ENDPOINT if you "
                f"use a mirror.")
    if isinstance(error, errors.RevisionNotFoundError):
        return f"dataset {dataset.repo_id} has no revision {revision!r}. HINT: use a branch, tag or commit that exists."
    if isinstance(error, errors.RepositoryNotFoundError):
        return (f"cannot access dataset {dataset.repo_id} at {constants.ENDPOINT} ({_first_sentence(error)}). HINT: "
                f"check the repo and HF_ENDPOINT; for a private or gated repo set HF_TOKEN or run `hf auth login`.")
    if constants.HF_HUB_OFFLINE or any(isinstance(e, errors.OfflineModeIsEnabled) for e in chain):
        return (f"HF_HUB_OFFLINE is set, so {filename} cannot be downloaded and is not in {local_dir}. HINT: unset "
                f"HF_HUB_OFFLINE, or copy the shards into {local_dir} by other means.")
    if isinstance(error, errors.HfHubHTTPError) and error.response is not None and error.response.status_code < 500:
        return (f"the Hub refused {where}: {_first_sentence(error)}. HINT: check HF_TOKEN and HF_ENDPOINT, then "
                f"{rerun}")
    # Anything else is, in practice, the network: no connection, a timeout, a connection dropped mid-file, a Hub
    # outage (5xx). huggingface_hub has already retried; name the root cause so the user can tell which.
    return (f"could not download {where}: {type(root).__name__}: {_first_sentence(root)}. HINT: check your network "
            f"connection and proxy settings (and HF_ENDPOINT if you use a mirror), then {rerun}")


def shard_bar_class():
    """huggingface_hub's per-file byte bar, named by the shard instead of the tail of its URL and cleared when done,
    under our bar that counts shards."""
    from huggingface_hub.utils import tqdm as hub_tqdm

    class ShardBar(hub_tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["desc"] = str(kwargs.get("desc") or "").rsplit("/", 1)[-1]
            super().__init__(*args, **{**kwargs, "leave": False})

    return ShardBar


def download(dataset: HubDataset, num_train: int, local_dir: Path, revision: str = "main") -> list[str]:
    """Makes local_dir hold valid copies of the val shard and the first num_train train shards; returns the names
    of those it had to fetch."""
    from huggingface_hub import hf_hub_download

    names = shard_names(dataset, num_train)
    todo = []
    for name in names:
        path = local_dir / name
        if not path.exists():
            todo.append(name)
            continue
        try:
            read_shard_header(path)
        except ShardError as e:
            print(f"{name} is invalid ({_first_sentence(e)}); fetching it again")
            path.unlink()  # else huggingface_hub would trust its download metadata and keep the broken file
            todo.append(name)
    print(f"{len(names) - len(todo)} of {len(names)} shards already in {local_dir} and valid; fetching {len(todo)} "
          f"from {dataset.repo_id}")
    local_dir.mkdir(parents=True, exist_ok=True)
    start, fetched_bytes, bar_class = time.perf_counter(), 0, shard_bar_class()
    with tqdm(total=len(todo), unit="shard", desc=dataset.repo_id, disable=not sys.stderr.isatty() or not todo) as bar:
        for i, name in enumerate(todo, start=1):
            try:
                path = Path(hf_hub_download(repo_id=dataset.repo_id, repo_type="dataset", filename=name,
                                            revision=revision, local_dir=local_dir, tqdm_class=bar_class))
            except Exception as e:
                raise DownloadError(explain(e, name, dataset, revision, local_dir)) from e
            try:
                num_tokens = read_shard_header(path)
            except ShardError as e:
                path.unlink(missing_ok=True)
                raise DownloadError(f"the Hub served an invalid {name} ({_first_sentence(e)}); it was deleted. HINT: "
                                    f"rerun to fetch it again; if it stays invalid, check HF_ENDPOINT (a mirror may "
                                    f"serve a stale or partial copy).") from None
            fetched_bytes += path.stat().st_size
            rate = fetched_bytes / 1e6 / max(time.perf_counter() - start, 1e-9)
            bar.update()
            tqdm.write(f"fetched {name} ({num_tokens:,} tokens) [{i}/{len(todo)}, {rate:.1f} MB/s]", sys.stdout)
    return todo


def main(argv: list[str] | None = None, dataset: str = "fineweb10B") -> int:
    parser = cli_parser.ArgumentParser(description=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("num_train", nargs="?", type=int, metavar="N",
                        help="how many train shards to fetch, from the first (default: all of them)")
    parser.add_argument("--dataset", choices=DATASETS, default=dataset, help="which dataset (default: %(default)s)")
    parser.add_argument("--dir", type=Path, help="where the shards go (default: data/<dataset>/, or "
                        "$DATA_PATH/data/<dataset>/ when DATA_PATH is set)")
    parser.add_argument("--revision", default="main", help="branch, tag or commit of the Hub repo (default: main)")
    args = parser.parse_args(argv)
    hub_dataset = DATASETS[args.dataset]
    num_train = hub_dataset.num_train if args.num_train is None else args.num_train
    if not 0 <= num_train <= hub_dataset.num_train:
        parser.error(f"N must be between 0 and {hub_dataset.num_train}: {args.dataset} has {hub_dataset.num_train} "
                     f"train shards of 100M tokens each")
    local_dir = args.dir or default_dir(args.dataset)

    # huggingface_hub warns (e.g. of low disk space) with Python warnings: show them as one line, not with source code.
    warnings.showwarning = lambda message, *args, **kwargs: print(f"warning: {message}", file=sys.stderr)
    if not sys.stderr.isatty():  # progress bars in a log file are noise; the per-shard lines say enough
        from huggingface_hub.utils import disable_progress_bars
        disable_progress_bars()
    try:
        fetched = download(hub_dataset, num_train, local_dir, args.revision)
    except DownloadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # e.g. --dir cannot be created
        print(f"error: cannot use {local_dir}: {e}. HINT: choose a writable folder with --dir.", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to continue (complete shards are kept).", file=sys.stderr)
        return 130
    print(f"done: {local_dir} holds {shard_names(hub_dataset, num_train)[0]} and {num_train} train shard(s) "
          f"({len(fetched)} fetched now)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
