"""`extractor run --ray [ADDRESS]`: the same read → prompt → generate → validate pipeline on Ray Data.

Ray reads the corpus (JSONL/Parquet/CSV, streaming, in order: `preserve_order`), an actor pool holds one
backend per worker (one per GPU on a GPU cluster, fractional CPUs on a laptop), each actor runs the same
`Predictor` as a single-process run on its batches, and the rows stream back to the driver, which appends
them to the output with the same manifest and exactly-once resume as `extractor run`. Ids already in the
output are filtered out inside the actors. Actors are restarted and their tasks retried by Ray when a worker
dies. Without ADDRESS a local Ray instance is started; `ray start --head` on one node and
`ray start --address=HEAD:6379` on the others make a cluster that `--ray HEAD:6379` uses.

Nothing assumes the driver's folder: a local corpus is read by its absolute path on the driver's node (the
one node sure to have it); an object-store corpus is read on any node, with the driver's store settings
and credentials passed to the workers. Model and adapter paths are made absolute: each node must read them
there. The pool is checked against the cluster first (`ray_capacity.py`): never a hang waiting for
resources no node has. Failures on the workers come back as one line.

Cluster reads cannot see line numbers, so records need their id field; a record without it, or one that
fails the corpus reader's checks (`records.check_record`), becomes an output row with status `error` naming
the problem (nothing is dropped). The driver writes the rows through the single-process run's own sink, with
its Ctrl-C handling (stop taking batches, write what came back, summary marked interrupted) and finish.
"""
from __future__ import annotations

import re
import warnings
from collections import Counter
from pathlib import Path

from extractor import jsonutil

from extractor.store import locations
from extractor.backends.base import Backend, TokenizerBackend
from extractor.store.corpus_path import corpus_format
from extractor.store.records import RecordProblem, check_record, id_key, input_columns
from extractor.errors import ExtractorError
from extractor.pipeline import Run
from extractor.pipeline.config import RunConfig
from extractor.results.rows import error_row
from extractor.runners import ray_capacity

READ_CPUS = 0.25  # Ray Data's read tasks parse JSON/Parquet blocks: light next to a model
WORKER_CPUS = 0.5  # a CPU worker: fractional, so a laptop runs two beside the reads
NODE_LABEL = "ray.io/node-id"  # every Ray node carries its id as this label
WORKER_MEMORY = 512 * 1024 ** 2  # a CPU worker's process before its weights (Python, the libraries, batches)


class PredictActor:
    """Holds one backend; turns a batch of source rows into output rows."""

    def __init__(self, task_name, tasks_dirs, backend_name, backend_kwargs, params, opts_dict, done_ref):
        import ray
        from extractor.plugins import backend_class
        from extractor.pipeline import Predictor
        from extractor.tasks.task import load_task
        self.task = load_task(task_name, tasks_dirs)
        backend = backend_class(backend_name)(**backend_kwargs)
        # The worker's backend was built with the run's one adapter: every request names it (without this
        # the workers decoded with base weights).
        self.predictor = Predictor(self.task, backend, params,
                                   adapter_key=backend.adapters()[0] if opts_dict["adapter"] else None,
                                   label=opts_dict["adapter"], on_long=opts_dict["on_long"],
                                   max_input_tokens=opts_dict["max_input_tokens"],
                                   keep_fields=tuple(opts_dict["keep_fields"]), few_shot=opts_dict["few_shot"],
                                   chunking=opts_dict["chunking"])
        self.label = opts_dict["adapter"]
        self.field_map = opts_dict["field_map"]
        self.id_field = opts_dict["id_field"]
        self.done = ray.get(done_ref) if done_ref is not None else set()
        self.node = ray.get_runtime_context().get_node_id()

    def __call__(self, batch):
        rows = batch.to_pylist()
        records, bad = [], []
        for row in rows:
            try:
                rec = check_record(row, self.field_map, self.id_field, ids_required=True)
            except RecordProblem as problem:
                bad.append(error_row(problem.record_id, self.task.name, f"bad input record: {problem.reason}",
                                     self.label))
                continue
            if id_key(rec["id"]) not in self.done:
                records.append(rec)
        out = self.predictor.predict(records) if records else []
        out += bad
        # Nested JSON as text: one fixed Arrow schema whatever the predictions look like. The node column says
        # where each row was computed (the run's manifest counts rows per node).
        return {"line": [jsonutil.dumps(r) for r in out], "node": [self.node] * len(out)}


class DriverView(Backend):
    """What the driver knows of the backend without loading weights: the tokenizer (prompt format, token
    counts) and the identity that goes into the manifest. The actors hold the real backends."""

    def __init__(self, name: str, model: str, adapter: str | None, dtype: str, trust_remote_code: bool):
        from extractor.backends.model_files import check_model_dir, file_fingerprint
        from extractor.plugins import backend_class
        engine = backend_class(name)  # what it can do is its class's answer, whatever its name
        self.name = name
        self.supports_constrained = engine.supports_constrained
        self.ident = {"backend": name, "runner": "ray", "dtype": dtype}
        if not issubclass(engine, TokenizerBackend):  # echo: --model is a gold file, there is no tokenizer
            self.ident["gold"] = node_path(model)
            return
        from transformers import AutoTokenizer
        check_model_dir(Path(model))
        self.tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)
        self.ident["model"] = file_fingerprint(Path(model))
        if adapter:
            self.ident["adapter"] = file_fingerprint(Path(adapter))

    def identity(self, adapter: str | None = None) -> dict:
        return self.ident  # the run's one adapter is in it already


class RayRun(Run):
    """A Run whose records flow through Ray Data; manifest, resume and summary are the single-process ones."""

    def __init__(self, task, view, lane, opts, console, cfg: RunConfig, sources):
        super().__init__(task, view, lane, opts, opts.out, console)
        self.address, self.workers = ray_settings(cfg.ray_address), cfg.ray_workers
        self.backend_name = cfg.backend
        # The workers' folder is not this one: paths go to them absolute.
        self.backend_kwargs = dict(model=node_path(sources.model),
                                   adapters=tuple(node_path(a) for a in sources.adapters), dtype=cfg.dtype,
                                   device=cfg.device, trust_remote_code=cfg.trust_remote_code,
                                   batch_size=cfg.batch_size, batch_tokens=cfg.batch_tokens)
        self.tasks_dirs = worker_tasks_dirs(cfg.tasks_dirs)
        self.ray_tmp, self.num_cpus = ray_temp_dir(opts.out), max(2, cfg.ray_workers)
        self.rows_per_node: Counter = Counter()

    def prepare(self, key: dict) -> set[int]:
        """Connect and check the pool fits the cluster before anything is written."""
        import ray
        self._init_ray(ray)
        # A local corpus is read on the driver's node, the one node sure to have it.
        self.read_node = None if locations.is_remote(self.opts.corpus) else ray.get_runtime_context().get_node_id()
        self._check_capacity(ray, self.read_node)
        return super().prepare(key)

    def execute(self, done: set[int]):
        import ray
        try:
            if not self.complete:
                with self.ctrl_c, self.writing() as sink:
                    self._fill_from_pool(done, sink)
            return self.summary
        finally:
            if not self.address:
                ray.shutdown()

    def _fill_from_pool(self, done: set[int], sink) -> None:
        """Rows computed by the actor pool, streamed back in input order, into the run's sink; Ctrl-C stops
        taking batches."""
        import ray
        try:
            ds = self._dataset(ray, ray.put(done) if done else None, self.read_node)
            for batch in ds.iter_batches(batch_size=self.opts.window, batch_format="pyarrow"):
                sink.put_rows([jsonutil.loads(x) for x in batch.column("line").to_pylist()])
                self.rows_per_node.update(batch.column("node").to_pylist())
                if self._stop:
                    break
            self.manifest["ray"] = self._placement(ray)
        except ExtractorError:
            raise
        except Exception as exc:  # noqa: BLE001 - Ray wraps worker failures in several types
            raise worker_error(exc) from None

    def _progress(self, start: float):
        return None  # Ray Data draws its own

    def _init_ray(self, ray) -> None:
        import logging
        import os
        if ray.is_initialized():
            return
        if self.opts.quiet:
            logging.getLogger("ray").setLevel(logging.WARNING)
            logging.getLogger("ray.data").setLevel(logging.WARNING)
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local instance for this run only
        # Read tasks on other nodes reach the corpus's store as this process does (endpoint, credentials).
        env = locations.forwarded_env() if locations.is_remote(self.opts.corpus) else {}
        runtime_env = {"env_vars": env} if env else None
        common = dict(log_to_driver=False, runtime_env=runtime_env,
                      logging_level=logging.WARNING if self.opts.quiet else logging.INFO)
        if self.address:
            check_reachable(self.address)
            ray.init(address=self.address, **common)
        else:
            ray.init(num_cpus=self.num_cpus, object_store_memory=200 * 1024 * 1024, include_dashboard=False,
                     _temp_dir=self.ray_tmp, **common)

    def _uses_gpus(self) -> bool:
        return str(self.backend_kwargs.get("device", "auto")).startswith("cuda")

    def _worker_demand(self) -> ray_capacity.Demand:
        """A GPU worker: one GPU and a CPU to drive it. A CPU worker: half a CPU and host memory for its
        weights (Ray then never packs more models onto a node than it can hold)."""
        if self._uses_gpus():
            return ray_capacity.Demand(cpus=1, gpus=1)
        return ray_capacity.Demand(cpus=WORKER_CPUS, memory=WORKER_MEMORY + weights_bytes(self.backend_kwargs))

    def _check_capacity(self, ray, read_node: str | None) -> None:
        nodes = [ray_capacity.Node.from_ray(n) for n in ray.nodes() if n.get("Alive")]
        problem = ray_capacity.check(nodes, self.workers, self._worker_demand(), ray_capacity.Demand(READ_CPUS),
                                     read_node)
        if problem:
            raise ExtractorError(problem)
        self._check_paths(ray, [n for n in nodes if n.fits(self._worker_demand())])

    def _check_paths(self, ray, nodes: list) -> None:
        """Every node that may host a worker must see the model, adapters and tasks folders at the driver's
        absolute paths; asked of each node up front (a zero-CPU task pinned to it), since a worker that cannot
        find them fails only after Ray has printed its retries."""
        kwargs = self.backend_kwargs
        paths = [p for p in (kwargs.get("model"), *kwargs.get("adapters", ()), *self.tasks_dirs)
                 if p and Path(p).is_absolute()]
        if not paths:
            return
        probe = ray.remote(num_cpus=0)(_missing)
        refs = {n.node_id: probe.options(label_selector={NODE_LABEL: n.node_id}).remote(paths) for n in nodes}
        try:
            answers = dict(zip(refs, ray.get(list(refs.values()), timeout=120)))
        except Exception as exc:  # noqa: BLE001 - a node that does not answer: GetTimeoutError, a dead node
            raise ExtractorError(f"the Ray nodes did not answer whether they see {paths[0]} "
                                 f"({type(exc).__name__}); check the cluster with `ray status`") from None
        for node in nodes:
            if answers[node.node_id]:
                raise ExtractorError(f"{answers[node.node_id][0]} is not on Ray node {node.address} "
                                     f"{node.node_id[:8]}: every node that may run a worker must read the model, "
                                     "adapters and --tasks-dir at the same absolute path (a shared folder, or a "
                                     "copy on each node)")

    def _placement(self, ray) -> dict:
        """Where the rows of this pass were computed: rows per node (id and address)."""
        address = {n["NodeID"]: n.get("NodeManagerAddress") for n in ray.nodes()}
        return {"address": self.address or "local", "workers": self.workers,
                "rows_per_node": {f"{address.get(k, '?')} {k[:12]}": v for k, v in self.rows_per_node.items()}}

    def _dataset(self, ray, done_ref, read_node: str | None):
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True  # output in input order, like a single-process run
        ctx.enable_progress_bars = not self.opts.quiet
        fmt = corpus_format(self.opts.corpus)
        read_args = {"num_cpus": READ_CPUS}
        if locations.is_remote(self.opts.corpus):
            # Ray resolves the URI itself (pyarrow's S3/GCS/Azure filesystems, else fsspec's), on each worker
            # from the variables forwarded at init; its line-JSON reader takes no filesystem of ours.
            path = self.opts.corpus.uri
        else:
            # The driver's folder is not the workers': an absolute path, read on the driver's node.
            path = str(Path(self.opts.corpus).resolve())
            read_args["label_selector"] = {NODE_LABEL: read_node}
        try:
            ds = {"jsonl": lambda: ray.data.read_json(path, lines=True, **read_args),
                  "parquet": lambda: ray.data.read_parquet(path, **read_args),
                  "csv": lambda: ray.data.read_csv(path, **read_args)}[fmt]()
        except Exception as exc:  # noqa: BLE001 - Ray wraps reader errors in several types
            raise ExtractorError(f"{path}: Ray cannot read it ({str(exc).splitlines()[0][:200]})") from None
        field_map = input_columns(self.task.spec.input_fields, self.opts.text_field)
        opts_dict = {"on_long": self.opts.on_long, "chunking": self.opts.chunking,
                     "max_input_tokens": self.opts.max_input_tokens,
                     "keep_fields": list(self.opts.keep_fields), "few_shot": self.lane.renderer.builder.few_shot,
                     "adapter": self.lane.judge.label, "field_map": field_map, "id_field": self.opts.id_field}
        return self._map(ds, opts_dict, done_ref)

    def _map(self, ds, opts_dict: dict, done_ref):
        from ray.data import ActorPoolStrategy
        demand = self._worker_demand()
        memory = {"memory": demand.memory} if demand.memory else {}
        with warnings.catch_warnings():
            # max_restarts/max_task_retries have no named parameter yet; Ray warns about passing them at all.
            warnings.simplefilter("ignore", DeprecationWarning)
            return ds.map_batches(
                PredictActor, batch_size=self.opts.window, batch_format="pyarrow",
                compute=ActorPoolStrategy(size=self.workers),
                fn_constructor_args=(self.task.name, tuple(self.tasks_dirs), self.backend_name,
                                     self.backend_kwargs, self.opts.params, opts_dict, done_ref),
                num_cpus=demand.cpus, num_gpus=demand.gpus, **memory, max_restarts=2, max_task_retries=2,
                # Across the nodes, as the capacity check placed them (Ray would otherwise pack a node first).
                scheduling_strategy="SPREAD")


def ray_settings(address: str | None) -> str | None:
    """`--ray` with no value means a local instance; `--ray auto` or HOST:PORT means a cluster."""
    return None if address in (None, "", "local") else address


def check_reachable(address: str) -> None:
    """Ray waits for ever on an address where nothing listens: a TCP connection first, refused in one line."""
    import socket
    if address == "auto" or ":" not in address:
        return
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=10):
            pass
    except (OSError, ValueError) as exc:
        raise ExtractorError(f"--ray {address}: no Ray cluster answers there ({exc}); start one with "
                             f"`ray start --head --port {port}` or check the address") from None


_PROJECT_ERROR = re.compile(r"^extractor\.errors\.\w+: (.+)$", re.M)


def worker_error(exc: BaseException) -> ExtractorError:
    """A failure inside Ray (a read task, an actor's start, a batch) as one line. Ray hands some errors back
    as objects and others only as their traceback's text (an actor that died starting): the project's own
    error is looked for in both, else the innermost exception's last line is used."""
    seen, todo, inner, texts = set(), [exc], exc, []
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, ExtractorError):
            return ExtractorError(f"on a Ray worker: {e}")
        inner = e
        texts += [str(e), str(getattr(e, "error_msg", ""))]
        todo += [getattr(e, "cause", None), e.__cause__, e.__context__]
    for text in texts:
        found = _PROJECT_ERROR.findall(text)
        if found:
            return ExtractorError(f"on a Ray worker: {found[-1].strip()}")
    last = next((line.strip() for line in reversed(str(inner).strip().splitlines()) if line.strip()),
                type(inner).__name__)
    return ExtractorError(f"the Ray run failed on a worker: {last[:300]}; what was written is kept — fix it and "
                          "rerun with --resume")


def _missing(paths: list[str]) -> list[str]:
    """Runs on one node: which of these paths it cannot see."""
    import os
    return [p for p in paths if not os.path.exists(p)]


def node_path(item: str) -> str:
    """A model, adapter, gold or tasks path as every node must read it: absolute (the workers' folder is not
    the driver's). Anything else (a hub id) is passed on as it is."""
    path = Path(item)
    return str(path.resolve()) if path.exists() else item


def worker_tasks_dirs(tasks_dirs) -> tuple[str, ...]:
    """--tasks-dir and $EXTRACTOR_TASKS_DIR as the workers must see them (they have neither)."""
    import os
    from extractor.tasks.task import TASKS_DIR_ENV
    env = [d for d in os.environ.get(TASKS_DIR_ENV, "").split(os.pathsep) if d]
    return tuple(node_path(d) for d in (*tasks_dirs, *env))


def weights_bytes(backend_kwargs: dict) -> int:
    """The weight files' sizes (model and adapters; echo's gold file): what a CPU worker holds in memory at
    least."""
    from extractor.backends.model_files import weights_size
    total = 0
    for item in (backend_kwargs.get("model"), *backend_kwargs.get("adapters", ())):
        path = Path(item) if item else None
        if path is None or not path.exists():
            continue
        total += path.stat().st_size if path.is_file() else weights_size(path)
    return total


def check_ray_installed() -> None:
    try:
        import ray  # noqa: F401
        import ray.data  # noqa: F401
    except ImportError:
        raise ExtractorError("--ray needs Ray Data: pip install 'extractor[ray]'") from None


def ray_temp_dir(out) -> str:
    # Ray's socket paths must stay short (107 bytes): a short folder under /tmp, named after the output.
    import hashlib
    name = str(out) if locations.is_remote(out) else str(out.resolve())
    return f"/tmp/ray-{hashlib.sha1(name.encode()).hexdigest()[:8]}"
