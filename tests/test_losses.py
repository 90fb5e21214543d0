"""Losses against their torch references and hand-computed values (CPU, fp32/fp64)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from lion_min.core.losses import IGNORE_INDEX, dpo_loss, sequence_logps, sft_loss, token_logprobs


def reference_logprobs(hidden, weight, targets):
    """The plain formula: full fp32 logits, log_softmax, gather; 0.0 where ignored."""
    logp = F.log_softmax(hidden.float() @ weight.float().T, dim=-1)  # (..., V)
    picked = logp.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    return torch.where(targets != IGNORE_INDEX, picked, 0.0)


def random_problem(shape=(3, 11), V=50, D=8, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, D, generator=gen).to(dtype).requires_grad_()
    weight = torch.randn(V, D, generator=gen).to(dtype).requires_grad_()
    targets = torch.randint(0, V, shape, generator=gen)
    targets[torch.rand(shape, generator=gen) < 0.3] = IGNORE_INDEX
    return hidden, weight, targets


def value_and_grads(fn, hidden, weight, targets, seed=1):
    """fn's output, and d(sum(out * g))/d(hidden, weight) for a fixed random g."""
    out = fn(hidden, weight, targets)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    gh, gw = torch.autograd.grad((out * g).sum(), (hidden, weight))
    return out, gh, gw


# --- token_logprobs ---------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [1, 5, 11, 33, 1000])  # N = 33: divides, doesn't, one chunk
def test_token_logprobs_matches_log_softmax(chunk_size):
    hidden, weight, targets = random_problem()
    assert (targets == IGNORE_INDEX).any() and (targets != IGNORE_INDEX).any()
    out, gh, gw = value_and_grads(lambda h, w, t: token_logprobs(h, w, t, chunk_size), hidden, weight, targets)
    ref, rgh, rgw = value_and_grads(reference_logprobs, hidden, weight, targets)
    assert out.shape == targets.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gh, rgh, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw, rgw, rtol=1e-5, atol=1e-5)
    ignored = targets == IGNORE_INDEX
    assert (out[ignored] == 0.0).all()
    assert (gh[ignored] == 0.0).all()  # an ignored position sends no gradient into the model


def test_token_logprobs_flat_input_and_no_grad():
    hidden, weight, targets = random_problem(shape=(20,))
    with torch.no_grad():  # the reference-model pass in DPO
        out = token_logprobs(hidden, weight, targets, chunk_size=6)
    assert not out.requires_grad
    torch.testing.assert_close(out, reference_logprobs(hidden, weight, targets), rtol=1e-5, atol=1e-5)


def test_token_logprobs_bf16_inputs_give_fp32_output():
    hidden, weight, targets = random_problem(dtype=torch.bfloat16)
    out, gh, gw = value_and_grads(lambda h, w, t: token_logprobs(h, w, t, 7), hidden, weight, targets)
    assert out.dtype == torch.float32 and gh.dtype == torch.bfloat16 and gw.dtype == torch.bfloat16
    # Same bf16 values, upcast: the computation itself is fp32, so the values agree tightly.
    ref, rgh, rgw = value_and_grads(reference_logprobs, hidden, weight, targets)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # Gradients are rounded to bf16 once at the end (the head's gradient summed over chunks in fp32).
    torch.testing.assert_close(gh, rgh, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(gw, rgw, rtol=1e-2, atol=1e-2)


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op produces (forward or backward)."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


def memory_profile(fn, hidden, weight, targets):
    """(largest tensor in forward + backward, bytes of distinct storages autograd keeps for backward)."""
    saved = {}

    def pack(x):
        saved[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
        return x

    with LargestTensor() as largest:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            out = fn(hidden, weight, targets)
        out.sum().backward()
    return largest.numel, sum(saved.values())


def test_token_logprobs_never_materialises_full_logits():
    N, V, D, chunk = 64, 1000, 8, 16  # full logits: N * V = 64000 elements; one chunk: 16000
    hidden, weight, targets = random_problem(shape=(N,), V=V, D=D)
    full_bytes = N * V * 4
    # The probe sees the naive path's logits, both as an op output and as a tensor kept for backward.
    naive_largest, naive_saved = memory_profile(reference_logprobs, hidden, weight, targets)
    assert naive_largest == N * V and naive_saved >= full_bytes
    largest, saved = memory_profile(lambda h, w, t: token_logprobs(h, w, t, chunk), hidden, weight, targets)
    assert largest == chunk * V  # one chunk of logits at a time, in forward and in backward
    assert saved < full_bytes / 4  # only inputs (hidden, fp32 head, targets) are kept, no logits


# --- sft_loss ---------------------------------------------------------------------------------------


def test_sft_loss_is_mean_over_target_tokens():
    token_logp = torch.tensor([[-1.0, -2.0, 0.0], [-4.0, 0.0, 0.0]])
    targets = torch.tensor([[5, 6, IGNORE_INDEX], [7, IGNORE_INDEX, IGNORE_INDEX]])
    assert sft_loss(token_logp, targets, 3).item() == pytest.approx((1 + 2 + 4) / 3)
    assert sft_loss(token_logp[:, :0], targets[:, :0], 0).item() == 0.0  # no targets: 0, not NaN


def test_sft_loss_invariant_to_gradient_accumulation():
    # 8 rows of very different target counts, split into micro-batches of 1, 2, 4 and 8 rows.
    hidden, weight, targets = random_problem(shape=(8, 12), V=40, seed=3)
    targets[0, 1:] = IGNORE_INDEX  # a row with a single target
    targets[5] = IGNORE_INDEX  # and one with none
    global_count = int((targets != IGNORE_INDEX).sum())

    def accumulate(micro):
        weight.grad = None
        total = 0.0
        for i in range(0, 8, micro):
            h, t = hidden[i : i + micro].detach(), targets[i : i + micro]
            loss = sft_loss(token_logprobs(h, weight, t, chunk_size=5), t, global_count)
            loss.backward()  # gradients add up across micro-batches, as in training
            total += loss.item()
        return total, weight.grad.clone()

    full_loss, full_grad = accumulate(8)
    mean = -reference_logprobs(hidden, weight, targets)[targets != IGNORE_INDEX].mean()
    assert full_loss == pytest.approx(mean.item(), rel=1e-6)
    for micro in (1, 2, 4):
        loss, grad = accumulate(micro)
        assert loss == pytest.approx(full_loss, rel=1e-6)
        torch.testing.assert_close(grad, full_grad, rtol=1e-5, atol=1e-6)

    # The per-micro-batch mean (local count), averaged, is a different number: the test can tell.
    logp = reference_logprobs(hidden, weight, targets).detach()
    local = [-logp[i : i + 2][targets[i : i + 2] != IGNORE_INDEX].mean() for i in range(0, 8, 2)]
    assert abs(sum(local).item() / 4 - full_loss) > 1e-3


# --- sequence_logps ---------------------------------------------------------------------------------


def test_sequence_logps_matches_loop():
    gen = torch.Generator().manual_seed(4)
    token_logp = torch.randn(3, 10, generator=gen, dtype=torch.float64).requires_grad_()
    doc_ids = torch.tensor([[0, 0, 0, 2, 2, 2, 2, -1, -1, -1], [1, 1, 1, 1, 1, 1, 4, 4, -1, -1], [5] * 10])
    out = sequence_logps(token_logp, doc_ids, num_sequences=6)
    expected = [0.0] * 6  # example 3 has no tokens here: 0
    for b in range(3):
        for t in range(10):
            if doc_ids[b, t] >= 0:
                expected[doc_ids[b, t]] += token_logp[b, t].item()
    assert out.shape == (6,)
    torch.testing.assert_close(out, torch.tensor(expected, dtype=torch.float64))
    out.sum().backward()
    torch.testing.assert_close(token_logp.grad, (doc_ids >= 0).double())  # padding gets no gradient


# --- dpo_loss ---------------------------------------------------------------------------------------

# Three pairs, worked out by hand with beta = 0.1:
#   pair 0: chosen ratio -10 - (-11) = 1,  rejected ratio -12 - (-11.5) = -0.5 -> h = 1.5,  beta*h = 0.15
#   pair 1: chosen ratio -5 - (-5)  = 0,  rejected ratio -4 - (-6)    =  2   -> h = -2,   beta*h = -0.2
#   pair 2: chosen ratio -1 - (-21) = 20, rejected ratio -3 - (-3)    =  0   -> h = 20,   beta*h = 2
POLICY_CHOSEN = [-10.0, -5.0, -1.0]
POLICY_REJECTED = [-12.0, -4.0, -3.0]
REFERENCE_CHOSEN = [-11.0, -5.0, -21.0]
REFERENCE_REJECTED = [-11.5, -6.0, -3.0]
BETA = 0.1
BETA_H = [0.15, -0.2, 2.0]


def run_dpo(**kwargs):
    t = lambda xs: torch.tensor(xs, dtype=torch.float64, requires_grad=True)
    inputs = [t(POLICY_CHOSEN), t(POLICY_REJECTED), t(REFERENCE_CHOSEN), t(REFERENCE_REJECTED)]
    return inputs, dpo_loss(*inputs, beta=BETA, **kwargs)


def neg_log_sigmoid(x):
    return math.log(1 + math.exp(-x))


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        (dict(), [neg_log_sigmoid(x) for x in BETA_H]),
        (dict(label_smoothing=0.2), [0.8 * neg_log_sigmoid(x) + 0.2 * neg_log_sigmoid(-x) for x in BETA_H]),
        (dict(loss_type="ipo"), [(1.5 - 5.0) ** 2, (-2.0 - 5.0) ** 2, (20.0 - 5.0) ** 2]),  # 1/(2 beta) = 5
        (dict(loss_type="hinge"), [0.85, 1.2, 0.0]),  # relu(1 - beta*h)
    ],
)
def test_dpo_loss_hand_values(kwargs, expected):
    _, (losses, chosen_rewards, rejected_rewards) = run_dpo(**kwargs)
    torch.testing.assert_close(losses, torch.tensor(expected, dtype=torch.float64))
    torch.testing.assert_close(chosen_rewards, torch.tensor([0.1, 0.0, 2.0], dtype=torch.float64))
    torch.testing.assert_close(rejected_rewards, torch.tensor([-0.05, 0.2, 0.0], dtype=torch.float64))
    assert not chosen_rewards.requires_grad and not rejected_rewards.requires_grad


def test_dpo_sigmoid_gradient_by_hand():
    # d/d(policy chosen) of -log sigma(beta*h) = -beta * sigma(-beta*h) = -beta / (1 + exp(beta*h));
    # the rejected log-prob gets the opposite sign.
    (pc, pr, _, _), (losses, _, _) = run_dpo()
    losses.sum().backward()
    expected = torch.tensor([-BETA / (1 + math.exp(x)) for x in BETA_H], dtype=torch.float64)
    torch.testing.assert_close(pc.grad, expected)
    torch.testing.assert_close(pr.grad, -expected)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.3])
def test_dpo_policy_equal_to_reference(label_smoothing):
    logps = torch.tensor([-7.0, -30.0, -0.5])
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        logps, logps - 1, logps, logps - 1, beta=0.5, label_smoothing=label_smoothing
    )
    torch.testing.assert_close(losses, torch.full((3,), math.log(2)))
    assert (chosen_rewards == 0).all() and (rejected_rewards == 0).all()
    ipo, _, _ = dpo_loss(logps, logps, logps, logps, beta=0.5, loss_type="ipo")
    torch.testing.assert_close(ipo, torch.full((3,), 1.0))  # (0 - 1/(2*0.5))^2


def test_dpo_sigmoid_stays_finite_for_large_margins():
    big = torch.tensor([-1000.0])
    losses, _, _ = dpo_loss(big, torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([0.0]), beta=1.0)
    assert losses.item() == pytest.approx(1000.0)  # -log sigma(-1000) = 1000 + log(1 + e^-1000)


def test_dpo_rejects_unknown_options():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(x, x, x, x, beta=0.1, loss_type="kto")
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(x, x, x, x, beta=0.1, label_smoothing=0.1, loss_type="ipo")
