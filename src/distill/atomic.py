"""Writes that are never seen half-done: write beside the target, then rename over it."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path


def write_text(path: Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


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
