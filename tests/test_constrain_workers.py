"""Grammar work in worker processes (constrain/workers.py): the same tokens as in one process, with refilled
slots and rows finishing at different steps; a killed worker ends the run with one clear error."""
import os
import signal

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from extractor.backends.fast import FastDecoder
from extractor.constrain.batch import BatchConstraint, shard_pool
from extractor.constrain.grammar import Grammar
from extractor.constrain.workers import WorkerError, auto_workers
from extractor.results.judge import Validator, judge
from extractor.tasks.task import load_task


@pytest.fixture(scope="module")
def setup(tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    schema = load_task("jd_requirements").schema
    vocab = model.get_output_embeddings().weight.shape[0]
    grammar = Grammar(schema, tokenizer, vocab, [tokenizer.eos_token_id])
    return model, tokenizer, schema, grammar


def _inputs(tokenizer):
    prefix = tokenizer.encode("Extract the requirements as JSON.\n")
    texts = [f"Posting {i}: needs Python and {i % 4 + 1} years of SQL." for i in range(11)]
    return prefix, [tokenizer.encode(t) for t in texts]


def _decode(model, tokenizer, grammar, workers: int, budget: int = 48):
    prefix, suffixes = _inputs(tokenizer)
    decoder = FastDecoder(model, prefix, slots=4, unique_len=max(map(len, suffixes)) + budget,
                          eos_ids=[tokenizer.eos_token_id])
    constraint = BatchConstraint(grammar, workers=workers)
    budgets = [budget - 3 * (i % 5) for i in range(len(suffixes))]  # rows end at different steps
    got = decoder.generate(suffixes, max_new=budgets, refill=2, constraint=constraint)
    return got, constraint.stats


def test_workers_give_the_same_tokens(setup):
    model, tokenizer, schema, grammar = setup
    alone, _ = _decode(model, tokenizer, grammar, workers=0)
    sharded, stats = _decode(model, tokenizer, grammar, workers=2)
    assert sharded == alone
    assert stats["workers"] == 2 and stats["fills"] > 0 and stats["uploaded_rows"] > 0
    validator = Validator(schema)
    statuses = [judge(tokenizer.decode(t[:-1] if f == "stop" else t, skip_special_tokens=True), f, validator).status
                for t, f in sharded]
    assert statuses == ["ok"] * len(sharded), statuses  # closing mode finished every value in its budget


def test_abandoned_run_leaves_the_pool_clean(setup):
    """A caller that stops reading mid-run leaves answers in the workers' pipes: the next run on the same
    pool drops them and gives the in-process tokens."""
    model, tokenizer, _, grammar = setup
    prefix, suffixes = _inputs(tokenizer)
    decoder = FastDecoder(model, prefix, slots=4, unique_len=max(map(len, suffixes)) + 48,
                          eos_ids=[tokenizer.eos_token_id])
    stream = decoder.stream(((i, s, 10 + 5 * (i % 3)) for i, s in enumerate(suffixes)),
                            constraint=BatchConstraint(grammar, workers=2))
    next(stream)
    stream.close()
    assert sum(shard_pool(grammar, 2).unanswered) > 0  # the case under test: a step's answers never read
    again, _ = _decode(model, tokenizer, grammar, workers=2)
    alone, _ = _decode(model, tokenizer, grammar, workers=0)
    assert again == alone


def test_killed_worker_is_one_clear_error(setup):
    _, _, _, grammar = setup
    constraint = BatchConstraint(grammar, workers=2)
    logits = torch.zeros(4, grammar.vocab_size)
    constraint.start([0, 1, 2, 3], [20] * 4)
    constraint.mask_first([0, 1, 2, 3], logits, [0, 1, 2, 3])
    first = logits.argmax(-1).tolist()
    victim = shard_pool(grammar, 2).procs[1]
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait(timeout=10)
    with pytest.raises(WorkerError) as err:
        constraint.hook([0, 1, 2, 3], first, [0, 1, 2, 3])(torch.zeros(4, grammar.vocab_size))
    message = str(err.value)
    assert "\n" not in message and "grammar worker" in message and "EXTRACTOR_GRAMMAR_WORKERS=0" in message
    assert shard_pool(grammar, 2).procs[1] is not victim  # a broken pool is replaced


def test_worker_count_from_the_environment(monkeypatch):
    monkeypatch.setenv("EXTRACTOR_GRAMMAR_WORKERS", "3")
    assert auto_workers() == 3
    monkeypatch.setenv("EXTRACTOR_GRAMMAR_WORKERS", "four")
    with pytest.raises(WorkerError, match="EXTRACTOR_GRAMMAR_WORKERS='four' is not a whole number"):
        auto_workers()
    monkeypatch.delenv("EXTRACTOR_GRAMMAR_WORKERS")
    cores = os.cpu_count() or 1
    assert auto_workers() == (0 if cores < 8 else min(12, cores - 4))


def test_tables_grow_mid_run(setup):
    """Slots beyond the first table: workers grow their tables and staging areas; masks stay equal to the
    in-process engine's."""
    _, _, _, grammar = setup
    width = grammar.vocab_size
    runs = {}
    for workers in (0, 2):
        constraint = BatchConstraint(grammar, workers=workers)
        seen = []
        for keys, slots in (([0, 1, 2], [0, 1, 2]), ([3, 4], [70, 141])):
            logits = torch.zeros(len(keys), width)
            constraint.start(keys, [30] * len(keys))
            constraint.mask_first(keys, logits, slots)
            seen.append(logits.clone())
        keys, slots = [0, 1, 2, 3, 4], [0, 1, 2, 70, 141]
        tokens = torch.cat(seen).argmax(-1).tolist()
        for _ in range(3):
            logits = torch.randn(len(keys), width, generator=torch.Generator().manual_seed(len(seen)))
            constraint.hook(keys, tokens, slots)(logits)
            seen.append(logits.clone())
            tokens = logits.argmax(-1).tolist()
        runs[workers] = seen
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[2]))


def test_worker_that_cannot_start_is_one_clear_error():
    """A worker that fails while building its grammar reports it; the workers already started are stopped."""
    from extractor.constrain.workers import ShardPool
    with pytest.raises(WorkerError) as err:
        ShardPool(({"type": "object"}, None, 10, []), 2)  # no tokenizer: Grammar() fails in the worker
    assert "\n" not in str(err.value) and "grammar worker failed" in str(err.value)
