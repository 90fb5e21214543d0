"""The batch plan every stage trains on: which items each rank sees at each optimizer step and the
step's global normaliser (Batches; row_batches for packed rows, dpo.pair_batches for pairs), how
much of an eval set one pass takes, and the summary of that plan a run prints before training.
"""

from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from lion_min.core.chat import template_line
from lion_min.core.losses import IGNORE_INDEX
from lion_min.core.packing import collate
from lion_min.core.parallel import Dist
from lion_min.run.config import ConfigError


class Batches:
    """Which items each rank sees at each optimizer step: the plan every stage uses.

    Items (packed rows for SFT, preference pairs for DPO) are shuffled per epoch with a seeded
    permutation; step k of epoch e takes perm_e[k*B:(k+1)*B], rank r takes its contiguous share of
    those, and `make_micro(indices)` turns each run of micro_batch_size of them into the tensors of
    one forward pass. `norm(indices)` gives the step's global normaliser from the whole batch's
    indices. Every rank computes the same plan, so no communication is needed. The last
    incomplete batch of an epoch is dropped (reported as dropped_items).
    """

    def __init__(self, num_items: int, batch_size: int, micro_batch_size: int, epochs: int, seed: int, d: Dist,
                 make_micro: Callable[[np.ndarray], dict], norm: Callable[[np.ndarray], float], shuffle: bool = True,
                 unit: str = "items"):
        if batch_size % (micro_batch_size * d.world):
            raise ValueError(f"--batch_size={batch_size} must be a multiple of --micro_batch_size * world size "
                             f"= {micro_batch_size} * {d.world}")
        if num_items < batch_size:
            raise ValueError(f"only {num_items} {unit} of data for --batch_size={batch_size}: lower it or add data")
        self.num_items, self.batch_size, self.micro_batch_size = num_items, batch_size, micro_batch_size
        self.seed, self.d = seed, d
        self.make_micro, self.norm, self.shuffle = make_micro, norm, shuffle
        self.steps_per_epoch = num_items // batch_size
        self.num_steps = self.steps_per_epoch * epochs
        self.dropped_items = num_items - self.steps_per_epoch * batch_size
        self.per_rank = batch_size // d.world

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_items)
        return np.random.default_rng(self.seed + epoch).permutation(self.num_items)

    def micro_batches(self, step: int) -> tuple[list[dict], float]:
        epoch, k = divmod(step, self.steps_per_epoch)
        idx = self._order(epoch)[k * self.batch_size : (k + 1) * self.batch_size]
        mine = idx[self.d.rank * self.per_rank : (self.d.rank + 1) * self.per_rank]
        micros = [self.make_micro(mine[i : i + self.micro_batch_size])
                  for i in range(0, len(mine), self.micro_batch_size)]
        return micros, self.norm(idx)

    def first_pass(self) -> np.ndarray:
        """Every item once, in this rank's order of the first epoch: its share of step 0, 1, ... (so
        runs of micro_batch_size are the micro-batches of micro_batches(0), (1), ...), then its share
        of the items that epoch leaves out. DPO's precomputed reference scores the pairs this way, so
        step 1 compares policy and reference on the same rows."""
        order, n = self._order(0), self.steps_per_epoch * self.batch_size
        steps = order[:n].reshape(self.steps_per_epoch, self.d.world, self.per_rank)[:, self.d.rank]
        return np.concatenate([steps.reshape(-1), order[n:][self.d.rank :: self.d.world]])


def row_batches(rows, batch_size: int, micro_batch_size: int, epochs: int, seed: int, d: Dist,
                shuffle: bool = True) -> Batches:
    """Batches of packed rows (SFT); the normaliser is the global batch's number of target tokens.

    rows: Packed.rows (the four arrays in memory), or prepared rows on disk (prepare.PreparedRows:
    `take(sel)` builds the same arrays for the selected rows only; `row_targets` counts each row's
    targets)."""
    if isinstance(rows, dict):
        targets = (rows["targets"] != IGNORE_INDEX).sum(1)  # (rows,)

        def take(sel):
            return {k: v[sel] for k, v in rows.items()}
    else:
        targets, take = rows.row_targets, rows.take
    return Batches(
        len(targets), batch_size, micro_batch_size, epochs, seed, d,
        make_micro=lambda sel: collate(take(sel), d.device),
        norm=lambda sel: float(targets[sel].sum()),
        shuffle=shuffle, unit="packed rows",
    )


def eval_size(num_items: int, micro_batch_size: int, d: Dist, unit: str) -> int:
    """How many eval items one pass takes: the largest multiple of micro_batch_size * world (the
    rest is left out); fewer than one micro batch on every rank is an error, never a silent skip."""
    n = num_items - num_items % (micro_batch_size * d.world)
    if not n:
        raise ConfigError(f"only {num_items} eval {unit}, fewer than --micro_batch_size * world size = "
                          f"{micro_batch_size * d.world}: give more eval data or a smaller micro batch")
    return n


def opening_summary(cfg, batches, items: str, lines: dict[str, str], eval_items: int = 0,
                    export_dtype: Optional[torch.dtype] = None, tokenizer=None) -> str:
    """The block a run prints once before training (rank 0): the stage's own `lines` (data read and
    kept, rows or pairs, target tokens), then the eval set, the steps, what the last partial batch
    of each epoch leaves out, and what will be written where. `items` names what a batch holds."""
    total, per_epoch = cfg.max_steps or batches.num_steps, batches.steps_per_epoch
    if cfg.max_steps:
        steps = f"{total} (--max_steps; one epoch is {per_epoch} steps, so {total / per_epoch:.3g} epochs)"
    else:
        steps = f"{total} = {cfg.epochs} epoch(s) x {per_epoch} steps"
    world = batches.d.world
    accum = batches.batch_size // (batches.micro_batch_size * world)
    out = Path(cfg.out_dir)
    rows = dict(lines)
    if tokenizer is not None:
        rows["chat template"] = template_line(cfg.chat_template, tokenizer)
    if eval_items:
        where = cfg.eval_data or f"--eval_fraction={cfg.eval_fraction} of --data"
        when = f"every {cfg.eval_every} steps and at the end" if cfg.eval_every else "at the end"
        rows["eval"] = f"{eval_items} {items} from {where}, {when}"
    rows |= {
        "steps": steps,
        "batch": f"{batches.batch_size} {items} = {batches.micro_batch_size} per micro-batch x {accum} accumulated x "
                 f"{world} rank(s)",
        "left out": f"{batches.dropped_items} {items} per epoch (the last partial batch)",
        "writes": f"{out}/: the Hugging Face folder (weights in "
                  f"{str(export_dtype).removeprefix('torch.') if export_dtype else 'the training dtype'}), "
                  f"train_config.json, metrics.jsonl, summary.json",
        "checkpoints": (f"every {cfg.save_every} steps to {out / 'checkpoints'}/step_N ("
                        + (f"the last {cfg.keep_checkpoints} kept)" if cfg.keep_checkpoints else "all kept)")
                        if cfg.save_every else "none (--save_every=0)"),
    }
    width = max(map(len, rows))
    return "run:\n" + "\n".join(f"  {k:<{width}}  " + v.replace("\n", "\n" + " " * (width + 4))
                                    for k, v in rows.items())
