"""Attacks on what a run replaces or leaves behind: `--overwrite` runs that fail or are killed before they
commit, the hidden rejects file of a killed pass, and output paths that are the task's own files. In-process
(`CliRunner`, echo backend) where the case is about files; a real `extractor run` and a real SIGKILL where it is
about a process. Every case checks the folder byte for byte, hidden files included."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from extractor.cli.main import cli
from extractor.store.records import BadRecord
from extractor.store.rejects import RejectsWriter, remove_stale, staging_files
from tests.conftest import read_jsonl, write_jsonl

N = 20
pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def job(tmp_path):
    """A folder with a 20-record corpus `c.jsonl` and its echo gold `g.jsonl`."""
    from extractor.datasets.synth import write_corpus
    write_corpus(tmp_path / "c.jsonl", tmp_path / "g.jsonl", N, seed=0, lang="zh")
    return tmp_path


def run(job: Path, corpus, out, *extra):
    """`extractor run` in this process (echo backend); click's Result."""
    args = ["run", str(job / corpus), "--task", "jd_requirements", "--backend", "echo", "--model", str(job / "g.jsonl"),
            "--out", str(job / out), "--quiet", *map(str, extra)]
    return CliRunner().invoke(cli, args, catch_exceptions=False)


def one_error(result, *needles: str) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def snapshot(folder: Path) -> dict:
    """Every file under the folder, hidden ones and subfolders included, by relative path."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def ids(path: Path) -> list[str]:
    return [row["id"] for row in read_jsonl(path)]


def bad_at(job: Path, line: int, name: str) -> str:
    """The corpus with record `line` (1-based) lacking its text."""
    rows = read_jsonl(job / "c.jsonl")
    rows[line - 1] = {"id": rows[line - 1]["id"], "body": "no text"}
    write_jsonl(job / name, rows)
    return name


# -- --overwrite keeps the old output until the new run commits ------------------------------------------------
@pytest.mark.parametrize("out", ["o.jsonl", "o.parquet"])
@pytest.mark.parametrize("failure", ["bad first record", "prompt too long"])
def test_overwrite_that_fails_before_its_first_row_leaves_the_old_output(job, out, failure):
    assert run(job, "c.jsonl", out).exit_code == 0
    before = snapshot(job)
    if failure == "bad first record":
        corpus, extra, named = bad_at(job, 1, "bad.jsonl"), [], "missing field 'text'"
    else:
        rows = read_jsonl(job / "c.jsonl")
        rows[0]["text"] = "很长" * 3000
        corpus, extra, named = write_jsonl(job / "bad.jsonl", rows).name, ["--max-input-tokens", "1000"], "--on-long"
    before = {**before, "bad.jsonl": (job / "bad.jsonl").read_bytes()}
    one_error(run(job, corpus, out, "--overwrite", *extra), named)
    assert snapshot(job) == before  # output and manifest byte-identical, nothing aside, nothing new


def test_overwrite_that_commits_replaces_the_old_output(job):
    assert run(job, "c.jsonl", "o.jsonl").exit_code == 0
    assert run(job, "c.jsonl", "o.jsonl", "--overwrite", "--limit", "5").exit_code == 0
    assert ids(job / "o.jsonl") == ids(job / "c.jsonl")[:5]
    assert sorted(p.name for p in job.iterdir()) == ["c.jsonl", "g.jsonl", "o.jsonl", "o.jsonl.manifest.json"]


def test_failed_overwrite_with_rows_keeps_the_old_output_aside_until_one_commits(job):
    """An overwrite that wrote rows, then failed, stays resumable; the output it replaces is kept aside, and a
    second overwrite that writes nothing gives back that output, not the unfinished one."""
    assert run(job, "c.jsonl", "o.jsonl").exit_code == 0
    original = snapshot(job)
    bad9, bad1 = bad_at(job, 10, "bad9.jsonl"), bad_at(job, 1, "bad1.jsonl")
    one_error(run(job, bad9, "o.jsonl", "--overwrite", "--window", "4"), "bad9.jsonl:10")
    assert len(ids(job / "o.jsonl")) in (4, 8)  # the unfinished run's rows, whole windows
    aside = job / ".o.jsonl.replaced"
    assert snapshot(aside) == {name: original[name] for name in ("o.jsonl", "o.jsonl.manifest.json")}
    one_error(run(job, "c.jsonl", "o.jsonl"), "already exists")  # the unfinished output is there, as said
    one_error(run(job, bad1, "o.jsonl", "--overwrite"), "bad1.jsonl:1")
    assert {k: v for k, v in snapshot(job).items() if not k.startswith("bad")} == original
    one_error(run(job, bad9, "o.jsonl", "--overwrite", "--window", "4"), "bad9.jsonl:10")
    assert run(job, "c.jsonl", "o.jsonl", "--overwrite", "--limit", "5").exit_code == 0  # commits: the old goes
    assert ids(job / "o.jsonl") == ids(job / "c.jsonl")[:5] and not aside.exists()


def test_overwrite_killed_before_its_first_row_leaves_the_old_output(job):
    """A real overwrite run, SIGKILLed after it moved the old output aside and began its rejects, before any
    row: the next run puts the old output back and sweeps the dead pass's hidden rejects file."""
    skip = ["--on-bad-record", "skip"]
    assert run(job, "c.jsonl", "o.jsonl", *skip).exit_code == 0
    before = snapshot(job)
    fifo = job / "f.jsonl"
    os.mkfifo(fifo)
    proc = subprocess.Popen([sys.executable, "-m", "extractor", "run", str(fifo), "--task", "jd_requirements",
                             "--backend", "echo", "--model", str(job / "g.jsonl"), "--out", str(job / "o.jsonl"),
                             "--quiet", "--overwrite", *skip], stderr=subprocess.PIPE)
    try:
        with _writer(fifo, proc) as feed:  # once the run reads the corpus, its manifest is written
            feed.write('{"id": "x1", "body": 1}\n{"id": "x2", "body": 2}\n')
            feed.flush()
            deadline = time.monotonic() + 30
            while not any(p.read_bytes().count(b"\n") == 2 for p in staging_files(job / "o.jsonl.rejects.jsonl")):
                assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read()
                time.sleep(0.02)
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(10)
        proc.stderr.close()
    fifo.unlink()
    assert (job / ".o.jsonl.replaced").is_dir() and len(staging_files(job / "o.jsonl.rejects.jsonl")) == 1
    one_error(run(job, "c.jsonl", "o.jsonl", *skip), "o.jsonl already exists")  # the old output is back
    resumed = run(job, "c.jsonl", "o.jsonl", *skip, "--resume")
    assert resumed.exit_code == 0, resumed.stderr
    after = snapshot(job)
    assert after.keys() == before.keys()  # the dead pass's rejects file swept, no lock or aside left
    assert {k: after[k] for k in ("c.jsonl", "g.jsonl", "o.jsonl")} == {k: before[k] for k in ("c.jsonl", "g.jsonl",
                                                                                             "o.jsonl")}


def _writer(fifo: Path, proc):
    """The FIFO opened for writing once `proc` opens it for reading (failing, not hanging, if proc exits)."""
    deadline = time.monotonic() + 30
    while True:
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            break
        except OSError:  # ENXIO: no reader yet
            assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read()
            time.sleep(0.02)
    os.set_blocking(fd, True)
    return os.fdopen(fd, "w", encoding="utf-8")


def test_gpus_overwrite_whose_workers_write_nothing_leaves_the_old_merged_output(job):
    """--gpus: the merged output is kept aside while the workers run; they fail before any row: it is back."""
    workers = ["--gpus", "2", "--device", "cpu"]
    assert run(job, "c.jsonl", "o.jsonl", *workers).exit_code == 0
    before = {**snapshot(job), "bad.jsonl": (job / bad_at(job, 1, "bad.jsonl")).read_bytes()}
    failed = run(job, "bad.jsonl", "o.jsonl", *workers, "--overwrite")
    one_error(failed, "workers 0 and 1", "bad.jsonl:1")  # both workers' own reason, in the parent's one line
    assert snapshot(job) == before
    assert run(job, "c.jsonl", "o.jsonl", *workers, "--overwrite", "--limit", "3").exit_code == 0
    assert len(ids(job / "o.jsonl")) == 6 and not (job / ".o.jsonl.replaced").exists()


def test_corpus_kept_aside_by_an_overwrite_is_an_input_too(job):
    """The copy --overwrite keeps aside is deleted at the commit: a run reading it as its corpus is refused."""
    (job / ".o.jsonl.replaced").mkdir()
    (job / "c.jsonl").rename(job / ".o.jsonl.replaced" / "o.jsonl")
    before = snapshot(job)
    one_error(run(job, ".o.jsonl.replaced/o.jsonl", "o.jsonl", "--overwrite"), "copy kept aside by --overwrite",
              "is the corpus")
    assert snapshot(job) == before


@pytest.mark.parametrize("cut", ["moving aside", "putting back", "deleting at the commit", "aside, rows written"])
def test_every_step_cut_short_is_settled(job, cut):
    """A kill between any two renames of store/aside.py, laid out with real files: the next run's settle
    finishes or undoes the step, and no state loses the old output or a committed one."""
    from extractor.store.writers import JournalOutput
    assert run(job, "c.jsonl", "o.jsonl").exit_code == 0
    old = snapshot(job)
    out, manifest = job / "o.jsonl", job / "o.jsonl.manifest.json"
    if cut == "moving aside":  # the output moved, the manifest not yet
        (job / ".o.jsonl.replaced.tmp").mkdir()
        out.rename(job / ".o.jsonl.replaced.tmp" / "o.jsonl")
        want = old
    elif cut == "putting back":  # the new files gone, the output back, the manifest not yet
        (job / ".o.jsonl.replaced.restoring").mkdir()
        manifest.rename(job / ".o.jsonl.replaced.restoring" / manifest.name)
        want = old
    elif cut == "deleting at the commit":  # a committed output; the old one's deletion half done
        (job / ".o.jsonl.replaced.dropped").mkdir()
        (job / ".o.jsonl.replaced.dropped" / "o.jsonl").write_text("old\n", encoding="utf-8")
        want = old
    else:  # an overwrite that wrote rows and was killed: stays as it is, resumable
        (job / ".o.jsonl.replaced").mkdir()
        (job / ".o.jsonl.replaced" / "o.jsonl").write_text("old\n", encoding="utf-8")
        want = snapshot(job)
    JournalOutput(out).settle()
    assert snapshot(job) == want


# -- the hidden rejects file of a killed pass -------------------------------------------------------------------
def test_stale_rejects_staging_is_swept_and_a_live_one_spared(job):
    rejects = job / "r.jsonl"
    live = RejectsWriter(rejects)
    live.write(BadRecord("c.jsonl", 4, "r4", "missing field 'text'", "{}"))
    dead = job / ".r.jsonl.abcd1234.partial"  # a killed pass's file: nobody holds its lock
    dead.write_text('{"line": 9}\n' * 1000, encoding="utf-8")
    user = job / ".r.jsonl.keep-me.partial"  # not a name a pass makes
    user.write_text("mine\n", encoding="utf-8")
    assert remove_stale(rejects) == 1
    assert not dead.exists() and user.exists() and len(staging_files(rejects)) == 1
    other = RejectsWriter(rejects)  # a second pass (a --gpus worker) beside the live one: spares it
    assert len(staging_files(rejects)) == 1
    live.close()
    other.close()  # wrote nothing: the rejects file goes; its own lines are never mixed in
    assert not rejects.exists() and staging_files(rejects) == []
    live = RejectsWriter(rejects)
    live.write(BadRecord("c.jsonl", 4, "r4", "missing field 'text'", "{}"))
    live.close()
    assert [row["line"] for row in read_jsonl(rejects)] == [4] and staging_files(rejects) == []
    assert oct(rejects.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# -- an output that is one of the task's files ------------------------------------------------------------------
@pytest.fixture
def tasks(user_tasks):
    """The user task `mytask`, its schema's `degree` property moved into a referenced file."""
    import json
    schema_file = user_tasks / "schemas" / "mytask.json"
    schema = json.loads(schema_file.read_text(encoding="utf-8"))
    (user_tasks / "schemas" / "degree.json").write_text(json.dumps(schema["properties"]["学历要求"]), encoding="utf-8")
    schema["properties"]["学历要求"] = {"$ref": "degree.json"}
    schema_file.write_text(json.dumps(schema, ensure_ascii=False), encoding="utf-8")
    return user_tasks


def _task_clash(job: Path, tasks: Path, case: str) -> list[str]:
    prompt, schema = tasks / "prompts" / "mytask.yaml", tasks / "schemas" / "mytask.json"
    (job / "link.json").symlink_to(schema)
    task = ["--task", "mytask", "--tasks-dir", str(tasks)]
    run_ = ["run", str(job / "c.jsonl"), "--backend", "echo", "--model", str(job / "g.jsonl"), *task, "--quiet"]
    eval_ = [str(job / "p.jsonl"), "--gold", str(job / "g.jsonl"), *task]
    return {"run --out is the task file": [*run_, "--out", str(prompt), "--overwrite"],
            "run --out is the schema": [*run_, "--out", str(schema), "--resume"],
            "run --out symlinks to the schema": [*run_, "--out", str(job / "link.json"), "--overwrite"],
            "run --out is a referenced schema": [*run_, "--out", str(tasks / "schemas" / "degree.json"), "--overwrite"],
            "run --rejects is the task file": [*run_, "--out", str(job / "o.jsonl"), "--on-bad-record", "skip",
                                               "--rejects", str(prompt), "--overwrite"],
            "eval --metrics is the task file": ["eval", *eval_, "--metrics", str(prompt)],
            "eval --metrics is a referenced schema": ["eval", *eval_, "--metrics",
                                                      str(tasks / "schemas" / "degree.json")],
            "compare --json is the schema": ["compare", str(job / "p.jsonl"), str(job / "p.jsonl"), "--gold",
                                             str(job / "g.jsonl"), *task, "--json", str(schema)],
            "validate --spans-out is the task file": ["validate", str(job / "p.jsonl"), *task, "--corpus",
                                                      str(job / "c.jsonl"), "--spans-out", str(prompt)]}[case]


TASK_CLASHES = ["run --out is the task file", "run --out is the schema", "run --out symlinks to the schema",
                "run --out is a referenced schema", "run --rejects is the task file", "eval --metrics is the task file",
                "eval --metrics is a referenced schema", "compare --json is the schema",
                "validate --spans-out is the task file"]


@pytest.mark.parametrize("case", TASK_CLASHES)
def test_output_that_is_a_task_file_is_refused(job, tasks, case):
    write_jsonl(job / "p.jsonl", [{"id": r["id"], "prediction": r["gold"], "status": "ok"}
                                  for r in read_jsonl(job / "g.jsonl")])
    args = _task_clash(job, tasks, case)
    before, task_before = snapshot(job), snapshot(tasks)
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    one_error(result, "mytask", "choose another")
    assert snapshot(job) == before and snapshot(tasks) == task_before
