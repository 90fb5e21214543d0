"""Process group setup and the one function that wraps the model for training.

`python train_x.py` runs as a world of one; `torchrun --nproc_per_node=N train_x.py` (and its
multi-node form) sets RANK, WORLD_SIZE and LOCAL_RANK, read here, and MASTER_ADDR / MASTER_PORT,
which init_process_group reads.
"""

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lion_min.core.model import Transformer


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



def barrier(d: Dist):
    if d.world > 1:
        dist.barrier()


def parallelize(model: Transformer, d: Dist, *, param_dtype: torch.dtype, activation_checkpointing,
                compile: bool) -> Transformer:
    """Wrap `model` in place:

    1. activation checkpointing ('off', 'selective': every other block, 'full': every block;
       True / False mean full / off) is a setting, not a wrapper: Transformer.forward runs each
       chosen block through torch.utils.checkpoint at call time, around the (compiled) block, so
       backward recomputes that block's compiled forward. torchtitan instead wraps the block first
       and compiles the wrapper, which lets the compiler see the recomputation;
    2. torch.compile per block (small graphs compile fast and are reused by every layer),
    3. FSDP2 fully_shard on each block, on the two ends of the model, then on the root
       (torchtitan's units and order).

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
