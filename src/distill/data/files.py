"""Reading rows: files (JSONL, JSON, Parquet, CSV, plain text), folders of them, Hugging Face `save_to_disk` folders
and hub dataset ids -> (where, row) pairs, `where` naming the file and line for error messages.
"""

from __future__ import annotations

import csv
import glob
import json
from collections.abc import Iterator
from pathlib import Path

from distill.errors import DistillError

# Plain-text files (prose or source code) are one document each.
TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py"}
ROW_SUFFIXES = {".jsonl", ".json", ".parquet", ".csv"} | TEXT_SUFFIXES


def _files_under(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in ROW_SUFFIXES)
    if not files:
        raise DistillError(f"data folder {path} holds no {'/'.join(sorted(ROW_SUFFIXES))} files")
    return files


def _is_hf_dataset_folder(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists())


def _read_jsonl(path: Path) -> Iterator[tuple[str, object]]:
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                yield where, ValueError(f"not valid JSON ({e.msg})")


def _read_json(path: Path) -> Iterator[tuple[str, object]]:
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        # A .json file may also be JSON lines.
        if e.msg == "Extra data":
            yield from _read_jsonl(path)
            return
        raise DistillError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if isinstance(content, dict) and isinstance(content.get("data"), list):
        content = content["data"]
    if not isinstance(content, list):
        raise DistillError(f"{path}: expected a JSON list of rows")
    for number, row in enumerate(content, start=1):
        yield f"{path}[{number}]", row


def _read_csv(path: Path) -> Iterator[tuple[str, object]]:
    with path.open(encoding="utf-8", newline="") as f:
        for number, row in enumerate(csv.DictReader(f), start=2):
            yield f"{path}:{number}", dict(row)


def _read_parquet(path: Path) -> Iterator[tuple[str, object]]:
    import pyarrow.parquet as pq

    for number, row in enumerate(pq.read_table(path).to_pylist(), start=1):
        yield f"{path}[{number}]", row


def _read_hf(dataset, source: str) -> Iterator[tuple[str, object]]:
    for number, row in enumerate(dataset, start=1):
        yield f"{source} row {number}", row


def _load_hf(source: str, split: str):
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - datasets is a core dependency
        raise DistillError("reading Hugging Face datasets needs the `datasets` package") from e
    path = Path(source)
    try:
        ds = datasets.load_from_disk(str(path)) if path.exists() else datasets.load_dataset(source, split=split)
    except FileNotFoundError as e:
        raise DistillError(f"data {source}: {e}") from None
    except Exception as e:  # the hub client raises many types; all mean "could not get it"
        raise DistillError(f"could not load data set {source!r}: {type(e).__name__}: {e}".splitlines()[0]) from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DistillError(f"data set {source} has no split {split!r} (it has {', '.join(ds)})")
        ds = ds[split]
    return ds


def read_rows(source: str | Path, split: str = "train") -> Iterator[tuple[str, object]]:
    """Yield (where, row) for every row of a file, folder, glob pattern, `save_to_disk` folder or hub id.

    `where` names the file and line for error messages. A row that could not be parsed is yielded as an
    exception instance so the caller decides whether to stop or skip. A pattern (`src/**/*.py`) picks files of a
    folder that also holds files that are not rows (a package's JSON configs next to its code).
    """
    path = Path(source)
    if not path.exists() and any(c in str(source) for c in "*?["):
        files = sorted(Path(p) for p in glob.glob(str(source), recursive=True) if Path(p).is_file())
        if not files:
            raise DistillError(f"data pattern {source} matches no files")
        for file in files:
            yield from _read_file(file)
        return
    if not path.exists():
        if str(source).startswith((".", "/", "~")) or path.suffix.lower() in ROW_SUFFIXES:
            raise DistillError(f"data file {source} does not exist")
        yield from _read_hf(_load_hf(str(source), split), str(source))
        return
    if _is_hf_dataset_folder(path):
        yield from _read_hf(_load_hf(str(path), split), str(path))
        return
    for file in _files_under(path):
        yield from _read_file(file)


def _read_file(file: Path) -> Iterator[tuple[str, object]]:
    suffix = file.suffix.lower()
    try:
        if suffix == ".jsonl":
            yield from _read_jsonl(file)
        elif suffix == ".json":
            yield from _read_json(file)
        elif suffix == ".csv":
            yield from _read_csv(file)
        elif suffix == ".parquet":
            yield from _read_parquet(file)
        elif suffix in TEXT_SUFFIXES:
            yield str(file), {"text": file.read_text(encoding="utf-8")}
        else:
            raise DistillError(f"{file}: unsupported data file type {suffix!r}")
    except (OSError, UnicodeDecodeError) as e:
        raise DistillError(f"cannot read data file {file}: {e}") from None
