"""`extractor run --ray HEAD:PORT` on a real two-node Ray cluster (tests/raycluster.py: `ray start --head`
and `ray start --address`, own temp folders, started from a folder that is not the run's, stopped by pid).
One cluster for the module: starting one costs seconds of both cores."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("ray.data")

from tests.conftest import read_jsonl, synth_corpus  # noqa: E402
from tests.raycluster import RayCluster  # noqa: E402

EXTRACTOR = [sys.executable, "-m", "extractor"]


@pytest.fixture(scope="module")
def cluster():
    nodes = RayCluster(cpus_per_node=(1, 1)).start()
    yield nodes
    nodes.stop()
    assert not nodes.leftover_pids()


def echo_run(corpus, gold, out, *extra, address=None, workers=2, cwd=None, env=None):
    cmd = [*EXTRACTOR, "run", str(corpus), "--task", "jd_requirements", "--backend", "echo", "--model", str(gold),
           "--out", str(out), "--quiet", "--window", "8", *extra]
    if address:
        cmd += ["--ray", address, "--ray-workers", str(workers)]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})})


def error_line(result) -> str:
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("error: ")]
    return line


def test_two_nodes_equal_single_process_with_relative_paths(cluster, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    corpus, gold = synth_corpus(data, n=400, seed=3)
    single = echo_run(corpus, gold, tmp_path / "single.jsonl")
    assert single.returncode == 0, single.stderr[-2000:]
    # Corpus, model and output relative to the driver's folder, which is not the nodes' folder.
    result = echo_run(f"data/{corpus.name}", f"data/{gold.name}", "out/ray.jsonl", address=cluster.address,
                      cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert read_jsonl(tmp_path / "out/ray.jsonl") == read_jsonl(tmp_path / "single.jsonl")
    placement = json.loads((tmp_path / "out/ray.jsonl.manifest.json").read_text())["ray"]
    assert len(placement["rows_per_node"]) == 2 and sum(placement["rows_per_node"].values()) == 400, placement


def test_driver_killed_then_resume_exactly_once_on_object_storage(cluster, tmp_path, s3):
    """The driver SIGKILLed while rows stream back into parts on the store, then --resume: every id once."""
    s3.bucket("ray-cluster")
    corpus, gold = synth_corpus(tmp_path, n=600, seed=4)
    ref = tmp_path / "ref.jsonl"
    done = echo_run(corpus, gold, ref)
    assert done.returncode == 0, done.stderr[-2000:]
    s3_corpus = s3.upload(corpus, "s3://ray-cluster/in/corpus.jsonl")
    out = "s3://ray-cluster/out/p.jsonl"
    cmd = [*EXTRACTOR, "run", s3_corpus, "--task", "jd_requirements", "--backend", "echo", "--model", str(gold),
           "--out", out, "--quiet", "--window", "4", "--ray", cluster.address, "--ray-workers", "2"]
    driver = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, **s3.env})
    deadline = time.time() + 120
    while time.time() < deadline and driver.poll() is None and len(s3.keys("ray-cluster", "out/p.jsonl.parts/")) < 3:
        time.sleep(0.1)
    assert driver.poll() is None, "the run ended before it could be killed"
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    parts = s3.keys("ray-cluster", "out/p.jsonl.parts/")
    assert parts and "out/p.jsonl" not in s3.keys("ray-cluster", "out/")  # killed mid-run, nothing committed
    resumed = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=300,
                             env={**os.environ, **s3.env})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    got = [json.loads(line) for line in s3.read(out).splitlines()]
    assert [r["id"] for r in got] == [r["id"] for r in read_jsonl(ref)]  # each id once, in input order
    assert got == read_jsonl(ref)
    manifest = json.loads(s3.read(out + ".manifest.json"))
    assert 0 < manifest["summary"]["already_done"] < 600 and manifest["committed"]


def test_a_pool_the_cluster_cannot_run_is_refused_with_the_numbers(cluster, tmp_path):
    """Two 1-CPU nodes: three half-CPU workers leave no room for a read task on the driver's node, which
    Ray would wait for forever. Refused before anything is written."""
    corpus, gold = synth_corpus(tmp_path, n=8)
    start = time.time()
    result = echo_run(corpus, gold, tmp_path / "o.jsonl", address=cluster.address, workers=3)
    line = error_line(result)
    assert "--ray-workers 3 cannot run" in line and "1 CPU" in line and "--ray-workers 2 or fewer" in line, line
    assert time.time() - start < 60 and not list(tmp_path.glob("o.jsonl*"))
    missing = echo_run(corpus, tmp_path / "not-here.jsonl", tmp_path / "o.jsonl", address=cluster.address)
    assert "not-here.jsonl is not on Ray node" in error_line(missing)


def test_cuda_workers_on_a_cluster_without_gpus_is_one_clear_error(cluster, tmp_path):
    """Ray would hold GPU actors pending forever on a cluster without GPUs: refused up front instead."""
    corpus, gold = synth_corpus(tmp_path, n=4, seed=1)
    line = error_line(echo_run(corpus, gold, tmp_path / "o.jsonl", "--device", "cuda", address=cluster.address))
    assert "the Ray cluster has no GPUs" in line


def test_an_address_where_no_cluster_answers_is_one_line(tmp_path):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.2", 0))
        port = s.getsockname()[1]
    corpus, gold = synth_corpus(tmp_path, n=2)
    line = error_line(echo_run(corpus, gold, tmp_path / "o.jsonl", address=f"127.0.0.2:{port}"))
    assert "no Ray cluster answers there" in line
