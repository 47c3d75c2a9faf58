"""Tests of using a trained model: sample.py, export.py (and its Hub upload), evals/hellaswag.py, tracking.py (W&B).

No network: the Hub upload goes to a loopback stand-in (through HF_ENDPOINT), the HellaSwag download to a loopback
file server, W&B runs in offline mode, and https requests go to a dead proxy, so an accidental download fails at once.
"""

from __future__ import annotations

import base64
import dataclasses
import glob
import json
import os
import socket
import subprocess
import sys
import threading
import time
import types
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "data"), str(ROOT / "tests")]
from gpt2_tokenizer import get_encoding  # noqa: E402
from test_recipe_2026 import randomized  # noqa: E402

import export  # noqa: E402
import sample  # noqa: E402
import tracking  # noqa: E402
import train_gpt as tg  # noqa: E402
from evals import hellaswag  # noqa: E402

BOS = tg.BOS_ID
FIXTURE = ROOT / "tests" / "fixtures" / "hellaswag_tiny.jsonl"
DEAD_PROXY = "http://127.0.0.1:9"  # nothing listens there: any https request fails fast
SECRET = "hf_loopbackTestToken0123456789"  # the token the Hub stand-in expects; it must never be printed


@pytest.fixture(scope="module")
def enc(tmp_path_factory):
    """The GPT-2 tokenizer from a fresh tiktoken cache seeded offline (see data/gpt2_tokenizer.py)."""
    saved = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = str(tmp_path_factory.mktemp("tiktoken"))
    get_encoding.cache_clear()
    yield get_encoding()
    if saved is None:
        os.environ.pop("TIKTOKEN_CACHE_DIR")
    else:
        os.environ["TIKTOKEN_CACHE_DIR"] = saved
    get_encoding.cache_clear()


def clean_env(**extra) -> dict:
    """The environment for a command run as a user would: no Hub, W&B or cache settings from this machine."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "WANDB_", "XDG_CACHE", "HUGGING"))}
    return {**env, "HTTPS_PROXY": DEAD_PROXY, "HTTP_PROXY": DEAD_PROXY, "NO_PROXY": "127.0.0.1", **extra}


def run(script: str, *args, env: dict | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True, text=True,
                          env=env or clean_env(), timeout=timeout, cwd=ROOT)


def tiny(preset: str, **overrides) -> tg.Hyperparameters:
    """The preset's model at width 32: its layers, attention pattern and techniques kept, its dtype too (bfloat16 for
    the full-size presets), so that every preset's kind of model is covered in seconds."""
    args = tg.parse_args([f"--preset={preset}"])
    shape = dict(model_dim=32, num_heads=2, head_dim=16, mlp_hidden=64, mudd_hidden=16, use_compile=False,
                 bigram_vocab_size=min(args.bigram_vocab_size, 4096), bigram_sign_rows=min(args.bigram_sign_rows, 64))
    return dataclasses.replace(args, **{**shape, **overrides})


def final_model(args: tg.Hyperparameters, seed: int = 0) -> tg.GPT:
    """A randomized model as load_model gives it: evaluation mode, the final validation's windows."""
    torch.manual_seed(seed)
    model = randomized(tg.GPT(args), seed).eval()
    model.set_step(tg.plan_step(args.num_iterations + args.extension_iterations, args))
    return model


@pytest.fixture(scope="module")
def smoke_model() -> tg.GPT:
    return final_model(tiny("smoke"))


# -----------------------------------------------------------------------------
# sample.py


def test_next_token_logits_are_the_models_logits_at_the_last_position(smoke_model):
    context = [BOS, *torch.randint(0, 50000, (37,), generator=torch.Generator().manual_seed(1)).tolist()]
    block = smoke_model.args.block_size
    seq = torch.tensor(context + [0] * (-len(context) % block))
    with torch.no_grad():
        expected = smoke_model.logits(seq)[len(context) - 1, :sample.GPT2_VOCAB]
    got = sample.next_token_logits(smoke_model, context)
    assert got.shape == (50257,)  # padding ids 50257.. are never candidates
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_sampling_respects_top_k_and_temperature():
    logits = torch.randn(50257, generator=torch.Generator().manual_seed(0))
    top3 = set(torch.topk(logits, 3).indices.tolist())
    gen = torch.Generator().manual_seed(0)
    drawn = [sample.sample_next(logits, 2.0, 3, gen) for _ in range(300)]
    assert set(drawn) == top3  # only the 3 most likely, and (at temperature 2) each of them
    assert sample.sample_next(logits, 0.0, None, gen) == int(logits.argmax())
    assert all(sample.sample_next(logits, 1.0, 1, gen) == int(logits.argmax()) for _ in range(20))
    drawn = {sample.sample_next(logits, 1.0, None, gen) for _ in range(300)}
    assert len(drawn) > 100  # no top-k: the whole vocabulary is in play


def test_generate_is_deterministic_for_a_seed(smoke_model):
    prompt = [464, 3139, 286, 4881, 318]  # "The capital of France is"
    a = sample.generate(smoke_model, prompt, 12, temperature=1.0, top_k=50, seed=3, stop_at_end=False)
    b = sample.generate(smoke_model, prompt, 12, temperature=1.0, top_k=50, seed=3, stop_at_end=False)
    c = sample.generate(smoke_model, prompt, 12, temperature=1.0, top_k=50, seed=4, stop_at_end=False)
    assert a == b and len(a) == 12 and a != c
    assert all(0 <= t < 50257 for t in a + c)
    greedy = sample.generate(smoke_model, prompt, 6, temperature=0, stop_at_end=False)
    assert sample.generate(smoke_model, prompt, 6, temperature=1.0, top_k=1, seed=9, stop_at_end=False) == greedy


def test_generate_keeps_the_last_tokens_of_a_long_context(smoke_model, monkeypatch):
    limit = sample.max_context(smoke_model.args)
    assert limit == 512  # smoke: final long window 10 blocks of 64 = 640 tokens; documents cut at 512
    contexts = []
    real = sample.next_token_logits

    def spy(model, context):
        contexts.append(list(context))
        return real(model, context)

    monkeypatch.setattr(sample, "next_token_logits", spy)
    prompt = torch.randint(0, 50000, (limit - 3,), generator=torch.Generator().manual_seed(2)).tolist()
    new = sample.generate(smoke_model, prompt, 5, temperature=0, stop_at_end=False)
    assert [len(c) for c in contexts] == [limit - 2, limit - 1, limit, limit, limit]
    assert contexts[2] == [BOS, *prompt, *new[:2]]  # still whole: BOS + limit - 1 tokens
    assert contexts[4] == [BOS, *(prompt + new[:4])[-(limit - 1):]]  # too long: BOS, then the last limit - 1


def test_generate_stops_at_the_end_of_the_document(smoke_model, monkeypatch):
    logits = torch.zeros(50257)
    logits[BOS] = 100.0
    monkeypatch.setattr(sample, "next_token_logits", lambda model, context: logits)
    assert sample.generate(smoke_model, [464], 5, temperature=0) == []
    assert sample.generate(smoke_model, [464], 5, temperature=0, stop_at_end=False) == [BOS] * 5


@pytest.mark.parametrize("preset", list(tg.PRESETS))
def test_generate_works_for_every_preset(preset):
    model = final_model(tiny(preset))
    tokens = sample.generate(model, [464, 3139], 3, temperature=1.0, top_k=10, seed=0, stop_at_end=False)
    assert len(tokens) == 3 and all(0 <= t < 50257 for t in tokens)


def test_bad_sampling_settings_say_what_to_do(smoke_model):
    with pytest.raises(ValueError, match="temperature"):
        sample.generate(smoke_model, [1], 1, temperature=-1)
    with pytest.raises(ValueError, match="vocabulary"):
        sample.generate(smoke_model, [50300], 1)


@pytest.fixture(scope="module")
def saved_smoke(tmp_path_factory, smoke_model) -> Path:
    """A run's checkpoint folder as the trainer writes it: records/checkpoints/<run_id>/step_<N>/."""
    run = tmp_path_factory.mktemp("checkpoints") / "tiny_run"
    tg.save_model(final_model(tiny("smoke"), seed=1), run / "step_4")
    tg.save_model(smoke_model, run / "step_14")
    return run


def test_sample_command_line(saved_smoke, enc):
    env = clean_env(TIKTOKEN_CACHE_DIR=os.environ["TIKTOKEN_CACHE_DIR"])
    args = ("sample.py", f"--checkpoint={saved_smoke}", "--prompt=Hello world", "--max_new_tokens=8", "--seed=5",
            "--num_samples=2", "--device=cpu")
    first, second = run(*args, env=env), run(*args, env=env)
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout  # the seed decides
    samples = first.stdout.split("-" * 40 + "\n")
    assert len(samples) == 2 and all(s.startswith("Hello world") for s in samples)
    # the run folder's latest step is the model sampled: the same text as generate() on it
    expected = "Hello world" + enc.decode(sample.generate(sample.load(saved_smoke / "step_14", "cpu"),
                                                          enc.encode_ordinary("Hello world"), 8, seed=5))
    assert samples[0] == expected + "\n"
    missing = run("sample.py", f"--checkpoint={saved_smoke}/nothing", env=env)
    assert missing.returncode == 1 and "HINT" in missing.stderr and "Traceback" not in missing.stderr


@pytest.mark.parametrize("setting", ["--temperature=nan", "--temperature=inf", "--temperature=-1", "--top_k=-1"])
def test_sampling_settings_that_are_not_finite_and_positive_are_refused(saved_smoke, capsys, setting):
    assert sample.main([f"--checkpoint={saved_smoke}", setting]) == 1
    err = capsys.readouterr().err
    name, value = setting[2:].split("=")
    shown = float(value) if name == "temperature" else value
    assert err.splitlines() == [err.strip()] and err.startswith(f"sample.py: error: {name}={shown} must"), err
    assert "HINT" in err


@pytest.mark.parametrize("temperature", [1e-30, 1e-320, 5e-324])
def test_a_tiny_positive_temperature_is_greedy_not_a_torch_error(temperature):
    """logits / 1e-320 overflows (and 1e-320 is 0 in fp32): the limit of softmax(logits / T) is the argmax."""
    logits = torch.randn(sample.GPT2_VOCAB, generator=torch.Generator().manual_seed(0)) * 10
    for top_k in (None, 5):
        assert sample.sample_next(logits, temperature, top_k, torch.Generator()) == int(logits.argmax())


def test_a_device_torch_does_not_know_is_one_line(saved_smoke, capsys):
    assert sample.main([f"--checkpoint={saved_smoke}", "--device=tpu"]) == 1
    err = capsys.readouterr().err
    assert err == "sample.py: error: --device=tpu is not a device. HINT: use cpu, cuda, cuda:N or auto\n", err


@pytest.mark.parametrize("after_s", [0.3, 1.0])
def test_ctrl_c_while_loading_or_sampling_is_one_line(saved_smoke, enc, after_s):
    """Ctrl-C early, while torch is imported, as well as later, while sampling: `stopped: interrupted`, no traceback."""
    import signal
    proc = subprocess.Popen([sys.executable, "sample.py", f"--checkpoint={saved_smoke}", "--device=cpu",
                             "--max_new_tokens=100000", "--num_samples=100000", "--temperature=2"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=clean_env(TIKTOKEN_CACHE_DIR=os.environ["TIKTOKEN_CACHE_DIR"]),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(after_s)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and err.strip().splitlines()[-1] == "stopped: interrupted", err
    assert "Traceback" not in err, err


@pytest.mark.parametrize("damage", ["truncated weights", "settings a list", "settings not JSON", "a file"])
def test_a_damaged_model_is_one_line_with_a_hint_in_every_tool(tmp_path, smoke_model, capsys, damage):
    folder = tmp_path / "damaged"
    tg.save_model(smoke_model, folder)
    if damage == "truncated weights":
        data = (folder / tg.MODEL_FILE).read_bytes()
        (folder / tg.MODEL_FILE).write_bytes(data[:len(data) // 2])
        expected = f"{folder} holds a damaged model ("
    elif damage == "settings a list":
        (folder / tg.SETTINGS_FILE).write_text("[1, 2]\n")
        expected = f"{folder / tg.SETTINGS_FILE} is not a saved model's settings (not a JSON object). HINT"
    elif damage == "settings not JSON":
        (folder / tg.SETTINGS_FILE).write_text('{"num_layers": \n')
        expected = f"{folder / tg.SETTINGS_FILE} is not a saved model's settings (Expecting value"
    else:
        folder = folder / tg.MODEL_FILE
        expected = f"{folder} is a file: give the folder that holds it ({folder.parent})"
    for tool, argv in ((sample, ["--device=cpu"]), (export, [f"--out={tmp_path / 'out'}"]),
                       (hellaswag, ["--device=cpu", f"--data={FIXTURE}"])):
        assert tool.main([f"--checkpoint={folder}", *argv]) == 1, tool
        err = capsys.readouterr().err
        assert err.splitlines() == [err.strip()] and expected in err and "Traceback" not in err, (tool, err)
        assert "HINT" in err or damage == "a file"
    assert not (tmp_path / "out").exists()


def test_the_checks_of_a_saved_model_hold_under_python_O(tmp_path, smoke_model):
    """python -O drops assert statements: the settings check is a plain one, so a settings.json that is a list is
    still one error line there (it was an AttributeError traceback)."""
    tg.save_model(smoke_model, tmp_path / "damaged")
    (tmp_path / "damaged" / tg.SETTINGS_FILE).write_text("[1, 2]\n")
    result = subprocess.run([sys.executable, "-O", str(ROOT / "sample.py"), f"--checkpoint={tmp_path / 'damaged'}",
                             "--device=cpu"], capture_output=True, text=True, timeout=120, env=clean_env())
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert "is not a saved model's settings (not a JSON object). HINT" in result.stderr.strip().splitlines()[-1]


# -----------------------------------------------------------------------------
# export.py


def fake_log(path: Path, args: tg.Hyperparameters, val: dict[int, float]) -> Path:
    """A log in our trainer's layout (source, environment, settings, step lines), as records/compare.py reads it."""
    total = args.num_iterations + args.extension_iterations
    lines = ["# train_gpt.py source", "=" * 100, "Running Python 3.11.0", "Running PyTorch 2.13.0+cpu",
             "CPU: test machine (2 cores)", "=" * 100, "hyperparameters: " + json.dumps(dataclasses.asdict(args))]
    for step in range(total + 1):
        if step:
            lines.append(f"step:{step}/{total} train_time:{10 * step}ms step_avg:10.00ms train_loss:{9 - step / 9:.4f}")
        if step in val:
            lines.append(f"step:{step}/{total} val_loss:{val[step]:.4f} train_time:{10 * step}ms step_avg:10.00ms")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("preset", list(tg.PRESETS))
def test_export_then_load_gives_exactly_the_same_logits(preset, tmp_path):
    args = tiny(preset)
    model = final_model(args)
    tg.save_model(model, tmp_path / "export_test_run" / "step_3")
    out, _ = export.export(tmp_path / "export_test_run", tmp_path / "export")  # the run folder: its latest step
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "settings.json", "train_gpt.py", "README.md"}
    loaded = tg.load_model(out)  # one call, no pickle
    seq = torch.randint(0, 50000, (2 * args.block_size,), generator=torch.Generator().manual_seed(0))
    seq[[0, 50]] = BOS
    with torch.no_grad():
        assert torch.equal(model.logits(seq), loaded.logits(seq))
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b) and a.dtype == b.dtype, name


def test_export_needs_no_pickle(tmp_path, smoke_model, monkeypatch):
    from safetensors import safe_open

    tg.save_model(smoke_model, tmp_path / "ckpt")
    out, _ = export.export(tmp_path / "ckpt", tmp_path / "out")
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:  # safetensors: a header and raw tensors
        assert set(f.keys()) == set(smoke_model.state_dict())
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("load_model unpickled something"))
    tg.load_model(out)


def test_model_card_states_the_facts(tmp_path, smoke_model):
    args = dataclasses.replace(smoke_model.args, run_id="card_run", log_dir=str(tmp_path / "logs"))
    model = tg.GPT(args)
    model.load_state_dict(smoke_model.state_dict())
    tg.save_model(model, tmp_path / "checkpoints" / "card_run" / "step_12")
    log = fake_log(tmp_path / "logs" / "card_run.txt", args, {0: 10.8, 4: 9.1234, 8: 7.5, 12: 6.25, 14: 6.0})
    out, _ = export.export(tmp_path / "checkpoints" / "card_run" / "step_12", tmp_path / "export")
    card = (out / "README.md").read_text()
    assert (out / "training_log.txt").read_bytes() == log.read_bytes()  # found through settings.json's log_dir
    params = sum(p.numel() for p in model.parameters())
    # steps 0..11 of the smoke schedule: 2 windows of 256 tokens for 4 steps, then 2 x 512 (3 stages over 12 steps)
    tokens = 4 * 2 * 256 + 8 * 2 * 512
    assert f"{params:,} parameters" in card and f"{tokens:,} tokens" in card
    assert "step 12 of 14" in card and "6.2500 at step 12" in card  # the checkpoint's step, not the run's end
    assert "preset `smoke`" in card and "load_model(" in card and "## Limitations" in card
    assert card.startswith("---\nlibrary_name: pytorch\n")  # Hub metadata block


def test_export_refuses_the_log_of_another_run(tmp_path, smoke_model):
    """The model card would state another run's losses and hardware: refused before anything is written."""
    args = dataclasses.replace(smoke_model.args, run_id="mine")
    model = tg.GPT(args)
    model.load_state_dict(smoke_model.state_dict())
    tg.save_model(model, tmp_path / "checkpoints" / "mine" / "step_14")
    other = fake_log(tmp_path / "logs" / "theirs.txt", dataclasses.replace(args, run_id="theirs"), {14: 6.0})
    with pytest.raises(export.ExportError, match=f"^--log={other} is the log of run 'theirs'; the checkpoint is of "
                                                 "run 'mine'. HINT: pass that run's log, records/logs/mine.txt"):
        export.export(tmp_path / "checkpoints" / "mine" / "step_14", tmp_path / "out", log=other)
    assert not (tmp_path / "out").exists()
    mine = fake_log(tmp_path / "logs" / "mine.txt", args, {14: 6.0})
    out, _ = export.export(tmp_path / "checkpoints" / "mine" / "step_14", tmp_path / "out", log=mine)
    assert "6.0000 at step 14" in (out / "README.md").read_text()


def test_export_without_a_log_says_how_to_give_one(tmp_path, smoke_model, capsys):
    tg.save_model(smoke_model, tmp_path / "lonely")
    out, _ = export.export(tmp_path / "lonely", tmp_path / "out")
    assert "--log=" in capsys.readouterr().err and "not known" in (out / "README.md").read_text()
    with pytest.raises(export.ExportError, match="HINT"):
        export.export(tmp_path / "lonely", tmp_path / "out", log=tmp_path / "missing.txt")


class HubUploadStandIn:
    """An HTTP server on 127.0.0.1 that answers the Hub API calls of create_repo and upload_folder (huggingface_hub
    2.x): POST /api/repos/create, /api/validate-yaml (the model card), /api/models/{repo}/preupload/main (every file
    "regular", so its bytes travel in the commit) and /api/models/{repo}/commit/main (an ndjson commit). It records
    each request's path and Authorization header and the files committed. `refuse`: answer 401 to everything."""

    def __init__(self, refuse: bool = False):
        self.requests, self.files, self.repos = [], {}, []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def reply(self, status: int, body: dict):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                hub.requests.append(("GET", self.path, self.headers.get("Authorization")))
                self.reply(404, {"error": "not in the stand-in"})

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                path = self.path.split("?")[0]
                hub.requests.append(("POST", path, self.headers.get("Authorization")))
                if refuse:
                    return self.reply(401, {"error": "Invalid credentials in Authorization header"})
                if path == "/api/repos/create":
                    request = json.loads(body)
                    hub.repos.append(request)
                    return self.reply(200, {"url": f"{hub.url}/{request['organization']}/{request['name']}"})
                if path == "/api/validate-yaml":
                    return self.reply(200, {"errors": [], "warnings": []})
                if "/preupload/" in path:
                    files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                             for f in json.loads(body)["files"]]
                    return self.reply(200, {"files": files, "commitOid": "0" * 40})
                if "/commit/" in path:
                    for line in body.decode().splitlines():
                        item = json.loads(line)
                        if item["key"] == "file":
                            hub.files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                    repo = path.removeprefix("/api/models/").split("/commit/")[0]
                    return self.reply(200, {"commitUrl": f"{hub.url}/{repo}/commit/{'1' * 40}", "commitOid": "1" * 40})
                self.reply(404, {"error": "not in the stand-in"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def upload_hub():
    servers = []

    def start(**kwargs):
        servers.append(HubUploadStandIn(**kwargs))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


def hub_env(hub: HubUploadStandIn, tmp_path: Path) -> dict:
    return clean_env(HF_ENDPOINT=hub.url, HF_TOKEN=SECRET, HF_HOME=str(tmp_path / "hf_home"), HF_HUB_DISABLE_XET="1",
                     HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_ETAG_TIMEOUT="5", HF_HUB_DOWNLOAD_TIMEOUT="5")


def test_push_to_hub_uploads_the_folder_against_a_loopback_hub(tmp_path, upload_hub, saved_smoke):
    hub = upload_hub()
    result = run("export.py", f"--checkpoint={saved_smoke}", f"--out={tmp_path / 'export'}",
                 "--push_to_hub=someone/tiny-speedrun", "--private", env=hub_env(hub, tmp_path))
    assert result.returncode == 0, result.stderr
    assert SECRET not in result.stdout + result.stderr  # the token is never printed
    assert hub.repos == [{"name": "tiny-speedrun", "organization": "someone", "visibility": "private"}]
    paths = [path for _, path, _ in hub.requests]
    assert paths[0] == "/api/repos/create" and paths[-1] == "/api/models/someone/tiny-speedrun/commit/main"
    assert all(auth == f"Bearer {SECRET}" for *_, auth in hub.requests)  # the token from HF_TOKEN, on every call
    local = {p.name: p.read_bytes() for p in (tmp_path / "export").iterdir()}
    assert hub.files == local  # every file, byte for byte
    assert "# tiny-speedrun" in local["README.md"].decode() and "uploaded to someone/tiny-speedrun" in result.stdout


def test_push_to_hub_refused_says_how_to_log_in(tmp_path, upload_hub, saved_smoke):
    hub = upload_hub(refuse=True)
    result = run("export.py", f"--checkpoint={saved_smoke}", f"--out={tmp_path / 'export'}",
                 "--push_to_hub=someone/tiny-speedrun", env=hub_env(hub, tmp_path))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "HINT: log in with `hf auth login` or set HF_TOKEN" in result.stderr
    assert SECRET not in result.stdout + result.stderr
    assert (tmp_path / "export" / "model.safetensors").is_file()  # the export itself is kept


def test_push_to_hub_without_a_network_says_so_in_one_line(tmp_path, upload_hub, saved_smoke):
    hub = upload_hub()
    hub.stop()  # nothing listens at HF_ENDPOINT any more
    result = run("export.py", f"--checkpoint={saved_smoke}", f"--out={tmp_path / 'export'}",
                 "--push_to_hub=someone/tiny-speedrun", env=hub_env(hub, tmp_path))
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    *notices, last = result.stderr.strip().splitlines()  # (a notice that the card has no training log)
    assert all(line.startswith("export.py: no training log found") for line in notices), notices
    assert last.startswith("export.py: error: could not upload to someone/tiny-speedrun: ConnectError: "), last
    assert "HINT: check your network connection" in last, last
    assert (tmp_path / "export" / "model.safetensors").is_file()  # the export itself is kept


def test_export_never_writes_over_a_folder_that_is_not_empty_and_uploads_only_what_it_wrote(tmp_path, upload_hub,
                                                                                            saved_smoke):
    out = tmp_path / "export"
    out.mkdir()
    (out / "notes.txt").write_text("my own notes\n")
    (out / "README.md").write_text("my own readme\n")
    env = hub_env(upload_hub(), tmp_path)
    result = run("export.py", f"--checkpoint={saved_smoke}", f"--out={out}", env=env)
    assert result.returncode == 1 and result.stderr.splitlines() == [
        f"export.py: error: --out={out} is not empty (it holds README.md, notes.txt). HINT: choose a new folder, or "
        "pass --overwrite=true to replace the files an export writes (other files stay, and are never uploaded)"]
    assert (out / "README.md").read_text() == "my own readme\n" and sorted(p.name for p in out.iterdir()) == [
        "README.md", "notes.txt"]
    hub = upload_hub()
    result = run("export.py", f"--checkpoint={saved_smoke}", f"--out={out}", "--overwrite=true",
                 "--push_to_hub=someone/tiny", env=hub_env(hub, tmp_path))
    assert result.returncode == 0, result.stderr
    written = ["README.md", "model.safetensors", "settings.json", "train_gpt.py"]
    assert f"exported to {out}: {', '.join(written)}" in result.stdout
    assert sorted(hub.files) == written and (out / "notes.txt").read_text() == "my own notes\n"


def test_export_names_the_real_cause_of_a_bad_out_or_log(tmp_path, saved_smoke, capsys):
    (tmp_path / "a_file").write_text("x\n")
    (tmp_path / "notes.txt").write_text("not a training log\n")
    (tmp_path / "binary").write_bytes(b"\xff\xfe\x00garbage")
    cases = [([f"--out={tmp_path / 'a_file'}"], f"--out={tmp_path / 'a_file'} is a file, not a folder. HINT"),
             ([f"--out={tmp_path / 'o1'}", f"--log={tmp_path}"], f"--log={tmp_path}: is a folder, not a file. HINT"),
             ([f"--out={tmp_path / 'o2'}", f"--log={tmp_path / 'notes.txt'}"],
              f"--log={tmp_path / 'notes.txt'} is not a training log: no line of 100 '=' characters"),
             ([f"--out={tmp_path / 'o3'}", f"--log={tmp_path / 'binary'}"],
              f"--log={tmp_path / 'binary'} is not a training log: not UTF-8 text (bad byte at offset 0). HINT"),
             ([f"--out={tmp_path / 'a_file' / 'sub'}"],
              f"--out={tmp_path / 'a_file' / 'sub'} cannot be made: {tmp_path / 'a_file'} is a file, not a folder. "
              "HINT"),
             (["--out="], "--out is empty. HINT")]
    for args, message in cases:
        try:
            assert export.main([f"--checkpoint={saved_smoke}", *args]) == 1
        except SystemExit as usage:  # the parser's refusal
            assert usage.code == 1
        err = capsys.readouterr().err
        assert err.splitlines() == [err.strip()] and message in err and err.count("HINT") == 1, err
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()  # refused before writing anything


# -----------------------------------------------------------------------------
# evals/hellaswag.py


def bigram_model(favoured: dict[int, int], strength: float = 40.0) -> tg.GPT:
    """A 2025-08-23-recipe model whose next-token logits depend only on the current token: attention and MLP outputs
    are zero (their output projections are zero at init), so the final hidden state is norm(embedding). Each token of
    `favoured` gets a one-hot embedding, and the head raises its logit for the favoured successor by `strength`."""
    args = tiny("smoke_2025_08_23", model_dim=64, num_heads=2, head_dim=32)
    model = tg.GPT(args).eval()
    model.set_step(tg.plan_step(args.num_iterations + args.extension_iterations, args))
    slots = {t: i + 1 for i, t in enumerate(sorted(favoured))}  # slot 0: every other token
    assert len(slots) < args.model_dim
    with torch.no_grad():
        model.embed.weight.zero_()
        model.embed.weight[:, 0] = 1.0
        model.lm_head_w.zero_()
        for prev, slot in slots.items():
            model.embed.weight[prev] = F.one_hot(torch.tensor(slot), args.model_dim).float()
            model.lm_head_w[favoured[prev], slot] = strength / args.model_dim**0.5  # norm() scales one-hot by sqrt(D)
    return model


@torch.no_grad()
def reference_log_prob(model: tg.GPT, document: list[int], n: int) -> float:
    """The bigram model's log-probability of the last n tokens, from its weights: logit = cap * sigmoid((W e + offset)
    / temperature) with e the RMS-normed embedding of the previous token, softmax over all 50304 rows."""
    args = model.args
    total = 0.0
    for prev, nxt in zip(document[-n - 1:-1], document[-n:]):
        e = model.embed.weight[prev]
        e = e / e.square().mean().sqrt()
        logits = args.logit_softcap * torch.sigmoid((model.lm_head_w @ e + args.logit_offset) / args.logit_temperature)
        total += float(torch.log_softmax(logits.double(), dim=0)[nxt])
    return total


def fixture_model(enc) -> tuple[tg.GPT, list[dict]]:
    """The fixture's known answers (tests/fixtures/hellaswag_tiny.jsonl): the model favours every step of item 1's
    right ending; every step but the first of item 2's right ending (a long one), so that its one-token wrong
    ending " sings" has the higher sum but not the higher mean; and every step of item 3's ending 3, a wrong one."""
    items = hellaswag.read_items(FIXTURE)
    favoured = {}
    for item, chosen in zip(items, (0, 2, 3)):
        doc = hellaswag.candidates(enc, item)[chosen]
        n = len(enc.encode_ordinary(" " + item["endings"][chosen]))
        first = len(doc) - n - (0 if chosen == 2 else 1)  # item 2: from the ending's first token on
        for prev, nxt in zip(doc[first:-1], doc[first + 1:]):
            assert favoured.setdefault(prev, nxt) == nxt, "a fixture token would need two favoured successors"
    return bigram_model(favoured), items


def test_hellaswag_fixture_gives_the_known_answer(enc):
    model, items = fixture_model(enc)
    scores = hellaswag.score_items(model, items, seq_len=256, enc=enc)
    for item, score in zip(items, scores):
        for doc, ending, got, n in zip(hellaswag.candidates(enc, item), item["endings"], score.log_probs,
                                       score.num_tokens):
            assert n == len(enc.encode_ordinary(" " + ending))
            assert got == pytest.approx(reference_log_prob(model, doc, n), abs=1e-3)
    assert [s.pred for s in scores] == [0, 0, 3] and [s.pred_norm for s in scores] == [0, 2, 3]
    assert hellaswag.accuracy(items, scores) == dict(items=3, acc=1 / 3, acc_norm=2 / 3)
    by_hand = hellaswag.Score(log_probs=[-4.0, -3.0, -10.0, -9.0], num_tokens=[2, 1, 10, 3])  # means -2 -3 -1 -3
    assert (by_hand.pred, by_hand.pred_norm) == (1, 2)


def test_hellaswag_scores_do_not_depend_on_packing(enc):
    """The 2026-08 recipe's smear, bigram hash and key offset read the previous token: without the separators, an
    ending's score would change with what precedes it in the packed sequence."""
    model = final_model(tiny("smoke"))
    items = hellaswag.read_items(FIXTURE)
    alone = [hellaswag.score_items(model, [item], seq_len=128, enc=enc)[0].log_probs for item in items]
    packed = [s.log_probs for s in hellaswag.score_items(model, items[::-1] * 2, seq_len=1024, enc=enc)]
    for got, expected in zip(packed, alone[::-1] * 2):
        assert got == pytest.approx(expected, abs=2e-4)


def test_hellaswag_download_once_into_the_cache(tmp_path, monkeypatch, capsys):
    served = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            served.append(self.path)
            data = FIXTURE.read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    url = f"http://127.0.0.1:{server.server_address[1]}/hellaswag_val.jsonl"
    try:
        items = hellaswag.load_items(url=url)
        again = hellaswag.load_items(url=url)
    finally:
        server.shutdown()
        server.server_close()
    cached = tmp_path / "cache" / "gpt2-speedrun" / "hellaswag" / "hellaswag_val.jsonl"
    assert served == ["/hellaswag_val.jsonl"] and items == again and len(items) == 3
    assert cached.read_bytes() == FIXTURE.read_bytes() and list(cached.parent.iterdir()) == [cached]
    assert "downloading the validation set once" in capsys.readouterr().err


def test_hellaswag_offline_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    with pytest.raises(hellaswag.HellaSwagError, match="HINT: check your network") as e:
        hellaswag.load_items(url="http://127.0.0.1:9/hellaswag_val.jsonl")  # nothing listens there
    assert "hellaswag_val.jsonl" in str(e.value) and "--data" in str(e.value)
    assert not any((tmp_path / "cache").rglob("*.jsonl*"))  # no partial file left behind
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"ctx": "x", "endings": ["a", "b"], "label": 0}\n')
    with pytest.raises(hellaswag.HellaSwagError, match="line 1: not a HellaSwag item"):
        hellaswag.load_items(bad)


@pytest.mark.parametrize("case, message", [
    ("no checkpoint", "NOWHERE: no such folder. HINT"),
    ("data a folder", "--data=TMP: is a folder, not a file. HINT"),
    ("data binary", "TMP/binary, line 1: not a HellaSwag item"),
])
def test_hellaswag_names_the_real_cause(tmp_path, saved_smoke, monkeypatch, capsys, case, message):
    """A checkpoint that is not there is said before any download; --data that is a folder or not text names that."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # an empty cache: the data would be downloaded
    (tmp_path / "binary").write_bytes(b"\xa3\xff\x00garbage\n")
    checkpoint = tmp_path / "nowhere" if case == "no checkpoint" else saved_smoke
    data = {"no checkpoint": [], "data a folder": [f"--data={tmp_path}"], "data binary": [f"--data={tmp_path}/binary"]}
    assert hellaswag.main([f"--checkpoint={checkpoint}", "--device=cpu", "--url=http://127.0.0.1:9/x.jsonl",
                           *data[case]]) == 1
    err = capsys.readouterr().err
    message = message.replace("NOWHERE", str(tmp_path / "nowhere")).replace("TMP", str(tmp_path))
    assert err.splitlines() == [err.strip()] and message in err and "download" not in err.split("HINT")[0], err


def test_hellaswag_command_line(tmp_path, enc):
    model, _ = fixture_model(enc)
    tg.save_model(model, tmp_path / "bigram")
    env = clean_env(TIKTOKEN_CACHE_DIR=os.environ["TIKTOKEN_CACHE_DIR"], XDG_CACHE_HOME=str(tmp_path / "cache"))
    result = run("evals/hellaswag.py", f"--checkpoint={tmp_path / 'bigram'}", f"--data={FIXTURE}", "--json",
                 "--device=cpu", env=env)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert (report["items"], report["acc"], report["acc_norm"]) == (3, 1 / 3, 2 / 3)
    offline = run("evals/hellaswag.py", f"--checkpoint={tmp_path / 'bigram'}", "--url=http://127.0.0.1:9/x.jsonl",
                  env=env)
    assert offline.returncode == 1 and "HINT" in offline.stderr and "Traceback" not in offline.stderr


# -----------------------------------------------------------------------------
# tracking.py and the trainer's end-of-run hooks


def test_step_metrics_are_read_from_step_lines():
    assert tracking.step_metrics("step:5/20 val_loss:6.9720 train_time:3017ms step_avg:603.45ms") == \
        (5, dict(val_loss=6.972, train_time_ms=3017.0, step_avg_ms=603.45))
    assert tracking.step_metrics("step:6/20 train_time:3600ms step_avg:600.02ms train_loss:7.3466") == \
        (6, dict(train_time_ms=3600.0, step_avg_ms=600.02, train_loss=7.3466))
    for line in ("peak memory allocated: 1 MiB", 'sample 0: "step:1/2 val_loss:3"', "hyperparameters: {}"):
        assert tracking.step_metrics(line) is None


def test_wandb_missing_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    with pytest.raises(ValueError, match="HINT: pip install wandb"):
        tracking.WandbLog(tg.RunLog(None), tiny("smoke"), "p")


def test_wandb_that_cannot_start_a_run_says_so_in_one_line(monkeypatch):
    """No key, or no network (W&B's CommError after its init timeout): one ValueError naming WANDB_MODE=offline."""
    calls = []

    def init(**kwargs):
        calls.append(kwargs)
        raise RuntimeError("No API key configured. Use `wandb login` to log in.\nmore detail")

    fake = types.SimpleNamespace(init=init, Settings=lambda **kw: kw)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setattr(tracking, "unreachable", lambda url, mode=None: None)  # as if the server answered
    with pytest.raises(ValueError, match=r"^W&B could not start a run \(RuntimeError: No API key configured\. Use "
                                         r"`wandb login` to log in\.\)\. HINT: WANDB_MODE=offline"):
        tracking.WandbLog(tg.RunLog(None), tiny("smoke"), "p")
    assert calls[0]["settings"] == dict(init_timeout=tracking.INIT_TIMEOUT_S) and calls[0]["project"] == "p"


def test_wandb_without_a_network_says_so_at_once_and_offline_needs_none(monkeypatch):
    """A server that cannot be reached (here a closed local port): one line within a second, before wandb.init (whose
    retries took 43 s with a key and no network); WANDB_MODE=offline sends nothing and checks nothing."""
    calls = []
    fake = types.SimpleNamespace(init=lambda **kw: calls.append(kw), Settings=lambda **kw: kw)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
    for v in ("WANDB_MODE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(v, raising=False)
    start = time.monotonic()
    with pytest.raises(ValueError, match=r"^W&B is out of reach \(127\.0\.0\.1: Connection refused\)\. HINT: "
                                         r"WANDB_MODE=offline"):
        tracking.WandbLog(tg.RunLog(None), tiny("smoke"), "p")
    assert time.monotonic() - start < 1 and not calls
    monkeypatch.setenv("WANDB_MODE", "offline")
    tracking.WandbLog(tg.RunLog(None), tiny("smoke"), "p")
    assert len(calls) == 1


def test_train_extras_takes_its_options_and_passes_the_rest_to_the_trainer(capsys):
    sys.path.insert(0, str(ROOT))
    import train_extras

    options, rest = train_extras.split_options(["--preset=smoke", "--sample_tokens=5", "--wandb_project=p", "--seed=1"])
    assert options == dict(sample_tokens=5, wandb_project="p") and rest == ["--preset=smoke", "--seed=1"]
    assert train_extras.main(["--hellaswag_items=-1", "--preset=smoke"]) == 1
    assert train_extras.main(["--sample_tokens=ten"]) == 1
    assert "error: --sample_tokens=ten: expected a whole number" in capsys.readouterr().err
    with pytest.raises(ValueError, match="an option of train_extras.py"):
        tg.parse_args(["--preset=smoke", "--sample_tokens=5"])


@pytest.mark.slow
def test_training_run_with_samples_hellaswag_and_wandb_offline(tmp_path, enc):
    """One short smoke run with every end-of-run hook on: samples and HellaSwag (from a cache seeded with the
    fixture) are logged, W&B (offline) writes a run folder holding the step metrics, the log still reads as a
    complete run, and the trainer's final checkpoint exports with its log."""
    cache = tmp_path / "cache" / "gpt2-speedrun" / "hellaswag"
    cache.mkdir(parents=True)
    (cache / "hellaswag_val.jsonl").write_bytes(FIXTURE.read_bytes())
    env = clean_env(TIKTOKEN_CACHE_DIR=os.environ["TIKTOKEN_CACHE_DIR"], XDG_CACHE_HOME=str(tmp_path / "cache"),
                    WANDB_MODE="offline", WANDB_DIR=str(tmp_path), WANDB_CONSOLE="off", WANDB_SILENT="true",
                    WANDB_CACHE_DIR=str(tmp_path / "cache"), WANDB_CONFIG_DIR=str(tmp_path / "config"),
                    WANDB_DATA_DIR=str(tmp_path / "data"), OMP_NUM_THREADS="1")
    result = run("train_extras.py", "--preset=smoke", "--num_iterations=3", "--extension_iterations=0",
                 "--val_every=0", "--model_dim=64", "--head_dim=32", f"--log_dir={tmp_path}", "--run_id=hooks",
                 "--sample_tokens=5", "--hellaswag_items=2", "--wandb_project=test-project", "--save_final=true",
                 f"--checkpoint_dir={tmp_path / 'checkpoints'}", env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    log = (tmp_path / "hooks.txt").read_text()
    samples = [json.loads(line.split(": ", 1)[1]) for line in log.splitlines() if line.startswith("sample ")]
    assert len(samples) == 3 and samples[1].startswith("The capital of France is")
    assert "hellaswag: items:2 acc:" in log
    runs = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(runs) == 1
    data = Path(runs[0]).read_bytes()  # protobuf records: metric names are stored as plain strings
    assert b"val_loss" in data and data.count(b"train_loss") >= 3 and b"test-project" in data
    run_log = export.read_run_log(tmp_path / "hooks.txt")  # records/compare.py's reading
    assert run_log.status == "complete" and [s for s, *_ in run_log.val] == [0, 3]
    out, _ = export.export(tmp_path / "checkpoints" / "hooks", tmp_path / "export")  # the run's latest step: step_3
    assert (out / "training_log.txt").read_bytes() == (tmp_path / "hooks.txt").read_bytes()
    card = (out / "README.md").read_text()
    assert "step 3 of 3" in card and f"{run_log.final_val_loss:.4f} at step 3" in card and "preset `smoke`" in card
