"""`extractor run --gpus N`: one worker process per GPU, each on every N-th record, then a merge.

Record i (counting good records in input order, so rejected lines never shift the split) goes to shard
i mod N. Each worker is a plain `extractor run --shard K/N` with its own output journal and manifest, so
each shard resumes on its own. When all workers finish, row i of the merged output is row i div N of shard
i mod N: the merge restores input order and checks that every record is there exactly once. A worker that
dies is reported with its shard; rerunning the same command with --resume continues every shard. With an
object-store output the shards are objects beside it (each committed by its worker, `parts.py`), and the
merged output is uploaded whole.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import click

from extractor.store import locations
from extractor.errors import ERROR_FILE_ENV, ExtractorError, error_file_value
from extractor.store.provenance import manifest_path, read_manifest, stamp, write_json_atomic
from extractor.store.locations import Location
from extractor.store.writers import (JournalOutput, drop_partial_tail, iter_jsonl_rows, overwrite_aside,
                                     write_rows)

MERGED_FORMAT = "extractor.merged/1"


def shard_path(out: Location, k: int, n: int) -> Location:
    stem = out.name[: -len("".join(out.suffixes))] if out.suffixes else out.name
    return out.with_name(f"{stem}.shard{k}of{n}.jsonl")


def argv_from_params(command: click.Command, params: dict, skip: set[str]) -> list[str]:
    """Rebuild a command line from click's parsed parameters (for the worker processes)."""
    args: list[str] = []
    for param in command.params:
        name, value = param.name, params.get(param.name)
        if name in skip or value is None:
            continue
        if isinstance(param, click.Argument):
            args.append(str(value))
            continue
        flag = max(param.opts, key=len)
        if param.is_flag:
            if value:
                args.append(flag)
        elif param.multiple:
            for v in value:
                args += [flag, str(v)]
        else:
            args += [flag, str(value)]
    return args


def outputs(out: Location, gpus: int, labels) -> list[tuple[Location, list[Location]]]:
    """Each output of the run (one per adapter label; [None]: no adapter) and its shards. A worker names its
    per-adapter outputs after its shard path as any run does (output_for_adapter)."""
    from extractor.pipeline.run import output_for_adapter
    return [(output_for_adapter(out, label, len(labels)),
             [output_for_adapter(shard_path(out, k, gpus), label, len(labels)) for k in range(gpus)])
            for label in labels]


def run_sharded(command: click.Command, params: dict, out: Location, gpus: int, device: str, console,
                labels=(None,)) -> list[tuple[Location, dict]]:
    """labels: the adapters' output labels (several adapters: one merged output each). Returns each merged
    output and its records per status."""
    targets = outputs(out, gpus, list(labels))
    _settle(targets)
    try:
        return _run_and_merge(command, params, out, gpus, device, console, targets)
    except BaseException:
        _settle(targets)  # an --overwrite whose workers wrote no row: the merged output it replaces is back
        raise


def _run_and_merge(command, params, out, gpus, device, console, targets) -> list[tuple[Location, dict]]:
    """The workers, then the merge of each output's shards (an output merged before is kept with --resume)."""
    if all([_already_merged(target, shards, params, console) for target, shards in targets]):
        return [(target, _summary(read_manifest(target)).get("statuses") or {}) for target, _ in targets]
    base = argv_from_params(command, params, skip={"gpus", "out", "device"})
    visible = _cuda_count() if device in ("auto", "cuda") else 0
    on_gpus = visible > 0
    if device == "cuda" and not visible:
        raise ExtractorError(f"--gpus {gpus} --device cuda: no CUDA device is visible here; pass --device cpu "
                             "for CPU workers")
    if on_gpus and gpus > visible:
        raise ExtractorError(f"--gpus {gpus}: only {visible} CUDA device(s) visible here; pass --gpus {visible} "
                             "or fewer, or --device cpu for CPU workers")
    with tempfile.TemporaryDirectory(prefix="extractor-workers-") as errors:
        procs = []
        for k in range(gpus):
            env = dict(os.environ, **{ERROR_FILE_ENV: error_file_value(str(Path(errors) / f"worker{k}.txt"))})
            worker_device = device
            if on_gpus:
                env["CUDA_VISIBLE_DEVICES"] = str(k)  # one GPU per worker
                worker_device = "cuda"
            else:
                # CPU workers share the cores: each with every core's OpenMP threads spin against the others
                # (a 1,000-record tiny-model run on 2 cores took 52 s that way, 12 s with one thread each).
                env.setdefault("OMP_NUM_THREADS", str(max(1, _cores() // gpus)))
            cmd = [sys.executable, "-m", "extractor", "run", *base, "--out", str(shard_path(out, k, gpus)),
                   "--shard", f"{k}/{gpus}", "--device", worker_device]
            procs.append((k, subprocess.Popen(cmd, env=env)))
        failed = [(k, code) for k, code in _wait(procs) if code != 0]
        if failed:
            raise ExtractorError(_failure(failed, Path(errors), out, gpus))
    merged = []
    for target, shards in targets:
        if locations.exists(target) and (read_manifest(target) or {}).get("format") == MERGED_FORMAT:
            for s in shards:  # merged before: shards a resumed worker wrote again are not needed
                locations.remove(s)
                locations.remove(manifest_path(s))
            merged.append((target, _summary(read_manifest(target)).get("statuses") or {}))
            continue
        summary = merge(target, shards)
        if not locations.is_remote(target):
            overwrite_aside(target).drop()  # committed: the merged output an --overwrite replaced goes
        console.print(f"merged {summary['records']} records from {gpus} shards into {target}")
        merged.append((target, summary["statuses"]))
    return merged


def _wait(procs: list[tuple[int, subprocess.Popen]]) -> list[tuple[int, int]]:
    """Each worker's exit code. Interrupted (the terminal's Ctrl-C reaches the workers too), the workers get up
    to a minute to stop and leave their last words before the parent says its own."""
    try:
        return [(k, p.wait()) for k, p in procs]
    except KeyboardInterrupt:
        for _, p in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
        raise


def _failure(failed: list[tuple[int, int]], errors: Path, out: Location, gpus: int) -> str:
    """One line for the workers that failed: each one's own error (workers with the same error together)."""
    why: dict[str, list[int]] = {}
    for k, code in failed:
        said = errors / f"worker{k}.txt"
        text = said.read_text(encoding="utf-8").strip() if said.exists() else ""
        text = text.removeprefix("error: ") or (f"killed by signal {-code}" if code < 0 else f"exited with {code}")
        why.setdefault(text, []).append(k)
    what = "; ".join(
        f"worker{'s' if len(ks) > 1 else ''} {' and '.join(map(str, ks))} "
        f"(shard{'s' if len(ks) > 1 else ''} {', '.join(shard_path(out, k, gpus).name for k in ks)}): {text}"
        for text, ks in why.items())
    return (f"{what}; what the workers wrote is kept — fix that and rerun the same command with --resume to "
            "continue the unfinished shards and merge")


def _summary(manifest) -> dict:
    """A manifest's summary, {} where the manifest or its summary is missing or not an object."""
    summary = manifest.get("summary") if isinstance(manifest, dict) else None
    return summary if isinstance(summary, dict) else {}


def _already_merged(out: Location, shards: list[Location], params: dict, console) -> bool:
    """True when a complete merged output is there to keep (--resume); clears it for --overwrite; refuses to
    replace anything else."""
    if params.get("overwrite") and not params.get("resume"):
        if locations.is_remote(out):
            locations.remove(out)
            locations.remove(manifest_path(out))
        else:  # kept aside until the new merge commits (store/aside.py)
            overwrite_aside(out).take()
        return False
    if not locations.exists(out):
        return False
    manifest = read_manifest(out)
    if not (manifest and manifest.get("format") == MERGED_FORMAT):
        if not any(locations.exists(s) for s in shards):  # a merge removes shards last
            raise ExtractorError(f"{out} already exists and was not merged by a --gpus run; use another --out or "
                                 "--overwrite")
        if params.get("resume"):
            return False  # a merge that did not finish: its shards are still there
        raise ExtractorError(f"{out} is from a merge that did not finish; pass --resume to finish it or "
                             "--overwrite to start over")
    if not params.get("resume"):
        raise ExtractorError(f"{out} already exists; pass --resume to continue it or --overwrite to start over")
    console.print(f"{out} is already complete ({_summary(manifest).get('records', '?')} records)")
    return True


def _settle(targets) -> None:
    """Local merged outputs: finish what a killed run left half done, and give back one an --overwrite set aside
    where no merged output and no shard row has been written since."""
    for target, shards in targets:
        if not locations.is_remote(target):
            overwrite_aside(target).settle(
                lambda: not target.exists() and all(JournalOutput(s).is_empty() for s in shards))


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _cuda_count() -> int:
    try:
        import torch
        return torch.cuda.device_count()
    except ImportError:
        return 0


def merge(out: Location, shards: list[Location]) -> dict:
    """Interleave the shards back into input order, checking every shard is complete and ids are unique."""
    manifests = [read_manifest(s) for s in shards]
    for s, m in zip(shards, manifests):
        if not _summary(m).get("complete") or not isinstance(m.get("run_key"), dict):
            raise ExtractorError(f"{s} is not complete; rerun with --resume before merging")
        if not locations.is_remote(s):
            drop_partial_tail(s)
    statuses: dict = {}
    rows = _interleave(shards, statuses)
    # The merged output appears whole or not at all: an inconsistency found part-way leaves no output.
    count = write_rows(rows, out, manifests[0].get("prediction_schema"))
    summary = {"records": count, "statuses": dict(sorted(statuses.items())), "complete": True}
    write_json_atomic(manifest_path(out), {"format": MERGED_FORMAT, "shards": [str(s) for s in shards],
                                           "prediction_schema": manifests[0].get("prediction_schema"),
                                           "run_key": {k: v for k, v in manifests[0]["run_key"].items() if k != "shard"},
                                           "shard_manifests": manifests, **stamp(), "summary": summary})
    for s in shards:
        locations.remove(s)
        locations.remove(manifest_path(s))
    return summary


def _interleave(shards: list, statuses: dict):
    """Row i of the merge is row i div n of shard i mod n; ids must be unique and every shard used up."""
    n = len(shards)
    iters = [iter_jsonl_rows(s) for s in shards]
    count, seen = 0, set()
    while True:
        item = next(iters[count % n], None)
        if item is None:
            break
        row = item[1]
        if row["id"] in seen:
            raise ExtractorError(f"id {row['id']} appears twice across shards; the shards are inconsistent")
        seen.add(row["id"])
        statuses[row["status"]] = statuses.get(row["status"], 0) + 1
        count += 1
        yield row
    leftovers = [shards[k].name for k in range(n) if next(iters[k], None) is not None]
    if leftovers:
        raise ExtractorError(f"shards {', '.join(leftovers)} hold more rows than the interleave allows; they do not "
                             "come from the same corpus and settings")
