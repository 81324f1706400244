"""The outputs `extractor run` writes: what each is labelled (an adapter's or a checkpoint's folder name), the
lane that fills it, what --resume must match in it, the files written beside it (manifest, journal, lock,
rejects) and which of them are locked, and the refusal to write over any of the run's inputs."""
from __future__ import annotations

from pathlib import Path

from extractor.errors import InputError
from extractor.hub import RunSources
from extractor.pipeline import Lane, RunOptions, run_key
from extractor.pipeline.config import RunConfig
from extractor.plugins import backend_class
from extractor.store import locations
from extractor.store.clashes import FileSet, refuse_overlaps, rejects_written, task_files, written_beside
from extractor.store.corpus_path import is_stdin
from extractor.store.writers import is_stdout


def adapter_lane(task, backend, opts: RunOptions, sources: RunSources, name: str | None) -> Lane:
    """The lane whose requests name adapter `name` (the backend's name; None: the base weights); its rows
    carry the adapter's label."""
    return Lane.build(task, backend, opts, name, adapter_labels(sources).get(name, name))


def adapter_labels(sources: RunSources) -> dict:
    """Backend adapter name -> the label its rows and output carry: the folder's name; where two folders share
    one (runs/a/best, runs/b/best), parent-name (a-best, b-best), not best and best-1."""
    from extractor.backends.base import name_adapters
    paths = name_adapters(sources.adapters, lambda path: None)
    folder_names = [Path(p).name for p in paths.values()]
    labels = {}
    for name, path in paths.items():
        path = Path(path)
        shared = folder_names.count(path.name) > 1 and name not in sources.adapter_labels
        labels[name] = f"{path.parent.name}-{path.name}" if shared else sources.adapter_labels.get(name, name)
    twice = sorted({label for label in labels.values() if list(labels.values()).count(label) > 1})
    if twice:
        raise InputError(f"--adapter: two adapters would both be labelled '{twice[0]}' (preds.{twice[0]}.jsonl); give "
                         "folders whose names (or parent and name) differ")
    return labels


def output_labels(sources: RunSources) -> list[str | None]:
    """The label each adapter's output is named by (as the backend names the adapters; [None]: none)."""
    return list(adapter_labels(sources).values()) or [None]


def checkpoint_labels(models: list[str]) -> list[str]:
    """Each checkpoint's output label: its folder's name; where two share one, parent-name (run1-best)."""
    paths = [Path(m) for m in models]
    labels = [p.name for p in paths]
    for i, p in enumerate(paths):
        if labels.count(p.name) > 1:
            labels[i] = f"{p.parent.name}-{p.name}"
    twice = sorted({label for label in labels if labels.count(label) > 1})
    if twice:
        raise InputError(f"--model: two checkpoints would both write preds.{twice[0]}.jsonl; give folders whose "
                         "names (or parent and name) differ")
    return labels


def output_key(task, backend, lane: Lane, opts: RunOptions, sources: RunSources) -> dict:
    """What --resume must match; with hub ids, also the id, revision and snapshot they led to."""
    key = run_key(task, backend, lane, opts)
    if sources.hub:
        key["hub"] = sources.hub
    return key


def refuse_overwriting_inputs(cfg: RunConfig, sources: RunSources, corpus, outs: list, task) -> None:
    """No file the run writes (outputs, manifests, journals, locks, rejects) may be one of its inputs (the
    corpus, the model's files, the task's files)."""
    inputs = FileSet()
    for label, path in task_files(task):
        inputs.add(label, path)
    if not is_stdin(corpus):
        inputs.add(f"the corpus ({corpus})", corpus)
    model = Path(sources.model)
    if backend_class(cfg.backend).model_source == "gold file":
        inputs.add(f"the echo backend's --model file ({sources.model})", model)
    elif model.is_dir():
        inputs.add_folder(f"a file of the --model folder {sources.model}", model)
    for adapter in sources.adapters:
        if Path(adapter).is_dir():
            inputs.add_folder(f"a file of the --adapter folder {adapter}", Path(adapter))
    writes = [("--out", o, written_beside(o)) for o in outs if not is_stdout(o)]
    writes += [("--rejects", r, rejects_written(r)) for r in rejects_files(cfg, outs)]
    refuse_overlaps(writes, inputs)


def rejects_files(cfg: RunConfig, outs: list) -> list:
    """The rejects files the run writes: --rejects, or one beside each output (--on-bad-record skip only)."""
    if cfg.on_bad_record != "skip":
        return []
    if cfg.rejects:
        return [locations.target(cfg.rejects)]
    return [o.with_name(o.name + ".rejects.jsonl") for o in outs]


def locked_files(cfg: RunConfig, outs: list) -> list:
    """The files locked for the run's life: each output, and an explicit --rejects (--gpus workers share
    their parent's, which the parent holds)."""
    locked = [(o, "--out") for o in outs]
    if cfg.rejects and cfg.on_bad_record == "skip" and not cfg.shard:
        locked.append((locations.target(cfg.rejects), "--rejects"))
    return locked
