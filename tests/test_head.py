"""The output head's two log-prob paths (losses.token_logprobs): fp32, and half_matmul (bf16/fp16
products with fp32 sums and fp32 log-softmax, the CUDA default), forced here on the CPU."""

import pytest
import torch

from lion_min.core.losses import IGNORE_INDEX, _HalfHeadLogprobs, token_logprobs


def _inputs(N=40, D=24, V=300, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=gen).to(dtype)
    weight = (torch.randn(V, D, generator=gen) * 0.5).to(dtype)
    targets = torch.randint(0, V, (N,), generator=gen)
    targets[::7] = IGNORE_INDEX
    targets[1] = V - 1  # the last column of the last vocabulary slice
    return hidden, weight, targets


def test_half_matmul_gradients_are_exact_in_float64():
    # chunk_size 8 with 40 tokens and V 300 gives vocabulary slices of 60: five slices.
    hidden, weight, targets = _inputs(dtype=torch.float64)
    hidden.requires_grad_(True), weight.requires_grad_(True)
    fn = lambda h, w: token_logprobs(h, w, targets, chunk_size=8, half_matmul=True)
    assert torch.autograd.gradcheck(fn, (hidden, weight))
    # ...and its values are the fp32 path's (which computes in fp32).
    torch.testing.assert_close(fn(hidden, weight), token_logprobs(hidden, weight, targets).double(), atol=1e-5, rtol=0)


def test_half_matmul_bf16_close_to_fp32_reference():
    h32, w32, targets = _inputs(N=64, D=64, V=1000, seed=1)
    h16, w16 = h32.bfloat16().requires_grad_(True), w32.bfloat16().requires_grad_(True)
    half = token_logprobs(h16, w16, targets, chunk_size=16, half_matmul=True)
    weights = torch.randn(targets.shape, generator=torch.Generator().manual_seed(2))
    (half * weights).sum().backward()

    # Reference: the fp32 path on the same bf16-rounded values. The products are identical, so the
    # log-probs differ only by fp32 summation order; the gradients by bf16 rounding of d_logits.
    hr, wr = h16.detach().float().requires_grad_(True), w16.detach().float().requires_grad_(True)
    ref = token_logprobs(hr, wr, targets)
    (ref * weights).sum().backward()
    assert half.dtype == torch.float32 and (half[targets == IGNORE_INDEX] == 0).all()
    assert (half - ref).abs().max() < 1e-4
    for got, want in ((h16.grad, hr.grad), (w16.grad, wr.grad)):
        assert got.dtype == torch.bfloat16
        rel = (got.float() - want).norm() / want.norm()
        assert rel < 1e-2, rel
    # Against the unrounded fp32 inputs (the old bf16 behaviour cast to fp32 first): bf16 rounding of
    # the inputs alone moves log-probs by about this much at these magnitudes (logits ~ +-30).
    assert (half - token_logprobs(h32, w32, targets)).abs().max() < 0.5


@pytest.mark.slow
def test_fused_slices_equal_the_fp32_path():
    """The CUDA default fuses each vocabulary slice's elementwise work (torch.compile); forced here on
    the CPU (inductor's C++ kernels), it gives the fp32 path's log-probs and gradients on the same
    bf16-rounded values, as the eager slices do."""
    h32, w32, targets = _inputs(N=64, D=64, V=1000, seed=3)
    weights = torch.randn(targets.shape, generator=torch.Generator().manual_seed(4))
    out = {}
    for fused in (False, True):
        h, w = h32.bfloat16().requires_grad_(True), w32.bfloat16().requires_grad_(True)
        logp = _HalfHeadLogprobs.apply(h, w, targets, 250, fused)  # four vocabulary slices
        (logp * weights).sum().backward()
        out[fused] = (logp.detach(), h.grad.float(), w.grad.float())
    hr, wr = h32.bfloat16().float().requires_grad_(True), w32.bfloat16().float().requires_grad_(True)
    ref = token_logprobs(hr, wr, targets)
    (ref * weights).sum().backward()
    assert (out[True][0] - ref).abs().max() < 1e-4 and (out[True][0][targets == IGNORE_INDEX] == 0).all()
    for got, want in zip(out[True][1:], (hr.grad, wr.grad)):
        assert (got - want).norm() / want.norm() < 1e-2
    # fused and eager slices: the same operations, so the same numbers up to fp32 rounding (exp kernels)
    for got, want in zip(out[True], out[False]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-2)
    # and the check can fail: a wrong target column moves the log-probs far
    assert (_HalfHeadLogprobs.apply(h32.bfloat16(), w32.bfloat16(), (targets + 1) % 1000, 250, True) - ref).abs().max() > 1


def test_softcapped_head_both_paths_exact_in_float64():
    # Gemma-2's final-logit soft-cap inside the chunked head: both paths give log_softmax of the capped
    # logits, and the half_matmul path's hand-written backward (through dy/dx = 1 - (y/c)^2) is exact.
    hidden, weight, targets = _inputs(dtype=torch.float64)
    hidden = hidden * 3  # logits up to ~+-60: the cap at 5 bends most of them
    capped = (torch.tanh(hidden @ weight.t() / 5.0) * 5.0).log_softmax(-1)
    want = torch.where(targets != IGNORE_INDEX, capped.gather(1, targets.clamp(min=0)[:, None])[:, 0], 0.0)
    for half in (False, True):
        got = token_logprobs(hidden, weight, targets, chunk_size=8, half_matmul=half, softcap=5.0)
        torch.testing.assert_close(got, want.float() if not half else want, atol=1e-5, rtol=0)
    assert (token_logprobs(hidden, weight, targets) - want).abs().max() > 1  # the cap matters here
    hidden.requires_grad_(True), weight.requires_grad_(True)
    fn = lambda h, w: token_logprobs(h, w, targets, chunk_size=8, half_matmul=True, softcap=5.0)
    assert torch.autograd.gradcheck(fn, (hidden, weight))
