"""One run per workdir: a lock file naming its owner (pid, host), stale locks detected.

``workdir/.lock`` is created atomically (``O_EXCL``); a second run in the same workdir is refused
by name. A lock whose process no longer runs on this host is stale (a killed run) and is taken
over; a lock from another host cannot be checked and is refused with how to remove it.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import socket
import sys
import time
from collections.abc import Iterator

from dora_jax.errors import ConfigError

NAME = ".lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True


def _owner(path: pathlib.Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def acquire(workdir: pathlib.Path) -> pathlib.Path:
    """Creates ``workdir/.lock`` for this process; ConfigError when another live run holds it."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / NAME
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            owner = _owner(path)
            same_host = owner.get("host") == me["host"]
            if same_host and isinstance(owner.get("pid"), int) and not _alive(owner["pid"]):
                print(f"{path}: stale lock of pid {owner['pid']} (no longer running) taken over", file=sys.stderr)
                path.unlink(missing_ok=True)
                continue
            where = f"pid {owner.get('pid')} on host {owner.get('host')} since {owner.get('since')}"
            hint = "" if same_host else f"; if that run is gone, delete {path}"
            raise ConfigError(f"{workdir} is in use by another run ({where}){hint}") from None
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return path
    raise ConfigError(f"{path}: could not take the lock")


@contextlib.contextmanager
def held(workdir: pathlib.Path, enabled: bool = True) -> Iterator[None]:
    """The workdir lock for the duration of a block (a no-op when not ``enabled``: other hosts)."""
    path = acquire(workdir) if enabled else None
    try:
        yield
    finally:
        if path is not None:
            path.unlink(missing_ok=True)
