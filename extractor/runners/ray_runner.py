"""`extractor run --ray [ADDRESS]`: the same read → prompt → generate → validate pipeline on Ray Data.

Ray reads the corpus (JSONL/Parquet/CSV, streaming, in order: `preserve_order`), an actor pool holds one
backend per worker (one per GPU on a GPU cluster, fractional CPUs on a laptop), each actor runs the same
`Predictor` as a single-process run on its batches, and the rows stream back to the driver, which appends
them to the output with the same manifest and exactly-once resume as `extractor run`. Ids already in the
output are filtered out inside the actors. Actors are restarted and their tasks retried by Ray when a worker
dies. Without ADDRESS a local Ray instance is started; `ray start --head` on one node and
`ray start --address=HEAD:6379` on the others make a cluster that `--ray HEAD:6379` uses.

Cluster reads cannot see line numbers, so records need their id field; a record without it, or with a
non-string text, becomes an output row with status `error` naming the problem (nothing is dropped).
"""
from __future__ import annotations

import time
from pathlib import Path

from extractor import jsonutil
from extractor.backends.base import Backend
from extractor.corpus import corpus_format, id_key
from extractor.errors import ExtractorError
from extractor.pipeline import Run


class PredictActor:
    """Holds one backend; turns a batch of source rows into output rows."""

    def __init__(self, task_name, tasks_dirs, backend_name, backend_kwargs, params, opts_dict, done_ref):
        import ray
        from extractor.backends import backend_class
        from extractor.pipeline import Predictor
        from extractor.tasks import load_task
        self.task = load_task(task_name, tasks_dirs)
        backend = backend_class(backend_name)(**backend_kwargs)
        self.predictor = Predictor(self.task, backend, params, opts_dict["on_long"], opts_dict["max_input_tokens"],
                                   tuple(opts_dict["keep_fields"]), opts_dict["few_shot"])
        self.predictor.adapter = opts_dict["adapter"]
        self.field_map = opts_dict["field_map"]
        self.id_field = opts_dict["id_field"]
        self.done = ray.get(done_ref) if done_ref is not None else set()

    def __call__(self, batch):
        rows = batch.to_pylist()
        records, bad = [], []
        for row in rows:
            rec, problem = self._record(row)
            if problem:
                bad.append(self._error_row(row, problem))
            elif id_key(rec["id"]) not in self.done:
                records.append(rec)
        out = self.predictor.predict(records) if records else []
        out += bad
        # Nested JSON as text: one fixed Arrow schema whatever the predictions look like.
        return {"line": [jsonutil.dumps(r) for r in out]}

    def _record(self, row: dict):
        rid = row.get(self.id_field)
        if rid is None:
            return None, f"missing id field '{self.id_field}' (a Ray run needs ids in the data)"
        values = {}
        for task_field, column in self.field_map.items():
            value = row.get(column)
            if not isinstance(value, str):
                return None, f"field '{column}' must be a string, got {type(value).__name__}"
            values[task_field] = value
        return {"id": str(rid), "line": 0, "values": values, "row": row}, None

    def _error_row(self, row: dict, problem: str) -> dict:
        rid = row.get(self.id_field)
        return {"id": None if rid is None else str(rid), "task": self.task.name, "prediction": None, "status": "error",
                "error": f"bad input record: {problem}", "raw": "", "prompt_tokens": None, "output_tokens": 0,
                "finish_reason": None, "adapter": self.predictor.adapter}


class DriverView(Backend):
    """What the driver knows of the backend without loading weights: the tokenizer (prompt format, token
    counts) and the identity that goes into the manifest. The actors hold the real backends."""

    def __init__(self, name: str, model: str, adapter: str | None, dtype: str, trust_remote_code: bool):
        from extractor.backends.hf import check_model_dir, file_fingerprint
        self.name = name
        self.supports_constrained = name in ("hf", "vllm", "echo")
        self.ident = {"backend": name, "runner": "ray", "dtype": dtype}
        if name == "echo":
            self.ident["gold"] = str(Path(model).resolve())
            return
        from transformers import AutoTokenizer
        check_model_dir(Path(model))
        self.tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)
        self.ident["model"] = file_fingerprint(Path(model))
        if adapter:
            self.ident["adapter"] = file_fingerprint(Path(adapter))

    def identity(self) -> dict:
        return self.ident


class RayRun(Run):
    """A Run whose records flow through Ray Data; manifest, resume and summary are the single-process ones."""

    def __init__(self, predictor, opts, out, console, address, workers, backend_name, backend_kwargs, tasks_dirs,
                 ray_tmp=None, num_cpus=None):
        super().__init__(predictor, opts, out, console)
        self.address, self.workers = address, workers
        self.backend_name, self.backend_kwargs = backend_name, backend_kwargs
        self.tasks_dirs = tasks_dirs
        self.ray_tmp, self.num_cpus = ray_tmp, num_cpus

    def execute(self, done: set[int]):
        if self.complete:
            return self.summary
        import ray
        start = time.perf_counter()
        self._init_ray(ray)
        try:
            self._check_gpus(ray)
            ds = self._dataset(ray, ray.put(done) if done else None)
            from extractor.writers import JsonlAppender
            writer = JsonlAppender(self.journal)
            try:
                for batch in ds.iter_batches(batch_size=self.opts.window, batch_format="pyarrow"):
                    rows = [jsonutil.loads(x) for x in batch.column("line").to_pylist()]
                    writer.write_batch(rows)
                    self._count(rows)
            finally:
                writer.close()
        finally:
            if not self.address:
                ray.shutdown()
        self.summary.elapsed = time.perf_counter() - start
        self._finish()
        return self.summary

    def _init_ray(self, ray) -> None:
        import logging
        import os
        if ray.is_initialized():
            return
        if self.opts.quiet:
            logging.getLogger("ray").setLevel(logging.WARNING)
            logging.getLogger("ray.data").setLevel(logging.WARNING)
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local instance for this run only
        if self.address:
            ray.init(address=self.address, log_to_driver=False)
        else:
            ray.init(num_cpus=self.num_cpus, object_store_memory=200 * 1024 * 1024, include_dashboard=False,
                     _temp_dir=self.ray_tmp, log_to_driver=False)

    def _uses_gpus(self) -> bool:
        return str(self.backend_kwargs.get("device", "auto")).startswith("cuda")

    def _check_gpus(self, ray) -> None:
        """Each GPU worker asks Ray for a whole GPU: where the cluster has fewer, the actors would wait for
        them forever."""
        if not self._uses_gpus():
            return
        have = int(ray.cluster_resources().get("GPU", 0))
        if have < self.workers:
            raise ExtractorError(f"--ray-workers {self.workers} with --device cuda needs {self.workers} GPUs; the Ray "
                                 f"cluster has {have}: pass --ray-workers {have} or fewer" if have else
                                 "--device cuda: the Ray cluster has no GPUs; pass --device cpu or join GPU nodes")

    def _dataset(self, ray, done_ref):
        from ray.data import ActorPoolStrategy
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True  # output in input order, like a single-process run
        ctx.enable_progress_bars = not self.opts.quiet
        path = str(self.opts.corpus)
        fmt = corpus_format(self.opts.corpus)
        try:
            ds = {"jsonl": lambda: ray.data.read_json(path, lines=True),
                  "parquet": lambda: ray.data.read_parquet(path),
                  "csv": lambda: ray.data.read_csv(path)}[fmt]()
        except Exception as exc:  # noqa: BLE001 - Ray wraps reader errors in several types
            raise ExtractorError(f"{path}: Ray cannot read it ({str(exc).splitlines()[0][:200]})") from None
        field_map = {f: f for f in self.p.task.spec.input_fields}
        if self.opts.text_field:
            field_map[self.p.task.spec.input_fields[0]] = self.opts.text_field
        opts_dict = {"on_long": self.opts.on_long, "max_input_tokens": self.opts.max_input_tokens,
                     "keep_fields": list(self.opts.keep_fields), "few_shot": self.p.builder.few_shot,
                     "adapter": self.p.adapter, "field_map": field_map, "id_field": self.opts.id_field}
        gpus = 1 if self._uses_gpus() else 0
        return ds.map_batches(
            PredictActor, batch_size=self.opts.window, batch_format="pyarrow",
            compute=ActorPoolStrategy(size=self.workers),
            fn_constructor_args=(self.p.task.name, tuple(self.tasks_dirs), self.backend_name, self.backend_kwargs,
                                 self.p.params, opts_dict, done_ref),
            num_cpus=0.5 if not gpus else 1, num_gpus=gpus, max_restarts=2, max_task_retries=2)


def ray_settings(address: str | None) -> str | None:
    """`--ray` with no value means a local instance; `--ray auto` or HOST:PORT means a cluster."""
    return None if address in (None, "", "local") else address


def check_ray_installed() -> None:
    try:
        import ray  # noqa: F401
        import ray.data  # noqa: F401
    except ImportError:
        raise ExtractorError("--ray needs Ray Data: pip install 'extractor[ray]'") from None


def ray_temp_dir(out: Path) -> str:
    # Ray's socket paths must stay short (107 bytes): a short folder under /tmp, named after the output.
    import hashlib
    return f"/tmp/ray-{hashlib.sha1(str(out.resolve()).encode()).hexdigest()[:8]}"
