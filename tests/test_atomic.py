"""The one atomic writer: a reader sees the old file or the whole new one, never a part."""

from __future__ import annotations

import pytest

from distill import atomic


def test_text_bytes_and_pieces_are_written_whole(tmp_path):
    atomic.write_text(tmp_path / "a.txt", "héllo")
    atomic.write_text(tmp_path / "b.jsonl", (f'{{"i": {i}}}\n' for i in range(3)))
    atomic.write_bytes(tmp_path / "c.bin", [b"ab", b"cd"])
    atomic.write_json(tmp_path / "d.json", {"k": [1, 2]})
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "héllo"
    assert (tmp_path / "b.jsonl").read_text().splitlines() == ['{"i": 0}', '{"i": 1}', '{"i": 2}']
    assert (tmp_path / "c.bin").read_bytes() == b"abcd"
    assert (tmp_path / "d.json").read_text() == '{\n  "k": [\n    1,\n    2\n  ]\n}\n'


def test_a_write_that_fails_midway_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "rows.jsonl"
    atomic.write_text(target, "old\n")

    def pieces():
        yield "new 1\n"
        raise RuntimeError("killed while writing")

    with pytest.raises(RuntimeError):
        atomic.write_text(target, pieces())
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["rows.jsonl"]
