"""The fused soft-capped loss (train_gpt's Triton kernels softcap_loss_kernel and softcap_loss_backward_kernel)
against its plain PyTorch twin, prediction_loss of softcap(z), run by Triton's interpreter on the CPU.

Triton decides at import whether its kernels are interpreted (TRITON_INTERPRET=1), so the kernel checks run in a child
pytest process that sets it before anything imports triton; the parent's one test starts the child and shows its
failures. The loss and the gradient with respect to the raw head output are compared in fp32 and bf16 at a vocab that
is one partial tile (1,000), several tiles with a tail (5,000; 50,304, the speedrun's), odd sequence lengths, 1 to 3
predicted tokens (the last positions of the window lack the later ones), prefixes with -1 (none) among them, the
sigmoid (2026), tanh (one-A100) and algebraic (the optimization track) soft-caps and none (GPT-2)."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import train_gpt as tg  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton (requirements.txt)")
SOFTCAPS = {"sigmoid": (23.0, "sigmoid", 5.0, 7.5), "tanh": (30.0, "tanh", 0.0, 30.0), "none": (0.0, "sigmoid", 0, 1),
            "algebraic": (15.0, "algebraic", 0.5, 15.0)}


@pytest.mark.skipif(INTERPRETED, reason="this is the child process")
def test_the_kernels_match_the_plain_loss_under_the_triton_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                             __file__], env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0 and " passed" in result.stdout, result.stdout[-6000:] + result.stderr[-3000:]
    summary = result.stdout.strip().splitlines()[-1]  # every check ran; only this test skipped itself there
    assert summary.startswith(f"{len(CASES) + 2} passed, 1 skipped in "), result.stdout[-2000:]


def test_the_model_on_a_cpu_runs_the_plain_twin():
    """fused_loss is on by default, but a CPU tensor takes the plain soft-cap and loss: the same function."""
    args = tg.parse_args(["--preset=smoke", "--fused_loss=true"])
    model = tg.GPT(args).train()
    tokens = torch.randint(0, 50257, (args.seq_lens[0] + 1,), generator=torch.Generator().manual_seed(0))
    loss = model(tokens[:-1], tokens[1:])
    z = model.head(model.hidden(tokens[:-1]), capped=False)
    expected = tg.prediction_loss(tg.softcap(z, *model.softcap_args), tokens[1:], model.loss_weights, 1, None)
    assert torch.equal(loss, expected)


def plain_and_fused(T: int, V: int, predictions: int, prefix: bool, softcap: str, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    z = (torch.randn(T, V, generator=gen) * 8).to(dtype)  # soft-capped logits spread over most of the cap
    targets = torch.randint(0, V, (T,), generator=gen)
    prefixes = torch.where(torch.rand(T, generator=gen) < 0.4, -1, torch.randint(0, V, (T,), generator=gen)) \
        if prefix else None
    weights = torch.tensor([1.0, 0.5, 0.25, 0.2][:predictions] + [0.3])  # the prefix weight after the predictions
    results = []
    for fused in (False, True):
        z_ = z.clone().requires_grad_()
        if fused:
            loss = tg.fused_prediction_loss(z_, targets, weights, predictions, prefixes, SOFTCAPS[softcap])
        else:
            loss = tg.prediction_loss(tg.softcap(z_, *SOFTCAPS[softcap]), targets, weights, predictions, prefixes)
        (0.75 * loss).backward()  # an upstream gradient other than 1
        results.append((loss.detach(), z_.grad))
    return results


CASES = [  # T, V, predictions, prefix, softcap, dtype
    (37, 1000, 1, False, "sigmoid", torch.float32),
    (37, 1000, 3, True, "sigmoid", torch.bfloat16),
    (29, 5000, 2, True, "tanh", torch.float32),
    (23, 5000, 3, False, "tanh", torch.bfloat16),
    (11, 50304, 3, True, "sigmoid", torch.float32),
    (7, 50304, 3, True, "sigmoid", torch.bfloat16),
    (19, 3000, 2, True, "none", torch.float32),
    (13, 5000, 1, False, "algebraic", torch.float32),  # the optimization track's (offset 0 there; 0.5 tests it)
    (13, 5000, 1, False, "algebraic", torch.bfloat16),
    (2, 1000, 3, True, "sigmoid", torch.float32),  # shorter than the predictions: the third token is never there
]


@pytest.mark.skipif(not INTERPRETED, reason="runs in the child process (TRITON_INTERPRET=1)")
@pytest.mark.parametrize("T,V,predictions,prefix,softcap,dtype", CASES)
def test_fused_loss_and_gradient_equal_the_plain_twin(T, V, predictions, prefix, softcap, dtype):
    (plain, plain_grad), (fused, fused_grad) = plain_and_fused(T, V, predictions, prefix, softcap, dtype)
    assert fused_grad.dtype == dtype and fused_grad.shape == (T, V)
    torch.testing.assert_close(fused, plain, rtol=2e-6, atol=1e-4)
    # element by element; in bf16 the two may round the same fp32 value apart by one unit in the last place
    torch.testing.assert_close(fused_grad.float(), plain_grad.float(), rtol=1e-4 if dtype == torch.float32 else 2**-7,
                               atol=1e-6 * plain_grad.float().abs().max().item())


@pytest.mark.skipif(not INTERPRETED, reason="runs in the child process (TRITON_INTERPRET=1)")
def test_a_term_absent_at_a_row_is_in_neither_its_loss_nor_its_gradient():
    """At the window's last row only the next token is predicted: its gradient is the plain CE's, softmax - onehot
    (times the soft-cap's slope), whatever the weights of the later tokens (record #89's kernel adds them there)."""
    T, V = 5, 1000
    (_, _), (_, grad) = plain_and_fused(T, V, 3, False, "sigmoid", torch.float32)
    gen = torch.Generator().manual_seed(0)  # plain_and_fused's z and targets
    z, targets = torch.randn(T, V, generator=gen) * 8, torch.randint(0, V, (T,), generator=gen)
    last = z[-1:].clone().requires_grad_()
    (0.75 * F.cross_entropy(tg.softcap(last, *SOFTCAPS["sigmoid"]), targets[-1:], reduction="sum")).backward()
    torch.testing.assert_close(grad[-1:], last.grad, rtol=1e-5, atol=1e-7)
