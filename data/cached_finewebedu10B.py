"""Downloads FineWeb-Edu 10B (kjj0/finewebedu10B-gpt2, 99 train shards of 100M tokens) into data/finewebedu10B/.

    python data/cached_finewebedu10B.py [N]    # the val shard and the first N train shards (default: all)

The reference entry point (docs/recipes.md#download); the work is done by cached_fineweb.py, whose --help explains
the options.
"""

import sys

from cached_fineweb import main

if __name__ == "__main__":
    sys.exit(main(dataset="finewebedu10B"))
