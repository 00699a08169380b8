"""`distill serve` (OpenAI-compatible server) and `distill generate` against endpoints: the real server on
127.0.0.1, stub servers for API keys, retries and errors, and a server killed mid-run."""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import torch

from conftest import write_jsonl
from distill.config import recipe_from_dict
from distill.errors import DistillError
from distill.generate.client import EndpointClient, backoff_seconds, retry_after_seconds
from distill.generate.run import generate
from distill.generate.server import bind, build_server, create_app, load_served_model

PROMPTS = [{"prompt": "def add(a, b):"}, {"prompt": "the quick brown"}, {"prompt": "for i in"}]
CHAT = [{"messages": [{"role": "user", "content": "hello teacher"}]}]


def quiet(_line: str) -> None:
    pass


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


def forward_logprobs(served, ids: list[int]) -> torch.Tensor:
    """Reference: log_softmax of one plain forward pass over the tokenizer's vocabulary; row i predicts token i+1."""
    with torch.no_grad():
        logits = served.model(torch.tensor([ids])).logits[0, :, : served.vocab]  # (T, V)
    return torch.log_softmax(logits.float(), dim=-1)


def endpoint_recipe(url: str, prompts: Path, out: Path, **generate_fields) -> object:
    fields = {"prompts": str(prompts), "output": str(out), "max_new_tokens": 8, "max_retries": 2, "backoff_s": 0.01}
    fields.update(generate_fields)
    return recipe_from_dict({"teacher": {"endpoint": url, "model_name": "teacher"}, "generate": fields})


def read_rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# ---------------------------------------------------------------- the server itself


def test_models_lists_the_served_model(url):
    body = httpx.get(f"{url}/models").json()
    assert body["object"] == "list" and [m["id"] for m in body["data"]] == ["teacher"]


def test_completion_logprobs_equal_local_model(url, served):
    body = {
        "model": "teacher",
        "prompt": "def add(a, b):",
        "max_tokens": 6,
        "temperature": 0,
        "logprobs": 4,
        "return_tokens_as_token_ids": True,
        "n": 2,
    }
    answer = httpx.post(f"{url}/completions", json=body).json()
    prompt_ids = served.tokenizer("def add(a, b):")["input_ids"]
    assert answer["object"] == "text_completion" and len(answer["choices"]) == 2
    usage = {"prompt_tokens": len(prompt_ids), "completion_tokens": 12, "total_tokens": len(prompt_ids) + 12}
    assert answer["usage"] == usage
    choice = answer["choices"][0]
    ids = [int(t.removeprefix("token_id:")) for t in choice["logprobs"]["tokens"]]
    assert choice["text"] == served.tokenizer.decode(ids) and choice["finish_reason"] == "length"
    reference = forward_logprobs(served, prompt_ids + ids)[len(prompt_ids) - 1 : -1]  # (6, V)
    for step, (token, lp, top) in enumerate(
        zip(ids, choice["logprobs"]["token_logprobs"], choice["logprobs"]["top_logprobs"], strict=True)
    ):
        assert abs(reference[step, token].item() - lp) < 1e-4
        assert token == int(reference[step].argmax())  # greedy
        top_ids = [int(t.removeprefix("token_id:")) for t in top]
        assert torch.allclose(reference[step, top_ids], torch.tensor(list(top.values())), atol=1e-4)
        assert torch.allclose(reference[step].topk(4).values, torch.tensor(sorted(top.values())[::-1]), atol=1e-4)
    assert answer["choices"][1]["text"] == choice["text"]


def test_echo_returns_the_prompts_logprobs(url, served):
    body = {"prompt": "the quick brown fox", "max_tokens": 0, "echo": True, "logprobs": 2}
    answer = httpx.post(f"{url}/completions", json=body).json()
    choice = answer["choices"][0]
    prompt_ids = served.tokenizer("the quick brown fox")["input_ids"]
    assert choice["text"] == "the quick brown fox"
    assert choice["logprobs"]["tokens"] == [served.tokenizer.decode([i]) for i in prompt_ids]
    token_logprobs = choice["logprobs"]["token_logprobs"]
    assert token_logprobs[0] is None and choice["logprobs"]["top_logprobs"][0] is None
    reference = forward_logprobs(served, prompt_ids)
    for i in range(1, len(prompt_ids)):
        assert abs(reference[i - 1, prompt_ids[i]].item() - token_logprobs[i]) < 1e-4
    assert answer["usage"]["completion_tokens"] == 0


def test_chat_completion_with_top_logprobs(url, served):
    messages = [{"role": "user", "content": "hello teacher"}]
    body = {"messages": messages, "max_tokens": 5, "logprobs": True, "top_logprobs": 3, "seed": 7}
    answer = httpx.post(f"{url}/chat/completions", json={**body, "return_tokens_as_token_ids": True}).json()
    assert answer["object"] == "chat.completion"
    choice = answer["choices"][0]
    assert choice["message"]["role"] == "assistant"
    content = choice["logprobs"]["content"]
    assert len(content) == answer["usage"]["completion_tokens"] == 5
    ids = [int(c["token"].removeprefix("token_id:")) for c in content]
    assert served.tokenizer.decode(ids) == choice["message"]["content"]
    prompt = served.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt_ids = served.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert answer["usage"]["prompt_tokens"] == len(prompt_ids)
    reference = forward_logprobs(served, prompt_ids + ids)[len(prompt_ids) - 1 : -1]  # (5, V)
    for step, c in enumerate(content):
        assert abs(reference[step, ids[step]].item() - c["logprob"]) < 1e-4
        top_ids = [int(t["token"].removeprefix("token_id:")) for t in c["top_logprobs"]]
        assert torch.allclose(reference[step].topk(3).values, torch.tensor([t["logprob"] for t in c["top_logprobs"]]))
        assert torch.allclose(reference[step, top_ids], torch.tensor([t["logprob"] for t in c["top_logprobs"]]))
    # The same seed gives the same sample; token strings without the extension.
    again = httpx.post(f"{url}/chat/completions", json=body).json()["choices"][0]
    assert again["message"] == choice["message"]
    assert [c["token"] for c in again["logprobs"]["content"]] == [served.tokenizer.decode([i]) for i in ids]


@pytest.mark.parametrize(
    ("path", "body", "status", "needle"),
    [
        ("/completions", {"prompt": "hi", "temperature": -1}, 400, "temperature"),
        ("/completions", {"prompt": "hi", "logprobs": 21}, 400, "logprobs"),
        ("/completions", {"max_tokens": 3}, 400, "prompt"),
        ("/completions", {"prompt": "hi", "stream": True}, 400, "stream"),
        ("/completions", {"prompt": "hi", "max_tokens": 10_000}, 400, "maximum context length"),
        ("/completions", {"prompt": [1, 2, 99_999]}, 400, "prompt token ids"),
        ("/completions", {"prompt": "hi", "model": "gpt-4"}, 404, "does not exist"),
        ("/chat/completions", {"messages": []}, 400, "messages"),
        ("/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400, "logprobs"),
    ],
)
def test_bad_requests_get_openai_errors(url, path, body, status, needle):
    response = httpx.post(f"{url}{path}", json=body)
    assert response.status_code == status
    error = response.json()["error"]
    assert needle in error["message"] and {"message", "type", "param", "code"} <= set(error)


def test_malformed_json_is_a_400(url):
    response = httpx.post(f"{url}/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 400 and "error" in response.json()


# ---------------------------------------------------------------- generate through the server


def test_generate_through_server_equals_local_teacher(tmp_path, url, teacher_dir, served):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS + CHAT)
    out = tmp_path / "endpoint.jsonl"
    generate(endpoint_recipe(url, prompts, out, temperature=0, logprobs=3), log=quiet)
    local = tmp_path / "local.jsonl"
    recipe = recipe_from_dict(
        {
            "teacher": {"path": str(teacher_dir)},
            "generate": {"prompts": str(prompts), "output": str(local), "max_new_tokens": 8, "temperature": 0},
        }
    )
    generate(recipe, log=quiet)
    remote, here = read_rows_of(out), read_rows_of(local)
    assert len(remote) == len(here) == 4
    for r, h in zip(remote, here, strict=True):
        # Greedy through HTTP (one prompt per request) = greedy with the local, batched, left-padded teacher.
        assert (r["prompt_index"], r["completion"], r["completion_ids"]) == (
            h["prompt_index"],
            h["completion"],
            h["completion_ids"],
        )
        assert ("messages" in r) == ("messages" in h)
        # The server's log-probs are the model's own.
        reference = forward_logprobs(served, h["prompt_ids"] + r["completion_ids"])[len(h["prompt_ids"]) - 1 : -1]
        for step, top in enumerate(r["top_logprobs"]):
            ids = [i for i, _ in top]
            assert torch.allclose(reference[step, ids], torch.tensor([lp for _, lp in top]), atol=1e-4)
            assert abs(reference[step, r["completion_ids"][step]].item() - r["token_logprobs"][step]) < 1e-4


def test_endpoint_samples_are_seeded_and_counted(tmp_path, url):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    first = generate(
        endpoint_recipe(url, prompts, tmp_path / "a.jsonl", samples_per_prompt=3, concurrency=3), log=quiet
    )
    second = generate(
        endpoint_recipe(url, prompts, tmp_path / "b.jsonl", samples_per_prompt=3, concurrency=1), log=quiet
    )
    rows = read_rows_of(first)
    assert [(r["prompt_index"], r["sample"]) for r in rows] == [(p, s) for p in range(3) for s in range(3)]
    assert first.read_bytes() == second.read_bytes()  # per-request seeds: concurrency does not change samples


def test_model_name_defaults_to_the_servers_first_model(tmp_path, url):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS[:1])
    recipe = endpoint_recipe(url, prompts, tmp_path / "g.jsonl")
    recipe.teacher.model_name = None
    assert len(read_rows_of(generate(recipe, log=quiet))) == 1


# ---------------------------------------------------------------- stub servers: keys, retries, errors


class Stub:
    """A tiny OpenAI-ish server answering from a script of (status, headers, body) and recording requests."""

    def __init__(self, script=None, delay_s: float = 0.0):
        self.script = list(script or [])
        self.requests: list[dict] = []
        self.delay_s = delay_s
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _answer(self, status, headers, body):
                data = json.dumps(body).encode()
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._answer(200, {}, {"object": "list", "data": [{"id": "stub-model", "object": "model"}]})

            def do_POST(self):
                length = int(self.headers.get("content-length", 0))
                body = json.loads(self.rfile.read(length))
                headers = {k.lower(): v for k, v in self.headers.items()}
                stub.requests.append({"path": self.path, "headers": headers, "body": body})
                if stub.delay_s and len(stub.requests) == 1:
                    time.sleep(stub.delay_s)
                if stub.script:
                    status, headers, answer = stub.script.pop(0)
                    if status != 200:
                        self._answer(status, headers, answer)
                        return
                n = body.get("n", 1)
                choices = [{"index": i, "text": f" answer {i}", "finish_reason": "stop"} for i in range(n)]
                self._answer(200, {}, {"object": "text_completion", "choices": choices})

        class Server(ThreadingHTTPServer):
            def handle_error(self, request, client_address):
                pass  # a client that timed out and left: expected in the timeout test

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def stub_factory():
    stubs = []

    def make(*args, **kwargs):
        stubs.append(Stub(*args, **kwargs))
        return stubs[-1]

    yield make
    for s in stubs:
        s.close()


def test_api_key_sent_as_bearer_and_written_nowhere(tmp_path, stub_factory, monkeypatch, capsys):
    secret = "sk-test-5ecret-abc123"
    monkeypatch.setenv("DISTILL_TEST_KEY", secret)
    stub = stub_factory([(429, {"Retry-After": "0"}, {"error": {"message": "slow down"}})])
    prompts = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    out = tmp_path / "gen.jsonl"
    recipe = endpoint_recipe(stub.url, prompts, out, samples_per_prompt=2)
    recipe.teacher.api_key_env = "DISTILL_TEST_KEY"
    lines: list[str] = []
    generate(recipe, log=lines.append)
    assert {r["headers"]["authorization"] for r in stub.requests} == {f"Bearer {secret}"}
    rows = read_rows_of(out)
    assert [r["completion"] for r in rows[:2]] == [" answer 0", " answer 1"]
    assert any("retry 1/2" in line for line in lines)
    # Nowhere on disk, nowhere in what was logged or printed.
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert secret not in path.read_text(encoding="utf-8", errors="replace")
    captured = capsys.readouterr()
    assert secret not in "\n".join(lines) + captured.out + captured.err
    # No env var set: no Authorization header at all.
    monkeypatch.delenv("DISTILL_TEST_KEY")
    generate(endpoint_recipe(stub.url, prompts, tmp_path / "nokey.jsonl"), log=quiet)
    assert "authorization" not in stub.requests[-1]["headers"]


def test_429_and_5xx_are_retried_until_success(tmp_path, stub_factory):
    stub = stub_factory(
        [
            (429, {"Retry-After": "0"}, {"error": {"message": "rate limited"}}),
            (500, {}, {"error": {"message": "boom"}}),
            (503, {}, {"detail": "overloaded"}),
        ]
    )
    prompts = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS[:1])
    out = generate(endpoint_recipe(stub.url, prompts, tmp_path / "g.jsonl", max_retries=3, concurrency=1), log=quiet)
    assert len(stub.requests) == 4 and read_rows_of(out)[0]["completion"] == " answer 0"


def test_retries_run_out_into_one_line_error_and_rerun_continues(tmp_path, stub_factory):
    stub = stub_factory([(500, {}, {"error": {"message": "down"}})] * 3)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS[:1])
    recipe = endpoint_recipe(stub.url, prompts, tmp_path / "g.jsonl", max_retries=2)
    with pytest.raises(DistillError, match=r"HTTP 500 \(down\); gave up after 2 retries") as e:
        generate(recipe, log=quiet)
    assert "\n" not in str(e.value)
    assert len(read_rows_of(generate(recipe, log=quiet))) == 1


def test_permanent_400_stops_at_once_with_one_line(tmp_path, stub_factory):
    stub = stub_factory([(400, {}, {"error": {"message": "max_tokens is too large:\n 99999"}})])
    prompts = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS[:1])
    with pytest.raises(DistillError, match=r"answered 400: max_tokens is too large: 99999$") as e:
        generate(endpoint_recipe(stub.url, prompts, tmp_path / "g.jsonl", max_retries=5), log=quiet)
    assert len(stub.requests) == 1 and "\n" not in str(e.value)


def test_server_rejecting_token_id_extension_falls_back_to_token_strings(tmp_path, stub_factory):
    refusal = (400, {}, {"error": {"message": "Unrecognized request argument supplied: return_tokens_as_token_ids"}})
    stub = stub_factory([refusal])
    prompts = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS[:2])
    generate(endpoint_recipe(stub.url, prompts, tmp_path / "g.jsonl", logprobs=2, concurrency=1), log=quiet)
    assert stub.requests[0]["body"]["return_tokens_as_token_ids"] is True
    assert all("return_tokens_as_token_ids" not in r["body"] for r in stub.requests[1:])
    assert stub.requests[0]["body"]["logprobs"] == 2 and len(stub.requests) == 3


def test_timeouts_are_retried(tmp_path, stub_factory):
    stub = stub_factory(delay_s=1.0)  # the first request hangs past the timeout
    prompts = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS[:1])
    recipe = endpoint_recipe(stub.url, prompts, tmp_path / "g.jsonl", timeout_s=0.3, concurrency=1)
    assert len(read_rows_of(generate(recipe, log=quiet))) == 1
    assert len(stub.requests) == 2


def test_retry_after_and_backoff_waits(stub_factory):
    stub = stub_factory([(429, {"Retry-After": "2"}, {}), (502, {}, {}), (429, {"Retry-After": "junk"}, {})])
    waits: list[float] = []
    with EndpointClient(stub.url, max_retries=3, backoff_s=0.5, sleep=waits.append, log=quiet, seed=0) as client:
        assert client.post("/completions", {"prompt": "x"})["choices"]
    assert waits[0] == 2.0  # the server's Retry-After, not our backoff
    assert 0.5 * 2 * 0.5 <= waits[1] < 0.5 * 2 * 1.5  # attempt 1: base·2 with jitter
    assert 0.5 * 4 * 0.5 <= waits[2] < 0.5 * 4 * 1.5  # unreadable Retry-After: backoff
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a date in the past: now
    assert retry_after_seconds("100000") == 300.0  # capped
    import random

    rng = random.Random(1)
    assert len({backoff_seconds(0, 1.0, rng) for _ in range(5)}) == 5  # jitter


def test_connection_refused_is_retried_then_one_line(tmp_path):
    sock = bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    waits: list[float] = []
    client = EndpointClient(f"http://127.0.0.1:{port}/v1", max_retries=2, sleep=waits.append, log=quiet)
    with client, pytest.raises(DistillError, match="ConnectError.*gave up after 2 retries"):
        client.post("/completions", {})
    assert len(waits) == 2


def test_bad_endpoint_url_is_one_line():
    with pytest.raises(DistillError, match="teacher.endpoint"):
        EndpointClient("localhost:8000/v1")


def test_missing_serve_extra_names_the_install_command(monkeypatch, teacher_dir):
    from distill.generate.server import serve

    monkeypatch.setitem(sys.modules, "uvicorn", None)  # makes `import uvicorn` raise ImportError
    with pytest.raises(DistillError, match=r"pip install distill\[serve\]"):
        serve(str(teacher_dir), port=0)


def test_cli_serve_bad_input_is_one_line(tmp_path, teacher_dir, capsys):
    from distill.cli import main

    assert main(["serve", str(tmp_path / "nothing-here"), "--port", "0"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    taken = bind("127.0.0.1", 0)
    try:
        with pytest.raises(DistillError, match="cannot listen on 127.0.0.1"):
            bind("127.0.0.1", taken.getsockname()[1])
    finally:
        taken.close()


# ---------------------------------------------------------------- faults: the server killed mid-run


def _serve_in_child(model_dir: str, port: int, write_fd: int) -> None:
    torch.set_num_threads(1)
    os.dup2(write_fd, 1)  # the parent reads the URL line from this pipe
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115 - the child's whole life
    from distill.cli import main

    os._exit(main(["serve", model_dir, "--port", str(port), "--model-name", "teacher", "--device", "cpu"]))


def start_cli_server(model_dir: Path, port: int = 0):
    """`distill serve` (the CLI function) in a forked child: a fresh interpreter would take 5-15 s to import torch
    here. Returns (process, base URL read from the line it prints)."""
    read_fd, write_fd = os.pipe()
    process = multiprocessing.get_context("fork").Process(target=_serve_in_child, args=(str(model_dir), port, write_fd))
    process.start()
    os.close(write_fd)
    with open(read_fd, encoding="utf-8") as pipe:
        line = pipe.readline()
    assert "for production, point teacher.endpoint at vLLM or SGLang" in line, line
    url = line.split(" at ")[1].split()[0]
    assert url.startswith("http://127.0.0.1:") and url.endswith("/v1")
    wait_until_up(url)
    return process, url


def wait_until_up(url: str, limit_s: float = 120.0) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/models", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.05)
    raise AssertionError(f"{url} never came up")


@pytest.mark.slow
def test_server_killed_mid_run_then_rerun_loses_and_repeats_nothing(tmp_path, teacher_dir):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"def f{i}(x):"} for i in range(24)])
    settings = {"samples_per_prompt": 2, "max_new_tokens": 16, "concurrency": 2, "max_retries": 1, "logprobs": 2}

    server, victim_url = start_cli_server(teacher_dir)  # --port 0: the printed URL says which port
    assert httpx.get(f"{victim_url}/models").json()["data"][0]["id"] == "teacher"
    # The uninterrupted reference comes from a server of the same kind (a forked child: one thread), so the
    # two files can be compared byte for byte.
    reference = generate(endpoint_recipe(victim_url, prompts, tmp_path / "ref.jsonl", **settings), log=quiet)
    out = tmp_path / "gen.jsonl"
    partial = tmp_path / ".gen.jsonl.partial"
    failure: list[BaseException] = []

    def run() -> None:
        try:
            generate(endpoint_recipe(victim_url, prompts, out, **settings), log=quiet)
        except BaseException as e:
            failure.append(e)

    runner = threading.Thread(target=run)
    try:
        runner.start()
        deadline = time.monotonic() + 120
        while not (partial.exists() and partial.read_bytes().count(b"\n") >= 6):
            assert time.monotonic() < deadline and runner.is_alive()
            time.sleep(0.005)
        server.kill()  # SIGKILL the server while requests are in flight
        runner.join(60)
    finally:
        server.kill()
        server.join()
    assert not runner.is_alive() and failure and isinstance(failure[0], DistillError)
    assert "rerun to continue" in str(failure[0]) and not out.exists()
    done = len(read_rows_of(partial)) // 2
    assert 3 <= done < 24

    # The server restarted on the same port; the rerun finishes the file.
    port = int(victim_url.rsplit(":", 1)[1].split("/")[0])
    server, again = start_cli_server(teacher_dir, port)
    try:
        assert again == victim_url
        generate(endpoint_recipe(victim_url, prompts, out, **settings), log=quiet)
    finally:
        server.kill()
        server.join()
    rows = read_rows_of(out)
    assert sorted((r["prompt_index"], r["sample"]) for r in rows) == [(p, s) for p in range(24) for s in range(2)]
    identical = out.read_bytes() == reference.read_bytes()  # not `assert a == b`: pytest's diff of it takes minutes
    assert identical, "the file finished after the server's restart differs from an uninterrupted run"
