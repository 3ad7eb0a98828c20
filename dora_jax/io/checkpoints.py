"""Orbax training checkpoints: trainable state, optimizer state and step, plus JSON run metadata.

Never the frozen base weights: a checkpoint of a DoRA run holds A, B, m and their optimizer
state only. The metadata holds the data-iterator position and what the summary needs.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import sys
from collections.abc import Iterator
from typing import Any

import orbax.checkpoint as ocp

from dora_jax.errors import ConfigError


class Checkpoints:
    """keep-last-N (and every step divisible by ``keep_period``), optionally asynchronous checkpoints."""

    def __init__(self, directory: str | pathlib.Path, keep: int, async_save: bool, keep_period: int = 0):
        self.directory = pathlib.Path(directory).absolute()
        self.options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            keep_period=keep_period or None,  # steps divisible by it are kept as well (snapshots)
            enable_async_checkpointing=async_save,
            create=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=self.options)

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        self.manager.save(
            step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        )

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
        """The state at ``step``, placed with the shardings of ``abstract_state``, and its metadata."""
        restored = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
        )
        return restored.state, restored.meta

    def restore_newest_intact(self, abstract_state: Any, check: Any = None) -> tuple[int, Any, dict[str, Any]] | None:
        """(step, state, meta) of the newest step that restores, or None when there is no step.

        A newer step that fails to restore (a truncated or missing file, broken metadata) is named
        on stderr and moved aside to ``damaged-<step>`` (kept for inspection, not deleted) so that
        the run can save that step again. ``check(step)`` may raise a DoraError to refuse a step
        outright. With no intact step at all: a CheckpointDamaged error listing each step's
        problem, and nothing moved or deleted.
        """
        from dora_jax.errors import DoraError

        problems = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                if check is not None:
                    check(step)
                state, meta = self.restore(step, abstract_state)
            except DoraError:
                raise
            except Exception as err:  # noqa: BLE001 (any failure to read a step means it is damaged)
                problems.append((step, f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300]}"))
                continue
            for bad, why in problems:
                aside = self.directory / f"damaged-{bad}"
                os.replace(self.directory / str(bad), aside)
                print(
                    f"checkpoint step {bad} is damaged ({why}); moved to {aside}; resuming from step {step}",
                    file=sys.stderr,
                    flush=True,
                )
            if problems:
                self.manager.close()
                self.manager = ocp.CheckpointManager(self.directory, options=self.options)
            return step, state, meta
        if problems:
            details = "; ".join(f"step {step}: {why}" for step, why in problems)
            raise CheckpointDamaged(f"{self.directory}: no checkpoint restores ({details}); nothing was deleted")
        return None

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


class CheckpointDamaged(ConfigError):
    """Every saved step of a run fails to restore."""


@contextlib.contextmanager
def _reading(directory: str | pathlib.Path, **kwargs: Any) -> Iterator[ocp.CheckpointManager]:
    """A CheckpointManager that reads ``directory`` (never creates it), closed after the block."""
    manager = ocp.CheckpointManager(
        pathlib.Path(directory).absolute(), options=ocp.CheckpointManagerOptions(create=False), **kwargs
    )
    try:
        yield manager
    finally:
        manager.close()


def all_steps(directory: str | pathlib.Path) -> list[int]:
    """Every step saved and kept under ``directory``, ascending (none without a directory)."""
    if not pathlib.Path(directory).is_dir():
        return []
    with _reading(directory) as manager:
        return sorted(manager.all_steps())


def latest_step(directory: str | pathlib.Path) -> int | None:
    """The newest step saved under ``directory``; None when there is none (or no directory)."""
    steps = all_steps(directory)
    return steps[-1] if steps else None


def stored_trainable(directory: str | pathlib.Path, step: int) -> Any:
    """The tree of the trainable state saved at ``step``, as metadata (shapes, dtypes; no values)."""
    handlers = {"state": ocp.PyTreeCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
    with _reading(directory, item_handlers=handlers) as manager:
        return manager.item_metadata(step)["state"].tree["trainable"]


def restore_trainable(directory: str | pathlib.Path, step: int, abstract_trainable: Any) -> Any:
    """The trained state alone at ``step`` (not the optimizer state, which scoring and export do not
    need), placed with the shardings of ``abstract_trainable``."""
    item = {"trainable": abstract_trainable}
    restore = ocp.args.PyTreeRestore(
        item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True
    )
    with _reading(directory) as manager:
        return manager.restore(step, args=ocp.args.Composite(state=restore)).state["trainable"]
