"""`openai`: any OpenAI-compatible server (`vllm serve`, SGLang, hosted APIs) over HTTP, standard library only.

Prompts: a task rendered as chat messages (prompt_format chat or auto) goes to /v1/chat/completions as those
messages, so the server applies its model's own chat template; a raw-format task (prompt_format raw) goes to
/v1/completions as the raw prompt text. The pipeline renders prompts through `MessagesTemplate`, a stand-in
chat template that writes the messages out as JSON behind a marker; `generate` reads them back.

Requests run on daemon threads, at most `concurrency` at once (results come back in request order from
`generate`, as they finish from `generate_stream`); 429, 5xx, timeouts and dropped connections are retried
with exponential backoff. Each worker thread keeps its own HTTP/1.1 connection open (keep-alive), so a run
opens about `concurrency` connections, not one a record (through a proxy from $http_proxy/$https_proxy:
urllib, one connection a request). The output budget goes as `max_tokens`, which every OpenAI-compatible
server reads; a chat model that refuses it for `max_completion_tokens` (OpenAI's o-series) gets that name
from then on. A request the server refuses (400: e.g. longer than its context) becomes that record's error
row; a server that still fails after the retries, or refuses the key, the model or the URL,
stops the run with one line (the output stays resumable). Token counts come from the answer's `usage`.
The key is read from $OPENAI_API_KEY (the CLI's --openai-api-key sets it) and is never part of `identity`.
"""
from __future__ import annotations

import http.client
import json
import os
import queue
import random
import socket
import threading
import urllib.error
import urllib.request
from http.client import HTTPException
from urllib.parse import urlsplit

from extractor.backends.base import LENGTH, STOP, Backend, GenParams, Generation, Request
from extractor.errors import ExtractorError, ModelError

DEFAULT_BASE_URL = "https://api.openai.com/v1"  # what OpenAI's own clients use when OPENAI_BASE_URL is unset
# Starts a prompt that holds chat messages as JSON: readable in --print-prompt, and never the start of a raw
# prompt (those start with "Instruction: ").
MESSAGES_MARK = "messages for /v1/chat/completions:\n"
RETRY_STATUS = {408, 409, 429}  # and every 5xx
# A connection the server closed while it sat idle between two requests fails the next one like this: that
# request is sent once more on a fresh connection at once (it never reached the server), not counted a retry.
STALE = (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)
BACKOFF_S, BACKOFF_MAX_S = 0.5, 30.0


class ServerError(ExtractorError):
    """The server cannot be used for this run (unreachable after retries, key or model refused)."""


class MessagesTemplate:
    """The `tokenizer` the pipeline sees: only a chat template, which renders the messages as JSON behind
    MESSAGES_MARK (the server applies the model's real template)."""

    name_or_path = "openai backend"
    chat_template = MESSAGES_MARK + "{{ messages | tojson(indent=1) }}"


def served_names(adapters) -> dict[str, str]:
    """Output label -> the model name sent for it; labels are named as `name_adapters` names folders, so each
    output file is called what the CLI expects."""
    from pathlib import PurePosixPath
    named: dict[str, str] = {}
    for name in adapters:
        label = PurePosixPath(name).name or name
        named[label if label not in named else f"{label}-{len(named)}"] = name
    return named


class OpenAIBackend(Backend):
    name = "openai"
    tokenizer = MessagesTemplate()
    supports_constrained = True  # the server's JSON-schema response_format
    mixes_adapters = True  # each request names its own model (a LoRA adapter is a served model name)
    model_source = "server"

    def __init__(self, model: str, adapters=(), base_url: str | None = None, concurrency: int = 16,
                 timeout: float = 600.0, retries: int = 5, **_):
        self.model = model
        self.base_url = (base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")
        if not self.base_url.startswith(("http://", "https://")):
            raise ModelError(f"--openai-base-url '{self.base_url}' is not an http:// or https:// URL; give the "
                             "server's API root, e.g. http://localhost:8000/v1")
        self.api_key = os.environ.get("OPENAI_API_KEY") or None
        self.adapter_names = served_names(adapters)
        self.concurrency, self.timeout, self.retries = max(1, concurrency), timeout, max(0, retries)
        self.adapter: str | None = None
        self.stats = {"max_in_flight": 0, "retries": 0}
        self._stop = threading.Event()
        self.http = _Http(self.base_url, timeout)
        # The budget's name at /chat/completions: max_tokens, until a model refuses it (see budget_refused).
        self.chat_budget = "max_tokens"
        try:
            self._check_models()
        finally:
            self.http.close()  # this thread's connection; the workers open their own

    # -- identity and adapters -------------------------------------------------------------------------

    def identity(self, adapter: str | None = None) -> dict:
        """What produces the outputs: the server's address and the model name asked for (never the key)."""
        ident = {"backend": self.name, "base_url": self.base_url, "model": self.model}
        if adapter in self.adapter_names:
            ident["adapter"] = self.adapter_names[adapter]
        return ident

    def adapters(self) -> list[str | None]:
        return list(self.adapter_names) or [None]

    def use_adapter(self, name: str | None) -> None:
        if name is not None and name not in self.adapter_names:
            raise ModelError(f"openai backend: no adapter named '{name}'")
        self.adapter = name

    def _model_for(self, request: Request) -> str:
        label = request.adapter if request.adapter is not None else self.adapter
        return self.adapter_names[label] if label is not None else self.model

    def _check_models(self) -> None:
        """The model and adapter names against the server's /v1/models, so a typo or an unreachable server
        fails before any record is sent. A server without that endpoint is taken at its word."""
        try:  # one retry only: a server that is not up yet is reported now, not after a minute of backoff
            listing = self._call("GET", "/models", None, retries=min(1, self.retries),
                                 then="is the server running at that address? (--openai-base-url)")
        except _Refused as exc:
            if exc.status in (404, 405, 501):
                return
            raise ServerError(exc.describe(self.base_url)) from None
        data = listing.get("data") if isinstance(listing, dict) else None
        served = {m.get("id") for m in data if isinstance(m, dict)} if isinstance(data, list) else set()
        if not served:
            return
        for name in (self.model, *self.adapter_names.values()):
            if name not in served:
                flag = "--model" if name == self.model else "--adapter"
                raise ModelError(f"{flag} '{name}': {self.base_url} serves no model of that name; it serves: "
                                 f"{', '.join(sorted(map(str, served)))[:500]}")

    # -- requests ---------------------------------------------------------------------------------------

    def body(self, request: Request, params: GenParams, schema: dict | None) -> tuple[str, dict]:
        """The endpoint and JSON body for one request."""
        chat = request.prompt.startswith(MESSAGES_MARK)
        body = {"model": self._model_for(request),
                (self.chat_budget if chat else "max_tokens"): request.new_tokens(params),
                "temperature": params.temperature, "top_p": params.top_p if params.temperature > 0 else 1.0,
                "seed": params.seed}
        if params.constrained and schema:
            body["response_format"] = {"type": "json_schema",
                                       "json_schema": {"name": "output", "schema": schema, "strict": True}}
        if chat:
            body["messages"] = json.loads(request.prompt[len(MESSAGES_MARK):])
            return "/chat/completions", body
        body["prompt"] = request.prompt
        return "/completions", body

    def answer(self, request: Request, params: GenParams, schema: dict | None) -> Generation:
        """One request's generation; a request the server refuses (400) is that record's error."""
        path, body = self.body(request, params, schema)
        try:
            try:
                reply = self._call("POST", path, body)
            except _Refused as exc:
                if not self.budget_refused(exc, body):
                    raise
                path, body = self.body(request, params, schema)
                reply = self._call("POST", path, body)
        except _Refused as exc:
            if exc.status in (400, 413, 422):
                return Generation("", 0, 0, STOP, error=f"the server refused the request: {exc.message}")
            raise ServerError(exc.describe(self.base_url)) from None
        return parse_reply(reply, path, self.base_url)

    def budget_refused(self, exc: "_Refused", body: dict) -> bool:
        """Whether the server refused `max_tokens` and asked for `max_completion_tokens` (OpenAI's reasoning
        models: "Unsupported parameter: 'max_tokens' ... Use 'max_completion_tokens' instead."); if so, chat
        requests name the budget that way from now on. Sending the newer name first would be unsafe: a server
        that does not know it ignores it, and the budget would be lost without a word."""
        if exc.status != 400 or "max_tokens" not in body or "max_completion_tokens" not in exc.message \
                or "max_tokens" not in exc.message.replace("max_completion_tokens", ""):
            return False
        self.chat_budget = "max_completion_tokens"
        return True

    def _call(self, method: str, path: str, body: dict | None, retries: int | None = None,
              then: str = "everything written is kept — check the server and rerun with --resume"):
        """One HTTP exchange, retried with exponential backoff (and the server's Retry-After) on 429, 5xx,
        timeouts and dropped connections; the parsed JSON answer. Raises _Refused (a status not worth
        retrying) or ServerError (still failing after the retries)."""
        data = json.dumps(body, ensure_ascii=False).encode("utf-8") if body is not None else None
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last, retries = "", self.retries if retries is None else retries
        for attempt in range(retries + 1):
            if self._stop.is_set():
                raise _Stopped()
            wait = None
            try:
                status, reason, reply_headers, raw = self.http.exchange(method, path, data, headers)
                if status < 300:
                    return _json(raw, self.base_url + path)
                message = _error_message(raw, reason)
                if 300 <= status < 400:
                    raise _Refused(status, f"redirected to {reply_headers.get('Location')}", path)
                if status not in RETRY_STATUS and status < 500:
                    raise _Refused(status, message, path)
                last, wait = f"HTTP {status} ({message})", _retry_after(reply_headers)
            except (HTTPException, OSError) as exc:  # urllib's URLError is an OSError
                reason = getattr(exc, "reason", exc)
                last = "timed out" if isinstance(reason, (socket.timeout, TimeoutError)) else \
                    f"connection failed ({reason})"
            if attempt < retries:
                self.stats["retries"] += 1
                delay = min(BACKOFF_MAX_S, BACKOFF_S * 2 ** attempt) * (0.75 + random.random() / 2)
                if self._stop.wait(max(delay, wait or 0)):
                    raise _Stopped()
        raise ServerError(f"{self.base_url}{path}: {last}, still after {retries} retries; {then}")

    # -- the contract ---------------------------------------------------------------------------------

    def generate(self, requests: list[Request], params: GenParams, schema: dict | None = None) -> list[Generation]:
        out: dict[int, Generation] = {}
        for pairs in self.generate_stream(iter(requests), params, schema):
            out.update({id(r): g for r, g in pairs})
        return [out[id(r)] for r in requests]

    def generate_stream(self, requests, params: GenParams, schema: dict | None = None, probes: list[str] = ()):
        """Requests pulled as slots free up, at most `concurrency` at the server at once; each answer yielded
        as it arrives (an empty list while none has, so a Ctrl-C stops the run without waiting for slow
        answers: those are redone by --resume). A fatal error stops the other threads' retries and is
        raised here."""
        self._stop.clear()
        workers = _Workers(self.concurrency, lambda r: self.answer(r, params, schema), on_exit=self.http.close)
        requests = iter(requests)
        in_flight, exhausted = 0, False
        try:
            while True:
                while not exhausted and in_flight < self.concurrency:
                    request = next(requests, None)
                    if request is None:
                        exhausted = True
                        break
                    workers.submit(request)
                    in_flight += 1
                self.stats["max_in_flight"] = max(self.stats["max_in_flight"], in_flight)
                if not in_flight:
                    return
                done = workers.finished(timeout=0.25)  # [] now and then: the consumer sees a Ctrl-C promptly
                in_flight -= len(done)
                for _, result in done:
                    if isinstance(result, BaseException):
                        raise result
                yield done
        finally:
            self._stop.set()  # other threads' backoff waits end now; their answers are dropped (redone on resume)
            workers.close()


def parse_reply(reply, path: str, base_url: str) -> Generation:
    """A completion's text, finish reason and token counts; an answer of another shape means the URL is not
    an OpenAI-compatible API (a web page, a proxy's error), which no retry fixes."""
    try:
        choice = reply["choices"][0]
        text = choice["message"].get("content") if path == "/chat/completions" else choice["text"]
        usage = reply.get("usage") or {}
        prompt_tokens, output_tokens = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
    except (KeyError, IndexError, TypeError, AttributeError, ValueError):
        raise ServerError(f"{base_url}{path}: the answer is not an OpenAI completion ({str(reply)[:120]!r}); "
                          "check --openai-base-url (it usually ends in /v1)") from None
    finish = LENGTH if choice.get("finish_reason") == "length" else STOP
    return Generation(text if isinstance(text, str) else "", prompt_tokens, output_tokens, finish)


class _Refused(Exception):
    """An HTTP status that retrying does not change (4xx other than 408, 409, 429)."""

    def __init__(self, status: int, message: str, path: str):
        super().__init__(message)
        self.status, self.message, self.path = status, message, path

    def describe(self, base_url: str) -> str:
        hint = {401: "check OPENAI_API_KEY or --openai-api-key", 403: "check OPENAI_API_KEY or --openai-api-key",
                404: "check --openai-base-url (usually ending in /v1) and --model"}.get(
                    self.status, "check --openai-base-url, --model and the server's log")
        if 300 <= self.status < 400:
            hint = "give the address it names as --openai-base-url"
        return f"{base_url}{self.path}: HTTP {self.status} ({self.message}); {hint}"


class _Stopped(Exception):
    """This thread's request was abandoned: the stream ended (an error elsewhere, or the consumer stopped)."""


def _json(raw: bytes, where: str):
    try:
        return json.loads(raw)
    except ValueError:
        raise ServerError(f"{where}: the answer is not JSON ({raw[:80]!r}); check --openai-base-url (it usually "
                          "ends in /v1)") from None


def _error_message(raw: bytes, reason: str) -> str:
    """The server's own words: an OpenAI-style {"error": {"message": ...}}, else the body's first line, else
    the status line's reason."""
    text = raw[:4096].decode("utf-8", "replace")
    try:
        err = json.loads(text)
    except ValueError:
        err = None
    if isinstance(err, dict):
        inner = err.get("error", err)
        text = str(inner.get("message") or inner.get("detail") or "") if isinstance(inner, dict) else str(inner)
    lines = text.strip().splitlines()
    return lines[0][:300] if lines else str(reason)


def _retry_after(headers) -> float | None:
    try:
        return min(60.0, max(0.0, float(headers.get("Retry-After", ""))))
    except (TypeError, ValueError, AttributeError):
        return None


class _Http:
    """HTTP exchanges with the server, each thread over its own kept-alive HTTP/1.1 connection (opened on the
    thread's first request, reopened after any failure). Where $http_proxy/$https_proxy applies to the address
    (and $no_proxy does not exempt it), urllib sends each request through the proxy as before."""

    def __init__(self, base_url: str, timeout: float):
        parts = urlsplit(base_url)
        self.base_url, self.timeout = base_url, timeout
        self.https, self.host, self.port = parts.scheme == "https", parts.hostname or "", parts.port
        self.root = parts.path.rstrip("/")
        self.proxied = bool(urllib.request.getproxies().get(parts.scheme)) and \
            not urllib.request.proxy_bypass(self.host)
        self.local = threading.local()
        self.opened = 0  # connections opened, all threads
        self._count = threading.Lock()

    def exchange(self, method: str, path: str, data: bytes | None, headers: dict):
        """(status, reason, headers, body) of one request; raises OSError or HTTPException when no answer came."""
        if self.proxied:
            return self._via_urllib(method, path, data, headers)
        conn = getattr(self.local, "conn", None)
        if conn is not None:
            try:
                return self._send(conn, method, path, data, headers)
            except STALE:
                self.close()  # closed by the server while idle: once more, on a fresh connection
        conn = self.local.conn = self._open()
        try:
            return self._send(conn, method, path, data, headers)
        except BaseException:
            self.close()
            raise

    def _open(self) -> http.client.HTTPConnection:
        with self._count:
            self.opened += 1
        kind = http.client.HTTPSConnection if self.https else http.client.HTTPConnection
        return kind(self.host, self.port, timeout=self.timeout)

    def _send(self, conn, method, path, data, headers):
        try:
            conn.request(method, self.root + path, body=data, headers=headers)
            resp = conn.getresponse()
            body = resp.read()  # all of it, so the connection can carry the next request
        except BaseException:
            self.close()
            raise
        return resp.status, resp.reason, resp.headers, body

    def _via_urllib(self, method, path, data, headers):
        req = urllib.request.Request(self.base_url + path, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return resp.status, resp.reason, resp.headers, resp.read()
        except urllib.error.HTTPError as exc:
            try:
                raw = exc.read()
            except (OSError, HTTPException):
                raw = b""
            return exc.code, str(exc.reason), exc.headers, raw

    def close(self) -> None:
        """Closes the calling thread's connection."""
        conn = getattr(self.local, "conn", None)
        self.local.conn = None
        if conn is not None:
            conn.close()


class _Workers:
    """`n` daemon threads answering submitted requests (daemon: a thread stuck on a dead server never holds
    up the process's exit after a fatal error or Ctrl-C)."""

    def __init__(self, n: int, fn, on_exit=lambda: None):
        self.fn, self.n, self.on_exit = fn, n, on_exit
        self.jobs: queue.Queue = queue.Queue()
        self.results: queue.Queue = queue.Queue()
        self.threads: list[threading.Thread] = []

    def submit(self, request: Request) -> None:
        if len(self.threads) < self.n:
            thread = threading.Thread(target=self._loop, daemon=True, name=f"openai-{len(self.threads)}")
            thread.start()
            self.threads.append(thread)
        self.jobs.put(request)

    def _loop(self) -> None:
        try:
            while (request := self.jobs.get()) is not None:
                try:
                    result = self.fn(request)
                except _Stopped:
                    continue
                except BaseException as exc:  # noqa: BLE001 - handed to the stream's thread, which raises it
                    result = exc
                self.results.put((request, result))
        finally:
            self.on_exit()

    def finished(self, timeout: float) -> list[tuple[Request, object]]:
        """The finished (request, generation or error) pairs: those there, else the first within `timeout`."""
        try:
            done = [self.results.get(timeout=timeout)]
        except queue.Empty:
            return []
        while True:
            try:
                done.append(self.results.get_nowait())
            except queue.Empty:
                return done

    def close(self) -> None:
        for _ in self.threads:
            self.jobs.put(None)
