"""Orbax training checkpoints: trainable state, optimizer state and step, plus JSON run metadata.

Never the frozen base weights: a checkpoint of a DoRA run holds A, B, m and their optimizer
state only. The metadata holds the data-iterator position and what the summary needs.
"""

from __future__ import annotations

import os
import pathlib
import sys
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

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

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


def latest_step(directory: str | pathlib.Path) -> int | None:
    """The newest step saved under ``directory``; None when there is none (or no directory)."""
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        return None
    manager = ocp.CheckpointManager(directory.absolute(), options=ocp.CheckpointManagerOptions(create=False))
    try:
        return manager.latest_step()
    finally:
        manager.close()


def all_steps(directory: str | pathlib.Path) -> list[int]:
    """Every step saved and kept under ``directory``, ascending (none without a directory)."""
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        return []
    manager = ocp.CheckpointManager(directory.absolute(), options=ocp.CheckpointManagerOptions(create=False))
    try:
        return sorted(manager.all_steps())
    finally:
        manager.close()


def stored_trainable(directory: str | pathlib.Path, step: int) -> Any:
    """The tree of the trainable state saved at ``step``, as metadata (shapes, dtypes; no values)."""
    manager = ocp.CheckpointManager(
        pathlib.Path(directory).absolute(),
        options=ocp.CheckpointManagerOptions(create=False),
        item_handlers={"state": ocp.PyTreeCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()},
    )
    try:
        return manager.item_metadata(step)["state"].tree["trainable"]
    finally:
        manager.close()


def restore_trainable(directory: str | pathlib.Path, step: int, abstract_trainable: Any) -> Any:
    """The trained state alone at ``step`` (not the optimizer state, which scoring and export do not
    need), placed with the shardings of ``abstract_trainable``."""
    manager = ocp.CheckpointManager(
        pathlib.Path(directory).absolute(), options=ocp.CheckpointManagerOptions(create=False)
    )
    item = {"trainable": abstract_trainable}
    restore = ocp.args.PyTreeRestore(
        item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True
    )
    try:
        return manager.restore(step, args=ocp.args.Composite(state=restore)).state["trainable"]
    finally:
        manager.close()
