"""BatchConstraint's shortcuts (free-string rows, half-character states, skeleton-cached and string-level
closing costs) must not change a single token: the same seeded stand-in model, run with the shortcuts on and
off, gives identical outputs, every one schema-valid."""
import pytest

from extractor.constrain.grammar import Grammar, utf8_missing, utf8_tail
from extractor.results.judge import Validator, judge
from extractor.tasks.task import load_task
from tests.helpers import stand_in_decode

VOCAB = 4096 + 904  # the model's head is larger than the tokenizer, as with real checkpoints


@pytest.fixture(scope="module")
def tokenizer():
    from extractor.datasets.tiny_models import tokenizer_corpus, train_tokenizer
    return train_tokenizer(tokenizer_corpus(600), vocab_size=4096)


@pytest.mark.parametrize("task", ["jd_requirements", "spo", "skills", "review_topic"])
def test_shortcuts_change_no_token(tokenizer, task):
    schema = load_task(task).schema
    runs = {}
    for shortcuts in (True, False):
        grammar = Grammar(schema, tokenizer, VOCAB, [tokenizer.eos_token_id])
        if not shortcuts:
            grammar.free_strings = grammar.mid_free = grammar.skeleton_exact = False
            grammar._closing_cost_text = lambda *a: None
        runs[shortcuts] = stand_in_decode(grammar, rows=12, budget=72, seed=3, width=VOCAB)
    assert runs[True]["tokens"] == runs[False]["tokens"]
    validator = Validator(schema)
    fast = runs[True]
    statuses = [judge(text, why, validator).status for text, why in zip(fast["texts"], fast["reasons"])]
    assert statuses == ["ok"] * 12, list(zip(statuses, fast["texts"]))
    if task == "jd_requirements":  # free strings: the shortcuts were taken, not just allowed
        assert fast["stats"]["fast_tokens"] >= 100 and fast["stats"]["fills"] < runs[False]["stats"]["fills"]


def test_utf8_tail():
    assert utf8_tail("学".encode()[:1]) == b"\xe5"
    assert utf8_tail("学".encode()) == b""
    assert utf8_tail(b"ab" + "学".encode()[:2]) == "学".encode()[:2]
    assert utf8_tail(b"\xff") is None
    assert utf8_missing(b"\xe5") == 2 and utf8_missing(b"\xe5\xad") == 1 and utf8_missing(b"") == 0


def test_when_cost_checks_start_changes_no_token(tokenizer, monkeypatch):
    """Rows spread their first closing-cost checks over STAGGER steps (so a batch does not simulate all its
    costs in one step); a check started early must not change any token."""
    import extractor.constrain.rows as rows
    schema = load_task("jd_requirements").schema
    runs = {}
    for stagger in (1, 24):
        monkeypatch.setattr(rows, "STAGGER", stagger)
        grammar = Grammar(schema, tokenizer, VOCAB, [tokenizer.eos_token_id])
        runs[stagger] = stand_in_decode(grammar, rows=16, budget=72, seed=5, width=VOCAB)
    assert runs[1]["tokens"] == runs[24]["tokens"]
    assert runs[24]["stats"]["cost_checks"] + runs[24]["stats"]["cost_cached"] > 0


def test_closing_cost_cap_is_a_minimum(tokenizer):
    """closing_cost(cap=k) is min(cost, k): the engine caps simulations at the remaining budget, where any
    larger cost means the same thing (close now)."""
    from extractor.constrain.grammar import JsonScanner
    grammar = Grammar(load_task("jd_requirements").schema, tokenizer, VOCAB, [tokenizer.eos_token_id])
    matcher, scanner = grammar.matcher(), JsonScanner()
    for text in ('{"', '学历要求": ["', '本科'):
        assert matcher.accept_string(text)
        scanner.feed(text)
        full = grammar.closing_cost(matcher, scanner)
        assert 0 < full < 512
        for cap in (1, full - 1, full, full + 5):
            if cap >= 1:
                assert grammar.closing_cost(matcher, scanner, cap=cap) == min(full, cap)
