"""attention.py: each mask form against the dense SDPA reference, on CPU.

FlexAttention has no CPU backward, but its compiled forward runs on CPU (inductor's C++ kernel),
so the block mask and the compiled kernel are checked here. varlen_attn is CUDA-only: its cu_seqlens
are checked, and attend() is run against fakes of each release's signature that compute exact
per-document attention on CPU (bench/gpu_check.py runs the real kernels on a GPU)."""

import re

import pytest
import torch
import torch.nn.functional as F

import lion_min
from lion_min.core import attention
from lion_min.core.attention import AttnMask, attend, build_mask, dense_mask, resolve_backend, varlen_api, varlen_seqlens


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
    assert resolve_backend("auto", cuda, torch.bfloat16) == "flex"  # by measurement, until varlen is timed faster
    assert resolve_backend("auto", cuda, torch.float32) == "flex"
    assert resolve_backend("flex", cpu) == "flex"
    with pytest.raises(ValueError, match="unknown attention backend"):
        resolve_backend("flash", cpu)


def test_resolve_backend_varlen(monkeypatch):
    """varlen is refused where its kernel cannot run, on every torch: the device and dtype checks
    with a varlen_attn installed (a 2.13-shaped fake), the release check without one (torch < 2.10)."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(attention, "VARLEN", varlen_api(varlen_213))
    with pytest.raises(ValueError, match="bfloat16/float16 only, not cuda float32"):
        resolve_backend("varlen", cuda, torch.float32)
    with pytest.raises(ValueError, match="not cpu bfloat16"):
        resolve_backend("varlen", cpu, torch.bfloat16)
    monkeypatch.setattr(attention, "VARLEN", None)
    with pytest.raises(ValueError, match=r"no usable torch.nn.attention.varlen.varlen_attn \(it appeared in torch 2.10"):
        resolve_backend("varlen", cuda, torch.bfloat16)


# --- varlen_attn as each torch release spells it -----------------------------------------------------


def _exact_varlen(q, k, v, cu_q, cu_k, causal: bool, gqa: bool):
    """What FlashAttention's varlen kernel computes: q (Tq, Hq, D), k/v (Tk, Hkv, D), one document at a
    time (SDPA on its slice), causal or not. Like the real one it refuses Hq != Hkv without GQA."""
    if q.shape[1] != k.shape[1] and not gqa:
        raise ValueError(f"Expect query and key/value to have the same number of heads but got "
                         f"Hq={q.shape[1]} and Hkv={k.shape[1]}")
    assert torch.equal(cu_q, cu_k) and cu_q.dtype == torch.int32
    out = torch.empty_like(q)
    for a, b in zip(cu_q.tolist()[:-1], cu_q.tolist()[1:]):
        doc = lambda x: x[a:b].transpose(0, 1)[None]  # (1, H, n, D)
        out[a:b] = F.scaled_dot_product_attention(doc(q), doc(k), doc(v), is_causal=causal,
                                                  enable_gqa=gqa)[0].transpose(0, 1)
    return out


def varlen_210(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
    return _exact_varlen(query, key, value, cu_seq_q, cu_seq_k, is_causal, gqa=False)


def varlen_211(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
               window_size=(-1, -1)):
    assert window_size in ((-1, -1), (-1, 0))
    return _exact_varlen(query, key, value, cu_seq_q, cu_seq_k, window_size == (-1, 0), gqa=False)


def varlen_213(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
               window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
    assert window_size in ((-1, -1), (-1, 0))
    return _exact_varlen(query, key, value, cu_seq_q, cu_seq_k, window_size == (-1, 0), gqa=enable_gqa)


def test_varlen_api_reads_each_signature():
    assert varlen_api(varlen_210) == attention.VarlenAPI(varlen_210, {"is_causal": True}, gqa=False)
    assert varlen_api(varlen_211) == attention.VarlenAPI(varlen_211, {"window_size": (-1, 0)}, gqa=False)
    assert varlen_api(varlen_213) == attention.VarlenAPI(varlen_213, {"window_size": (-1, 0)}, gqa=True)
    assert varlen_api(lambda q, k, v, cu_q, cu_k, max_q, max_k: q) is None  # no way to ask for causal
    # The installed torch (2.13 in CI) is read the same way; before 2.10 it has no varlen module.
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        assert attention.VARLEN is None
    else:
        assert attention.VARLEN == varlen_api(varlen_attn)


def test_varlen_api_reads_the_installed_module(monkeypatch):
    """varlen_api() reads torch.nn.attention.varlen itself: a 2.11-shaped function put there is read
    as one, and a torch without the module (before 2.10) gives None. (The module is a stand-in, so
    this holds on a torch with or without one.)"""
    import sys
    import types

    module = types.ModuleType("torch.nn.attention.varlen")
    module.varlen_attn = varlen_211
    monkeypatch.setitem(sys.modules, "torch.nn.attention.varlen", module)
    assert varlen_api() == attention.VarlenAPI(varlen_211, {"window_size": (-1, 0)}, gqa=False)
    monkeypatch.setitem(sys.modules, "torch.nn.attention.varlen", None)  # `import` then raises ImportError
    assert varlen_api() is None


@pytest.mark.parametrize("fake", [varlen_210, varlen_211, varlen_213], ids=["2.10", "2.11", "2.13"])
@pytest.mark.parametrize("kv_heads", [2, 1], ids=["grouped", "multi-query"])
def test_attend_varlen_equals_dense_sdpa(monkeypatch, fake, kv_heads):
    monkeypatch.setattr(attention, "VARLEN", varlen_api(fake))
    B, T, Hq = 3, 160, 8
    doc = ragged_doc_ids(B, T, seed=7)
    assert all(len(set(row.tolist()) - {-1}) >= 2 for row in doc)  # several documents in every row
    gen = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(B, h, T, 16, generator=gen) for h in (Hq, kv_heads, kv_heads))
    slots = torch.arange(T)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask(doc, slots, doc, slots), enable_gqa=True)
    # build_mask refuses varlen on CPU (no kernel), so the mask is the one it builds on CUDA.
    out = attend(q, k, v, AttnMask("varlen", cu_seqlens=varlen_seqlens(doc), max_seqlen=T))
    keep = (doc >= 0)[:, None, :, None].expand_as(ref)  # padding outputs are never read
    torch.testing.assert_close(out[keep], ref[keep], atol=1e-5, rtol=1e-5)


def test_varlen_fakes_catch_wrong_calls():
    """The fakes above can fail: a call that is not causal, K/V heads expanded in the wrong order, or
    grouped heads passed to a release without enable_gqa each give other numbers or an error."""
    B, T, Hq, Hkv = 2, 90, 8, 2
    doc = ragged_doc_ids(B, T, seed=9)
    gen = torch.Generator().manual_seed(10)
    q, k, v = (torch.randn(B, h, T, 16, generator=gen) for h in (Hq, Hkv, Hkv))
    slots = torch.arange(T)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask(doc, slots, doc, slots), enable_gqa=True)
    cu = varlen_seqlens(doc)
    flat = lambda x: x.transpose(1, 2).reshape(B * T, x.shape[1], 16)
    unflat = lambda y: y.reshape(B, T, Hq, 16).transpose(1, 2)
    keep = (doc >= 0)[:, None, :, None].expand_as(ref)
    right = unflat(varlen_213(flat(q), flat(k), flat(v), cu, cu, T, T, window_size=(-1, 0), enable_gqa=True))
    torch.testing.assert_close(right[keep], ref[keep], atol=1e-5, rtol=1e-5)
    not_causal = unflat(varlen_213(flat(q), flat(k), flat(v), cu, cu, T, T, enable_gqa=True))
    assert (not_causal[keep] - ref[keep]).abs().max() > 0.1
    not_causal_210 = unflat(varlen_210(flat(q), *(flat(x.repeat_interleave(4, 1)) for x in (k, v)), cu, cu, T, T))
    assert (not_causal_210[keep] - ref[keep]).abs().max() > 0.1
    wrong_order = unflat(varlen_211(flat(q), *(flat(x.repeat(1, 4, 1, 1)) for x in (k, v)), cu, cu, T, T,
                                    window_size=(-1, 0)))  # head h reads K/V head h % 2 instead of h // 4
    assert (wrong_order[keep] - ref[keep]).abs().max() > 0.1
    with pytest.raises(ValueError, match="same number of heads"):
        varlen_211(flat(q), flat(k), flat(v), cu, cu, T, T, window_size=(-1, 0))


def test_torch_without_varlen(monkeypatch):
    """A torch older than 2.10 (no varlen module): auto never picks varlen, and asking for it is the
    one-line error naming the torch version and the alternatives."""
    monkeypatch.setattr(attention, "VARLEN", None)
    for device in ("cpu", "cuda"):
        for dtype in (torch.bfloat16, torch.float32):
            assert resolve_backend("auto", torch.device(device), dtype) != "varlen"
    with pytest.raises(ValueError, match=rf"torch {re.escape(torch.__version__)} has no usable .*varlen_attn.*flex' or 'sdpa'"):
        resolve_backend("varlen", torch.device("cuda"), torch.bfloat16)
    from lion_min.run.config import ConfigError, check_values
    from lion_min.run.config import SFTConfig

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine with such a torch
    with pytest.raises(ConfigError, match=rf"^--attn_backend=varlen: torch {re.escape(torch.__version__)} has no usable "
                                          r".*; use --attn_backend=flex or sdpa$"):
        check_values(SFTConfig(attn_backend="varlen", device="auto", dtype="bfloat16"))
    monkeypatch.setattr(attention, "VARLEN", varlen_api(varlen_213))  # with varlen that run passes the check
    check_values(SFTConfig(attn_backend="varlen", device="auto", dtype="bfloat16"))
    with pytest.raises(ConfigError, match="not cuda float32"):
        check_values(SFTConfig(attn_backend="varlen", device="auto", dtype="float32"))
    with pytest.raises(ConfigError, match="not cpu bfloat16"):
        check_values(SFTConfig(attn_backend="varlen", device="cpu", dtype="bfloat16"))
