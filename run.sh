#!/usr/bin/env bash
# One command for the record: set up .venv when needed (setup.sh), fetch the FineWeb shards the speedrun needs (skipped
# when already here and valid), then train on the local GPUs with torchrun (through launch.py). Without a GPU it runs the smoke preset on
# the CPU instead, on the sample shards shipped in data/sample/, and says so.
# Extra arguments go to train_gpt.py, e.g. ./run.sh --seed=1
set -euo pipefail
cd "$(dirname "$0")"
. ./setup.sh
gpus=0
if command -v nvidia-smi >/dev/null 2>&1; then
    gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
fi
if [ "$gpus" -eq 0 ]; then
    echo "run.sh: no GPU found: running --preset=smoke on the CPU (a demo of the same code, not the record)" >&2
    exec python train_gpt.py --preset=smoke "$@"
fi
nproc=1  # the world size must divide the recipe's 8 windows per step
for n in 8 4 2; do
    if [ "$gpus" -ge "$n" ]; then nproc=$n; break; fi
done
if [ "$nproc" -ne "$gpus" ]; then echo "run.sh: $gpus GPUs found; using $nproc (the world size must divide 8)" >&2; fi
python data/cached_fineweb10B.py 9  # the val shard + 900M training tokens; the record reads about 680M
exec python launch.py --standalone --nproc_per_node="$nproc" train_gpt.py "$@"  # torchrun, ending on our line
