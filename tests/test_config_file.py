"""`--config FILE` for run, eval, compare and train: option values from YAML, the command line wins, unknown
keys and wrongly typed values refused in one line with exit code 2."""
import json

import pytest

from tests.conftest import read_jsonl, synth_corpus, write_jsonl


def config(tmp_path, text: str, name: str = "job.yaml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def corpus(tmp_path):
    return synth_corpus(tmp_path, n=6)


def test_run_takes_its_options_from_the_file_and_flags_override(tmp_path, corpus, run_cli):
    texts, gold = corpus
    job = config(tmp_path, f"""
corpus: {texts}
task: jd_requirements
backend: echo
model: {gold}
out: {tmp_path / 'a.jsonl'}
max_new_tokens: 40       # underscores or dashes
keep-field: [text]       # repeatable option: a list
quiet: true              # flag
constrained: true
""")
    first = run_cli("run", "--config", job)
    assert first.exit_code == 0, first.output
    rows = read_jsonl(tmp_path / "a.jsonl")
    assert len(rows) == 6 and all(r["text"] and r["status"] == "ok" for r in rows)
    key = json.loads((tmp_path / "a.jsonl.manifest.json").read_text())["run_key"]
    assert key["params"]["max_new_tokens"] == 40 and key["params"]["constrained"] is True
    second = run_cli("run", "--config", job, "--out", tmp_path / "b.jsonl", "--limit", "2", "--max-new-tokens", "9")
    assert second.exit_code == 0, second.output
    assert len(read_jsonl(tmp_path / "b.jsonl")) == 2
    assert json.loads((tmp_path / "b.jsonl.manifest.json").read_text())["run_key"]["params"]["max_new_tokens"] == 9


@pytest.mark.parametrize("text, message", [
    ("max_new_token: 3\n", "unknown key 'max_new_token'; did you mean 'max_new_tokens'?"),
    ("quiet: yes please\n", "quiet: a flag takes true or false"),
    ("window: many\n", "window: 'many' is not a valid integer"),
    ("on_long: sometimes\n", "on_long: 'sometimes' is not one of"),
    ("task: [a, b]\n", "task: expected one value"),
    ("- task\n", "expected a mapping of option names to values"),
    ("task: [\n", "job.yaml:2: not valid YAML"),
])
def test_bad_config_is_one_line_and_exit_2(tmp_path, corpus, run_cli, text, message):
    result = run_cli("run", corpus[0], "--task", "jd_requirements", "--model", "m", "--out", tmp_path / "p.jsonl",
                     "--config", config(tmp_path, text))
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and message in lines[0], result.output
    missing = run_cli("eval", "p.jsonl", "--config", tmp_path / "nope.yaml")
    assert missing.exit_code == 2 and "cannot read" in missing.output


def test_eval_and_compare_from_config(tmp_path, corpus, run_cli):
    _, gold = corpus
    rows = read_jsonl(gold)
    write_jsonl(tmp_path / "a.jsonl", [{"id": r["id"], "prediction": r["gold"], "status": "ok"} for r in rows])
    worse = [{"id": r["id"], "prediction": {k: ["x"] for k in r["gold"]}, "status": "ok"} for r in rows]
    write_jsonl(tmp_path / "b.jsonl", worse)
    ev = run_cli("eval", "--config", config(tmp_path, f"predictions: {tmp_path / 'a.jsonl'}\ngold: {gold}\n"
                                                      f"task: jd_requirements\nquiet: true\n"))
    assert ev.exit_code == 0 and "micro F1 1.0000" in ev.output, ev.output
    gate = config(tmp_path, f"runs: [{tmp_path / 'a.jsonl'}, {tmp_path / 'b.jsonl'}]\ngold: {gold}\n"
                            f"task: jd_requirements\nfail-if-drop: 0.01\nresamples: 1000\n", "gate.yaml")
    assert run_cli("compare", "--config", gate).exit_code == 1  # the gate fires on the planted drop
    flags = run_cli("compare", "--config", gate, tmp_path / "a.jsonl", tmp_path / "a.jsonl")  # arguments win
    assert flags.exit_code == 0 and "no significant drop" in flags.output


def test_train_from_config(tmp_path, tiny_model, run_cli):
    texts, gold = synth_corpus(tmp_path, n=8, seed=1)
    job = config(tmp_path, f"""
model: {tiny_model}
method: full
train: {texts}
gold: {gold}
task: jd_requirements
out: {tmp_path / 'run'}
max_steps: 2
save_steps: 2
batch_size: 4
max_source_len: 300
quiet: true
""")
    result = run_cli("train", "--config", job)
    assert result.exit_code == 0, result.output
    args = json.loads((tmp_path / "run" / "train_args.json").read_text())
    assert args["max_steps"] == 2 and args["method"] == "full" and (tmp_path / "run" / "checkpoint-2").is_dir()
    wrong = run_cli("train", "--config", config(tmp_path, "lora_rank: 4\n", "bad.yaml"))
    assert wrong.exit_code == 2 and "did you mean 'lora_r'?" in wrong.output
