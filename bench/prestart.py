"""Warm starts for `extractor` commands: each command is forked from a server process that has already imported
what a run or a training imports (torch, transformers, the hf backend), so it starts in a fraction of a second
instead of the ~4 s a fresh `python -m extractor` spends on imports. The kill suites start dozens of commands.

Each command is still a process of its own, in a process group of its own, running `extractor`'s entry point
with its own argv, stdout to /dev/null and stderr to a file; it ends as `python -m extractor` ends (atexit
handlers, buffers flushed), and SIGKILLed it dies as any process does, with the processes it started. The
server only imports, it never computes, so no thread pool has started when it forks. What a fork shares with
its server and siblings: the import-time state (a fresh process would import the same), and the hash seed.
Its exit is Python's (threads joined, atexit handlers, buffers flushed) without the interpreter's teardown.

    with Server() as server:
        proc = server.popen(["run", "corpus.jsonl", ...], stderr="err.txt")   # proc: pid, poll(), wait(), kill()
        code, stderr = server.run(["run", "corpus.jsonl", ...], timeout=300)
"""
from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

# What an hf run of the tiny (Qwen2) model imports; a command imports anything missing itself.
RUN = ("extractor.cli.main", "extractor.cli.run_cmd", "extractor.cli.config_file", "extractor.backends.hf",
       "extractor.backends.fast", "extractor.backends.startup", "extractor.pipeline.preflight",
       "extractor.tasks.schema_bundle", "transformers.models.qwen2.modeling_qwen2",
       "transformers.models.auto.tokenization_auto", "jsonschema", "fastjsonschema")
# ... and what `extractor train` adds.
TRAIN = RUN + ("extractor.cli.train_cmd", "extractor.training.loop", "extractor.training.model_setup",
               "extractor.training.dev_scoring", "extractor.training.data", "extractor.scoring.report.charts",
               "accelerate", "peft", "transformers.optimization", "matplotlib.figure", "matplotlib.font_manager")

# The server: import, then for each request line fork one command and report its pid, then its exit code.
_SERVER = r"""
import atexit, importlib, json, os, random, sys, threading
for name in sys.argv[1:]:
    importlib.import_module(name)
requests, replies = os.fdopen(os.dup(0), "r"), os.fdopen(os.dup(1), "w", buffering=1)
devnull = os.open(os.devnull, os.O_RDWR)
for fd in (0, 1):
    os.dup2(devnull, fd)
for line in requests:
    request = json.loads(line)
    pid = os.fork()
    if pid == 0:
        os.setpgid(0, 0)
        requests.close()
        replies.close()
        err = request["stderr"]
        os.dup2(os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644) if err else devnull, 2)
        os.chdir(request["cwd"])
        sys.path[0] = request["cwd"]  # as `python -m` started there has it
        random.seed()
        if "numpy" in sys.modules:
            sys.modules["numpy"].random.seed()
        sys.argv = ["extractor", *request["args"]]
        from extractor.cli.main import main
        code = 0
        try:
            main()
        except SystemExit as exc:  # what the interpreter makes of sys.exit's argument
            code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
            if code == 1 and not isinstance(exc.code, int):
                print(exc.code, file=sys.stderr)
        except BaseException:
            sys.excepthook(*sys.exc_info())
            code = 1
        # Python's own exit, step by step (threads joined, atexit handlers, buffers flushed), without the
        # interpreter's teardown: in a fork of this large process that teardown touches every inherited
        # object, copying ~1 s of memory pages per command, and a fresh process has nothing else to do then.
        threading._shutdown()
        atexit._run_exitfuncs()
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os._exit(code)
    try:
        os.setpgid(pid, pid)  # also here: the group exists before the pid is handed out
    except OSError:
        pass
    replies.write(f"{pid}\n")
    replies.write(f"{os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])}\n")
"""


class Server:
    """One server process; commands run one at a time. env: the commands' environment, fixed when the server
    starts (this process's by default)."""

    def __init__(self, preload: tuple[str, ...] = RUN, env: dict[str, str] | None = None):
        self.proc = subprocess.Popen([sys.executable, "-c", _SERVER, *preload], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, bufsize=0, start_new_session=True, env=env)
        self.running: Forked | None = None

    def popen(self, args: list[str], stderr: str | os.PathLike | None = None) -> "Forked":
        """Start `extractor ARGS` (args without the program; a full `python -m extractor ...` list is accepted).
        stderr: a file for its standard error (else /dev/null); its standard output goes to /dev/null. A command
        still running from before (a caller that failed half-way) is killed first."""
        if self.running is not None:
            self.running.kill()
        args = [str(a) for a in args]
        if args[1:3] == ["-m", "extractor"]:
            args = args[3:]
        request = {"args": args, "cwd": os.getcwd(), "stderr": str(stderr) if stderr else None}
        self.proc.stdin.write(json.dumps(request).encode() + b"\n")
        self.running = Forked(self, int(self.line()))
        return self.running

    def run(self, args: list[str], timeout: float | None = None) -> tuple[int, str]:
        """Run `extractor ARGS` to its end: (exit code, standard error). Past `timeout` seconds its process group
        is killed and subprocess.TimeoutExpired raised."""
        with tempfile.TemporaryDirectory() as tmp:
            err = Path(tmp) / "stderr.txt"
            proc = self.popen(args, stderr=err)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                raise
            return proc.returncode, err.read_text(encoding="utf-8", errors="replace")

    def line(self, timeout: float | None = None) -> str | None:
        """The server's next reply; None when none came within `timeout` seconds."""
        if timeout is not None and not select.select([self.proc.stdout], [], [], timeout)[0]:
            return None
        text = self.proc.stdout.readline()  # unbuffered: reads no further than the line
        if not text:
            raise RuntimeError(f"the warm-start server ended (exit {self.proc.wait()})")
        return text.decode()

    def close(self) -> None:
        """End the server; a command still running (a test that failed half-way) is killed with its group."""
        if self.running is not None:
            self.running.kill()
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Forked:
    """A started command, as subprocess.Popen shows one: pid (also its process group), poll(), wait()."""

    def __init__(self, server: Server, pid: int):
        self.server, self.pid, self.returncode = server, pid, None

    def kill(self) -> int:
        """SIGKILL its process group (it and what it started) unless it has ended; its exit code."""
        if self.poll() is None:
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except ProcessLookupError:  # it ended (and was reaped) a moment ago
                pass
        return self.wait()

    def poll(self) -> int | None:
        return self.wait(timeout=0) if self.returncode is None else self.returncode

    def wait(self, timeout: float | None = None) -> int | None:
        if self.returncode is None:
            line = self.server.line(timeout)
            if line is None:
                if timeout == 0:
                    return None
                raise subprocess.TimeoutExpired("extractor", timeout)
            self.returncode = int(line)
        return self.returncode
