"""flops.py against counts done by hand for a tiny model."""

import numpy as np
import pytest
import torch

from lion_min.core.args import ModelArgs
from lion_min.core.attention import dense_mask
from lion_min.core.model import Transformer
from lion_min.run.flops import (causal_pairs, document_lengths, flops_per_token, matmul_params, mfu, mfu_useful,
                                useful_flops)

# L 2, H 4 (2 kv), hd 8, dim 32, mlp 64, vocab 100.
# Per layer: q 32*32 + k 32*16 + v 32*16 + o 32*32 = 3072; mlp 3 * 32 * 64 = 6144; two norms 64.
# Untied: 2 * 9280 + final norm 32 + head 100 * 32 = 21792 (the embedding is a lookup, not counted).
# Tied: the embedding matrix is the head and counts once, as the head: 21792 as well.
ARGS = ModelArgs(vocab_size=100, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, hidden_dim=64)


def test_matmul_params_by_hand_and_by_module():
    assert matmul_params(ARGS) == 21792
    tied = ModelArgs(**{**ARGS.__dict__, "tie_embeddings": True})
    assert matmul_params(tied) == 21792
    # torchtitan counts module parameters minus the embedding (untied) or all of them (tied).
    untied_module = sum(p.numel() for p in Transformer(ARGS).parameters()) - 100 * 32
    assert matmul_params(ARGS) == untied_module
    assert matmul_params(tied) == sum(p.numel() for p in Transformer(tied).parameters())


def test_torchtitan_convention_by_hand():
    # 6 N + 12 L H hd T at T = 16: 6 * 21792 + 12 * 2 * 4 * 8 * 16 = 130752 + 12288.
    assert flops_per_token(ARGS, 16) == 143040
    # 2 rows of 16 tokens in 0.5 s on a 1e9 FLOP/s device.
    assert mfu(ARGS, 32, 16, 0.5, 1e9) == pytest.approx(143040 * 32 / 0.5 / 1e9)


def test_useful_flops_by_hand():
    doc_ids = np.array([[0, 0, 0, 1, 1, -1, -1, -1], [2, 2, 2, 2, 2, 2, 2, 3]])
    assert document_lengths(doc_ids) == [3, 2, 7, 1]
    assert document_lengths(torch.from_numpy(doc_ids)) == [3, 2, 7, 1]
    # 13 real tokens; causal pairs 6 + 3 + 28 + 1 = 38; 12 L H hd = 768 per pair.
    assert useful_flops(ARGS, [3, 2, 7, 1]) == 6 * 21792 * 13 + 768 * 38
    assert mfu_useful(ARGS, [3, 2, 7, 1], 2.0, 1e6) == pytest.approx((6 * 21792 * 13 + 768 * 38) / 2.0 / 1e6)
    # One full causal document per row: the useful attention is (T + 1) / (2 T) of the convention's.
    T = 16
    convention_attn = flops_per_token(ARGS, T) * T - 6 * 21792 * T
    assert useful_flops(ARGS, [T]) - 6 * 21792 * T == convention_attn * (T + 1) / (2 * T)


def test_useful_flops_on_sliding_window_layers():
    # Layer 0 slides with a window of 3, layer 1 is global. Documents [3, 2, 7, 1]: layer 0 pairs
    # 6 + 3 + (1 + 2 + 3 * 5) + 1 = 28, layer 1 the causal 38; 12 H hd = 384 per pair and layer.
    args = ModelArgs(**{**ARGS.__dict__, "layer_types": ("sliding_attention", "full_attention"), "sliding_window": 3})
    assert useful_flops(args, [3, 2, 7, 1]) == 6 * 21792 * 13 + 384 * (28 + 38)
    # The count is the attention mask's own: the true entries of the model's mask for one row.
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2, 2, 2, 2, 3]])
    slots = torch.arange(doc_ids.shape[1])
    for window in (None, 1, 3, 5, 100):
        assert sum(causal_pairs(n, window) for n in [3, 2, 7, 1]) == int(dense_mask(doc_ids, slots, doc_ids, slots, window).sum())
