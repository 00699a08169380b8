"""Writes that are never seen half-done: write beside the target, then rename over it."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path


def write_bytes(path: Path, data: bytes | Iterable[bytes]) -> None:
    """Write `data` (bytes, or pieces of it) to `path` so that a reader sees the old file or the whole new one.

    The bytes reach the disk (fsync) before the rename: otherwise a power cut can leave the new name pointing at
    an empty file, which is exactly the half-written state this exists to rule out.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            for piece in [data] if isinstance(data, bytes | bytearray | memoryview) else data:
                f.write(piece)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a failed write leaves the old file and nothing else
        raise


def write_text(path: Path, text: str | Iterable[str]) -> None:
    """`write_bytes` of UTF-8 text (a string, or pieces of it such as JSONL lines)."""
    pieces = [text] if isinstance(text, str) else text
    write_bytes(path, (piece.encode("utf-8") for piece in pieces))


def write_json(path: Path, content: object) -> None:
    write_text(path, json.dumps(content, indent=2, sort_keys=False) + "\n")


def replace_folder(tmp: Path, final: Path) -> None:
    """Move a finished folder `tmp` to `final`, replacing an older `final` without a moment where neither
    exists in a complete state under the final name."""
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def fresh_tmp_folder(final: Path) -> Path:
    """An empty temporary folder beside `final` (left-overs of a killed run are removed)."""
    tmp = final.with_name(f".{final.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp
