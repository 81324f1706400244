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

import json
import os
import random
import socket
import threading
from http.client import HTTPException

from extractor.backends.base import LENGTH, STOP, Backend, GenParams, Generation, Request
from extractor.backends.openai_http import (Http, Refused, ServerError, Stopped, Workers, error_message, read_json,
                                            retry_after)
from extractor.errors import ModelError

DEFAULT_BASE_URL = "https://api.openai.com/v1"  # what OpenAI's own clients use when OPENAI_BASE_URL is unset
# Starts a prompt that holds chat messages as JSON: readable in --print-prompt, and never the start of a raw
# prompt (those start with "Instruction: ").
MESSAGES_MARK = "messages for /v1/chat/completions:\n"
RETRY_STATUS = {408, 409, 429}  # and every 5xx
BACKOFF_S, BACKOFF_MAX_S = 0.5, 30.0


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
        self.http = Http(self.base_url, timeout)
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
        except Refused as exc:
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
            except Refused as exc:
                if not self.budget_refused(exc, body):
                    raise
                path, body = self.body(request, params, schema)
                reply = self._call("POST", path, body)
        except Refused as exc:
            if exc.status in (400, 413, 422):
                return Generation("", 0, 0, STOP, error=f"the server refused the request: {exc.message}")
            raise ServerError(exc.describe(self.base_url)) from None
        return parse_reply(reply, path, self.base_url)

    def budget_refused(self, exc: "Refused", body: dict) -> bool:
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
        timeouts and dropped connections; the parsed JSON answer. Raises Refused (a status not worth
        retrying) or ServerError (still failing after the retries)."""
        data = json.dumps(body, ensure_ascii=False).encode("utf-8") if body is not None else None
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last, retries = "", self.retries if retries is None else retries
        for attempt in range(retries + 1):
            if self._stop.is_set():
                raise Stopped()
            wait = None
            try:
                status, reason, reply_headers, raw = self.http.exchange(method, path, data, headers)
                if status < 300:
                    return read_json(raw, self.base_url + path)
                message = error_message(raw, reason)
                if 300 <= status < 400:
                    raise Refused(status, f"redirected to {reply_headers.get('Location')}", path)
                if status not in RETRY_STATUS and status < 500:
                    raise Refused(status, message, path)
                last, wait = f"HTTP {status} ({message})", retry_after(reply_headers)
            except (HTTPException, OSError) as exc:  # urllib's URLError is an OSError
                reason = getattr(exc, "reason", exc)
                last = "timed out" if isinstance(reason, (socket.timeout, TimeoutError)) else \
                    f"connection failed ({reason})"
            if attempt < retries:
                self.stats["retries"] += 1
                delay = min(BACKOFF_MAX_S, BACKOFF_S * 2 ** attempt) * (0.75 + random.random() / 2)
                if self._stop.wait(max(delay, wait or 0)):
                    raise Stopped()
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
        workers = Workers(self.concurrency, lambda r: self.answer(r, params, schema), on_exit=self.http.close)
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
