"""The fused FP8 MLP (train_gpt's Triton kernel mlp_matmul_kernel, --fused_mlp) against its twin, the unfused ops of
mlp_fp8 (torch._scaled_mm, relu^2, the e4m3 cast and amax as separate kernels; the backward's matmul, then
2 sqrt(post)), run by Triton's interpreter on the CPU.

As in test_fused_loss.py, the kernel checks run in a child pytest process that sets TRITON_INTERPRET=1 before anything
imports triton, with the interpreter corrected to round as the GPU does (tests/triton_interpreter.py). Shapes: one
tile; a row count that is not a multiple of the 128-row tile with more row tiles than one group of 8 (the grouped tile
order's last, short group); a hidden width and a model width that are not multiples of their tiles (256 columns, 64
or 128 of K); the speedrun's model and hidden widths."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton (requirements.txt)")
import triton_interpreter  # noqa: E402  (in the child process: corrects the interpreter before train_gpt loads)
from triton_interpreter import INTERPRETED  # noqa: E402

import train_gpt as tg  # noqa: E402

SHAPES = [(128, 128, 256), (1040, 80, 272), (48, 768, 3072)]  # T, D, H


@pytest.mark.skipif(INTERPRETED, reason="this is the child process")
def test_the_kernel_matches_the_unfused_ops_under_the_triton_interpreter():
    triton_interpreter.run_child(__file__, passed=3 * len(SHAPES) + 1, skipped=1)  # this test skips there


def inputs(T: int, D: int, H: int, seed: int = 0):
    """A normed bf16 input, c_fc at its init distribution, a nonzero c_proj, and an upstream gradient."""
    gen = torch.Generator().manual_seed(seed)
    x = tg.norm(torch.randn(T, D, generator=gen)).bfloat16()
    c_fc = (torch.rand(D, H, generator=gen) * 2 - 1) * 3**0.5 * 0.5 * D**-0.5
    return x, c_fc, torch.randn(D, H, generator=gen) * 0.02, torch.randn(T, D, generator=gen).bfloat16()


def assert_nearly_equal(ours: torch.Tensor, ref: torch.Tensor, share: float = 1e-3):
    """Equal but for a few elements (at most `share` of them) whose product was rounded to bf16 one unit apart (1/128 at
    worst, 1/64 once squared; more where the sum cancels to almost nothing): the kernel and the twin sum the same
    products in another order (and the twin's CPU _scaled_mm scales its inputs, cuBLAS and the kernel the sum)."""
    assert ours.dtype == ref.dtype and ours.shape == ref.shape
    assert (ours != ref).float().mean().item() <= share, (ours != ref).float().mean().item()
    torch.testing.assert_close(ours.float(), ref.float(), rtol=2**-6 + 2**-8, atol=2**-20 * ref.abs().max().item())


@pytest.mark.skipif(not INTERPRETED, reason="runs in the child process (TRITON_INTERPRET=1)")
def test_the_corrected_interpreter_rounds_as_the_gpu_does():
    import triton
    import triton.language as tl

    @triton.jit
    def narrow(src, dst, N: tl.constexpr):
        i = tl.arange(0, N)
        tl.store(dst + i, tl.load(src + i).to(dst.dtype.element_ty))

    x = torch.linspace(-8, 8, 256)
    for dtype in (torch.float8_e4m3fn, torch.float8_e5m2, torch.bfloat16):
        out = torch.empty(256, dtype=dtype)
        narrow[(1,)](x, out, 256)
        assert torch.equal(out.float(), x.to(dtype).float()), dtype  # -7.875 -> -8.0 in e4m3, as torch rounds


@pytest.mark.skipif(not INTERPRETED, reason="runs in the child process (TRITON_INTERPRET=1)")
@pytest.mark.parametrize("T,D,H", SHAPES)
def test_the_up_projection_kernel_writes_what_the_unfused_ops_write(T, D, H):
    """post = relu(x W1)^2 in bf16, its e4m3 copy post / act_scale saturated at 448, and the max of post."""
    x, c_fc, _, _ = inputs(T, D, H)
    x_scale, w1_scale = tg.amax(x) / tg.E4M3_MAX, tg.amax(c_fc) / tg.E4M3_MAX
    x_f8, w1_f8 = tg.to_e4m3(x, x_scale), tg.to_e4m3(c_fc.T.contiguous(), w1_scale)
    pre = torch._scaled_mm(x_f8, w1_f8.T, scale_a=x_scale, scale_b=w1_scale, out_dtype=torch.bfloat16)
    post_twin = torch.relu(pre).square()
    act_scale = post_twin.float().max() * 0.6 / tg.E4M3_MAX  # some values saturate
    post, post_f8, post_amax = tg.mlp_fp8_up(x, c_fc, x_f8, w1_f8, x_scale, w1_scale, act_scale, True)
    assert_nearly_equal(post, post_twin)
    assert torch.equal(post_f8.float(), tg.to_e4m3(post, act_scale).float())  # the cast: exactly torch's
    assert (post_f8.float() == tg.E4M3_MAX).any()
    assert post_amax.dtype == torch.float32 and post_amax == post.float().max()  # every tile's max, tails included


@pytest.mark.skipif(not INTERPRETED, reason="runs in the child process (TRITON_INTERPRET=1)")
@pytest.mark.parametrize("T,D,H", SHAPES)
def test_the_backward_kernel_computes_2_g_w2_sqrt_post(T, D, H):
    """pre's gradient 2 (g W2) sqrt(post): the product rounded to bf16 as a separate matmul rounds it."""
    x, c_fc, c_proj, g = inputs(T, D, H)
    post = torch.relu(x.float() @ c_fc).square().bfloat16()
    w2 = c_proj.bfloat16()
    grad_pre = torch.full_like(post, float("nan"))
    tg.mlp_matmul_launch(g, w2, grad_pre, post)
    assert_nearly_equal(grad_pre, (2 * (g @ w2).float() * post.float().sqrt()).bfloat16())


@pytest.mark.skipif(not INTERPRETED, reason="runs in the child process (TRITON_INTERPRET=1)")
@pytest.mark.parametrize("T,D,H", SHAPES)
def test_the_fused_mlp_and_its_gradients_equal_the_unfused_mlp(T, D, H):
    """mlp_fp8 with fused=True against fused=False, forward and backward, from the same delayed scales."""
    x0, c_fc0, c_proj0, g = inputs(T, D, H)
    results = []
    for fused in (False, True):
        x, c_fc, c_proj = (t.clone().requires_grad_() for t in (x0, c_fc0, c_proj0))
        out, post, post_amax, w2_amax = tg.mlp_fp8(x, c_fc, c_proj, torch.tensor(0.02), torch.tensor(1e-4),
                                                   torch.tensor(False), fused)
        out.backward(g)
        assert not post.requires_grad and not post_amax.requires_grad  # (the scales' buffers would keep a graph)
        results.append((out, post, post_amax, w2_amax, x.grad, c_fc.grad, c_proj.grad))
    (out, post, post_amax, w2_amax, *grads), (out_k, post_k, post_amax_k, w2_amax_k, *grads_k) = results
    assert_nearly_equal(post_k, post)
    torch.testing.assert_close(post_amax_k, post_amax, rtol=2**-8, atol=0)
    assert w2_amax_k == w2_amax
    # a post one rounding apart may cross an e4m3 step; the twin's backward rounds sqrt(post) to bf16, the kernel not
    for ours, ref in zip((out_k, *grads_k), (out, *grads)):
        assert ours.dtype == ref.dtype
        torch.testing.assert_close(ours.float(), ref.float(), rtol=2**-6, atol=2**-6 * ref.float().abs().max().item())
