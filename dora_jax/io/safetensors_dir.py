"""Memory-mapped reading of the safetensors files of an HF directory, one tensor at a time.

Reading the header ourselves (8-byte length, JSON, raw bytes) lets every dtype through
(bfloat16 and float8 via ml_dtypes, which safetensors' numpy reader refuses) and keeps host
memory near one tensor: a tensor is a view of the mapped file until the caller copies it.
"""

from __future__ import annotations

import json
import pathlib
import struct
from dataclasses import dataclass

import ml_dtypes
import numpy as np

from dora_jax.errors import TargetError

DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
INDEX = "model.safetensors.index.json"


class CheckpointError(TargetError):
    """An HF checkpoint directory lacks a file or a tensor, or a file is not valid safetensors."""


@dataclass(frozen=True)
class _Entry:
    file: pathlib.Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


def read_header(path: pathlib.Path) -> tuple[dict, int]:
    """The JSON header of a safetensors file and the offset where its data begins."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise CheckpointError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        (length,) = struct.unpack("<Q", raw)
        try:
            header = json.loads(f.read(length))
        except (ValueError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{path}: not a safetensors file (header is not JSON: {err})") from None
    return header, 8 + length


class SafetensorsDirectory:
    """The tensors of ``model.safetensors`` or of the shards an index file lists."""

    def __init__(self, directory: str | pathlib.Path):
        self.directory = pathlib.Path(directory)
        index = self.directory / INDEX
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted({self.directory / name for name in weight_map.values()})
            inside = self.directory.resolve()
            for file in files:
                if not file.resolve().is_relative_to(inside):
                    raise CheckpointError(f"{index}: shard {file.relative_to(self.directory)} lies outside {inside}")
        else:
            files = sorted(self.directory.glob("*.safetensors"))
        if not files:
            raise CheckpointError(
                f"{self.directory}: no *.safetensors file (PyTorch .bin checkpoints are not read; "
                "convert them with transformers' save_pretrained(safe_serialization=True))"
            )
        self.entries: dict[str, _Entry] = {}
        for file in files:
            if not file.exists():
                raise CheckpointError(f"{index}: lists {file.name}, which is not in {self.directory}")
            header, data_start = read_header(file)
            size = file.stat().st_size
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                if info["dtype"] not in DTYPES:
                    raise CheckpointError(f"{file}: tensor {name!r} has unsupported dtype {info['dtype']}")
                begin, end = info["data_offsets"]
                if data_start + end > size:
                    raise CheckpointError(
                        f"{file}: truncated: tensor {name!r} ends at byte {data_start + end}, the file has {size}"
                    )
                self.entries[name] = _Entry(
                    file, info["dtype"], tuple(info["shape"]), data_start + begin, data_start + end
                )
        self._maps: dict[pathlib.Path, np.memmap] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def names(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name].shape

    def read(self, name: str) -> np.ndarray:
        """One tensor read from its file into a new array: no mapping of the file stays behind, so that a
        loader reading tensor by tensor holds one at a time (a mapped file's read pages stay resident)."""
        entry = self.entries[name]
        with open(entry.file, "rb") as f:
            f.seek(entry.start)
            raw = np.fromfile(f, dtype=np.uint8, count=entry.end - entry.start)
        return raw.view(DTYPES[entry.dtype]).reshape(entry.shape)

    def get(self, name: str) -> np.ndarray:
        """A read-only view of one tensor (copy it to keep it beyond this object)."""
        entry = self.entries[name]
        if entry.file not in self._maps:
            self._maps[entry.file] = np.memmap(entry.file, dtype=np.uint8, mode="r")
        raw = self._maps[entry.file][entry.start : entry.end]
        return raw.view(DTYPES[entry.dtype]).reshape(entry.shape)
