"""How much memory a training step needs per rank, and the activation checkpointing that fits it
(--activation_checkpointing=auto)."""

from typing import Optional

import torch
import torch.distributed as dist

from lion_min.core.choices import AC_MODES
from lion_min.core.model import checkpointing_mode
from lion_min.core.parallel import Dist

GiB = 2**30


def step_memory(args, tokens: int, world: int, param_dtype: torch.dtype, ac: str, live_ref: bool = False,
                head_chunk: int = 1024) -> dict[str, float]:
    """Estimated peak bytes one rank holds during a training step, by part; `tokens` per micro-batch.

    A first-order model, checked against the one recorded GPU peak (tests/test_parallel.py): FSDP2
    keeps fp32 master weights, fp32 gradients and AdamW's two fp32 moments sharded over the ranks,
    plus the gathered compute copy of about two blocks (the one running and the one prefetched) and
    of the embedding/head (kept gathered). Activations: a block that is not checkpointed keeps what
    eager autograd saves (listed below); a checkpointed block keeps its input only, and backward
    rebuilds one block at a time. The head holds a 2 x head_chunk x vocab
    fp32 slice of logits (forward and backward; losses.token_logprobs). 10% on top for the
    allocator, communication buffers and what this model leaves out.
    """
    s = torch.tensor([], dtype=param_dtype).element_size()
    fsdp = world > 1 or param_dtype != torch.float32
    P, D, V = args.num_params(), args.dim, args.vocab_size
    shard = world if fsdp else 1
    block = args.num_params(embedding=False) - (0 if args.tie_embeddings else V * D)  # the blocks' weights
    block //= max(args.n_layers, 1)
    qkv = (args.n_heads + 2 * args.n_kv_heads) * args.head_dim
    # What eager autograd keeps per token of a block that is not checkpointed (compiled blocks keep
    # somewhat less): the two norms' outputs, q/k/v after RoPE, the attention output and its copy
    # for the output projection, the MLP's gate, up, act(gate) and product; each norm's fp32 input,
    # fp32 normalised input and 1/rms (tests/test_parallel.py counts them on the CPU).
    per_token_block = (s * (2 * D + qkv + 2 * args.n_heads * args.head_dim + 4 * args.hidden_dim)
                       + 2 * 4 * (2 * D + 1))
    kept = {"off": args.n_layers, "selective": args.n_layers // 2, "full": 0}[ac]
    parts = {
        "weights (fp32 master)": P * 4 / shard,
        "gradients (fp32)": P * 4 / shard,
        "AdamW moments (fp32)": 2 * P * 4 / shard,
        "gathered compute weights": (2 * block + V * D * (1 if args.tie_embeddings else 2)) * s if fsdp else 0,
        "reference model": (P * s / shard + 2 * block * s) if live_ref else 0,
        "activations": tokens * (kept * per_token_block + (args.n_layers - kept) * s * D
                                 + (per_token_block if kept < args.n_layers else 0)),
        "head": 2 * head_chunk * V * 4 + tokens * D * (4 + 2 * s),
    }
    parts["slack (10%)"] = 0.1 * sum(parts.values())
    return parts


def min_free_memory(d: Dist) -> Optional[int]:
    """Free device memory now, the least over the ranks (so that every rank makes the same choice);
    None off CUDA."""
    if d.device.type != "cuda":
        return None
    free = torch.tensor(torch.cuda.mem_get_info(d.device)[0], device=d.device)
    if d.world > 1:
        dist.all_reduce(free, op=dist.ReduceOp.MIN)
    return int(free)


def choose_checkpointing(mode: str, args, tokens: int, world: int, param_dtype: torch.dtype, device: torch.device,
                         live_ref: bool = False, free_bytes: Optional[int] = None) -> tuple[str, str]:
    """(mode, one line saying why) for --activation_checkpointing=`mode` (see AC_MODES).

    auto: on CPU off (memory is the host's and there is no recompute worth buying); on CUDA the
    cheapest mode whose estimated step (step_memory) fits in 90% of the device memory free now:
    off, then selective, then full (full also when nothing fits: the least memory there is).
    """
    mode = checkpointing_mode(mode)
    est = {m: sum(step_memory(args, tokens, world, param_dtype, m, live_ref).values()) for m in AC_MODES[1:]}
    estimates = ", ".join(f"{m} {est[m] / GiB:.1f}" for m in AC_MODES[1:])
    if mode != "auto":
        return mode, f"{mode} (as asked; estimated GiB per rank: {estimates})"
    if device.type != "cuda":
        return "off", f"off (auto: {device.type}; estimated GiB per rank: {estimates})"
    free = torch.cuda.mem_get_info(device)[0] if free_bytes is None else free_bytes
    budget = 0.9 * free
    chosen = next((m for m in AC_MODES[1:] if est[m] <= budget), "full")
    fits = "" if est[chosen] <= budget else "; it may not fit: lower --micro_batch_size or use more ranks"
    return chosen, (f"{chosen} (auto: estimated GiB per rank {estimates} against 90% of {free / GiB:.1f} GiB "
                    f"free{fits})")
