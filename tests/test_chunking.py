"""`--on-long chunk`: splitting at sentence and line ends (Chinese and English) with overlap, every chunk's
prompt within the limit and beginning with the same prefix; the merge rules (union after normalisation, the
absent marker, first non-null scalar and its conflicts); the task-file keys and their command-line overrides;
one row per record with the chunks' statuses and raw texts; the chunk prompts equal to those of the chunk
texts run as records of their own (the fast path on a tiny model); a SIGKILLed chunked run resumed, exactly
once per record; and, on the demo model, long postings whose requirements follow a long company description:
chunking recovers what truncation loses."""
from __future__ import annotations

import json
import os
import random
import signal
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from extractor.backends.base import TextEncoder, TokenizerEncoder
from extractor.pipeline.chunks import ChunkSettings, Splitter, pack, units
from extractor.pipeline.merge import Merger
from extractor.datasets.synth import ABSENT
from extractor.tasks.task import load_task
from tests.conftest import REPO, read_jsonl, write_jsonl
from tests.helpers import kill_when_output_grows

EXTRACTOR = [sys.executable, "-m", "extractor"]
DEMO_MODEL = REPO / "eval" / "demo" / "model"
ZH_BOUNDARY = "。；！？，｡．\n"
EN_FILLER = ("We are a leading provider of cloud software. Our offices span three continents! Do you like "
             "building things? Version 3.5 of our platform shipped last year; customers love it.\n")


@pytest.fixture(scope="module")
def task():
    return load_task("jd_requirements")


def _chars(splitter, text, budget, overlap):
    return [text[c.start:c.end] for c in splitter.split(text, budget, overlap)]


def _ends_at_boundary(piece: str) -> bool:
    return piece.endswith("\n") or piece.rstrip(" ")[-1:] in set(ZH_BOUNDARY + ".;!?")


def test_units_cut_after_chinese_and_english_boundaries():
    text = "公司成立于2001年。团队规模30人；薪资10k！要求？本科，硕士\n熟悉python。We hire. Node.js v3.5 is fine! ok"
    parts = units(text)
    assert "".join(parts) == text
    assert parts == ["公司成立于2001年。", "团队规模30人；", "薪资10k！", "要求？", "本科，", "硕士\n", "熟悉python。",
                     "We hire. ", "Node.js v3.5 is fine! ", "ok"]
    assert units("全角：要求！！然后；；再；") == ["全角：要求！！", "然后；；", "再；"]  # full-width ！；


@pytest.mark.parametrize("text, budget, overlap", [
    ("【公司介绍】" + "我们是一家领先的科技公司，专注于人工智能。团队规模300人；薪资优厚！" * 12 + "岗位要求：本科及以上学历，熟悉python。",
     80, 24),
    (EN_FILLER * 6 + "Requirements: a Bachelor degree; fluent in Python.", 120, 50),
])
def test_chunks_end_at_boundaries_overlap_and_cover_the_text(text, budget, overlap):
    splitter = Splitter(TextEncoder())  # tokens are characters here
    chunks = splitter.split(text, budget, overlap)
    assert len(chunks) >= 3 and chunks[0].start == 0 and chunks[-1].end == len(text)
    for a, b in zip(chunks, chunks[1:]):
        assert a.start < b.start < a.end  # in order and overlapping (every sentence is within the overlap)
        assert a.end - b.start <= overlap
    for c in chunks:
        assert c.end - c.start <= budget
        assert c.end == len(text) or _ends_at_boundary(text[c.start:c.end])


def test_a_sentence_longer_than_a_chunk_is_cut_by_tokens_at_spaces():
    splitter = Splitter(TextEncoder())
    text = "word " * 100 + "end."
    pieces = _chars(splitter, text, 42, 8)
    assert "".join(pieces) == text  # no overlap between pieces of one cut sentence, nothing lost
    assert all(len(p) <= 42 and (p.endswith(" ") or p is pieces[-1]) for p in pieces)


@settings(max_examples=200, deadline=None)
@given(counts=st.lists(st.integers(1, 30), min_size=1, max_size=60), budget=st.integers(30, 90),
       overlap=st.integers(0, 45))
def test_pack_property(counts, budget, overlap):
    chunks = pack(counts, budget, overlap)
    assert chunks[0][0] == 0 and chunks[-1][1] == len(counts)
    for i, j in chunks:
        assert i < j and sum(counts[i:j]) <= budget
    for (i, j), (k, m) in zip(chunks, chunks[1:]):
        assert i < k <= j < m  # progress, no gap
        if k < j:
            assert sum(counts[k:j]) <= overlap


@settings(max_examples=60, deadline=None)
@given(sentences=st.lists(st.tuples(st.text("本科硕士熟悉编程经验优先ab 1", min_size=1, max_size=25),
                                    st.sampled_from(list("。；！？，\n") + [". ", "! ", "; "])),
                          min_size=1, max_size=30),
       budget=st.integers(12, 60))
def test_split_property_covers_text_within_budget(sentences, budget):
    text = "".join(s + p for s, p in sentences)
    splitter = Splitter(TextEncoder())
    chunks = splitter.split(text, budget, budget // 3)
    assert chunks[0].start == 0 and chunks[-1].end == len(text)
    assert all(0 < c.end - c.start <= budget for c in chunks)
    assert all(a.start < b.start <= a.end for a, b in zip(chunks, chunks[1:]))


def _long_records(n: int, filler_sentences: tuple[int, int], seed: int = 0, lang: str = "zh"):
    """Demo-style postings (synth_compose's clauses, or synth's English ones) after a long company
    description: the requirement clauses come last."""
    from extractor.datasets import synth, synth_compose as sc
    rng = random.Random(f"long:{seed}:{lang}")
    records, golds = [], []
    for i in range(n):
        if lang == "zh":
            text, gold = sc.posting(rng, "in")
            filler = "。".join(sc._distractor(rng, "in") for _ in range(rng.randrange(*filler_sentences))) + "。"
            text = "【公司介绍】" + filler + text
        else:
            text, gold = synth.posting(rng, "en")
            text = EN_FILLER * rng.randrange(*filler_sentences) + text
        rid = f"long-{i:03d}"
        records.append({"id": rid, "text": text})
        golds.append({"id": rid, "gold": gold})
    return records, golds


def test_chunk_prompts_fit_the_limit_and_share_the_prefix(tiny_model, task):
    from transformers import AutoTokenizer

    from extractor.pipeline.preflight import TokenizerView
    from extractor.pipeline.predictor import Predictor
    from extractor.backends.base import GenParams
    view = TokenizerView(str(tiny_model))
    predictor = Predictor(task, view, GenParams(max_new_tokens=16), on_long="chunk", max_input_tokens=400,
                          chunking=ChunkSettings(None, 32))
    records, _ = _long_records(3, (30, 40))
    en, _ = _long_records(2, (8, 10), lang="en")
    records += en
    for r in records:
        r["values"], r["row"] = {"text": r["text"]}, r
    rendered = predictor.render(records)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    prefix = os.path.commonprefix(predictor.probes())
    assert "请从下面的JD中提取" in prefix
    for i, record in enumerate(records):
        prompts, ids = rendered.prompts[i], rendered.ids[i]
        assert len(prompts) >= 2 and len(rendered.chunks[i]) == len(prompts)
        for prompt, chunk_ids in zip(prompts, ids):
            assert len(chunk_ids) <= 400 and chunk_ids == TokenizerEncoder(tokenizer).encode_batch([prompt])[0]
            assert prompt.startswith(prefix)
        head = os.path.commonprefix([list(x) for x in ids])  # the shared prefix's tokens, identical in every chunk
        assert len(head) >= len(tokenizer(prefix, add_special_tokens=False)["input_ids"]) - 2
        chunks = rendered.chunks[i]
        assert all(a.start < b.start <= a.end for a, b in zip(chunks, chunks[1:]))  # in order, no gap
        assert chunks[-1].end == len(record["text"])


# ---- merge rules -------------------------------------------------------------------------------------------

values = st.sampled_from(["本科", " 本科", "Python", "python", "PYTHON ", "ｐｙｔｈｏｎ", "go", "c++", ABSENT, "硕士"])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(values, max_size=5), min_size=1, max_size=5))
def test_merge_arrays_union_in_order_dedup_after_normalisation(task, arrays):
    merger = Merger(task)
    merged, conflicts = merger.merge([{"编程语言": a} for a in arrays])
    out = merged["编程语言"]
    found = [v for a in arrays for v in a if merger.norm(v) != merger.absent]
    expect, seen = [], set()
    for v in found:  # first appearance of each normalised value, in chunk order
        if merger.norm(v) not in seen:
            seen.add(merger.norm(v))
            expect.append(v)
    if found:
        assert out == expect and ABSENT not in out
    else:  # no chunk found a value: the absent marker stays where a chunk gave it
        assert out == ([ABSENT] if any(ABSENT in a for a in arrays) else [])
    assert conflicts == {}


scalars = st.one_of(st.none(), st.sampled_from(["Berlin", "berlin ", "Paris", ABSENT]), st.integers(0, 3))


@settings(max_examples=300, deadline=None)
@given(st.lists(scalars, min_size=1, max_size=6))
def test_merge_scalars_first_non_null_and_conflicts(task, chunk_values):
    merger = Merger(task)
    merged, conflicts = merger.merge([{"city": v} for v in chunk_values])
    real = [v for v in chunk_values if v is not None and not (isinstance(v, str) and merger.norm(v) == merger.absent)]
    if not real:
        assert merged["city"] == (ABSENT if ABSENT in chunk_values else None) and conflicts == {}
        return
    assert merged["city"] == real[0]
    distinct, seen = [], set()  # the first value of each key, in chunk order
    for v in real:
        if merger.key(v) not in seen:
            seen.add(merger.key(v))
            distinct.append(v)
    assert conflicts == ({"city": distinct} if len(distinct) > 1 else {})


def test_merge_objects_key_by_key_and_missing_keys(task):
    merger = Merger(task)
    merged, conflicts = merger.merge([{"a": {"x": ["1"], "y": "p"}}, {"a": {"x": ["2", "1"], "y": "q"}, "b": True},
                                      {"b": False}])
    assert merged == {"a": {"x": ["1", "2"], "y": "p"}, "b": True}
    assert conflicts == {"a.y": ["p", "q"], "b": [True, False]}


# ---- runs through the CLI ----------------------------------------------------------------------------------

def _corpus(tmp_path, n=6, filler=(30, 40), lang="zh", seed=0):
    records, golds = _long_records(n, filler, seed, lang)
    records.append({"id": "short", "text": "本科及以上学历，熟悉python。"})
    golds.append({"id": "short", "gold": {"学历要求": ["本科"], "专业要求": [ABSENT], "工作年限要求": [ABSENT],
                                          "编程语言": ["python"], "加分项": [ABSENT]}})
    return write_jsonl(tmp_path / "c.jsonl", records), write_jsonl(tmp_path / "g.jsonl", golds), records, golds


def _echo(corpus, gold, out, *extra):
    return ["run", corpus, "--task", "jd_requirements", "--backend", "echo", "--model", gold, "--out", out,
            "--few-shot", "0", "--max-input-tokens", "300", "--quiet", *extra]


def test_echo_chunked_run_one_row_per_record(tmp_path, run_cli):
    corpus, gold, records, golds = _corpus(tmp_path)
    out = tmp_path / "p.jsonl"
    result = run_cli(*_echo(corpus, gold, out, "--on-long", "chunk"))
    assert result.exit_code == 0, result.stderr
    rows = read_jsonl(out)
    assert [r["id"] for r in rows] == [r["id"] for r in records]
    by_gold = {g["id"]: g["gold"] for g in golds}
    for row, record in zip(rows, records):
        assert row["prediction"] == by_gold[row["id"]] and row["status"] == "ok"  # echo: gold from every chunk
        if row["id"] == "short":
            assert "chunks" not in row
            continue
        assert row["chunks"] >= 2 and row["chunk_statuses"] == ["ok"] * row["chunks"]
        assert len(row["chunk_raw"]) == row["chunks"] and row["chunk_conflicts"] == {}
        assert json.loads(row["raw"]) == row["prediction"]  # eval --reparse judges what was scored
        for spans in row["spans"].values():  # grounded in the whole record's text
            for s in spans:
                assert s["start"] is None or record["text"][s["start"]:s["end"]] == s["value"]
    summary = json.loads((tmp_path / "p.jsonl.manifest.json").read_text())
    assert summary["run_key"]["on_long"] == "chunk" and summary["run_key"]["chunking"] == {"tokens": None,
                                                                                            "overlap": 64}
    chunked = summary["summary"]["chunked"]
    assert chunked["records"] == len(records) - 1 and chunked["requests"] == sum(r.get("chunks", 0) for r in rows)
    ev = run_cli("eval", out, "--gold", gold, "--task", "jd_requirements", "--json", "--quiet", "--reparse",
                 "--metrics", tmp_path / "m.json")
    assert ev.exit_code == 0 and json.loads(ev.stdout)["micro"]["f1"] == 1.0  # scoring unchanged


def test_task_file_keys_and_command_line_overrides(tmp_path, run_cli, user_tasks):
    corpus, gold, records, _ = _corpus(tmp_path, n=3)
    spec = user_tasks / "prompts" / "mytask.yaml"
    spec.write_text(spec.read_text(encoding="utf-8") + "on_long: chunk\nchunk_tokens: 120\nchunk_overlap: 16\n",
                    encoding="utf-8")
    base = ["run", corpus, "--task", "mytask", "--tasks-dir", user_tasks, "--backend", "echo", "--model", gold,
            "--few-shot", "0", "--max-input-tokens", "300", "--quiet"]
    assert run_cli(*base, "--out", tmp_path / "a.jsonl").exit_code == 0
    a = {r["id"]: r for r in read_jsonl(tmp_path / "a.jsonl")}
    assert run_cli(*base, "--out", tmp_path / "b.jsonl", "--chunk-tokens", "60", "--chunk-overlap", "0").exit_code == 0
    b = {r["id"]: r for r in read_jsonl(tmp_path / "b.jsonl")}
    long_ids = [r["id"] for r in records if r["id"] != "short"]
    assert all(b[i]["chunks"] > a[i]["chunks"] >= 3 for i in long_ids)
    assert run_cli(*base, "--out", tmp_path / "t.jsonl", "--on-long", "truncate").exit_code == 0
    assert all(r.get("input_truncated") and "chunks" not in r for r in read_jsonl(tmp_path / "t.jsonl")
               if r["id"] != "short")
    # the resume key holds the chunk settings: other ones are refused
    refused = run_cli(*base, "--out", tmp_path / "a.jsonl", "--resume", "--chunk-overlap", "8")
    assert refused.exit_code == 2 and "chunking.overlap" in refused.stderr and "Traceback" not in refused.stderr
    too_big = run_cli(*base, "--out", tmp_path / "d.jsonl", "--chunk-tokens", "5000")
    assert too_big.exit_code == 2 and "chunk_tokens 5000 does not fit the limit 300" in too_big.stderr
    assert not (tmp_path / "d.jsonl").exists()


@pytest.mark.parametrize("extra, expect", [
    ("on_long: split\n", "key 'on_long'"),
    ("chunk_tokens: 0\n", "key 'chunk_tokens'"),
    ("chunk_tokens: 100\nchunk_overlap: 100\n", "chunk_overlap (100) must be less than chunk_tokens (100)"),
    ("chunk_overlap: -1\n", "key 'chunk_overlap'"),
    ("chunk_size: 100\n", "unknown key 'chunk_size'; did you mean 'chunk_tokens'?"),
])
def test_bad_chunk_keys_in_the_task_file(tmp_path, run_cli, user_tasks, extra, expect):
    corpus, gold, _, _ = _corpus(tmp_path, n=1)
    spec = user_tasks / "prompts" / "mytask.yaml"
    spec.write_text(spec.read_text(encoding="utf-8") + extra, encoding="utf-8")
    result = run_cli("run", corpus, "--task", "mytask", "--tasks-dir", user_tasks, "--backend", "echo", "--model",
                     gold, "--out", tmp_path / "p.jsonl", "--quiet")
    assert result.exit_code == 2 and expect in result.stderr and "mytask.yaml" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "p.jsonl").exists()


@pytest.mark.parametrize("extra, expect", [
    (["--chunk-tokens", "100"], "--chunk-tokens applies to --on-long chunk only"),
    (["--on-long", "skip", "--chunk-overlap", "3"], "--chunk-overlap applies to --on-long chunk only"),
    (["--on-long", "chunk", "--chunk-tokens", "50", "--chunk-overlap", "50"], "--chunk-overlap 50 must be less"),
])
def test_bad_chunk_options(tmp_path, run_cli, extra, expect):
    corpus, gold, _, _ = _corpus(tmp_path, n=1)
    result = run_cli(*_echo(corpus, gold, tmp_path / "p.jsonl", *extra))
    assert result.exit_code == 2 and expect in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "p.jsonl").exists()


def test_print_prompt_shows_every_chunk(tmp_path, run_cli):
    corpus, gold, records, _ = _corpus(tmp_path, n=1)
    result = run_cli(*_echo(corpus, gold, tmp_path / "p.jsonl", "--on-long", "chunk", "--print-prompt", "long-000"))
    assert result.exit_code == 0 and not (tmp_path / "p.jsonl").exists()
    k = result.stdout.count("Instruction: ")
    assert k >= 2 and f"split into {k} chunks (--on-long chunk, overlap 64)" in result.stderr
    assert f"chunk {k} of {k}, text[" in result.stderr
    assert records[0]["text"][-20:] in result.stdout  # the last chunk holds the end of the text


def test_fast_path_chunks_are_the_chunk_texts_own_prompts(tmp_path, tiny_model, run_cli):
    """Each chunk is an ordinary request with the task's template: its raw output is exactly what the chunk's
    text gets when run as a record of its own (tiny model, fast path on CPU, greedy)."""
    from extractor.pipeline.chunks import Splitter
    records, _ = _long_records(3, (12, 16))
    corpus = write_jsonl(tmp_path / "c.jsonl", records)
    args = ["--task", "jd_requirements", "--model", tiny_model, "--max-new-tokens", "8", "--quiet", "--fast", "on",
            "--device", "cpu", "--batch-size", "3", "--few-shot", "0"]
    out = tmp_path / "p.jsonl"
    result = run_cli("run", corpus, "--out", out, "--on-long", "chunk", "--max-input-tokens", "260", *args)
    assert result.exit_code == 0, result.stderr
    rows = read_jsonl(out)
    manifest = json.loads((tmp_path / "p.jsonl.manifest.json").read_text())
    assert manifest["summary"]["decoder"] == {"fast": len(records)}
    singles, expected = [], []
    from extractor.pipeline.preflight import TokenizerView
    from extractor.pipeline.predictor import Predictor
    from extractor.backends.base import GenParams
    predictor = Predictor(load_task("jd_requirements"), TokenizerView(str(tiny_model)), GenParams(8),
                          on_long="chunk", max_input_tokens=260, few_shot=0)
    for row, record in zip(rows, records):
        assert row["chunks"] >= 2
        rec = {"id": record["id"], "values": {"text": record["text"]}, "row": record}
        chunks, _ = predictor.chunker.chunks(rec)
        assert len(chunks) == row["chunks"]
        for k, c in enumerate(chunks):
            singles.append({"id": f"{record['id']}#{k}", "text": record["text"][c.start:c.end]})
            expected.append(row["chunk_raw"][k])
    write_jsonl(tmp_path / "singles.jsonl", singles)
    result = run_cli("run", tmp_path / "singles.jsonl", "--out", tmp_path / "s.jsonl", "--max-input-tokens", "260",
                     *args)
    assert result.exit_code == 0, result.stderr
    assert [r["raw"] for r in read_jsonl(tmp_path / "s.jsonl")] == expected


@pytest.mark.timeout(300)
def test_sigkill_chunked_run_then_resume_is_exactly_once(tmp_path, tiny_model, run_cli, warm):
    """Chunks of a record are decoded in different steps (batch size 2, three or more chunks a record), so
    kills land between a record's chunks; every record ends up written once, with the rows an
    uninterrupted run writes. The killed runs are real processes (warm starts: forked after the imports)."""
    records, _ = _long_records(10, (16, 22), seed=3)
    corpus = write_jsonl(tmp_path / "c.jsonl", records)

    def cmd(out, *extra):
        return EXTRACTOR + ["run", corpus, "--task", "jd_requirements", "--model", tiny_model, "--out", out,
                            "--max-new-tokens", "8", "--quiet", "--fast", "on", "--device", "cpu", "--few-shot", "0",
                            "--on-long", "chunk", "--max-input-tokens", "260", "--window", "1", "--batch-size", "2",
                            *extra]
    ref = tmp_path / "ref.jsonl"
    assert run_cli(*cmd(ref)[len(EXTRACTOR):]).exit_code == 0  # the uninterrupted run, in process
    out = tmp_path / "killed.jsonl"
    rng = random.Random(5)
    kills = attempts = 0
    while kills < 3 and attempts < 6:  # a run that finished before its kill does not count
        attempts += 1
        kills += kill_when_output_grows(cmd(out, "--resume"), out, rng, None, settle=0.2, warm=warm) == -signal.SIGKILL
    code, err = warm.run(cmd(out, "--resume"))
    assert code == 0, err
    assert kills >= 2
    got = read_jsonl(out)
    ids = [r["id"] for r in got]
    assert sorted(ids) == sorted(r["id"] for r in records) and len(ids) == len(set(ids))
    want = {r["id"]: r for r in read_jsonl(ref)}
    assert all(r["chunks"] >= 2 for r in want.values()) and sum(r["chunks"] >= 3 for r in want.values()) >= 5
    assert {r["id"]: r for r in got} == want


def _micro(run_cli, preds: Path, gold: Path, tmp_path: Path) -> dict:
    result = run_cli("eval", preds, "--gold", gold, "--task", "jd_requirements", "--json", "--quiet", "--metrics",
                     tmp_path / f"{preds.stem}.metrics.json")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)["micro"]


@pytest.mark.timeout(300)
def test_demo_model_chunk_recovers_what_truncate_loses(tmp_path, run_cli):
    """Requirements after a long company description: truncation cuts them off, chunks bring them back
    (bench/bench_chunking.py measures the same on more records)."""
    records, golds = _long_records(8, (30, 40))
    corpus, gold = write_jsonl(tmp_path / "c.jsonl", records), write_jsonl(tmp_path / "g.jsonl", golds)
    micro = {}
    for policy in ("truncate", "chunk"):
        out = tmp_path / f"{policy}.jsonl"
        result = run_cli("run", corpus, "--task", "jd_requirements", "--model", DEMO_MODEL, "--out", out,
                         "--few-shot", "0", "--constrained", "--fast", "on", "--device", "cpu", "--quiet",
                         "--on-long", policy)
        assert result.exit_code == 0, result.stderr
        micro[policy] = _micro(run_cli, out, gold, tmp_path)
    assert micro["chunk"]["recall"] >= micro["truncate"]["recall"] + 0.4
    assert micro["chunk"]["f1"] >= micro["truncate"]["f1"] + 0.3
