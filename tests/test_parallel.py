"""parallel.py's wrapping against the plain module, on CPU with gloo: activation checkpointing
changes nothing, and bf16 FSDP2 (1 rank in-process, 2 ranks under torchrun) gives the loss and
gradients of a plain bf16 module, for a tied (Gemma) and an untied (Llama) head.

Run as a script (under torchrun) it is the 2-rank worker: python tests/test_parallel.py OUT FAMILY."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lion_min.losses import IGNORE_INDEX, sft_loss  # noqa: E402
from lion_min.model import ModelArgs, Transformer  # noqa: E402
from lion_min.parallel import build_model, init_distributed, shutdown  # noqa: E402


def tiny_args(family: str) -> ModelArgs:
    return ModelArgs(family=family, vocab_size=96, dim=32, n_layers=2, n_heads=4, n_kv_heads=1 if family == "gemma" else 2,
                     head_dim=8, hidden_dim=64, tie_embeddings=family == "gemma", max_seq_len=64)


def micro_batch(seed: int, T: int = 24) -> dict:
    """One packed row of three documents with per-document positions and targets."""
    gen = torch.Generator().manual_seed(seed)
    lengths = (7, 12, T - 19)
    tokens = torch.randint(0, 96, (1, T), generator=gen)
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    doc_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
    targets = torch.roll(tokens, -1, 1)
    targets[positions.roll(-1, 1) == 0] = IGNORE_INDEX  # no target across a document boundary
    return dict(tokens=tokens, positions=positions, doc_ids=doc_ids, targets=targets)


def step_grads(model, micros: list[dict], world: int = 1, norm: int = 0) -> tuple[float, dict]:
    """Sum over micro-batches of the SFT loss (normalised by the global target count `norm`, by
    default this process's count times world) and backward; returns the loss and full fp32 gradients."""
    norm = norm or sum(int((m["targets"] != IGNORE_INDEX).sum()) for m in micros) * world
    total = 0.0
    for m in micros:
        logp = model(m["tokens"], m["positions"], m["doc_ids"], targets=m["targets"])
        loss = sft_loss(logp, m["targets"], norm)
        (loss * world).backward()  # FSDP averages over ranks; the loop undoes that the same way
        total += loss.item()
    grads = {}
    for n, p in model.named_parameters():
        g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        grads[n] = g.float()
    return total, grads


def plain_bf16(args: ModelArgs) -> Transformer:
    """The reference: the same fp32 init, weights cast to bf16 (buffers such as inv_freq stay fp32)."""
    model = Transformer(args)
    model.init_weights(seed=0)
    for p in model.parameters():
        p.data = p.data.bfloat16()
    return model


def plain_bf16_step(family: str, micros: list[dict], world: int) -> tuple[float, dict]:
    """What FSDP should compute: each micro-batch's bf16 gradients, summed in fp32 (FSDP casts each
    to fp32 to reduce and accumulate; a plain module would accumulate in bf16) and divided by the
    world size as FSDP's average does."""
    norm = sum(int((m["targets"] != IGNORE_INDEX).sum()) for m in micros)
    total, grads = 0.0, {}
    for m in micros:
        _, g = step_grads(plain_bf16(tiny_args(family)), [m], world=world, norm=norm)
        total += _
        for n, v in g.items():
            grads[n] = grads.get(n, 0) + v / world
    return total, grads


@pytest.mark.parametrize("family", ["gemma", "llama"])
def test_activation_checkpointing_changes_nothing(family):
    micros = [micro_batch(1), micro_batch(2)]
    results = []
    for ac in (False, True):
        model = plain_bf16(tiny_args(family))
        model.activation_checkpointing = ac
        results.append(step_grads(model, micros))
    assert results[0][0] == results[1][0]
    for n in results[0][1]:
        assert torch.equal(results[0][1][n], results[1][1][n]), n


@pytest.mark.parametrize("family", ["gemma", "llama"])
def test_fsdp_bf16_one_rank_equals_plain_bf16(family):
    from torch.distributed.fsdp import FSDPModule

    micros = [micro_batch(1), micro_batch(2)]
    ref_loss, ref = plain_bf16_step(family, micros, world=1)
    model = build_model(tiny_args(family), init_distributed("cpu"), seed=0, param_dtype=torch.bfloat16,
                        activation_checkpointing=True)
    # torchtitan's units: the ends apart from the root (tied: embedding, norm and head together).
    assert isinstance(model.tok_embeddings, FSDPModule) and all(isinstance(b, FSDPModule) for b in model.layers)
    assert (model.output is None) == (family == "gemma")
    assert model.output is None or isinstance(model.output, FSDPModule)
    loss, grads = step_grads(model, micros)
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    for n in ref:
        torch.testing.assert_close(grads[n], ref[n], atol=1e-6, rtol=1e-5, msg=n)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gemma", "llama"])
def test_fsdp_bf16_two_ranks_equal_plain_bf16(family, tmp_path):
    # Each rank takes one micro-batch; FSDP's fp32 reduce-scatter must give the summed gradients.
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
           str(tmp_path / "out.pt"), family]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    got = torch.load(tmp_path / "out.pt", weights_only=True)
    ref_loss, ref = plain_bf16_step(family, [micro_batch(1), micro_batch(2)], world=2)
    assert got["loss"] == pytest.approx(ref_loss, rel=1e-6)
    for n in ref:
        torch.testing.assert_close(got["grads"][n], ref[n], atol=1e-6, rtol=1e-5, msg=n)


if __name__ == "__main__":
    import torch.distributed as dist

    out, family = sys.argv[1], sys.argv[2]
    d = init_distributed("cpu")
    model = build_model(tiny_args(family), d, seed=0, param_dtype=torch.bfloat16, activation_checkpointing=True)
    norm = sum(int((micro_batch(1 + r)["targets"] != IGNORE_INDEX).sum()) for r in range(d.world))
    loss, grads = step_grads(model, [micro_batch(1 + d.rank)], world=d.world, norm=norm)
    losses = [None] * d.world
    dist.all_gather_object(losses, loss)
    if d.main:
        torch.save({"loss": sum(losses), "grads": grads}, out)
    shutdown()
