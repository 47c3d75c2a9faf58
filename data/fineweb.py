"""fineweb.py: make the FineWeb shards from the raw dataset, as the reference did
(docs/recipes.md#how-fineweb-was-tokenized).

    pip install datasets
    python data/fineweb.py [--version 10B|100B] [tokenize_text.py options, e.g. --workers 8 --overwrite]

Streams HuggingFaceFW/fineweb (config sample-10BT or sample-100BT) through tokenize_text.py into data/fineweb10B/ (or
data/fineweb100B/): the first 10^8 tokens form fineweb_val_000000.bin, the rest fineweb_train_%06d.bin shards of 10^8
tokens, the layout that `python data/cached_fineweb10B.py` downloads ready-made. Downloading those is much faster;
this is for checking them, or for changing how the text is tokenized.
"""

import argparse
import sys
from pathlib import Path

import tokenize_text

import cli_parser  # tokenize_text put the repository on sys.path


def main(argv: list[str] | None = None) -> int:
    parser = cli_parser.ArgumentParser(description=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--version", choices=["10B", "100B"], default="10B",
                        help="which FineWeb sample (default: %(default)s)")
    args, rest = parser.parse_known_args(argv)
    out = Path(__file__).resolve().parent / f"fineweb{args.version}"
    ours = {"--out": str(out), "--name": "fineweb", "--val_tokens": str(10**8), "--shard_tokens": str(10**8)}
    given = {arg.partition("=")[0] for arg in rest}  # the user's --out DIR replaces ours (not given twice: refused)
    return tokenize_text.main(["--hf_dataset", "HuggingFaceFW/fineweb", "--hf_config", f"sample-{args.version}T",
                               *[x for name, value in ours.items() if name not in given for x in (name, value)], *rest])


if __name__ == "__main__":
    sys.exit(main())
