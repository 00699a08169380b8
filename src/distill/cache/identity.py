"""Who built a cache: the hashes of the tokenizer and of the teacher's files, checked again before training."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from distill.cache.format import TOKENIZER_DIR

_HASH_CHUNK = 1 << 20


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(_HASH_CHUNK):
            h.update(block)
    return h.hexdigest()


def tokenizer_hash(tokenizer) -> str:
    """sha256 of what decides token ids: the backend tokenizer's model/normalizer/pre-tokenizer, the special
    ids and the chat template. Padding and truncation settings (mutable at run time) are left out."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        spec.pop("padding", None)
        spec.pop("truncation", None)
        h.update(json.dumps(spec, sort_keys=True).encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    extra = {
        "size": len(tokenizer),
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "pad": tokenizer.pad_token_id,
        "chat_template": getattr(tokenizer, "chat_template", None),
    }
    h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return h.hexdigest()


def teacher_files(path: str, known: dict | None = None) -> dict[str, dict]:
    """{file name: {bytes, mtime_ns, sha256}} of a local teacher folder's config and weight files ({} for a hub id).

    `known` is an earlier result for the same folder: a file whose size and modification time (in ns) are both
    unchanged keeps its recorded sha256 instead of being read again, the same trust that make and rsync place
    in (size, mtime). Anything else is hashed.
    """
    folder = Path(path)
    if not folder.is_dir():
        return {}
    known = known or {}
    files = {}
    for file in sorted(folder.iterdir()):
        if not file.is_file() or not (
            file.name == "config.json" or file.suffix in {".safetensors", ".bin"} or file.name.endswith(".index.json")
        ):
            continue
        stat = file.stat()
        before = known.get(file.name, {})
        same = before.get("bytes") == stat.st_size and before.get("mtime_ns") == stat.st_mtime_ns
        digest = before["sha256"] if same and "sha256" in before else _sha256_file(file)
        files[file.name] = {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}
    return files


def teacher_hash(path: str, revision: str | None = None, files: dict[str, dict] | None = None) -> str:
    """sha256 of a local teacher folder's config and weight files (names and contents; `files` as given by
    `teacher_files`, computed when omitted); for a hub id, of the id and revision only (the hub's own commit
    pins the rest)."""
    h = hashlib.sha256()
    if not Path(path).is_dir():
        h.update(f"hub:{path}@{revision}".encode())
        return h.hexdigest()
    files = teacher_files(path) if files is None else files
    for name in sorted(files):
        h.update(name.encode() + b"\0" + files[name]["sha256"].encode())
    return h.hexdigest()


def _known_teacher_files(manifest: dict, path: str) -> dict | None:
    """The file records an earlier build kept for the same teacher folder, if any."""
    t = manifest.get("teacher", {})
    if t.get("path") is None or os.path.abspath(t["path"]) != os.path.abspath(path):
        return None
    return t.get("files")


def _tokenizer_files(root: Path) -> dict[str, str]:
    folder = root / TOKENIZER_DIR
    return {p.name: _sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file()} if folder.is_dir() else {}
