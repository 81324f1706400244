"""`extractor bench`: the fast path and plain `generate` through the run path, timed in one process."""
import json

from tests.conftest import synth_corpus


def test_bench_times_both_paths_and_compares_outputs(tmp_path, tiny_model, run_cli):
    out = tmp_path / "bench.json"
    result = run_cli("bench", "--model", tiny_model, "--n", 12, "--baseline-n", 6, "--max-new-tokens", 8,
                     "--device", "cpu", "--dtype", "fp32", "--out", out)
    assert result.exit_code == 0, result.output
    assert "--fast on" in result.output and "same raw output on 6 of 6 records" in result.output
    r = json.loads(out.read_text())
    assert r["format"] == "extractor.bench/1" and r["git_commit"] is not None and r["device"] == "cpu"
    assert r["fast"]["records"] == 12 and r["plain"]["records"] == 6
    for row in (r["fast"], r["plain"]):
        assert 0 < row["tokens"] <= 8 * row["records"]
        assert row["tokens"] == round(row["mean_output_tokens"] * row["records"])  # the run's count = its rows'
        assert abs(row["tok_s"] * row["seconds"] - row["tokens"]) < 1e-6 * row["tokens"] + 1e-9
        assert sum(row["statuses"].values()) == row["records"]
    assert r["ratio_records_s"] == r["fast"]["records_s"] / r["plain"]["records_s"]


def test_bench_on_a_corpus_constrained(tmp_path, tiny_model, run_cli):
    corpus, _ = synth_corpus(tmp_path, n=5, seed=4)
    out = tmp_path / "bench.json"
    result = run_cli("bench", "--model", tiny_model, "--corpus", corpus, "--n", 5, "--baseline-n", 3,
                     "--max-new-tokens", 24, "--constrained", "--device", "cpu", "--dtype", "fp32", "--out", out)
    assert result.exit_code == 0, result.output
    r = json.loads(out.read_text())
    assert r["corpus"] == str(corpus) and r["constrained"] and r["fast"]["records"] == 5
    assert r["same_raw_output"] == 3 == r["compared"]


def test_bench_bad_corpus_is_one_line(tmp_path, tiny_model, run_cli):
    result = run_cli("bench", "--model", tiny_model, "--corpus", tmp_path / "missing.jsonl", "--device", "cpu")
    assert result.exit_code == 2
    assert result.output.strip().startswith("error: ") and "missing.jsonl" in result.output
    assert len(result.output.strip().splitlines()) == 1
