"""The fast path's scheduler alone (no model, no device): its decisions are plain data, so each is checked here
as data; tests/test_fast.py checks the decoder that executes them against `generate`."""
import numpy as np
import pytest

from extractor.backends.fast.scheduler import Scheduler, chunk_size

EOS = 2


def _scheduler(items, slots=4, refill=2, unique_len=64, prefill_tokens=32768, groups=None, lookahead=None):
    return Scheduler(iter(items), slots, unique_len, prefill_tokens, np.array([EOS]), groups, refill,
                     lookahead or 2 * slots)


def _admit(scheduler, first=7):
    """Take every chunk the scheduler admits now, each record's first token `first`; returns the chunks."""
    chunks = scheduler.admissions()
    for chunk in chunks:
        scheduler.take(chunk, np.full(len(chunk.items), first))
    return chunks


def test_admission_waits_for_refill_slots_and_takes_records_in_arrival_order():
    items = [(k, [5] * (10 - k), 8) for k in range(7)]
    s = _scheduler(items)
    s.top_up()
    first = _admit(s)
    assert sorted(k for c in first for k in c.keys) == [0, 1, 2, 3]
    assert [len(x) for c in first for x in c.suffixes] == [7, 8, 9, 10]  # prefilled shortest first
    assert sorted(np.concatenate([c.slots for c in first]).tolist()) == [0, 1, 2, 3]
    assert _admit(s) == []  # no slot free
    step = s.decode_step()
    booked = s.book(step, np.where(step.rows == 1, EOS, 9))  # one record stops: one free slot, under refill=2
    assert list(s.finish(booked)) == [(2, [7, EOS], "stop")]  # slot 1: the second shortest
    assert _admit(s) == []
    step = s.decode_step()
    assert step.rows.tolist() == [0, 2, 3]
    assert list(s.finish(s.book(step, np.where(step.rows == 3, EOS, 9)))) == [(0, [7, 9, EOS], "stop")]
    assert sorted(k for c in _admit(s) for k in c.keys) == [4, 5]  # first come first served


def test_every_record_is_admitted_once_in_chunks_within_the_token_budget():
    rng = np.random.default_rng(0)
    items = [(k, [5] * int(rng.integers(1, 40)), 4) for k in range(50)]
    s = _scheduler(items, slots=64, prefill_tokens=96)
    s.top_up()
    chunks = _admit(s)
    assert sorted(k for c in chunks for k in c.keys) == list(range(50))
    for chunk in chunks:
        lengths = [len(x) for x in chunk.suffixes]
        assert lengths == sorted(lengths)
        assert len(lengths) == 1 or max(lengths) * len(lengths) <= 96


@pytest.mark.parametrize("lengths,budget,want", [([10] * 20, 100, 10), ([5], 8, 1), ([50, 60], 100, 1),
                                                 ([1] * 10 + [40] * 3, 400, 10), ([50, 50, 50, 60], 400, 3)])
def test_chunk_size(lengths, budget, want):
    assert chunk_size(lengths, budget) == want


def test_a_row_decodes_until_its_budget_and_finishes_on_length():
    s = _scheduler([("a", [5, 6], 3)])
    s.top_up()
    _admit(s)
    steps = [s.decode_step(), s.decode_step(), s.decode_step()]
    assert steps[2] is None  # the first token came with the prefill: two decode steps make three tokens
    assert [step.own.tolist() for step in steps[:2]] == [[2], [3]]
    for step, token in zip(steps[:2], (8, 9)):
        booked = s.book(step, np.array([token]))
        done = list(s.finish(booked))
    assert done == [("a", [7, 8, 9], "length")] and s.exhausted and s.idle()


def test_a_token_for_a_refilled_slot_is_dropped():
    """One step ahead: the row's next step is launched before the token that stops it is read; by the time
    that next step's token comes back, the slot holds another record, which must not get it."""
    s = _scheduler([("a", [5], 9), ("b", [6], 9)], slots=1, refill=1)
    s.top_up()
    _admit(s)
    ran, in_flight = s.decode_step(), s.decode_step()
    assert list(s.finish(s.book(ran, np.array([EOS])))) == [("a", [7, EOS], "stop")]
    assert [c.keys for c in _admit(s, first=11)] == [["b"]]
    assert s.book(in_flight, np.array([13])).tolist() == []
    assert s.st.out[0, : s.st.count[0]].tolist() == [11]


@pytest.mark.parametrize("item,groups,message", [
    (("r", [5] * 60, 10), None, "60 tokens plus a budget of 10 exceed the decoder's unique_len 64"),
    (("r", [5], 4), 3, "a decoder with 3 adapter groups takes (key, suffix, budget, group) items"),
    (("r", [5], 4, 3), 3, "a decoder with 3 adapter groups"),
])
def test_a_record_that_does_not_fit_is_refused_by_name(item, groups, message):
    s = _scheduler([item], groups=groups)
    with pytest.raises(ValueError, match=r"^record r: ") as err:
        s.top_up()
    assert message in str(err.value)
