"""train_gpt.py: train a GPT-2-small-class model on FineWeb to 3.28 val loss as fast as we can.

The recipe is the public NanoGPT speedrun record of 2025-08-23 (2.812 min on 8xH100), written our own way: one file that
runs the same math on 8 GPUs, on 1 GPU (gradient accumulation) and on a CPU (tiny `smoke` preset, used by the tests).

    torchrun --standalone --nproc_per_node=8 train_gpt.py     # the record run (any --nproc_per_node that divides 8)
    python train_gpt.py --preset=smoke                        # a 4-layer model on the sample data, on a CPU, in seconds
    python train_gpt.py --help                                # every setting, its default and unit

Techniques (credits name the record in the public speedrun history that introduced them):
  - rotary embeddings, half of the frequencies truncated to zero (#2, #17); QK-norm, ReLU^2 MLP, zero-init projections,
    vocab padded to 50304 (#5 ModernArch); untied head, RMSNorm after the embedding (#8)
  - x0 embedding shortcut with per-layer lambdas and logit soft-cap (#9); U-Net skips with learned weights (#11)
  - value embeddings mixed into V in a 012...012 layer pattern (#14, #15, #17); one layer without attention (#17)
  - FP8 LM head through torch._scaled_mm (#19); merged QKVO weights, fixed attention scale 0.12, long/short sliding
    windows (#20); FlexAttention with a document-causal block mask (#13, #16); BOS-aligned training windows (#26)
  - sparse attention gate: a per-head sigmoid gate from 12 residual channels (#28 SparseAttnGate, 2025-08-23)
  - Muon: Nesterov momentum + Newton-Schulz orthogonalization, sharded across ranks (#3, #4, #6); Adam for the rest.
    Options (off by default): Polar Express (Amsel et al., arXiv 2505.16932; #38) and NorMuon's neuron-wise
    normalization (arXiv 2510.05491; #41).
"""

import concurrent.futures
import copy
import ctypes
import dataclasses
import difflib
import glob
import json
import math
import os
import platform
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention.flex_attention import BlockMask, flex_attention

BOS_ID = 50256  # GPT-2's <|endoftext|>, prepended to every document: the document delimiter (RECIPE §1.2)

# -----------------------------------------------------------------------------
# Hyperparameters: everything that changes results, in one frozen dataclass. `--field=value` overrides any of them.


def setting(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class Hyperparameters:
    # data (relative paths are resolved against $DATA_PATH, default: the current directory)
    train_files: str = setting("data/fineweb10B/fineweb_train_*.bin", "glob of training shards, read in sorted order")
    val_files: str = setting("data/fineweb10B/fineweb_val_*.bin", "glob of validation shards")
    val_tokens: int = setting(10_485_760, "tokens of validation, the same for every world size")
    train_seq_len: int = setting(48 * 1024, "tokens in one BOS-aligned training window (one rank, one micro-step)")
    val_seq_len: int = setting(4 * 64 * 1024, "tokens in one validation window")
    windows_per_step: int = setting(8, "training windows per step; the world size must divide it (accumulation)")
    # model
    vocab_size: int = setting(50304, "embedding rows: GPT-2's 50257 padded to a multiple of 128")
    num_layers: int = setting(12, "transformer blocks")
    model_dim: int = setting(768, "residual stream width")
    num_heads: int = setting(6, "attention heads")
    head_dim: int = setting(128, "channels per head; num_heads * head_dim must equal model_dim")
    mlp_hidden: int = setting(3072, "MLP hidden width")
    attn_pattern: str = setting("LSSSLSS-SSSL", "per layer: L long window, S short window, - no attention")
    value_embed_pattern: str = setting("012------012", "per layer: value embedding table mixed into V, -: none")
    attn_scale: float = setting(0.12, "fixed softmax scale (not 1/sqrt(head_dim))")
    attn_gate_dim: int = setting(12, "residual channels that feed the sparse attention gate")
    rope_base: float = setting(1024.0, "rotary frequencies run from 1 to 1/rope_base rad/token")
    logit_softcap: float = setting(30.0, "logits become cap * sigmoid(z / (cap / 4)) = cap/2 * (tanh(z / (cap/2)) + 1)")
    block_size: int = setting(128, "tokens per attention mask block; windows are counted in blocks")
    max_window_tokens: int = setting(1728, "long window at the end of training; it grows linearly from one block")
    use_fp8: bool = setting(True, "LM head in FP8 (e4m3 forward, e5m2 gradient) during training")
    fp8_x_scale: float = setting(768**0.5 / 448, "FP8 head: activation scale")
    fp8_w_scale: float = setting(2.0**-9, "FP8 head: weight scale")
    fp8_grad_scale: float = setting(1 / 448, "FP8 head: gradient scale")
    # optimization
    num_iterations: int = setting(1695, "training steps")
    cooldown_frac: float = setting(0.45, "fraction of the steps over which the LR falls linearly to final_lr_frac")
    final_lr_frac: float = setting(0.1, "LR multiplier at the last step")
    muon_lr: float = setting(0.05, "Muon learning rate (hidden matrices)")
    muon_momentum: float = setting(0.95, "Muon momentum after warm-up")
    muon_momentum_start: float = setting(0.85, "Muon momentum at step 0")
    muon_momentum_warmup_steps: int = setting(300, "steps over which Muon momentum rises linearly")
    muon_weight_decay: float = setting(0.0, "Muon decoupled weight decay (multiplied by the LR)")
    orthogonalizer: str = setting("newton_schulz", "newton_schulz (the 2025-08-23 recipe) or polar_express")
    orthogonalizer_steps: int = setting(5, "iterations of the orthogonalizer (polar_express has 5 tuned steps)")
    use_normuon: bool = setting(False, "NorMuon: normalize Muon updates per neuron by an EMA of their second moment")
    normuon_beta2: float = setting(0.9, "NorMuon second-moment EMA decay")
    adam_lr: float = setting(0.008, "Adam base learning rate (embeddings, head, scalars)")
    adam_beta1: float = setting(0.8, "Adam beta1")
    adam_beta2: float = setting(0.95, "Adam beta2")
    adam_eps: float = setting(1e-10, "Adam epsilon")
    embed_lr_mul: float = setting(75.0, "Adam LR multiplier: token embedding")
    value_embed_lr_mul: float = setting(75.0, "Adam LR multiplier: value embeddings")
    head_lr_mul: float = setting(1.0, "Adam LR multiplier: LM head")
    scalar_lr_mul: float = setting(5.0, "Adam LR multiplier: skip weights and lambdas")
    # evaluation and run
    val_every: int = setting(125, "steps between validations (0: only at the start and the end)")
    warmup_steps: int = setting(10, "untimed steps that compile and warm up kernels; the model is then reset")
    seed: int = setting(0, "seed of the model's initialization")
    # system (never changes the math, only where and how fast it runs)
    device: str = setting("auto", "cuda, cpu, or auto (cuda when available)")
    dtype: str = setting("bfloat16", "activation and orthogonalization precision: bfloat16 or float32")
    use_compile: bool = setting(True, "torch.compile the model and the orthogonalizer")
    use_flex_attention: bool = setting(True, "FlexAttention with a block-sparse mask; off: dense masked softmax")
    log_dir: str = setting("", "folder of run logs; empty: records/logs beside this file")
    run_id: str = setting("", "log name; empty: a fresh uuid4")

    def __post_init__(self):
        def require(ok: bool, message: str):
            if not ok:
                raise ValueError(message)

        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type is int:
                require(value >= 0, f"{f.name}={value} must not be negative")
        for name in ("train_seq_len", "val_seq_len", "windows_per_step", "num_layers", "model_dim", "num_heads",
                     "head_dim", "mlp_hidden", "block_size", "vocab_size", "num_iterations", "orthogonalizer_steps"):
            require(getattr(self, name) > 0, f"{name} must be positive")
        require(self.num_heads * self.head_dim == self.model_dim,
                f"num_heads*head_dim = {self.num_heads}*{self.head_dim} must equal model_dim={self.model_dim}")
        require(self.head_dim % 4 == 0, f"head_dim={self.head_dim} must be a multiple of 4 (rotary pairs, half frozen)")
        require(self.attn_gate_dim <= self.model_dim, "attn_gate_dim cannot exceed model_dim")
        if self.use_flex_attention and self.use_compile:  # what compiles for an H100 (tools/cuda_check.py, torch 2.13)
            require(self.block_size % 16 == 0, f"block_size={self.block_size}: compiled FlexAttention needs a "
                    "multiple of 16 (its smallest tile)")
            require(self.dtype != "bfloat16" or self.block_size % 128 == 0, f"block_size={self.block_size} with "
                    "compiled FlexAttention in bfloat16: its backward kernel on an H100 reads key blocks of 128 "
                    "tokens; use a multiple of 128, --dtype=float32 (any multiple of 16) or --use_flex_attention=false")
        for name in ("train_seq_len", "val_seq_len"):
            n = getattr(self, name)
            require(n % self.block_size == 0, f"{name}={n} must be a multiple of block_size={self.block_size} "
                    f"(the attention mask works in blocks); try {max(1, round(n / self.block_size)) * self.block_size}")
        windows = self.val_tokens // self.val_seq_len
        require(self.val_tokens % self.val_seq_len == 0 and windows % self.windows_per_step == 0 and windows > 0,
                f"val_tokens={self.val_tokens} must be a positive multiple of val_seq_len*windows_per_step = "
                f"{self.val_seq_len * self.windows_per_step}, so that every world size sees the same windows")
        require(self.vocab_size % self.windows_per_step == 0,
                f"vocab_size={self.vocab_size} must be a multiple of windows_per_step={self.windows_per_step} "
                "(Adam shards embedding rows across ranks)")
        for name in ("attn_pattern", "value_embed_pattern"):
            pattern = getattr(self, name)
            require(len(pattern) == self.num_layers,
                    f"{name}={pattern!r} has {len(pattern)} entries but num_layers={self.num_layers}: one per layer")
        require(set(self.attn_pattern) <= set("LS-"), f"attn_pattern={self.attn_pattern!r} may only use L, S and -")
        require(all(c == "-" or c.isdigit() for c in self.value_embed_pattern),
                f"value_embed_pattern={self.value_embed_pattern!r} may only use digits (table ids) and -")
        require(all(a != "-" or v == "-" for a, v in zip(self.attn_pattern, self.value_embed_pattern)),
                "a layer without attention (- in attn_pattern) cannot take a value embedding")
        require(self.orthogonalizer in ("newton_schulz", "polar_express"),
                f"orthogonalizer={self.orthogonalizer!r}: choose newton_schulz or polar_express")
        require(self.orthogonalizer != "polar_express" or self.orthogonalizer_steps <= 5,
                "polar_express has 5 tuned steps; set orthogonalizer_steps <= 5")
        require(self.dtype in ("bfloat16", "float32"), f"dtype={self.dtype!r}: choose bfloat16 or float32")
        require(self.device in ("auto", "cuda", "cpu"), f"device={self.device!r}: choose auto, cuda or cpu")
        require(0 <= self.cooldown_frac <= 1, f"cooldown_frac={self.cooldown_frac} must lie in [0, 1]")
        require(0 <= self.muon_momentum < 1 and 0 <= self.muon_momentum_start < 1, "Muon momenta must lie in [0, 1)")
        require(0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1, "Adam betas must lie in [0, 1)")

    @property
    def value_embed_count(self) -> int:
        return 1 + max((int(c) for c in self.value_embed_pattern if c != "-"), default=-1)

    @property
    def num_scalars(self) -> int:
        """Skip weights (L), block lambdas (2L), attention lambdas (2L), padded so Adam can shard it by rank."""
        n = 5 * self.num_layers
        return n + (-n) % self.windows_per_step


SAMPLE_DATA = Path(__file__).resolve().parent / "data" / "sample"
PRESETS = {
    "speedrun": {},  # the 2025-08-23 record: 1695 steps of 393,216 tokens on 8xH100
    "smoke": dict(  # a 4-layer model on the shipped sample text, fp32 on a CPU in seconds
        train_files=str(SAMPLE_DATA / "sample_train_*.bin"), val_files=str(SAMPLE_DATA / "sample_val_*.bin"),
        val_tokens=8192, train_seq_len=256, val_seq_len=1024, windows_per_step=4,
        num_layers=4, model_dim=128, num_heads=2, head_dim=64, mlp_hidden=512, attn_pattern="LS-L",
        value_embed_pattern="01-0", max_window_tokens=384, block_size=64, fp8_x_scale=128**0.5 / 448,
        num_iterations=20, val_every=5, warmup_steps=2, muon_momentum_warmup_steps=20,
        dtype="float32", use_fp8=False, use_compile=False, use_flex_attention=False,
    ),
}


def parse_value(f: dataclasses.Field, text: str):
    if f.type is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"--{f.name}={text}: expected true or false")
    try:
        return f.type(text)
    except ValueError:
        raise ValueError(f"--{f.name}={text}: expected {f.type.__name__}") from None


def parse_args(argv: list[str]) -> Hyperparameters:
    """`--preset=NAME` then `--field=value` overrides, applied in order; raises ValueError with a usable message."""
    fields = {f.name: f for f in dataclasses.fields(Hyperparameters)}
    preset, overrides = "speedrun", {}
    for arg in argv:
        name, eq, text = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or not eq:
            raise ValueError(f"cannot read {arg!r}: settings are given as --name=value (see --help)")
        if name == "preset":
            if text not in PRESETS:
                raise ValueError(f"unknown preset {text!r}; choose one of {', '.join(PRESETS)}")
            preset = text
        elif name in fields:
            overrides[name] = parse_value(fields[name], text)
        else:
            close = difflib.get_close_matches(name, fields, n=1)
            hint = f"; did you mean --{close[0]}?" if close else " (see --help)"
            raise ValueError(f"unknown setting --{name}{hint}")
    return Hyperparameters(**{**PRESETS[preset], **overrides})


def usage() -> str:
    lines = [__doc__.split("\n\n")[0], "", "usage: [torchrun ...] train_gpt.py [--preset=NAME] [--field=value ...]", "",
             f"presets: {', '.join(PRESETS)} (default speedrun)", "", "settings (default, meaning):"]
    for f in dataclasses.fields(Hyperparameters):
        lines.append(f"  --{f.name}={f.default!s:<36} {f.metadata['help']}")
    lines.append("\nenvironment: DATA_PATH (root of relative shard globs); torchrun's RANK, WORLD_SIZE, LOCAL_RANK")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# Runtime: the one place that sets up processes and devices; world size 1 needs no process group.


@dataclass(frozen=True)
class Runtime:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_master(self) -> bool:
        return self.rank == 0


def setup_runtime(args: Hyperparameters) -> Runtime:
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if args.windows_per_step % world_size:
        sizes = [n for n in range(1, args.windows_per_step + 1) if args.windows_per_step % n == 0]
        raise ValueError(f"world size {world_size} cannot keep the batch of windows_per_step={args.windows_per_step} "
                         f"windows; use a world size among {sizes}")
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise ValueError("device=cuda but no CUDA GPU is visible; use --device=cpu (or auto)")
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    else:
        keep_freed_memory()
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", device_id=device if use_cuda else None)
    return Runtime(rank, world_size, device)


def keep_freed_memory():
    """On a CPU, every new logits tensor is hundreds of MB; glibc hands such blocks back to the OS when freed, so each
    step page-faults them in again. Keeping them halves the smoke step time (0.88 -> 0.6 s, measured)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to tune
        return
    libc.mallopt(-3, 2**30)  # M_MMAP_THRESHOLD: serve blocks up to 1 GiB from the heap, not from fresh mmaps
    libc.mallopt(-1, 2**30)  # M_TRIM_THRESHOLD: keep up to 1 GiB of freed heap


def adapt_to_device(args: Hyperparameters, device: torch.device) -> tuple[Hyperparameters, list[str]]:
    """Turns off the fast paths this device cannot run (their plain twins compute the same function); says so."""
    notes = []
    if args.use_fp8 and device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        notes.append("FP8 needs compute capability 8.9+: the LM head runs in plain bf16 (use_fp8=False)")
        args = dataclasses.replace(args, use_fp8=False)
    if args.use_flex_attention and device.type == "cpu":
        notes.append("FlexAttention has no backward pass on a CPU: the dense reference attention runs instead")
        args = dataclasses.replace(args, use_flex_attention=False)
    return args, notes


def all_reduce_sum(t: Tensor) -> Tensor:
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


class RunLog:
    """Rank 0 appends each line to records/logs/<run_id>.txt and flushes it, so a crash loses nothing written."""

    def __init__(self, path: Path | None):
        self.path = path
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.file = path.open("x")  # never overwrite another run's log

    def __call__(self, text: str, console: bool = True):
        if self.path is None:
            return
        if console:
            print(text, flush=True)
        self.file.write(text + "\n")
        self.file.flush()

    def close(self):
        if self.path is not None:
            self.file.close()


def describe_machine(device: torch.device) -> list[str]:
    lines = [f"Running Python {sys.version}",
             f"Running PyTorch {torch.__version__} compiled for CUDA {torch.version.cuda}"]
    try:
        import triton

        lines.append(f"Running Triton version {triton.__version__}")
    except ImportError:
        pass
    if device.type == "cuda":
        try:
            lines.append(subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30).stdout.rstrip())
        except (OSError, subprocess.SubprocessError):
            lines.append(f"nvidia-smi: not available; GPU: {torch.cuda.device_count()}x {torch.cuda.get_device_name()}")
    else:
        cpu = platform.processor() or platform.machine()
        if Path("/proc/cpuinfo").exists():
            names = [s.split(":", 1)[1].strip() for s in Path("/proc/cpuinfo").read_text().splitlines()
                     if s.startswith("model name")]
            cpu = names[0] if names else cpu
        lines += [f"CPU: {cpu} ({os.cpu_count()} cores)", "nvidia-smi: not available"]
    return lines


# -----------------------------------------------------------------------------
# Custom ops: the FP8 LM head (RECIPE §2(a)). A custom op with a fake implementation and registered autograd, so
# torch.compile treats it as one opaque node; the plain twin is F.linear, used in evaluation and when use_fp8 is off.


@torch.library.custom_op("nanogpt::fp8_mm", mutates_args=())
def fp8_mm(x: Tensor, w: Tensor, x_s: float, w_s: float, grad_s: float) -> tuple[Tensor, Tensor, Tensor]:
    """x @ w.T with both quantized to e4m3 by fixed scales; bf16 out. Also returns the FP8 copies for backward."""
    x_f8 = x.div(x_s).to(torch.float8_e4m3fn)
    w_f8 = w.div(w_s).to(torch.float8_e4m3fn)
    scale = lambda s: x.new_tensor(s, dtype=torch.float32)
    out = torch._scaled_mm(x_f8, w_f8.T, out_dtype=torch.bfloat16, scale_a=scale(x_s), scale_b=scale(w_s),
                           use_fast_accum=True)
    return out, x_f8, w_f8


@fp8_mm.register_fake
def _(x, w, x_s, w_s, grad_s):
    return (x.new_empty(x.size(0), w.size(0), dtype=torch.bfloat16), torch.empty_like(x, dtype=torch.float8_e4m3fn),
            torch.empty_like(w, dtype=torch.float8_e4m3fn))


@torch.library.custom_op("nanogpt::fp8_mm_backward", mutates_args=())
def fp8_mm_backward(g: Tensor, x_f8: Tensor, w_f8: Tensor, x_s: float, w_s: float,
                    grad_s: float) -> tuple[Tensor, Tensor]:
    """The gradient goes to e5m2 (wider range, fewer digits); no fast accumulation in backward."""
    g_f8 = g.div(grad_s).to(torch.float8_e5m2)
    scale = lambda s: g.new_tensor(s, dtype=torch.float32)
    # _scaled_mm wants its first operand row-major and its second column-major
    grad_x = torch._scaled_mm(g_f8, w_f8.T.contiguous().T, out_dtype=torch.bfloat16, scale_a=scale(grad_s),
                              scale_b=scale(w_s), use_fast_accum=False)
    grad_w = torch._scaled_mm(g_f8.T.contiguous(), x_f8.T.contiguous().T, out_dtype=torch.float32,
                              scale_a=scale(grad_s), scale_b=scale(x_s), use_fast_accum=False)
    return grad_x, grad_w


@fp8_mm_backward.register_fake
def _(g, x_f8, w_f8, x_s, w_s, grad_s):
    return torch.empty_like(x_f8, dtype=torch.bfloat16), torch.empty_like(w_f8, dtype=torch.float32)


def _fp8_mm_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*output[1:])
    ctx.scales = inputs[2:]


def _fp8_mm_backward(ctx, grad_out, *_):
    grad_x, grad_w = torch.ops.nanogpt.fp8_mm_backward(grad_out, *ctx.saved_tensors, *ctx.scales)
    return grad_x, grad_w, None, None, None


fp8_mm.register_autograd(_fp8_mm_backward, setup_context=_fp8_mm_setup_context)


# -----------------------------------------------------------------------------
# Optimizers: Muon for the hidden matrices, Adam for embeddings, head and scalars (RECIPE §3(a)). Both shard their work
# across ranks and communicate in explicit phases (launch all reductions, update each shard, gather); at world size 1
# the communication steps are skipped and the same update code runs.

NEWTON_SCHULZ_COEFFS = (3.4445, -4.7750, 2.0315)  # quintic tuned to push singular values into ~[0.7, 1.2] fast
POLAR_EXPRESS_COEFFS = (  # one (a, b, c) per iteration, for 5 iterations (Amsel et al. 2025, RECIPE §3(b))
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)


def orthogonalize(G: Tensor, method: str, steps: int, dtype: torch.dtype) -> Tensor:
    """Approximates U V^T of G = U S V^T for each matrix in the batch G[..., rows, cols] with an odd polynomial."""
    X = G.to(dtype)
    transposed = X.size(-2) > X.size(-1)
    if transposed:  # iterate on the wide orientation: X X^T is then the smaller square
        X = X.mT
    if method == "newton_schulz":
        X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
        coeffs = [NEWTON_SCHULZ_COEFFS] * steps
    else:  # polar_express: a safety margin on the norm, then per-iteration optimal coefficients
        X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.02 + 1e-6)
        coeffs = POLAR_EXPRESS_COEFFS[:steps]
    for a, b, c in coeffs:
        A = X @ X.mT
        B = b * A + c * A @ A
        X = a * X + B @ X
    return X.mT if transposed else X



def normuon_normalize(V: Tensor, second_moment: Tensor, beta2: float) -> Tensor:
    """NorMuon (arXiv 2510.05491): give every neuron (row; column when the matrix is wide) the same update scale,
    using an EMA of its mean squared update, then restore the matrix's Frobenius norm. Updates second_moment."""
    V = V.float()
    dim = -1 if V.size(-2) >= V.size(-1) else -2
    second_moment.lerp_(V.square().mean(dim=dim, keepdim=True), 1 - beta2)
    norm = V.norm(dim=(-2, -1), keepdim=True)
    V = V * second_moment.clamp_min(1e-10).rsqrt()
    return V * (norm / V.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-10))


class Muon(torch.optim.Optimizer):
    """MomentUm Orthogonalized by Newton-Schulz (Jordan et al. 2024). Parameters of one shape form a group; rank r
    owns a contiguous share of each group: it receives that share's summed gradient (reduce-scatter), applies
    Nesterov momentum, orthogonalizes the share as one batch, updates it, and all-gathers the result."""

    def __init__(self, params, lr: float, momentum: float, weight_decay: float, orthogonalize, normuon_beta2,
                 grad_scale: float, rank: int = 0, world_size: int = 1):
        params = list(params)
        shapes = list(dict.fromkeys(p.shape for p in params))
        groups = [dict(params=[p for p in params if p.shape == s]) for s in shapes]
        super().__init__(groups, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))
        self.orthogonalize, self.normuon_beta2, self.grad_scale = orthogonalize, normuon_beta2, grad_scale
        self.rank, self.world_size = rank, world_size

    @torch.no_grad()
    def step(self):
        W, r = self.world_size, self.rank
        reduced = []
        for group in self.param_groups:  # phase 1: launch every reduction
            params = group["params"]
            share = -(-len(params) // W)
            grads = torch.stack([p.grad for p in params] + [torch.zeros_like(params[0])] * (share * W - len(params)))
            if W == 1:
                reduced.append((grads, None))
            else:
                mine = grads.new_empty(share, *grads.shape[1:])
                reduced.append((mine, dist.reduce_scatter_tensor(mine, grads, async_op=True)))
        gathers = []
        for group, (grads, handle) in zip(self.param_groups, reduced):  # phase 2: update my share, launch its gather
            if handle is not None:
                handle.wait()
            params = group["params"]
            share = grads.size(0)
            owned = params[r * share:(r + 1) * share]
            updated = torch.stack([p.data for p in owned] + [torch.zeros_like(params[0])] * (share - len(owned)))
            if owned:
                g = grads[:len(owned)].float() * self.grad_scale
                momentum = group["momentum"]
                bufs = [self.state[p].setdefault("momentum_buffer", torch.zeros_like(g[0])) for p in owned]
                for buf, g_i in zip(bufs, g):
                    buf.lerp_(g_i, 1 - momentum)
                g = g.lerp(torch.stack(bufs), momentum)  # Nesterov: look ahead along the momentum
                V = self.orthogonalize(g)
                if self.normuon_beta2 is not None:  # one statistic per row (tall) or per column (wide)
                    rows, cols = V.shape[-2:]
                    shape = (*V.shape[1:-2], rows, 1) if rows >= cols else (*V.shape[1:-2], 1, cols)
                    moments = [self.state[p].setdefault("second_moment", V.new_zeros(shape, dtype=torch.float32))
                               for p in owned]
                    stacked = torch.stack(moments)
                    V = normuon_normalize(V, stacked, self.normuon_beta2)
                    for m, s in zip(moments, stacked):
                        m.copy_(s)
                lr = group["lr"] * max(1, owned[0].size(-2) / owned[0].size(-1)) ** 0.5  # RMS of a tall update
                updated[:len(owned)].mul_(1 - group["lr"] * group["weight_decay"]).add_(V.to(updated.dtype), alpha=-lr)
            if W == 1:
                gathers.append((params, updated, None))
            else:
                full = updated.new_empty(share * W, *updated.shape[1:])
                gathers.append((params, full, dist.all_gather_into_tensor(full, updated, async_op=True)))
        for params, full, handle in gathers:  # phase 3: everyone receives every updated matrix
            if handle is not None:
                handle.wait()
            for p, new in zip(params, full):
                p.data.copy_(new)


class DistAdam(torch.optim.Optimizer):
    """Adam (Kingma & Ba, with torch.optim.Adam's bias correction), sharded by rows: rank r keeps state for and
    updates rows [r*n/W, (r+1)*n/W) of every tensor, then all ranks gather the updated rows."""

    def __init__(self, param_groups, lr: float, betas: tuple[float, float], eps: float, grad_scale: float,
                 rank: int = 0, world_size: int = 1):
        super().__init__(param_groups, dict(lr=lr, betas=betas, eps=eps))
        self.grad_scale, self.rank, self.world_size = grad_scale, rank, world_size

    @torch.no_grad()
    def step(self):
        W, r = self.world_size, self.rank
        work = [(group, p) for group in self.param_groups for p in group["params"]]
        reduced = []
        for _, p in work:  # phase 1
            if W == 1:
                reduced.append((p.grad, None))
            else:
                shard = p.grad.new_empty(p.size(0) // W, *p.shape[1:])
                reduced.append((shard, dist.reduce_scatter_tensor(shard, p.grad, async_op=True)))
        gathers = []
        for (group, p), (grad, handle) in zip(work, reduced):  # phase 2
            beta1, beta2 = group["betas"]
            if handle is not None:
                handle.wait()
            rows = p.size(0) // W
            p_shard = p.data[r * rows:(r + 1) * rows]
            state = self.state[p]
            if not state:
                state.update(step=0, exp_avg=torch.zeros_like(p_shard), exp_avg_sq=torch.zeros_like(p_shard))
            state["step"] += 1
            grad = grad * self.grad_scale
            state["exp_avg"].lerp_(grad, 1 - beta1)
            state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            bias_correction1, bias_correction2 = 1 - beta1 ** state["step"], 1 - beta2 ** state["step"]
            denom = (state["exp_avg_sq"].sqrt() / bias_correction2**0.5).add_(group["eps"])
            p_shard.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / bias_correction1)
            if W > 1:
                gathers.append(dist.all_gather_into_tensor(p.data, p_shard.clone(), async_op=True))
        for handle in gathers:  # phase 3
            handle.wait()


# -----------------------------------------------------------------------------
# Model (RECIPE §2(a)). A pure function of its Hyperparameters: no globals, no environment, no process group.


def norm(x: Tensor) -> Tensor:
    return F.rms_norm(x, (x.size(-1),))  # parameter-free RMSNorm, used for every norm in the model


class Rotary(nn.Module):
    """Half-truncated RoPE: head_dim/4 frequencies from 1 to 1/base rad/token rotate dims (j, j + head_dim/2) for
    j < head_dim/4; the other half of the pairs get frequency 0 and stay put, free for position-independent use."""

    def __init__(self, head_dim: int, base: float):
        super().__init__()
        n = head_dim // 4
        freqs = (1 / base) ** torch.linspace(0, 1, n, dtype=torch.float32)
        self.register_buffer("freqs", torch.cat([freqs, freqs.new_zeros(n)]), persistent=False)

    def forward(self, seq_len: int) -> tuple[Tensor, Tensor]:
        theta = torch.arange(seq_len, device=self.freqs.device, dtype=torch.float32)[:, None] * self.freqs
        return theta.cos()[None, :, None, :], theta.sin()[None, :, None, :]


def apply_rotary(x_BTHD: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    x1, x2 = x_BTHD.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1).type_as(x_BTHD)


def document_ids(input_seq: Tensor) -> Tensor:
    return (input_seq == BOS_ID).cumsum(0)  # every document starts with BOS


def may_attend(q_idx: Tensor, kv_idx: Tensor, docs: Tensor, window_blocks: Tensor, block_size: int) -> Tensor:
    """The attention rule: causal, within the document, and at most window_blocks - 1 mask blocks back."""
    near = q_idx // block_size - kv_idx // block_size < window_blocks
    return (q_idx >= kv_idx) & (docs[q_idx] == docs[kv_idx]) & near


def flex_block_mask(docs: Tensor, window_blocks: Tensor, block_size: int) -> BlockMask:
    """The same rule as block-sparse lists for FlexAttention: per query block, the KV blocks that are fully visible
    (no mask needed) and the partially visible ones (mask_mod decides per token). Built from block-level document
    ranges, which is much cheaper than evaluating the rule on every token pair."""
    n = docs.size(0) // block_size
    blocks = docs.view(n, block_size)
    first, last = blocks[:, 0], blocks[:, -1]
    q, kv = torch.arange(n, device=docs.device)[:, None], torch.arange(n, device=docs.device)[None, :]
    near = (kv <= q) & (q - kv < window_blocks)
    full = near & (kv < q) & (last[:, None] == first[None, :])  # both blocks lie inside one document
    partial = near & (first[:, None] <= last[None, :]) & ~full  # they share a document (docs are sorted)

    def as_lists(mask: Tensor) -> tuple[Tensor, Tensor]:
        indices = mask.to(torch.int8).argsort(dim=-1, descending=True, stable=True)
        return mask.sum(dim=-1, dtype=torch.int32)[None, None].contiguous(), indices.to(torch.int32)[None, None]

    def mask_mod(b, h, q_idx, kv_idx):
        return may_attend(q_idx, kv_idx, docs, window_blocks, block_size)

    return BlockMask.from_kv_blocks(*as_lists(partial), *as_lists(full), BLOCK_SIZE=block_size, mask_mod=mask_mod)


def flex_attend(q_BTHD: Tensor, k_BTHD: Tensor, v_BTHD: Tensor, mask: BlockMask, scale: float) -> Tensor:
    q, k, v = (t.transpose(1, 2) for t in (q_BTHD, k_BTHD, v_BTHD))
    # The compiled forward's tiles must divide the mask blocks; inductor's H100 defaults are up to 128 x 128 tokens.
    # Smaller blocks get square tiles of the largest power of two dividing them, at most 64 (tools/cuda_check.py).
    block = mask.BLOCK_SIZE[0]
    tile = min(64, block & -block)
    options = None if block % 128 == 0 else dict(fwd_BLOCK_M=tile, fwd_BLOCK_N=tile)
    return flex_attention(q, k, v, block_mask=mask, scale=scale, kernel_options=options).transpose(1, 2)


def dense_mask(docs: Tensor, window_blocks: Tensor, block_size: int) -> Tensor:
    idx = torch.arange(docs.size(0), device=docs.device)
    return may_attend(idx[:, None], idx[None, :], docs, window_blocks, block_size)


def dense_attend(q_BTHD: Tensor, k_BTHD: Tensor, v_BTHD: Tensor, mask: Tensor, scale: float) -> Tensor:
    """The reference twin of flex_attend: an explicit (T, T) mask and softmax. Memory grows as T^2: tests and CPU."""
    q, k, v = (t.transpose(1, 2) for t in (q_BTHD, k_BTHD, v_BTHD))
    scores = (q @ k.mT).float() * scale
    probs = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
    return (probs.type_as(v) @ v).transpose(1, 2)


class CausalSelfAttention(nn.Module):
    def __init__(self, args: Hyperparameters):
        super().__init__()
        self.num_heads, self.head_dim, self.scale = args.num_heads, args.head_dim, args.attn_scale
        bound = 3**0.5 * 0.5 * args.model_dim**-0.5  # uniform with std 0.5/sqrt(dim)
        self.qkvo_w = nn.Parameter(torch.empty(4, args.model_dim, args.model_dim).uniform_(-bound, bound))
        self.qkvo_w.data[3].zero_()  # zero-init output projection
        self.attn_gate = nn.Parameter(torch.zeros(args.num_heads, args.attn_gate_dim))  # gate 0.5 at init
        self.attend = flex_attend if args.use_flex_attention else dense_attend

    def forward(self, x: Tensor, ve: Tensor | None, sa_lambdas: Tensor, mask, cos: Tensor, sin: Tensor) -> Tensor:
        B, T = x.shape[:2]
        qkv = F.linear(x, self.qkvo_w[:3].flatten(end_dim=1).type_as(x))
        q, k, v = qkv.view(B, T, 3 * self.num_heads, self.head_dim).chunk(3, dim=-2)
        q, k = apply_rotary(norm(q), cos, sin), apply_rotary(norm(k), cos, sin)  # QK-norm
        v = sa_lambdas[0] * v + (sa_lambdas[1] * ve.view_as(v) if ve is not None else 0)
        y = self.attend(q, k, v, mask, self.scale)
        # sparse attention gate: each head is scaled by a sigmoid of the first attn_gate_dim input channels
        gate = torch.sigmoid(F.linear(x[..., :self.attn_gate.size(-1)], self.attn_gate.type_as(x)))
        y = (y * gate[..., None]).reshape(B, T, -1)
        return F.linear(y, self.qkvo_w[3].type_as(y))


class MLP(nn.Module):
    def __init__(self, args: Hyperparameters):
        super().__init__()
        bound = 3**0.5 * 0.5 * args.model_dim**-0.5
        # both stored as (model_dim, hidden) so that Muon handles them as one batch of equal shapes
        self.c_fc = nn.Parameter(torch.empty(args.model_dim, args.mlp_hidden).uniform_(-bound, bound))
        self.c_proj = nn.Parameter(torch.zeros(args.model_dim, args.mlp_hidden))  # zero-init output projection

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(F.relu(x @ self.c_fc.type_as(x)).square(), self.c_proj.type_as(x))  # ReLU^2


class Block(nn.Module):
    def __init__(self, args: Hyperparameters, has_attention: bool):
        super().__init__()
        self.attn = CausalSelfAttention(args) if has_attention else None
        self.mlp = MLP(args)

    def forward(self, x, x0, ve, lambdas, sa_lambdas, mask, cos, sin):
        x = lambdas[0] * x + lambdas[1] * x0  # x0 shortcut: every block sees the normed embedding
        if self.attn is not None:
            x = x + self.attn(norm(x), ve, sa_lambdas, mask, cos, sin)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    def __init__(self, args: Hyperparameters):
        super().__init__()
        self.args = args
        dtype = getattr(torch, args.dtype)
        self.embed = nn.Embedding(args.vocab_size, args.model_dim, dtype=dtype)
        self.value_embeds = nn.ModuleList(nn.Embedding(args.vocab_size, args.model_dim, dtype=dtype)
                                          for _ in range(args.value_embed_count))
        self.blocks = nn.ModuleList(Block(args, c != "-") for c in args.attn_pattern)
        self.rotary = Rotary(args.head_dim, args.rope_base)
        self.lm_head_w = nn.Parameter(torch.zeros(args.vocab_size, args.model_dim))  # zero-init, untied from embed
        L = args.num_layers
        self.scalars = nn.Parameter(torch.cat([
            torch.ones(L),  # U-Net skip weights (the first L//2 are used)
            torch.tensor([1.0, 0.0]).repeat(L),  # block lambdas: (residual, x0)
            torch.tensor([0.5, 0.5]).repeat(L),  # attention lambdas: (v, value embedding)
            torch.ones(args.num_scalars - 5 * L),  # padding, so that Adam can shard by rank
        ]))
        self.make_mask = flex_block_mask if args.use_flex_attention else dense_mask

    def forward(self, input_seq: Tensor, target_seq: Tensor, window_blocks: Tensor) -> Tensor:
        """Loss of one packed sequence: summed over tokens in training, mean in evaluation."""
        logits = self.logits(input_seq, window_blocks)
        return F.cross_entropy(logits, target_seq, reduction="sum" if self.training else "mean")

    def logits(self, input_seq: Tensor, window_blocks: Tensor) -> Tensor:
        """Soft-capped fp32 logits (T, vocab) of a packed sequence of documents, each starting with BOS."""
        args, L = self.args, self.args.num_layers
        docs = document_ids(input_seq)
        masks = {"L": self.make_mask(docs, window_blocks, args.block_size),  # short windows are half the long ones
                 "S": self.make_mask(docs, (window_blocks // 2).clamp_min(1), args.block_size), "-": None}
        cos, sin = self.rotary(input_seq.size(0))
        ves = [ve(input_seq)[None] for ve in self.value_embeds]
        skip_weights, lambdas, sa_lambdas = self.scalars[:L], self.scalars[L:3 * L], self.scalars[3 * L:5 * L]
        x = x0 = norm(self.embed(input_seq)[None])
        skips, num_skips = [], L // 2
        for i, block in enumerate(self.blocks):
            if i >= L - num_skips:  # U-Net: the second half receives the first half's outputs in reverse order
                x = x + skip_weights[i - (L - num_skips)] * skips.pop()
            ve = ves[int(args.value_embed_pattern[i])] if args.value_embed_pattern[i] != "-" else None
            x = block(x, x0, ve, lambdas[2 * i:2 * i + 2], sa_lambdas[2 * i:2 * i + 2], masks[args.attn_pattern[i]],
                      cos, sin)
            if i < num_skips:
                skips.append(x)
        x = norm(x).flatten(end_dim=1)
        if self.training and args.use_fp8:
            logits = fp8_mm(x, self.lm_head_w, args.fp8_x_scale, args.fp8_w_scale, args.fp8_grad_scale)[0]
        else:
            logits = F.linear(x, self.lm_head_w.type_as(x))
        cap = args.logit_softcap
        return cap * torch.sigmoid(logits.float() / (cap / 4))


# -----------------------------------------------------------------------------
# Data: the shard format (RECIPE §1.1), the one definition (data/ scripts import it from here), and the loaders.

SHARD_MAGIC, SHARD_VERSION = 20240520, 1
SHARD_HEADER_BYTES = 256 * 4  # 256 little-endian int32: magic, version, number of tokens, zeros
SHARD_HINT = ("HINT: fetch the FineWeb shards again with `python data/cached_fineweb10B.py`, or rebuild shards from "
              "text with `python data/tokenize_text.py`; `python data/shards.py inspect FILE` checks a file.")


class ShardError(ValueError):
    """A shard that is missing, truncated or not in the shard format; the message names the file and a fix."""


def read_shard_header(path: str | os.PathLike) -> int:
    """Validates a shard's header and file size; returns its number of tokens."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            header_bytes = f.read(SHARD_HEADER_BYTES)
        size = path.stat().st_size
    except OSError as e:
        raise ShardError(f"cannot read shard {path}: {e.strerror or e}. {SHARD_HINT}") from None
    if len(header_bytes) < SHARD_HEADER_BYTES:
        raise ShardError(f"shard {path} is only {size} bytes, shorter than its 1024-byte header. {SHARD_HINT}")
    header = np.frombuffer(header_bytes, dtype="<i4")
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


def load_shard(path: str | os.PathLike) -> torch.Tensor:
    """Reads a validated shard straight into a uint16 tensor, with no intermediate bytes object."""
    num_tokens = read_shard_header(path)
    tokens = torch.empty(num_tokens, dtype=torch.uint16)
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
    try:
        with tmp.open("wb") as f:
            f.write(header.tobytes())
            f.write(tokens.astype("<u2").tobytes())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # after a failed write (a full disk, say): no half file left behind


def find_shards(pattern: str) -> list[Path]:
    """Sorted shards matching pattern (relative to $DATA_PATH), every header checked before training starts."""
    full = pattern if os.path.isabs(pattern) else os.path.join(os.environ.get("DATA_PATH", "."), pattern)
    files = [Path(f) for f in sorted(glob.glob(full))]
    if not files:
        raise ShardError(f"no shards match {full!r}. HINT: `python data/cached_fineweb10B.py 9` downloads what the "
                         "speedrun needs; set DATA_PATH or --train_files/--val_files to use shards elsewhere, or try "
                         "--preset=smoke, which trains on the sample shards in data/sample/.")
    for f in files:
        read_shard_header(f)
    return files


def to_device(window: np.ndarray, device: torch.device) -> tuple[Tensor, Tensor]:
    """A window of L+1 tokens -> (inputs int32, targets int64), each of L tokens."""
    buf = torch.from_numpy(window.astype(np.int32)).to(device, non_blocking=True)
    return buf[:-1], buf[1:].to(torch.int64)


class TrainLoader:
    """BOS-aligned training windows (RECIPE §1.5). For every step all ranks compute the same plan: windows_per_step
    windows of seq_len+1 tokens, each starting at a BOS at least seq_len tokens after the previous start, so they hold
    whole documents back to back and end mid-document. Rank r's micro-step a reads window a*world_size + r, so every
    world size trains on the same windows. The next shard is read in the background while this one is used."""

    def __init__(self, files: list[Path], seq_len: int, windows_per_step: int, rank: int, world_size: int,
                 device: torch.device):
        self.files, self.seq_len, self.windows = files, seq_len, windows_per_step
        self.rank, self.world_size, self.device = rank, world_size, device
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        self.next_index, self.pending = 0, None
        self._next_shard()

    def _read(self, path: Path) -> tuple[np.ndarray, np.ndarray]:
        tokens = load_shard(path).numpy()
        return tokens, np.flatnonzero(tokens == BOS_ID)

    def _next_shard(self):
        if self.next_index >= len(self.files):
            raise ShardError(f"ran out of training data after {len(self.files)} shard(s) ({self.files[-1]}). HINT: "
                               "download more shards (python data/cached_fineweb10B.py N) or lower num_iterations.")
        pending = self.pending or self.executor.submit(self._read, self.files[self.next_index])
        self.tokens, self.bos = pending.result()
        self.next_index += 1
        self.pos = 0
        self.pending = (self.executor.submit(self._read, self.files[self.next_index])
                        if self.next_index < len(self.files) else None)

    def _plan(self) -> list[int] | None:
        starts, pos = [], self.pos
        for _ in range(self.windows):
            i = np.searchsorted(self.bos, pos)
            if i == len(self.bos) or self.bos[i] + self.seq_len + 1 > len(self.tokens):
                return None
            starts.append(int(self.bos[i]))
            pos = starts[-1] + self.seq_len
        self.pos = pos
        return starts

    def next_step(self) -> list[tuple[Tensor, Tensor]]:
        """This rank's (inputs, targets) for each micro-step of the next training step."""
        if self.pos + 2 * self.windows * self.seq_len + 1 >= len(self.tokens):  # the reference's rule for a new shard
            self._next_shard()
        while (starts := self._plan()) is None:  # documents too long to fit: plan again on the next shard
            self._next_shard()
        return [to_device(self.tokens[s:s + self.seq_len + 1], self.device) for s in starts[self.rank::self.world_size]]


def load_val_tokens(files: list[Path], num_tokens: int) -> np.ndarray:
    """The first num_tokens tokens of the validation shards, in order."""
    parts, need = [], num_tokens
    for f in files:
        take = min(need, read_shard_header(f))
        parts.append(np.fromfile(f, dtype="<u2", count=take, offset=SHARD_HEADER_BYTES))
        need -= take
        if need == 0:
            return np.concatenate(parts)
    raise ShardError(f"validation shards {[str(f) for f in files]} hold {num_tokens - need:,} tokens, but val_tokens "
                     f"needs {num_tokens:,} (val_tokens + 1 for the last target). HINT: lower --val_tokens.")


def val_windows(tokens: np.ndarray, seq_len: int, rank: int, world_size: int, device: torch.device):
    """Sequential, not BOS-aligned windows (RECIPE §1.4); rank r takes windows r, r + W, r + 2W, ..."""
    for k in range(rank, (len(tokens) - 1) // seq_len, world_size):
        yield to_device(tokens[k * seq_len:(k + 1) * seq_len + 1], device)


# -----------------------------------------------------------------------------
# Schedules: pure functions of the step.


def lr_multiplier(step: int, args: Hyperparameters) -> float:
    """Flat, then linear cooldown over the last cooldown_frac of training down to final_lr_frac."""
    x = step / args.num_iterations
    if args.cooldown_frac == 0 or x < 1 - args.cooldown_frac:
        return 1.0
    w = (1 - x) / args.cooldown_frac
    return w + (1 - w) * args.final_lr_frac


def muon_momentum(step: int, args: Hyperparameters) -> float:
    frac = min(step / args.muon_momentum_warmup_steps, 1) if args.muon_momentum_warmup_steps else 1
    return (1 - frac) * args.muon_momentum_start + frac * args.muon_momentum


def window_blocks(step: int, args: Hyperparameters) -> int:
    """Long attention window in mask blocks: grows linearly to max_window_tokens, rounded up, at least one block."""
    return max(1, -(-args.max_window_tokens * step // (args.num_iterations * args.block_size)))


# -----------------------------------------------------------------------------
# Training and evaluation


def build_optimizers(model: GPT, args: Hyperparameters, rt: Runtime) -> list[torch.optim.Optimizer]:
    """The optimizer table (RECIPE §3(a)): every parameter in exactly one row."""
    adam_rows = [  # (parameters, LR multiplier)
        ([model.embed.weight], args.embed_lr_mul),
        ([e.weight for e in model.value_embeds], args.value_embed_lr_mul),
        ([model.lm_head_w], args.head_lr_mul),
        ([model.scalars], args.scalar_lr_mul),
    ]
    muon_params = list(model.blocks.parameters())  # the hidden matrices (and the attention gates)
    covered = [p for params, _ in adam_rows for p in params] + muon_params
    assert len({id(p) for p in covered}) == len(covered) == len(list(model.parameters())), "optimizer table is off"
    grad_scale = 1 / args.windows_per_step  # gradients are summed over windows: this makes them the 8-GPU average
    ortho = lambda G: orthogonalize(G, args.orthogonalizer, args.orthogonalizer_steps, getattr(torch, args.dtype))
    if args.use_compile:
        ortho = torch.compile(ortho, dynamic=False, fullgraph=True)
    adam = DistAdam([dict(params=params, lr=args.adam_lr * mul, initial_lr=args.adam_lr * mul)
                     for params, mul in adam_rows], lr=args.adam_lr, betas=(args.adam_beta1, args.adam_beta2),
                    eps=args.adam_eps, grad_scale=grad_scale, rank=rt.rank, world_size=rt.world_size)
    muon = Muon(muon_params, lr=args.muon_lr, momentum=args.muon_momentum, weight_decay=args.muon_weight_decay,
                orthogonalize=ortho, normuon_beta2=args.normuon_beta2 if args.use_normuon else None,
                grad_scale=grad_scale, rank=rt.rank, world_size=rt.world_size)
    for group in muon.param_groups:
        group["initial_lr"] = args.muon_lr
    return [adam, muon]


def train_step(model, optimizers, batches, step: int, window: Tensor, args: Hyperparameters) -> float:
    """One optimizer step over this rank's micro-batches; returns the mean training loss per token (all ranks)."""
    loss_sum = torch.zeros((), device=window.device)
    for inputs, targets in batches:
        loss = model(inputs, targets, window)
        loss.backward()  # gradients accumulate as a sum; the optimizers scale and reduce them
        loss_sum += loss.detach()
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * lr_multiplier(step, args)
            if isinstance(opt, Muon):
                group["momentum"] = muon_momentum(step, args)
        opt.step()
    model.zero_grad(set_to_none=True)
    return all_reduce_sum(loss_sum).item() / (args.windows_per_step * args.train_seq_len)


@torch.no_grad()
def evaluate(model, val_tokens: np.ndarray, window: Tensor, args: Hyperparameters, rt: Runtime) -> float:
    model.eval()
    loss_sum = torch.zeros((), device=rt.device)
    for inputs, targets in val_windows(val_tokens, args.val_seq_len, rt.rank, rt.world_size, rt.device):
        loss_sum += model(inputs, targets, window)
    model.train()
    return all_reduce_sum(loss_sum).item() / (args.val_tokens // args.val_seq_len)


def peak_memory_line(device: torch.device) -> str:
    if device.type == "cuda":
        allocated, reserved = torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)
    else:  # a CPU has no allocator statistics: report the process's peak resident memory for both
        import resource

        allocated = reserved = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return f"peak memory allocated: {allocated // 2**20} MiB reserved: {reserved // 2**20} MiB"


def train(args: Hyperparameters, rt: Runtime, log: RunLog) -> dict:
    if rt.is_master:
        log(Path(__file__).read_text(), console=False)
        log("=" * 100, console=False)
        for line in describe_machine(rt.device):
            log(line, console=False)
        log("=" * 100, console=False)
    args, notes = adapt_to_device(args, rt.device)
    for note in notes:
        log(note)
    log("hyperparameters: " + json.dumps(dataclasses.asdict(args)), console=False)
    if rt.is_master:
        print(f"log: {log.path}  (world size {rt.world_size}, device {rt.device})", flush=True)

    train_files, val_files = find_shards(args.train_files), find_shards(args.val_files)
    tokens_per_step = args.windows_per_step * args.train_seq_len
    available = sum(read_shard_header(f) for f in train_files)
    if available < args.num_iterations * tokens_per_step:
        raise ShardError(f"the training shards hold {available:,} tokens but {args.num_iterations} steps need at "
                         f"least {args.num_iterations * tokens_per_step:,}. HINT: download more shards "
                         "(python data/cached_fineweb10B.py N) or lower --num_iterations.")
    val_tokens = load_val_tokens(val_files, args.val_tokens + 1)

    torch.manual_seed(args.seed)
    model = GPT(args).to(rt.device)  # built on the CPU from the seed: the same weights on every rank and machine
    optimizers = build_optimizers(model, args, rt)
    window = torch.ones((), dtype=torch.int64, device=rt.device)  # a tensor, so a new size does not recompile
    step_model = torch.compile(model, dynamic=False, fullgraph=True) if args.use_compile else model
    new_loader = lambda: TrainLoader(train_files, args.train_seq_len, args.windows_per_step, rt.rank,
                                     rt.world_size, rt.device)

    # Untimed warm-up: compile and run real steps, then restore the initial weights, optimizer state and data order.
    if args.warmup_steps:
        initial_state = copy.deepcopy((model.state_dict(), [opt.state_dict() for opt in optimizers]))
        loader = new_loader()
        for step in range(args.warmup_steps):
            train_step(step_model, optimizers, loader.next_step(), step, window.fill_(window_blocks(step, args)), args)
        model.load_state_dict(initial_state[0])
        for opt, state in zip(optimizers, initial_state[1]):
            opt.load_state_dict(state)
        log(f"warm-up: {args.warmup_steps} untimed steps, then the initial model and optimizer state restored")

    loader = new_loader()
    synchronize = torch.cuda.synchronize if rt.device.type == "cuda" else lambda: None
    training_time_ms, val_losses = 0.0, {}
    synchronize()
    t0 = time.perf_counter()
    for step in range(args.num_iterations + 1):
        last_step = step == args.num_iterations
        window.fill_(window_blocks(step, args))
        if last_step or step % (args.val_every or args.num_iterations) == 0:
            synchronize()
            training_time_ms += 1000 * (time.perf_counter() - t0)  # the clock stops during validation
            val_losses[step] = val_loss = evaluate(step_model, val_tokens, window, args, rt)
            log(f"step:{step}/{args.num_iterations} val_loss:{val_loss:.4f} train_time:{training_time_ms:.0f}ms "
                f"step_avg:{training_time_ms / max(step, 1):.2f}ms")
            if not math.isfinite(val_loss):
                raise FloatingPointError(f"validation loss is {val_loss} at step {step}. {NAN_HINT}")
            synchronize()
            t0 = time.perf_counter()
        if last_step:
            break
        train_loss = train_step(step_model, optimizers, loader.next_step(), step, window, args)
        elapsed_ms = training_time_ms + 1000 * (time.perf_counter() - t0)
        log(f"step:{step + 1}/{args.num_iterations} train_time:{elapsed_ms:.0f}ms "
            f"step_avg:{elapsed_ms / (step + 1):.2f}ms train_loss:{train_loss:.4f}")
        if not math.isfinite(train_loss):
            raise FloatingPointError(f"training loss is {train_loss} at step {step + 1}. {NAN_HINT}")
    log(peak_memory_line(rt.device))
    return dict(val_loss=val_losses[args.num_iterations], val_losses=val_losses, train_time_ms=training_time_ms,
                steps=args.num_iterations, log_path=str(log.path) if log.path else None)


NAN_HINT = "HINT: lower the learning rates, or check the data with `python data/shards.py inspect`"


def main(argv: list[str] | None = None) -> dict:
    """Trains with the given settings (command-line style); returns the final metrics. Whatever stops a run early
    (bad data, a NaN loss, Ctrl-C) is written as the last line of its log."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    rt = setup_runtime(args)
    log_dir = Path(args.log_dir) if args.log_dir else Path(__file__).resolve().parent / "records" / "logs"
    log = RunLog(log_dir / f"{args.run_id or uuid.uuid4()}.txt" if rt.is_master else None)
    try:
        return train(args, rt, log)
    except (ValueError, FloatingPointError) as e:
        log(f"stopped: {e}", console=False)
        raise
    except KeyboardInterrupt:
        log("stopped: interrupted")
        raise
    finally:
        log.close()


if __name__ == "__main__":
    if "--help" in sys.argv[1:] or "-h" in sys.argv[1:]:
        print(usage())
        sys.exit(0)
    try:
        main()
    except (ValueError, FloatingPointError) as e:  # bad settings or data, NaN: a message, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
