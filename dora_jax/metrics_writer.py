"""Where a run's numbers go: stdout, ``metrics.jsonl`` and TensorBoard events in the workdir, and a progress bar."""

from __future__ import annotations

import json
import math
import pathlib
import sys
from typing import Any

from tqdm import tqdm


def strict(value: Any) -> Any:
    """``value`` with every non-finite float as None, so that it is strict JSON (``allow_nan=False``):
    a NaN or infinite metric reads as null in metrics.jsonl and summary.json."""
    if isinstance(value, dict):
        return {k: strict(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [strict(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def dumps(value: Any, **kwargs: Any) -> str:
    """Strict JSON of ``value`` (non-finite floats as null)."""
    return json.dumps(strict(value), allow_nan=False, **kwargs)


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

    def __init__(self, workdir: str | pathlib.Path, enabled: bool = True, resumed_at: int | None = None):
        """``resumed_at``: the checkpoint step a resumed run restarts from; rows and events written
        after it by the interrupted invocation are dropped (they are computed again)."""
        self.enabled = enabled
        self.workdir = pathlib.Path(workdir)
        self.tensorboard = None
        if enabled:
            from tensorboardX import SummaryWriter

            if resumed_at is not None:
                self._truncate(resumed_at)
            purge = None if resumed_at is None else resumed_at + 1  # TensorBoard hides older events from there on
            self.tensorboard = SummaryWriter(str(self.workdir / "tensorboard"), purge_step=purge)

    def _truncate(self, step: int) -> None:
        path = self.workdir / "metrics.jsonl"
        if path.exists():
            rows = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
            path.write_text("".join(row + "\n" for row in rows))

    def write(self, step: int, scalars: dict[str, Any]) -> None:
        if not self.enabled:
            return
        scalars = {k: float(v) for k, v in scalars.items()}
        with open(self.workdir / "metrics.jsonl", "a") as f:
            f.write(dumps({"step": step, **scalars}) + "\n")
        for key, value in scalars.items():
            self.tensorboard.add_scalar(key, value, step)
        if any(k.startswith("eval/") for k in scalars):
            print(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in scalars.items()), flush=True)

    def progress(self, total: int, initial: int, enabled: bool) -> _Progress:
        return _Progress(total, initial, enabled and self.enabled)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
