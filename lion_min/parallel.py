"""Process group setup and the one function that wraps the model for training.

`python train_x.py` runs as a world of one; `torchrun --nproc_per_node=N train_x.py` (and its
multi-node form) sets RANK, WORLD_SIZE and LOCAL_RANK, read here, and MASTER_ADDR / MASTER_PORT,
which init_process_group reads.
"""

import os
import re
import sys
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from lion_min.choices import AC_MODES
from lion_min.model import Transformer, checkpointing_mode


@dataclass
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> Dist:
    """Start the process group when launched by torchrun; pick this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        store, _, _ = next(dist.rendezvous("env://", rank, world))  # MASTER_ADDR / MASTER_PORT: torchrun's
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", store=attempt_store(store), rank=rank,
                                world_size=world, device_id=dev if dev.type == "cuda" else None)
    return Dist(rank, world, local_rank, dev)


def attempt_store(store):
    """The store the process group keeps its keys in: under torchrun's agent-shared TCPStore, a
    part of it for this start of the workers alone.

    torchrun --max-restarts=N restarts the workers with the same TCPStore (the agent's, shared by
    default), where the process group's keys of the attempt that died are still kept: a restarted
    group read the dead workers' addresses and failed ("Gloo connectFullMesh failed ... Connection
    refused") or waited on them until the timeout (pytorch/pytorch#135712; 7 of 9 restarts here).
    Under a prefix named by torchrun's restart count each attempt reads only its own keys. On several
    nodes the agents' restart counts can differ (a node restarted by a membership change does not
    count it), so docs/multinode.md launches them with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: a fresh
    store for each start, used as is."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return store
    return dist.PrefixStore(f"lion_min/restart_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def all_reduce_sum(values: list[float], d: Dist) -> list[float]:
    """Sum a few Python floats over ranks (for logging exact global means)."""
    if d.world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=d.device)
    dist.all_reduce(t)
    return t.tolist()


def all_reduce_tensor(t: torch.Tensor, d: Dist) -> torch.Tensor:
    """Sum a tensor over ranks, on the device (no host sync)."""
    if d.world > 1:
        dist.all_reduce(t)
    return t


def shutdown() -> None:
    """End a multi-process run that finished: every rank waits for the others, leaves the process
    group, flushes its output and exits at once. The last step skips the interpreter's teardown,
    where gloo's threads can abort a finished rank ("terminate called without an active
    exception", about 1 run in 16 here even after destroy_process_group; 0 in 48 this way)."""
    if not dist.is_initialized():
        return
    several = dist.get_world_size() > 1  # a one-process group (bf16 FSDP) just leaves
    dist.barrier()
    dist.destroy_process_group()
    if several:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


class PeerFailed(ValueError):
    """Another rank failed and said so (raise_if_any); it prints the error, this rank exits quietly."""


def raise_if_any(error: Optional[BaseException], d: Dist) -> None:
    """Agree on a failure that may have happened on some ranks only (a full disk, NaN in one rank's
    shards, an export on rank 0): every rank passes its own error or None. The lowest failing rank
    raises its error, every other rank PeerFailed, so the run ends on all ranks with one message.
    Also a barrier. Call it where the ranks would otherwise go on to a collective that a failed
    rank never joins."""
    if d.world == 1:
        if error is not None:
            raise error
        return
    messages = [None] * d.world
    dist.all_gather_object(messages, None if error is None else str(error) or type(error).__name__)
    failed = [r for r, m in enumerate(messages) if m is not None]
    if not failed:
        return
    if d.rank == failed[0]:
        raise error
    raise PeerFailed(f"rank {failed[0]} failed: {messages[failed[0]]}")


# How gloo and NCCL report that a peer is gone (it failed, or was killed) during a collective.
_PEER_GONE = ("closed by peer", "reset by peer", "Connection refused", "NCCL communicator was aborted")


def peer_gone(e: BaseException) -> Optional[str]:
    """One line for a collective that failed because another rank stopped (its own error is the
    cause, printed by that rank), or None when `e` is something else."""
    if not (dist.is_initialized() and dist.get_world_size() > 1 and isinstance(e, RuntimeError)):
        return None
    text = str(e)
    if not (isinstance(e, dist.DistError) or any(s in text for s in _PEER_GONE)):
        return None
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(e).__name__)
    first = re.sub(r"^\[[^\]]*\.(cc|cpp):\d+\] ", "", first).split(". This is typically")[0]  # gloo's source path
    return f"rank {dist.get_rank()}: another rank stopped (its own error says why), so a collective failed: {first}"


def exit_now(code: int) -> None:
    """End a process with `code`; a rank of a process group skips the interpreter's teardown, where
    gloo's threads can hang or abort it (see shutdown), so that it exits at once."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        sys.exit(code)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def barrier(d: Dist):
    if d.world > 1:
        dist.barrier()


def parallelize(model: Transformer, d: Dist, *, param_dtype: torch.dtype, activation_checkpointing,
                compile: bool) -> Transformer:
    """Wrap `model` in place, in torchtitan's order:

    1. activation checkpointing ('off', 'selective': every other block, 'full': every block;
       True / False mean full / off; recompute those blocks in backward),
    2. torch.compile per block (small graphs compile fast and are reused by every layer),
    3. FSDP2 fully_shard on each block, on the two ends of the model, then on the root.

    FSDP is used when there is more than one rank or when training in bf16: its
    MixedPrecisionPolicy keeps fp32 master weights and reduces gradients in fp32 while computing in
    param_dtype. A single fp32 process runs the plain module.

    Units and when their gathered weights are freed (torchtitan's layout): each block is freed after
    its forward and gathered again in backward, so only about one block is ever whole. The ends are
    units of their own rather than part of the root, so that their all-gathers overlap with compute
    instead of all running before the first layer (1.05B parameters for Llama-3-8B): the embedding
    alone (needed again only at the very end of backward, so freed), and the final norm with the
    head (the last unit of forward is the first of backward, so kept). A tied head is the embedding
    matrix, so embedding, norm and head are then one unit, kept from the embedding's forward to the
    end of backward.
    """
    model.activation_checkpointing = activation_checkpointing
    if compile:
        for block in model.layers:
            block.compile()
    if d.world > 1 or param_dtype != torch.float32:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        if not dist.is_initialized():  # bf16 on one process: FSDP still needs a (trivial) group
            # An in-process store: no TCP port to pick, so nothing to collide with other jobs' ports.
            dist.init_process_group("nccl" if d.device.type == "cuda" else "gloo", store=dist.HashStore(),
                                    rank=0, world_size=1)
        mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
        if model.output is None:
            fully_shard([model.tok_embeddings, model.norm], mp_policy=mp, reshard_after_forward=False)
        else:
            fully_shard(model.tok_embeddings, mp_policy=mp, reshard_after_forward=True)
            fully_shard([model.norm, model.output], mp_policy=mp, reshard_after_forward=False)
        for block in model.layers:
            fully_shard(block, mp_policy=mp, reshard_after_forward=True)
        fully_shard(model, mp_policy=mp)
    return model


def build_model(args, d: Dist, *, load_weights=None, seed: int = 0, param_dtype=torch.float32,
                activation_checkpointing="off", compile: bool = False, attn_backend: str = "auto"):
    """Meta-device construction, wrapping, then weights: the torchtitan order.

    The module is built on the meta device (no memory), wrapped by `parallelize`, allocated on this
    rank's device (each rank only its shards under FSDP), and filled with full float32 weights that
    rank 0 alone reads (`load_weights()` -> a state dict with our names, on CPU) or, without it,
    initialises from `seed`; FSDP then hands every rank its shard. Master weights stay float32.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    with torch.device("meta"):
        model = Transformer(args)
    model.attn_backend = attn_backend
    parallelize(model, d, param_dtype=param_dtype, activation_checkpointing=activation_checkpointing, compile=compile)
    model.to_empty(device=d.device)
    model.init_buffers()
    state_dict = {}
    if d.main:
        if load_weights is not None:
            state_dict = load_weights()
        else:
            cpu_model = Transformer(args)
            cpu_model.init_weights(seed=seed)
            state_dict = cpu_model.state_dict()
        state_dict = {k: v.float() for k, v in state_dict.items() if k != "inv_freq"}
    if any(hasattr(p, "full_tensor") for p in model.parameters()):
        opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=d.world > 1)
        set_model_state_dict(model, state_dict, options=opts)
    else:
        model.load_state_dict(state_dict)
    return model


# --- how much memory a training step needs, and the activation checkpointing that fits ----------------

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
