"""Where a run's numbers go: stdout, ``metrics.jsonl`` and TensorBoard events in the workdir, and a progress bar."""

from __future__ import annotations

import json
import pathlib
import sys
from typing import Any

from tqdm import tqdm


class _Progress:
    """A tqdm bar (step, loss, tokens/s, ETA) that can be switched off."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.bar = (
            tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr) if enabled else None
        )

    def update_to(self, step: int, **postfix: float) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class MetricsWriter:
    """Appends scalars to ``metrics.jsonl`` and TensorBoard event files; prints eval results."""

    def __init__(self, workdir: str | pathlib.Path, enabled: bool = True):
        self.enabled = enabled
        self.workdir = pathlib.Path(workdir)
        self.tensorboard = None
        if enabled:
            from tensorboardX import SummaryWriter

            self.tensorboard = SummaryWriter(str(self.workdir / "tensorboard"))

    def write(self, step: int, scalars: dict[str, Any]) -> None:
        if not self.enabled:
            return
        scalars = {k: float(v) for k, v in scalars.items()}
        with open(self.workdir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **scalars}) + "\n")
        for key, value in scalars.items():
            self.tensorboard.add_scalar(key, value, step)
        if any(k.startswith("eval/") for k in scalars):
            print(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in scalars.items()), flush=True)

    def progress(self, total: int, initial: int, enabled: bool) -> _Progress:
        return _Progress(total, initial, enabled and self.enabled)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
