import gzip
import json

import polars as pl
import pytest
from hypothesis import given, settings, strategies as st

from extractor.store.corpus import CorpusReader
from extractor.store.records import seed_passage
from extractor.store.rejects import RejectsWriter
from extractor.errors import InputError
from extractor.store.writers import JsonlAppender, drop_partial_tail, iter_rows, jsonl_to_parquet
from tests.conftest import read_jsonl, shared_path, write_jsonl


def records(path, **kw):
    return [r for batch in CorpusReader(path, **kw) for r in batch]


def test_jsonl_gz_parquet_csv_agree(tmp_path):
    rows = [{"id": f"r{i}", "text": f"文本 {i}", "extra": i} for i in range(10)]
    write_jsonl(tmp_path / "c.jsonl", rows)
    with gzip.open(tmp_path / "c.jsonl.gz", "wt", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    pl.DataFrame(rows).write_parquet(tmp_path / "c.parquet")
    pl.DataFrame(rows).write_csv(tmp_path / "c.csv")
    seen = []
    for name in ("c.jsonl", "c.jsonl.gz", "c.parquet", "c.csv"):
        got = records(tmp_path / name, batch_size=3)
        seen.append([(r["id"], r["values"]["text"]) for r in got])
    assert all(s == seen[0] for s in seen) and len(seen[0]) == 10


def test_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"id": "a", "text": "x"}\n{"id": "b", "text": \n', encoding="utf-8")
    with pytest.raises(InputError, match=r"c\.jsonl:2: malformed JSON.*--on-bad-record skip"):
        records(path)


@pytest.mark.parametrize("line,reason", [
    ('{"id": "b"}', "missing field 'text'"),
    ('{"id": "b", "text": 5}', "must be a string"),
    ('[1, 2]', "expected a JSON object"),
    ('{"id": "a", "text": "dup"}', "duplicate id 'a'"),
])
def test_bad_records_skip_to_rejects(tmp_path, line, reason):
    path = tmp_path / "c.jsonl"
    path.write_text('{"id": "a", "text": "x"}\n' + line + '\n{"id": "c", "text": "y"}\n', encoding="utf-8")
    with pytest.raises(InputError, match=f"c.jsonl:2.*{reason}"):
        records(path)
    rejects = RejectsWriter(tmp_path / "rejects.jsonl")
    reader = CorpusReader(path, on_bad="skip", rejects=rejects)
    got = [r["id"] for b in reader for r in b]
    rejects.close()
    assert got == ["a", "c"] and reader.stats.rejected == 1
    (bad,) = read_jsonl(tmp_path / "rejects.jsonl")
    assert bad["line"] == 2 and reason in bad["reason"]


def test_invalid_utf8(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_bytes(b'{"id": "a", "text": "x"}\n{"id": "b", "text": "\xff\xfe"}\n')
    with pytest.raises(InputError, match="c.jsonl:2: invalid UTF-8"):
        records(path)


def test_truncated_gzip(tmp_path):
    data = gzip.compress(b"".join(b'{"text": "line %d"}\n' % i for i in range(2000)))
    path = tmp_path / "c.jsonl.gz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="truncated or corrupt"):
        records(path)


def test_parquet_without_text_column(tmp_path):
    path = tmp_path / "c.parquet"
    pl.DataFrame({"id": ["a"], "body": ["x"]}).write_parquet(path)
    with pytest.raises(InputError, match=r"c\.parquet:1.*missing field 'text'.*--text-field"):
        records(path)
    assert records(path, text_field="body")[0]["values"] == {"text": "x"}


def test_ids_default_to_line_numbers(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b"}\n', encoding="utf-8")
    assert [r["id"] for r in records(path)] == ["1", "3"]


def test_seed_context_lines_are_accepted():
    path = shared_path("data", "seed_mixed", "mixed_dev_dataset.jsonl")
    got = records(path)
    assert len(got) == 122
    assert got[0]["values"]["text"].startswith("花样男子") and got[0]["id"] == "1"


def test_seed_passage_extraction():
    ctx = "Instruction: 指令\nInput: 问题，输出json：\n\n句子本身。\nAnswer: "
    assert seed_passage(ctx) == "句子本身。"


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(min_size=0, max_size=30), min_size=1, max_size=20))
def test_jsonl_parquet_round_trip(tmp_path_factory, texts):
    tmp = tmp_path_factory.mktemp("rt")
    rows = [{"id": str(i), "prediction": {"t": t}, "raw": t, "status": "ok"} for i, t in enumerate(texts)]
    with JsonlAppender(tmp / "o.jsonl", fsync=False) as out:
        out.write_batch(rows)
    jsonl_to_parquet(tmp / "o.jsonl", tmp / "o.parquet")
    assert [r for _, r in iter_rows(tmp / "o.parquet")] == rows
    assert [r for _, r in iter_rows(tmp / "o.jsonl")] == rows


def test_drop_partial_tail(tmp_path):
    path = tmp_path / "o.jsonl"
    path.write_bytes(b'{"id": 1}\n{"id": 2}\n{"id": 3, "te')
    assert drop_partial_tail(path) == len(b'{"id": 3, "te')
    assert path.read_bytes() == b'{"id": 1}\n{"id": 2}\n'
    assert drop_partial_tail(path) == 0
