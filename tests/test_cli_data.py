import subprocess
import sys

from extractor.datasets.synth import ABSENT, FIELDS, generate
from tests.conftest import read_jsonl


def test_version_and_help(run_cli):
    assert run_cli("--version").output.startswith("extractor, version")
    assert "synth-jd" in run_cli("data", "--help").output


def test_help_does_not_import_torch():
    code = ("import sys; from extractor.cli.main import cli\n"
            "try:\n    cli(['--help'], standalone_mode=False)\nexcept SystemExit: pass\n"
            "from extractor.cli.main import COMMANDS, LazyGroup\n"
            "[LazyGroup().get_command(None, n) for n in COMMANDS]\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().endswith("False")


def test_tasks_lists_four(run_cli):
    out = run_cli("tasks").output
    for name in ("jd_requirements", "spo", "review_topic", "skills"):
        assert name in out


def test_tasks_show_one_and_unknown(run_cli):
    result = run_cli("tasks", "spo")
    assert result.exit_code == 0 and "predicate" in result.output and "tuples" in result.output
    result = run_cli("tasks", "sp0")
    assert result.exit_code == 2 and "Did you mean 'spo'" in result.stderr and "Traceback" not in result.stderr


def test_synth_is_deterministic_and_labels_are_in_text(tmp_path, run_cli):
    for name in ("a", "b"):
        run_cli("data", "synth-jd", "--n", 300, "--lang", "mix", "--out", tmp_path / f"{name}.jsonl",
                "--gold", tmp_path / f"{name}.gold.jsonl", "--seed", 3)
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    texts = {r["id"]: r["text"] for r in read_jsonl(tmp_path / "a.jsonl")}
    golds = read_jsonl(tmp_path / "a.gold.jsonl")
    absent = 0
    for g in golds:
        assert set(g["gold"]) == set(FIELDS)
        for values in g["gold"].values():
            for v in values:
                absent += v == ABSENT
                assert v == ABSENT or v in texts[g["id"]]
    assert absent > 0


def test_heldout_split_is_disjoint():
    seen_in = {v for _, g in generate(2000, split="in") for vals in g["gold"].values() for v in vals}
    seen_out = {v for _, g in generate(500, split="heldout") for vals in g["gold"].values() for v in vals}
    assert seen_in & seen_out == {ABSENT}


def test_check_reports_bad_lines_and_exits_2(tmp_path, run_cli):
    path = tmp_path / "c.jsonl"
    path.write_text('{"id": "a", "text": "x"}\n{"id": "a", "text": "y"}\nnot json\n{"id": "c"}\n',
                    encoding="utf-8")
    result = run_cli("data", "check", path)
    assert result.exit_code == 2
    assert f"{path}:2: duplicate id 'a'" in result.output
    assert f"{path}:3: malformed JSON" in result.output
    assert "records: 1 good, 3 bad (1 duplicate ids)" in result.output


def test_check_clean_corpus(tmp_path, run_cli):
    run_cli("data", "synth-jd", "--n", 50, "--out", tmp_path / "c.jsonl")
    result = run_cli("data", "check", tmp_path / "c.jsonl")
    assert result.exit_code == 0 and "records: 50 good, 0 bad" in result.output


def test_missing_file_one_line_error(run_cli, tmp_path):
    result = run_cli("data", "check", tmp_path / "nope.jsonl")
    assert result.exit_code == 2 and result.stderr.count("\n") == 1


def test_skillspan_converter(tmp_path, run_cli):
    from tests.conftest import shared_path
    src = shared_path("data", "skillspan", "dev.json")
    result = run_cli("data", "skillspan", src, "--out", tmp_path / "c.jsonl", "--gold", tmp_path / "g.jsonl")
    assert result.exit_code == 0
    texts = {r["id"]: r["text"] for r in read_jsonl(tmp_path / "c.jsonl")}
    golds = read_jsonl(tmp_path / "g.jsonl")
    assert len(golds) == 3174
    n_skill = sum(len(g["gold"]["skills"]) for g in golds)
    n_know = sum(len(g["gold"]["knowledge"]) for g in golds)
    assert (n_skill, n_know) == (1070, 1093)  # the spans SkillSpan's dev split documents
    assert all(span in texts[g["id"]] for g in golds for span in g["gold"]["skills"] + g["gold"]["knowledge"])


def test_bio_spans():
    from extractor.datasets.skillspan import bio_spans
    assert bio_spans(list("abcde"), ["B", "I", "O", "B", "B"]) == ["a b", "d", "e"]
