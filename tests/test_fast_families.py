"""Every model family on the fast path's list decodes exactly what the model computes: fp32 greedy outputs
of the fast path token for token equal to the plain path, through `extractor run` (constrained and not, with
slot refills) and through FastDecoder directly (shared prefix, refills, per-record budgets). A model type off
the list, and a failure inside the fast path, go the plain way or stop in one line — never a traceback."""
import json

import pytest
import torch

from extractor.backends.fast.families import FAMILIES
from tests.conftest import read_jsonl, synth_corpus
from tests.families import OVERRIDES, build_family_model

assert set(OVERRIDES) == set(FAMILIES), "every family on the list has a test config"


@pytest.fixture(scope="module")
def family_dir(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    built = {}

    def get(model_type):
        if model_type not in built:
            built[model_type] = build_family_model(tiny_model, model_type, root / model_type)
        return built[model_type]
    return get


def _run(run_cli, corpus, model, out, fast, *extra, tokens=20):
    return run_cli("run", corpus, "--task", "jd_requirements", "--model", model, "--out", out, "--fast", fast,
                   "--batch-size", "3", "--max-new-tokens", tokens, "--few-shot", "1", "--quiet", *extra)


def _summary(out):
    return json.loads(out.with_name(out.name + ".manifest.json").read_text())["summary"]


@pytest.mark.parametrize("constrained", [False, True], ids=["free", "constrained"])
@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_run_fast_equals_plain(tmp_path, family_dir, run_cli, model_type, constrained):
    corpus, _ = synth_corpus(tmp_path, n=7)
    model = family_dir(model_type)
    extra = ["--constrained"] if constrained else []
    raws = {}
    for fast in ("off", "on"):
        out = tmp_path / f"{fast}.jsonl"
        result = _run(run_cli, corpus, model, out, fast, *extra, tokens=56 if constrained else 20)
        assert result.exit_code == 0, result.output
        raws[fast] = [(r["id"], r["raw"], r["output_tokens"]) for r in read_jsonl(out)]
        assert _summary(out)["decoder"] == {"fast" if fast == "on" else "plain": 7}
    assert raws["on"] == raws["off"]
    assert len({raw for _, raw, _ in raws["off"]}) > 1, "the random model must not emit one output for all"


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_decoder_equals_generate(family_dir, model_type):
    """Shared prefix, three slots refilled two at a time, a budget per record: each output equals the
    model's own `generate`."""
    from transformers import AutoModelForCausalLM

    from tests.helpers import assert_decoder_equals_generate
    model = AutoModelForCausalLM.from_pretrained(family_dir(model_type), dtype=torch.float32).eval()
    assert_decoder_equals_generate(model, seed=1, prefix_len=30, records=7, suffix_len=(2, 30), budget=(1, 20),
                                   slots=3, unique_len=64, refill=2, eos_ids=[model.config.eos_token_id])


@pytest.fixture(scope="module")
def unlisted_model(tiny_model, tmp_path_factory):
    """A real model type that is not on the list (GPT-NeoX)."""
    import shutil
    from pathlib import Path

    from transformers import AutoModelForCausalLM, AutoTokenizer, GPTNeoXConfig
    tok = AutoTokenizer.from_pretrained(tiny_model)
    config = GPTNeoXConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=96, initializer_range=0.2, eos_token_id=tok.eos_token_id,
                           bos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    out = tmp_path_factory.mktemp("unlisted") / "neox"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    for f in Path(tiny_model).iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, out / f.name)
    return out


def test_unlisted_model_type_goes_plain_and_says_why(tmp_path, unlisted_model, run_cli):
    corpus, _ = synth_corpus(tmp_path, n=4)
    out = tmp_path / "auto.jsonl"
    result = _run(run_cli, corpus, unlisted_model, out, "auto")
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("fast path:")]
    assert lines == ["fast path: model type 'gpt_neox' is not on the fast path's list "
                     f"({', '.join(sorted(FAMILIES))}); decoding with plain generate"]
    summary = _summary(out)
    assert summary["decoder"] == {"plain": 4} and "gpt_neox" in summary["decoder_reason"]
    refused = _run(run_cli, corpus, unlisted_model, tmp_path / "on.jsonl", "on")
    assert refused.exit_code == 2 and "Traceback" not in refused.output
    assert "--fast on: model type 'gpt_neox' is not on the fast path's list" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1


def test_failure_before_any_record_falls_back(tmp_path, family_dir, run_cli, monkeypatch):
    """A fault injected into the fast path's attention at its first prefill: auto decodes every record the
    plain way (same outputs as --fast off) and records why; --fast on stops in one line, exit 2."""
    from extractor.backends import fast
    corpus, _ = synth_corpus(tmp_path, n=5)
    model = family_dir("llama")
    assert _run(run_cli, corpus, model, tmp_path / "off.jsonl", "off").exit_code == 0
    original = fast.FastDecoder._attend

    def faulty(self, layer, *args):
        if self._mode.get("kind") == "decode" and self.prefix:
            raise RuntimeError("injected kernel fault")
        return original(self, layer, *args)
    monkeypatch.setattr(fast.FastDecoder, "_attend", faulty)
    result = _run(run_cli, corpus, model, tmp_path / "auto.jsonl", "auto")
    assert result.exit_code == 0, result.output
    assert "fast path: the fast path failed (RuntimeError: injected kernel fault); decoding with plain generate" \
        in result.stderr
    assert read_jsonl(tmp_path / "auto.jsonl") == read_jsonl(tmp_path / "off.jsonl")
    assert _summary(tmp_path / "auto.jsonl")["decoder"] == {"plain": 5}
    stopped = _run(run_cli, corpus, model, tmp_path / "on.jsonl", "on")
    assert stopped.exit_code == 2 and "Traceback" not in stopped.output
    assert "injected kernel fault" in stopped.stderr and len(stopped.stderr.strip().splitlines()) == 1


def test_failure_after_records_stops_resumable(tmp_path, family_dir, run_cli, monkeypatch):
    """A fault after the first records are out: one line, exit 2, what was written kept; --resume --fast off
    then gives every id exactly once, equal to a plain run."""
    from extractor.backends import fast
    corpus, _ = synth_corpus(tmp_path, n=12)
    model = family_dir("qwen3")
    assert _run(run_cli, corpus, model, tmp_path / "off.jsonl", "off", "--window", "2").exit_code == 0
    original = fast.FastDecoder._finished
    seen = {"n": 0}

    def faulty(self, *args):
        for item in original(self, *args):
            seen["n"] += 1
            if seen["n"] > 6:
                raise RuntimeError("injected fault after six records")
            yield item
    monkeypatch.setattr(fast.FastDecoder, "_finished", faulty)
    out = tmp_path / "auto.jsonl"
    stopped = _run(run_cli, corpus, model, out, "auto", "--window", "2")
    assert stopped.exit_code == 2 and "Traceback" not in stopped.output
    assert "after 6 records" in stopped.stderr and "--resume --fast off" in stopped.stderr
    assert 0 < len(read_jsonl(out)) <= 6
    monkeypatch.setattr(fast.FastDecoder, "_finished", original)
    resumed = _run(run_cli, corpus, model, out, "off", "--window", "2", "--resume")
    assert resumed.exit_code == 0, resumed.output
    rows = read_jsonl(out)
    assert sorted(r["id"] for r in rows) == sorted(r["id"] for r in read_jsonl(tmp_path / "off.jsonl"))
    by_id = {r["id"]: r["raw"] for r in read_jsonl(tmp_path / "off.jsonl")}
    assert all(by_id[r["id"]] == r["raw"] for r in rows)
