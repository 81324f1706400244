"""Kill suites: SIGKILL real `extractor` processes at random moments, resume, and check nothing is lost.

- run:   `extractor run` (hf, tiny model) killed K times, resumed each time → every input id exactly once,
         outputs identical to an uninterrupted run (greedy).
- train: `extractor train --method full` killed after a checkpoint, resumed → final weights equal to an
         uninterrupted run's within a tolerance.
- shard: `extractor run --gpus 2 --device cpu` killed K times (parent and workers), resumed → merged
         output identical to the single-process run.
- store: `extractor run` (echo backend) writing to an object store (S3-compatible, from the environment:
         AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...) killed K times at random moments of the whole run, the
         commit included, resumed → every id exactly once, identical to a local run; where each kill landed.

    python bench/reliability.py --kills 20 --out bench/out/reliability.json
    python bench/reliability.py --store-kills 20   # starts moto's S3 server on loopback for it
The test suite runs the same functions (tests/test_reliability.py). The run, shard and train suites start their
`extractor` commands warm (prestart.py: forked from a process that has done the imports, each still a process of
its own, killed as one); the store suite and other callers of _kill_at_random start fresh ones.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import prestart

EXTRACTOR = [sys.executable, "-m", "extractor"]


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def grows(path: Path):
    """A readiness test: the file has grown since the process started (work is under way)."""
    start = _size(path)
    return lambda: _size(path) > start


def _kill_at_random(cmd: list[str], ready, rng: random.Random, max_delay: float, timeout: float = 120,
                    server: prestart.Server | None = None) -> bool:
    """Start cmd, wait until ready() (work has begun), SIGKILL the whole process group after a random delay.
    Returns True when the kill landed before the process finished by itself."""
    if server is not None:
        proc = server.popen(cmd)
    else:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not ready():
        time.sleep(0.01)
    time.sleep(rng.uniform(0, max_delay))
    killed = proc.poll() is None
    if killed and server is not None:
        return proc.kill() == -signal.SIGKILL  # not when it ended by itself in between
    if killed:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return killed


def _run_to_end(cmd: list[str], timeout: float = 400, server: prestart.Server | None = None) -> tuple[int, str]:
    """Run cmd in a process group of its own (forked by `server` where given); past `timeout` the whole group
    (workers included) is killed, so a hang fails here instead of leaving processes that slow everything after
    it. Returns (exit code, stderr)."""
    if server is not None:
        try:
            return server.run(cmd, timeout)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{' '.join(cmd[2:5])}... did not finish in {timeout:.0f} s") from None
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise RuntimeError(f"{' '.join(cmd[2:5])}... did not finish in {timeout:.0f} s") from None
    return proc.returncode, err


def _check_ran(result: tuple[int, str]) -> None:
    code, err = result
    if code != 0:
        raise RuntimeError(f"exit {code}: {err[-2000:]}")


def _check_exactly_once(out: Path, corpus: Path, ref: Path) -> dict:
    """Every id of the corpus in `out` once, each output as in `ref` (a run over this corpus or one it begins)."""
    got = _rows(out)
    ids = [r["id"] for r in got]
    expected = [json.loads(line)["id"] for line in corpus.read_text(encoding="utf-8").splitlines()]
    ref_raw = {r["id"]: r["raw"] for r in _rows(ref) if r["id"] in set(expected)}
    return {"records": len(expected), "lost": len(set(expected) - set(ids)), "duplicated": len(ids) - len(set(ids)),
            "identical_to_uninterrupted": {r["id"]: r["raw"] for r in got} == ref_raw}


def make_fixture(root: Path, n: int = 1000, name: str = "corpus") -> tuple[Path, Path, Path]:
    """The tiny model (built once under root), and a corpus of n records with its gold. A smaller n gives the
    first n records of a larger one."""
    from extractor.datasets.synth import write_corpus
    from extractor.datasets.tiny_models import build_tiny_model
    model = root / "model"
    if not model.exists():
        build_tiny_model(model)
    corpus, gold = root / f"{name}.jsonl", root / f"{name}-gold.jsonl"
    write_corpus(corpus, gold, n, seed=11)
    return model, corpus, gold


def run_args(corpus: Path, model: Path, out: Path, *extra, batch: int = 2) -> list[str]:
    """Killed runs write in windows of 2 records, so that a kill lands between windows as well as inside one."""
    return EXTRACTOR + ["run", str(corpus), "--task", "jd_requirements", "--model", str(model), "--out", str(out),
                        "--max-new-tokens", "24", "--quiet", "--window", str(batch), "--batch-size", str(batch),
                        "--allow-no-result", *extra]  # a random tiny model: no record comes out ok


def reference(root: Path, server: prestart.Server | None = None, n: int = 1000) -> Path:
    """An uninterrupted single-process run over make_fixture's corpus of n records: the output every killed run
    (over those records or the first of them), sharded or not, must reproduce."""
    model, corpus, _ = make_fixture(root, n)
    ref = root / "run-ref.jsonl"
    # In batches of 16, not the killed runs' 2: each record's tokens do not depend on its batch (a resumed run's
    # batches are paired differently anyway), and 700 records took 20 s instead of 89 s with the same raw text.
    _check_ran(_run_to_end(run_args(corpus, model, ref, batch=16), server=server))
    return ref


def run_kills(root: Path, kills: int, seed: int = 0, extra: tuple = (), label: str = "run", n: int = 1000,
              ref: Path | None = None, server: prestart.Server | None = None) -> dict:
    """`kills` SIGKILLs of a run over the first n records, then a resume; checked against `ref` (reference()'s
    output, made here when None). server: where the commands start (one of this suite's own when None)."""
    if server is None:
        with prestart.Server() as server:
            return run_kills(root, kills, seed, extra, label, n, ref, server)
    ref = ref or reference(root, server)
    model, corpus, _ = make_fixture(root, n, name=f"{label}-corpus")
    out = root / f"{label}-killed.jsonl"
    rng = random.Random(seed)
    landed = attempts = 0
    while landed < kills and attempts < 2 * kills:  # a run that finished before its kill does not count
        attempts += 1
        # Once output (or, with --gpus, a shard) starts growing, kill within the next moments of work.
        watched = out if "--gpus" not in extra else out.with_name(out.stem + ".shard0of2.jsonl")
        landed += _kill_at_random(run_args(corpus, model, out, "--resume", *extra), grows(watched), rng,
                                  max_delay=0.5, server=server)
    _check_ran(_run_to_end(run_args(corpus, model, out, "--resume", *extra), server=server))
    return {"suite": label, "kills_attempted": attempts, "kills_landed": landed,
            **_check_exactly_once(out, corpus, ref)}


def store_phase(out: str) -> str:
    """Where a killed store run stopped, from what it left (parts.py's states)."""
    from extractor.store import locations
    from extractor.store.provenance import read_manifest
    target = locations.target(out)
    parts = locations.listing(target.with_name(target.name + ".parts"))
    manifest = read_manifest(target) or {}
    if manifest.get("committed"):
        return "committed, deleting parts" if parts else "complete"
    if locations.exists(target):
        return "output uploaded, commit not recorded"
    return "writing parts" if parts else "before the first part"


def run_kills_store(root: Path, prefix: str, kills: int, seed: int = 0, n: int = 400) -> dict:
    """Kills of a run whose output is `prefix`/killed.jsonl on an object store (this process's environment
    says which and how). The first two thirds land while parts are being written (soon after one appears),
    the rest during the commit (soon after the output object appears); then a resume to the end."""
    from extractor.store import locations
    from extractor.datasets.synth import write_corpus
    corpus, gold = root / "store-corpus.jsonl", root / "store-gold.jsonl"
    write_corpus(corpus, gold, n, seed=11)

    def args(out):
        return EXTRACTOR + ["run", str(corpus), "--task", "jd_requirements", "--backend", "echo", "--model", str(gold),
                            "--out", str(out), "--quiet", "--window", "4"]
    ref = root / "store-ref.jsonl"
    _check_ran(_run_to_end(args(ref)))
    out = f"{prefix}/killed.jsonl"
    target = locations.target(out)
    parts = target.with_name(target.name + ".parts")
    rng = random.Random(seed)
    landed, phases = 0, {}
    for i in range(kills):
        in_commit = i >= (2 * kills) // 3
        started = time.time()
        ready = (lambda: _uploaded_since(target, started)) if in_commit else _polled(lambda: locations.listing(parts))
        if _kill_at_random(args(out) + ["--resume"], ready, rng, max_delay=0.05 if in_commit else 0.3):
            landed += 1
            phase = store_phase(out)
            phases[phase] = phases.get(phase, 0) + 1
    _check_ran(_run_to_end(args(out) + ["--resume"]))
    local = root / "store-killed.jsonl"
    local.write_bytes(locations.filesystem(target).cat_file(out))
    return {"suite": "store", "kills_attempted": kills, "kills_landed": landed, "where_kills_landed": phases,
            **_check_exactly_once(local, corpus, ref)}


def _polled(probe, every: float = 0.05):
    """A readiness test that asks the store at most every `every` seconds (each ask is a request)."""
    state = {"next": 0.0}

    def ready():
        if time.time() < state["next"]:
            return False
        state["next"] = time.time() + every
        return bool(probe())
    return ready


def _uploaded_since(target, since: float) -> bool:
    from extractor.store import locations
    try:
        info = locations.filesystem(target).info(target.uri, refresh=True)
    except FileNotFoundError:
        return False
    modified = info.get("LastModified")
    return modified is not None and modified.timestamp() >= since - 1


def train_kill(root: Path, seed: int = 0, server: prestart.Server | None = None) -> dict:
    """A full training killed twice after a checkpoint, resumed; its final weights against an uninterrupted
    run's. The dev set (scored at every checkpoint, before the checkpoint is saved) is the first 16 records:
    it decides no weight."""
    if server is None:
        with prestart.Server(prestart.TRAIN) as server:
            return train_kill(root, seed, server)
    import torch
    from safetensors.torch import load_file
    model, corpus, gold = make_fixture(root)
    _, dev, dev_gold = make_fixture(root, 16, name="train-dev")
    base = EXTRACTOR + ["train", "--model", str(model), "--method", "full", "--train", str(corpus), "--gold", str(gold),
                        "--dev", str(dev), "--dev-gold", str(dev_gold), "--task", "jd_requirements", "--max-steps",
                        "40", "--save-steps", "10", "--batch-size", "4", "--eval-limit", "2", "--eval-max-new-tokens",
                        "4", "--max-source-len", "300", "--max-target-len", "64", "--quiet", "--seed", str(seed)]
    ref, killed = root / "train-ref", root / "train-killed"
    _check_ran(_run_to_end(base + ["--out", str(ref)], server=server))
    rng = random.Random(seed)
    kills = 0
    for target in (10, 20):  # kill twice, each time somewhere after a checkpoint was saved
        cmd = base + ["--out", str(killed)] + (["--resume"] if kills else [])
        state = killed / f"checkpoint-{target}" / "trainer_state.pt"
        kills += _kill_at_random(cmd, state.exists, rng, max_delay=0.4, server=server)
    _check_ran(_run_to_end(base + ["--out", str(killed), "--resume"], server=server))
    a = load_file(ref / "checkpoint-40" / "model.safetensors")
    b = load_file(killed / "checkpoint-40" / "model.safetensors")
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    scale = max(float(v.abs().max()) for v in a.values())
    return {"suite": "train", "kills_landed": kills, "max_abs_weight_diff": diff, "max_abs_weight": scale,
            "within_tolerance": diff <= 1e-4 * max(scale, 1.0), "torch": torch.__version__}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--shard-kills", type=int, default=6)
    parser.add_argument("--store-kills", type=int, default=0, help="object-store suite (starts moto's S3 server)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if args.store_kills:
            results = [_store_suite(root, args.store_kills)]
        else:
            with prestart.Server(prestart.TRAIN) as server:
                ref = reference(root, server)
                results = [run_kills(root, args.kills, ref=ref, server=server), train_kill(root, server=server),
                           run_kills(root, args.shard_kills, extra=("--gpus", "2", "--device", "cpu"), label="shard",
                                     ref=ref, server=server)]
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")


def _store_suite(root: Path, kills: int) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.s3server import S3Server
    server = S3Server(root / "moto.log")
    try:
        os.environ.update(server.env)
        server.bucket("reliability")
        return run_kills_store(root, "s3://reliability/run", kills)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
