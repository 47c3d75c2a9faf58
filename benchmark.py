"""benchmark.py: time train_gpt.py's real training step and print one JSON line.

    python benchmark.py                                   # speedrun preset, synthetic shards, this machine's devices
    torchrun --standalone --nproc_per_node=8 benchmark.py --steps=50
    python benchmark.py --real --steps=50 --train_files=... # real shards instead of synthetic ones
    python benchmark.py --preset=smoke --steps=3            # the CPU smoke check
    python benchmark.py --step=0                          # time the schedule's first step (default: its last)
    python benchmark.py --estimate                          # GPU memory and time of the step, without a GPU
    python benchmark.py --estimate --preset=record_2025_08_23   # the same for record #28's recipe (the calibration)
    python benchmark.py --estimate --preset=gpt2_baseline   # GPT-2 (124M), AdamW: against llm.c's 45 minutes
    python benchmark.py --estimate --gpu=a100               # one A100 SXM 80GB (bf16 head and MLP, one rank)
    python benchmark.py --estimate --preset=one_a100 --gpu=a100   # the one-A100 recipe: its card measured the A100
    python benchmark.py --estimate --preset=optimization_track   # the optimization track's step on 8xH100

Any train_gpt.py setting can follow (--field=value). It builds the model and optimizers exactly as train_gpt.py does,
runs --warmup untimed steps (compilation), then --steps timed steps, and reports tokens/s, ms/step, model FLOPs per
token, MFU against --peak_tflops (default: 989, the H100 SXM dense bf16 figure, on a GPU; none on a CPU) and peak
memory. Figures that count come from a GPU; the CPU run only shows that the benchmark works. With no --preset on a
machine without a GPU it times the smoke preset (the speedrun preset's windows would need tens of GB), and says so.

--estimate times nothing: it compiles every stage's training step, the evaluation and the optimizer for a fake H100
(tools/cuda_check.py, on a Linux machine with the CPU build of torch; 15-30 minutes at the speedrun's shapes on 2
cores) and prints a short table, then one JSON line: in GiB, the parameters plus inductor's own peak-memory estimate
of the compiled graphs; the estimated ms per step of each stage, the evaluation, the whole run's training time, the
kernels per step and the 15 largest (tools/estimate.py). Its options: --gpu=h100|a100; --world_size=N (default 8 on
an H100, 1 on an A100); --report=FILE reads a saved check report instead of compiling (--save_report=FILE saves
one); --calibration=X also prints the times multiplied by X (default on 8 H100s: record #28's measured / estimated,
tools/estimate.py's CALIBRATION). What the figures rest on and leave out: docs/cuda_check.md.
"""

import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import train_gpt as tg


class HostSyncCounter(TorchDispatchMode):
    """Counts the operations that make the host wait for the device: reading a scalar (.item(), bool(t), ...), ops
    whose output size depends on the data (nonzero, boolean indexing, unique) and copies from the device to the host.
    Code compiled with fullgraph=True cannot contain any of them, so this watches the eager parts of a step: the
    optimizers, the data loader, the bookkeeping between them. On a CPU, device-to-host copies cannot be told apart."""

    SYNCING = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique", "_unique2", "unique_consecutive",
               "unique_dim", "is_nonzero", "equal", "repeat_interleave"}

    def __init__(self):
        super().__init__()
        self.events: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in self.SYNCING and not (name == "repeat_interleave" and "output_size" in kwargs):
            self.events.append(name)
        elif name in ("_to_copy", "copy_"):
            src = args[1] if name == "copy_" else args[0]
            dst = args[0].device if name == "copy_" else kwargs.get("device") or src.device
            if isinstance(src, torch.Tensor) and src.device.type != "cpu" and torch.device(dst).type == "cpu":
                self.events.append(f"{name} to host")
        return func(*args, **kwargs)


def synthetic_shards(folder: Path, num_tokens: int, seed: int = 0) -> str:
    """Random tokens in documents of random length (mean ~1000 tokens, like FineWeb's), each starting with BOS."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 50257, num_tokens, dtype=np.int64)
    tokens[np.flatnonzero(rng.random(num_tokens) < 1 / 1000)] = tg.BOS_ID
    tokens[0] = tg.BOS_ID
    tg.write_shard(folder / "synthetic_train_000001.bin", tokens)
    return str(folder / "synthetic_train_*.bin")


MATMUL_WEIGHTS = ("qkvo_w", "c_fc", "c_proj", "attn_gate", "ve_gate", "lm_head_w", "smear_gate")


def flops_per_token(model: tg.GPT, args: tg.Hyperparameters, attended_keys: float) -> float:
    """6 x the dense weights each token touches (attention projections, gates, MLP, LM head, the gate and MUDD MLPs;
    embeddings are lookups) plus the attention score and value products actually computed: 4 * head_dim * heads
    per attended key and attention layer, x3 for forward and backward."""
    unused = {f"blocks.{args.num_layers - 1}.attn.ve_gate"} if args.use_mudd else set()  # MUDD gates that V
    dense = sum(p.numel() for name, p in model.named_parameters()
                if name.rsplit(".", 1)[-1] in MATMUL_WEIGHTS and name not in unused)
    for mlp in (getattr(model, "gate", None), getattr(model, "mudd", None)):
        if mlp is not None and not mlp.static:  # the second matrix's rows that are used
            dense += mlp.w1.numel() + sum(mlp.sizes) * mlp.w1.size(1)
    attention_layers = sum(c != "-" for c in args.attn_pattern)
    return 6 * dense + 3 * 4 * args.num_heads * args.head_dim * attention_layers * attended_keys + dc_flops(args)


def dc_flops(args: tg.Hyperparameters) -> float:
    """The DC correction (train_gpt.dc_correction), x3 for forward and backward: per query, heads x head_dim
    products with the 2 * block_size keys of its own and the previous block, twice (scores, then values), and the
    mixing of the heads' probabilities."""
    C, H, D = args.block_size, args.num_heads, args.head_dim
    return 3 * len(args.layers("dc_layers")) * (2 * 2 * H * 2 * C * D + 2 * 2 * C * H)


def mean_attended_keys(batches, model: tg.GPT, args: tg.Hyperparameters) -> float:
    """Keys each query may attend to, averaged over attention layers and tokens, counted in whole mask blocks (what
    FlexAttention computes: exact for full blocks, an upper bound for partial ones), with the model's windows.
    Paired-head layers attend over 2 slots per token with half the heads: the same count per token, in slots."""
    layers = [(b.attn.kind, b.attn.paired) for b in model.blocks if b.attn is not None]
    windows = {"S": model.windows[0].cpu(), "L": model.windows[1].cpu()}
    total = 0.0
    for inputs, _ in batches:
        docs = tg.document_ids(inputs.cpu(), args.context_len)
        for kind, paired in set(layers):
            seq_docs = docs[:, None].expand(-1, 2).reshape(-1) if paired else docs
            mask = tg.flex_block_mask(seq_docs, windows[kind], args.block_size, args.token_windows)
            blocks = (mask.kv_num_blocks.sum() + mask.full_kv_num_blocks.sum()).item()
            total += layers.count((kind, paired)) * blocks * args.block_size**2 / len(seq_docs)
    return total / (len(batches) * len(layers))


def compile_check(settings: list[str], world_size: int = 8, stages: str = "all") -> dict:
    """The CUDA compile check's JSON report (tools/cuda_check.py, run in a subprocess: the fake H100 must be set up
    before torch is imported) at the given settings (default: the speedrun preset), every stage by default."""
    check = Path(__file__).resolve().parent / "tools" / "cuda_check.py"
    result = subprocess.run([sys.executable, str(check), "--size=speedrun", f"--world_sizes={world_size}",
                             f"--stages={stages}", *settings], capture_output=True, text=True)
    lines = result.stdout.strip().splitlines()
    if not lines or not lines[-1].startswith("{"):
        raise RuntimeError(f"the CUDA compile check printed no report:\n{result.stderr[-3000:]}")
    report = json.loads(lines[-1])
    if report.get("problems") or report.get("error"):
        raise RuntimeError("the CUDA compile check failed: " + "; ".join(report["failures"]))
    return report


def estimate_memory(report: dict, args: tg.Hyperparameters) -> dict:
    """Inductor's peak-memory estimates for the compiled training micro-step (forward and backward graphs) and the
    evaluation, from the CUDA compile check's report (compiled with args)."""
    peak, gib = dict(report["peak_memory_bytes"]), lambda b: round(b / 2**30, 2)
    with torch.device("meta"):
        parameters = sum(p.numel() * p.element_size() for p in tg.GPT(args).parameters())
    for kind in ("forward", "backward"):  # the largest stage
        peak[f"train_{kind}"] = max(v for k, v in peak.items() if k.startswith("train") and k.endswith(kind))
    largest = max((k for k in report["graph_bytes"] if k.startswith("train") and k.endswith("_forward")),
                  key=lambda k: report["graph_bytes"][k]["outputs"])
    return dict(
        estimate="parameters + inductor's peak-memory estimate of the compiled graphs (which leaves the parameters "
                 "out), for a fake H100 (tools/cuda_check.py); not counted: optimizer state, the FP8 ops' inner "
                 "temporaries, the allocator's overhead",
        train_step_gib=gib(parameters + max(peak["train_forward"], peak["train_backward"])),
        eval_gib=gib(parameters + peak["eval_inference"]), parameters_gib=gib(parameters),
        train_forward_graph_gib=gib(peak["train_forward"]), train_backward_graph_gib=gib(peak["train_backward"]),
        eval_graph_gib=gib(peak["eval_inference"]),
        saved_for_backward_gib=gib(report["graph_bytes"][largest]["outputs"]),
        train_tokens=max(args.seq_lens) // args.micro_batch_split, eval_tokens=args.val_seq_len, torch=report["torch"],
        check_failures=report["failures"], check_seconds=report["seconds"]["total"],
    )


ESTIMATE_OPTIONS = dict(gpu="h100", world_size=None, report="", save_report="", calibration=None)


def estimate_main(argv: list[str]) -> dict:
    """--estimate: the memory and the time of the compiled step on a GPU, without one (tools/estimate.py)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent / "tools"))
    import estimate

    options, settings = dict(ESTIMATE_OPTIONS), []
    for arg in argv:
        name, _, value = arg.removeprefix("--").partition("=")
        if name in options:
            options[name] = value
        elif name != "estimate":
            settings.append(arg)
    if options["gpu"] not in estimate.GPUS:
        raise ValueError(f"--gpu={options['gpu']}: choose one of {', '.join(estimate.GPUS)}")
    gpu = estimate.GPUS[options["gpu"]]()
    for name, cast in (("world_size", int), ("calibration", float)):
        try:
            value = options[name] and cast(options[name])
        except ValueError:
            value = None
        if options[name] and not (value and value > 0 and math.isfinite(value)):
            raise ValueError(f"--{name}={options[name]}: expected a number above 0")
    world_size = int(options["world_size"] or (8 if options["gpu"] == "h100" else 1))
    if not gpu.has_fp8:  # what train_gpt.adapt_to_device does before sm_89: the bf16 head and MLP
        settings += ["--use_fp8=false", "--use_fp8_mlp=false"]
    tg.parse_args([s for s in settings if not s.startswith("--stages=")])  # a bad setting: one line now, not later
    if options["report"]:
        report = json.loads(Path(options["report"]).read_text().strip().splitlines()[-1])
    else:
        report = compile_check(settings, world_size)
    if options["save_report"]:
        Path(options["save_report"]).write_text(json.dumps(report, default=str) + "\n")
    t0 = time.perf_counter()
    time_estimate = estimate.estimate(report, options["gpu"], world_size)
    calibration = (float(options["calibration"]) if options["calibration"] else  # record #28's ratio at 8 ranks
                   estimate.CALIBRATION.get(options["gpu"]) if world_size == 8 else None)
    memory = estimate_memory(report, estimate.report_args(report["settings"]))
    result = dict(memory=memory, **estimate.summary(time_estimate, report, calibration),
                  estimate_seconds=round(time.perf_counter() - t0, 1))
    print(estimate.table(time_estimate, result), flush=True)
    print(json.dumps(result), flush=True)
    return result


def parse_options(argv: list[str]) -> tuple[dict, list[str]]:
    """benchmark.py's own options, and the train_gpt.py settings; a ValueError says what is wrong with either."""
    options, settings = dict(steps=20, warmup=5, real=False, peak_tflops=None, step=None), []
    lowest = dict(steps=1, warmup=0, step=0)
    for arg in argv:
        name, eq, value = arg.removeprefix("--").partition("=")
        if name in options and sum(a.removeprefix("--").partition("=")[0] == name for a in argv) > 1:
            raise ValueError(f"--{name} is given twice: which one is meant? HINT: give each option once")
        if name == "real":
            if eq and value.lower() not in ("true", "false"):
                raise ValueError(f"--real={value}: write --real (or --real=true/false)")
            options["real"] = not eq or value.lower() == "true"
        elif name in options and name != "real":
            cast = float if name == "peak_tflops" else int
            try:
                options[name] = cast(value)
            except ValueError:
                raise ValueError(f"--{name}={value}: expected {'a number' if cast is float else 'a whole number'}"
                                 ) from None
            if not math.isfinite(options[name]) or options[name] < lowest.get(name, 1e-9):
                raise ValueError(f"--{name}={value} must be {'above 0' if cast is float else 'at least'} "
                                 f"{lowest.get(name, '')}".rstrip())
        else:
            settings.append(arg)
    return options, settings


def main(argv: list[str]) -> dict:
    if "--estimate" in argv:
        return estimate_main(argv)
    options, settings = parse_options(argv)
    args = tg.parse_args(settings)
    on_cpu = args.device == "cpu" or (args.device == "auto" and not torch.cuda.is_available())
    if on_cpu and not any(s.startswith("--preset=") for s in settings):
        print("note: no GPU: timing --preset=smoke (the speedrun preset's 49,152-token windows would need tens of "
              "GB on a CPU); pass --preset=speedrun to time it anyway", file=sys.stderr)
        args = tg.parse_args(["--preset=smoke", *settings])
    rt = tg.setup_runtime(args)
    args, notes = tg.adapt_to_device(args, rt.device)
    for note in notes if rt.is_master else []:
        print(f"note: {note}", file=sys.stderr)
    total = args.num_iterations + args.extension_iterations
    first = total - 1 if options["step"] is None else options["step"]  # default: the last stage's largest batch
    if first >= total:
        raise ValueError(f"--step={first} is past the schedule's last training step, {total - 1}")
    plans = [tg.plan_step(min(first + i, total - 1), args) for i in range(options["steps"] + options["warmup"] + 1)]
    plans = [dataclasses.replace(p, adam_step=(first + i) % args.adam_every == args.adam_every - 1, untie=False)
             for i, p in enumerate(plans)]
    with tempfile.TemporaryDirectory() as tmp:
        steps = options["steps"] + options["warmup"]
        files = args.train_files if options["real"] else synthetic_shards(  # a window starts at a BOS: it also skips
            Path(tmp), (steps + 5) * args.windows_per_step * (plans[0].seq_len + 2000) * 2)  # ~1000 (one document)
        loader = tg.TrainLoader(tg.find_shards(files), plans[0].seq_len, args.windows_per_step, rt.rank,
                                rt.world_size, rt.device, vocab_size=args.vocab_size, bos_aligned=args.bos_aligned)
        torch.manual_seed(args.seed)
        model = tg.GPT(args).to(rt.device)
        optimizers = tg.build_optimizers(model, args, rt)
        step_model = torch.compile(model, dynamic=False, fullgraph=True) if args.use_compile else model
        synchronize = torch.cuda.synchronize if rt.device.type == "cuda" else lambda: None
        times, attended, syncs = [], [], HostSyncCounter()
        for step, plan in enumerate(plans[:-1]):
            batches = loader.next_step(plan.seq_len, plan.max_doc_len)
            model.set_step(plan)
            if step == options["warmup"]:
                attended.append(mean_attended_keys(batches, model, args))
            synchronize()
            t0 = time.perf_counter()
            tg.train_step(step_model, optimizers, batches, plan, args)
            synchronize()
            if step >= options["warmup"]:
                times.append(time.perf_counter() - t0)
        with syncs:  # one more step, untimed (the counting itself is slow): its data, its update
            batches = loader.next_step(plans[-1].seq_len, plans[-1].max_doc_len)
            model.set_step(plans[-1])
            tg.train_step(step_model, optimizers, batches, plans[-1], args)
    ms = 1000 * statistics.median(times)
    tokens_per_step = plans[0].tokens
    flops = flops_per_token(model, args, attended[0])
    peak = options["peak_tflops"] or (989.0 if rt.device.type == "cuda" else None)
    memory = tg.peak_memory_line(rt.device).split()
    result = dict(
        device=torch.cuda.get_device_name(rt.device) if rt.device.type == "cuda" else "cpu",
        world_size=rt.world_size, torch=torch.__version__, steps=options["steps"], schedule_step=first,
        tokens_per_step=tokens_per_step,
        ms_per_step=round(ms, 3), ms_per_step_min=round(1000 * min(times), 3),
        tokens_per_s=round(tokens_per_step / ms * 1000), tokens_per_s_per_device=round(tokens_per_step / ms * 1000 /
                                                                                        rt.world_size),
        host_syncs_per_step=len(syncs.events), model_flops_per_token=round(flops),
        attended_keys_per_token=round(attended[0], 1),
        mfu=round(flops * tokens_per_step / (ms / 1000) / rt.world_size / (peak * 1e12), 4) if peak else None,
        peak_tflops=peak, peak_memory_allocated_mib=int(memory[3]), peak_memory_reserved_mib=int(memory[6]),
        settings={k: v for k, v in vars(args).items() if k in ("use_fp8", "use_compile", "use_flex_attention",
                                                                "dtype", "num_layers", "model_dim", "train_seq_len")},
    )
    if rt.is_master:
        print(json.dumps(result), flush=True)
    return result


def cli(argv: list[str]) -> int:
    """As train_gpt.py's: one line `error: ...` (from rank 0) and exit status 1 for a bad argument or a failure, no
    traceback unless --debug=true."""
    if "--help" in argv or "-h" in argv:
        print(__doc__)
        return 0
    try:
        main(argv)
        return 0
    except (Exception, KeyboardInterrupt) as e:
        debug = "--debug=true" in argv
        message, status = tg.console_message(e, debug=True)
        if isinstance(e, ValueError) and "HINT:" not in message:
            message += ". HINT: `python benchmark.py --help` explains its options and train_gpt.py's settings"
        if debug:
            traceback.print_exc()
        elif not isinstance(e, (ValueError, OSError, KeyboardInterrupt)):
            message += " (--debug=true prints the traceback)"
        if int(os.environ.get("RANK", 0)) == 0:
            print(message, file=sys.stderr, flush=True)
        return status
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
