"""The demo's compositional corpus: held-out values and clause phrasings never occur in training, every
value is copied verbatim from its posting, and the same seed gives the same corpus."""
import pytest

from extractor.datasets.synth import ABSENT, FIELDS
from extractor.datasets.synth_compose import cue_pools, generate, value_pools


def test_pools_are_large_and_the_splits_disjoint():
    for fld in FIELDS:
        values, cues = value_pools()[fld], cue_pools()[fld]
        assert not set(values["in"]) & set(values["heldout"]) and not set(cues["in"]) & set(cues["heldout"])
        assert len(values["in"]) >= 60 and len(values["heldout"]) >= 20 and len(cues["heldout"]) >= 10
    assert len(value_pools()["编程语言"]["in"]) > 400  # copying, not memorising, is what pays


def test_heldout_postings_use_only_heldout_values_and_values_are_verbatim():
    seen_in = {fld: set() for fld in FIELDS}
    for _, gold in generate(2000, seed=1, split="in"):
        for fld, vals in gold["gold"].items():
            seen_in[fld].update(vals)
    for rec, gold in generate(300, seed=4, split="heldout"):
        for fld, vals in gold["gold"].items():
            for v in vals:
                assert v == ABSENT or (v in rec["text"] and v.lower() not in {s.lower() for s in seen_in[fld]})


def test_same_seed_same_corpus_and_bad_split():
    assert list(generate(20, seed=7)) == list(generate(20, seed=7)) != list(generate(20, seed=8))
    with pytest.raises(ValueError):
        list(generate(1, split="all"))
