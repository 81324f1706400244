"""Closing mode finishes a value even where the model would go on forever: inside an unbounded integer whose
object still needs a required key, "}" is not allowed, so closing mode must move on with "," (a model that
loves digits otherwise writes digits until the budget ends: invalid JSON, an integer beyond 64 bits)."""
import pytest

from extractor.constrain.grammar import Grammar
from extractor.results.judge import Validator, judge
from tests.helpers import stand_in_decode

VOCAB = 4096 + 904
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string"},
                                           "c": {"type": "array", "items": {"type": "number"}}},
          "required": ["a", "b", "c"], "additionalProperties": False}


@pytest.fixture(scope="module")
def tokenizer():
    from extractor.datasets.tiny_models import tokenizer_corpus, train_tokenizer
    return train_tokenizer(tokenizer_corpus(600), vocab_size=4096)


@pytest.mark.parametrize("budget", [24, 40, 64])
def test_a_digit_loving_model_still_ends_valid(tokenizer, budget):
    grammar = Grammar(SCHEMA, tokenizer, VOCAB, [tokenizer.eos_token_id])
    digits = [i for i, t in enumerate(grammar.token_texts) if t and t.isdigit()]
    out = stand_in_decode(grammar, rows=6, budget=budget, seed=5, width=VOCAB, prefer=digits)
    validator = Validator(SCHEMA)
    statuses = [judge(text, why, validator).status for text, why in zip(out["texts"], out["reasons"])]
    assert statuses == ["ok"] * 6, list(zip(statuses, out["texts"]))
