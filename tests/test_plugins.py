"""Plugin seams: a package installed beside extractor adds a backend and a scoring kind through entry points
(a real distribution on sys.path, found by importlib.metadata), and `run` and `eval` use them by name."""
import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO, read_jsonl, write_jsonl

PLUGIN = '''
import json
from extractor.backends.base import STOP, Backend, Generation
from extractor.scoring.facts import FactKind


class FirstWordBackend(Backend):
    """Answers each prompt with the words of its record id, as a JSON array."""
    name = "first_word"

    def __init__(self, model, **_):
        self.model = model

    def identity(self, adapter=None):
        return {"backend": self.name, "model": self.model}

    def generate(self, requests, params, schema=None):
        return [Generation(json.dumps(r.record_id.split("-")), len(r.prompt), 2, STOP) for r in requests]


class FirstLabelFacts(FactKind):
    """Only an answer's first label counts."""

    def __call__(self, obj):
        return {("first", obj[0])} if isinstance(obj, list) and obj else set()
'''

TASK = {"name": "words", "version": "1", "description": "Words of a record id.", "schema": "words.json",
        "input_fields": ["text"], "messages": [{"role": "user", "content": "{{ text }}"}],
        "scoring": {"kind": "first_label", "match": "exact"}}


def make_plugin(site: Path) -> None:
    """A distribution as pip installs one: the module and a .dist-info with its entry points."""
    (site / "extractor_words_plugin.py").write_text(PLUGIN, encoding="utf-8")
    info = site / "extractor_words_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: extractor-words-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[extractor.backends]\nfirst_word = extractor_words_plugin:FirstWordBackend\n\n"
        "[extractor.scoring_kinds]\nfirst_label = extractor_words_plugin:FirstLabelFacts\n")


def make_task(root: Path) -> None:
    import yaml
    (root / "prompts").mkdir(parents=True)
    (root / "schemas").mkdir()
    (root / "prompts/words.yaml").write_text(yaml.safe_dump(TASK), encoding="utf-8")
    (root / "schemas/words.json").write_text(json.dumps({"type": "array", "items": {"type": "string"}}))


def extractor(*args, site: Path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(REPO)])}
    return subprocess.run([sys.executable, "-m", "extractor", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300)


def test_a_plugin_backend_runs_and_a_plugin_scoring_kind_scores(tmp_path):
    site, tasks = tmp_path / "site", tmp_path / "tasks"
    site.mkdir()
    make_plugin(site)
    make_task(tasks)
    corpus, gold, preds = tmp_path / "c.jsonl", tmp_path / "g.jsonl", tmp_path / "p.jsonl"
    write_jsonl(corpus, [{"id": "a-b", "text": "one"}, {"id": "c-d", "text": "two"}])
    # Gold agrees with each answer's first label only: first_label scores 1.0 where labels would not.
    write_jsonl(gold, [{"id": "a-b", "gold": ["a", "x"]}, {"id": "c-d", "gold": ["c"]}])
    ran = extractor("run", corpus, "--task", "words", "--tasks-dir", tasks, "--backend", "first_word", "--model", "m",
                    "--out", preds, "--quiet", site=site)
    assert ran.returncode == 0, ran.stderr
    assert [(r["prediction"], r["status"]) for r in read_jsonl(preds)] == [(["a", "b"], "ok"), (["c", "d"], "ok")]
    scored = extractor("eval", preds, "--gold", gold, "--task", "words", "--tasks-dir", tasks, site=site)
    assert scored.returncode == 0, scored.stderr
    doc = json.loads(Path(f"{preds}.metrics.json").read_text(encoding="utf-8"))
    assert doc["micro"]["f1"] == 1.0 and doc["micro"]["tp"] == 2


def test_unknown_plugin_names_are_one_line_with_a_suggestion(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    make_plugin(site)
    corpus = tmp_path / "c.jsonl"
    write_jsonl(corpus, [{"id": "a", "text": "one"}])
    result = extractor("run", corpus, "--task", "review_topic", "--backend", "first_wrd", "--model", "m", "--out",
                       tmp_path / "p.jsonl", site=site)
    assert result.returncode == 2 and "Did you mean 'first_word'?" in result.stderr, result.stderr


def test_bundled_entry_points_match_the_registries():
    """pyproject.toml declares the bundled backends and scoring kinds as the plugins declare theirs."""
    import tomllib
    from extractor.plugins import BACKENDS
    from extractor.plugins import SCORING_KINDS
    points = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"]
    assert points["extractor.backends"] == BACKENDS
    assert points["extractor.scoring_kinds"] == SCORING_KINDS
