"""sample.py: text from a trained model, read from a training checkpoint or a folder written by export.py.

    python sample.py --checkpoint=records/checkpoints/<run_id>/step_<N> --prompt="The capital of France is"
    python sample.py --checkpoint=DIR --max_new_tokens=200 --temperature=0.8 --top_k=200 --seed=1 --num_samples=3

    from sample import generate, load
    model = load("DIR")                                  # train_gpt.load_model, on the GPU when there is one
    new_tokens = generate(model, prompt_tokens, max_new_tokens=50, temperature=0.8, top_k=200, seed=0)

The prompt is a document: BOS (<|endoftext|>), then the prompt's GPT-2 tokens (tiktoken, offline). Generation stops
after max_new_tokens, or when the model ends the document with <|endoftext|>.

No KV cache: every new token runs the model over the whole context again (padded to a whole attention block), and only
the last position goes through the LM head (4-8x cheaper than the head over every position). Measured per new token on
one CPU thread (2-core machine, torch 2.13, fp32): the smoke model 11 ms with a 64-token context, 66 ms at its 512-token
limit (57 tokens/s generating 100 tokens, 29 tokens/s generating 500); the full 2026-08 model (636M parameters with its
embedding tables) 0.25 s at 128 tokens, 0.96 s at 512, 8.3 s at its 2,048-token limit. A cache would make each token
cost one forward of that token: no less than ~11 ms for smoke (1.4x faster at 128 tokens, 6x at 512), an estimated
20-30 ms for the full model on a CPU (10x at 128 tokens, far more at 2,048). On a GPU the eager forward is bound by
its kernel launches (784 operations per forward counted for the 6-layer smoke model), cached or not, so a cache would
buy little there (estimated; no GPU was at hand). And it would need a step-by-step twin of GPT.hidden for paired
heads, key offset, DC, XSA, MUDD, the bigram hash and smear, kept in step with the model. So: no cache for now.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # Ctrl-C while torch and the model load is our line too, not a traceback from an import
    signal.signal(signal.SIGINT, lambda *_: (print("stopped: interrupted", file=sys.stderr), os._exit(130)))

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent
sys.path[:0] = [str(ROOT), str(ROOT / "data")]
from gpt2_tokenizer import get_encoding  # noqa: E402

import cli_parser  # noqa: E402
import train_gpt  # noqa: E402

GPT2_VOCAB = 50257  # real GPT-2 tokens; the model's rows 50257..50303 are padding and are never sampled
BOS = train_gpt.BOS_ID
SAMPLE_PROMPTS = ("", "The capital of France is", "Once upon a time,")  # the trainer's end-of-run samples


# -----------------------------------------------------------------------------
# Loading


def resolve_checkpoint(path: str | Path) -> Path:
    """The folder holding a saved model: `path` itself, or, for a run's checkpoint folder, its latest step_<N>."""
    path = Path(path)
    if path.is_file():
        raise ValueError(f"{path} is a file: give the folder that holds it ({path.parent}), a checkpoint folder "
                         "(records/checkpoints/<run_id>/step_<N>) or a folder written by export.py")
    if (path / train_gpt.MODEL_FILE).is_file():
        return path
    steps = sorted((p for p in path.glob("step_*") if (p / train_gpt.MODEL_FILE).is_file() and
                    p.name[5:].isdigit()), key=lambda p: int(p.name[5:]))
    if steps:
        return steps[-1]
    if not path.exists():
        raise ValueError(f"{path}: no such folder. HINT: give a checkpoint folder (records/checkpoints/<run_id>/"
                         "step_<N>), a run's checkpoint folder, or a folder written by export.py")
    return path  # load_model says what is missing


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device={device} but no CUDA GPU is visible. HINT: use --device=cpu (or auto)")
    try:
        return torch.device(device)
    except RuntimeError:  # torch's list of every device type it knows
        raise ValueError(f"--device={device} is not a device. HINT: use cpu, cuda, cuda:N or auto") from None


def load(checkpoint: str | Path, device: str = "auto") -> train_gpt.GPT:
    """train_gpt.load_model on the chosen device: evaluation mode, the final validation's attention windows."""
    return train_gpt.load_model(resolve_checkpoint(checkpoint), pick_device(device))


# -----------------------------------------------------------------------------
# Generation


def max_context(args: train_gpt.Hyperparameters) -> int:
    """Tokens of context the model sees when generating: its longest attention window at the final validation, and no
    more than the longest document it was trained on (the 2026-08 recipe cuts documents at max_doc_len)."""
    plan = train_gpt.plan_step(args.num_iterations + args.extension_iterations, args)
    tokens = plan.window_long * args.block_size
    doc_lens = args.per_stage("max_doc_len", int)
    return min(tokens, doc_lens[-1]) if doc_lens else tokens


@torch.no_grad()
def next_token_logits(model: train_gpt.GPT, context: list[int]) -> torch.Tensor:
    """fp32 logits (GPT2_VOCAB,) of the token after `context` (a document starting with BOS), on the CPU.
    Equal to model.logits(...)[len(context) - 1]: the sequence is padded to a whole number of attention blocks (causal
    attention: padding after the last token changes nothing before it), and only the last row goes through the head."""
    n, block = len(context), model.args.block_size
    device = next(model.parameters()).device
    seq = torch.full((-(-n // block) * block,), BOS, dtype=torch.int64)
    seq[:n] = torch.tensor(context, dtype=torch.int64)
    x = model.hidden(seq.to(device))
    return model.head(x[n - 1:n])[0, :GPT2_VOCAB].float().cpu()


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator) -> int:
    """One token id from logits (V,): greedy when temperature is 0, else softmax(logits / temperature) restricted to
    the top_k most likely tokens (None or 0: all)."""
    if temperature == 0:
        return int(logits.argmax())
    scaled = logits / temperature
    logits = scaled if scaled.isfinite().all() else (logits.double() - logits.max()) / temperature  # tiny: ~greedy
    if top_k and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return int(torch.multinomial(logits.softmax(dim=-1), 1, generator=generator))


def check_sampling(temperature: float, top_k: int | None):
    if not (math.isfinite(temperature) and temperature >= 0):  # NaN passes no comparison: finite first
        raise ValueError(f"temperature={temperature} must be a finite number >= 0 (0: always the most likely token)"
                         ". HINT: e.g. --temperature=0.8")
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k={top_k} must be >= 0 (0: no limit). HINT: e.g. --top_k=200")


def generate(model: train_gpt.GPT, prompt: list[int], max_new_tokens: int, temperature: float = 0.8,
             top_k: int | None = 200, seed: int = 0, stop_at_end: bool = True) -> list[int]:
    """New token ids after `prompt` (GPT-2 token ids; BOS is put in front). The same seed gives the same tokens on the
    same device: sampling runs on the CPU from its own generator, whatever device the model is on. With stop_at_end,
    generation stops when the model ends the document (<|endoftext|>, not returned)."""
    check_sampling(temperature, top_k)
    if any(not 0 <= t < GPT2_VOCAB for t in prompt):
        raise ValueError("prompt holds ids outside GPT-2's vocabulary (0..50256)")
    generator = torch.Generator().manual_seed(seed)
    limit = max_context(model.args)
    tokens, new = [BOS, *prompt], []
    for _ in range(max_new_tokens):
        # Longer than the model's context: keep the last limit - 1 tokens, as a document that starts with BOS.
        context = tokens if len(tokens) <= limit else [BOS, *tokens[len(tokens) - limit + 1:]]
        token = sample_next(next_token_logits(model, context), temperature, top_k, generator)
        if token == BOS and stop_at_end:
            break
        tokens.append(token)
        new.append(token)
    return new


def log_samples(model: train_gpt.GPT, max_new_tokens: int, log) -> None:
    """The trainer's end-of-run samples: one per SAMPLE_PROMPTS entry, each logged as one JSON-quoted line (a sample
    that reads 'step:...' must not look like a step line to records/compare.py)."""
    was_training = model.training
    model.eval()
    try:
        enc = get_encoding()
        for i, prompt in enumerate(SAMPLE_PROMPTS):
            tokens = generate(model, enc.encode_ordinary(prompt), max_new_tokens, seed=i)
            log(f"sample {i}: {json.dumps(prompt + enc.decode(tokens))}")
    finally:
        model.train(was_training)


# -----------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = cli_parser.ArgumentParser(prog="sample.py", description="Print text sampled from a trained model.")
    parser.add_argument("--checkpoint", required=True, metavar="PATH",
                        help="a checkpoint folder (records/checkpoints/<run_id>/step_<N>), a run's checkpoint folder "
                             "(its latest step) or a folder written by export.py")
    parser.add_argument("--prompt", default="", help="text the samples continue (default: none, a new document)")
    parser.add_argument("--max_new_tokens", type=int, default=100, help="tokens per sample (default: %(default)s)")
    parser.add_argument("--temperature", type=float, default=0.8,
                        help="softmax temperature; 0: always the most likely token (default: %(default)s)")
    parser.add_argument("--top_k", type=int, default=200,
                        help="sample among the k most likely tokens; 0: all (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="sample i uses seed + i (default: %(default)s)")
    parser.add_argument("--num_samples", type=int, default=1, help="samples to print (default: %(default)s)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    if __name__ == "__main__":  # loaded: Ctrl-C is a KeyboardInterrupt again, caught below
        signal.signal(signal.SIGINT, signal.default_int_handler)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1 or args.num_samples < 1:
        parser.error("--max_new_tokens and --num_samples must be at least 1")
    try:
        check_sampling(args.temperature, args.top_k)  # before loading the model
        model = load(args.checkpoint, args.device)
        enc = get_encoding()
        prompt = enc.encode_ordinary(args.prompt)
        for i in range(args.num_samples):
            t0 = time.perf_counter()
            tokens = generate(model, prompt, args.max_new_tokens, args.temperature, args.top_k, args.seed + i)
            seconds = time.perf_counter() - t0
            if i:
                print("-" * 40)
            print(args.prompt + enc.decode(tokens), flush=True)
            print(f"[{len(tokens)} tokens in {seconds:.1f} s, {len(tokens) / max(seconds, 1e-9):.1f} tokens/s on "
                  f"{next(model.parameters()).device}]", file=sys.stderr)
    except (ValueError, RuntimeError, OSError) as e:
        print(f"sample.py: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("stopped: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
