"""`extractor run --adapter A --adapter B ...` in one pass: on a backend that mixes adapters, every
adapter's requests go through one generate_stream and each output is byte for byte what a run of that adapter
alone writes (rows, order, run key); --resume asks only for what each output lacks, a SIGKILL and a Ctrl-C
lose nothing; a backend that takes one adapter per stream still runs them one after another.

Requests are counted by a plugin backend: the real hf backend, declared through the entry-point seam as a
package would, that notes the adapter of every request each generate_stream call is handed."""
import json
import os
import random
import signal
import sys
import time
from collections import Counter

import pytest

from tests.conftest import REPO, read_jsonl, synth_corpus, write_jsonl
from tests.test_fast_adapters import loras  # noqa: F401 - the fixture: three LoRA adapters that differ

sys.path.insert(0, str(REPO / "bench"))
import reliability  # noqa: E402

N = 8
PLUGIN = '''
from collections import Counter

from extractor.backends.hf import HFBackend


class CountedHF(HFBackend):
    """hf, noting the adapters of the requests each generate_stream call is handed, the order they came in
    and which adapters it had mixed in one decoder when the stream ended."""
    streams, orders, mixed = [], [], []

    def generate_stream(self, requests, *args, **kwargs):
        seen, order = Counter(), []
        type(self).streams.append(seen)
        type(self).orders.append(order)

        def counted():
            for request in requests:
                seen[request.adapter] += 1
                order.append(request.adapter)
                yield request
        yield from super().generate_stream(counted(), *args, **kwargs)
        type(self).mixed.append(sorted(self.weights.mix.names) if self.weights.mix is not None else None)


class OneAdapterHF(CountedHF):
    """The same backend declaring that it takes one adapter per stream."""
    mixes_adapters = False
    streams = []
'''


@pytest.fixture(scope="module")
def counted(tmp_path_factory):
    """The plugin on sys.path (a distribution as pip installs one); its classes, to read their counts."""
    site = tmp_path_factory.mktemp("site")
    (site / "extractor_counted_hf.py").write_text(PLUGIN, encoding="utf-8")
    info = site / "extractor_counted_hf-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: extractor-counted-hf\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[extractor.backends]\nhf_counted = extractor_counted_hf:CountedHF\n"
                                           "hf_one_adapter = extractor_counted_hf:OneAdapterHF\n")
    sys.path.insert(0, str(site))
    import extractor_counted_hf
    yield extractor_counted_hf
    sys.path.remove(str(site))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return synth_corpus(tmp_path_factory.mktemp("corpus"), n=N)[0]


@pytest.fixture(scope="module")
def solo(tiny_model, loras, corpus, tmp_path_factory):  # noqa: F811
    """Each adapter's output from a run of that adapter alone (the plain hf backend), by adapter name."""
    from click.testing import CliRunner

    from extractor.cli.main import cli
    root = tmp_path_factory.mktemp("solo")
    for adapter in loras:
        result = CliRunner().invoke(cli, [str(a) for a in _args(corpus, tiny_model, root / f"{adapter.name}.jsonl",
                                                                "hf", [adapter])], catch_exceptions=False)
        assert result.exit_code == 0, result.output
    return root


def _args(corpus, model, out, backend, adapters, *extra, quiet=True):
    args = ["run", corpus, "--task", "jd_requirements", "--model", model, "--out", out, "--backend", backend,
            "--batch-size", "3", "--window", "3", "--max-new-tokens", "20", "--few-shot", "1", *extra]
    if quiet:
        args.append("--quiet")
    for a in adapters:
        args += ["--adapter", a]
    return args


def _manifest(path):
    return json.loads(path.with_name(path.name + ".manifest.json").read_text())


def _output(out, adapter):
    return out.with_name(f"{out.stem}.{adapter.name}.jsonl")


def _same_as_solo(out, adapters, solo, resumed=False):
    """Each adapter's output is byte for byte its own run's, under the same run key, the manifest of its shape
    (a resumed run's summary says only what this run decoded)."""
    for adapter in adapters:
        path, own = _output(out, adapter), solo / f"{adapter.name}.jsonl"
        assert path.read_bytes() == own.read_bytes(), adapter.name
        manifest, own_manifest = _manifest(path), _manifest(own)
        assert manifest["run_key"] == own_manifest["run_key"] and manifest.keys() == own_manifest.keys()
        assert resumed or manifest["summary"].keys() == own_manifest["summary"].keys()


@pytest.mark.parametrize("count", [2, 3])
def test_loras_in_one_stream_equal_their_own_runs(tmp_path, tiny_model, loras, corpus, solo, counted,  # noqa: F811
                                                  run_cli, count):
    adapters = loras[:count]
    for log in (counted.CountedHF.streams, counted.CountedHF.orders, counted.CountedHF.mixed):
        log.clear()
    out = tmp_path / "p.jsonl"
    result = run_cli(*_args(corpus, tiny_model, out, "hf_counted", adapters))
    assert result.exit_code == 0, result.output
    assert counted.CountedHF.streams == [Counter({a.name: N for a in adapters})], "one stream for every adapter"
    # A record's requests side by side (any stretch of the stream names every adapter), decoded mixed.
    assert counted.CountedHF.orders == [[a.name for _ in range(N) for a in adapters]]
    assert counted.CountedHF.mixed == [sorted(a.name for a in adapters)]
    _same_as_solo(out, adapters, solo)
    for adapter in adapters:
        summary = _manifest(_output(out, adapter))["summary"]
        assert summary["new_this_run"] == N and summary["complete"] and summary["decoder"] == {"fast": N}


def test_backend_that_takes_one_adapter_per_stream_runs_them_in_turn(tmp_path, tiny_model, loras, corpus,  # noqa: F811
                                                                     solo, counted, run_cli):
    counted.OneAdapterHF.streams.clear()
    out = tmp_path / "p.jsonl"
    result = run_cli(*_args(corpus, tiny_model, out, "hf_one_adapter", loras[:2]))
    assert result.exit_code == 0, result.output
    assert counted.OneAdapterHF.streams == [Counter({a.name: N}) for a in loras[:2]]
    _same_as_solo(out, loras[:2], solo)


def test_adapters_that_do_not_mix_run_in_turn(tmp_path, tiny_model, loras, corpus, counted, run_cli):  # noqa: F811
    """A LoRA and a P-tuning adapter cannot share a decoder: hf says so, and they run one after the other,
    each output its own run's."""
    from tests.test_fast_adapters import _prompt_adapter
    ptuning = _prompt_adapter(tiny_model, tmp_path / "pt", "ptuning-mlp", seed=0)
    counted.CountedHF.streams.clear()
    out = tmp_path / "p.jsonl"
    result = run_cli(*_args(corpus, tiny_model, out, "hf_counted", [loras[0], ptuning]))
    assert result.exit_code == 0, result.output
    assert counted.CountedHF.streams == [Counter({loras[0].name: N}), Counter({ptuning.name: N})]
    for adapter in (loras[0], ptuning):
        alone = tmp_path / f"{adapter.name}.alone.jsonl"
        assert run_cli(*_args(corpus, tiny_model, alone, "hf", [adapter])).exit_code == 0
        assert _output(out, adapter).read_bytes() == alone.read_bytes(), adapter.name


def test_resume_requests_only_what_each_output_lacks(tmp_path, tiny_model, loras, corpus, solo, counted,  # noqa: F811
                                                     run_cli):
    """One output complete, one with 3 records, one not begun: only the others' records are requested."""
    whole, part, fresh = loras
    out = tmp_path / "p.jsonl"
    assert run_cli(*_args(corpus, tiny_model, _output(out, whole), "hf", [whole])).exit_code == 0
    assert run_cli(*_args(corpus, tiny_model, _output(out, part), "hf", [part], "--limit", "3")).exit_code == 0
    counted.CountedHF.streams.clear()
    result = run_cli(*_args(corpus, tiny_model, out, "hf_counted", loras, "--resume"))
    assert result.exit_code == 0, result.output
    assert counted.CountedHF.streams == [Counter({part.name: N - 3, fresh.name: N})]
    summaries = {a.name: _manifest(_output(out, a))["summary"] for a in loras}
    assert [(s["new_this_run"], s["already_done"]) for s in summaries.values()] == [(0, N), (N - 3, 3), (N, 0)]
    assert "decoder" not in summaries[whole.name] and summaries[part.name]["decoder"] == {"fast": N - 3}
    _same_as_solo(out, loras, solo, resumed=True)
    counted.CountedHF.streams.clear()
    again = run_cli(*_args(corpus, tiny_model, out, "hf_counted", loras, "--resume"))
    assert again.exit_code == 0 and counted.CountedHF.streams == [Counter()], "nothing left to ask for"


def test_bad_records_go_to_every_outputs_rejects(tmp_path, tiny_model, loras, counted, run_cli):  # noqa: F811
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": "a", "text": "本科"}, {"id": "b"}, {"id": "c", "text": "java"}])
    out = tmp_path / "p.jsonl"
    result = run_cli(*_args(corpus, tiny_model, out, "hf_counted", loras[:2], "--on-bad-record", "skip"))
    assert result.exit_code == 0, result.output
    for adapter in loras[:2]:
        path = _output(out, adapter)
        assert [r["id"] for r in read_jsonl(path)] == ["a", "c"]
        assert [r["id"] for r in read_jsonl(path.with_name(path.name + ".rejects.jsonl"))] == ["b"]
        assert _manifest(path)["summary"]["rejected_input"] == 1


def _cli(corpus, model, out, adapters, *extra, quiet=True):
    """A real `extractor run` process of the plain hf backend."""
    return reliability.EXTRACTOR + [str(a) for a in _args(corpus, model, out, "hf", adapters, *extra, quiet=quiet)]


def _fed(paths):
    """A readiness test: one of the outputs has grown since the process started."""
    tests = [reliability.grows(p) for p in paths]
    return lambda: any(test() for test in tests)


def test_sigkill_then_resume_every_output_exactly_once(tmp_path, tiny_model, loras, warm):  # noqa: F811
    """Real processes (warm starts: forked after the imports, each its own process), SIGKILLed mid-output."""
    corpus, _ = synth_corpus(tmp_path, n=90, seed=4)
    ref, out = tmp_path / "ref.jsonl", tmp_path / "killed.jsonl"
    reliability._check_ran(reliability._run_to_end(_cli(corpus, tiny_model, ref, loras[:2]), server=warm))
    rng, landed = random.Random(0), 0
    for _ in range(5):
        if landed == 3:
            break
        outputs = [_output(out, a) for a in loras[:2]]
        landed += reliability._kill_at_random(_cli(corpus, tiny_model, out, loras[:2], "--resume"), _fed(outputs),
                                              rng, max_delay=0.5, server=warm)
    assert landed >= 2, "the kills did not land before the runs finished"
    reliability._check_ran(reliability._run_to_end(_cli(corpus, tiny_model, out, loras[:2], "--resume"),
                                                   server=warm))
    for adapter in loras[:2]:
        got, want = _output(out, adapter), _output(ref, adapter)
        ids = [r["id"] for r in read_jsonl(got)]
        assert len(ids) == len(set(ids)) == 90
        assert got.read_bytes() == want.read_bytes(), adapter.name


def test_ctrl_c_stops_every_output_and_resume_finishes_them(tmp_path, tiny_model, loras, warm):  # noqa: F811
    corpus, _ = synth_corpus(tmp_path, n=200, seed=5)
    out = tmp_path / "p.jsonl"
    outputs = [_output(out, a) for a in loras[:2]]
    fed = _fed(outputs)
    stderr = tmp_path / "stderr.txt"
    proc = warm.popen(_cli(corpus, tiny_model, out, loras[:2], quiet=False), stderr=stderr)  # forked, its own process
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None and not fed():
            time.sleep(0.01)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGINT)
        proc.wait(timeout=120)
    finally:
        proc.kill()
    err = stderr.read_text(encoding="utf-8")
    if proc.returncode == 0:
        pytest.skip("the run finished before Ctrl-C reached it")
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert "Ctrl-C: stopping" in err and err.count("rerun the same command with --resume") == 1
    for path in outputs:
        summary = _manifest(path)["summary"]
        assert summary["interrupted"] and summary["records"] < 200
    reliability._check_ran(reliability._run_to_end(_cli(corpus, tiny_model, out, loras[:2], "--resume"),
                                                   server=warm))
    for path in outputs:
        ids = [r["id"] for r in read_jsonl(path)]
        assert len(ids) == len(set(ids)) == 200 and _manifest(path)["summary"]["complete"]
