"""train_gpt.py: the NanoGPT speedrun recipe (2025-08-23 record) in one file. (work in progress)"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

# -----------------------------------------------------------------------------
# Data: the shard format (RECIPE §1.1). This is the one definition; data/ scripts import it from here.

SHARD_MAGIC, SHARD_VERSION = 20240520, 1
SHARD_HEADER_BYTES = 256 * 4  # 256 little-endian int32: magic, version, number of tokens, zeros
BOS_ID = 50256  # <|endoftext|>, prepended to every document: the document delimiter
SHARD_HINT = ("HINT: fetch the FineWeb shards again with `python data/cached_fineweb10B.py`, or rebuild shards from text "
              "with `python data/tokenize_text.py`; `python data/shards.py inspect FILE` checks a file.")


class ShardError(ValueError):
    """A shard that is missing, truncated or not in the shard format; the message names the file and a fix."""


def read_shard_header(path: str | os.PathLike) -> int:
    """Validates a shard's header and file size; returns its number of tokens."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            header = np.frombuffer(f.read(SHARD_HEADER_BYTES), dtype="<i4")
        size = path.stat().st_size
    except OSError as e:
        raise ShardError(f"cannot read shard {path}: {e.strerror or e}. {SHARD_HINT}") from None
    if header.size < 256:
        raise ShardError(f"shard {path} is only {size} bytes, shorter than its 1024-byte header. {SHARD_HINT}")
    if header[0] != SHARD_MAGIC:
        raise ShardError(f"shard {path} has magic {header[0]}, expected {SHARD_MAGIC}: not a token shard. {SHARD_HINT}")
    if header[1] != SHARD_VERSION:
        raise ShardError(f"shard {path} has version {header[1]}, expected {SHARD_VERSION}. {SHARD_HINT}")
    num_tokens = int(header[2])
    expected = SHARD_HEADER_BYTES + 2 * num_tokens
    if num_tokens < 0 or size != expected:
        raise ShardError(f"shard {path} is {size} bytes but its header announces {num_tokens:,} tokens "
                         f"({expected:,} bytes): the file is truncated or corrupt. {SHARD_HINT}")
    return num_tokens


def load_shard(path: str | os.PathLike, pin_memory: bool = False) -> torch.Tensor:
    """Reads a validated shard straight into a (pinned) uint16 tensor: no bytes->array or pinning copies."""
    num_tokens = read_shard_header(path)
    tokens = torch.empty(num_tokens, dtype=torch.uint16, pin_memory=pin_memory)
    with open(path, "rb", buffering=0) as f:
        f.seek(SHARD_HEADER_BYTES)
        num_bytes = f.readinto(tokens.numpy())
    if num_bytes != 2 * num_tokens:
        raise ShardError(f"shard {path}: read {num_bytes:,} bytes of tokens, expected {2 * num_tokens:,}. {SHARD_HINT}")
    return tokens


def write_shard(path: str | os.PathLike, tokens) -> None:
    """Writes tokens (any integer array-like, each < 2**16) as a shard; atomic, so a crash never leaves half a file."""
    tokens = np.asarray(tokens)
    assert tokens.ndim == 1 and len(tokens) < 2**31, "a shard holds a 1-D array of fewer than 2**31 tokens"
    assert len(tokens) == 0 or (tokens.min() >= 0 and tokens.max() < 2**16), "token ids must fit in uint16"
    header = np.zeros(256, dtype="<i4")
    header[:3] = SHARD_MAGIC, SHARD_VERSION, len(tokens)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype("<u2").tobytes())
    os.replace(tmp, path)
