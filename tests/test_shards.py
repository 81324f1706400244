import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from extractor.errors import ERROR_FILE_ENV, error_file_value
from tests.conftest import read_jsonl, synth_corpus, write_jsonl
from tests.test_fast_adapters import loras  # noqa: F401 - the fixture: LoRA adapters that differ

EXTRACTOR = [sys.executable, "-m", "extractor"]


def args(corpus, model, out, *extra):
    return ["run", corpus, "--task", "jd_requirements", "--model", model, "--out", out, "--max-new-tokens", "12",
            "--quiet", "--window", "4", "--batch-size", "4", *extra]


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(x) for x in path.read_text().split()] if path.exists() else []


def test_two_workers_equal_single_process(tmp_path, tiny_model, run_cli, warm):
    """The parent commands start warm (forked after the imports, each its own process); their workers cold."""
    corpus, _ = synth_corpus(tmp_path, n=21)
    single, sharded = tmp_path / "single.jsonl", tmp_path / "sharded.jsonl"
    assert run_cli(*args(corpus, tiny_model, single)).exit_code == 0
    code, err = warm.run(args(corpus, tiny_model, sharded, "--gpus", "2", "--device", "cpu"), timeout=300)
    assert code == 0, err[-2000:]
    a, b = read_jsonl(single), read_jsonl(sharded)
    assert [r["id"] for r in b] == [r["id"] for r in a]  # input order, each id once
    assert [r["raw"] for r in b] == [r["raw"] for r in a]
    assert not list(tmp_path.glob("sharded.shard*"))  # shards merged and removed
    code, _ = warm.run(args(corpus, tiny_model, sharded, "--gpus", "2", "--device", "cpu", "--resume"), timeout=300)
    assert code == 0 and read_jsonl(sharded) == b and not list(tmp_path.glob("sharded.shard*"))
    code, err = warm.run(args(corpus, tiny_model, sharded, "--gpus", "2", "--device", "cpu", "--overwrite"),
                         timeout=300)
    assert code == 0, err[-2000:]
    assert [r["raw"] for r in read_jsonl(sharded)] == [r["raw"] for r in a]


def test_two_workers_with_several_adapters_merge_one_output_each(tmp_path, tiny_model, loras, run_cli):  # noqa: F811
    """--gpus with --adapter twice: each adapter's shards merge into its own output, equal to a
    single-process run of that adapter (the merge used to look for the adapter-less shard names)."""
    corpus, _ = synth_corpus(tmp_path, n=9)
    adapters = ["--adapter", str(loras[0]), "--adapter", str(loras[1])]
    out = tmp_path / "p.jsonl"
    result = subprocess.run(EXTRACTOR + args(corpus, tiny_model, out, *adapters, "--gpus", "2", "--device", "cpu"),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert not list(tmp_path.glob("p.shard*"))  # every shard merged and removed
    for adapter in loras[:2]:
        alone = tmp_path / f"{adapter.name}.alone.jsonl"
        assert run_cli(*args(corpus, tiny_model, alone, "--adapter", str(adapter))).exit_code == 0
        merged = read_jsonl(tmp_path / f"p.{adapter.name}.jsonl")
        assert [(r["id"], r["raw"], r["adapter"]) for r in merged] == \
            [(r["id"], r["raw"], r["adapter"]) for r in read_jsonl(alone)]
    again = subprocess.run(EXTRACTOR + args(corpus, tiny_model, out, *adapters, "--gpus", "2", "--device", "cpu",
                                            "--resume"), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert not list(tmp_path.glob("p.shard*"))  # complete outputs: nothing run again


def test_refuses_to_replace_an_unmerged_output(tmp_path, tiny_model):
    corpus, _ = synth_corpus(tmp_path, n=3)
    out = tmp_path / "mine.jsonl"
    out.write_text("precious\n")
    result = subprocess.run(EXTRACTOR + args(corpus, tiny_model, out, "--gpus", "2", "--device", "cpu", "--resume"),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "not merged by a --gpus run" in result.stderr
    assert "Traceback" not in result.stderr and out.read_text() == "precious\n"


def test_dead_worker_is_reported_and_resumable(tmp_path, tiny_model, run_cli):
    corpus, _ = synth_corpus(tmp_path, n=40, seed=5)
    ref = tmp_path / "ref.jsonl"
    assert run_cli(*args(corpus, tiny_model, ref)).exit_code == 0
    out = tmp_path / "o.jsonl"
    unset = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # as a user who set none
    parent = subprocess.Popen(EXTRACTOR + args(corpus, tiny_model, out, "--gpus", "2", "--device", "cpu"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=unset)
    shard1 = tmp_path / "o.shard1of2.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (shard1.exists() and shard1.stat().st_size > 0):
        time.sleep(0.05)
    victims = [pid for pid in children(parent.pid) if "1/2" in Path(f"/proc/{pid}/cmdline").read_text()]
    assert victims, "worker 1 not found"
    # CPU workers split the cores instead of each taking all of them
    environ = Path(f"/proc/{victims[0]}/environ").read_bytes().split(b"\0")
    assert f"OMP_NUM_THREADS={max(1, len(os.sched_getaffinity(0)) // 2)}".encode() in environ
    os.kill(victims[0], signal.SIGKILL)
    _, err = parent.communicate(timeout=300)
    assert parent.returncode == 2 and "worker 1" in err and "--resume" in err
    assert len(read_jsonl(shard1)) < 20  # killed part-way
    resumed = subprocess.run(EXTRACTOR + args(corpus, tiny_model, out, "--gpus", "2", "--device", "cpu", "--resume"),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    got, want = read_jsonl(out), read_jsonl(ref)
    assert [r["id"] for r in got] == [r["id"] for r in want]
    assert [r["raw"] for r in got] == [r["raw"] for r in want]


def test_merge_interrupted_before_its_manifest_finishes_on_resume(tmp_path, tiny_model, warm):
    """A kill after the merged file replaced the output but before its manifest: the shards are still there,
    so --resume merges again instead of refusing the half-finished output."""
    corpus, _ = synth_corpus(tmp_path, n=9, seed=2)
    out = tmp_path / "m.jsonl"
    for k in range(2):  # the two workers' own commands (warm starts: forked after the imports)
        shard = tmp_path / f"m.shard{k}of2.jsonl"
        code, err = warm.run(args(corpus, tiny_model, shard, "--shard", f"{k}/2", "--device", "cpu"), timeout=300)
        assert code == 0, err[-2000:]
    out.write_text((tmp_path / "m.shard0of2.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)[0])
    code, err = warm.run(args(corpus, tiny_model, out, "--gpus", "2", "--device", "cpu"), timeout=300)
    assert code == 2 and "pass --resume to finish it" in err
    code, err = warm.run(args(corpus, tiny_model, out, "--gpus", "2", "--device", "cpu", "--resume"), timeout=300)
    assert code == 0, err[-2000:]
    assert [r["id"] for r in read_jsonl(out)] == [r["id"] for r in read_jsonl(corpus)]
    assert not list(tmp_path.glob("m.shard*"))


def test_more_gpus_than_visible_is_one_clear_error(tmp_path, tiny_model):
    import torch
    corpus, _ = synth_corpus(tmp_path, n=3)
    n = torch.cuda.device_count() + 1
    result = subprocess.run(EXTRACTOR + args(corpus, tiny_model, tmp_path / "o.jsonl", "--gpus", str(n), "--device",
                                             "cuda"), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and f"--gpus {n}" in result.stderr and "--device cpu" in result.stderr
    assert "Traceback" not in result.stderr and not list(tmp_path.glob("o*"))


def _corpus_without_text_first(tmp_path, n: int):
    """A synthetic corpus whose first record has no text field (every run refuses it): corpus, gold, its id."""
    corpus, gold = synth_corpus(tmp_path, n=n)
    rows = read_jsonl(corpus)
    rows[0] = {"id": rows[0]["id"], "body": "no text"}
    write_jsonl(corpus, rows)
    return corpus, gold, rows[0]["id"]


def test_failed_workers_are_one_error_line(tmp_path):
    """Both workers refuse a corpus (its first record has no text): the command says so in one line, naming
    both shards and the workers' own reason, instead of each worker's line and then its own."""
    corpus, gold, first_id = _corpus_without_text_first(tmp_path, n=6)
    result = subprocess.run(EXTRACTOR + ["run", corpus, "--task", "jd_requirements", "--backend", "echo", "--model",
                                         gold, "--out", tmp_path / "o.jsonl", "--quiet", "--gpus", "2", "--device",
                                         "cpu"], capture_output=True, text=True, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith("error: workers 0 and 1 (shards o.shard0of2.jsonl, o.shard1of2.jsonl): "), line
    assert f"{corpus.name}:1 (id {first_id}): missing field 'text'" in line, line  # the workers' own reason
    assert "--resume" in line


def test_error_file_variable_exported_by_a_user_swallows_nothing(tmp_path):
    """EXTRACTOR_ERROR_FILE is how a --gpus parent collects its workers' last lines; the same name set in a
    user's environment is not a parent asking: the error still reaches stderr, and no file is written."""
    corpus, gold, _ = _corpus_without_text_first(tmp_path, n=3)
    exported = tmp_path / "mine.txt"

    def run(value):
        return subprocess.run(EXTRACTOR + ["run", corpus, "--task", "jd_requirements", "--backend", "echo",
                                           "--model", gold, "--out", tmp_path / "o.jsonl", "--quiet"],
                              capture_output=True, text=True, timeout=120, env={**os.environ, ERROR_FILE_ENV: value})
    for value in (str(exported), f"1:{exported}"):  # a bare path; another process's request
        result = run(value)
        assert result.returncode == 2 and "missing field 'text'" in result.stderr, (value, result.stderr)
        assert not exported.exists(), value
    result = run(error_file_value(str(exported)))  # this process is the command's parent: it asked
    assert result.returncode == 2 and result.stderr == "" and "missing field 'text'" in exported.read_text()
