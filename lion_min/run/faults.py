"""How a multi-process run ends when something fails: one rank's error agreed on by every rank
(raise_if_any), a collective cut short by a rank that stopped (peer_gone), an error said once for
all ranks (say_once), and the exits that skip the interpreter's teardown, where gloo's threads can
hang or abort a rank (shutdown, exit_now)."""

import os
import re
import sys
import time
from typing import Optional

import torch.distributed as dist

from lion_min.core.parallel import Dist


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
        error.said_by_this_rank = True  # cli.run_cli prints it here, even an error every rank usually shares
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


FIRST_ERROR, READ = "lion_min/error_of_rank_0", "lion_min/error_of_rank_0_read"


def say_once(message: str, rank: int, shared: bool, wait_s: float = 5.0) -> None:
    """Print this rank's error line `message` (on stderr) where it should be. An error of a kind
    every rank usually meets alike (`shared`: a bad flag, a missing file) is said once, by rank 0;
    but a rank that failed alone (its own copy of a file) must say why, or the only line is rank
    0's "connection closed". So rank 0 posts its error in the process group's store, and another
    rank prints a shared error unless rank 0 posted the same one within wait_s. The store, not a
    collective: a rank still at work would never join one. Only in a started process group of
    several ranks (cli.run_cli says an error itself otherwise)."""
    store = dist.distributed_c10d._get_default_store()  # (torch has no public getter)
    try:
        if rank == 0:
            print(message, file=sys.stderr, flush=True)  # first: torchrun may end this rank any moment now
            store.set(FIRST_ERROR, message)
            # Rank 0 may host the store (env:// without torchrun's): it stays until the others read it.
            deadline = time.monotonic() + 2.0
            while store.add(READ, 0) < dist.get_world_size() - 1 and time.monotonic() < deadline:
                time.sleep(0.05)
            return
        if shared:
            deadline = time.monotonic() + wait_s
            while not store.check([FIRST_ERROR]):  # (polled: a store.wait that times out logs a warning)
                if time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            else:
                same = store.get(FIRST_ERROR).decode() == message
                store.add(READ, 1)
                if same:
                    return
    except RuntimeError:  # the store is gone (its host ended): say it here
        if rank == 0:
            return
    print(message, file=sys.stderr, flush=True)


def exit_now(code: int) -> None:
    """End a process with `code`; a rank of a process group skips the interpreter's teardown, where
    gloo's threads can hang or abort it (see shutdown), so that it exits at once."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        sys.exit(code)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
