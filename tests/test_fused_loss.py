"""The fused soft-capped loss (train_gpt's Triton kernel softcap_loss_kernel, forward and backward)
against its plain PyTorch twin, prediction_loss of softcap(z), run by Triton's interpreter on the CPU.

Triton decides at import whether its kernels are interpreted (TRITON_INTERPRET=1), so the kernel checks run in a child
pytest process that sets it before anything imports triton; the parent's one test starts the child and shows its
failures. The loss and the gradient with respect to the raw head output are compared in fp32 and bf16 at a vocab that
is one partial tile (1,000), several tiles with a tail (5,000; 50,304, the speedrun's), odd sequence lengths, 1 to 3
predicted tokens (the last positions of the window lack the later ones), prefixes with -1 (none) among them, the
sigmoid (2026), tanh (one-A100) and algebraic (the optimization track) soft-caps and none (GPT-2). With the FP8 head
in the same op (fp8_head_loss), the kernel writes the head's gradient in e5m2: checked against the fp32 gradient
divided by the gradient scale and rounded once, with the interpreter corrected to round as the GPU does
(tests/triton_interpreter.py)."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton (requirements.txt)")
import triton_interpreter  # noqa: E402  (in the child process: corrects the interpreter before train_gpt loads)
from triton_interpreter import INTERPRETED  # noqa: E402

import train_gpt as tg  # noqa: E402

SOFTCAPS = {"sigmoid": (23.0, "sigmoid", 5.0, 7.5), "tanh": (30.0, "tanh", 0.0, 30.0), "none": (0.0, "sigmoid", 0, 1),
            "algebraic": (15.0, "algebraic", 0.5, 15.0)}


@pytest.mark.skipif(INTERPRETED, reason="this is the child process")
def test_the_kernels_match_the_plain_loss_under_the_triton_interpreter():
    triton_interpreter.run_child(__file__, passed=len(CASES) + 4, skipped=2)  # this test and the GPU one skip there


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
    (131, 3000, 2, True, "sigmoid", torch.bfloat16),  # the backward's 64-row blocks: two whole, one partial
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


def head_inputs(T: int = 37, D: int = 128, V: int = 1000, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x, w = torch.randn(T, D, generator=gen).bfloat16(), (torch.randn(V, D, generator=gen) * 0.05).bfloat16()
    return x, w, torch.randint(0, V, (T,), generator=gen)


FP8_SCALES = (100 / 448, 1.6 / 448, 0.75 / 448)  # the speedrun's x_s, w_s, grad_s


@pytest.mark.skipif(not INTERPRETED, reason="runs in the child process (TRITON_INTERPRET=1)")
def test_the_loss_kernel_writes_the_gradient_in_e5m2_rounded_once():
    """dloss/dz / grad_s computed in fp32 and rounded once to e5m2, not rounded to bf16 first; the kernel's
    column-major copy (the FP8 head's weight gradient reads it) holds the same values at every position."""
    gen = torch.Generator().manual_seed(3)
    z = (torch.randn(29, 5000, generator=gen) * 8).bfloat16()
    targets = torch.randint(-1, 5000, (29, 3), generator=gen).int()
    weights, g = torch.tensor([1.0, 0.5, 0.25]), torch.rand(29, generator=gen)
    _, lse = tg.softcap_loss(z, targets, weights, *SOFTCAPS["sigmoid"])
    grads = [torch.empty_like(z, dtype=dtype) for dtype in (torch.float32, torch.float8_e5m2)]
    cols = torch.full(z.T.shape, 7, dtype=torch.uint8).view(torch.float8_e5m2).T  # column-major, 7: never written
    for out, grad_s in zip(grads, (1.0, FP8_SCALES[2])):
        tg.softcap_loss_launch(z, targets, weights, out, lse, g, *SOFTCAPS["sigmoid"], grad_s=grad_s,
                               cols=cols if out.dtype == torch.float8_e5m2 else None)
    expected = (grads[0] / FP8_SCALES[2]).to(torch.float8_e5m2)
    assert torch.equal(grads[1].view(torch.uint8), expected.view(torch.uint8))
    assert cols.stride() == (1, 29) and torch.equal(cols.view(torch.uint8), expected.view(torch.uint8))  # both layouts
    assert (expected.float() != (grads[0].bfloat16().float() / FP8_SCALES[2]).to(torch.float8_e5m2).float()).any()


@pytest.mark.skipif(not INTERPRETED, reason="runs in the child process (TRITON_INTERPRET=1)")
def test_the_fp8_head_and_the_loss_in_one_op_equal_the_two_ops():
    """fp8_head_loss: the loss of fp8_mm's z, bit for bit; the gradients of x and w are fp8_mm_backward's from the
    e5m2 gradient rounded once, and within FP8's error of the two ops' (which round it to bf16 first)."""
    x0, w0, target_seq = head_inputs()
    weights = torch.tensor([1.0, 0.5, 0.25, 0.3])
    results = []
    for fp8_head in (False, True):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        z = x if fp8_head else tg.fp8_mm(x, w, *FP8_SCALES)[0]
        loss = tg.fused_prediction_loss(z, target_seq, weights, 3, None, SOFTCAPS["sigmoid"],
                                        (w, *FP8_SCALES) if fp8_head else None)
        (0.75 * loss).backward()
        results.append((loss.detach(), x.grad, w.grad))
    (loss, grad_x, grad_w), (loss_1, grad_x_1, grad_w_1) = results
    assert torch.equal(loss_1, loss)
    z, x_f8, w_f8 = tg.fp8_mm(x0, w0, *FP8_SCALES)
    ahead = [torch.cat([target_seq[k:], target_seq.new_full((k,), -1)]) for k in range(3)]
    targets = torch.stack(ahead, dim=1).int()
    _, lse = tg.softcap_loss(z, targets, weights[:3], *SOFTCAPS["sigmoid"])
    grad_z = torch.empty_like(z, dtype=torch.float32)
    tg.softcap_loss_launch(z, targets, weights[:3], grad_z, lse, torch.full((len(z),), 0.75), *SOFTCAPS["sigmoid"])
    g_f8 = (grad_z / FP8_SCALES[2]).to(torch.float8_e5m2)
    expected = tg.fp8_mm_backward(g_f8, g_f8.T.contiguous().T, x_f8, w_f8, *FP8_SCALES, w0.dtype)
    assert torch.equal(grad_x_1, expected[0]) and torch.equal(grad_w_1, expected[1])
    for ours, twin in ((grad_x_1, grad_x), (grad_w_1, grad_w)):
        torch.testing.assert_close(ours.float(), twin.float(), rtol=0.1, atol=0.02 * twin.float().abs().max().item())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRETED, reason="needs a CUDA GPU")
def test_gpu_the_fp8_head_and_loss_op_matches_the_plain_loss_of_the_fp8_head():
    """On a GPU, eager and compiled: fp8_head_loss against fp8_mm followed by the plain soft-capped loss."""
    x0, w0, target_seq = (t.cuda() for t in head_inputs(T=1024, D=768, V=50304))
    weights = torch.tensor([1.0, 0.5, 0.25, 0.3], device="cuda")
    results = []
    for fused in (False, True, "compiled"):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        if fused:
            loss_fn = tg.fused_prediction_loss if fused is True else torch.compile(tg.fused_prediction_loss)
            loss = loss_fn(x, target_seq, weights, 3, None, SOFTCAPS["sigmoid"], (w, *FP8_SCALES))
        else:
            z = tg.softcap(tg.fp8_mm(x, w, *FP8_SCALES)[0], *SOFTCAPS["sigmoid"])
            loss = tg.prediction_loss(z, target_seq, weights, 3, None)
        loss.backward()
        results.append((loss.detach(), x.grad, w.grad))
    for loss, grad_x, grad_w in results[1:]:
        torch.testing.assert_close(loss, results[0][0], rtol=1e-4, atol=0)
        for ours, plain in ((grad_x, results[0][1]), (grad_w, results[0][2])):
            torch.testing.assert_close(ours.float(), plain.float(), rtol=0.1, atol=0.02 * plain.float().abs().max())
