"""Downloads FineWeb 100B (kjj0/fineweb100B-gpt2, 1030 train shards of 100M tokens) into data/fineweb100B/.

    python data/cached_fineweb100B.py [N]    # the val shard and the first N train shards (default: all)

The reference entry point (docs/recipes.md#download); the work is done by cached_fineweb.py, whose --help explains
the options.
"""

import sys

from cached_fineweb import main

if __name__ == "__main__":
    sys.exit(main(dataset="fineweb100B"))
