"""benchmark.py: time train_gpt.py's real training step and print one JSON line.

    python benchmark.py                                   # speedrun preset, synthetic shards, this machine's devices
    torchrun --standalone --nproc_per_node=8 benchmark.py --steps=50
    python benchmark.py --real --steps=50 --train_files=... # real shards instead of synthetic ones
    python benchmark.py --preset=smoke --steps=3            # the CPU smoke check
    python benchmark.py --estimate                          # GPU memory of the step and the evaluation, without a GPU

Any train_gpt.py setting can follow (--field=value). It builds the model and optimizers exactly as train_gpt.py does,
runs --warmup untimed steps (compilation), then --steps timed steps, and reports tokens/s, ms/step, model FLOPs per
token, MFU against --peak_tflops (default: 989, the H100 SXM dense bf16 figure, on a GPU; none on a CPU) and peak
memory. Figures that count come from a GPU; the CPU run only shows that the benchmark works.

--estimate times nothing: it compiles the training step and the evaluation for a fake H100 (tools/cuda_check.py, on
a Linux machine with the CPU build of torch; a few minutes) and prints, in GiB, the parameters plus inductor's own
peak-memory estimate of the compiled graphs. What that leaves out: docs/cuda_check.md.
"""

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import train_gpt as tg


def synthetic_shards(folder: Path, num_tokens: int, seed: int = 0) -> str:
    """Random tokens in documents of random length (mean ~1000 tokens, like FineWeb's), each starting with BOS."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 50257, num_tokens, dtype=np.int64)
    tokens[np.flatnonzero(rng.random(num_tokens) < 1 / 1000)] = tg.BOS_ID
    tokens[0] = tg.BOS_ID
    tg.write_shard(folder / "synthetic_train_000001.bin", tokens)
    return str(folder / "synthetic_train_*.bin")


def flops_per_token(model: tg.GPT, args: tg.Hyperparameters, attended_keys: float) -> float:
    """6 x the dense weights each token touches (attention projections, gates, MLP, LM head; embeddings are lookups)
    plus the attention score and value products actually computed: 4 * head_dim * heads per attended key, x3 for
    forward and backward."""
    dense = sum(p.numel() for p in model.blocks.parameters()) + model.lm_head_w.numel()
    attention_layers = sum(c != "-" for c in args.attn_pattern)
    return 6 * dense + 3 * 4 * args.num_heads * args.head_dim * attention_layers * attended_keys


def mean_attended_keys(batches, window: torch.Tensor, args: tg.Hyperparameters) -> float:
    """Keys each query may attend to, averaged over attention layers and tokens, counted in whole mask blocks (what
    FlexAttention computes: exact for full blocks, an upper bound for partial ones). One mask per window kind."""
    kinds = args.attn_pattern.replace("-", "")
    windows = {"L": window.cpu(), "S": (window.cpu() // 2).clamp_min(1)}
    total = 0.0
    for inputs, _ in batches:
        docs = tg.document_ids(inputs.cpu())
        for kind, w in windows.items():
            mask = tg.flex_block_mask(docs, w, args.block_size)
            blocks = (mask.kv_num_blocks.sum() + mask.full_kv_num_blocks.sum()).item()
            total += kinds.count(kind) * blocks * args.block_size**2 / len(inputs)
    return total / (len(batches) * len(kinds))


def estimate_memory(settings: list[str]) -> dict:
    """Inductor's peak-memory estimates for the compiled training micro-step (forward and backward graphs) and the
    evaluation, at the given settings (default: the speedrun preset), from the CUDA compile check run in a subprocess
    (the fake H100 must be set up before torch is imported)."""
    check = Path(__file__).resolve().parent / "tools" / "cuda_check.py"
    result = subprocess.run([sys.executable, str(check), "--size=speedrun", "--world_sizes=none", *settings],
                            capture_output=True, text=True)
    lines = result.stdout.strip().splitlines()
    if not lines or not lines[-1].startswith("{"):
        raise RuntimeError(f"the CUDA compile check printed no report:\n{result.stderr[-3000:]}")
    report = json.loads(lines[-1])
    if report.get("problems") or report.get("error"):
        raise RuntimeError("the CUDA compile check failed: " + "; ".join(report["failures"]))
    peak, gib = report["peak_memory_bytes"], lambda b: round(b / 2**30, 2)
    args = tg.Hyperparameters(**report["settings"])
    with torch.device("meta"):
        parameters = sum(p.numel() * p.element_size() for p in tg.GPT(args).parameters())
    return dict(
        estimate="parameters + inductor's peak-memory estimate of the compiled graphs (which leaves the parameters "
                 "out), for a fake H100 (tools/cuda_check.py); not counted: optimizer state, the FP8 ops' inner "
                 "temporaries, the allocator's overhead",
        train_step_gib=gib(parameters + max(peak["train_forward"], peak["train_backward"])),
        eval_gib=gib(parameters + peak["eval_inference"]), parameters_gib=gib(parameters),
        train_forward_graph_gib=gib(peak["train_forward"]), train_backward_graph_gib=gib(peak["train_backward"]),
        eval_graph_gib=gib(peak["eval_inference"]), saved_for_backward_gib=gib(report["graph_bytes"]["train_forward"]
                                                                               ["outputs"]),
        train_tokens=args.train_seq_len, eval_tokens=args.val_seq_len, torch=report["torch"],
        check_failures=report["failures"], check_seconds=report["seconds"]["total"],
    )


def main(argv: list[str]) -> dict:
    if "--estimate" in argv:
        result = estimate_memory([a for a in argv if a != "--estimate"])
        print(json.dumps(result), flush=True)
        return result
    options = dict(steps=20, warmup=5, real=False, peak_tflops=None)
    settings = []
    for arg in argv:
        name = arg.removeprefix("--").partition("=")[0]
        if name in options:
            value = arg.partition("=")[2]
            options[name] = True if name == "real" else float(value) if name == "peak_tflops" else int(value)
        else:
            settings.append(arg)
    args = tg.parse_args(settings)
    rt = tg.setup_runtime(args)
    args, notes = tg.adapt_to_device(args, rt.device)
    for note in notes if rt.is_master else []:
        print(f"note: {note}", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        steps = options["steps"] + options["warmup"]
        files = args.train_files if options["real"] else synthetic_shards(
            Path(tmp), (steps + 4) * args.windows_per_step * args.train_seq_len * 2)
        loader = tg.TrainLoader(tg.find_shards(files), args.train_seq_len, args.windows_per_step, rt.rank,
                                rt.world_size, rt.device)
        torch.manual_seed(args.seed)
        model = tg.GPT(args).to(rt.device)
        optimizers = tg.build_optimizers(model, args, rt)
        step_model = torch.compile(model, dynamic=False, fullgraph=True) if args.use_compile else model
        window = torch.full((), tg.window_blocks(args.num_iterations, args), device=rt.device)  # the widest window
        synchronize = torch.cuda.synchronize if rt.device.type == "cuda" else lambda: None
        times, attended = [], []
        for step in range(steps):
            batches = loader.next_step()
            if step == options["warmup"]:
                attended.append(mean_attended_keys(batches, window, args))
            synchronize()
            t0 = time.perf_counter()
            tg.train_step(step_model, optimizers, batches, step, window, args)
            synchronize()
            if step >= options["warmup"]:
                times.append(time.perf_counter() - t0)
    ms = 1000 * statistics.median(times)
    tokens_per_step = args.windows_per_step * args.train_seq_len
    flops = flops_per_token(model, args, attended[0])
    peak = options["peak_tflops"] or (989.0 if rt.device.type == "cuda" else None)
    memory = tg.peak_memory_line(rt.device).split()
    result = dict(
        device=torch.cuda.get_device_name(rt.device) if rt.device.type == "cuda" else "cpu",
        world_size=rt.world_size, torch=torch.__version__, steps=options["steps"], tokens_per_step=tokens_per_step,
        ms_per_step=round(ms, 3), ms_per_step_min=round(1000 * min(times), 3),
        tokens_per_s=round(tokens_per_step / ms * 1000), tokens_per_s_per_device=round(tokens_per_step / ms * 1000 /
                                                                                        rt.world_size),
        model_flops_per_token=round(flops), attended_keys_per_token=round(attended[0], 1),
        mfu=round(flops * tokens_per_step / (ms / 1000) / rt.world_size / (peak * 1e12), 4) if peak else None,
        peak_tflops=peak, peak_memory_allocated_mib=int(memory[3]), peak_memory_reserved_mib=int(memory[6]),
        settings={k: v for k, v in vars(args).items() if k in ("use_fp8", "use_compile", "use_flex_attention",
                                                                "dtype", "num_layers", "model_dim", "train_seq_len")},
    )
    if rt.is_master:
        print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    if "--help" in sys.argv[1:] or "-h" in sys.argv[1:]:
        print(__doc__)
        sys.exit(0)
    try:
        main(sys.argv[1:])
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
