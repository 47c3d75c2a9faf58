"""evals/hellaswag.py: HellaSwag accuracy of a trained model, by completion likelihood.

    python evals/hellaswag.py --checkpoint=records/checkpoints/<run_id>/step_<N>     # all 10,042 validation items
    python evals/hellaswag.py --checkpoint=DIR --limit=1000 --json

HellaSwag (Zellers et al., 2019, arXiv 1905.07830) gives a context and four endings, one of them right. Each ending is
scored as a document: BOS, the context's GPT-2 tokens, then the tokens of " " + ending; its score is the sum of the
log-probabilities of the ending's tokens. `acc` picks the ending with the highest sum; `acc_norm` the highest mean per
token (the length-normalized variant, as in llm.c's HellaSwag eval; lm-evaluation-harness divides by characters
instead). Chance is 0.25; GPT-2 small (124M) scores about 0.29 acc / 0.30 acc_norm this way.

The validation set (hellaswag_val.jsonl from github.com/rowanz/hellaswag, 10,042 items, ~11 MB) is downloaded once into
$XDG_CACHE_HOME/gpt2-speedrun/hellaswag/ (default ~/.cache/...), or read from --data=FILE.

Many endings are packed into one sequence (model.logits takes packed documents, each starting with BOS), so a GPU
scores thousands of them per forward. Smear, the bigram hash and the key offset carry a token's state a few positions
forward, across a document boundary; so each ending is preceded by a few one-token BOS documents, which makes its score
the same whatever shares its sequence (a test checks this).
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "data")]
from gpt2_tokenizer import get_encoding  # noqa: E402

import cli_parser  # noqa: E402
import train_gpt  # noqa: E402
from sample import load, resolve_checkpoint  # noqa: E402

URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
FILE_NAME = "hellaswag_val.jsonl"
VAL_ITEMS = 10_042
BOS = train_gpt.BOS_ID


class HellaSwagError(RuntimeError):
    """The data could not be had or read; the message says why and how to fix it."""


# -----------------------------------------------------------------------------
# Data


def cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "gpt2-speedrun" / "hellaswag"


def read_items(path: Path) -> list[dict]:
    """The items of a HellaSwag .jsonl file, each checked for a context, four endings and a label."""
    items = []
    with open(path, encoding="utf-8", errors="replace") as f:  # a byte that is not UTF-8: not an item, said below
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                ok = isinstance(item["ctx"], str) and len(item["endings"]) == 4 and item["label"] in (0, 1, 2, 3)
            except (json.JSONDecodeError, KeyError, TypeError):
                ok = False
            if not ok:
                raise HellaSwagError(f"{path}, line {n}: not a HellaSwag item (a JSON object with ctx, four endings "
                                     f"and a label 0-3). HINT: delete the file to download it again (or, "
                                     f"for evals/hellaswag.py --data=FILE, check the file)")
            items.append(item)
    if not items:
        raise HellaSwagError(f"{path} holds no items. HINT: delete it to download it again (or, "
                             f"for evals/hellaswag.py --data=FILE, check the file)")
    return items


def download(url: str, path: Path) -> None:
    """Fetches url to path atomically (a partial download never takes the file's name), with a progress bar in a
    terminal."""
    from tqdm import tqdm

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with urllib.request.urlopen(url, timeout=30) as response, open(tmp, "wb") as out:
            size = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=size, unit="B", unit_scale=True, desc=f"downloading {path.name}",
                      disable=not sys.stderr.isatty()) as bar:
                while chunk := response.read(1 << 16):
                    out.write(chunk)
                    bar.update(len(chunk))
        os.replace(tmp, path)
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", None) or e
        raise HellaSwagError(f"could not download {url}: {reason}. HINT: check your network connection and proxy "
                             f"settings, or fetch the file elsewhere and copy it to {path} (evals/hellaswag.py "
                             f"also reads --data=FILE)"
                             ) from None
    finally:
        tmp.unlink(missing_ok=True)


def load_items(data: str | Path | None = None, url: str = URL) -> list[dict]:
    """The validation items: from `data` if given, else from the cache, downloading them the first time."""
    if data is not None:
        if not Path(data).is_file():
            what = "is a folder, not a file" if Path(data).is_dir() else "no such file"
            raise HellaSwagError(f"--data={data}: {what}. HINT: give a HellaSwag .jsonl file, or leave --data out to "
                                 "download the validation set")
        return read_items(Path(data))
    path = cache_dir() / FILE_NAME
    if path.is_file():
        return read_items(path)
    print(f"HellaSwag: downloading the validation set once, to {path}", file=sys.stderr)
    download(url, path)
    items = read_items(path)
    if url == URL and len(items) != VAL_ITEMS:
        path.unlink()
        raise HellaSwagError(f"{url} gave {len(items)} items, not the validation set's {VAL_ITEMS}. HINT: run again; "
                             f"if it persists, fetch the file elsewhere and copy it to {path}")
    return items


# -----------------------------------------------------------------------------
# Scoring


@dataclass
class Score:
    log_probs: list[float]  # per ending: sum of the log-probabilities of its tokens
    num_tokens: list[int]  # per ending: its number of tokens

    @property
    def pred(self) -> int:
        return max(range(4), key=lambda i: self.log_probs[i])

    @property
    def pred_norm(self) -> int:
        return max(range(4), key=lambda i: self.log_probs[i] / self.num_tokens[i])


def candidates(enc, item: dict) -> list[list[int]]:
    """The four documents of an item: BOS, context, ending (with its leading space), as token ids; the ending is
    the last len(encode(" " + ending)) tokens."""
    context = enc.encode_ordinary(item["ctx"])
    return [[BOS, *context, *enc.encode_ordinary(" " + ending)] for ending in item["endings"]]


def separator_tokens(args: train_gpt.Hyperparameters) -> int:
    """One-token BOS documents put before each ending so nothing before them reaches it: a token's embedding reads the
    previous token (smear, bigram hash), each key-offset layer reads the previous token's key, and the bigram hash
    treats positions 0 and 1 specially."""
    return len(args.layers("key_offset_layers")) + 3


@torch.no_grad()
def score_documents(model: train_gpt.GPT, documents: list[tuple[list[int], int]], seq_len: int,
                    progress=None) -> list[float]:
    """Sum of log-probabilities of the last n tokens of each (tokens, n) document, packed into sequences of at most
    seq_len tokens (rounded up to whole attention blocks)."""
    block = model.args.block_size
    seq_len = -(-seq_len // block) * block
    device = next(model.parameters()).device
    separator = [BOS] * separator_tokens(model.args)
    results: list[float] = [0.0] * len(documents)
    batch: list[tuple[int, int, int, int]] = []  # (document index, start in sequence, length, ending tokens)
    sequence: list[int] = []

    def flush():
        if not batch:
            return
        seq = torch.full((-(-len(sequence) // block) * block,), BOS, dtype=torch.int64)
        seq[:len(sequence)] = torch.tensor(sequence)
        seq = seq.to(device)
        rows = torch.cat([torch.arange(start + length - n - 1, start + length - 1) for _, start, length, n in batch])
        rows = rows.to(device)
        x = model.hidden(seq)
        log_probs = []
        for chunk in rows.split(2048):  # the head over a few rows at a time: 2048 x 50304 fp32 logits = 400 MB
            logits = model.head(x[chunk])
            log_probs.append(F.log_softmax(logits, dim=-1).gather(1, seq[chunk + 1][:, None])[:, 0])
        sums = torch.cat(log_probs).cpu().split([n for *_, n in batch])
        for (index, *_), s in zip(batch, sums):
            results[index] = float(s.double().sum())
        if progress is not None:
            progress(len(batch))
        batch.clear()
        sequence.clear()

    for index, (tokens, n) in enumerate(documents):
        if not 0 < n < len(tokens):
            raise ValueError(f"document {index}: cannot score its last {n} tokens out of {len(tokens)}")
        piece = separator + tokens
        if len(piece) > seq_len:
            raise ValueError(f"a document of {len(piece)} tokens (with its separators) does not fit in seq_len="
                             f"{seq_len}. HINT: raise --seq_len")
        if len(sequence) + len(piece) > seq_len:
            flush()
        batch.append((index, len(sequence) + len(separator), len(tokens), n))
        sequence.extend(piece)
    flush()
    return results


def score_items(model: train_gpt.GPT, items: list[dict], seq_len: int = 2048, enc=None, progress=None) -> list[Score]:
    enc = enc or get_encoding()
    documents, lengths = [], []
    for item in items:
        for doc, ending in zip(candidates(enc, item), item["endings"]):
            n = len(enc.encode_ordinary(" " + ending))
            documents.append((doc, n))
            lengths.append(n)
    sums = score_documents(model, documents, seq_len, progress)
    return [Score(sums[4 * i:4 * i + 4], lengths[4 * i:4 * i + 4]) for i in range(len(items))]


def accuracy(items: list[dict], scores: list[Score]) -> dict:
    n = len(items)
    return dict(items=n, acc=sum(s.pred == item["label"] for item, s in zip(items, scores)) / n,
                acc_norm=sum(s.pred_norm == item["label"] for item, s in zip(items, scores)) / n)


def evaluate(model: train_gpt.GPT, items: list[dict], seq_len: int = 2048, show_progress: bool = False) -> dict:
    """{'items', 'acc', 'acc_norm'} of the model on the items."""
    from tqdm import tqdm

    was_training = model.training
    model.eval()
    try:
        with tqdm(total=4 * len(items), unit="ending", desc="HellaSwag", disable=not show_progress) as bar:
            scores = score_items(model, items, seq_len, progress=bar.update)
    finally:
        model.train(was_training)
    return accuracy(items, scores)


def default_seq_len(device: torch.device) -> int:
    # Eager attention materializes (seq_len x seq_len) scores per head: 8192 tokens take ~2-3 GB on a GPU.
    return 8192 if device.type == "cuda" else 2048


def log_hellaswag(model: train_gpt.GPT, num_items: int, log) -> dict | None:
    """The trainer's end-of-run evaluation on the first num_items validation items (all of them when num_items is
    10,042 or more). A missing network must not fail a finished run: the reason is logged instead."""
    try:
        items = load_items()
    except HellaSwagError as e:
        log(f"hellaswag: skipped: {e}")
        return None
    items = items[:num_items]
    t0 = time.perf_counter()
    result = evaluate(model, items, default_seq_len(next(model.parameters()).device))
    log(f"hellaswag: items:{result['items']} acc:{result['acc']:.4f} acc_norm:{result['acc_norm']:.4f} "
        f"time:{time.perf_counter() - t0:.0f}s")
    return result


# -----------------------------------------------------------------------------
# Command line


def main(argv: list[str] | None = None) -> int:
    parser = cli_parser.ArgumentParser(prog="evals/hellaswag.py", description="HellaSwag accuracy (acc, acc_norm) of a "
                                     "trained model, by completion likelihood.")
    parser.add_argument("--checkpoint", required=True, metavar="PATH",
                        help="a checkpoint folder, a run's checkpoint folder (its latest step) or an export folder")
    parser.add_argument("--data", metavar="FILE", help="a HellaSwag .jsonl file (default: the validation set, "
                        "downloaded once into the cache)")
    parser.add_argument("--url", default=URL, help="where to download the validation set from (default: %(default)s)")
    parser.add_argument("--limit", type=int, default=0, help="score only the first N items (default: all)")
    parser.add_argument("--seq_len", type=int, default=0,
                        help="tokens per forward pass (default: 8192 on a GPU, 2048 on a CPU)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if args.limit < 0 or args.seq_len < 0:
        parser.error("--limit and --seq_len must be positive (0: the default)")
    try:
        resolve_checkpoint(args.checkpoint)  # a checkpoint that is not there is said before any download
        items = load_items(args.data, args.url)
        items = items[:args.limit] if args.limit else items
        model = load(args.checkpoint, args.device)
        device = next(model.parameters()).device
        t0 = time.perf_counter()
        result = evaluate(model, items, args.seq_len or default_seq_len(device), show_progress=sys.stderr.isatty())
        seconds = time.perf_counter() - t0
    except (HellaSwagError, ValueError, RuntimeError, OSError) as e:
        print(f"evals/hellaswag.py: error: {e}", file=sys.stderr)
        return 1
    result = dict(result, checkpoint=str(resolve_checkpoint(args.checkpoint)), seconds=round(seconds, 1))
    if args.json:
        print(json.dumps(result))
    else:
        print(f"HellaSwag: {result['items']} items  acc {result['acc']:.4f}  acc_norm {result['acc_norm']:.4f}  "
              f"({seconds:.0f} s on {device})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
