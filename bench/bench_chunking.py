"""`--on-long chunk` on CPU: what chunking costs, and what it recovers.

Throughput: N long postings run with `--on-long chunk` (N·k requests: each record split into k chunks, merged
into one row) against the same N·k chunk texts run as records of their own (N·k requests, unchunked): the same
prompts, so the difference is what chunking adds (splitting, pairing a record's chunks, merging). Two
backends: `echo` (answers at once: the pipeline's own cost, where chunking's share is largest) and the demo
model on the hf fast path (a model's cost). Both through `extractor run`'s own path (`benchmark.time_run`).

F1: postings whose requirement clauses come after a long company description (the demo corpus's clauses,
synth_compose, behind 30–40 of its distractor sentences), run on the demo model (eval/demo/model, 512
positions: a prompt limit of 352 tokens at 160 new tokens) with `--on-long truncate` and with `--on-long
chunk`, scored against gold.

    python bench/bench_chunking.py --n-echo 2000 --n-model 48 --n-f1 200
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

DEMO_MODEL = REPO / "eval" / "demo" / "model"


def long_postings(n: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Demo-style postings behind a long company description (the requirements last)."""
    from extractor.datasets import synth_compose as sc
    rng = random.Random(f"bench-long:{seed}")
    records, golds = [], []
    for i in range(n):
        text, gold = sc.posting(rng, "in")
        filler = "。".join(sc._distractor(rng, "in") for _ in range(rng.randrange(30, 40))) + "。"
        rid = f"long-{i:05d}"
        records.append({"id": rid, "text": "【公司介绍】" + filler + text})
        golds.append({"id": rid, "gold": gold})
    return records, golds


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def chunk_texts(predictor, records: list[dict]) -> list[dict]:
    """Every record's chunks, as the run cuts them, as records of their own."""
    out = []
    for r in records:
        rec = {"id": r["id"], "values": {"text": r["text"]}, "row": r}
        chunks, _ = predictor.chunker.chunks(rec)
        out += [{"id": f"{r['id']}#{k}", "text": r["text"][c.start:c.end]} for k, c in enumerate(chunks)]
    return out


def throughput(make_backend, records, golds, work: Path, limit: int, few_shot: int, repeats: int) -> dict:
    """Chunked run vs the same requests unchunked; the best of `repeats` runs of each."""
    from extractor.backends.base import GenParams
    from extractor.benchmark import time_run
    from extractor.pipeline import Predictor
    from extractor.tasks.task import load_task
    task = load_task("jd_requirements")
    params = GenParams(max_new_tokens=task.spec.generation.max_new_tokens)
    corpus = write_jsonl(work / "long.jsonl", records)
    probe_backend = make_backend(None)
    chunker = Predictor(task, probe_backend, params, on_long="chunk", max_input_tokens=limit, few_shot=few_shot)
    singles = chunk_texts(chunker, records)
    single_corpus = write_jsonl(work / "singles.jsonl", singles)
    gold_by_id = {g["id"]: g["gold"] for g in golds}
    write_jsonl(work / "gold.jsonl", golds + [{"id": s["id"], "gold": gold_by_id[s["id"].split("#")[0]]}
                                              for s in singles])
    backend = make_backend(work / "gold.jsonl")
    chunked = Predictor(task, backend, params, on_long="chunk", max_input_tokens=limit, few_shot=few_shot)
    plain = Predictor(task, backend, params, on_long="fail", max_input_tokens=limit, few_shot=few_shot)
    time_run(plain, single_corpus, work / "warmup.jsonl", limit=min(16, len(singles)))  # one-time costs
    best: dict = {}
    for _ in range(repeats):
        for name, predictor, source in (("unchunked", plain, single_corpus), ("chunked", chunked, corpus)):
            r = time_run(predictor, source, work / f"{name}.jsonl")
            if name not in best or r["seconds"] < best[name]["seconds"]:
                best[name] = r
    requests = len(singles)
    out = {"records": len(records), "requests": requests, "chunks_per_record": requests / len(records)}
    for name, r in best.items():
        out[name] = {"seconds": round(r["seconds"], 3), "records_s": round(r["records_s"], 1),
                     "requests_s": round(requests / r["seconds"], 1), "statuses": r["statuses"]}
    out["chunked_vs_unchunked_requests_s"] = round(out["chunked"]["requests_s"] / out["unchunked"]["requests_s"], 3)
    return out


def f1_truncate_vs_chunk(n: int, work: Path) -> dict:
    from extractor.cli.main import cli
    from click.testing import CliRunner
    records, golds = long_postings(n, seed=1)
    corpus, gold = write_jsonl(work / "f1.jsonl", records), write_jsonl(work / "f1.gold.jsonl", golds)
    out: dict = {"records": n, "mean_text_chars": round(sum(len(r["text"]) for r in records) / n, 1)}
    for policy in ("truncate", "chunk"):
        preds = work / f"f1.{policy}.jsonl"
        args = ["run", corpus, "--task", "jd_requirements", "--model", DEMO_MODEL, "--out", preds, "--overwrite",
                "--few-shot", "0", "--constrained", "--fast", "on", "--device", "cpu", "--quiet", "--on-long", policy]
        result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
        assert result.exit_code == 0, result.stderr
        ev = CliRunner().invoke(cli, ["eval", str(preds), "--gold", str(gold), "--task", "jd_requirements", "--json",
                                      "--quiet", "--metrics", str(work / f"f1.{policy}.metrics.json")])
        metrics = json.loads(ev.stdout)
        out[policy] = {k: round(metrics["micro"][k], 4) for k in ("precision", "recall", "f1")}
        out[policy].update({k: metrics["micro"][k] for k in ("tp", "fp", "fn")})
        if policy == "chunk":
            rows = [json.loads(line) for line in preds.read_text(encoding="utf-8").splitlines()]
            out[policy]["mean_chunks"] = round(sum(r.get("chunks", 1) for r in rows) / n, 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n-echo", type=int, default=2000)
    parser.add_argument("--n-model", type=int, default=48)
    parser.add_argument("--n-f1", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--save", action="store_true", help="write bench/results/chunking_<date>.json")
    args = parser.parse_args()
    from extractor.backends.echo import EchoBackend
    from extractor.pipeline.preflight import NoTokenizer
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        records, golds = long_postings(args.n_echo)
        # echo counts characters: a 352-character limit cuts these postings as the demo model's 352 tokens do
        results["echo"] = throughput(lambda gold: NoTokenizer("echo") if gold is None else EchoBackend(str(gold)),
                                     records, golds, work, 352, 0, args.repeats)
        print(json.dumps({"echo": results["echo"]}, ensure_ascii=False), flush=True)

        loaded: list = []

        def demo(gold):  # one backend: the chunker's tokenizer and the runs' model
            if not loaded:
                from extractor.backends.hf import HFBackend
                loaded.append(HFBackend(str(DEMO_MODEL), device="cpu", fast="on", batch_size=32, quiet=True))
            return loaded[0]
        model_work = work / "model"
        model_work.mkdir()
        records, golds = long_postings(args.n_model, seed=2)
        results["demo_model_fast_cpu"] = throughput(demo, records, golds, model_work, 352, 0, args.repeats)
        print(json.dumps({"demo_model_fast_cpu": results["demo_model_fast_cpu"]}, ensure_ascii=False), flush=True)
        results["f1_demo_model"] = f1_truncate_vs_chunk(args.n_f1, work)
        print(json.dumps({"f1_demo_model": results["f1_demo_model"]}, ensure_ascii=False), flush=True)
    if args.save:
        path = REPO / "bench" / "results" / f"chunking_{date.today().isoformat()}.json"
        path.write_text(json.dumps({"args": vars(args), **results}, indent=2, ensure_ascii=False) + "\n")
        print(path)


if __name__ == "__main__":
    main()
