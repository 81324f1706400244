"""Hub ids resolve offline through a Hugging Face cache laid out as huggingface_hub lays it out:
models--ORG--NAME/{blobs/<sha256>, refs/<revision>, snapshots/<commit>/<file> -> ../../blobs/<sha256>}."""
import hashlib
import json
import os
from pathlib import Path

import pytest

from tests.conftest import make_adapter, read_jsonl, synth_corpus

MAIN = "a" * 40
TAGGED = "b" * 40


def cache_repo(cache: Path, repo_id: str, source: Path, commit: str, refs: tuple[str, ...] = ("main",)) -> Path:
    """Put `source`'s files into the cache as one snapshot: content-addressed blobs, symlinks, refs."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for f in sorted(source.iterdir()):
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        os.symlink(os.path.relpath(blob, snapshot), snapshot / f.name)
    (repo / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture
def hub_cache(tmp_path, tiny_model, monkeypatch):
    cache = tmp_path / "hf" / "hub"
    cache_repo(cache, "org/tiny", tiny_model, MAIN)
    cache_repo(cache, "org/tiny", tiny_model, TAGGED, refs=("v1",))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # the cache is HF_HOME/hub
    return cache


def run_args(corpus, model, out, *extra):
    return ["run", corpus, "--task", "jd_requirements", "--model", model, "--out", out, "--max-new-tokens", "8",
            "--quiet", *extra]


def test_hub_id_runs_from_the_cache_and_the_manifest_says_where(tmp_path, hub_cache, tiny_model, run_cli):
    corpus, _ = synth_corpus(tmp_path, n=3)
    local = run_cli(*run_args(corpus, tiny_model, tmp_path / "local.jsonl"))
    for spec, commit in (("org/tiny", MAIN), ("org/tiny@v1", TAGGED), (f"org/tiny@{TAGGED[:7]}", TAGGED)):
        out = tmp_path / f"{commit[0]}{len(spec)}.jsonl"
        result = run_cli(*run_args(corpus, spec, out))
        assert result.exit_code == 0 and local.exit_code == 0, result.output
        assert [r["raw"] for r in read_jsonl(out)] == [r["raw"] for r in read_jsonl(tmp_path / "local.jsonl")]
        hub = json.loads(Path(f"{out}.manifest.json").read_text())["run_key"]["hub"]["model"]
        assert hub == {"id": "org/tiny", "revision": spec.partition("@")[2] or "main", "commit": commit,
                       "snapshot": str(hub_cache / "models--org--tiny" / "snapshots" / commit)}


def test_hub_adapter_and_hub_cache_variable(tmp_path, hub_cache, tiny_model, run_cli, monkeypatch):
    adapter = make_adapter(tiny_model, "lora", tmp_path / "lora-src")
    elsewhere = tmp_path / "other-cache"
    cache_repo(elsewhere, "org/tiny", tiny_model, MAIN)
    cache_repo(elsewhere, "org/jd-lora", adapter, MAIN)
    monkeypatch.setenv("HF_HUB_CACHE", str(elsewhere))  # wins over HF_HOME, as in huggingface_hub
    corpus, _ = synth_corpus(tmp_path, n=2)
    out = tmp_path / "p.jsonl"
    result = run_cli(*run_args(corpus, "org/tiny", out, "--adapter", "org/jd-lora"))
    assert result.exit_code == 0, result.output
    assert {r["adapter"] for r in read_jsonl(out)} == {"jd-lora"}  # the hub NAME, as a folder's name
    hub = json.loads(Path(f"{out}.manifest.json").read_text())["run_key"]["hub"]
    assert hub["adapters"][0]["id"] == "org/jd-lora" and hub["model"]["snapshot"].startswith(str(elsewhere))


def test_uncached_hub_id_is_one_line_and_exit_2(tmp_path, hub_cache, run_cli):
    corpus, _ = synth_corpus(tmp_path, n=1)
    for spec in ("Qwen/Qwen2.5-7B-Instruct", "org/tiny@v2", "org/tiny@../../x"):
        result = run_cli(*run_args(corpus, spec, tmp_path / "p.jsonl"))
        lines = result.output.strip().splitlines()
        assert result.exit_code == 2 and len(lines) == 1, result.output
        repo = spec.split("@")[0]
        assert lines[0].startswith(f"error: model '{spec}'") and f"hf download {repo}" in lines[0]
    missing = run_cli(*run_args(corpus, "org/tiny", tmp_path / "p.jsonl", "--adapter", "org/nope"))
    assert missing.exit_code == 2 and "adapter 'org/nope'" in missing.output
    assert not (tmp_path / "p.jsonl").exists()
