"""Downloads FineWeb 10B (kjj0/fineweb10B-gpt2, 103 train shards of 100M tokens) into data/fineweb10B/.

    python data/cached_fineweb10B.py [N]    # the val shard and the first N train shards (default: all)

The reference entry point (docs/recipes.md#download); the work is done by cached_fineweb.py, whose --help explains
the options.
"""

import sys

from cached_fineweb import main

if __name__ == "__main__":
    sys.exit(main(dataset="fineweb10B"))
