"""Hardening: kills, faults, bad input and hostile output. Figures in docs/reliability.md."""
import gzip
import json
import shutil
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import yaml
from hypothesis import HealthCheck, given, settings, strategies as st

from extractor.store.corpus import CorpusReader
from extractor.errors import ExtractorError, InputError, TaskError
from extractor.scoring.evaluate import evaluate
from extractor.tasks.task import load_task
from tests.conftest import REPO, read_jsonl, synth_corpus, write_jsonl

sys.path.insert(0, str(REPO / "bench"))
import reliability  # noqa: E402

EXTRACTOR = [sys.executable, "-m", "extractor"]
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


# -- kills -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def kills(tmp_path_factory, tiny_model, warm):
    """The kill suites' folder, holding the session's tiny model where they look for theirs (the same
    build_tiny_model defaults), the warm-start server for their commands (conftest's: each command its own
    process, forked after the imports) and the uninterrupted single-process run both run suites must reproduce,
    over RECORDS records (20 kills take about 400 of them on the 2-core machine)."""
    root = tmp_path_factory.mktemp("kills")
    shutil.copytree(tiny_model, root / "model")
    return root, warm, reliability.reference(root, warm, n=RECORDS)


RECORDS = 700


def test_run_survives_20_kills(kills):
    root, server, ref = kills
    result = reliability.run_kills(root, kills=20, n=RECORDS, ref=ref, server=server)
    assert result["records"] == RECORDS
    assert result["kills_landed"] >= 15
    assert result["lost"] == 0 and result["duplicated"] == 0 and result["identical_to_uninterrupted"]


def test_train_resume_after_kills_matches_uninterrupted(kills):
    root, server, _ = kills
    result = reliability.train_kill(root, server=server)
    assert result["kills_landed"] >= 1 and result["within_tolerance"], result


def test_shard_merge_survives_kills(kills):
    """Killed --gpus runs over the corpus's first 400 records; their merged output equals the single-process
    run's rows for them."""
    root, server, ref = kills
    result = reliability.run_kills(root, kills=4, extra=("--gpus", "2", "--device", "cpu"), label="shard", n=400,
                                   ref=ref, server=server)
    assert result["records"] == 400
    assert result["lost"] == 0 and result["duplicated"] == 0 and result["identical_to_uninterrupted"]


# -- faults ------------------------------------------------------------------------------------------
def _echo_run(corpus, gold, out, *extra, prefix=()):
    return subprocess.run([*prefix, *EXTRACTOR, "run", str(corpus), "--task", "jd_requirements", "--backend", "echo",
                           "--model", str(gold), "--out", str(out), "--quiet", "--window", "64", *extra],
                          capture_output=True, text=True, timeout=300)


def test_disk_full_then_resume(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        corpus, gold = synth_corpus(tmp_path, n=1500, seed=3)
        out = mnt / "preds.jsonl"
        full = _echo_run(corpus, gold, out)
        assert full.returncode == 2 and "No space left on device" in full.stderr and "--resume" in full.stderr
        assert "Traceback" not in full.stderr and full.stderr.count("\n") == 1
        subprocess.run(["mount", "-o", "remount,size=16m", str(mnt)], check=True)
        resumed = _echo_run(corpus, gold, out, "--resume")
        assert resumed.returncode == 0, resumed.stderr
        ids = [r["id"] for r in read_jsonl(out)]
        assert len(ids) == 1500 == len(set(ids))
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_permission_denied_fails_before_work(tmp_path):
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv not available")
    corpus, gold = synth_corpus(tmp_path, n=5)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    # Tests run as root, which ignores permissions: drop the capability that lets it.
    drop = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]
    result = _echo_run(corpus, gold, locked / "preds.jsonl", prefix=drop)
    assert result.returncode == 2 and "Permission denied" in result.stderr and "Traceback" not in result.stderr
    assert not any(locked.iterdir())


def test_mismatched_tokenizer_is_refused(tmp_path, tiny_model, run_cli):
    from extractor.datasets.tiny_models import build_tiny_model
    other = build_tiny_model(tmp_path / "big_vocab", vocab_size=1600)
    mixed = tmp_path / "mixed"
    shutil.copytree(tiny_model, mixed)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(other / name, mixed / name)
    corpus, _ = synth_corpus(tmp_path, n=2)
    result = run_cli("run", corpus, "--task", "jd_requirements", "--model", mixed, "--out", tmp_path / "o.jsonl")
    assert result.exit_code == 2 and "tokenizer does not belong to this model" in result.stderr


def test_foreign_manifest_refused(tmp_path, run_cli):
    corpus, gold = synth_corpus(tmp_path, n=3)
    out = tmp_path / "o.jsonl"
    out.write_text("", encoding="utf-8")
    (tmp_path / "o.jsonl.manifest.json").write_text(json.dumps({"format": "something-else"}), encoding="utf-8")
    result = run_cli("run", corpus, "--task", "jd_requirements", "--backend", "echo", "--model", gold, "--out", out,
                     "--resume")
    assert result.exit_code == 2 and "not an extractor run manifest" in result.stderr


# -- bad input fuzzing -------------------------------------------------------------------------------
def _read_all(path, **kw):
    return [r for batch in CorpusReader(path, **kw) for r in batch]


@FUZZ
@given(st.lists(st.binary(max_size=80), max_size=12))
def test_fuzz_jsonl_reader(tmp_path, lines):
    path = tmp_path / "fuzz.jsonl"
    path.write_bytes(b"\n".join(lines))
    try:
        _read_all(path)
    except InputError as exc:
        assert "fuzz.jsonl" in str(exc)
    rejects = _read_all(path, on_bad="skip")  # skip mode never raises on bad records
    assert all(isinstance(r["values"]["text"], str) for r in rejects)


@FUZZ
@given(st.binary(max_size=400))
def test_fuzz_gzip_reader(tmp_path, data):
    path = tmp_path / "fuzz.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"text": "ok"}\n' * 20)[: len(data)] + data)
    try:
        _read_all(path, on_bad="skip")
    except InputError as exc:
        assert "fuzz.jsonl.gz" in str(exc)


def test_special_corpora(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    assert _read_all(empty) == []
    nul = tmp_path / "nul.jsonl"
    nul.write_bytes(b'{"text": "a\x00b"}\n{"text": "ok"}\n')
    with pytest.raises(InputError, match="nul.jsonl:1: malformed JSON"):
        _read_all(nul)
    huge = tmp_path / "huge.jsonl"
    with open(huge, "w", encoding="utf-8") as fh:
        fh.write(json.dumps({"id": "big", "text": "岗" * (34 * 1024 * 1024)}) + "\n")  # ~100 MB of UTF-8
    (rec,) = _read_all(huge)
    assert len(rec["values"]["text"]) == 34 * 1024 * 1024
    wrong = tmp_path / "wrong.parquet"
    pl.DataFrame({"id": ["a"], "text": [5]}).write_parquet(wrong)
    with pytest.raises(InputError, match="wrong.parquet:1.*must be a string"):
        _read_all(wrong)
    notparquet = tmp_path / "bad.parquet"
    notparquet.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(InputError, match="cannot read parquet"):
        _read_all(notparquet)


yaml_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=12),
                           lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=10), c, max_size=4),
                           max_leaves=15)


@FUZZ
@given(st.dictionaries(st.sampled_from(["name", "version", "description", "schema", "input_fields", "messages",
                                        "few_shot", "generation", "scoring", "absent_marker", "bogus"]),
                       yaml_values, max_size=9))
def test_fuzz_task_files(user_tasks, spec):
    path = user_tasks / "prompts" / "mytask.yaml"
    base = yaml.safe_load(path.read_text(encoding="utf-8"))
    path.write_text(yaml.safe_dump({**base, **spec}, allow_unicode=True), encoding="utf-8")
    try:
        load_task("mytask", [str(user_tasks)])
    except TaskError as exc:
        assert "mytask" in str(exc)


@FUZZ
@given(st.lists(yaml_values, min_size=1, max_size=6))
def test_fuzz_gold_files(tmp_path, golds):
    task = load_task("jd_requirements")
    write_jsonl(tmp_path / "g.jsonl", [{"id": str(i), "gold": g} for i, g in enumerate(golds)])
    write_jsonl(tmp_path / "p.jsonl", [{"id": str(i), "prediction": g, "status": "ok"} for i, g in enumerate(golds)])
    result = evaluate(task, tmp_path / "p.jsonl", tmp_path / "g.jsonl").result()
    assert result["micro"]["fp"] == 0 and result["micro"]["fn"] == 0  # any shape: gold vs itself is exact


@FUZZ
@given(st.lists(yaml_values, min_size=1, max_size=5))
def test_fuzz_gold_lines_of_any_shape(tmp_path, rows):
    write_jsonl(tmp_path / "g.jsonl", rows)
    write_jsonl(tmp_path / "p.jsonl", [{"id": "1", "prediction": None, "status": "ok"}])
    try:
        evaluate(load_task("spo"), tmp_path / "p.jsonl", tmp_path / "g.jsonl")
    except InputError as exc:
        assert "g.jsonl" in str(exc) or "p.jsonl" in str(exc)


# -- security ----------------------------------------------------------------------------------------
def test_remote_code_needs_the_flag(tmp_path, tiny_model, run_cli):
    """A model folder asking for its own code: refused without --trust-remote-code; the code never runs."""
    evil = tmp_path / "evil"
    shutil.copytree(tiny_model, evil)
    marker = tmp_path / "pwned"
    (evil / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n", encoding="utf-8")
    config = json.loads((evil / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (evil / "config.json").write_text(json.dumps(config))
    corpus, _ = synth_corpus(tmp_path, n=1)
    result = run_cli("run", corpus, "--task", "jd_requirements", "--model", evil, "--out", tmp_path / "o.jsonl",
                     "--max-new-tokens", "2", "--quiet")
    assert not marker.exists()  # without the flag the folder's code is never imported
    assert result.exit_code == 0
    trusted = run_cli("run", corpus, "--task", "jd_requirements", "--model", evil, "--out", tmp_path / "o2.jsonl",
                      "--max-new-tokens", "2", "--quiet", "--trust-remote-code")
    assert marker.exists()  # with it, it is (the test's code then fails to define the class: a clean error)
    assert trusted.exit_code == 2 and "cannot load" in trusted.stderr


def test_model_output_is_data_not_code(tmp_path, run_cli):
    marker = tmp_path / "pwned"
    payload = f"__import__('os').system('touch {marker}') {{\"学历要求\": [\"{{{{7*7}}}}\"]}}"
    write_jsonl(tmp_path / "c.jsonl", [{"id": "a", "text": "{{ 7*7 }} {% include '/etc/passwd' %}"}])
    write_jsonl(tmp_path / "raw.jsonl", [{"id": "a", "raw": payload}])
    out = tmp_path / "o.jsonl"
    result = run_cli("run", tmp_path / "c.jsonl", "--task", "jd_requirements", "--backend", "echo", "--model",
                     tmp_path / "raw.jsonl", "--out", out, "--quiet", "--keep-field", "text")
    assert result.exit_code == 0 and not marker.exists()
    (row,) = read_jsonl(out)
    assert row["raw"] == payload and row["text"].startswith("{{ 7*7 }}")  # record text is not a template
    assert row["status"] == "schema_violation"


def test_bad_corpus_error_is_one_line(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "a"}\n{"text": \n', encoding="utf-8")
    result = subprocess.run(EXTRACTOR + ["data", "check", str(path)], capture_output=True, text=True)
    assert result.returncode == 2 and f"{path}:2: malformed JSON" in result.stdout
    run = subprocess.run(EXTRACTOR + ["run", str(path), "--task", "jd_requirements", "--backend", "echo", "--model",
                                      str(path), "--out", str(tmp_path / "o.jsonl"), "--quiet"],
                         capture_output=True, text=True)
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "c.jsonl:2" in run.stderr


def test_every_extractor_error_is_exit_2():
    assert ExtractorError.exit_code == 2
