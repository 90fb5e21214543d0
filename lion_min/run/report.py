"""Live metrics where users watch them: --report_to=none | tensorboard | wandb (the name TRL and the
Hugging Face Trainer use). Optional extras (requirements-report.txt), written by rank 0 only.

The scalars are metrics.jsonl's, read back from that file as it grows (sync), so both always hold
the same numbers: every numeric key of each line, at its "step". A resumed run appends to the
same run: TensorBoard's event files stay in out_dir/tensorboard/ (steps after the resumed one
are purged, as metrics.jsonl drops them), and W&B resumes the run whose id out_dir/wandb_id holds.
"""

import dataclasses
import importlib.util
import json
import secrets
from pathlib import Path

from lion_min.run.config import ConfigError

PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def check_report_to(name: str) -> None:
    """Before anything loads: the package --report_to needs is installed."""
    if name in PACKAGES and importlib.util.find_spec(PACKAGES[name]) is None:
        raise ConfigError(f"--report_to={name}: the {name} package is not installed (pip install {name}, or "
                          f"pip install -r requirements-report.txt)")


class Reporter:
    """Sends metrics.jsonl's new lines to the chosen tracker (nothing with --report_to=none or off rank 0)."""

    def __init__(self, cfg, main: bool, start: int):
        """start: the step training resumes from (0 for a fresh run); metrics.jsonl holds its lines so far."""
        self.kind = cfg.report_to if main else "none"
        out_dir = Path(cfg.out_dir)
        self.metrics = out_dir / "metrics.jsonl"
        self.offset = self.metrics.stat().st_size if self.metrics.is_file() else 0
        self.writer = self.run = None
        if self.kind == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: TensorBoard drops what an earlier attempt logged after the resumed step.
            self.writer = SummaryWriter(log_dir=str(out_dir / "tensorboard"), purge_step=start + 1 if start else None)
        elif self.kind == "wandb":
            import wandb

            id_file = out_dir / "wandb_id"
            run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(8)
            id_file.write_text(run_id)
            self.run = wandb.init(project="lion_min", name=out_dir.name, id=run_id, resume="allow", dir=str(out_dir),
                                  config=dataclasses.asdict(cfg))

    def sync(self) -> None:
        """Send the lines metrics.jsonl gained since the last call."""
        if self.kind == "none":
            return
        with self.metrics.open("rb") as f:
            f.seek(self.offset)
            new = f.read()
        done = new.rfind(b"\n") + 1  # whole lines only
        self.offset += done
        for raw in new[:done].splitlines():
            line = json.loads(raw)
            scalars = {k: v for k, v in line.items() if k != "step" and isinstance(v, (int, float))}
            if self.writer is not None:
                for k, v in scalars.items():
                    self.writer.add_scalar(k, v, line["step"])
                self.writer.flush()
            else:
                self.run.log(scalars, step=line["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.run is not None:
            self.run.finish()
        self.writer = self.run = None
