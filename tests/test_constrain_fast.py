"""BatchConstraint's shortcuts (free-string rows, half-character states, skeleton-cached and string-level
closing costs) must not change a single token: the same seeded stand-in model, run with the shortcuts on and
off, gives identical outputs, every one schema-valid."""
import numpy as np
import pytest
import torch

from extractor.constrain import BatchConstraint, Grammar, utf8_missing, utf8_tail
from extractor.outputs import Validator, judge
from extractor.tasks import load_task

VOCAB = 4096 + 904  # the model's head is larger than the tokenizer, as with real checkpoints


@pytest.fixture(scope="module")
def tokenizer():
    from extractor.testing import tokenizer_corpus, train_tokenizer
    return train_tokenizer(tokenizer_corpus(600), vocab_size=4096)


def decode_rows(grammar, rows: int, budget: int, seed: int):
    """Rows in lockstep; each picks its preferred allowed token (a seeded preference, rotated per step)."""
    constraint = BatchConstraint(grammar)
    rng = np.random.default_rng(seed)
    pref = rng.random((rows, VOCAB)).astype(np.float32)
    keys = list(range(rows))
    constraint.start(keys, [budget] * rows)
    out = {k: [] for k in keys}
    reason = {}

    def choose(alive, logits):
        picks = []
        for i, k in enumerate(alive):
            picks.append(int(np.argmax(np.where(logits[i] > -1, pref[k], -2))))
            pref[k] = np.roll(pref[k], 7)
        return picks

    logits = torch.zeros(rows, VOCAB)
    constraint.mask_first(keys, logits, keys)
    alive, last = keys, choose(keys, logits.numpy())
    while alive:
        keep = []
        for k, tok in zip(alive, last):
            if tok in grammar.stop_token_ids:
                reason[k] = "stop"
            else:
                out[k].append(tok)
                if len(out[k]) < budget:
                    keep.append((k, tok))
                    continue
                reason[k] = "length"
            constraint.release(k)
        if not keep:
            break
        alive, last = [k for k, _ in keep], [t for _, t in keep]
        logits = torch.zeros(len(alive), VOCAB)
        constraint.hook(alive, last, alive)(logits)
        last = choose(alive, logits.numpy())
    texts = [b"".join(grammar.token_bytes[t] for t in out[k]).decode("utf-8", "replace") for k in keys]
    return [out[k] for k in keys], texts, [reason[k] for k in keys], constraint.stats


@pytest.mark.parametrize("task", ["jd_requirements", "spo", "skills", "review_topic"])
def test_shortcuts_change_no_token(tokenizer, task):
    schema = load_task(task).schema
    runs = {}
    for shortcuts in (True, False):
        grammar = Grammar(schema, tokenizer, VOCAB, [tokenizer.eos_token_id])
        if not shortcuts:
            grammar.free_strings = grammar.mid_free = grammar.skeleton_exact = False
            grammar._closing_cost_text = lambda *a: None
        runs[shortcuts] = decode_rows(grammar, rows=12, budget=72, seed=3)
    assert runs[True][0] == runs[False][0]
    validator = Validator(schema)
    statuses = [judge(text, why, validator).status for text, why in zip(runs[True][1], runs[True][2])]
    assert statuses == ["ok"] * 12, list(zip(statuses, runs[True][1]))
    if task == "jd_requirements":  # free strings: the shortcuts were taken, not just allowed
        assert runs[True][3]["fast_tokens"] >= 100 and runs[True][3]["fills"] < runs[False][3]["fills"]


def test_utf8_tail():
    assert utf8_tail("学".encode()[:1]) == b"\xe5"
    assert utf8_tail("学".encode()) == b""
    assert utf8_tail(b"ab" + "学".encode()[:2]) == "学".encode()[:2]
    assert utf8_tail(b"\xff") is None
    assert utf8_missing(b"\xe5") == 2 and utf8_missing(b"\xe5\xad") == 1 and utf8_missing(b"") == 0
