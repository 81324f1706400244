"""The openai backend's transport: one kept-alive HTTP/1.1 connection per worker thread (`Http`), the worker
threads themselves (`Workers`: at most `concurrency` requests at once, answers as they finish), and the errors
and answer readers the backend's retry loop uses. Standard library only."""
from __future__ import annotations

import http.client
import json
import queue
import threading
import urllib.error
import urllib.request
from http.client import HTTPException
from urllib.parse import urlsplit

from extractor.backends.base import Request
from extractor.errors import ExtractorError

class ServerError(ExtractorError):
    """The server cannot be used for this run (unreachable after retries, key or model refused)."""


# A connection the server closed while it sat idle between two requests fails the next one like this: that
# request is sent once more on a fresh connection at once (it never reached the server), not counted a retry.
STALE = (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)


class Refused(Exception):
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


class Stopped(Exception):
    """This thread's request was abandoned: the stream ended (an error elsewhere, or the consumer stopped)."""


def read_json(raw: bytes, where: str):
    try:
        return json.loads(raw)
    except ValueError:
        raise ServerError(f"{where}: the answer is not JSON ({raw[:80]!r}); check --openai-base-url (it usually "
                          "ends in /v1)") from None


def error_message(raw: bytes, reason: str) -> str:
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


def retry_after(headers) -> float | None:
    try:
        return min(60.0, max(0.0, float(headers.get("Retry-After", ""))))
    except (TypeError, ValueError, AttributeError):
        return None


class Http:
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
            except STALE:  # closed by the server while idle (_send closed ours): once more, on a fresh connection
                pass
        self.local.conn = self._open()
        return self._send(self.local.conn, method, path, data, headers)

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


class Workers:
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
                except Stopped:
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
