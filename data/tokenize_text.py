"""tokenize_text.py: turn text into GPT-2 token shards that train_gpt.py reads.

    python data/tokenize_text.py INPUT... --out DIR --name NAME [--val_tokens N] [--shard_tokens N]

Inputs, read in the order given: a .jsonl file holds one document per line (its "text" field); any other file is one
document (UTF-8 text); a folder is walked in sorted order for .txt and .jsonl files. With --hf_dataset the documents
come from a Hugging Face dataset instead, streamed through the `datasets` package (`pip install datasets`).

Each document becomes <|endoftext|> + its GPT-2 tokens, as FineWeb's shards were made
(docs/recipes.md#how-fineweb-was-tokenized). The first --val_tokens tokens of that stream go to DIR/NAME_val_000000.bin,
the rest to DIR/NAME_train_000001.bin, NAME_train_000002.bin, ... of exactly --shard_tokens tokens each; the last shard
holds the remainder, and a document may be split across two shards, as in FineWeb.
Memory stays bounded (a few batches of text plus one shard buffer); documents are tokenized on all cores.
"""

from __future__ import annotations

import argparse
import collections
import json
import multiprocessing
import os
import shutil
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from gpt2_tokenizer import TokenizerError, get_encoding  # data/gpt2_tokenizer.py: the tokenizer, offline
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the shard format lives in train_gpt.py
import cli_parser  # noqa: E402
from train_gpt import BOS_ID, write_shard  # noqa: E402

TEXT_SUFFIXES = (".txt", ".jsonl")  # what a folder walk picks up
BATCH_CHARS = 1 << 20  # text per worker task: big enough to amortize pickling, small enough to keep memory bounded
MAX_SHARD_TOKENS = 2**31 - 1  # a shard header counts tokens in an int32
PROGRESS_SECONDS = 5.0  # without a terminal (no bar), a progress line at most this often


class TokenizeError(RuntimeError):
    """A problem the user can fix; the message says what happened and what to do."""


# A document as read: its text (None if unreadable), its size in bytes (for progress), and why it was unreadable.
Document = tuple[str | None, int, str | None]


# -----------------------------------------------------------------------------
# Reading documents


def find_files(inputs: Iterable[str]) -> list[Path]:
    """Expands the command-line inputs into files: folders are walked in sorted order, hidden entries skipped."""
    files = []
    for name in inputs:
        path = Path(name)
        if path.is_dir():
            for root, dirs, names in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                files += [Path(root) / n for n in sorted(names) if n.endswith(TEXT_SUFFIXES) and not n.startswith(".")]
        elif path.is_file():
            files.append(path)
        else:
            raise TokenizeError(f"input {name} does not exist (or is not a file or folder). HINT: check the path; "
                                f"inputs are .txt/.jsonl files or folders holding them.")
    return files


def read_file_documents(files: Iterable[Path], text_field: str = "text") -> Iterator[Document]:
    """Yields the documents of each file: one per line for .jsonl, the whole file otherwise."""
    for path in files:
        if path.suffix != ".jsonl":
            try:
                data = path.read_bytes()
                yield data.decode("utf-8-sig"), len(data), None
            except (OSError, UnicodeDecodeError) as e:
                yield None, 0, f"{path}: {e}"
            continue
        try:
            with path.open("rb") as f:
                for line_number, line in enumerate(f, start=1):
                    if not line.strip():
                        continue  # a blank line is not a document
                    try:
                        record = json.loads(line)
                    except ValueError as e:  # not JSON, or not UTF-8
                        yield None, len(line), f"{path}:{line_number}: not a JSON line ({e})"
                        continue
                    text = record.get(text_field) if isinstance(record, dict) else None
                    if isinstance(text, str):
                        yield text, len(line), None
                    else:
                        yield None, len(line), f"{path}:{line_number}: no string {text_field!r} field"
        except OSError as e:
            yield None, 0, f"{path}: {e}"


def read_dataset_documents(name: str, config: str | None, split: str, text_field: str = "text") -> Iterator[Document]:
    """Streams the documents of a Hugging Face dataset (e.g. HuggingFaceFW/fineweb, config sample-10BT). The dataset
    is opened here, so that a missing package or a wrong name fails before any shard is touched."""
    try:
        import datasets
    except ImportError:
        raise TokenizeError("reading a Hugging Face dataset needs the `datasets` package. HINT: `pip install datasets`,"
                            " or download the dataset's files and pass them (or their folder) as inputs.") from None

    def failed(e: Exception) -> TokenizeError:  # a wrong name or config, no network, a connection dropped mid-stream
        return TokenizeError(f"reading dataset {name} (config {config}, split {split}) failed: {type(e).__name__}: "
                             f"{shorten(str(e), 300)}. HINT: check the name, --hf_config and your network "
                             f"(HF_ENDPOINT, HF_TOKEN)")

    try:
        rows = datasets.load_dataset(name, config, split=split, streaming=True)  # streaming: bounded memory
    except Exception as e:
        raise failed(e) from None

    def documents() -> Iterator[Document]:
        try:
            for row in rows:
                text = row.get(text_field)
                if isinstance(text, str):
                    yield text, len(text.encode("utf-8")), None
                else:
                    yield None, 0, f"{name}: a row without a string {text_field!r} field"
        except Exception as e:
            raise failed(e) from None

    return documents()


# -----------------------------------------------------------------------------
# Tokenizing (in worker processes) and cutting the token stream into shards


def encode_batch(texts: list[str]) -> np.ndarray:
    """<|endoftext|> + GPT-2 tokens of each text, concatenated (one array pickles much faster than many lists)."""
    enc = get_encoding()
    ids = enc.encode_ordinary_batch(texts, num_threads=1)
    tokens = np.empty(sum(len(d) for d in ids) + len(ids), dtype=np.uint16)
    position = 0
    for doc in ids:
        tokens[position] = BOS_ID
        tokens[position + 1:position + 1 + len(doc)] = doc
        position += 1 + len(doc)
    return tokens


@dataclass
class Stats:
    documents: int = 0  # documents in the shards (the last one may be cut short by max_tokens)
    unreadable: int = 0
    empty: int = 0
    tokens: int = 0
    problems: list[str] = field(default_factory=list)  # the first few unreadable documents, to show the user


def batches(documents: Iterable[Document], stats: Stats) -> Iterator[tuple[list[str], int]]:
    """Groups readable, non-empty documents into batches of about BATCH_CHARS characters; counts the others."""
    texts, chars, nbytes = [], 0, 0
    for text, size, problem in documents:
        nbytes += size
        if text is None:
            stats.unreadable += 1
            if len(stats.problems) < 5:
                stats.problems.append(problem)
            continue
        if not text.strip():
            stats.empty += 1
            continue
        texts.append(text)
        chars += len(text)
        if chars >= BATCH_CHARS:
            yield texts, nbytes
            texts, chars, nbytes = [], 0, 0
    if texts or nbytes:
        yield texts, nbytes


def encoded_batches(work: Iterable[tuple[list[str], int]], workers: int) -> Iterator[tuple[np.ndarray, int]]:
    """Tokenizes batches in input order on `workers` processes, with a bounded number of batches in flight."""
    if workers == 1:
        for texts, nbytes in work:
            yield encode_batch(texts), nbytes
        return
    with multiprocessing.Pool(workers) as pool:  # leaving the block (also on early exit) terminates the workers
        pending = collections.deque()
        for texts, nbytes in work:
            pending.append((pool.apply_async(encode_batch, (texts,)), nbytes))
            if len(pending) >= 2 * workers:  # backpressure: never read far ahead of the writer
                result, size = pending.popleft()
                yield result.get(), size
        while pending:
            result, size = pending.popleft()
            yield result.get(), size


class ShardWriter:
    """Cuts one token stream into NAME_val_000000.bin (the first val_tokens tokens) and NAME_train_%06d.bin shards."""

    def __init__(self, out_dir: Path, name: str, val_tokens: int, shard_tokens: int, log=print):
        self.out_dir, self.name, self.shard_tokens, self.log = out_dir, name, shard_tokens, log
        self.index = 0 if val_tokens > 0 else 1  # shard 0 is the val shard, train shards count from 1
        self.buffer = np.empty(val_tokens if val_tokens > 0 else shard_tokens, dtype=np.uint16)
        self.fill = 0
        self.written: list[tuple[Path, int]] = []

    def add(self, tokens: np.ndarray) -> None:
        while len(tokens):
            take = min(len(tokens), len(self.buffer) - self.fill)
            self.buffer[self.fill:self.fill + take] = tokens[:take]
            self.fill += take
            tokens = tokens[take:]
            if self.fill == len(self.buffer):
                self._write()

    def close(self) -> None:
        if self.fill:
            self._write()

    def _write(self) -> None:
        split = "val" if self.index == 0 else "train"
        path = self.out_dir / f"{self.name}_{split}_{self.index:06d}.bin"
        write_shard(path, self.buffer[:self.fill])
        self.written.append((path, self.fill))
        self.log(f"wrote {path} ({self.fill:,} tokens)")
        self.index, self.fill = self.index + 1, 0
        if len(self.buffer) != self.shard_tokens:
            self.buffer = np.empty(self.shard_tokens, dtype=np.uint16)


def shorten(text: str, width: int) -> str:
    """One line of at most width characters, cut between words."""
    return textwrap.shorten(" ".join(text.split()), width, placeholder=" ...")


def size(nbytes: int) -> str:
    """1234567 -> '1.2 MB'."""
    for power, unit in ((3, "GB"), (2, "MB"), (1, "kB")):
        if nbytes >= 1000**power:
            return f"{nbytes / 1000**power:,.1f} {unit}"
    return f"{nbytes} B"


def tokenize(documents: Iterable[Document], out_dir: Path, name: str, *, val_tokens: int = 10_485_760,
             shard_tokens: int = 100_000_000, max_tokens: int | None = None, workers: int = 1,
             total_bytes: int | None = None) -> tuple[Stats, list[tuple[Path, int]]]:
    """Tokenizes documents into shards in out_dir; returns the counts and the (path, tokens) of each shard written."""
    get_encoding()  # fail here, with a clear message, rather than inside a worker
    out_dir.mkdir(parents=True, exist_ok=True)
    stats = Stats()
    writer = ShardWriter(out_dir, name, val_tokens, shard_tokens, log=lambda message: tqdm.write(message, sys.stdout))
    progress = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenizing", disable=not sys.stderr.isatty())
    start = last_line = time.perf_counter()
    read_bytes = 0
    with progress:
        for tokens, nbytes in encoded_batches(batches(documents, stats), workers):
            done = max_tokens is not None and stats.tokens + len(tokens) >= max_tokens
            if done:
                tokens = tokens[:max_tokens - stats.tokens]
            writer.add(tokens)
            stats.tokens += len(tokens)
            stats.documents += int(np.count_nonzero(tokens == BOS_ID))
            if done:
                break
            progress.update(nbytes)
            progress.set_postfix_str(f"{stats.tokens:,} tokens", refresh=False)
            read_bytes += nbytes
            if progress.disable and time.perf_counter() - last_line >= PROGRESS_SECONDS:  # a log, not a terminal
                last_line = time.perf_counter()
                share = f" ({100 * read_bytes / total_bytes:.0f}% of {size(total_bytes)})" if total_bytes else ""
                print(f"tokenizing: {size(read_bytes)} read{share}, {stats.tokens:,} tokens, {last_line - start:.0f} s",
                      file=sys.stderr, flush=True)
        writer.close()
    return stats, writer.written


# -----------------------------------------------------------------------------
# Command line


def existing_shards(out_dir: Path, name: str) -> list[Path]:
    """The shards a previous run with this name left in out_dir."""
    return sorted(p for split in ("val", "train") for p in out_dir.glob(f"{name}_{split}_{'[0-9]' * 6}.bin"))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = cli_parser.ArgumentParser(
        description=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Example: python data/tokenize_text.py notes/ books.jsonl --out data/mytext --name mytext\n"
               "Exit status 0 on success; otherwise 1, with a message that says what to do.")
    parser.add_argument("inputs", nargs="*", metavar="INPUT", help=".txt/.jsonl files or folders holding them")
    parser.add_argument("--out", required=True, type=Path, help="output folder (created if missing)")
    parser.add_argument("--name", required=True, help="shard name prefix, e.g. mytext -> mytext_train_000001.bin")
    parser.add_argument("--val_tokens", type=int, default=10_485_760,
                        help="tokens in the val shard (default: %(default)s, the speedrun's val set; 0: no val shard)")
    parser.add_argument("--shard_tokens", type=int, default=100_000_000,
                        help="tokens per train shard (default: %(default)s, as FineWeb's)")
    parser.add_argument("--max_tokens", type=int, default=None, help="stop after this many tokens (default: all)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="tokenizer processes (default: %(default)s, the number of cores)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace existing NAME_{val,train}_*.bin shards in --out, once the new ones are all "
                             "written (default: refuse)")
    parser.add_argument("--text_field", default="text", help='the JSON field holding the text (default: "text")')
    parser.add_argument("--hf_dataset", metavar="NAME", help="read this Hugging Face dataset instead of INPUTs, "
                        "e.g. HuggingFaceFW/fineweb (needs `pip install datasets`)")
    parser.add_argument("--hf_config", help="the dataset's configuration, e.g. sample-10BT")
    parser.add_argument("--hf_split", default="train", help="the dataset's split (default: %(default)s)")
    args = parser.parse_args(argv)
    if bool(args.inputs) == bool(args.hf_dataset):
        parser.error("give INPUT files/folders or --hf_dataset (exactly one of the two)")
    if not 1 <= args.shard_tokens <= MAX_SHARD_TOKENS or not 0 <= args.val_tokens <= MAX_SHARD_TOKENS:
        parser.error(f"--shard_tokens must be in [1, {MAX_SHARD_TOKENS}] and --val_tokens in [0, {MAX_SHARD_TOKENS}]")
    if args.workers < 1 or (args.max_tokens is not None and args.max_tokens < 1):
        parser.error("--workers and --max_tokens must be at least 1")
    if not args.name or not all(c.isalnum() or c in "-_." for c in args.name) or args.name.startswith("."):
        parser.error(f"--name={args.name!r} must be a plain name (letters, digits, - _ .; no leading dot): it starts "
                     "each shard's file name inside --out. HINT: e.g. --name=mytext; choose the folder with --out")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out} is a file, not a folder. HINT: give a folder (it is created if missing)")
    if above := next((p for p in args.out.parents if p.exists() and not p.is_dir()), None):
        parser.error(f"--out {args.out} cannot be made: {above} is a file, not a folder. HINT: give a folder (it is "
                     "created if missing)")
    return args


def _plural(n: int, word: str, suffix: str = "s") -> str:
    return f"{n:,} {word}" if n == 1 else f"{n:,} {word}{suffix}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    staging, kept = args.out, ""  # what a failure leaves
    try:
        if args.hf_dataset:
            documents, total_bytes = read_dataset_documents(args.hf_dataset, args.hf_config, args.hf_split,
                                                            args.text_field), None
        else:
            files = find_files(args.inputs)
            documents, total_bytes = read_file_documents(files, args.text_field), sum(f.stat().st_size for f in files)
        old = existing_shards(args.out, args.name)
        if old and not args.overwrite:
            raise TokenizeError(f"{args.out} already holds {len(old)} {args.name} shard(s), e.g. {old[0].name}. HINT: "
                                f"pass --overwrite to replace them, or choose another --name or --out.")
        # Replacing: the new shards are written aside and swapped in once complete, so a failure keeps the old ones.
        staging, kept = (args.out / f".{args.name}.tokenizing", f"; the old {args.name} shards are kept as they were"
                         ) if old else (args.out, "; shards already written are complete, rerun with --overwrite "
                                                  "to start again")
        source = args.hf_dataset or f"{_plural(len(files), 'file')} ({size(total_bytes)})"
        print(f"tokenizing {source} on {_plural(args.workers, 'process', 'es')} into "
              f"{args.out / args.name}_{{val,train}}_*.bin", flush=True)
        stats, written = tokenize(documents, staging, args.name, val_tokens=args.val_tokens,
                                  shard_tokens=args.shard_tokens, max_tokens=args.max_tokens, workers=args.workers,
                                  total_bytes=total_bytes)
        if stats.documents == 0:
            named = "".join(f"; unreadable: {problem}" for problem in stats.problems)
            raise TokenizeError(f"found no documents to tokenize ({stats.unreadable} unreadable, {stats.empty} empty"
                                f"{named}). HINT: inputs are UTF-8 .txt files (one document each) or .jsonl files "
                                f"with a {args.text_field!r} field per line.")
        if old:
            for path, _ in written:
                os.replace(path, args.out / path.name)
            written = [(args.out / path.name, n) for path, n in written]
            for path in set(old) - {path for path, _ in written}:
                path.unlink()  # stale shards would otherwise be read by the trainer along with the new ones
    except (TokenizeError, TokenizerError) as e:
        print(f"error: {str(e).rstrip('.')}{kept}.", file=sys.stderr)
        return 1
    except OSError as e:  # e.g. a full disk or an unwritable --out while writing shards
        for tmp in args.out.glob(f"{args.name}_*.bin.tmp"):
            tmp.unlink(missing_ok=True)  # write_shard's half-written file
        print(f"error: cannot write shards to {args.out}: {e.strerror or e}. HINT: free some space or choose another "
              f"--out{kept}.", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"stopped: interrupted{kept}.", file=sys.stderr)
        return 130
    finally:
        if staging != args.out:
            shutil.rmtree(staging, ignore_errors=True)
    seconds = time.perf_counter() - start
    skipped = stats.unreadable + stats.empty
    print(f"{stats.documents:,} documents -> {stats.tokens:,} tokens in {len(written)} shard(s), {seconds:.1f} s "
          f"({stats.tokens / seconds:,.0f} tokens/s); skipped {skipped:,} documents "
          f"({stats.unreadable:,} unreadable, {stats.empty:,} empty)")
    for problem in stats.problems:
        print(f"  unreadable: {problem}")
    if args.val_tokens and stats.tokens < args.val_tokens:
        print(f"note: only {stats.tokens:,} tokens, fewer than --val_tokens={args.val_tokens:,}: all went to the val "
              f"shard and there is no train shard")
    return 0


if __name__ == "__main__":
    sys.exit(main())
