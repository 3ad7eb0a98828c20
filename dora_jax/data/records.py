"""Reading JSON list and JSON Lines files of records, with errors that name the file and line."""

from __future__ import annotations

import json
import pathlib
from typing import Any

from dora_jax.errors import DoraError


class DataError(DoraError):
    """A data file or record is malformed: the message names the file, the record and the field."""


def read_records(path: str | pathlib.Path) -> list[Any]:
    """The JSON values of a JSON list file, or of a ``.jsonl`` file (one per non-blank line)."""
    path = pathlib.Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if path.is_dir():
        raise DataError(f"{path}: a directory, not a JSON list or JSON Lines file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text (byte {err.start}: {err.reason}); save it as UTF-8") from None
    if path.suffix == ".jsonl":
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except ValueError as err:
                    raise DataError(f"{path}:{number}: not valid JSON ({err})") from None
        return records
    try:
        records = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}:{err.colno}: not valid JSON ({err.msg})") from None
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON list of records; got {type(records).__name__}")
    return records
