"""BatchConstraint's shortcuts (free-string rows, half-character states, skeleton-cached and string-level
closing costs) must not change a single token: the same seeded stand-in model, run with the shortcuts on and
off, gives identical outputs, every one schema-valid."""
import pytest

from extractor.constrain import Grammar, utf8_missing, utf8_tail
from extractor.outputs import Validator, judge
from extractor.tasks import load_task
from extractor.testing import stand_in_decode

VOCAB = 4096 + 904  # the model's head is larger than the tokenizer, as with real checkpoints


@pytest.fixture(scope="module")
def tokenizer():
    from extractor.testing import tokenizer_corpus, train_tokenizer
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
