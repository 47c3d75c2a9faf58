"""The benchmark entry point: its FLOP count and a CPU smoke run (the figures that count come from a GPU)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import benchmark  # noqa: E402
import train_gpt as tg  # noqa: E402


def test_model_flops_count_the_dense_weights_and_the_attended_keys():
    args = tg.parse_args(["--preset=record_2025_08_23"])
    with torch.device("meta"):
        model = tg.GPT(args)
    dense = 11 * (4 * 768**2 + 6 * 12) + 12 * 2 * 768 * 3072 + 50304 * 768  # docs/recipes.md#model-2025-08-23
    assert benchmark.flops_per_token(model, args, 0.0) == 6 * dense
    # each attended key costs q.k and p.v (2 x 2 FLOPs per channel), forward and twice that backward, in 11 layers
    assert benchmark.flops_per_token(model, args, 1000.0) - 6 * dense == 3 * 4 * 768 * 11 * 1000
    args = tg.parse_args([])  # the 2026-08 recipe adds the value-embedding gates and the two small MLPs
    with torch.device("meta"):
        model = tg.GPT(args)
    dense = 10 * 4 * 768**2 + 11 * 2 * 768 * 3072 + 50304 * 768 + 4 * 6 * 12 + 12  # layer 10's VE gate: MUDD's
    dense += 2 * 64 * 768 + (14 + 5) * 64 + 2 * 64 * 768 + (26 + 41) * 64  # MUDD; the gate MLP (26 and 41 outputs)
    dc = 3 * (4 * 6 * 256 * 128 + 2 * 256 * 6)  # one DC layer: 256 keys per query (its block and the previous one)
    assert benchmark.flops_per_token(model, args, 0.0) == 6 * dense + dc
    args = tg.parse_args(["--preset=one_a100"])  # GPT-2's shape, untied: 12 blocks and the head, nothing else
    with torch.device("meta"):
        model = tg.GPT(args)
    dense = 12 * (4 * 768**2 + 2 * 768 * 3072) + 50304 * 768
    assert benchmark.flops_per_token(model, args, 2048.0) == 6 * dense + 3 * 4 * 768 * 12 * 2048


def test_gpt2_baseline_flops_count_its_matrices_and_its_1024_token_contexts():
    args = tg.parse_args(["--preset=gpt2_baseline"])
    with torch.device("meta"):
        model = tg.GPT(args)
    dense = 12 * (4 * 768**2 + 2 * 768 * 3072) + 50304 * 768  # the tied head once; biases and positions: no matmul
    assert benchmark.flops_per_token(model, args, 0.0) == 6 * dense
    smoke = tg.parse_args(["--preset=smoke_gpt2_baseline"])  # contexts of 256 tokens: 4 blocks of 64, causal
    inputs = torch.full((1024,), 7)
    inputs[::100] = tg.BOS_ID  # documents do not limit its attention
    model = tg.GPT(smoke)
    model.set_step(tg.plan_step(0, smoke))
    assert benchmark.mean_attended_keys([(inputs, None)], model, smoke) == 64 * (1 + 2 + 3 + 4) / 4


def test_attended_keys_follow_the_window():
    args = tg.parse_args(["--preset=smoke_2025_08_23", "--attn_pattern=LLLL", "--value_embed_pattern=0000"])
    model = tg.GPT(args)
    inputs = torch.full((256,), 7)
    inputs[0] = tg.BOS_ID  # one document: query t sees min(t + 1, window) keys, counted in whole 64-token blocks
    keys = []
    for w in (1, 2, 4):
        model.windows.copy_(torch.tensor([max(1, w // 2), w]))
        keys.append(benchmark.mean_attended_keys([(inputs, None)], model, args))
    assert keys == [64, 64 * (1 + 2 + 2 + 2) / 4, 64 * (1 + 2 + 3 + 4) / 4]
    mixed = tg.parse_args(["--preset=smoke_2025_08_23", "--attn_pattern=LS-S"])  # one long layer, two short (half)
    model = tg.GPT(mixed)
    model.windows.copy_(torch.tensor([2, 4]))
    expected = (64 * (1 + 2 + 3 + 4) / 4 + 2 * 64 * (1 + 2 + 2 + 2) / 4) / 3
    assert benchmark.mean_attended_keys([(inputs, None)], model, mixed) == expected


def test_benchmark_prints_one_json_line_on_a_cpu():
    result = subprocess.run([sys.executable, str(ROOT / "benchmark.py"), "--preset=smoke", "--steps=2", "--warmup=1"],
                            capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["device"] == "cpu" and report["steps"] == 2 and report["tokens_per_step"] == 1024
    assert report["ms_per_step"] > 0 and report["tokens_per_s"] > 0 and report["mfu"] is None
    assert report["model_flops_per_token"] > 6 * 12 * 128**2 and report["peak_memory_allocated_mib"] > 0


@pytest.mark.parametrize("argv, message", [
    (["--bogus"], "error: cannot read '--bogus': settings are given as --name=value. HINT: see --help"),
    (["--bogus=1"], "error: unknown setting --bogus. HINT: --help lists every setting"),
    (["--steps=0"], "error: --steps=0 must be at least 1. HINT: `python benchmark.py --help`"),
    (["--steps=x"], "error: --steps=x: expected a whole number. HINT: `python benchmark.py --help`"),
    (["--warmup=-1"], "error: --warmup=-1 must be at least 0. HINT: `python benchmark.py --help`"),
    (["--peak_tflops=nan"], "error: --peak_tflops=nan must be above 0. HINT: `python benchmark.py --help`"),
    (["--real=maybe"], "error: --real=maybe: write --real (or --real=true/false). HINT: `python benchmark.py --help`"),
    (["--preset=nope"], "error: unknown preset 'nope'; choose one of speedrun, smoke, record_2025_08_23, "
     "smoke_2025_08_23, gpt2_baseline, smoke_gpt2_baseline, one_a100, smoke_one_a100, optimization_track, "
     "smoke_optimization_track"),
    (["--preset=smoke", "--step=14"], "error: --step=14 is past the schedule's last training step, 13"),
    (["--preset=smoke", "--muon_lr=nan"], "error: muon_lr=nan must be a finite number above 0"),
    (["--estimate", "--gpu=v100"], "error: --gpu=v100: choose one of h100, a100"),
    (["--estimate", "--world_size=x"], "error: --world_size=x: expected a number above 0. HINT: `python benchmark.py"),
    (["--estimate", "--calibration=0"], "error: --calibration=0: expected a number above 0. HINT: `python benchmark."),
    (["--estimate", "--bogus=1"], "error: unknown setting --bogus. HINT: --help lists every setting"),
])
def test_bad_arguments_give_one_error_line_and_exit_1(argv, message, capsys):
    assert benchmark.cli(argv) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [err.strip()] and err.startswith(message), err
    assert "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the preset is only switched on a machine without a GPU")
def test_without_a_gpu_the_default_preset_is_the_smoke_preset_with_a_note(capsys):
    """8 steps of 2 BOS-aligned 512-token windows: the synthetic shard must hold the ~1,000 tokens each window skips
    to reach the next document, too (it ran out at 8 steps when sized by the window alone)."""
    result = benchmark.main(["--steps=8", "--warmup=0"])
    assert result["tokens_per_step"] == 1024 and result["settings"]["model_dim"] == 128  # smoke, not 49,152 x 8
    assert "note: no GPU: timing --preset=smoke" in capsys.readouterr().err


def estimate_module():
    sys.path.insert(0, str(ROOT / "tools"))
    import estimate

    return estimate


def test_the_roofline_is_the_larger_of_compute_and_transfer():
    estimate = estimate_module()
    h100 = estimate.GPUS["h100"]()
    matmul = dict(kind="extern", name="aten::mm.out", ops=["mm.default"], lines=[], flops=2 * 4096**3,
                  bytes=3 * 4096**2 * 2, dtype="bfloat16", inductor_ms=0.0)
    priced = estimate.price(matmul, h100)
    assert priced["kernel_ms"] == pytest.approx(1e3 * 2 * 4096**3 / (989.5e12 * estimate.EFFICIENCY["matmul"]))
    assert priced["bound"] == "compute"
    skinny = dict(matmul, flops=2 * 4096 * 4096 * 8, bytes=4096 * 4096 * 2)  # a matrix-vector-like product
    assert estimate.price(skinny, h100)["kernel_ms"] == pytest.approx(1e3 * 4096 * 4096 * 2 / 3350e9)
    assert estimate.price(skinny, h100)["bound"] == "memory"
    fp8 = dict(matmul, kind="extern", name="nanogpt::fp8_mm")  # the FP8 peak on an H100, the bf16 one on an A100
    assert estimate.price(fp8, h100)["kernel_ms"] == pytest.approx(1e3 * 2 * 4096**3 / (1979e12 * 0.55))
    assert estimate.price(fp8, estimate.GPUS["a100"]())["kernel_ms"] == pytest.approx(1e3 * 2 * 4096**3 /
                                                                                     (312.5e12 * 0.55))
    flex = dict(matmul, kind="template", name="buf1", ops=["flex_attention"])
    assert estimate.price(flex, h100, flex_density=0.25)["flops"] == 2 * 4096**3 / 4


def test_mask_density_counts_the_blocks_flex_attention_computes():
    estimate = estimate_module()
    args = tg.parse_args(["--preset=smoke_2025_08_23"])  # 64-token blocks, windows in whole blocks
    one_doc = torch.zeros(512, dtype=torch.long)  # 8 blocks, one document
    assert estimate.mask_density(one_doc, 8, args) == (8 * 9 / 2) / 64  # causal: the lower triangle and diagonal
    assert estimate.mask_density(one_doc, 1, args) == 8 / 64  # only the diagonal blocks
    two_docs = torch.cat([torch.zeros(256, dtype=torch.long), torch.ones(256, dtype=torch.long)])
    assert estimate.mask_density(two_docs, 8, args) == 2 * (4 * 5 / 2) / 64  # no block crosses the documents


def test_the_optimizer_timeline_overlaps_only_what_the_code_overlaps():
    """Two streams: a collective starts when launched (after the compute before it) and after the previous one; a
    wait holds the compute stream until its collective ends."""
    estimate = estimate_module()
    gpu = estimate.GPUS["h100"]()
    op = dict(op="lerp", bytes=int(3350e9 * 1e-3), flops=0, dtype="float32")  # 1 ms of memory traffic
    launch = estimate.LAUNCH_US / 1e3
    size = 450e9 * 0.8 * 8e-3  # bytes of 8 ms at NCCL's share of NVLink
    comm = estimate.collective_ms(size, gpu)
    assert comm == pytest.approx(8 + estimate.COLLECTIVE_LATENCY_US / 1e3)
    events = [dict(optimizer="Muon"), dict(collective="reduce_scatter_single", bytes=size, index=1),
              dict(collective="reduce_scatter_single", bytes=size, index=2), dict(wait=1), op,
              dict(collective="all_gather_single", bytes=size, index=5), dict(wait=2), op, dict(wait=5)]
    step = estimate.optimizer_ms(events, gpu, {})
    out = step["Muon"]
    # the first update waits for the first reduction; the second reduction runs meanwhile; the gather queues behind it
    assert step["step"] == pytest.approx(3 * comm)
    assert out["compute_ms"] == pytest.approx(2 * (1 + launch)) and out["communication_ms"] == pytest.approx(3 * comm)
    serial = [dict(optimizer="Adam"), dict(collective="all_reduce", bytes=size, index=1), dict(wait=1), op]
    assert estimate.optimizer_ms(serial, gpu, {})["step"] == pytest.approx(comm + 1 + launch)
