"""Scripting conventions: -V, --json on tasks and data check, full-width tables off a terminal, escaped
table cells, column suggestions, progress bounded by --limit, truncation flags, checks before loading,
--print-prompt, stdin/stdout, --log-file, typed Parquet predictions, completion of task names."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO, read_jsonl, write_jsonl

pytestmark = pytest.mark.timeout(120)


def cli(*args, input=None, env=None, timeout=60):
    """The installed CLI in a subprocess (no terminal: stdout and stderr are pipes)."""
    return subprocess.run([sys.executable, "-m", "extractor", *map(str, args)], capture_output=True, text=True,
                          input=input, timeout=timeout, cwd=REPO,
                          env={**os.environ, "COLUMNS": "", **(env or {})})


@pytest.mark.parametrize("flag", ["-V", "--version"])
def test_version_short_and_long(run_cli, flag):
    result = run_cli(flag)
    assert result.exit_code == 0 and result.output.startswith("extractor, version ")


def test_tasks_json_list_and_one(run_cli):
    listed = json.loads(run_cli("tasks", "--json").stdout)
    assert {t["name"] for t in listed} >= {"jd_requirements", "skills"}
    one = json.loads(run_cli("tasks", "jd_requirements", "--json").stdout)
    assert one["name"] == "jd_requirements" and one["input_fields"] == ["text"]
    assert one["schema"]["type"] == "object" and "<text>" in one["example_prompt"]


def test_tasks_json_unknown_is_one_line(run_cli):
    result = run_cli("tasks", "jd_requirment", "--json")
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "did you mean 'jd_requirements'" in result.stderr.lower()


def test_tables_full_width_off_a_terminal(tmp_path):
    """A CI log (stdout a pipe) gets whole cells, not `专业要…` cut at 80 columns."""
    long_class = "专业要求" * 30
    doc = {"classes": {long_class: {"precision": 1, "recall": 1, "f1": 1, "support": 1, "tp": 1, "fp": 0,
                                    "fn": 0}},
           "micro": {"precision": 1, "recall": 1, "f1": 1, "support": 1, "tp": 1, "fp": 0, "fn": 0},
           "macro": {"precision": 1, "recall": 1, "f1": 1}, "weighted": {"precision": 1, "recall": 1, "f1": 1}}
    code = ("import json,sys; from extractor.cli.tables import console, metrics_table; "
            "console().print(metrics_table(json.loads(sys.stdin.read())))")
    out = subprocess.run([sys.executable, "-c", code], input=json.dumps(doc), capture_output=True, text=True,
                         cwd=REPO, env={**os.environ, "COLUMNS": ""}, timeout=60)
    assert out.returncode == 0, out.stderr
    assert long_class in out.stdout and "…" not in out.stdout


@pytest.mark.parametrize("name", ["[/x]", "[bold]", "[link=x]y[/link]", "\\[", "[/]"])
def test_table_cells_are_not_markup(name):
    """A class named like rich markup prints as itself (it crashed the table before)."""
    from rich.console import Console
    from extractor.cli.tables import metrics_table, status_table
    m = {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2, "tp": 1, "fp": 1, "fn": 1}
    doc = {"classes": {name: m}, "micro": m, "macro": m, "weighted": m}
    console = Console(width=200, record=True, file=open(os.devnull, "w"))
    console.print(metrics_table(doc))
    console.print(status_table({name: 3}))
    assert console.export_text().count(name) == 2


def _parquet(path, columns: dict):
    import polars as pl
    pl.DataFrame(columns).write_parquet(path)
    return path


def test_check_parquet_without_text_column_one_line_with_suggestion(tmp_path):
    dump = _parquet(tmp_path / "dump.parquet", {
        "job_id": [f"j{i}" for i in range(20)], "title": ["Engineer"] * 20,
        "description": ["需要本科以上学历，熟悉Java和Python" * 3] * 20, "salary": list(range(20))})
    result = cli("data", "check", dump)
    assert result.returncode == 2
    bad = [line for line in result.stdout.splitlines() if line.startswith("bad:")]
    assert bad == [f"bad: {dump}: 20 records (lines 1, 2, 3, 4, 5, …) have no field 'text'; the likely text "
                   "column is 'description' (the longest strings on average): pass --text-field description "
                   "--id-field job_id"]
    doc = json.loads(cli("data", "check", dump, "--json").stdout)
    assert doc["ok"] is False and doc["missing_text_field"]["suggested_text_field"] == "description"
    assert doc["missing_text_field"]["suggested_id_field"] == "job_id"
    fixed = cli("data", "check", dump, "--text-field", "description", "--id-field", "job_id", "--json")
    assert fixed.returncode == 0 and json.loads(fixed.stdout)["records"] == 20


def test_check_json_lists_bad_records(tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"id": "a", "text": "x"}\nnot json\n{"id": "a", "text": "y"}\n', encoding="utf-8")
    result = cli("data", "check", corpus, "--json")
    doc = json.loads(result.stdout)
    assert result.returncode == 2 and doc["records"] == 1 and doc["bad"] == 2 and doc["duplicate_ids"] == 1
    assert [b["line"] for b in doc["bad_records"]] == [2, 3] and doc["missing_text_field"] is None
    assert doc["text_length"]["max"] == 1


def test_check_no_string_column_says_which_fields(tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"n": i} for i in range(3)])
    result = cli("data", "check", corpus)
    assert result.returncode == 2 and "choose the column holding the text with --text-field (fields: n)" \
        in result.stdout


@pytest.mark.parametrize("words, incomplete", [("extractor tasks", "jd"), ("extractor run c.jsonl --task", "jd"),
                                               ("extractor train --task", "jd"), ("extractor eval p.jsonl --task", "jd"),
                                               ("extractor compare a.jsonl b.jsonl --task", "jd"),
                                               ("extractor validate p.jsonl --task", "jd")])
def test_completion_lists_task_names(words, incomplete):
    """click's completion protocol, as `eval "$(_EXTRACTOR_COMPLETE=bash_source extractor)"` drives it."""
    out = subprocess.run([sys.executable, "-c", "from extractor.cli.main import main; main()"],
                         capture_output=True, text=True, cwd=REPO, timeout=60,
                         env={**os.environ, "_EXTRACTOR_COMPLETE": "bash_complete",
                              "COMP_WORDS": f"{words} {incomplete}", "COMP_CWORD": str(len(words.split()))})
    assert out.returncode == 0, out.stderr
    assert "plain,jd_requirements" in out.stdout.splitlines()


def test_completion_script_is_documented_and_emitted(run_cli):
    assert "_EXTRACTOR_COMPLETE=bash_source extractor" in run_cli("--help").output
    out = subprocess.run([sys.executable, "-c", "from extractor.cli.main import main; main()"],
                         capture_output=True, text=True, cwd=REPO, timeout=60,
                         env={**os.environ, "_EXTRACTOR_COMPLETE": "bash_source"})
    assert "complete -o nosort -F" in out.stdout


# -- checks before loading, --limit, truncation ---------------------------------------------------------------

def _backend_loaded_probe(*args, module="transformers.modeling_utils", says="BACKEND"):
    """Run the CLI in a subprocess that says at exit (`says True|False`) whether `module` was ever imported
    (transformers' modeling code: what loading weights imports, and reading a tokenizer does not; torch, for
    train): a check that fails before it did not wait for the model. (Not the hf backend's module: the run's
    checks ask its class what it can do, which imports no torch.)"""
    code = (f"import atexit, sys; atexit.register(lambda: print({says!r}, {module!r} in sys.modules, "
            "file=sys.stderr)); sys.argv = ['extractor', *sys.argv[1:]]; "
            "from extractor.cli.main import main; main()")
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, timeout=60, env={**os.environ, "COLUMNS": ""})


def _long_corpus(tmp_path):
    return write_jsonl(tmp_path / "c.jsonl", [{"id": "short", "text": "本科"},
                                              {"id": "long", "text": "计算机专业 " * 400}])


@pytest.mark.parametrize("limit_args, limit", [(["--max-input-tokens", "600"], 600),
                                               (["--max-new-tokens", "8"], 2048 - 8)])
def test_too_long_prompt_fails_before_weights_load_and_leaves_nothing(tmp_path, tiny_model, limit_args, limit):
    """The default limit is computed as the run computes it: the model's context minus max new tokens."""
    corpus = _long_corpus(tmp_path)
    if limit == 2040:
        write_jsonl(corpus, [{"id": "long", "text": "计算机专业 " * 1200}])
    out = tmp_path / "o.jsonl"
    result = _backend_loaded_probe("run", corpus, "--task", "jd_requirements", "--model", tiny_model, "--out", out,
                                   *limit_args)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and f"record long: prompt has" in lines[0] and f"the limit {limit};" in lines[0]
    assert "BACKEND False" in result.stderr and "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl"]  # no output, no manifest


def test_existing_output_refused_before_weights_load(tmp_path, tiny_model):
    corpus = _long_corpus(tmp_path)
    out = tmp_path / "o.jsonl"
    out.write_text("", encoding="utf-8")
    result = _backend_loaded_probe("run", corpus, "--task", "jd_requirements", "--model", tiny_model, "--out", out)
    assert result.returncode == 2 and "already exists; pass --resume" in result.stderr
    assert "BACKEND False" in result.stderr and out.read_text() == ""


def test_resume_with_other_settings_refused_before_weights_load(tmp_path, tiny_model, run_cli):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": "a", "text": "本科"}])
    out = tmp_path / "o.jsonl"
    args = ["run", corpus, "--task", "jd_requirements", "--model", tiny_model, "--out", out, "--quiet"]
    assert run_cli(*args, "--max-new-tokens", "4").exit_code == 0
    before = out.read_bytes()
    result = _backend_loaded_probe(*args, "--max-new-tokens", "5", "--resume")
    assert result.returncode == 2 and "--resume refused" in result.stderr and "params.max_new_tokens" in result.stderr
    assert "BACKEND False" in result.stderr and out.read_bytes() == before


def test_truncated_inputs_flagged_and_counted(tmp_path, tiny_model, run_cli):
    corpus = _long_corpus(tmp_path)
    out = tmp_path / "t.jsonl"
    result = run_cli("run", corpus, "--task", "jd_requirements", "--model", tiny_model, "--out", out,
                     "--max-new-tokens", "4", "--max-input-tokens", "600", "--on-long", "truncate")
    assert result.exit_code == 0, result.output
    rows = {r["id"]: r for r in read_jsonl(out)}
    assert rows["long"]["input_truncated"] is True and "input_truncated" not in rows["short"]
    summary = json.loads((tmp_path / "t.jsonl.manifest.json").read_text())["summary"]
    assert summary["input_truncated"] == 1
    assert "input truncated (--on-long truncate)" in result.stderr
    again = run_cli("run", corpus, "--task", "jd_requirements", "--model", tiny_model, "--out", out,
                    "--max-new-tokens", "4", "--max-input-tokens", "600", "--on-long", "truncate", "--resume")
    summary = json.loads((tmp_path / "t.jsonl.manifest.json").read_text())["summary"]
    assert again.exit_code == 0 and summary["input_truncated"] == 1 and summary["already_done"] == 2


GOLD = {"学历要求": ["本科"], "专业要求": ["计算机"], "工作年限要求": ["3年以上"], "编程语言": ["java"], "加分项": ["无"]}


def _echo_corpus(tmp_path, n=20):
    rows = [{"id": f"r{i}", "text": f"本科 {i}"} for i in range(n)]
    corpus = write_jsonl(tmp_path / "c.jsonl", rows)
    gold = write_jsonl(tmp_path / "gold.jsonl", [{"id": r["id"], "gold": GOLD} for r in rows])
    return corpus, gold


def _bar_ends(stderr: str) -> list[str]:
    import re
    return re.findall(r"\| (\d+/\d+) \[", stderr.replace("\r", "\n"))


def test_progress_bar_honours_limit(tmp_path):
    corpus, gold = _echo_corpus(tmp_path)
    args = ["run", corpus, "--task", "jd_requirements", "--backend", "echo", "--model", gold,
            "--out", tmp_path / "o.jsonl", "--limit", "5"]
    first = cli(*args)
    assert first.returncode == 0 and _bar_ends(first.stderr)[-1] == "5/5", first.stderr
    second = cli(*args, "--resume")
    assert second.returncode == 0 and _bar_ends(second.stderr)[-1] == "5/5"
    third = cli(*args[:-2], "--limit", "50", "--resume")  # 10 left: the bar ends at 10
    assert third.returncode == 0 and _bar_ends(third.stderr)[-1] == "10/10"
    assert len(read_jsonl(tmp_path / "o.jsonl")) == 20


def test_truncation_flag_survives_parquet(tmp_path, tiny_model, run_cli):
    from extractor.store.writers import iter_rows
    rows = [{"id": f"s{i}", "text": "本科"} for i in range(3)] + [{"id": "long", "text": "计算机专业 " * 400}]
    corpus = write_jsonl(tmp_path / "c.jsonl", rows)
    out = tmp_path / "t.parquet"
    result = run_cli("run", corpus, "--task", "jd_requirements", "--model", tiny_model, "--out", out, "--quiet",
                     "--max-new-tokens", "4", "--max-input-tokens", "600", "--on-long", "truncate", "--window", "2")
    assert result.exit_code == 0, result.output
    got = {row["id"]: row for _, row in iter_rows(out)}
    assert got["long"]["input_truncated"] is True and "input_truncated" not in got["s0"]


def test_prompt_learning_kinds_match():
    from extractor.backends.prompt_learning import KINDS
    from extractor.pipeline.preflight import PROMPT_LEARNING
    assert PROMPT_LEARNING == KINDS


# -- --print-prompt, --dry-run, stdin/stdout, --log-file, -q/-v ----------------------------------------------

def test_print_prompt_exact_chat_input_no_weights_nothing_written(tmp_path, tiny_model):
    from transformers import AutoTokenizer
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": "a", "text": "本科，java"}, {"id": "b", "text": "硕士"}])
    out = tmp_path / "o.jsonl"
    result = _backend_loaded_probe("run", corpus, "--task", "jd_requirements", "--model", tiny_model, "--out", out,
                                   "--print-prompt", "b")
    assert result.returncode == 0, result.stderr
    tok = AutoTokenizer.from_pretrained(tiny_model)
    assert result.stdout.startswith(tok.bos_token or "<|im_start|>") and "硕士" in result.stdout
    assert result.stdout.rstrip("\n").endswith("assistant")  # the chat template's generation prompt
    n = len(tok(result.stdout, add_special_tokens=False)["input_ids"])
    info = [line for line in result.stderr.splitlines() if line.startswith("record b:")]
    assert info and "prompt tokens, limit 1888; chat template" in info[0]
    assert abs(int(info[0].split()[2]) - n) <= 1
    assert "BACKEND False" in result.stderr and sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl"]


@pytest.mark.parametrize("args, code, says", [
    (["--print-prompt", "zz"], 2, "no record has id 'zz'"),
    (["--dry-run"], 0, "record a:"),
    (["--dry-run", "--max-input-tokens", "50"], 2, "record a: prompt has"),
    (["--print-prompt", "a", "--max-input-tokens", "50"], 0, "the run stops on this record (--on-long fail)"),
])
def test_dry_run_cases(tmp_path, tiny_model, args, code, says, warm):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": "a", "text": "本科，java"}])
    exit_code, stderr = warm.run(["run", corpus, "--task", "jd_requirements", "--model", tiny_model, "--out",
                                  tmp_path / "o.jsonl", *args], timeout=60)
    assert exit_code == code and says in stderr and "Traceback" not in stderr, stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl"]


def test_stdin_to_stdout_jsonl(tmp_path):
    corpus, gold = _echo_corpus(tmp_path, n=3)
    result = cli("run", "-", "--task", "jd_requirements", "--backend", "echo", "--model", gold, "--out", "-",
                 input=corpus.read_text(encoding="utf-8"))
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["id"] for r in rows] == ["r0", "r1", "r2"] and {r["status"] for r in rows} == {"ok"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl", "gold.jsonl"]  # no manifest, no lock


@pytest.mark.parametrize("corpus_arg, out_arg, extra, says", [
    ("-", "o.jsonl", ["--resume"], "--resume does not apply to the corpus from stdin (-)"),
    ("c.jsonl", "-", ["--resume"], "--resume does not apply to --out - (stdout)"),
    ("-", "o.jsonl", ["--gpus", "2"], "--gpus cannot be combined with the corpus from stdin"),
    ("c.jsonl", "-", ["--on-bad-record", "skip"], "name the rejects file with --rejects PATH"),
])
def test_stdio_refusals(tmp_path, corpus_arg, out_arg, extra, says):
    corpus, gold = _echo_corpus(tmp_path, n=2)
    out = out_arg if out_arg == "-" else tmp_path / out_arg
    result = cli("run", corpus if corpus_arg != "-" else "-", "--task", "jd_requirements", "--backend", "echo",
                 "--model", gold, "--out", out, *extra, input="")
    assert result.returncode == 2 and says in result.stderr and result.stderr.count("\n") == 1
    assert result.stdout == ""


def test_log_file_gets_stderr_lines_and_the_error(tmp_path):
    corpus, gold = _echo_corpus(tmp_path, n=3)
    log = tmp_path / "run.log"
    args = ["run", corpus, "--task", "jd_requirements", "--backend", "echo", "--model", gold,
            "--out", tmp_path / "o.jsonl", "--log-file", log]
    first = cli(*args, "-v")
    assert first.returncode == 0
    text = log.read_text(encoding="utf-8")
    assert text.count("--- ") == 1 and "backend echo, model" in text and "3 records (3 new" in text
    assert "\r" not in text and text.count("3/3") == 1  # the bar's final state only
    second = cli(*args, "-q")  # the output exists now: refused, and the refusal is logged too
    assert second.returncode == 2
    text = log.read_text(encoding="utf-8")
    assert text.count("--- ") == 2 and text.rstrip().endswith("--overwrite to start over")


# -- training -------------------------------------------------------------------------------------------------

def _train_args(tmp_path, model, *extra):
    from tests.conftest import synth_corpus
    corpus, gold = synth_corpus(tmp_path, n=8, seed=1)
    return ["train", "--model", model, "--train", corpus, "--gold", gold, "--task", "jd_requirements",
            "--out", tmp_path / "run", "--batch-size", "4", "--max-source-len", "300", "--max-target-len", "64",
            *extra]


def test_lora_target_error_lists_the_models_modules(tmp_path, tiny_model, warm):
    code, stderr = warm.run(_train_args(tmp_path, tiny_model, "--method", "lora", "--lora-target", "foo_proj", "-q"),
                            timeout=60)
    assert code == 2 and "Traceback" not in stderr, stderr
    line = [x for x in stderr.splitlines() if x.startswith("error:")][0]
    assert "--lora-target takes this model's linear layers:" in line
    for name in ("q_proj", "v_proj", "o_proj", "up_proj"):
        assert name in line
    assert "lm_head" not in line.split("linear layers:")[1]


@pytest.mark.parametrize("case, says", [
    ("no gold", "corpus1.jsonl:1: expected {context, target} strings; or pass --gold and --task"),
    ("dev without its gold", "corpus1.jsonl:1: expected {context, target} strings"),
    ("gold file missing", "'--gold': File"),
    ("gold without task", "--gold needs --task"),
    ("unknown task", "unknown task 'nosuch'"),
])
def test_train_input_errors_come_before_the_model_loads(tmp_path, tiny_model, case, says):
    """What train can check without the model fails in one line, exit 2, before torch is imported (it used to
    come after the weights loaded; a missing --gold file was a traceback)."""
    args = _train_args(tmp_path, tiny_model)
    corpus, gold = args[args.index("--train") + 1], args[args.index("--gold") + 1]
    if case == "no gold":
        del args[args.index("--gold"):args.index("--gold") + 2]
    elif case == "dev without its gold":
        args += ["--dev", corpus]
    elif case == "gold file missing":
        args[args.index("--gold") + 1] = tmp_path / "none.jsonl"
    elif case == "gold without task":
        del args[args.index("--task"):args.index("--task") + 2]
    else:
        args[args.index("--task") + 1] = "nosuch"
    result = _backend_loaded_probe(*args, module="torch", says="TORCH")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert says in result.stderr and "TORCH False" in result.stderr, result.stderr
    assert gold.exists() and not (tmp_path / "run").exists()


def test_train_without_dev_is_quiet_and_says_no_best(tmp_path, tiny_model):
    result = cli(*_train_args(tmp_path, tiny_model, "--method", "lora", "--max-steps", "2", "--save-steps", "2",
                              "--quiet"), timeout=120)
    assert result.returncode == 0, result.stderr
    assert "best: None" not in result.stderr and "no best checkpoint (no --dev" in result.stderr
    assert "Warning" not in result.stderr, result.stderr


def test_two_adapters_named_alike_get_unambiguous_outputs(tmp_path, tiny_model, run_cli):
    from tests.conftest import make_adapter
    a = make_adapter(tiny_model, "lora", tmp_path / "runA" / "best")
    b = make_adapter(tiny_model, "lora", tmp_path / "runB" / "best", seed=1)
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": "a", "text": "本科"}])
    result = run_cli("run", corpus, "--task", "jd_requirements", "--model", tiny_model, "--adapter", a,
                     "--adapter", b, "--out", tmp_path / "two.jsonl", "--max-new-tokens", "4", "--quiet")
    assert result.exit_code == 0, result.output
    assert read_jsonl(tmp_path / "two.runA-best.jsonl")[0]["adapter"] == "runA-best"
    assert read_jsonl(tmp_path / "two.runB-best.jsonl")[0]["adapter"] == "runB-best"
