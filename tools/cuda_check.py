"""cuda_check.py: compile train_gpt.py for an H100 on a machine without a GPU, and report what a GPU run would meet.

    python tools/cuda_check.py --size=smoke          # the smoke preset in bf16 with FlexAttention and the FP8 head
    python tools/cuda_check.py --size=speedrun       # the recipe's shapes: 11x768, 16k/32k/49k-token steps, 262k eval
    python tools/cuda_check.py --size=smoke --dtype=float32 --block_size=32 --windows=1,2,5  # any --field=value

On fake tensors (tools/fake_h100.py: no GPU, no memory, nothing launched) it compiles, exactly as train_gpt.py asks
torch.compile to: the training micro-step (forward + backward) at each window size, the evaluation forward at each
window size, and Muon's update (the orthogonalizer in it) for every rank's shard at world sizes 1 and 8. Every
Triton kernel goes through ptxas for sm_90. It then runs the FP8 custom ops' real bodies at the shapes found in the
compiled graphs, so torch._scaled_mm's own checks judge every call the GPU will make. It prints a summary, then one
JSON line (graphs, graph breaks, recompiles, kernels, shared memory, spills, inductor's peak-memory estimates, FLOPs
per token, FP8 acceptance, Muon update compiles, failures); exit status 0 when every check passes, 1 when one fails,
2 when this machine cannot run the check (the JSON's "problems" say why). See docs/cuda_check.md.
"""

import argparse
import contextlib
import json
import logging
import sys
import time
import traceback
from pathlib import Path

import fake_h100  # noqa: I001  (tools/ is this script's folder; it must set up before torch is imported)

ROOT = Path(__file__).resolve().parent.parent


def parse_options(argv: list[str]):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--size", choices=["smoke", "speedrun"], default="smoke",
                   help="smoke: PRESETS['smoke'] as a GPU would run it (bf16, FlexAttention, FP8 head); "
                        "speedrun: the default preset")
    p.add_argument("--windows", default="1,3", help="window sizes in blocks, run in turn (none may recompile)")
    p.add_argument("--world_sizes", default="1,8", help="world sizes whose Muon shards are compiled (none: skip)")
    p.add_argument("--stages", default="all",
                   help="training stages to compile: all, last, none (the evaluation alone), or a list like 0,2")
    opts, settings = p.parse_known_args(argv)
    opts.windows = [int(w) for w in opts.windows.split(",")]
    opts.world_sizes = [int(w) for w in opts.world_sizes.split(",") if w and w != "none"]
    opts.settings = settings  # --field=value for train_gpt's Hyperparameters
    return opts


# =====================================================================================================================
# ADAPTER: the one place that calls train_gpt. When train_gpt's API changes (settings, model, step, optimizer), update
# this function and nothing else. It must do, on fake cuda tensors, what a GPU run of train_gpt.py does.
# =====================================================================================================================


def drive_trainer(tg, rig, opts):
    """Settings -> model -> compiled training micro-steps, compiled evaluation, compiled Muon update per rank.

    One phase per training stage ("train_stage<k>"; the extension runs in the last stage's phase, as it shares its
    graph): the stage's first step, then the same step with each of opts.windows as its long window (none of which
    may recompile); then the evaluation at every stage's windows and the final validation's ("eval").
    rig.phase(name, tokens) labels what compiles inside it; rig.fake is the fake-tensor mode (factories and backward
    run inside it); rig.process_group(rank, world_size) is a fake process group. torch.compile is intercepted by the
    rig: whatever the trainer passes (fullgraph, dynamic) is kept and recorded, the backend becomes the check's."""
    import dataclasses
    import functools
    from unittest import mock

    import torch

    base = {"smoke": ["--preset=smoke", "--dtype=bfloat16", "--use_fp8=true", "--use_fp8_mlp=true",
                      "--use_flex_attention=true", "--use_compile=true", "--block_size=128"], "speedrun": []}[opts.size]
    args = tg.parse_args(base + opts.settings)
    device = torch.device("cuda", 0)
    args, notes = tg.adapt_to_device(args, device)  # the fake device is an H100: FP8 and FlexAttention stay on
    rig.record(settings=dataclasses.asdict(args), notes=notes)  # the fields (vars() would add cached properties)
    plans = tg.full_schedule(args)

    # Compiles whatever use_compile says: compiling is what is checked.
    with torch.device("meta"):
        model = tg.GPT(args)  # no weights are needed: shapes only
    fake_h100.module_to_fake_cuda(model, rig.fake)
    torch._functorch.config.activation_memory_budget = args.activation_memory_budget  # as train() does
    step_model = torch.compile(model, dynamic=False, fullgraph=True)  # as train() does

    def run(plan, tokens: int, train: bool):
        with rig.fake:
            model.set_step(plan)
            model.set_window_index(0)
            inputs = torch.zeros(tokens, dtype=torch.int32, device=device)  # as to_device() delivers them
            targets = torch.zeros(tokens, dtype=torch.int64, device=device)
        loss = step_model(inputs, targets)
        if train:
            with rig.fake:  # backward formulas run eagerly on the fake tensors and may make new ones
                loss.backward()
            model.zero_grad(set_to_none=True)

    first_steps = {}
    for plan in plans[:-1]:
        first_steps.setdefault(min(plan.stage, args.num_stages - 1), []).append(plan)
    named = {"all": list(first_steps), "last": [max(first_steps)], "none": []}
    wanted = named[opts.stages] if opts.stages in named else [int(k) for k in opts.stages.split(",")]
    for stage, stage_plans in first_steps.items():  # train_step(): forward, then backward of the summed loss
        if stage not in wanted:
            continue
        plan = stage_plans[0]
        variants = [plan] + [dataclasses.replace(plan, window_long=w, window_short=max(1, w // 2))
                             for w in opts.windows]
        variants += [p for p in stage_plans[1:] if p.stage != plan.stage][:1]  # the extension, in the last stage
        chunk = plan.seq_len // args.micro_batch_split  # train_step() runs each window as micro_batch_split chunks
        with rig.phase(f"train_stage{stage}", tokens=chunk):
            for p in variants:
                run(p, p.seq_len // args.micro_batch_split, train=True)

    with rig.phase("eval", tokens=args.val_seq_len), torch.no_grad():  # evaluate()
        model.eval()
        for plan in [stage_plans[0] for stage_plans in first_steps.values()] + [plans[-1]]:
            run(plan, args.val_seq_len, train=False)
        model.train()

    for world_size in opts.world_sizes:  # each rank's Muon shards, as that rank's process compiles them
        torch._dynamo.reset()  # a fresh job: dynamo's recompile limit (8 per function) counts one job's shapes
        with rig.phase(f"muon_update_w{world_size}", tokens=None):
            for rank in range(world_size):
                with rig.process_group(rank, world_size):
                    optimizers = tg.build_optimizers(model, args, tg.Runtime(rank, world_size, device))
                    muon = next(opt for opt in optimizers if isinstance(opt, tg.Muon))
                    for _ in range(2):  # the second step must not compile again
                        with rig.fake:
                            for p in muon.params:
                                p.grad = torch.zeros_like(p)
                        muon.step(plans[0])
                    muon.state.clear()
        # One whole optimizer step (Adam and Muon in lockstep) of rank 0, which owns the largest share, traced op by op
        # for the time estimate: a step of the last stage (the embedding untied) on which Adam updates; the second such
        # step, so that the optimizers' state exists already.
        with rig.process_group(0, world_size):
            optimizers = tg.build_optimizers(model, args, tg.Runtime(0, world_size, device))
            # the compiled update is not run again (dynamo will not run under a tracing dispatch mode): the trace
            # names the graph compiled above for the shard's shape, whose kernels are in its records
            graphs = {tuple(g["inputs"][0]): g["id"] for g in rig.phases[f"muon_update_w{world_size}"]["graphs"]}
            muon = next(opt for opt in optimizers if isinstance(opt, tg.Muon))

            def update(grads, weights, *_, graphs=graphs):
                if rig.recorder is not None:
                    rig.recorder.events.append(dict(compiled=graphs[tuple(grads.shape)]))
                return torch.empty_like(weights)

            muon.update_fn = update
            plan = dataclasses.replace(plans[-2], adam_step=True, untie=False)
            fake_rows = functools.partial(nonzero_rows, rows=touched_rows(args, plan, world_size))
            for traced in (False, True):
                with rig.fake:
                    for p in model.parameters():
                        p.grad = torch.zeros_like(p)
                with rig.tracing(f"optimizer_w{world_size}") if traced else contextlib.nullcontext(), \
                        mock.patch.object(tg, "nonzero_rows", fake_rows):
                    tg.step_optimizers([Marked(opt, rig) for opt in optimizers], plan)
            model.zero_grad(set_to_none=True)


def touched_rows(args, plan, world_size: int) -> int:
    """The bigram rows one rank's gradient has since the last Adam step, were its tokens' hashes uniform: R (1 - (1 -
    1/R)^T) of R rows for T tokens. Text repeats its bigrams, so fewer are touched: this bounds the bytes from above."""
    R, T = args.bigram_vocab_size, args.adam_every * plan.tokens // world_size
    return round(R * (1 - (1 - 1 / max(R, 1)) ** T))


def nonzero_rows(grad, world_size: int, rows: int):
    """train_gpt.nonzero_rows on fake tensors, whose values are not there: its pass over the gradient, its exchange
    of the counts, and `rows` rows spread evenly over the owners."""
    import torch
    import torch.distributed as dist

    grad.any(dim=1)  # (fake tensors make no tensor from a factory function: new_empty, not torch.empty)
    each, counts = rows // world_size, grad.new_empty(world_size, dtype=torch.long)
    dist.all_to_all_single(torch.empty_like(counts), counts)
    return grad.new_empty(each * world_size, dtype=torch.long), [each] * world_size, [each] * world_size


class Marked:
    """An optimizer whose phases, as train_gpt.step_optimizers interleaves them, are marked in the traced events with
    its name (what follows a marker is its work)."""

    def __init__(self, opt, rig):
        self.opt, self.rig = opt, rig

    def phases(self, plan):
        phases = self.opt.phases(plan) if hasattr(self.opt, "phases") else (self.opt.step(plan) for _ in [0])
        while True:
            if self.rig.recorder is not None:
                self.rig.recorder.events.append(dict(optimizer=type(self.opt).__name__))
            if next(phases, StopIteration) is StopIteration:
                return
            yield


# =====================================================================================================================
# The rig: compile with inductor for the fake H100, record what was compiled, run the graphs on fake tensors.
# =====================================================================================================================


class Rig:
    def __init__(self, torch):
        from torch._subclasses.fake_tensor import FakeTensorMode

        self.torch = torch
        self.fake = FakeTensorMode(allow_non_fake_inputs=True)  # torch.from_numpy(...).to("cuda") becomes fake
        self.current = None  # the phase compiling now
        self.phases = {}  # name -> dict(tokens, seconds, graphs=[dynamo graph records], aot=[AOT graph records])
        self.compile_calls = []  # the keyword arguments train_gpt passed to torch.compile
        self.info = {}
        self._memory_log = None
        self._node_log = None  # the kernel records of the graph inductor is compiling now
        self.graph_ids, self._graph_id = 0, None
        self.recorder = None  # an OpRecorder while the optimizer step is traced
        self.traces = {}  # name -> the events OpRecorder traced
        self.estimate_seconds = 0.0  # spent recording kernels and tracing optimizer steps for the time estimate
        from torch._inductor.scheduler import Scheduler

        codegen = Scheduler.codegen

        def recorded_codegen(scheduler):
            if self._node_log is not None:
                t0 = time.perf_counter()
                self._node_log.extend(kernel_records(scheduler))
                self.estimate_seconds += time.perf_counter() - t0
            return codegen(scheduler)

        Scheduler.codegen = recorded_codegen
        logger = logging.getLogger("torch._inductor.memory")
        logger.setLevel(logging.INFO)
        logger.addHandler(_Collect(self))
        logger.propagate = False
        compile_fn = torch.compile

        def intercepted_compile(model=None, **kwargs):
            self.compile_calls.append({k: v for k, v in kwargs.items() if k != "backend"})
            kwargs["backend"] = self.backend
            return compile_fn(model, **kwargs) if model is not None else compile_fn(**kwargs)

        torch.compile = intercepted_compile

    def record(self, **info):
        self.info.update(info)

    @contextlib.contextmanager
    def phase(self, name: str, tokens):
        self.phases[name] = dict(tokens=tokens, graphs=[], aot=[], kernels_from=len(fake_h100.COMPILED_KERNELS))
        self.current, t0 = name, time.perf_counter()
        try:
            yield
        finally:
            self.phases[name]["seconds"] = round(time.perf_counter() - t0, 1)
            self.phases[name]["kernels_to"] = len(fake_h100.COMPILED_KERNELS)
            self.current = None

    @contextlib.contextmanager
    def tracing(self, name: str):
        """Traces the eager ops run inside (OpRecorder); kept as self.traces[name]."""
        self.recorder, t0 = OpRecorder(), time.perf_counter()
        try:
            with self.recorder.tracing():
                yield
        finally:
            self.traces[name], self.recorder = self.recorder.events, None
            self.estimate_seconds += time.perf_counter() - t0

    @contextlib.contextmanager
    def process_group(self, rank: int, world_size: int):
        import torch.distributed as dist

        if world_size == 1:
            yield
            return
        dist.init_process_group("fake", store=dist.HashStore(), rank=rank, world_size=world_size)
        try:
            yield
        finally:
            dist.destroy_process_group()

    def backend(self, gm, example_inputs):
        """Dynamo's backend: inductor compiles forward and backward for the (fake) H100, Triton and ptxas included;
        the step then runs the dynamo graph eagerly on fake tensors, which is all a machine without a GPU can do."""
        from torch._inductor.compile_fx import compile_fx

        if self.current is None:  # compiled outside any phase: still counted, under its own name
            self.current = "unlabelled"
            self.phases.setdefault("unlabelled", dict(tokens=None, graphs=[], aot=[], kernels_from=0))
        phase = self.phases[self.current]
        self.graph_ids += 1
        graph_id = self.graph_ids
        phase["graphs"].append(dict(nodes=len(gm.graph.nodes), id=graph_id,
                                    inputs=[tuple(t.shape) for t in example_inputs if hasattr(t, "shape")]))
        self._graph_id = graph_id
        try:
            compile_fx(gm, example_inputs, inner_compile=self.inner_compile)
        except self.torch._dynamo.exc.RestartAnalysis:  # dynamo traces the frame again (to make a Python scalar a
            phase["graphs"].pop()  # tensor, for one): this attempt compiled nothing
            raise

        def run(*args):
            with self.fake:
                return gm(*args)

        return run

    def inner_compile(self, gm, example_inputs, *args, **kwargs):
        """Inductor's per-graph compile, after AOTAutograd: count FLOPs and note custom-op calls here, where the graph
        is the final forward, backward or inference graph; collect inductor's peak-memory estimate while it runs."""
        from torch._inductor.compile_fx import compile_fx_inner

        kind = "backward" if kwargs.get("is_backward") else "inference" if kwargs.get("is_inference") else "forward"
        record = dict(kind=kind, graph=self._graph_id, flops=graph_flops(gm), custom_ops=custom_op_calls(gm),
                      peak_memory=[], kernels=[], **graph_bytes(gm))
        self.phases[self.current]["aot"].append(record)
        self._memory_log, self._node_log = record["peak_memory"], record["kernels"]
        try:
            return compile_fx_inner(gm, example_inputs, *args, **kwargs)
        finally:
            self._memory_log = self._node_log = None


class _Collect(logging.Handler):
    """torch._inductor.memory logs its own estimate of each graph's peak memory (the buffers it allocates plus the
    inputs it may free) for the baseline order and each reordering it tries; it keeps the lowest."""

    def __init__(self, rig):
        super().__init__(logging.INFO)
        self.rig = rig

    def emit(self, record):
        message = record.getMessage()
        log = self.rig._memory_log
        if log is None:
            return
        if message.startswith("Reordering for peak memory"):
            log.append([])
        elif "peak memory:" in message and log:
            log[-1].append(int(message.rsplit(" ", 1)[1]))


def kernel_records(scheduler) -> list[dict]:
    """One record per node of inductor's final schedule (after fusion): what the GPU will run for it, with inductor's
    own estimate (BaseSchedulerNode.get_estimated_runtime: a roofline, max(FLOPs / peak, bytes / bandwidth), on the
    figures fake_h100 gives it) and the FLOPs and bytes it is computed from, so that tools/estimate.py can price the
    same node for another GPU, and the train_gpt.py lines it comes from."""
    import torch
    from torch._inductor import ir
    from torch._inductor import scheduler as nodes
    from torch._inductor.fx_utils import count_flops_fx

    records = []
    for node in scheduler.nodes:
        if isinstance(node, nodes.NopKernelSchedulerNode) or isinstance(node.node, ir.MultiOutput):
            continue  # no kernel: a view, or the unpacking of an extern kernel's outputs
        parts = node.get_nodes()
        origins = [o for part in parts if part.node is not None for o in part.node.get_origins()]
        ops = sorted({getattr(o.target, "__name__", str(o.target)) for o in origins if o.op == "call_function"})
        packet = getattr(getattr(node.node, "op_overload", None), "overloadpacket", None)
        called = [o for o in origins if packet is not None and getattr(o.target, "overloadpacket", None) is packet]
        lines = {}
        for o in called or origins:  # an extern kernel's line is its call's, not that of the views fused around it
            frames = [f for f in (o.meta.get("stack_trace") or "").split("\n") if "train_gpt.py" in f]
            if frames:  # the innermost line of train_gpt.py that made this op
                line = frames[-1].split(", line ", 1)[1].replace(", in ", " ").strip()
                lines[line] = lines.get(line, 0) + 1
        if isinstance(node, nodes.ExternKernelSchedulerNode):
            overload = getattr(node.node, "op_overload", None)
            name = getattr(overload, "_name", None) or getattr(node.node, "python_kernel_name", None) or \
                type(node.node).__name__
            kind = "collective" if isinstance(node.node, ir._CollectiveKernel) else "extern"
        else:
            foreach = isinstance(node, nodes.ForeachKernelSchedulerNode)
            kind = "template" if node.is_template() else "foreach" if foreach else "triton"
            name = node.get_name()
        record = dict(kind=kind, name=name, ops=ops, lines=sorted(lines, key=lambda k: -lines[k])[:3])
        try:
            flops = node.estimate_flops()
            if not flops and len(called) == 1:  # an extern kernel whose IR node kept no origin node (the update
                flops = count_flops_fx(called[0])  # aX + BX of the orthogonalizer): inductor counts none; its op does
        except Exception:  # noqa: BLE001  (no formula for it: inductor then prices its bytes alone)
            flops = None
        dtype = parts[0].get_outputs()[0].node.maybe_get_dtype() if parts[0].get_outputs() else None
        counted = int(node.get_read_write_buffers_sizes() or 0)
        record.update(flops=int(flops) if flops else 0, bytes=full_bytes(node, counted),
                      dtype=str(dtype).removeprefix("torch."), inductor_ms=float(node.get_estimated_runtime()))
        if record["bytes"] != counted:
            record["inductor_bytes"] = counted
        if isinstance(node.node, ir.UserDefinedTritonKernel):  # our own Triton kernel (train_gpt's fused loss and
            # MLP): inductor counts at most 1e9 elements of each buffer an extern kernel touches (2 GB of the 4.9 GB
            # bf16 logits); price it as a kernel that reads or writes each tensor argument once, in full
            buffers = {b.get_name(): b for b in node.node.inputs}.values()
            record.update(name=node.node.get_kernel_and_metadata()[0].fn.__name__, bytes=sum(
                int(b.get_numel()) * b.get_dtype().itemsize for b in buffers))
            args = node.node.kwargs
            if all(isinstance(args.get(d), int) for d in "MNK"):  # a matmul (M, K) x (K, N) and its epilogue
                record.update(flops=2 * args["M"] * args["N"] * args["K"],
                              dtype=str(args["a_ptr"].get_dtype()).removeprefix("torch."))
        if kind == "template":  # FlexAttention: the query's and the key's shapes, to count what its mask computes
            inputs = getattr(parts[0].node, "inputs", [])
            record["shapes"] = [[int(d) for d in i.get_size()] for i in inputs[:2]
                                if all(isinstance(d, (int, torch.SymInt)) or d.is_number for d in i.get_size())]
        records.append(record)
    return records


def full_bytes(node, counted: int) -> int:
    """A kernel's bytes as inductor counts them (each buffer read or written once, at most as often as the kernel's
    elements ask), except that for a fused kernel inductor stops at 1e9 elements per buffer (a fused node has no
    single range: scheduler.get_read_write_buffer_accesses), 40% of a (49,152 x 50,304) gradient: there each buffer
    counts as much as its part's count that touches it most."""
    parts = node.get_nodes()
    if len(parts) < 2:
        return counted
    accesses = [part.get_read_write_buffer_accesses(include_reads=True, include_writes=True) for part in parts]
    return sum(max([b] + [a.get(name, 0) for a in accesses])
               for name, b in node.get_read_write_buffer_accesses(include_reads=True, include_writes=True).items())


class OpRecorder:
    """Traces one eager optimizer step on fake tensors: every ATen op that launches a kernel (views and empty
    tensors do not) with the bytes it reads and writes (torch.utils._runtime_estimation's count) and its FLOPs
    (torch's flop formulas); each collective the optimizers start (bytes per rank), each wait on one, and each call of
    a compiled function (its kernels are in that graph's records)."""

    NO_KERNEL = {"empty", "new_empty", "empty_like", "empty_strided", "new_empty_strided", "alias", "slice",
                 "_local_scalar_dense", "lift_fresh", "clone_"}
    FROM_TEMPLATE = {"new_zeros", "new_ones", "new_full", "zeros_like", "ones_like", "full_like"}  # nothing read

    def __init__(self):
        self.events = []

    @contextlib.contextmanager
    def tracing(self):
        import torch
        import torch.distributed as dist
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._runtime_estimation import _VIEW_OPS, get_num_bytes
        from torch.utils.flop_counter import flop_registry

        recorder = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                packet = func.overloadpacket
                name = packet.__name__
                if packet in _VIEW_OPS or name in recorder.NO_KERNEL or \
                        func.namespace in ("c10d", "_c10d_functional"):
                    return out
                outs = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
                if all(t.device.type == "cpu" for t in outs):
                    return out  # a query (Tensor.device, a size) or host work (a 0-d CPU tensor): no kernel
                tensors = outs if name in recorder.FROM_TEMPLATE else [
                    t for t in torch.utils._pytree.tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
                nbytes = sum(get_num_bytes(t) for t in tensors)  # every tensor whole, but for the row ops:
                if name == "index_add_":  # the source's rows, added to as many rows of self (read and written)
                    nbytes = get_num_bytes(args[2]) + 3 * get_num_bytes(args[3])
                elif name == "index":  # the rows it gathers, read and written, and the indices
                    nbytes = 2 * get_num_bytes(out) + sum(get_num_bytes(i) for i in args[1] if i is not None)
                flops = flop_registry[packet](*args, **(kwargs or {}), out_val=out) if packet in flop_registry else 0
                recorder.events.append(dict(op=name, bytes=nbytes, flops=int(flops),
                                            dtype=str(outs[0].dtype).removeprefix("torch.")))
                return out

        class Handle:
            def __init__(self, index, work):
                self.index, self.work = index, work

            def wait(self):
                recorder.events.append(dict(wait=self.index))
                return self.work.wait() if self.work is not None else True

        originals = {}

        def collective(name, factor):
            original = originals[name] = getattr(dist, name)

            def call(output, *args, async_op=False, **kwargs):
                size = output.numel() * output.element_size()
                recorder.events.append(dict(collective=name, bytes=int(size * factor(dist.get_world_size())),
                                            index=len(recorder.events)))
                work = original(output, *args, async_op=async_op, **kwargs)
                return Handle(recorder.events[-1]["index"], work) if async_op else work

            setattr(dist, name, call)

        # bytes each rank sends in a ring: the output's share of the whole for a reduce-scatter (whose output is
        # one rank's share), (W - 1) / W of it for a gather, twice that for an all-reduce
        collective("reduce_scatter_single", lambda W: W - 1)
        collective("all_gather_single", lambda W: (W - 1) / W)
        collective("all_reduce", lambda W: 2 * (W - 1) / W)
        collective("all_to_all_single", lambda W: (W - 1) / W)  # the output's part from the other ranks
        try:
            with Mode():
                yield self
        finally:
            for name, fn in originals.items():
                setattr(dist, name, fn)


def graph_flops(gm) -> dict:
    """FLOPs of an FX graph by op, with torch.utils.flop_counter's formulas applied to each node's fake values.
    flex_attention counts as dense attention (every query against every key); custom ops are counted separately; a
    Triton kernel of ours with integer arguments M, N and K is a matmul, 2·M·N·K under the kernel's name."""
    import torch
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
    from torch.utils.flop_counter import flop_registry

    value = lambda a: a.meta.get("val") if isinstance(a, torch.fx.Node) else a
    counts = {}
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        if "kernel_idx" in n.kwargs:  # triton_kernel_wrapper_functional / _mutation: a user-defined Triton kernel
            args, name = n.kwargs["kwargs"], kernel_side_table.get_kernel(n.kwargs["kernel_idx"]).fn.__name__
            if all(isinstance(args.get(d), int) for d in "MNK"):
                counts[name] = counts.get(name, 0) + 2 * args["M"] * args["N"] * args["K"]
            continue
        packet = getattr(n.target, "overloadpacket", n.target)
        formula = flop_registry.get(packet)
        if formula is None:
            continue
        args, kwargs = (torch.utils._pytree.tree_map(value, a) for a in (n.args, n.kwargs))
        name = getattr(packet, "__name__", str(packet))
        counts[name] = counts.get(name, 0) + formula(*args, **kwargs, out_val=n.meta.get("val"))
    return counts


def graph_bytes(gm) -> dict:
    """Bytes of the graph's inputs, and of the outputs it allocates (not inputs or their views): for a training
    forward graph the outputs are the loss and everything saved for the backward."""
    import torch
    from torch.multiprocessing.reductions import StorageWeakRef

    def storages(nodes) -> dict:
        values = [n.meta.get("val") for n in nodes if isinstance(n, torch.fx.Node)]
        return {StorageWeakRef(v.untyped_storage()).cdata: v.untyped_storage().nbytes() for v in values
                if isinstance(v, torch.Tensor)}

    inputs = storages(gm.graph.find_nodes(op="placeholder"))
    outputs = storages(torch.utils._pytree.tree_leaves(gm.graph.find_nodes(op="output")[0].args))
    return dict(inputs_bytes=sum(inputs.values()),
                outputs_bytes=sum(b for s, b in outputs.items() if s not in inputs))


def custom_op_calls(gm) -> list:
    """Every call of a project-defined torch.library.custom_op (opaque to the compiler) in the graph: the op and its
    arguments as (shape, stride, dtype) for tensors, values otherwise."""
    import torch
    from torch._library.custom_ops import _maybe_get_opdef

    calls = []
    for n in gm.graph.nodes:
        opdef = _maybe_get_opdef(n.target) if isinstance(n.target, torch._ops.OpOverload) else None
        if n.op == "call_function" and opdef and not opdef._init_fn.__module__.startswith("torch."):
            args = [(tuple(a.meta["val"].shape), tuple(a.meta["val"].stride()), a.meta["val"].dtype)
                    if isinstance(a, torch.fx.Node) else a for a in n.args]
            calls.append((n.target._name, args))
    return calls


def run_custom_op(torch, name: str, args: list) -> tuple[str | None, int, list]:
    """Runs a custom op's real body (not its fake implementation) on fake cuda tensors of the given layout, so that
    the ATen ops inside (torch._scaled_mm's shape, stride and dtype checks) judge it; returns (error, FLOPs, the
    kernels the body launches: OpRecorder's op, bytes, FLOPs and dtype of each)."""
    from torch._library.custom_ops import _maybe_get_opdef
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    body = _maybe_get_opdef(name)._init_fn
    new_tensor = torch.Tensor.new_tensor
    with FakeTensorMode() as mode:
        tensors = [fake_h100.to_fake_cuda(torch.empty_strided(a[0], a[1], dtype=a[2], device="meta"), mode)
                   if isinstance(a, tuple) else a for a in args]
        # Tensor.new_tensor(python scalar) builds a real tensor and copies it to the device outside the fake mode;
        # while the body runs, make it a factory the fake mode handles.
        torch.Tensor.new_tensor = lambda self, data, dtype=None, **kw: torch.full(
            (), data, dtype=dtype or self.dtype, device=self.device)
        recorder = OpRecorder()
        try:
            with FlopCounterMode(display=False) as counter, recorder.tracing():
                body(*tensors)
            return None, counter.get_total_flops(), [e for e in recorder.events if "op" in e]
        except Exception as e:  # noqa: BLE001  (any rejection is the finding)
            return f"{type(e).__name__}: {str(e).splitlines()[0][:300]}", 0, []
        finally:
            torch.Tensor.new_tensor = new_tensor


def summarize(torch, rig, opts, error) -> dict:
    from torch._dynamo.utils import counters

    phases = rig.phases
    report = dict(size=opts.size, windows=opts.windows, world_sizes=opts.world_sizes, torch=torch.__version__,
                  triton=__import__("triton").__version__, device=fake_h100.H100.name + " (fake)", error=error,
                  settings=rig.info.get("settings"), notes=rig.info.get("notes"), compile_calls=rig.compile_calls)
    report["graphs"] = {name: len(p["graphs"]) for name, p in phases.items()}
    report["graph_breaks"] = sum(counters["graph_break"].values())
    report["recompiles"] = {name: max(0, len(p["graphs"]) - 1) for name, p in phases.items()
                            if not name.startswith("muon_update")}  # those compile once per shard shape
    report["seconds"] = {name: p.get("seconds") for name, p in phases.items()}

    # FP8 and any other custom op: run each distinct call's real body; its FLOPs join its graph's
    fp8_calls, fp8_errors, op_runs = [], [], {}  # (op, its args) -> (FLOPs, the kernels its body launched)
    for p in phases.values():
        for g in p["aot"]:
            for name, args in g["custom_ops"]:
                key = (name, repr(args))
                if key not in op_runs:
                    error_message, flops, body = run_custom_op(torch, name, args)
                    op_runs[key] = flops, body
                    shapes = [list(a[0]) for a in args if isinstance(a, tuple)]
                    fp8_calls.append(dict(op=name, shapes=shapes, accepted=error_message is None))
                    if error_message:
                        fp8_errors.append(f"{name} {shapes}: {error_message}")
                g["flops"][name] = g["flops"].get(name, 0) + op_runs[key][0]
    report["custom_ops"] = dict(calls=fp8_calls, errors=fp8_errors,
                                all_accepted=not fp8_errors if fp8_calls else None)

    # every graph's kernels (inductor's schedule) for the time estimate (tools/estimate.py); a custom op's FLOPs are
    # those its body ran above (inductor has no formula for it), and its body's own kernels ("body": what the GPU
    # runs, one after the other), matched to the graph's calls in order
    report["kernel_records"] = {}
    for name, p in phases.items():
        for g in p["aot"]:
            calls = {}
            for op, args in g["custom_ops"]:
                calls.setdefault(op, []).append(op_runs[(op, repr(args))])
            for k in g["kernels"]:
                if k["kind"] == "extern" and calls.get(k["name"]):
                    k["flops"], k["body"] = calls[k["name"]].pop(0)
            report["kernel_records"].setdefault(name, []).append(dict(kind=g["kind"], graph=g["graph"],
                                                                      kernels=g["kernels"]))
    report["optimizer_traces"] = rig.traces
    report["seconds"]["estimate_records"] = round(rig.estimate_seconds, 1)

    # FLOPs (totals by graph kind and op, and per token) and inductor's peak-memory estimates per phase and graph kind
    attention = ("flex_attention", "flex_attention_backward")
    report["flops"], report["flops_per_token"], report["peak_memory_bytes"], report["graph_bytes"] = {}, {}, {}, {}
    for name, p in phases.items():
        if p["tokens"]:
            totals = {}
            for g in p["aot"][:2 if name.startswith("train") else 1]:  # the first: forward + backward, or inference
                kind = "backward" if g["kind"] == "backward" else "forward"
                for op, f in g["flops"].items():
                    totals.setdefault(kind, {})[op] = totals.get(kind, {}).get(op, 0) + f
            dense = sum(f for ops in totals.values() for op, f in ops.items() if op not in attention)
            attn = sum(f for ops in totals.values() for op, f in ops.items() if op in attention)
            report["flops"][name] = dict(tokens=p["tokens"], **totals)
            t = p["tokens"]
            report["flops_per_token"][name] = dict(dense=dense / t, attention_counted_dense=attn / t,
                                                   total=(dense + attn) / t)
        for g in p["aot"]:  # the order inductor keeps is its lowest estimate
            key = f"{name}_{g['kind']}"
            report["graph_bytes"].setdefault(key, dict(inputs=g["inputs_bytes"], outputs=g["outputs_bytes"]))
            if g["peak_memory"] and all(g["peak_memory"]):
                estimate = max(min(group) for group in g["peak_memory"])
                report["peak_memory_bytes"][key] = max(estimate, report["peak_memory_bytes"].get(key, 0))
    report["peak_memory_gib"] = {k: round(v / 2**30, 3) for k, v in report["peak_memory_bytes"].items()}

    # kernels: every Triton kernel built, its target, shared memory, registers, local memory (spills)
    usage = [fake_h100.kernel_resources(k) for k in fake_h100.COMPILED_KERNELS]
    limit = fake_h100.SHARED_MEMORY_LIMIT
    report["kernels"] = dict(
        count=len(usage), distinct=len({u["hash"] for u in usage}), targets=sorted({u["target"] for u in usage}),
        by_phase={name: p["kernels_to"] - p["kernels_from"] for name, p in phases.items() if "kernels_to" in p},
        max_shared_bytes=max((u["shared"] for u in usage), default=0), shared_limit_bytes=limit,
        over_shared_limit=sorted({u["name"] for u in usage if u["shared"] > limit}),
        max_registers=max((u["registers"] for u in usage), default=0),
        local_memory_kernels=sorted({u["name"] for u in usage if u["local"] > 0}),
        flex_attention=dict(forward=sum("flex_attention" in u["name"] and "backward" not in u["name"] for u in usage),
                            backward=sum("flex_attention_backward" in u["name"] for u in usage)),
        largest_shared=sorted(usage, key=lambda u: -u["shared"])[:3])

    # Muon's update: compiled once per distinct shard shape that the simulated ranks of a world size passed it
    report["muon_update"] = {}
    for name, p in phases.items():
        if name.startswith("muon_update_w"):
            shapes = sorted({tuple(g["inputs"][0]) for g in p["graphs"] if g["inputs"]})
            report["muon_update"][name.removeprefix("muon_update_w")] = dict(
                compiles=len(p["graphs"]), shapes=[list(s) for s in shapes])

    failures = []
    if error:
        failures.append(f"compilation failed: {error}")
    if report["graph_breaks"]:
        failures.append(f"{report['graph_breaks']} graph break(s)")
    for name in [n for n in phases if not n.startswith("muon_update")] or ["train"]:
        if report["graphs"].get(name) != 1:
            failures.append(f"{name}: {report['graphs'].get(name)} graphs across its windows, not 1")
    if report["kernels"]["targets"] and report["kernels"]["targets"] != ["cuda:90"]:
        failures.append(f"kernels built for {report['kernels']['targets']}, not only cuda:90")
    if not error and not usage:
        failures.append("no Triton kernel was built")
    if report["kernels"]["over_shared_limit"]:
        failures.append(f"over the {limit} B shared-memory limit: {report['kernels']['over_shared_limit']}")
    if fp8_errors:
        failures.append("custom ops rejected: " + "; ".join(fp8_errors))
    for w, o in report["muon_update"].items():
        if o["compiles"] != len(o["shapes"]) or not o["compiles"] and (report["settings"] or {}).get("use_muon", True):
            failures.append(f"Muon's update at world size {w}: {o['compiles']} compiles for shapes {o['shapes']}")
    if not all(c.get("fullgraph") for c in rig.compile_calls):
        failures.append(f"train_gpt compiles without fullgraph=True somewhere: {rig.compile_calls}")
    report["failures"] = failures
    return report


def print_summary(report: dict):
    s = report["settings"] or {}
    print(f"fake {report['device']}: torch {report['torch']}, triton {report['triton']}; --size={report['size']}: "
          f"{s.get('num_layers')}x{s.get('model_dim')}, train {s.get('train_seq_len')} tokens per stage, eval "
          f"{s.get('val_seq_len')} tokens, {s.get('dtype')}, fp8 {s.get('use_fp8')}, block {s.get('block_size')}")
    print(f"graphs {report['graphs']} (windows {report['windows']}), graph breaks {report['graph_breaks']}, "
          f"recompiles {report['recompiles']}")
    k = report["kernels"]
    print(f"Triton kernels: {k['count']} built ({k['distinct']} distinct) for {k['targets']}; largest shared memory "
          f"{k['max_shared_bytes']} B of {k['shared_limit_bytes']}; most registers {k['max_registers']}; kernels "
          f"with local memory (spills): {len(k['local_memory_kernels'])}")
    print(f"inductor's peak-memory estimates (GiB): {report['peak_memory_gib']}")
    print("graph inputs / outputs it allocates (GiB): " + ", ".join(
        f"{k} {v['inputs'] / 2**30:.3f} / {v['outputs'] / 2**30:.3f}" for k, v in report["graph_bytes"].items()
        if not k.startswith("muon_update")))
    for name, f in report["flops_per_token"].items():
        print(f"{name} FLOPs/token: dense {f['dense']:.6g}, attention (every key, as torch counts) "
              f"{f['attention_counted_dense']:.6g}")
    c = report["custom_ops"]
    print(f"custom ops (FP8 head, MLP) run for real on fake tensors: {len(c['calls'])} distinct calls, all accepted: "
          f"{c['all_accepted']} {c['errors'] or ''}")
    print(f"Muon update compiles per world size: {report['muon_update']}")
    print(f"seconds per phase: {report['seconds']}")
    print("FAILED: " + " | ".join(report["failures"]) if report["failures"] else "all checks passed")


def main(argv: list[str]) -> int:
    opts = parse_options(argv)
    problems = fake_h100.problems()
    if problems:
        print(json.dumps(dict(size=opts.size, problems=problems, failures=problems)))
        return 2
    t0 = time.perf_counter()
    torch = fake_h100.install()
    sys.path.insert(0, str(ROOT))
    import train_gpt as tg

    rig = Rig(torch)
    error = None
    try:
        drive_trainer(tg, rig, opts)
    except Exception as e:  # noqa: BLE001  (a compile failure is the finding: report it)
        traceback.print_exc()
        first = next((line for line in str(e).splitlines() if line.strip()), "")
        error = f"{type(e).__name__}: {first.strip()[:500]}"
    report = summarize(torch, rig, opts, error)
    report["seconds"]["total"] = round(time.perf_counter() - t0, 1)
    print_summary(report)
    print(json.dumps(report, default=str), flush=True)
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
