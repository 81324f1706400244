"""Corpora, gold and outputs on object storage, against a real S3-compatible server (moto's server mode on
loopback, authentication on): round trips, kills and resume, refused credentials and missing buckets."""
import json
import subprocess
import sys

import polars as pl
import pytest

from extractor.store import locations
from extractor.store.writers import iter_rows
from tests.conftest import REPO, read_jsonl, synth_corpus

sys.path.insert(0, str(REPO / "bench"))
import reliability  # noqa: E402

EXTRACTOR = [sys.executable, "-m", "extractor"]


def echo_args(corpus, gold, out, *extra):
    return ["run", corpus, "--task", "jd_requirements", "--backend", "echo", "--model", gold, "--out", out, "--quiet",
            "--window", "8", *extra]


def rows(uri: str) -> list[dict]:
    return [row for _, row in iter_rows(locations.target(uri))]


def one_error_line(result, *needles) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def bucket(s3_env, tmp_path):
    """A bucket holding a 60-record corpus (JSONL with one bad line, and Parquet) and its gold labels."""
    name = s3_env.bucket(f"b-{tmp_path.name[-20:].lower().replace('_', '-')}")
    corpus, gold = synth_corpus(tmp_path, n=60, seed=2)
    with_bad = tmp_path / "with_bad.jsonl"
    with_bad.write_text(corpus.read_text(encoding="utf-8") + '{"id": "no-text"}\n', encoding="utf-8")
    pl.read_ndjson(corpus).write_parquet(tmp_path / "corpus.parquet")
    s3_env.upload(with_bad, f"s3://{name}/in/corpus.jsonl")
    s3_env.upload(tmp_path / "corpus.parquet", f"s3://{name}/in/corpus.parquet")
    s3_env.upload(gold, f"s3://{name}/in/gold.jsonl")
    return {"name": name, "corpus": corpus, "gold": gold, "with_bad": with_bad}


def test_round_trip_run_check_eval_compare(bucket, s3_env, tmp_path, run_cli):
    b = f"s3://{bucket['name']}"
    local = tmp_path / "local.jsonl"
    assert run_cli(*echo_args(bucket["with_bad"], bucket["gold"], local, "--on-bad-record", "skip")).exit_code == 0
    # Corpus and output on the store (echo's --model, a local gold file, stands in for model weights).
    gold = bucket["gold"]
    result = run_cli(*echo_args(f"{b}/in/corpus.jsonl", gold, f"{b}/out/p.jsonl",
                                "--on-bad-record", "skip"))
    assert result.exit_code == 0, result.output
    assert rows(f"{b}/out/p.jsonl") == read_jsonl(local)
    manifest = json.loads(s3_env.read(f"{b}/out/p.jsonl.manifest.json"))
    assert manifest["committed"] and manifest["summary"]["records"] == 60
    assert not s3_env.keys(bucket["name"], "out/p.jsonl.parts/")  # committed: the parts are gone
    (reject,) = [json.loads(x) for x in s3_env.read(f"{b}/out/p.jsonl.rejects.jsonl").splitlines()]
    assert "missing field 'text'" in reject["reason"]
    again = run_cli(*echo_args(f"{b}/in/corpus.jsonl", gold, f"{b}/out/p.jsonl", "--resume",
                               "--on-bad-record", "skip"))
    assert again.exit_code == 0 and rows(f"{b}/out/p.jsonl") == read_jsonl(local)
    assert json.loads(s3_env.read(f"{b}/out/p.jsonl.manifest.json"))["summary"]["already_done"] == 60
    # A committed output continued: its rows become part 0, the rest follows, each id once.
    assert run_cli(*echo_args(f"{b}/in/corpus.parquet", gold, f"{b}/out/q.parquet", "--limit", "20")).exit_code == 0
    assert len(rows(f"{b}/out/q.parquet")) == 20
    assert run_cli(*echo_args(f"{b}/in/corpus.parquet", gold, f"{b}/out/q.parquet", "--resume")).exit_code == 0
    assert rows(f"{b}/out/q.parquet") == read_jsonl(local)
    # The readers: data check, eval (metrics written beside the predictions), compare.
    check = run_cli("data", "check", f"{b}/in/corpus.parquet")
    assert check.exit_code == 0 and "records: 60 good" in check.output
    scored = run_cli("eval", f"{b}/out/p.jsonl", "--gold", f"{b}/in/gold.jsonl", "--task", "jd_requirements",
                     "--quiet")
    assert scored.exit_code == 0 and "micro F1 1.0000" in scored.output
    assert json.loads(s3_env.read(f"{b}/out/p.jsonl.metrics.json"))["micro"]["f1"] == 1.0
    compared = run_cli("compare", f"{b}/out/p.jsonl", f"{b}/out/q.parquet", "--gold", f"{b}/in/gold.jsonl",
                       "--task", "jd_requirements")
    assert compared.exit_code == 0, compared.output


def test_sharded_run_on_the_store(bucket, s3_env, tmp_path):
    b = f"s3://{bucket['name']}"
    local = tmp_path / "local.jsonl"
    done = subprocess.run(EXTRACTOR + echo_args(bucket["corpus"], bucket["gold"], local), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    sharded = subprocess.run(EXTRACTOR + echo_args(f"{b}/in/corpus.parquet", bucket["gold"], f"{b}/out/s.jsonl",
                                                   "--gpus", "2", "--device", "cpu"),
                             capture_output=True, text=True, timeout=300)
    assert sharded.returncode == 0, sharded.stderr[-2000:]
    assert rows(f"{b}/out/s.jsonl") == read_jsonl(local)
    assert sorted(s3_env.keys(bucket["name"], "out/")) == ["out/s.jsonl", "out/s.jsonl.manifest.json"]


def test_killed_runs_resume_exactly_once_on_the_store(s3_env, tmp_path):
    """Real SIGKILLs of `extractor run` writing to the store, at random moments of the whole run (the commit
    included), then --resume: every id once, rows identical to a local run."""
    s3_env.bucket("kills")
    result = reliability.run_kills_store(tmp_path, "s3://kills/run", kills=8, n=400)
    assert result["kills_landed"] >= 5, result
    assert result["lost"] == 0 and result["duplicated"] == 0 and result["identical_to_uninterrupted"], result


def test_refused_credentials_and_missing_buckets_are_one_line(bucket, s3_env, tmp_path, run_cli, monkeypatch):
    b = f"s3://{bucket['name']}"
    corpus, gold = bucket["corpus"], bucket["gold"]
    one_error_line(run_cli(*echo_args(corpus, gold, "s3://no-such-bucket/p.jsonl")),
                   "bucket 'no-such-bucket' does not exist")
    one_error_line(run_cli(*echo_args("s3://no-such-bucket/c.jsonl", gold, tmp_path / "o.jsonl")),
                   "bucket 'no-such-bucket' does not exist")
    one_error_line(run_cli(*echo_args(f"{b}/in/nothing.jsonl", gold, tmp_path / "o.jsonl")), "no such file")
    one_error_line(run_cli("eval", f"{b}/out/none.jsonl", "--gold", gold, "--task", "jd_requirements"),
                   "no such object")
    one_error_line(run_cli(*echo_args(corpus, gold, "gopher://host/p.jsonl")), "unknown storage scheme")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # hf:// through the same code; no hub is reachable from here
    one_error_line(run_cli("data", "check", "hf://datasets/org/name/c.jsonl"), "cannot read hf://", "HF_ENDPOINT")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    one_error_line(run_cli(*echo_args(f"{b}/in/corpus.jsonl", gold, tmp_path / "o.jsonl")), "access denied",
                   "AWS_ACCESS_KEY_ID")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIANOSUCHKEY0000000")
    one_error_line(run_cli(*echo_args(corpus, gold, f"{b}/out/o.jsonl")), "access denied")
    one_error_line(run_cli("data", "check", f"{b}/in/corpus.parquet"), "access denied")
    assert not list(tmp_path.glob("o.jsonl*"))


def test_commit_cut_short_at_either_step_resumes_exactly_once(bucket, s3_env, run_cli):
    """The two commit states too brief for a random kill to hit: the output uploaded but the commit not yet
    recorded (parts and a stale output), and a committed output with a stray part 0 (a continuation cut
    short). Both are laid out exactly as the steps leave them, then resumed."""
    b, key = f"s3://{bucket['name']}", bucket["name"]
    corpus, gold = f"s3://{bucket['name']}/in/corpus.parquet", bucket["gold"]
    want = [r["id"] for r in read_jsonl(bucket["corpus"])]
    assert run_cli(*echo_args(corpus, gold, f"{b}/out/c.jsonl", "--limit", "24")).exit_code == 0
    committed = s3_env.read(f"{b}/out/c.jsonl")
    # Committed, plus the part 0 a continuation writes before it records "not committed".
    s3_env.client().put_object(Bucket=key, Key="out/c.jsonl.parts/part-00000000.jsonl", Body=committed)
    assert run_cli(*echo_args(corpus, gold, f"{b}/out/c.jsonl", "--resume", "--limit", "16")).exit_code == 0
    assert [r["id"] for r in rows(f"{b}/out/c.jsonl")] == want[:40]
    # Not committed (a run stopped in its parts), and an output uploaded from those parts, unrecorded.
    assert run_cli(*echo_args(corpus, gold, f"{b}/out/d.jsonl", "--limit", "40")).exit_code == 0
    manifest = json.loads(s3_env.read(f"{b}/out/d.jsonl.manifest.json"))
    s3_env.client().put_object(Bucket=key, Key="out/d.jsonl.parts/part-00000000.jsonl",
                               Body=s3_env.read(f"{b}/out/d.jsonl"))
    manifest["committed"] = False
    s3_env.client().put_object(Bucket=key, Key="out/d.jsonl.manifest.json", Body=json.dumps(manifest).encode())
    assert run_cli(*echo_args(corpus, gold, f"{b}/out/d.jsonl", "--resume")).exit_code == 0
    assert [r["id"] for r in rows(f"{b}/out/d.jsonl")] == want
    assert not s3_env.keys(key, "out/d.jsonl.parts/")
