"""estimate.py: how long train_gpt.py's training step would take on a GPU, from the kernels tools/cuda_check.py
compiled for a fake H100 (no GPU needed). `python benchmark.py --estimate` runs the check and calls estimate() on its
report; docs/cuda_check.md explains the model and what it cannot see.

The time of a step, per rank, is the sum of its kernels' times, each a roofline:
  - a kernel inductor generated (Triton): inductor's own estimate, max(FLOPs / peak, bytes / bandwidth), on the GPU's
    datasheet figures as torch ships them (torch/_inductor/analysis/device_info.py), the FLOPs and bytes that inductor's
    scheduler counted for the node;
  - a kernel it calls (cuBLAS matmuls, the FP8 custom ops' _scaled_mm) and the FlexAttention templates: the same
    roofline with the compute peak scaled by an efficiency stated in EFFICIENCY, FlexAttention's FLOPs being those of
    the mask blocks it really computes at each step's windows (inductor counts every query against every key);
  - LAUNCH_US per kernel;
  - the optimizers: one traced step (every eager op a memory-bound kernel, the compiled Muon update's kernels as
    above), and their collectives on the NVLink bandwidth in a two-stream timeline that overlaps only what the code
    overlaps (a reduction with the updates of the groups before it, a gather with the updates after it).
"""

import dataclasses
import math
import tempfile
from pathlib import Path

import torch

import train_gpt as tg


@dataclasses.dataclass(frozen=True)
class GPU:
    name: str
    tflops: dict  # dtype name -> dense TFLOP/s
    dram_gbps: float  # GB/s
    link_gbps: float  # GB/s each way per GPU between the GPUs of one node
    has_fp8: bool


def datasheet(torch_name: str, link_gbps: float, name: str) -> GPU:
    """A GPU as torch's own table describes it, dense: the table's Tensor-Core figures for the H100 include 2:4
    sparsity and are halved, as torch._inductor.analysis.device_info.datasheet_tops does; unlike it, not the fp32
    figure (67 TFLOP/s on the CUDA cores, dense already: datasheet_tops gives 33.5, so inductor's own estimate of an
    fp32 matmul is twice ours). Plus the link bandwidth from the vendor's datasheet."""
    from torch._inductor.analysis.device_info import lookup_device_info

    info = lookup_device_info(torch_name)
    tops = {str(k).removeprefix("torch."): v / (1 if k in (torch.float32, torch.float64) else info.tops_sparsity_factor)
            for k, v in info.tops.items()}  # fp32 and fp64 run on the CUDA cores: their figures are dense already
    fp8 = tops.get("float8_e5m2")
    if fp8:  # torch's table has no float8_e4m3fn entry: the same FP8 peak as e5m2
        tops["float8_e4m3fn"] = fp8
    return GPU(name, tops, info.dram_bw_gbs, link_gbps, has_fp8=fp8 is not None)


GPUS = {  # NVLink per direction: H100 SXM 900 GB/s in all (NVLink 4), A100 SXM 600 GB/s (NVLink 3)
    "h100": lambda: datasheet("NVIDIA H100", 450.0, "H100 SXM 80GB"),
    "a100": lambda: datasheet("NVIDIA A100", 300.0, "A100 SXM 80GB"),
}

# Assumptions, not measurements, and not fitted to any record: the share of the datasheet peak each kind of kernel
# that inductor does not generate reaches at these shapes (memory-bound kernels are priced at the full bandwidth, as
# inductor prices its own), the cost of each launch, and NCCL's share of the link bandwidth.
EFFICIENCY = {
    "matmul": 0.70,  # cuBLAS bf16 GEMM with K = 768 or 3072: ~700 of 989 TFLOP/s (train_gpt's Triton matmul: alike)
    "fp8_matmul": 0.55,  # torch._scaled_mm inside the FP8 custom ops, with the casts and scales around it (and the
    # Triton FP8 matmul of the fused MLP: assumed alike, not measured)
    "flex_forward": 0.45,  # FlexAttention's Triton forward with 128 x 128 mask blocks (FlashAttention-2-like)
    "flex_backward": 0.35,  # its backward (5 products per block, atomics-free but recomputing P)
    "collective": 0.80,  # NCCL ring bus bandwidth over NVLink
}
LAUNCH_US = 3.0  # per kernel: the gap between dependent kernels plus a small grid's ramp and tail
COLLECTIVE_LATENCY_US = 20.0  # per collective at 8 ranks in one node


def report_args(settings: dict) -> tg.Hyperparameters:
    """The settings a report was compiled with, as Hyperparameters; fields this train_gpt.py no longer has (a report
    saved by an older one) are left out."""
    fields = {f.name for f in dataclasses.fields(tg.Hyperparameters)}
    return tg.Hyperparameters(**{k: v for k, v in settings.items() if k in fields})


def peak(gpu: GPU, dtype: str) -> float:
    """FLOP/s of the dtype a kernel writes (inductor's convention); a dtype with no figure has none."""
    return gpu.tflops.get(dtype, gpu.tflops["bfloat16"] if dtype.startswith("float8") else 0.0) * 1e12


def roofline_ms(flops: float, nbytes: float, gpu: GPU, dtype: str, efficiency: float = 1.0) -> float:
    """max(compute, transfer), in ms, as torch._inductor.scheduler.BaseSchedulerNode._get_estimated_runtime."""
    top = peak(gpu, dtype) * efficiency
    compute = flops / top if flops and top else 0.0  # no figure for the dtype (an integer kernel): its bytes alone
    return 1e3 * max(compute, nbytes / (gpu.dram_gbps * 1e9))


def kernel_class(k: dict) -> str:
    """matmul, fp8_matmul, flex_forward, flex_backward or inductor (a kernel inductor generates and prices)."""
    if k["kind"] == "template":
        return "flex_backward" if any("backward" in op for op in k["ops"]) else "flex_forward"
    if k["kind"] == "extern":
        if "fp8" in k["name"] or "scaled_mm" in k["name"] or k["dtype"].startswith("float8"):
            return "fp8_matmul"
        return "matmul" if k["flops"] else "extern_memory"
    return "inductor"


def price(k: dict, gpu: GPU, flex_density: float | None = None) -> dict:
    """One kernel's estimated time (ms) and what it rests on. A custom op (opaque to the compiler) is the kernels
    its body launches one after the other (tools/cuda_check.py traced them): its quantizations and copies each pass
    over their bytes, its matmuls are priced as matmuls."""
    if k.get("body"):
        parts = [price(dict(b, kind="extern", name=("fp8 " if b["op"] == "_scaled_mm" else "") + b["op"]), gpu)
                 for b in k["body"]]
        ms = sum(p["ms"] for p in parts)
        compute = sum(p["ms"] for p in parts if p["bound"] == "compute")
        return dict(ms=ms, kernel_ms=ms - LAUNCH_US / 1e3, flops=sum(p["flops"] for p in parts), kind=kernel_class(k),
                    bytes=sum(p["bytes"] for p in parts), bound="compute" if compute >= ms / 2 else "memory")
    kind = kernel_class(k)
    flops, dtype = k["flops"], k["dtype"]
    if kind.startswith("flex") and not flops and len(k.get("shapes", [])) == 2:  # inductor gives its template none
        (b, h, tq, d), (_, _, tk, _) = k["shapes"]
        flops = 4 * b * h * tq * tk * d * (2.5 if kind == "flex_backward" else 1)  # torch's flop_registry formulas
    if kind.startswith("flex") and flex_density is not None:
        flops = flops * flex_density  # inductor counts dense attention; the mask computes only these blocks
    if kind == "fp8_matmul":
        dtype = "float8_e4m3fn" if gpu.has_fp8 else "bfloat16"
    ms = roofline_ms(flops, k["bytes"], gpu, dtype, EFFICIENCY.get(kind, 1.0))
    top = peak(gpu, dtype) * EFFICIENCY.get(kind, 1.0)
    bound = "compute" if flops and top and flops / top * 1e3 >= ms else "memory"
    return dict(ms=ms + LAUNCH_US / 1e3, kernel_ms=ms, flops=flops, bytes=k["bytes"], bound=bound, kind=kind)


# ---------------------------------------------------------------------------------------------------------------------
# FlexAttention: the share of the dense (T x T) score matrix that the block mask computes


def attention_layers(args: tg.Hyperparameters) -> list[tuple[str, bool]]:
    """(S or L, paired) of each attention layer, in order."""
    paired = set(args.layers("paired_head_layers"))
    return [(c, i in paired) for i, c in enumerate(args.attn_pattern) if c != "-"]


class BlockCounts:
    """Stands in for BlockMask while train_gpt.flex_block_mask runs: keeps the block counts, skips building the
    transposed index lists (most of the time at 262,144 tokens)."""

    @staticmethod
    def from_kv_blocks(kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices, **kwargs):
        return BlockCounts, (kv_num_blocks.sum() + full_kv_num_blocks.sum()).item()


def mask_density(docs: torch.Tensor, window_blocks: int, args: tg.Hyperparameters) -> float:
    """Blocks FlexAttention computes (partial and full) over all blocks of the sequence's square, by the trainer's
    own rule (train_gpt.flex_block_mask)."""
    block_mask = tg.BlockMask
    tg.BlockMask = BlockCounts
    try:
        _, blocks = tg.flex_block_mask(docs, torch.tensor(window_blocks), args.block_size, args.token_windows)
    finally:
        tg.BlockMask = block_mask
    return blocks / (docs.numel() // args.block_size) ** 2


def sample_windows(args: tg.Hyperparameters, seq_len: int, max_doc_len: int | None, count: int = 2,
                   seed: int = 0) -> list[torch.Tensor]:
    """Document ids of a few training windows cut and packed by the trainer's own loader from synthetic shards
    (random tokens in documents of geometric length, mean 1000 tokens, each starting with BOS: benchmark.py's)."""
    import benchmark

    with tempfile.TemporaryDirectory() as tmp:
        # enough tokens whatever the windows: the loader plans a whole step, and the record's rule for a new shard
        # (tokens left < 2 x windows x seq_len) must not end a shard of 1,000-token documents
        files = benchmark.synthetic_shards(Path(tmp), max((count + 2) * seq_len * 2, 1 << 16), seed=seed)
        loader = tg.TrainLoader(tg.find_shards(files), seq_len, 1, 0, 1, torch.device("cpu"),
                                vocab_size=args.vocab_size, bos_aligned=args.bos_aligned)
        return [tg.document_ids(loader.next_step(seq_len, max_doc_len)[0][0], args.context_len) for _ in range(count)]


def layer_densities(docs_list: list[torch.Tensor], short: int, long: int, args: tg.Hyperparameters) -> list[float]:
    """Per attention layer, in order, the mean mask density over the sampled windows at these windows (blocks)."""
    cache = {}
    out = []
    for kind, paired in attention_layers(args):
        if (kind, paired) not in cache:
            window = long if kind == "L" else short
            values = []
            for docs in docs_list:
                seq_docs = docs[:, None].expand(-1, 2).reshape(-1) if paired else docs
                values.append(mask_density(seq_docs, window, args))
            cache[kind, paired] = sum(values) / len(values)
        out.append(cache[kind, paired])
    return out


def graph_ms(kernels: list[dict], gpu: GPU, densities: list[float] | None, backward: bool = False) -> dict:
    """A compiled graph's time: every kernel priced; its FlexAttention templates matched to the attention layers in
    order (the backward graph runs them in reverse)."""
    templates = [i for i, k in enumerate(kernels) if k["kind"] == "template"]
    order = {}
    if densities is not None:
        layers = list(reversed(densities)) if backward else densities
        if len(templates) == len(layers):
            order = dict(zip(templates, layers))
        else:  # not one template per layer: the mean density for each
            order = dict.fromkeys(templates, sum(densities) / len(densities))
    priced = [dict(price(k, gpu, order.get(i)), name=k["name"], ops=k["ops"], lines=k["lines"],
                   inductor_ms=k["inductor_ms"], recounted="inductor_bytes" in k) for i, k in enumerate(kernels)]
    return dict(ms=sum(p["ms"] for p in priced), kernels=priced)


# ---------------------------------------------------------------------------------------------------------------------
# The optimizers and the collectives


def collective_ms(nbytes: float, gpu: GPU) -> float:
    return COLLECTIVE_LATENCY_US / 1e3 + 1e3 * nbytes / (gpu.link_gbps * 1e9 * EFFICIENCY["collective"])


def optimizer_ms(events: list[dict], gpu: GPU, graphs: dict, only: str | None = None) -> dict:
    """A traced optimizer step (tools/cuda_check.OpRecorder) on two streams: compute (eager ops and compiled graphs,
    one after the other) and communication (collectives in launch order, each starting once launched and once the
    previous one ends); a wait holds the compute stream until its collective ends. The {"optimizer": name} markers say
    whose events follow (the optimizers step in lockstep, so their phases interleave); `only` keeps one optimizer's
    events (a step on which the others do nothing). Returns the step's ms with the overlap ("step") and, per
    optimizer, its compute ms, communication ms and kernels."""
    out, name = {}, None
    compute = comm = 0.0
    done = {}
    for e in events:
        if "optimizer" in e:
            name = e["optimizer"]
            out.setdefault(name, dict(compute_ms=0.0, communication_ms=0.0, kernels=0))
            continue
        if only is not None and name != only:
            continue
        mine = out[name]
        if "op" in e and e["dtype"] in (None, "None"):
            continue  # it returns no tensor (a query like Tensor.device): no kernel
        elif "op" in e:
            t = roofline_ms(e["flops"], e["bytes"], gpu, e["dtype"] or "float32") + LAUNCH_US / 1e3
            compute, mine["compute_ms"], mine["kernels"] = compute + t, mine["compute_ms"] + t, mine["kernels"] + 1
        elif "compiled" in e:
            g = graphs[e["compiled"]]
            compute, mine["compute_ms"] = compute + g["ms"], mine["compute_ms"] + g["ms"]
            mine["kernels"] += len(g["kernels"])
        elif "collective" in e:
            t = collective_ms(e["bytes"], gpu)
            comm = max(comm, compute) + t
            done[e["index"]], mine["communication_ms"] = comm, mine["communication_ms"] + t
        elif "wait" in e:
            compute = max(compute, done[e["wait"]])
    return dict(step=max(compute, comm), **(out if only is None else {only: out[only]}))


def accumulation_ms(params: list[torch.nn.Parameter], gpu: GPU) -> float:
    """Autograd adding a micro-step's gradients into .grad: one kernel per parameter reading two and writing one."""
    nbytes = sum(3 * p.numel() * p.element_size() for p in params)
    return roofline_ms(0, nbytes, gpu, "float32") + len(params) * LAUNCH_US / 1e3


# ---------------------------------------------------------------------------------------------------------------------
# The whole run


def estimate(report: dict, gpu_name: str = "h100", world_size: int = 8, top: int = 15) -> dict:
    """Per stage, evaluation and run, from the CUDA check's report (tools/cuda_check.py's JSON)."""
    gpu = GPUS[gpu_name]()
    args = report_args(report["settings"])
    if args.windows_per_step % world_size:
        raise ValueError(f"world size {world_size} does not divide windows_per_step={args.windows_per_step}")
    records = report["kernel_records"]
    graphs = {}  # dynamo graph id -> its (inference) kernels priced: Muon's update's
    for phase, graph_list in records.items():
        if phase.startswith("muon_update"):
            for g in graph_list:
                graphs[g["graph"]] = graph_ms(g["kernels"], gpu, None)
    trace = report["optimizer_traces"].get(f"optimizer_w{world_size}")
    if trace is None:
        raise ValueError(f"the report has no optimizer step traced at world size {world_size}: run the check with "
                         f"--world_sizes={world_size}")
    optimizer = optimizer_ms(trace, gpu, graphs)  # an Adam step: both optimizers, overlapped
    muon_alone = optimizer_ms(trace, gpu, graphs, only="Muon")["step"]
    optimizer["Muon"]["ms"] = muon_alone  # the table's rows: Muon alone, and what Adam adds to it
    optimizer["DistAdam"]["ms"] = optimizer.pop("step") - muon_alone
    with torch.device("meta"):
        model = tg.GPT(args)
    named = list(model.named_parameters())
    adam_params = [p for n, p in named if not (n.startswith("blocks.") and n.rsplit(".", 1)[-1] in tg.MUON_PARAMETERS
                                               and args.use_muon)]
    per_rank = args.windows_per_step // world_size * args.micro_batch_split  # micro-steps per rank and step
    plans = tg.full_schedule(args)
    stage_graphs = {}
    for phase, graph_list in records.items():
        if phase.startswith("train_stage"):
            stage = int(phase.removeprefix("train_stage"))
            stage_graphs[stage] = {g["kind"]: g["kernels"] for g in graph_list[:2]}
    samples, densities, steps = {}, {}, []
    for plan in plans[:-1]:
        stage = min(plan.stage, args.num_stages - 1)
        if stage not in stage_graphs:
            continue
        chunk = plan.seq_len // args.micro_batch_split
        if stage not in samples:
            samples[stage] = sample_windows(args, plan.seq_len, plan.max_doc_len)
            samples[stage] = [d[:chunk] for d in samples[stage]]
        key = (stage, plan.window_short, plan.window_long)
        if key not in densities:
            d = layer_densities(samples[stage], plan.window_short, plan.window_long, args)
            fwd = graph_ms(stage_graphs[stage]["forward"], gpu, d)
            bwd = graph_ms(stage_graphs[stage]["backward"], gpu, d, backward=True)
            densities[key] = dict(forward=fwd, backward=bwd, densities=d)
        f = densities[key]
        micro = f["forward"]["ms"] + f["backward"]["ms"]
        accumulations = (per_rank - 1) * accumulation_ms([p for _, p in named], gpu)
        if args.adam_every > 1 and plan.step % args.adam_every != 0:  # Adam's gradients carried from the last step
            accumulations += accumulation_ms(adam_params, gpu)
        opt = optimizer["Muon"]["ms"] + (optimizer["DistAdam"]["ms"] if plan.adam_step else 0.0)
        loss_reduce = collective_ms(8, gpu) if world_size > 1 else 0.0
        steps.append(dict(step=plan.step, stage=stage, key=key, ms=per_rank * micro + accumulations + opt + loss_reduce,
                          micro_ms=micro, optimizer_ms=opt, accumulation_ms=accumulations))
    result = dict(gpu=gpu.name, world_size=world_size, figures=dict(
        tflops={k: gpu.tflops[k] for k in ("bfloat16", "float32", "float8_e4m3fn") if k in gpu.tflops},
        dram_gbps=gpu.dram_gbps, link_gbps=gpu.link_gbps, efficiency=EFFICIENCY, launch_us=LAUNCH_US,
        collective_latency_us=COLLECTIVE_LATENCY_US, source="torch/_inductor/analysis/device_info.py (dense: the "
        "table's Tensor-Core figures over its sparsity factor); NVLink from the vendor's datasheet"))
    stages = {}
    for s in sorted({st["stage"] for st in steps}):
        mine = [st for st in steps if st["stage"] == s]
        stages[s] = dict(steps=len(mine), ms_per_step=sum(st["ms"] for st in mine) / len(mine),
                         forward_backward_ms=sum(st["micro_ms"] for st in mine) / len(mine) * per_rank,
                         optimizer_ms=sum(st["optimizer_ms"] for st in mine) / len(mine))
    result["stages"] = stages
    complete = len(steps) == len(plans) - 1
    result["train_s"] = sum(st["ms"] for st in steps) / 1e3 if complete else None
    result["steps"] = len(plans) - 1
    result["stages_estimated"] = sorted(stages)
    result["step_ms"] = [st["ms"] for st in steps] if complete else None
    # one step of the largest stage, kernel by kernel: the table
    last = max(stage_graphs) if stage_graphs else None
    if last is not None:
        plan = next(p for p in plans[:-1] if min(p.stage, args.num_stages - 1) == last and p.adam_step)
        f = densities[(last, plan.window_short, plan.window_long)]
        rows = []
        for direction in ("forward", "backward"):
            for k in f[direction]["kernels"]:
                rows.append(dict(k, ms=k["ms"] * per_rank, graph=direction))
        result["example_step"] = dict(stage=last, step=plan.step, ms=next(st["ms"] for st in steps
                                                                          if st["step"] == plan.step))
        result["kernels_per_step"] = per_rank * len(rows) + optimizer["Muon"]["kernels"] + \
            optimizer["DistAdam"]["kernels"]
        result["optimizer"] = optimizer
        st = next(st for st in steps if st["step"] == plan.step)
        extras = {"gradient accumulation (autograd)": st["accumulation_ms"],
                  "loss all-reduce": collective_ms(8, gpu) if world_size > 1 else 0.0}
        result["table"] = top_kernels(rows, optimizer, extras, top)
        result["by_class_ms"] = {}
        for r in rows:
            result["by_class_ms"][r["kind"]] = result["by_class_ms"].get(r["kind"], 0.0) + r["ms"]
        result["launch_ms"] = len(rows) * per_rank * LAUNCH_US / 1e3
        inductor = [r for r in f["forward"]["kernels"] + f["backward"]["kernels"] if r["kind"] == "inductor"]
        result["inductor_agreement"] = agreement(inductor) if gpu_name == "h100" else None
    if "eval" in records:
        result["eval"] = eval_estimate(records["eval"][0]["kernels"], args, plans, gpu, world_size)
    return result


def agreement(kernels: list[dict]) -> dict:
    """How our price of inductor's own kernels compares with its estimate on the fake H100: the same; 0 in inductor's
    (it has no peak for the kernel's output dtype, e.g. int64 or bool, and gives up); half ours (an fp32 kernel with
    FLOPs: datasheet_tops halves the fp32 figure); recounted (a fused kernel over more than 1e9 elements, whose
    bytes inductor stops counting there: tools/cuda_check.full_bytes); other."""
    same = [math.isclose(r["kernel_ms"], r["inductor_ms"], rel_tol=1e-6) for r in kernels]
    zero = [not s and r["inductor_ms"] == 0 for s, r in zip(same, kernels)]
    half = [not s and math.isclose(r["inductor_ms"], 2 * r["kernel_ms"], rel_tol=1e-6) for s, r in zip(same, kernels)]
    recounted = [not (s or z or h) and r.get("recounted", False) for s, z, h, r in zip(same, zero, half, kernels)]
    return dict(kernels=len(kernels), same=sum(same), inductor_zero=sum(zero), fp32_halved=sum(half),
                recounted=sum(recounted), other=len(kernels) - sum(same) - sum(zero) - sum(half) - sum(recounted))


def top_kernels(rows: list[dict], optimizer: dict, extras: dict, top: int | None) -> list[dict]:
    """The step's kernels grouped by what they are (kind and name for calls, the ops and source line for inductor's),
    largest first; the optimizers as one row each, so that the rows add up to the step."""
    groups = {}
    for r in rows:
        if r["kind"].startswith("flex"):  # one group per direction: its lines are those of the ops fused into it
            key = (r["graph"], r["kind"], "FlexAttention (every layer)", "")
        else:
            key = (r["graph"], r["kind"], r["name"] if r["kind"] != "inductor" else ",".join(r["ops"][:4]),
                   r["lines"][0] if r["lines"] else "")
        g = groups.setdefault(key, dict(graph=r["graph"], kind=r["kind"], what=key[2], line=key[3], count=0, ms=0.0,
                                        flops=0, bytes=0, compute_ms=0.0))
        g["count"] += 1
        g["ms"] += r["ms"]
        g["flops"] += r["flops"]
        g["bytes"] += r["bytes"]
        g["compute_ms"] += r["ms"] if r["bound"] == "compute" else 0.0
    for name, o in optimizer.items():
        groups[("optimizer", name)] = dict(graph="optimizer", kind="optimizer", what=name, line="", count=o["kernels"],
                                           ms=o["ms"], flops=0, bytes=0, compute_ms=0.0)
    for name, ms in extras.items():
        if ms:
            groups[("extra", name)] = dict(graph="step", kind="other", what=name, line="", count=0, ms=ms, flops=0,
                                           bytes=0, compute_ms=0.0)
    out = sorted(groups.values(), key=lambda g: -g["ms"])
    for g in out:
        g["bound"] = "compute" if g["compute_ms"] > g["ms"] / 2 else "memory"
        del g["compute_ms"]
    return out if top is None else out[:top] + ([dict(graph="rest", kind="rest", what=f"{len(out) - top} more groups",
                                                      line="", count=sum(g["count"] for g in out[top:]),
                                                      ms=sum(g["ms"] for g in out[top:]),
                                                      flops=sum(g["flops"] for g in out[top:]),
                                                      bytes=sum(g["bytes"] for g in out[top:]), bound="")]
                                                if len(out) > top else [])


def eval_estimate(kernels: list[dict], args: tg.Hyperparameters, plans: list, gpu: GPU, world_size: int) -> dict:
    """One evaluation window's forward (val_seq_len tokens), and a whole validation (val_tokens over the ranks), at
    the final validation's windows."""
    import benchmark

    final = plans[-1]
    with tempfile.TemporaryDirectory() as tmp:
        benchmark.synthetic_shards(Path(tmp), args.val_seq_len + 1)
        tokens = torch.as_tensor(tg.load_shard(next(Path(tmp).glob("*.bin"))))
    docs = tg.document_ids(tokens[:args.val_seq_len].long(), args.context_len)
    d = layer_densities([docs], final.window_short, final.window_long, args)
    window = graph_ms(kernels, gpu, d)
    windows = args.val_tokens // args.val_seq_len // world_size
    return dict(window_ms=window["ms"], windows_per_rank=windows, validation_ms=windows * window["ms"],
                validations=sum(p.validate for p in plans), kernels=len(kernels))


# ---------------------------------------------------------------------------------------------------------------------
# What the published records measured (docs/recipes.md#published-figures), to compare with


# Record #28's measured run over this model's estimate of its preset on 8 H100s: the model's known error, by which
# benchmark.py --estimate also prints its figures scaled. It moves whenever the pricing or what the preset compiles to
# moves; tests/test_cuda_check.py re-measures it and fails until the stored figure is today's ("train_ratio" of
# `python benchmark.py --estimate --preset=record_2025_08_23`, 3 minutes here). 1.232 until 2026-12-07, 1.198 since.
CALIBRATION = {"h100": 1.198}
RECORDS = {
    "record_2025_08_23": dict(name="record #28 (2025-08-23)", ms_at_step={125: 94.25, 1695: 99.67}, train_s=168.9),
    "speedrun": dict(name="record #89 (2026-07)", stage_ms=[31.5, 56.8, 82.6], train_s=79.5, steps=1390),
    "gpt2_baseline": dict(name="llm.c's GPT-2 (124M), the speedrun's starting point", train_s=45 * 60),
}
SYSTEM_FIELDS = {"train_files", "val_files", "device", "log_dir", "run_id", "save_every", "save_final",
                 "checkpoint_dir", "resume", "resume_anyway", "debug", "collective_timeout_s", "sample_tokens",
                 "hellaswag_items", "wandb_project", "warmup_steps", "seed", "fused_loss", "activation_memory_budget"}


def preset_of(settings: dict) -> str | None:
    """The preset whose math these settings are (system fields aside), or None."""
    for name in RECORDS:
        preset = dataclasses.asdict(tg.parse_args([f"--preset={name}"]))
        if all(settings.get(k) == v for k, v in preset.items() if k not in SYSTEM_FIELDS):
            return name
    return None


def summary(e: dict, report: dict, calibration: float | None = None) -> dict:
    """The JSON line: per-stage and run estimates, raw (and scaled by calibration, the ratio measured / estimated on
    record #28, when given), the comparison with the matching record, the kernel table."""
    preset = preset_of(report["settings"])
    cal = (lambda x: None if x is None else round(x * calibration, 3)) if calibration else (lambda x: None)
    out = dict(gpu=e["gpu"], world_size=e["world_size"], preset=preset, steps=e["steps"],
               stages_ms={str(k): round(v["ms_per_step"], 3) for k, v in e["stages"].items()},
               stages_ms_calibrated={str(k): cal(v["ms_per_step"]) for k, v in e["stages"].items()} if calibration
               else None,
               train_s=None if e["train_s"] is None else round(e["train_s"], 2), train_s_calibrated=cal(e["train_s"]),
               calibration=calibration, eval_window_ms=round(e["eval"]["window_ms"], 3) if "eval" in e else None,
               validation_ms=round(e["eval"]["validation_ms"], 3) if "eval" in e else None,
               kernels_per_step=e.get("kernels_per_step"), launch_ms_per_step=round(e.get("launch_ms", 0.0), 3),
               figures=e["figures"], inductor_agreement=e.get("inductor_agreement"),
               optimizer={k: {n: round(x, 4) if isinstance(x, float) else x for n, x in v.items()}
                          for k, v in e.get("optimizer", {}).items()},
               by_class_ms={k: round(v, 3) for k, v in e.get("by_class_ms", {}).items()},
               example_step=e.get("example_step"),
               table=[{k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}
                      for row in e.get("table", [])])
    record = RECORDS.get(preset)
    if record and e["step_ms"] and e["gpu"].startswith("H100") and e["world_size"] == 8:
        steps = e["step_ms"]
        compare = dict(record=record["name"], measured_train_s=record["train_s"],
                       train_ratio=round(record["train_s"] / e["train_s"], 3))
        if "ms_at_step" in record:
            compare["at_step"] = {str(s): dict(measured_ms=m, estimated_ms=round(sum(steps[:s]) / s, 3),
                                               ratio=round(m / (sum(steps[:s]) / s), 3))
                                  for s, m in record["ms_at_step"].items()}
        if "stage_ms" in record:
            ours = [e["stages"][k]["ms_per_step"] for k in sorted(e["stages"])]
            compare["stage_ms_measured"] = record["stage_ms"]
            compare["stage_ratio"] = [round(m / o, 3) for m, o in zip(record["stage_ms"], ours)]
            compare["stage_shares_measured"] = [round(m / record["stage_ms"][-1], 3) for m in record["stage_ms"]]
            compare["stage_shares_estimated"] = [round(o / ours[-1], 3) for o in ours]
            compare["note"] = f"the record ran {record['steps']} steps; this schedule {e['steps']}"
        out["record"] = compare
    return out


def table(e: dict, result: dict) -> str:
    """A short readable table of the estimate."""
    lines = [f"estimate for {e['gpu']} x{e['world_size']}: " + ", ".join(
        f"stage {k} {v:.1f} ms/step" for k, v in result["stages_ms"].items()) +
        (f"; run {result['train_s']:.1f} s" if result["train_s"] else "; run: not every stage compiled") +
        (f" (x{result['calibration']} calibrated: {result['train_s_calibrated']:.1f} s)"
         if result["train_s_calibrated"] else "") +
        (f"; validation {result['validation_ms']:.1f} ms" if result["validation_ms"] else "")]
    if e.get("table"):
        ex = e["example_step"]
        lines.append(f"step {ex['step']} (stage {ex['stage']}, an Adam step): {ex['ms']:.2f} ms, "
                     f"{e['kernels_per_step']} kernels; largest:")
        lines.append(f"{'ms':>8} {'share':>6} {'n':>4} {'GFLOP':>9} {'MB':>9} {'bound':>7}  what (graph, source line)")
        for r in e["table"]:
            lines.append(f"{r['ms']:8.3f} {r['ms'] / ex['ms']:6.1%} {r['count']:4d} {r['flops'] / 1e9:9.1f} "
                         f"{r['bytes'] / 1e6:9.1f} {r['bound']:>7}  {r['kind']} {r['what'][:48]} ({r['graph']}"
                         f"{', train_gpt.py:' + r['line'] if r['line'] else ''})")
    if result.get("record"):
        lines.append("against " + result["record"]["record"] + ": " + str({k: v for k, v in result["record"].items()
                                                                         if k != "record"}))
    return "\n".join(lines)
