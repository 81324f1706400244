"""Will a Ray actor pool run beside its read tasks on this cluster? Decided before any work is queued.

Ray keeps an actor or task pending for as long as no node can host it, with no error: a pool that takes
every CPU (or GPU, or memory) a read task would need is a run that hangs. Resources are per node, so the
check places the workers as Ray's SPREAD strategy does (each on the node with the fewest workers so far,
among those with room; on a tie, the node the reads need) and then looks for a node with room for one read
task: the driver's node when reads are pinned there (a local corpus), any node otherwise.
"""
from __future__ import annotations

from dataclasses import dataclass

GiB = 1024 ** 3


@dataclass(frozen=True)
class Demand:
    cpus: float = 0.0
    gpus: float = 0.0
    memory: float = 0.0  # bytes

    def describe(self) -> str:
        parts = [f"{_num(self.cpus)} CPU"]
        if self.gpus:
            parts.append(f"{_num(self.gpus)} GPU")
        if self.memory:
            parts.append(f"{self.memory / GiB:.1f} GiB memory")
        return ", ".join(parts)


@dataclass
class Node:
    node_id: str
    address: str
    cpus: float
    gpus: float
    memory: float

    @classmethod
    def from_ray(cls, info: dict) -> "Node":
        """One entry of `ray.nodes()`."""
        res = info.get("Resources", {})
        return cls(info["NodeID"], info.get("NodeManagerAddress", "?"), res.get("CPU", 0.0), res.get("GPU", 0.0),
                   res.get("memory", 0.0))

    def fits(self, d: Demand) -> bool:
        eps = 1e-9  # resources are fractional floats
        return self.cpus + eps >= d.cpus and self.gpus + eps >= d.gpus and self.memory + eps >= d.memory

    def take(self, d: Demand) -> None:
        self.cpus -= d.cpus
        self.gpus -= d.gpus
        self.memory -= d.memory

    def describe(self) -> str:
        return f"{_num(self.cpus)} CPU, {_num(self.gpus)} GPU, {self.memory / GiB:.1f} GiB"


def fits(nodes: list[Node], workers: int, worker: Demand, read: Demand, read_node: str | None) -> bool:
    free = [Node(n.node_id, n.address, n.cpus, n.gpus, n.memory) for n in nodes]
    placed = {n.node_id: 0 for n in free}
    for _ in range(workers):
        room = [n for n in free if n.fits(worker)]
        if not room:
            return False
        # Among equally used nodes Ray may pick any: assume the one the reads need, so a yes holds for all.
        best = min(room, key=lambda n: (placed[n.node_id], n.node_id != read_node, -n.cpus))
        best.take(worker)
        placed[best.node_id] += 1
    return any(n.fits(read) for n in free if read_node is None or n.node_id == read_node)


def check(nodes: list[Node], workers: int, worker: Demand, read: Demand, read_node: str | None) -> str | None:
    """None when the pool fits; otherwise one line with the numbers and the largest pool that fits."""
    if fits(nodes, workers, worker, read, read_node):
        return None
    if worker.gpus and not sum(n.gpus for n in nodes):
        return "--device cuda: the Ray cluster has no GPUs; pass --device cpu or join GPU nodes"
    most = max((k for k in range(workers) if fits(nodes, k, worker, read, read_node)), default=0)
    where = "on the driver's node (a local corpus is read there)" if read_node else "on one node"
    have = "; ".join(f"{n.address} {n.node_id[:8]}: {n.describe()}" for n in nodes)
    fix = f"pass --ray-workers {most} or fewer, or add nodes" if most else "add nodes or free their resources"
    return (f"--ray-workers {workers} cannot run on this Ray cluster beside its read tasks: each worker needs "
            f"{worker.describe()} and a read task {read.describe()} {where}; the cluster's {len(nodes)} node(s) "
            f"have {have}; {fix}")


def _num(x: float) -> str:
    return f"{x:g}"
