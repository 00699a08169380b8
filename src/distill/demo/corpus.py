"""The demo's data: the Python standard library's own source code, present wherever Python is.

The file list is deterministic (sorted relative paths under `sysconfig`'s stdlib folder), tests and vendored
or generated files are left out, and a fixed set of modules is held out for evaluation and never trained on.
The exact text differs a little between Python versions; the shipped teacher's TRAINING.md names the one it
was trained on.
"""

from __future__ import annotations

import json
import sysconfig
from collections.abc import Iterator
from pathlib import Path

# Modules the teacher never saw, present in Python 3.10 to 3.13. Small and mid-sized pure-Python modules of
# ordinary code (no generated tables), so held-out accuracy measures how well a model completes real code.
HELD_OUT = (
    "json/",
    "textwrap.py",
    "shlex.py",
    "fractions.py",
    "heapq.py",
    "bisect.py",
    "statistics.py",
    "calendar.py",
    "csv.py",
    "difflib.py",
    "fnmatch.py",
    "glob.py",
    "colorsys.py",
    "graphlib.py",
    "string.py",
)

# Folders never used: tests (huge and repetitive), third-party packages, generated data.
_EXCLUDED_PARTS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "pydoc_data"}
_EXCLUDED_PREFIXES = ("encodings/",)  # about a hundred generated codec tables
MAX_FILE_BYTES = 200_000  # leaves out the few very large files (_pydecimal.py)


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _is_held_out(relative: str) -> bool:
    return any(relative == h or (h.endswith("/") and relative.startswith(h)) for h in HELD_OUT)


def list_files(root: Path | None = None) -> tuple[list[str], list[str]]:
    """(train, held_out): relative paths of the corpus files, sorted, with '/' as separator."""
    root = root or stdlib_root()
    train, held_out = [], []
    for path in sorted(root.rglob("*.py"), key=lambda p: p.relative_to(root).as_posix()):
        relative = path.relative_to(root).as_posix()
        parts = relative.split("/")
        if _EXCLUDED_PARTS.intersection(parts[:-1]) or relative.startswith(_EXCLUDED_PREFIXES):
            continue
        if not path.is_file() or path.stat().st_size > MAX_FILE_BYTES:
            continue
        (held_out if _is_held_out(relative) else train).append(relative)
    return train, held_out


def read_source(relative: str, root: Path | None = None) -> str | None:
    """The file's text, or None when it is not UTF-8 (a handful of stdlib files carry other encodings)."""
    try:
        return ((root or stdlib_root()) / relative).read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None


def chunks(text: str, lines_per_chunk: int) -> Iterator[str]:
    """Consecutive blocks of whole lines: evaluation truncates each row, so long files are cut first."""
    lines = text.splitlines(keepends=True)
    for start in range(0, len(lines), lines_per_chunk):
        block = "".join(lines[start : start + lines_per_chunk])
        if block.strip():
            yield block


def write_jsonl(path: Path, rows) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    return count


def write_train(path: Path, files: list[str], root: Path | None = None) -> int:
    """One {"text": file} row per training file (training packs them into blocks)."""
    texts = (read_source(f, root) for f in files)
    return write_jsonl(path, ({"text": t} for t in texts if t))


def write_eval(path: Path, files: list[str], lines_per_chunk: int = 24, root: Path | None = None) -> int:
    """Held-out files cut into blocks of `lines_per_chunk` lines, one {"text": ...} row each."""
    rows = ({"text": c} for f in files for c in chunks(read_source(f, root) or "", lines_per_chunk))
    return write_jsonl(path, rows)


def _is_target_line(line: str) -> bool:
    """A line worth completing: real code, not blank, a comment, a lone bracket or a docstring fragment."""
    stripped = line.strip()
    return (
        len(stripped) >= 8
        and not stripped.startswith(("#", '"', "'"))
        and any(c.isalpha() for c in stripped)
        and stripped not in {"else:", "try:", "finally:"}
    )


def completion_rows(files: list[str], context_lines: int = 16, every: int = 7, root: Path | None = None) -> list[dict]:
    """Line completion on held-out code: {"prompt": the preceding lines, "answer": the next line, stripped}.

    The prompt stops at the end of the previous line, without its newline: byte-level BPE merges a newline with
    the next line's indentation, so a prompt ending in a bare newline would be split as no training text was.
    Every `every`-th qualifying line (outside docstrings, with at least `context_lines` lines before it) is a
    sample, so the set is deterministic and spread over all the held-out modules.
    """
    rows = []
    for f in files:
        lines = (read_source(f, root) or "").splitlines()
        in_docstring, seen = False, 0
        for i, line in enumerate(lines):
            quotes = line.count('"""') + line.count("'''")
            if in_docstring or quotes:
                in_docstring = in_docstring != (quotes % 2 == 1)
                continue
            if i < context_lines or not _is_target_line(line):
                continue
            seen += 1
            if seen % every == 0:
                rows.append({"prompt": "\n".join(lines[i - context_lines : i]), "answer": line.strip()})
    return rows


def write_completion(path: Path, files: list[str], context_lines: int = 16, every: int = 7, root=None) -> int:
    return write_jsonl(path, completion_rows(files, context_lines, every, root))
