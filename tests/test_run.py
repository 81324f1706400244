import json
import random
import signal
from collections import Counter

import pytest

from extractor.backends.base import GenParams, Request
from extractor.backends.hf import HFBackend
from tests.conftest import make_adapter, read_jsonl, synth_corpus, write_jsonl
from tests.helpers import kill_when_output_grows


def run_args(corpus, model, out, *extra):
    return ["run", corpus, "--task", "jd_requirements", "--model", model, "--out", out,
            "--max-new-tokens", "24", "--quiet", *extra]


def test_run_basic_output_records(tmp_path, tiny_model, run_cli):
    corpus, _ = synth_corpus(tmp_path, n=12)
    out = tmp_path / "preds.jsonl"
    result = run_cli(*run_args(corpus, tiny_model, out, "--keep-field", "text"))
    assert result.exit_code == 0, result.output
    rows = read_jsonl(out)
    assert [r["id"] for r in rows] == [r["id"] for r in read_jsonl(corpus)]
    for r in rows:
        assert set(r) >= {"id", "task", "prediction", "status", "error", "raw", "prompt_tokens", "output_tokens",
                          "finish_reason", "adapter", "text"}
        assert r["prompt_tokens"] > 100 and r["status"] in ("truncated", "invalid_json", "ok", "repaired",
                                                               "schema_violation")
    manifest = json.loads((tmp_path / "preds.jsonl.manifest.json").read_text(encoding="utf-8"))
    assert manifest["run_key"]["schema_hash"] and manifest["summary"]["records"] == 12
    assert manifest["run_key"]["backend"]["model"]["config_sha"]


def test_batching_preserves_order_and_equals_one_by_one(tiny_model):
    """Length-sorted, left-padded batches give each prompt the same greedy output as batch size 1."""
    backend = HFBackend(str(tiny_model), batch_size=8)
    prompts = [f"<|im_start|>user\n{'本科 java ' * k}<|im_end|>\n<|im_start|>assistant\n" for k in (9, 1, 5, 3, 7, 2)]
    params = GenParams(max_new_tokens=12)
    batched = backend.generate([Request(p) for p in prompts], params)
    single = [backend.generate([Request(p)], params)[0] for p in prompts]
    assert [g.text for g in batched] == [g.text for g in single]
    assert [g.prompt_tokens for g in batched] == backend.count_tokens(prompts)
    assert len({g.text for g in batched}) > 1


@pytest.mark.parametrize("fast", ["off", "on"])
def test_constrained_is_always_schema_valid(tmp_path, tiny_model, run_cli, fast):
    """Every output valid on the plain path and on the fast path (grammar masks on packed rows, closing
    mode with its checks spaced by slack): 16 records, four tasks, a budget tight enough to need closing."""
    corpus, _ = synth_corpus(tmp_path, n=16)
    for task in ("jd_requirements", "spo", "review_topic", "skills"):
        out = tmp_path / f"{task}.jsonl"
        result = run_cli("run", corpus, "--task", task, "--model", tiny_model, "--out", out, "--constrained",
                         "--max-new-tokens", "72", "--quiet", "--fast", fast)
        assert result.exit_code == 0, result.output
        statuses = Counter(r["status"] for r in read_jsonl(out))
        assert statuses == {"ok": 16}, (task, statuses)


def test_unsupported_schema_keyword_fails_at_start(tmp_path, tiny_model, run_cli, user_tasks):
    schema = json.loads((user_tasks / "schemas" / "mytask.json").read_text(encoding="utf-8"))
    schema["properties"]["学历要求"]["uniqueItems"] = True
    (user_tasks / "schemas" / "mytask.json").write_text(json.dumps(schema, ensure_ascii=False), encoding="utf-8")
    corpus, _ = synth_corpus(tmp_path, n=2)
    result = run_cli("run", corpus, "--task", "mytask", "--tasks-dir", user_tasks, "--model", tiny_model,
                     "--out", tmp_path / "o.jsonl", "--constrained")
    assert result.exit_code == 2
    assert "uniqueItems" in result.stderr and "$.properties.学历要求" in result.stderr
    assert not (tmp_path / "o.jsonl").exists()


def test_raw_format_without_chat_template(tmp_path, tiny_raw_model, run_cli):
    corpus, _ = synth_corpus(tmp_path, n=3)
    out = tmp_path / "o.jsonl"
    assert run_cli(*run_args(corpus, tiny_raw_model, out)).exit_code == 0
    manifest = json.loads((tmp_path / "o.jsonl.manifest.json").read_text(encoding="utf-8"))
    assert manifest["run_key"]["prompt_format"] == "raw"


@pytest.mark.parametrize("kind", ["lora", "ptuning", "prefix", "prompt"])
def test_adapters_change_outputs(tmp_path, tiny_model, run_cli, kind):
    corpus, _ = synth_corpus(tmp_path, n=6)
    adapter = make_adapter(tiny_model, kind, tmp_path / kind)
    base_out, ad_out = tmp_path / "base.jsonl", tmp_path / "ad.jsonl"
    assert run_cli(*run_args(corpus, tiny_model, base_out)).exit_code == 0
    result = run_cli(*run_args(corpus, tiny_model, ad_out, "--adapter", adapter))
    assert result.exit_code == 0, result.output
    base, adapted = read_jsonl(base_out), read_jsonl(ad_out)
    assert [r["raw"] for r in base] != [r["raw"] for r in adapted]
    assert {r["adapter"] for r in adapted} == {kind}


def test_several_adapters_one_run(tmp_path, tiny_model, run_cli):
    corpus, _ = synth_corpus(tmp_path, n=5)
    lora = make_adapter(tiny_model, "lora", tmp_path / "lora")
    pt = make_adapter(tiny_model, "ptuning", tmp_path / "pt")
    lora2 = make_adapter(tiny_model, "lora", tmp_path / "lora2", seed=3)
    result = run_cli(*run_args(corpus, tiny_model, tmp_path / "p.jsonl", "--adapter", lora, "--adapter", pt,
                               "--adapter", lora2))
    assert result.exit_code == 0, result.output
    outs = {name: read_jsonl(tmp_path / f"p.{name}.jsonl") for name in ("lora", "pt", "lora2")}
    assert len({tuple(r["raw"] for r in rows) for rows in outs.values()}) == 3
    # The same adapter alone gives the same outputs as in the multi-adapter run (clean swaps).
    run_cli(*run_args(corpus, tiny_model, tmp_path / "solo.jsonl", "--adapter", lora2))
    assert [r["raw"] for r in read_jsonl(tmp_path / "solo.jsonl")] == [r["raw"] for r in outs["lora2"]]


def test_every_status_from_crafted_outputs(tmp_path, run_cli):
    good = {"学历要求": ["本科"], "专业要求": ["计算机"], "工作年限要求": ["3年以上"], "编程语言": ["java"], "加分项": ["无"]}
    text = json.dumps(good, ensure_ascii=False)
    crafted = {"a": text, "b": text.replace('"', "'"), "c": "I cannot help", "d": json.dumps({"学历要求": 1}),
               "e": text[:30]}
    write_jsonl(tmp_path / "corpus.jsonl", [{"id": k, "text": "x" * (5000 if k == "f" else 10)} for k in "abcdef"])
    write_jsonl(tmp_path / "raw.jsonl", [{"id": k, "raw": v, "finish_reason": "length" if k == "e" else "stop"}
                                         for k, v in crafted.items()])
    out = tmp_path / "o.jsonl"
    result = run_cli("run", tmp_path / "corpus.jsonl", "--task", "jd_requirements", "--backend", "echo",
                     "--model", tmp_path / "raw.jsonl", "--out", out, "--quiet", "--max-input-tokens", "1000",
                     "--on-long", "skip")
    assert result.exit_code == 0, result.output
    got = {r["id"]: r["status"] for r in read_jsonl(out)}
    assert got == {"a": "ok", "b": "repaired", "c": "invalid_json", "d": "schema_violation", "e": "truncated",
                   "f": "error"}
    assert "skipped" in read_jsonl(out)[-1]["error"]


def test_long_input_policies(tmp_path, tiny_model, run_cli):
    write_jsonl(tmp_path / "c.jsonl", [{"id": "short", "text": "本科"}, {"id": "long", "text": "计算机专业 " * 400}])
    args = ["run", tmp_path / "c.jsonl", "--task", "jd_requirements", "--model", tiny_model,
            "--max-new-tokens", "8", "--quiet", "--max-input-tokens", "600"]
    fail = run_cli(*args, "--out", tmp_path / "f.jsonl")
    assert fail.exit_code == 2 and "record long: prompt has" in fail.stderr and "--on-long" in fail.stderr
    skip = run_cli(*args, "--out", tmp_path / "s.jsonl", "--on-long", "skip")
    rows = {r["id"]: r for r in read_jsonl(tmp_path / "s.jsonl")}
    assert skip.exit_code == 0 and rows["long"]["status"] == "error" and rows["short"]["status"] != "error"
    trunc = run_cli(*args, "--out", tmp_path / "t.jsonl", "--on-long", "truncate")
    rows = {r["id"]: r for r in read_jsonl(tmp_path / "t.jsonl")}
    assert trunc.exit_code == 0 and 500 < rows["long"]["prompt_tokens"] <= 600


def test_resume_refuses_other_settings_and_foreign_files(tmp_path, tiny_model, run_cli):
    corpus, _ = synth_corpus(tmp_path, n=4)
    out = tmp_path / "o.jsonl"
    assert run_cli(*run_args(corpus, tiny_model, out)).exit_code == 0
    again = run_cli(*run_args(corpus, tiny_model, out))
    assert again.exit_code == 2 and "--resume" in again.stderr
    other = run_cli(*run_args(corpus, tiny_model, out, "--resume", "--temperature", "0.7"))
    assert other.exit_code == 2 and "params" in other.stderr
    same = run_cli(*run_args(corpus, tiny_model, out, "--resume"))
    assert same.exit_code == 0 and len(read_jsonl(out)) == 4
    (tmp_path / "o.jsonl.manifest.json").write_text("{not json", encoding="utf-8")
    corrupt = run_cli(*run_args(corpus, tiny_model, out, "--resume"))
    assert corrupt.exit_code == 2 and "corrupt" in corrupt.stderr
    foreign = tmp_path / "foreign.jsonl"
    foreign.write_text('{"id": "x"}\n', encoding="utf-8")
    refused = run_cli(*run_args(corpus, tiny_model, foreign, "--resume"))
    assert refused.exit_code == 2 and "no manifest" in refused.stderr


def test_parquet_output_and_resume(tmp_path, tiny_model, run_cli):
    import pyarrow.parquet as pq
    corpus, _ = synth_corpus(tmp_path, n=6)
    out = tmp_path / "o.parquet"
    assert run_cli(*run_args(corpus, tiny_model, out)).exit_code == 0
    assert pq.read_table(out).num_rows == 6 and not (tmp_path / "o.parquet.partial.jsonl").exists()
    assert run_cli(*run_args(corpus, tiny_model, out, "--resume")).exit_code == 0
    assert pq.read_table(out).num_rows == 6


def test_bad_model_dirs_fail_before_work(tmp_path, tiny_model, run_cli):
    import shutil
    corpus, _ = synth_corpus(tmp_path, n=2)
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    (broken / "model.safetensors").unlink()
    result = run_cli(*run_args(corpus, broken, tmp_path / "o.jsonl"))
    assert result.exit_code == 2 and "no weight files" in result.stderr
    result = run_cli(*run_args(corpus, tmp_path / "nope", tmp_path / "o.jsonl"))
    assert result.exit_code == 2 and "does not exist" in result.stderr


def test_sigkill_then_resume_is_exactly_once(tmp_path, tiny_model, warm):
    """Real processes (warm starts: forked after the imports, each its own process), SIGKILLed mid-output."""
    corpus, _ = synth_corpus(tmp_path, n=60, seed=4)
    ref = tmp_path / "ref.jsonl"
    args = ["--window", "4", "--batch-size", "4"]
    assert warm.run(run_args(corpus, tiny_model, ref, *args))[0] == 0
    out = tmp_path / "killed.jsonl"
    rng = random.Random(7)
    kills = attempts = 0
    while kills < 4 and attempts < 8:  # a run that finished before its kill does not count
        attempts += 1
        code = kill_when_output_grows(run_args(corpus, tiny_model, out, "--resume", *args), out, rng, None,
                                      settle=0.3, warm=warm)
        kills += code == -signal.SIGKILL
        if out.exists() and out.read_bytes() and not out.read_bytes().endswith(b"\n"):
            pass  # a half-written line: the next resume must drop it
    code, err = warm.run(run_args(corpus, tiny_model, out, "--resume", *args))
    assert code == 0, err
    assert kills >= 2
    got = read_jsonl(out)
    ids = [r["id"] for r in got]
    assert sorted(ids) == sorted(r["id"] for r in read_jsonl(corpus)) and len(ids) == len(set(ids))
    ref_rows = {r["id"]: r["raw"] for r in read_jsonl(ref)}
    assert {r["id"]: r["raw"] for r in got} == ref_rows
