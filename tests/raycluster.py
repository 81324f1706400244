"""A real two-node Ray cluster for the tests: `ray start --head` and `ray start --address=HEAD:PORT`, each
with a temp folder of its own, started from a folder that is not the run's, and stopped by pid.

Both nodes bind a loopback address other than 127.0.0.1 (Ray swaps 127.0.0.1 for the machine's outward
address) and get free ports for everything they listen on, so the cluster neither leaves this machine nor
collides with another Ray on it. Each `ray start --block` leads a session of its own holding its node's processes and takes
them down on SIGTERM; whatever outlives it is found by session or temp folder and killed by pid.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HOST = "127.0.0.2"
RAY = str(Path(sys.executable).with_name("ray"))


_given: set[int] = set()  # ports handed out in this process: the OS may offer a just-closed one again


def free_port() -> int:
    """A port free on HOST and not handed out before (Ray refuses two components on one port)."""
    while True:
        with socket.socket() as s:
            s.bind((HOST, 0))
            port = s.getsockname()[1]
        if port not in _given:
            _given.add(port)
            return port


def ray_env() -> dict:
    # Echo answers instantly: the first worker up would take every batch before the other node's starts.
    return {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
            "EXTRACTOR_ECHO_LATENCY_S": "0.1"}


class RayCluster:
    def __init__(self, cpus_per_node: tuple[float, float] = (1, 1)):
        # Ray's socket paths must stay under 107 bytes: a short folder under /tmp, not pytest's tmp_path.
        self.root = Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))
        self.port = free_port()
        self.address = f"{HOST}:{self.port}"
        self.cpus = cpus_per_node
        self.procs: list[subprocess.Popen] = []

    def start(self, timeout: float = 120) -> "RayCluster":
        head = ["--head", "--port", str(self.port), "--include-dashboard", "false",
                "--dashboard-port", str(free_port())]
        self._node("head", head, self.cpus[0])
        self._wait(1, timeout)
        self._node("node", ["--address", self.address], self.cpus[1])
        self._wait(2, timeout)
        return self

    def _node(self, name: str, args: list[str], cpus: float) -> None:
        ports = ["--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
                 "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port"]
        cmd = [RAY, "start", "--block", *args, "--node-ip-address", HOST, "--num-cpus", str(cpus), "--num-gpus", "0",
               "--temp-dir", str(self.root / name), "--object-store-memory", str(100 * 1024 ** 2),
               "--disable-usage-stats", *[x for flag in ports for x in (flag, str(free_port()))]]
        log = open(self.root / f"{name}.log", "wb")
        self.procs.append(subprocess.Popen(cmd, cwd=self.root, env=ray_env(), stdout=log, stderr=log,
                                           start_new_session=True))

    def _wait(self, nodes: int, timeout: float) -> None:
        probe = (f"import ray; ray.init(address='{self.address}', log_to_driver=False); "
                 "print(sum(n['Alive'] for n in ray.nodes()))")
        deadline = time.time() + timeout
        while time.time() < deadline:
            if any(p.poll() is not None for p in self.procs):
                raise RuntimeError(f"a Ray node exited: {self.log_tail()}")
            try:
                out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=30,
                                     env=ray_env(), cwd=self.root)
                if out.returncode == 0 and int(out.stdout.split()[-1]) >= nodes:
                    return
            except (subprocess.TimeoutExpired, ValueError, IndexError):
                pass
            time.sleep(1)
        raise RuntimeError(f"the Ray cluster did not reach {nodes} node(s) in {timeout:.0f} s: {self.log_tail()}")

    def log_tail(self) -> str:
        return " | ".join((self.root / f"{n}.log").read_text(errors="replace")[-1500:]
                          for n in ("head", "node") if (self.root / f"{n}.log").exists())

    def stop(self) -> None:
        for proc in reversed(self.procs):  # the second node first, then the head
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=5)  # the head's own shutdown can take 30 s; what is left is killed below
            except subprocess.TimeoutExpired:
                pass
        for pid in self.leftover_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for proc in self.procs:
            proc.wait()
        deadline = time.monotonic() + 10  # a SIGKILLed process takes a moment to be gone from /proc
        while (left := self.leftover_pids()) and time.monotonic() < deadline:
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)
        shutil.rmtree(self.root, ignore_errors=True)

    def leftover_pids(self) -> list[int]:
        """This cluster's processes still running: those of the sessions its `ray start`s lead (each started
        in a session of its own, whose id is its pid), and any naming its temp folder."""
        sessions = {str(p.pid) for p in self.procs}
        mark = str(self.root).encode()
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                stat = (entry / "stat").read_text()
                fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state, ppid, pgrp, session
                if fields[0] != "Z" and (fields[3] in sessions or mark in (entry / "cmdline").read_bytes()):
                    pids.append(int(entry.name))
            except (OSError, ValueError, IndexError):
                pass
        return pids
