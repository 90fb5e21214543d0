"""attention.py: each mask form against the dense SDPA reference, on CPU.

FlexAttention has no CPU backward, but its compiled forward runs on CPU (inductor's C++ kernel),
so the block mask and the compiled kernel are checked here; varlen_attn is CUDA-only, so only its
cu_seqlens are (bench/gpu_check.py runs the kernels on a GPU)."""

import pytest
import torch
import torch.nn.functional as F

import lion_min
from lion_min.attention import attend, build_mask, dense_mask, resolve_backend, varlen_seqlens


def ragged_doc_ids(B: int, T: int, seed: int) -> torch.Tensor:
    """(B, T) doc ids: documents of random lengths 1..80 packed in each row, then padding (-1)."""
    gen = torch.Generator().manual_seed(seed)
    rows, doc = [], 0
    for _ in range(B):
        row = []
        while True:
            n = int(torch.randint(1, 80, (1,), generator=gen))
            if len(row) + n > T - 5:
                break
            row += [doc] * n
            doc += 1
        rows.append(row + [-1] * (T - len(row)))
    return torch.tensor(rows)


def test_compiled_flex_forward_equals_dense_sdpa():
    # T = 200: not a multiple of flex's 128-token tiles, so the last tile is partial.
    B, T = 2, 200
    doc = ragged_doc_ids(B, T, seed=0)
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(B, h, T, 16, generator=gen) for h in (8, 2, 2))  # grouped-query
    slots = torch.arange(T)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask(doc, slots, doc, slots), enable_gqa=True)
    with torch.no_grad():
        out = attend(q, k, v, build_mask(doc, "flex"))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # A second batch with other documents reuses the compiled functions and still matches.
    doc2 = ragged_doc_ids(B, T, seed=3)
    ref2 = F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask(doc2, slots, doc2, slots), enable_gqa=True)
    with torch.no_grad():
        torch.testing.assert_close(attend(q, k, v, build_mask(doc2, "flex")), ref2, atol=1e-5, rtol=1e-5)


def test_model_forward_flex_equals_sdpa(hf_checkpoints):
    model = lion_min.load_model(hf_checkpoints["gemma-2b"])
    doc = ragged_doc_ids(2, 150, seed=4)
    tokens = torch.randint(0, 512, doc.shape, generator=torch.Generator().manual_seed(5))
    positions = torch.zeros_like(doc)
    for r in range(doc.shape[0]):  # restart at 0 at each document
        for t in range(1, doc.shape[1]):
            positions[r, t] = positions[r, t - 1] + 1 if doc[r, t] == doc[r, t - 1] else 0
    out = {}
    with torch.no_grad():
        for backend in ("sdpa", "flex"):
            model.attn_backend = backend
            out[backend] = model(tokens, positions, doc)
    keep = doc >= 0
    torch.testing.assert_close(out["flex"][keep], out["sdpa"][keep], atol=1e-4, rtol=1e-4)


def test_varlen_seqlens():
    doc = torch.tensor([[0, 0, 0, 1, 1, -1], [2, 2, 2, 2, 3, 3], [4, 4, 4, 4, 4, 4]])
    assert varlen_seqlens(doc).tolist() == [0, 3, 5, 6, 10, 12, 18]
    assert varlen_seqlens(doc).dtype == torch.int32
    # A document id that continues from one row into the next is still cut at the row boundary.
    assert varlen_seqlens(torch.tensor([[7, 7], [7, 7]])).tolist() == [0, 2, 4]
    # Random packed rows: the runs are exactly the documents (and padding runs) of each row.
    doc = ragged_doc_ids(3, 300, seed=6)
    cu = varlen_seqlens(doc).tolist()
    flat = doc.reshape(-1).tolist()
    for a, b in zip(cu[:-1], cu[1:]):
        assert len(set(flat[a:b])) == 1 and a // 300 == (b - 1) // 300
        assert b == len(flat) or flat[b] != flat[b - 1] or b % 300 == 0
    if torch.cuda.is_available():  # the mask itself needs a CUDA tensor
        mask = build_mask(doc.cuda(), "varlen", torch.bfloat16)
        assert mask.cu_seqlens.tolist() == cu and mask.max_seqlen == 300  # the row length bounds every document


def test_resolve_backend():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_backend("auto", cpu, torch.bfloat16) == "sdpa"
    assert resolve_backend("auto", cuda, torch.bfloat16) == "varlen"
    assert resolve_backend("auto", cuda, torch.float32) == "flex"
    assert resolve_backend("flex", cpu) == "flex"
    with pytest.raises(ValueError, match="bfloat16/float16 only, not cuda float32"):
        resolve_backend("varlen", cuda, torch.float32)
    with pytest.raises(ValueError, match="not cpu bfloat16"):
        resolve_backend("varlen", cpu, torch.bfloat16)
    with pytest.raises(ValueError, match="unknown attention backend"):
        resolve_backend("flash", cpu)
