"""Attacks on the files a run reads and writes: outputs that are inputs, --rejects, two runs on one output, runs
that fail before their first row, resumes on another corpus or a damaged output, disk full, runs with no usable
result, FIFO corpora. Each case is a real `extractor run` subprocess (echo backend: no model), checked for its
exit code, a single error line, no traceback, inputs byte-identical and exact row counts."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import read_jsonl, write_jsonl

EXTRACTOR = [sys.executable, "-m", "extractor"]
N = 20
pytestmark = pytest.mark.timeout(120)


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "EXTRACTOR_ALLOW_NO_RESULT"}  # the default behaviour
    env.update(extra)
    return env


def run(corpus, model, out, *extra, cwd=None, env=None, quiet=True) -> subprocess.CompletedProcess:
    args = [*EXTRACTOR, "run", str(corpus), "--task", "jd_requirements", "--backend", "echo", "--model", str(model),
            "--out", str(out), *(["--quiet"] if quiet else []), *map(str, extra)]
    return subprocess.run(args, capture_output=True, text=True, timeout=90, cwd=cwd, env=env or _env())


def one_error(result, code: int = 2, *needles: str) -> str:
    """The run failed with `code` and exactly one `error:` line holding each needle."""
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert result.returncode == code and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def job(tmp_path):
    """A folder with a 20-record corpus `c.jsonl` and its echo gold `g.jsonl`."""
    from extractor.datasets.synth import write_corpus
    write_corpus(tmp_path / "c.jsonl", tmp_path / "g.jsonl", N, seed=0, lang="zh")
    return tmp_path


def snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def ids(path) -> list[str]:
    return [r["id"] for r in read_jsonl(path)]


# -- an output that is an input: refused before anything is written ---------------------------------------------
def _model_folder(d: Path) -> Path:
    (d / "model").mkdir()
    (d / "model" / "config.json").write_text('{"model_type": "qwen2"}', encoding="utf-8")
    return d / "model"


def _link(d: Path, name: str, target: str, hard: bool) -> str:
    (os.link if hard else os.symlink)(d / target, d / name)
    return name


CLASHES = {  # case -> (corpus, --model, --out, extra args) in the job folder; what the error names
    "out is the corpus": lambda d: ("c.jsonl", "g.jsonl", "c.jsonl", ["--overwrite"], "the corpus"),
    "out is ./corpus": lambda d: ("c.jsonl", "g.jsonl", "./c.jsonl", ["--overwrite"], "the corpus"),
    "out is corpus via ..": lambda d: ("c.jsonl", "g.jsonl", f"../{d.name}/c.jsonl", ["--overwrite"], "the corpus"),
    "out symlinks to the corpus": lambda d: ("c.jsonl", "g.jsonl", _link(d, "s.jsonl", "c.jsonl", False),
                                             ["--overwrite"], "the corpus"),
    "out hard-links the corpus": lambda d: ("c.jsonl", "g.jsonl", _link(d, "h.jsonl", "c.jsonl", True),
                                            ["--overwrite"], "the corpus"),
    "out is the echo gold": lambda d: ("c.jsonl", "g.jsonl", "g.jsonl", ["--overwrite"], "--model file"),
    "out hard-links the echo gold": lambda d: ("c.jsonl", "g.jsonl", _link(d, "hg.jsonl", "g.jsonl", True),
                                               ["--resume"], "--model file"),
    "manifest would be the corpus": lambda d: (shutil.copy(d / "c.jsonl", d / "o.jsonl.manifest.json") and
                                               "o.jsonl.manifest.json", "g.jsonl", "o.jsonl", [], "its manifest"),
    "parquet journal would be the corpus": lambda d: (shutil.copy(d / "c.jsonl", d / "o.parquet.partial.jsonl") and
                                                      "o.parquet.partial.jsonl", "g.jsonl", "o.parquet", [],
                                                      "its journal"),
    "lock file would be the gold": lambda d: ("c.jsonl", shutil.copy(d / "g.jsonl", d / "o.jsonl.lock") and
                                              "o.jsonl.lock", "o.jsonl", [], "its lock file"),
    "rejects is the corpus": lambda d: ("c.jsonl", "g.jsonl", "o.jsonl",
                                        ["--on-bad-record", "skip", "--rejects", "c.jsonl", "--overwrite"],
                                        "the corpus"),
    "rejects is the echo gold": lambda d: ("c.jsonl", "g.jsonl", "o.jsonl",
                                           ["--on-bad-record", "skip", "--rejects", "./g.jsonl"], "--model file"),
    "rejects is the output": lambda d: ("c.jsonl", "g.jsonl", "o.jsonl",
                                        ["--on-bad-record", "skip", "--rejects", "o.jsonl"], "--out file"),
    "out is a file of the hf model folder": lambda d: ("c.jsonl", str(_model_folder(d)), "model/config.json",
                                                       ["--backend", "hf", "--overwrite"], "--model folder"),
}


@pytest.mark.parametrize("case", list(CLASHES))
def test_output_that_is_an_input_is_refused(job, case):
    corpus, model, out, extra, named = CLASHES[case](job)
    before = snapshot(job)
    model_before = snapshot(job / "model") if (job / "model").is_dir() else None
    one_error(run(corpus, model, out, *extra, cwd=job), 2, named, "would overwrite it")
    assert snapshot(job) == before  # inputs byte-identical, nothing new beside them
    if model_before is not None:
        assert snapshot(job / "model") == model_before


# -- --rejects is opened like --out ----------------------------------------------------------------------------
def _bad_corpus(d: Path) -> Path:
    rows = read_jsonl(d / "c.jsonl")
    rows[3] = {"id": rows[3]["id"], "body": "no text field"}
    return write_jsonl(d / "bad.jsonl", rows)


def test_existing_rejects_file_needs_overwrite(job):
    corpus = _bad_corpus(job)
    (job / "keep.txt").write_text("precious\n", encoding="utf-8")
    before = snapshot(job)
    one_error(run(corpus, job / "g.jsonl", job / "o.jsonl", "--on-bad-record", "skip", "--rejects", job / "keep.txt"),
              2, "keep.txt already exists", "--overwrite")
    assert snapshot(job) == before  # no output, no manifest left either
    done = run(corpus, job / "g.jsonl", job / "o.jsonl", "--on-bad-record", "skip", "--rejects", job / "keep.txt",
               "--overwrite")
    assert done.returncode == 0, done.stderr
    assert len(ids(job / "o.jsonl")) == N - 1 and [r["line"] for r in read_jsonl(job / "keep.txt")] == [4]


def test_resume_rebuilds_only_its_own_rejects(job):
    corpus = _bad_corpus(job)
    first = run(corpus, job / "g.jsonl", job / "o.jsonl", "--on-bad-record", "skip", "--limit", "5")
    assert first.returncode == 0, first.stderr
    other = job / "other.jsonl"
    other.write_text("not ours\n", encoding="utf-8")
    one_error(run(corpus, job / "g.jsonl", job / "o.jsonl", "--on-bad-record", "skip", "--rejects", other, "--resume"),
              2, "other.jsonl already exists")
    assert other.read_text(encoding="utf-8") == "not ours\n" and len(ids(job / "o.jsonl")) == 5
    resumed = run(corpus, job / "g.jsonl", job / "o.jsonl", "--on-bad-record", "skip", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert len(ids(job / "o.jsonl")) == N - 1 and len(read_jsonl(job / "o.jsonl.rejects.jsonl")) == 1
    assert not list(job.glob(".*partial"))


# -- two runs on one output -------------------------------------------------------------------------------------
def _slow_run(job, out, *extra):
    """A run taking ~2 s (0.1 s per record), started in the background."""
    args = [*EXTRACTOR, "run", str(job / "c.jsonl"), "--task", "jd_requirements", "--backend", "echo", "--model",
            str(job / "g.jsonl"), "--out", str(out), "--quiet", "--window", "1", "--batch-size", "1", *extra]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env(EXTRACTOR_ECHO_LATENCY_S="0.1"))


def _wait_rows(path: Path, n: int = 1) -> None:
    deadline = time.time() + 30
    while time.time() < deadline:
        if path.exists() and path.read_bytes().count(b"\n") >= n:
            return
        time.sleep(0.02)
    raise AssertionError(f"{path} did not get {n} rows")


@pytest.mark.parametrize("second", [["--resume"], ["--overwrite"], [], ["--resume", "--window", "4"]])
def test_second_run_on_a_locked_output_is_refused(job, second):
    out = job / "o.jsonl"
    first = _slow_run(job, out)
    try:
        _wait_rows(out)
        line = one_error(run(job / "c.jsonl", job / "g.jsonl", out, *second), 2,
                         "is being written by another extractor run", f"(pid {first.pid})", "choose another --out")
        assert "o.jsonl" in line
    finally:
        first.wait(60)
    assert first.returncode == 0, first.stderr
    assert ids(out) == ids(job / "c.jsonl") and not (job / "o.jsonl.lock").exists()


def test_shared_rejects_file_is_locked_too(job):
    corpus = _bad_corpus(job)
    shutil.copy(corpus, job / "c.jsonl")  # the slow run reads c.jsonl
    first = _slow_run(job, job / "a.jsonl", "--on-bad-record", "skip", "--rejects", job / "r.jsonl")
    try:
        _wait_rows(job / "a.jsonl")
        one_error(run(corpus, job / "g.jsonl", job / "b.jsonl", "--on-bad-record", "skip", "--rejects", job / "r.jsonl",
                      "--overwrite"), 2, "r.jsonl is being written by another extractor run", "--rejects")
    finally:
        first.wait(60)
    assert first.returncode == 0 and not (job / "b.jsonl").exists()


def test_sigkill_leaves_no_stale_lock(job):
    out = job / "o.jsonl"
    first = _slow_run(job, out)
    _wait_rows(out, 3)
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    assert (job / "o.jsonl.lock").exists()  # the file stays; the kernel dropped the lock with the process
    resumed = run(job / "c.jsonl", job / "g.jsonl", out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert ids(out) == ids(job / "c.jsonl") and not (job / "o.jsonl.lock").exists()


# -- a run that writes nothing leaves nothing ------------------------------------------------------------------
def _txt_corpus(d):
    return shutil.copy(d / "c.jsonl", d / "c.txt"), [], "unknown corpus format"


def _long_first(d):
    rows = read_jsonl(d / "c.jsonl")
    rows[0]["text"] = "很长" * 3000
    return write_jsonl(d / "long.jsonl", rows), ["--max-input-tokens", "1000"], "--on-long"


def _bad_first(d):
    rows = read_jsonl(d / "c.jsonl")
    rows[0] = {"id": rows[0]["id"]}
    return write_jsonl(d / "bad0.jsonl", rows), [], "missing field 'text'"


def _missing_model(d):
    return d / "c.jsonl", [], "is not a file"  # the model: MODEL_OF below


FAILS_FIRST = {"unknown corpus extension": _txt_corpus, "prompt too long, --on-long fail": _long_first,
               "bad first record": _bad_first, "echo model file missing": _missing_model}
FIXES = {"unknown corpus extension": lambda c: (c.with_name("c.jsonl"), []),
         "prompt too long, --on-long fail": lambda c: (c, ["--max-input-tokens", "1000", "--on-long", "skip"]),
         "bad first record": lambda c: (c, ["--on-bad-record", "skip"]),
         "echo model file missing": lambda c: (c, [])}
MODEL_OF = {"echo model file missing": "nope.jsonl"}  # the echo backend's --model (a gold file) where not g.jsonl


@pytest.mark.parametrize("case", list(FAILS_FIRST))
def test_failed_run_leaves_nothing_and_rerun_works(job, case):
    corpus, extra, named = FAILS_FIRST[case](job)
    outdir = job / "out"
    outdir.mkdir()
    one_error(run(corpus, job / MODEL_OF.get(case, "g.jsonl"), outdir / "o.jsonl", *extra), 2, named)
    assert list(outdir.iterdir()) == []
    fixed, extra = FIXES[case](Path(corpus))
    rerun = run(fixed, job / "g.jsonl", outdir / "o.jsonl", *extra)  # no --overwrite needed
    assert rerun.returncode == 0, rerun.stderr
    assert len(ids(outdir / "o.jsonl")) == (N - 1 if case == "bad first record" else N)


def test_failure_after_rows_keeps_them(job):
    rows = read_jsonl(job / "c.jsonl")
    rows[9] = {"id": rows[9]["id"]}
    corpus = write_jsonl(job / "bad9.jsonl", rows)
    one_error(run(corpus, job / "g.jsonl", job / "o.jsonl", "--window", "4"), 2, "bad9.jsonl:10")
    got = ids(job / "o.jsonl")  # whole windows before the bad record's (the last one may be in flight)
    assert len(got) in (4, 8) and got == [r["id"] for r in rows[:len(got)]]
    assert (job / "o.jsonl.manifest.json").exists()


def test_existing_output_survives_a_failed_resume(job):
    assert run(job / "c.jsonl", job / "g.jsonl", job / "o.jsonl", "--limit", "5").returncode == 0
    before = snapshot(job)
    one_error(run(job / "c.jsonl", job / "nope.jsonl", job / "o.jsonl", "--resume"), 2, "is not a file")
    assert snapshot(job) == before


# -- the run key knows the corpus --------------------------------------------------------------------------------
def _same_size_other_texts(d):
    rows = read_jsonl(d / "c.jsonl")
    for r in rows:
        r["text"] = r["text"][::-1]  # same ids, same size, other texts
    write_jsonl(d / "c.jsonl", rows)
    return d / "c.jsonl", "corpus.hash"


def _more_records(d):
    rows = read_jsonl(d / "c.jsonl")
    write_jsonl(d / "c.jsonl", rows + [{"id": "extra", "text": "本科"}])
    return d / "c.jsonl", "corpus.hash, corpus.size"


def _copy_elsewhere(d):
    (d / "sub").mkdir()
    return shutil.copy(d / "c.jsonl", d / "sub" / "c.jsonl"), "corpus.path"


@pytest.mark.parametrize("change", [_same_size_other_texts, _more_records, _copy_elsewhere])
def test_resume_on_another_corpus_is_refused(job, change):
    assert run(job / "c.jsonl", job / "g.jsonl", job / "o.jsonl", "--limit", "5").returncode == 0
    corpus, named = change(job)
    out_before = (job / "o.jsonl").read_bytes()
    one_error(run(corpus, job / "g.jsonl", job / "o.jsonl", "--resume"), 2, "--resume refused", named)
    assert (job / "o.jsonl").read_bytes() == out_before


def test_resume_through_a_symlink_to_the_same_corpus(job):
    assert run(job / "c.jsonl", job / "g.jsonl", job / "o.jsonl", "--limit", "5").returncode == 0
    os.symlink(job / "c.jsonl", job / "link.jsonl")
    resumed = run(job / "link.jsonl", job / "g.jsonl", job / "o.jsonl", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert ids(job / "o.jsonl") == ids(job / "c.jsonl")


# -- resuming a damaged output ----------------------------------------------------------------------------------
def test_resume_drops_duplicate_rows(job):
    out = job / "o.jsonl"
    assert run(job / "c.jsonl", job / "g.jsonl", out, "--limit", "6").returncode == 0
    rows = read_jsonl(out)
    twice = dict(rows[2], raw="a later copy")
    write_jsonl(out, rows + [twice, rows[0]])
    resumed = run(job / "c.jsonl", job / "g.jsonl", out, "--resume", quiet=False)
    assert resumed.returncode == 0 and "Traceback" not in resumed.stderr, resumed.stderr
    said = [line for line in resumed.stderr.splitlines() if "duplicate row" in line]
    assert len(said) == 1 and "dropped 2 duplicate row(s)" in said[0]
    got = read_jsonl(out)
    assert [r["id"] for r in got] == ids(job / "c.jsonl") and got[2]["raw"] == rows[2]["raw"]


def _row_edit(edit):
    def damage(out: Path):
        rows = read_jsonl(out)
        edit(rows[1])
        write_jsonl(out, rows)
    return damage


def _manifest_edit(edit):
    def damage(out: Path):
        mpath = out.with_name(out.name + ".manifest.json")
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
        mpath.write_text(edit(manifest), encoding="utf-8")
    return damage


DAMAGE = {  # case -> (damage to o.jsonl or its manifest, what the error line names)
    "row without status": (_row_edit(lambda r: r.pop("status")), "o.jsonl:2: row has no 'status'"),
    "row without id": (_row_edit(lambda r: r.pop("id")), "o.jsonl:2: row has no 'id'"),
    "row with a list id": (_row_edit(lambda r: r.update(id=[1])), "o.jsonl:2: row has a bad (list) 'id'"),
    "row with a dict status": (_row_edit(lambda r: r.update(status={})), "row has a bad (dict) 'status'"),
    "run_key is a list": (_manifest_edit(lambda m: json.dumps({**m, "run_key": [1, 2]})), "'run_key' is list"),
    "run_key is a string": (_manifest_edit(lambda m: json.dumps({**m, "run_key": "k"})), "'run_key' is str"),
    "run_key missing": (_manifest_edit(lambda m: json.dumps({k: v for k, v in m.items() if k != "run_key"})),
                        "'run_key' is NoneType"),
    "manifest is a list": (_manifest_edit(lambda m: json.dumps([m])), "not an extractor run manifest"),
    "manifest nested 100000 deep": (_manifest_edit(lambda m: "[" * 100_000), "manifest is corrupt"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_output_or_manifest_is_one_line(job, case):
    out = job / "o.jsonl"
    assert run(job / "c.jsonl", job / "g.jsonl", out, "--limit", "5").returncode == 0
    damage, named = DAMAGE[case]
    damage(out)
    before = snapshot(job)
    one_error(run(job / "c.jsonl", job / "g.jsonl", out, "--resume"), 2, named)
    assert snapshot(job) == before


# -- disk full -------------------------------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (mount needs root)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _fill(mnt: Path, leave: int) -> Path:
    """A filler file leaving about `leave` bytes free."""
    st = os.statvfs(mnt)
    filler = mnt / "filler"
    filler.write_bytes(b"\0" * max(0, st.f_bavail * st.f_frsize - leave))
    return filler


def test_disk_full_during_parquet_conversion_loses_nothing(job, small_disk):
    from extractor.datasets.synth import write_corpus
    corpus, gold = job / "big.jsonl", job / "bigg.jsonl"
    write_corpus(corpus, gold, 1500, seed=3, lang="zh")
    assert run(corpus, gold, job / "ref.jsonl").returncode == 0
    journal_size = (job / "ref.jsonl").stat().st_size  # the rows the Parquet journal will hold
    filler = _fill(small_disk, journal_size + 48 * 1024)  # room for the journal, not for the Parquet file beside
    out = small_disk / "o.parquet"
    line = one_error(run(corpus, gold, out), 2, "cannot write", "o.parquet", "No space left on device", "--resume")
    assert "o.parquet.partial.jsonl" in line and not out.exists()
    assert ids(small_disk / "o.parquet.partial.jsonl") == ids(job / "ref.jsonl")
    filler.unlink()
    resumed = run(corpus, gold, out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    import pyarrow.parquet as pq
    assert pq.read_table(out).column("id").to_pylist() == ids(job / "ref.jsonl")
    assert not (small_disk / "o.parquet.partial.jsonl").exists() and not list(small_disk.glob("*.tmp"))


def test_disk_full_while_writing_rejects_loses_nothing(job, small_disk):
    rows = read_jsonl(job / "c.jsonl")
    for i in range(1, N, 2):
        rows[i] = {"id": rows[i]["id"], "body": "x" * 4000}  # every second record is bad, with a large raw text
    corpus = write_jsonl(job / "bad.jsonl", rows)
    rejects, out = small_disk / "r.jsonl", job / "o.jsonl"
    first = run(corpus, job / "g.jsonl", out, "--on-bad-record", "skip", "--rejects", rejects, "--limit", "2")
    assert first.returncode == 0, first.stderr
    kept = rejects.read_bytes()
    filler = _fill(small_disk, 0)
    one_error(run(corpus, job / "g.jsonl", out, "--on-bad-record", "skip", "--rejects", rejects, "--resume"), 2,
              "cannot write", "r.jsonl", "No space left on device", "--resume")
    assert rejects.read_bytes() == kept and len(ids(out)) == 2
    assert [p.name for p in small_disk.iterdir()] == ["r.jsonl", "filler"] or \
        sorted(p.name for p in small_disk.iterdir()) == ["filler", "r.jsonl"]
    filler.unlink()
    resumed = run(corpus, job / "g.jsonl", out, "--on-bad-record", "skip", "--rejects", rejects, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert ids(out) == [r["id"] for r in rows[::2]] and len(read_jsonl(rejects)) == N // 2


# -- a run with no usable result ----------------------------------------------------------------------------------
def _raw_outputs(d: Path, texts: dict) -> Path:
    return write_jsonl(d / "raw.jsonl", [{"id": k, "raw": v, "finish_reason": "length" if v.startswith("{\"")
                                          and not v.endswith("}") else "stop"} for k, v in texts.items()])


def _ids(d):
    return [r["id"] for r in read_jsonl(d / "c.jsonl")]


NO_RESULT = {  # case -> (the echo model's outputs per id, extra args, exit code, what the line names)
    "every record a schema violation": (lambda d: {i: "{}" for i in _ids(d)}, [], 1, f"schema_violation {N} of {N}"),
    "every record invalid JSON": (lambda d: {i: "I cannot help" for i in _ids(d)}, [], 1, f"invalid_json {N} of {N}"),
    "truncated and invalid mixed": (lambda d: {i: ('{"学历要求": ["本' if n % 2 else "no") for n, i in
                                               enumerate(_ids(d))}, [], 1, "invalid_json 10, truncated 10 of 20"),
    "one ok among failures": (lambda d: {i: ("{}" if n else json.dumps(read_jsonl(d / "g.jsonl")[0]["gold"]))
                                         for n, i in enumerate(_ids(d))}, [], 0, None),
    "accepted with --allow-no-result": (lambda d: {i: "{}" for i in _ids(d)}, ["--allow-no-result"], 0, None),
}


@pytest.mark.parametrize("case", list(NO_RESULT))
def test_run_with_no_usable_result_exits_1(job, case):
    texts, extra, code, named = NO_RESULT[case]
    model = _raw_outputs(job, texts(job))
    result = run(job / "c.jsonl", model, job / "o.jsonl", *extra)
    if code:
        one_error(result, code, named, "the output is complete")
    else:
        assert result.returncode == 0 and not result.stderr.strip(), result.stderr
    assert ids(job / "o.jsonl") == _ids(job)  # written whole either way
    manifest = json.loads((job / "o.jsonl.manifest.json").read_text(encoding="utf-8"))
    assert manifest["summary"]["complete"] and manifest["summary"]["records"] == N


def test_resume_of_a_run_with_no_result_still_says_so(job):
    model = _raw_outputs(job, {i: "{}" for i in _ids(job)})
    assert run(job / "c.jsonl", model, job / "o.jsonl", "--limit", "5").returncode == 1
    one_error(run(job / "c.jsonl", model, job / "o.jsonl", "--resume"), 1, f"schema_violation {N} of {N}")
    assert ids(job / "o.jsonl") == _ids(job)


# -- FIFO corpora ---------------------------------------------------------------------------------------------
def _feed(fifo: Path, data: bytes) -> threading.Thread:
    def write():
        with open(fifo, "wb") as fh:  # blocks until the run opens the FIFO to read
            fh.write(data)
    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    return thread


def test_fifo_jsonl_corpus_is_read_as_a_stream(job):
    fifo = job / "pipe.jsonl"
    os.mkfifo(fifo)
    feeder = _feed(fifo, (job / "c.jsonl").read_bytes())
    result = run(fifo, job / "g.jsonl", job / "o.jsonl", quiet=False)  # the progress bar must not read it first
    feeder.join(5)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert ids(job / "o.jsonl") == _ids(job)
    key = json.loads((job / "o.jsonl.manifest.json").read_text(encoding="utf-8"))["run_key"]["corpus"]
    assert key == {"path": os.path.realpath(fifo), "stream": True}


FIFO_REFUSED = {  # case -> (FIFO name, extra args, what the line names)
    "parquet FIFO": ("pipe.parquet", [], "is a FIFO, not a regular file"),
    "csv FIFO": ("pipe.csv", [], "is a FIFO, not a regular file"),
    "FIFO with --gpus": ("pipe.jsonl", ["--gpus", "2", "--device", "cpu"], "--gpus workers each read"),
    "FIFO with --resume": ("pipe.jsonl", ["--resume"], "a FIFO cannot be read twice"),
}


@pytest.mark.parametrize("case", list(FIFO_REFUSED))
def test_fifo_corpus_refused_where_it_cannot_work(job, case):
    name, extra, named = FIFO_REFUSED[case]
    fifo = job / name
    os.mkfifo(fifo)
    if "--resume" in extra:  # an output made from this FIFO before
        feeder = _feed(fifo, (job / "c.jsonl").read_bytes())
        assert run(fifo, job / "g.jsonl", job / "o.jsonl", "--limit", "5").returncode == 0
        feeder.join(5)
    before = snapshot(job)
    one_error(run(fifo, job / "g.jsonl", job / "o.jsonl", *extra), 2, named)
    assert snapshot(job) == before


def test_missing_corpus_is_no_such_file(job):
    one_error(run(job / "nope.jsonl", job / "g.jsonl", job / "o.jsonl"), 2, "nope.jsonl: no such file")
    assert not (job / "o.jsonl").exists()
