"""shards.py: check token shards before training on them.

    python data/shards.py inspect PATH... [--decode N]

For each shard (a folder stands for the .bin files in it) `inspect` validates the header and the file size, then prints
the number of tokens, the number of documents (<|endoftext|> tokens: each document starts with one), the mean document
length, and the first tokens decoded as text. A shard is invalid if its header or size is wrong, it holds no tokens, no
<|endoftext|> or a token outside GPT-2's vocabulary (a padding id 50257-50303 included): train_gpt.py refuses the same
shards, for the same reasons. Exit status: 0 if every shard is valid, 1 otherwise.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from gpt2_tokenizer import TokenizerError, get_encoding  # data/gpt2_tokenizer.py: the tokenizer, offline

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the shard format lives in train_gpt.py
import cli_parser  # noqa: E402
from train_gpt import BOS_ID, SHARD_HINT, ShardError, check_token_ids, load_shard  # noqa: E402

PADDED_VOCAB_SIZE = 50304  # the trainer's vocab_size


def shard_paths(inputs: list[str]) -> list[Path]:
    """The command-line paths, with each folder replaced by the .bin files in it (sorted)."""
    paths = []
    for name in inputs:
        path = Path(name)
        paths += sorted(path.glob("*.bin")) if path.is_dir() else [path]
    return paths


def inspect_shard(path: Path, head_tokens: int = 48) -> dict:
    """Validates one shard and measures it; raises ShardError (naming the file, with a HINT) if it is invalid."""
    tokens = load_shard(path).numpy()  # checks magic, version, exact file size and at least one token
    check_token_ids(tokens, PADDED_VOCAB_SIZE, path)  # what the trainer refuses, with its words
    largest = int(tokens.max())
    is_bos = tokens == BOS_ID
    documents = int(np.count_nonzero(is_bos))
    # A shard may start inside a document that began in the previous shard: those tokens belong to no counted document.
    lead = int(np.argmax(is_bos)) if documents else len(tokens)
    mean_length = (len(tokens) - lead) / documents if documents else float("nan")
    return {"tokens": len(tokens), "documents": documents, "lead": lead, "mean_length": mean_length,
            "largest": largest, "head": tokens[:head_tokens]}


def main(argv: list[str] | None = None) -> int:
    parser = cli_parser.ArgumentParser(description=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    inspect = commands.add_parser("inspect", help="validate shards and print their token and document counts")
    inspect.add_argument("paths", nargs="+", metavar="PATH", help="shard files, or folders holding .bin shards")
    inspect.add_argument("--decode", type=int, default=48, metavar="N",
                         help="decode the first N tokens of each shard as text (default: %(default)s; 0: none)")
    args = parser.parse_args(argv)

    paths = shard_paths(args.paths)
    if not paths:
        print(f"error: no .bin shards in {', '.join(args.paths)}. {SHARD_HINT}", file=sys.stderr)
        return 1
    encoding = None
    valid, invalid, total_tokens, total_documents = 0, 0, 0, 0
    for path in paths:
        try:
            info = inspect_shard(path, head_tokens=max(args.decode, 0))
        except ShardError as e:
            print(f"{path}: INVALID: {str(e).split(' HINT:')[0]}")  # the HINT comes once, at the end
            invalid += 1
            continue
        valid += 1
        total_tokens += info["tokens"]
        total_documents += info["documents"]
        mean = f"{info['mean_length']:,.1f} tokens" if info["documents"] else "n/a"
        print(f"{path}: ok\n  tokens {info['tokens']:,}, documents {info['documents']:,}, mean document length {mean}, "
              f"largest token id {info['largest']:,}")
        if info["lead"]:
            print(f"  starts inside a document: {info['lead']:,} tokens before the first <|endoftext|>")
        if args.decode > 0 and encoding is None:
            try:
                encoding = get_encoding()
            except TokenizerError as e:
                print(f"  (cannot decode: {e})")
                args.decode = 0
        if args.decode > 0:
            head = info["head"].tolist()
            print(f"  first {len(head)} tokens: {encoding.decode(head)!r}")
    if len(paths) > 1:
        print(f"{len(paths)} shards: {valid} valid, {invalid} invalid; the valid ones hold {total_tokens:,} tokens in "
              f"{total_documents:,} documents")
    if invalid:
        print(f"error: {invalid} of {len(paths)} shards are invalid (see above). {SHARD_HINT}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
