"""Attack suite: hostile model outputs, failing worker threads and Ctrl-C, each through a real `extractor run`
subprocess (echo backend). Every case must end in its documented outcome within its time limit: rows written,
raw text kept, one line on failure, never a traceback or a hang."""
import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time

import pytest

from extractor.jsonutil import loads
from extractor.results.judge import INVALID_JSON, OK, SCHEMA_VIOLATION, Validator, judge, parse_json, repair
from extractor.pipeline.sink import RowSink, WorkerError, prefetch
from extractor.pipeline.summary import Summary
from extractor.tasks.task import load_task
from extractor.store.writers import JsonlAppender, iter_rows
from tests.conftest import synth_corpus, write_jsonl

EXTRACTOR = [sys.executable, "-m", "extractor"]
GOOD = {"学历要求": ["本科"], "专业要求": ["计算机"], "工作年限要求": ["3年以上"], "编程语言": ["java"], "加分项": ["该JD未要求"]}
GOOD_TEXT = json.dumps(GOOD, ensure_ascii=False)
BIG = "123456789012345678901234567890"
V = Validator(load_task("jd_requirements").schema)


def _run(corpus, model, out, *extra, timeout=60, **popen):
    cmd = [*EXTRACTOR, "run", str(corpus), "--task", "jd_requirements", "--backend", "echo", "--model", str(model),
           "--out", str(out), "--quiet", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **popen)


def _one_line_error(result, *needles):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("error: ") and all(n in result.stderr for n in needles), result.stderr


def read_jsonl(path) -> list[dict]:
    """Rows as the project reads them (str.splitlines would also split at U+2028 inside a value)."""
    return [row for _, row in iter_rows(path)]


def _exact(out, n):
    ids = [row["id"] for row in read_jsonl(out)]
    assert len(ids) == n == len(set(ids))


# -- hostile model outputs: a status and the raw text, the run goes on ----------------------------------------
# (case, model output, finish reason, status, words of the error). Each is the "bad" record of a two-record
# corpus whose other record is good.
OUTPUTS = [
    ("int beyond 64 bits", '{"学历要求": [%s]}' % BIG, "stop", INVALID_JSON, "does not fit in 64 bits"),
    ("int below -2^63", '{"学历要求": [-9223372036854775809]}', "stop", INVALID_JSON, "does not fit in 64 bits"),
    ("int beyond 64 bits as a key's value, fenced in prose",
     '结果：\n```json\n{"学历要求": ["本科"], "n": %s}\n```' % BIG, "stop", INVALID_JSON, "$.n: integer"),
    ("int beyond 64 bits, cut at max tokens", '{"学历要求": [%s' % BIG, "length", INVALID_JSON, "64 bits"),
    ("int of 5000 digits", '{"学历要求": [1%s]}' % ("0" * 5000), "stop", INVALID_JSON, "no JSON value"),
    ("lone high surrogate escape", '{"学历要求": ["\\ud800"]}', "stop", INVALID_JSON, "unpaired surrogate"),
    ("lone low surrogate escape in a key", '{"\\udc00x": ["本科"]}', "stop", INVALID_JSON, "key"),
    ("NaN", '{"学历要求": [NaN]}', "stop", INVALID_JSON, "NaN, Infinity"),
    ("-Infinity", '{"学历要求": [-Infinity]}', "stop", INVALID_JSON, "NaN, Infinity"),
    ("float overflow 1e400", '{"学历要求": [1e400]}', "stop", INVALID_JSON, "NaN, Infinity"),
    ("100k open brackets", "[" * 100_000, "stop", INVALID_JSON, "no JSON value"),
    ("1 MB of nested brackets", "[" * 500_000 + "]" * 500_000, "stop", INVALID_JSON, "no JSON value"),
    ("nesting 300 deep, closed", '{"学历要求": %s}' % ("[" * 300 + "]" * 300), "stop", INVALID_JSON,
     "nested deeper than 128"),
    ("uint64 max is kept exactly", GOOD_TEXT.replace('"本科"', "18446744073709551615"), "stop", SCHEMA_VIOLATION,
     "$.学历要求[0]"),
    ("control characters in strings", GOOD_TEXT.replace("本科", "本\x01科\x1f\u2028"), "stop", OK, None),
    ("a 1 MB string value", GOOD_TEXT.replace("本科", "本" * 1_000_000), "stop", OK, None),
]


def _echo_files(tmp_path, bad_output: str, finish: str):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": "bad", "text": "JD 1"}, {"id": "good", "text": "JD 2"}])
    model = write_jsonl(tmp_path / "model.jsonl", [{"id": "bad", "raw": bad_output, "finish_reason": finish},
                                                   {"id": "good", "raw": GOOD_TEXT}])
    return corpus, model


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case,output,finish,status,words", OUTPUTS, ids=[c[0] for c in OUTPUTS])
def test_hostile_output_is_a_status(tmp_path, case, output, finish, status, words):
    corpus, model = _echo_files(tmp_path, output, finish)
    out = tmp_path / "o.jsonl"
    start = time.perf_counter()
    result = _run(corpus, model, out, timeout=50)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert time.perf_counter() - start < 30
    bad, good = read_jsonl(out)
    assert (bad["id"], good["id"], good["status"]) == ("bad", "good", OK)
    assert bad["status"] == status and bad["raw"] == output, bad["error"]
    if words:
        assert words in bad["error"]
    if status == INVALID_JSON:
        assert bad["prediction"] is None
    if case.startswith("uint64"):
        assert loads(out.read_bytes().splitlines()[0])["prediction"]["学历要求"] == [18446744073709551615]


def test_huge_int_in_a_gold_prediction(tmp_path):
    """The echo backend's gold file itself holds the number (read as a float, written back as one)."""
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": "a", "text": "JD"}, {"id": "good", "text": "JD 2"}])
    gold = tmp_path / "gold.jsonl"
    gold.write_text('{"id": "a", "prediction": {"学历要求": [%s]}}\n{"id": "good", "raw": %s}\n'
                    % (BIG, json.dumps(GOOD_TEXT)), encoding="utf-8")
    result = _run(corpus, gold, tmp_path / "o.jsonl", timeout=50)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    row, good = read_jsonl(tmp_path / "o.jsonl")
    assert row["status"] == SCHEMA_VIOLATION and row["raw"] and good["status"] == OK


@pytest.mark.timeout(120)
@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_every_hostile_output_in_one_run_then_eval(tmp_path, suffix):
    """All the outputs above in one corpus, to JSONL and to Parquet: every row written with its raw text, and
    `extractor eval` (and --reparse) counts every status."""
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": str(i), "text": f"JD {i}"} for i in range(len(OUTPUTS))])
    model = write_jsonl(tmp_path / "m.jsonl", [{"id": str(i), "raw": c[1], "finish_reason": c[2]}
                                               for i, c in enumerate(OUTPUTS)])
    gold = write_jsonl(tmp_path / "g.jsonl", [{"id": str(i), "gold": GOOD} for i in range(len(OUTPUTS))])
    out = tmp_path / f"o{suffix}"
    result = _run(corpus, model, out, "--window", "4", timeout=100)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    rows = {row["id"]: row for _, row in iter_rows(out)}
    assert [rows[str(i)]["status"] for i in range(len(OUTPUTS))] == [c[3] for c in OUTPUTS]
    assert [rows[str(i)]["raw"] for i in range(len(OUTPUTS))] == [c[1] for c in OUTPUTS]
    expected = {}
    for c in OUTPUTS:
        expected[c[3]] = expected.get(c[3], 0) + 1
    for extra in ((), ("--reparse",)):
        metrics = tmp_path / f"m{len(extra)}.json"
        scored = subprocess.run([*EXTRACTOR, "eval", str(out), "--gold", str(gold), "--task", "jd_requirements",
                                 "--metrics", str(metrics), "--quiet", *extra], capture_output=True, text=True,
                                timeout=60)
        assert scored.returncode == 0 and "Traceback" not in scored.stderr, scored.stderr
        counts = json.loads(metrics.read_text(encoding="utf-8"))["status_counts"]
        assert {k: v for k, v in counts.items() if v} == expected


# -- a failing writer thread: one line, exit 2, resumable ---------------------------------------------------
def _file_size_limit(nbytes):
    def limit():  # writes beyond it fail with EFBIG (File too large) instead of killing the process
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))
    return limit


@pytest.mark.timeout(90)
@pytest.mark.parametrize("window", ["8", "512"], ids=["mid-run", "last-flush"])
def test_writer_failure_reaches_the_main_thread(tmp_path, window):
    """The writer thread fails mid-run, or on the last flush (which used to leave the main thread waiting
    forever): one line, exit 2; --resume then completes exactly."""
    corpus, gold = synth_corpus(tmp_path, n=300)
    out = tmp_path / "o.jsonl"
    failed = _run(corpus, gold, out, "--window", window, timeout=60, preexec_fn=_file_size_limit(20_000))
    _one_line_error(failed, "o.jsonl", "File too large", "--resume")
    resumed = _run(corpus, gold, out, "--window", window, "--resume", timeout=60)
    assert resumed.returncode == 0, resumed.stderr
    _exact(out, 300)


@pytest.mark.timeout(20)
def test_sink_error_on_last_rows_is_raised_not_waited_for(tmp_path):
    """A row the writer cannot serialise, in the last (partial) window: close() raises it at once."""
    with JsonlAppender(tmp_path / "o.jsonl") as writer:
        sink = RowSink(writer, None, window=64, summary=Summary())
        sink.put_rows([{"id": "a", "n": 1 << 70}])
        with pytest.raises(WorkerError, match="writer thread failed.*64-bit"):
            sink.close()


@pytest.mark.timeout(20)
def test_sink_error_wakes_a_blocked_producer_and_reader(tmp_path):
    """The writer fails while the producer waits for room in a full queue, and while the reader thread
    reports skipped records: both get its error, neither waits forever."""
    def slow_then_fail(triples):
        time.sleep(0.05)
        if triples == 3:
            raise ValueError("boom")
        return []
    with JsonlAppender(tmp_path / "o.jsonl") as writer:
        sink = RowSink(writer, slow_then_fail, window=1, summary=Summary())
        with pytest.raises(WorkerError, match="ValueError: boom"):
            for i in range(1000):
                sink.put(i)
        assert i < 200
        from_reader = []
        thread = threading.Thread(target=lambda: from_reader.append(pytest.raises(WorkerError, sink.skipped, 5)))
        thread.start()
        thread.join(5)
        assert not thread.is_alive() and from_reader
        with pytest.raises(WorkerError):
            sink.close()


@pytest.mark.timeout(20)
def test_prefetch_reader_failure_and_stuck_reader():
    def failing():
        yield 1
        raise RuntimeError("disk on fire")
    with pytest.raises(WorkerError, match="reader thread failed.*RuntimeError: disk on fire"):
        with prefetch(failing()) as items:
            list(items)
    never = threading.Event()

    def stuck():  # a read that never returns (a FIFO nobody writes to)
        yield 1
        never.wait()
        yield 2
    start = time.perf_counter()
    with pytest.raises(KeyError):
        with prefetch(stuck(), grace_s=0.5) as items:
            next(items)
            raise KeyError("the consumer fails")
    assert time.perf_counter() - start < 3
    never.set()


# -- Ctrl-C --------------------------------------------------------------------------------------------------
def _interrupt(tmp_path, signals: int, quiet: bool = True):
    corpus, gold = synth_corpus(tmp_path, n=400)
    out = tmp_path / "o.jsonl"
    env = dict(os.environ, EXTRACTOR_ECHO_LATENCY_S="0.2")  # a long run: 400 records, 8 per 0.2 s
    cmd = [*EXTRACTOR, "run", str(corpus), "--task", "jd_requirements", "--backend", "echo", "--model", str(gold),
           "--out", str(out), "--window", "8", *(["--quiet"] if quiet else [])]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while (not out.exists() or out.stat().st_size == 0) and time.monotonic() < deadline:
        time.sleep(0.05)
    start = time.perf_counter()
    for _ in range(signals):
        proc.send_signal(signal.SIGINT)
        time.sleep(0.05)
    try:
        _, stderr = proc.communicate(timeout=30)
    finally:
        proc.kill()
    stopped_in = time.perf_counter() - start
    return proc.returncode, stderr, stopped_in, corpus, gold, out


@pytest.mark.timeout(120)
@pytest.mark.parametrize("signals", [1, 2], ids=["once", "twice"])
def test_ctrl_c_stops_a_long_run_and_resumes(tmp_path, signals):
    rc, stderr, stopped_in, corpus, gold, out = _interrupt(tmp_path, signals)
    assert rc == 130 and "Traceback" not in stderr, stderr
    assert stopped_in < 10  # at most the windows in flight (3 x 0.2 s here)
    lines = stderr.splitlines()
    assert lines[0].startswith("Ctrl-C: stopping") and "--resume" in lines[0]
    assert len(lines) == signals  # the notice; a second Ctrl-C adds "interrupted"
    written = len(read_jsonl(out))
    assert 0 < written < 400
    resumed = _run(corpus, gold, out, "--resume", timeout=60)
    assert resumed.returncode == 0, resumed.stderr
    _exact(out, 400)


GREEDY = '''
from extractor.backends.echo import EchoBackend


class GreedyEcho(EchoBackend):
    """echo, pulling every request before its first result, as hf's fast path fills its slots: what is "in
    flight" is then the whole corpus."""

    def generate_stream(self, requests, params, schema=None, probes=()):
        pulled = list(requests)
        for request in pulled:  # one generate call each: EXTRACTOR_ECHO_LATENCY_S apart
            yield [(request, self.generate([request], params, schema)[0])]
'''


@pytest.fixture
def greedy_backend(tmp_path):
    """The backend above as an installed plugin (a module and its dist-info entry point) on PYTHONPATH."""
    site = tmp_path / "site"
    info = site / "extractor_greedy_echo-0.1.dist-info"
    info.mkdir(parents=True)
    (site / "extractor_greedy_echo.py").write_text(GREEDY, encoding="utf-8")
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: extractor-greedy-echo\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[extractor.backends]\necho_greedy = extractor_greedy_echo:GreedyEcho\n")
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))


@pytest.mark.timeout(120)
def test_ctrl_c_stops_a_backend_that_pulled_everything(tmp_path, greedy_backend):
    """The first Ctrl-C stops after the backend's current step, not after all it has pulled (400 x 0.05 s)."""
    slow = dict(greedy_backend, EXTRACTOR_ECHO_LATENCY_S="0.05")
    corpus, gold = synth_corpus(tmp_path, n=400)
    out = tmp_path / "o.jsonl"
    cmd = [*EXTRACTOR, "run", str(corpus), "--task", "jd_requirements", "--backend", "echo_greedy", "--model",
           str(gold), "--out", str(out), "--window", "8", "--quiet"]
    proc = subprocess.Popen(cmd, env=slow, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while (not out.exists() or out.stat().st_size == 0) and time.monotonic() < deadline:
        time.sleep(0.02)
    start = time.perf_counter()
    proc.send_signal(signal.SIGINT)
    try:
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr
    assert time.perf_counter() - start < 5 and len(read_jsonl(out)) < 200
    resumed = subprocess.run(cmd + ["--resume"], env=greedy_backend, capture_output=True, text=True, timeout=60)
    assert resumed.returncode == 0, resumed.stderr
    _exact(out, 400)


@pytest.mark.timeout(60)
def test_ctrl_c_with_progress_bar_says_how_to_resume(tmp_path):
    rc, stderr, _, *_ = _interrupt(tmp_path, 1, quiet=False)
    assert rc == 130 and "Traceback" not in stderr and "--resume" in stderr


# -- pathological outputs in the parser: bounded, linear ----------------------------------------------------
MB = 1_000_000
PATHOLOGICAL = {
    "open brackets": "[" * MB, "open braces": "{" * MB, "closed brackets": "[" * (MB // 2) + "]" * (MB // 2),
    "open keys": '{"a":' * (MB // 5), "fences": "```json\n[" * (MB // 9), "quotes": '"' * MB,
    "backslashes in a string": '{"a":"' + "\\" * MB, "single quotes": "{'" * (MB // 2), "mixed": "[{" * (MB // 2),
    "dangling keys": '{"a":1,' * (MB // 7) + '"b', "unclosed list": "[1," * (MB // 3),
    "broken fences": '```json\n{"a": [}\n```\n' * (MB // 20), "whitespace": "[" + " " * MB,
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", list(PATHOLOGICAL))
def test_pathological_output_is_bounded(name):
    text = PATHOLOGICAL[name]
    start = time.perf_counter()
    parsed = judge(text, "stop", V)
    parse_json(text)
    repair(text)
    assert time.perf_counter() - start < 5  # each is well under a second; linear in the text
    assert parsed.status in (INVALID_JSON, SCHEMA_VIOLATION, OK)
