"""FLOP counts and model FLOPs utilisation (MFU): the one place where the formulas are written.

MFU = model FLOPs of the work done / seconds / the device's peak dense bf16 FLOP/s. Per trained
token, forward + backward (backward = 2 x forward; an (m, k) x (k, n) matmul is 2 m k n FLOPs):

- weights: 6 N, where N counts the parameters used in matmuls: all of them except the input
  embedding (a lookup), unless the head is tied to it, when that matrix counts once, as the head.
- attention: QK^T and PV cost 2 hd FLOPs each per (query, key) pair and head in forward, so
  12 hd H per pair and layer with backward. FlashAttention's recomputation in backward is not
  counted (it is not model work).

Two ways to count the (query, key) pairs:
- `mfu`, torchtitan's convention (also PaLM's and nanoGPT's; torchtitan's
  get_dense_model_nparams_and_flops writes it 6 * L * H * (2 * hd) * T): every token of a
  T-token row is paired with all T tokens, i.e. 6 N + 12 L H hd T per token. It counts the
  masked half of causal attention and every cross-document pair of a packed row, so it is
  comparable with published figures, not a measure of useful work.
- `mfu_useful`: the pairs the model needs, n (n + 1) / 2 per document of n tokens (causal within
  the document; on a Gemma-2/3 sliding-window layer each query pairs with at most `window` keys),
  and 6 N for real tokens only (padding excluded).
"""

from typing import Iterable, Optional

import numpy as np
import torch

from lion_min.core.args import ModelArgs

# Device name substring -> (dense bf16 FLOP/s, HBM bytes/s), from the spec sheets. First match wins,
# so the H100 variants come before "H100" (the SXM part, "NVIDIA H100 80GB HBM3").
DEVICE_PEAKS = (
    ("H100 PCIe", (756e12, 2.0e12)),
    ("H100 NVL", (835e12, 3.9e12)),
    ("H100", (989e12, 3.35e12)),
    ("H200", (989e12, 4.8e12)),
    ("A100", (312e12, 2.0e12)),
)


def device_peaks(device: torch.device) -> Optional[tuple[float, float]]:
    """(peak dense bf16 FLOP/s, HBM bytes/s) of a known CUDA device, else None."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peaks for key, peaks in DEVICE_PEAKS if key in name), None)


def peak_flops(device: torch.device) -> Optional[float]:
    peaks = device_peaks(device)
    return peaks[0] if peaks else None


def matmul_params(args: ModelArgs) -> int:
    """N of the 6 N term: the parameters used in matmuls (see the module docstring)."""
    return args.num_params(embedding=False) + (args.vocab_size * args.dim if args.tie_embeddings else 0)


def attention_flops_per_pair(args: ModelArgs) -> int:
    """Forward + backward FLOPs of one (query, key) pair, summed over heads and layers."""
    return 12 * args.n_layers * args.n_heads * args.head_dim


def causal_pairs(n: int, window: Optional[int] = None) -> int:
    """(query, key) pairs of a causal document of n tokens: each token with itself and the tokens
    before it, at most `window` of them on a sliding-window layer (core/attention.py's rule)."""
    if window is None or n <= window:
        return n * (n + 1) // 2
    return window * (window + 1) // 2 + (n - window) * window


def flops_per_token(args: ModelArgs, seq_len: int) -> float:
    """torchtitan's convention: 6 N + 12 L H hd T for a row of T = seq_len tokens."""
    return 6 * matmul_params(args) + attention_flops_per_pair(args) * seq_len


def document_lengths(doc_ids) -> list[int]:
    """doc_ids (B, T) (numpy or torch; -1 = padding) -> the length of every document, row by row.

    A document is a run of equal ids within a row (the packer's layout). Pass the host copy of
    the batch where there is one: a CUDA tensor costs a device-to-host copy (a sync)."""
    ids = np.asarray(doc_ids.cpu() if isinstance(doc_ids, torch.Tensor) else doc_ids)
    lengths = []
    for row in ids.reshape(-1, ids.shape[-1]):
        starts = np.flatnonzero(np.r_[True, row[1:] != row[:-1]])
        runs = np.diff(np.r_[starts, len(row)])
        lengths += runs[row[starts] >= 0].tolist()
    return lengths


def useful_flops(args: ModelArgs, doc_lengths: Iterable[int]) -> float:
    """Model FLOPs of training on these documents: 6 N per real token plus causal attention
    within each document, layer by layer (a sliding-window layer pairs fewer tokens)."""
    lengths = list(doc_lengths)
    per_layer_pair = attention_flops_per_pair(args) // args.n_layers
    pairs = sum(causal_pairs(n, args.window(layer)) for layer in range(args.n_layers) for n in lengths)
    return 6 * matmul_params(args) * sum(lengths) + per_layer_pair * pairs


def mfu(args: ModelArgs, num_tokens: int, seq_len: int, seconds: float, peak: float) -> float:
    """torchtitan-convention MFU of `num_tokens` row tokens (padding included) in rows of seq_len
    tokens, processed in `seconds` on a device of `peak` FLOP/s."""
    return flops_per_token(args, seq_len) * num_tokens / seconds / peak


def mfu_useful(args: ModelArgs, doc_lengths: Iterable[int], seconds: float, peak: float) -> float:
    """MFU counting only useful work: real tokens and document-causal attention (document_lengths
    gives the lengths from a batch's doc_ids)."""
    return useful_flops(args, doc_lengths) / seconds / peak
