"""Files that survive a crash: atomic writes for checkpoints and summaries, and an
append-only metrics log that a resumed run trims back to its checkpoint.

The metrics log is the one file written in place, a line at a time, so it is the one a crash
can leave torn: a node killed mid-append leaves half a line at the end (or, after a power
cut, a tail of NUL bytes). That tail is a crash's normal residue, not damage: readers skip
it and a resume drops it. A bad line *before* a good one is something else (no crash of
ours writes one), so it still raises."""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, rename over ``path``, fsync the folder.

    A reader (or a restart after a crash) sees either the old file or the new one, whole.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    # weights_only: a checkpoint is data; never let one run code on load.
    return torch.load(Path(path), map_location="cpu", weights_only=True)


class MetricsLog:
    """One JSON object per line. Opening with ``resume_step`` drops lines past that step,
    so a run resumed from a checkpoint does not log a step twice, and drops a torn last line
    left by a crash mid-append; the trimmed log replaces the old one atomically, so a second
    crash during the resume leaves one or the other."""

    def __init__(self, path: str | Path, resume_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            kept = [line for line, row in _rows(self.path)
                    if row.get("step", 0) <= resume_step]
            atomic_write_bytes(self.path, "".join(k + "\n" for k in kept).encode())
        self._fh = self.path.open("a")

    def write(self, row: dict[str, Any]) -> None:
        self._fh.write(json.dumps(row, sort_keys=True) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()


def _rows(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(line, parsed row) for each non-blank line, without a torn tail: unparseable lines
    at the end are dropped; one followed by a good line raises ValueError naming it."""
    # errors="replace": a tail torn inside a multi-byte character must not stop the read.
    lines = [ln for ln in path.read_bytes().decode("utf-8", "replace").split("\n")
             if ln.strip()]
    out: list[tuple[str, dict[str, Any]]] = []
    bad: int | None = None  # index of the first unparseable line since the last good one
    for i, line in enumerate(lines):
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not isinstance(row, dict):
            bad = i if bad is None else bad
            continue
        if bad is not None:
            raise ValueError(f"{path}: line {bad + 1} is not a JSON object, yet good lines "
                             f"follow it (not a torn tail): {lines[bad][:80]!r}")
        out.append((line, row))
    return out


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Every row of a metrics log; a torn last line (a crash, or a writer mid-append while
    we read) is left out."""
    return [row for _, row in _rows(Path(path))]
