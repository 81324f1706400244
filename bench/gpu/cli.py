"""`extractor run` as a user runs it: a subprocess timed from start to exit, beside its manifest's own timings.

For each model shape (1.5B, 7B: random weights saved as a model folder with a trained 4k tokenizer) and each
corpus size (the harness's text corpus, 64-448 tokens a record, 128 new tokens), the variants run in turn,
alternating, each `--repeats` times (medians in the table):
  ours_cold   --compile on with empty Inductor/Triton caches (a fresh machine);
  ours_warm   --compile on with the caches a previous run left;
  ours_auto   the default, --compile auto (compiles only where the run's tokens repay it);
  ours_off    --compile off;
  vllm        --backend vllm on the same folder and corpus (--vllm; needs vLLM importable).
Several checkpoints (--checkpoints K): K full checkpoints of one shape scored by one command (`--model` K times)
against K separate commands.

Writes OUT/gpu_cli.json (every run, the medians, the checkpoints rows) and prints the medians' table.

    python bench/gpu/cli.py --out $OUT/cli --sizes 1.5b --records 256,2048 --repeats 2 --vllm
    python bench/gpu/cli.py --out /tmp/cli --smoke --records 8 --variants ours_off --repeats 1   # CPU check
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import common as c

VARIANTS = ("ours_cold", "ours_warm", "ours_auto", "ours_off")


def command(model: Path | list[Path], corpus: Path, out: Path, variant: str, smoke: bool) -> list[str]:
    models = model if isinstance(model, list) else [model]
    cmd = [sys.executable, "-m", "extractor", "run", str(corpus), "--task", "jd_requirements", "--out", str(out),
           "--max-new-tokens", str(c.NEW), "--overwrite", "--quiet", "--allow-no-result"]  # random weights
    for m in models:
        cmd += ["--model", str(m)]
    if variant == "vllm":
        return cmd + ["--backend", "vllm"]
    cmd += ["--compile", {"ours_cold": "on", "ours_warm": "on", "ours_auto": "auto", "ours_off": "off"}[variant]]
    return cmd + (["--device", "cpu", "--dtype", "fp32"] if smoke else [])


def env_for(variant: str, work: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(c.ROOT), os.environ.get("PYTHONPATH", "")]),
           "PYTHONUNBUFFERED": "1"}
    cache = work / ("cache_cold" if variant == "ours_cold" else "cache_warm")
    if variant == "ours_cold":
        shutil.rmtree(cache, ignore_errors=True)
    env["TORCHINDUCTOR_CACHE_DIR"] = str(cache / "inductor")
    env["TRITON_CACHE_DIR"] = str(cache / "triton")
    return env


def manifests(out: Path) -> list[dict]:
    found = sorted(out.parent.glob(out.stem + "*.manifest.json"))
    return [json.loads(p.read_text()) for p in found]


def one(work: Path, model, corpus: Path, variant: str, n: int, smoke: bool, tag: str) -> dict:
    out = work / "outs" / f"{tag}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    for old in out.parent.glob(out.stem + "*"):
        old.unlink()
    row = {"variant": variant, "records": n, **c.wall_clock(command(model, corpus, out, variant, smoke),
                                                      env_for(variant, work), work / "outs" / f"{tag}.log")}
    found = manifests(out)
    if found:
        summary = found[0].get("summary") or {}
        row.update(elapsed_s=summary.get("elapsed_s"), tok_s=summary.get("output_tokens_per_s"),
                   startup=found[0].get("startup"), records_written=summary.get("records"),
                   statuses=summary.get("statuses"))
    print(json.dumps({tag: row}), flush=True)
    return row


def medians(rows: list[dict]) -> list[dict]:
    return c.medians(rows, ("size", "records", "variant"), ("wall_s", "elapsed_s", "tok_s"))


def markdown(table: list[dict]) -> str:
    lines = ["| size | records | variant | runs ok | wall s (median) | manifest elapsed s | tok/s (run) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in table:
        lines.append(f"| {r['size']} | {r['records']:,} | {r['variant']} | {r['ok']}/{r['runs']} | "
                     f"{r['wall_s'] if r['wall_s'] is not None else '—'} | {r['elapsed_s'] or '—'} | "
                     f"{round(r['tok_s']) if r['tok_s'] else '—'} |")
    return "\n".join(lines)


def checkpoints(work: Path, tok, shape: dict, k: int, corpus: Path, n: int, smoke: bool, repeats: int) -> list[dict]:
    """K checkpoints of one shape (different seeds) scored by one command against K separate commands."""
    import torch
    from transformers import AutoModelForCausalLM, AutoConfig
    base = c.saved_model(work / "ckpt0", shape, tok, dtype=None if smoke else torch.bfloat16,
                       **({"initializer_range": 0.2} if smoke else {}))
    folders = [base]
    for i in range(1, k):  # same config, other random weights
        path = work / f"ckpt{i}"
        if not (path / "config.json").exists():
            torch.manual_seed(i)
            cfg = AutoConfig.from_pretrained(base)
            with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
                model = AutoModelForCausalLM.from_config(cfg, **({} if smoke else {"dtype": torch.bfloat16}))
            model.save_pretrained(path)
            del model
            tok.save_pretrained(path)
        folders.append(path)
    rows = []
    for rep in range(repeats):
        start = time.perf_counter()
        for i, folder in enumerate(folders):
            one(work, folder, corpus, "ours_auto", n, smoke, f"sep{i}_r{rep}")
        rows.append({"mode": "separate", "checkpoints": k, "records": n, "wall_s": time.perf_counter() - start})
        r = one(work, folders, corpus, "ours_auto", n, smoke, f"one_r{rep}")
        rows.append({"mode": "one_command", "checkpoints": k, "records": n, **r})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/gpu_cli"))
    ap.add_argument("--sizes", default="1.5b")
    ap.add_argument("--records", default="256,2048")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--vllm", action="store_true")
    ap.add_argument("--checkpoints", type=int, default=0)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.smoke:
        c.use_smoke()
    variants = [v for v in args.variants.split(",") if v] + (["vllm"] if args.vllm else [])
    sizes = [s for s in args.sizes.split(",") if s]
    counts = [int(n) for n in args.records.split(",") if n]
    tok = c.tokenizer(args.work)
    rows: list[dict] = []
    import torch
    for size in sizes:
        shape = c.SMOKE_SHAPE if args.smoke else c.QWEN[size]
        model = c.saved_model(args.work / f"model_{size}{'_smoke' if args.smoke else ''}", shape, tok,
                              dtype=None if args.smoke else torch.bfloat16,
                              **({"initializer_range": 0.2} if args.smoke else {}))
        if "ours_warm" in variants:  # the warm cache: one compiled run first, untimed
            one(args.work, model, c.corpus(args.work, tok, min(counts)), "ours_warm", min(counts), args.smoke,
                f"{size}_warmup")
        for rep in range(args.repeats):
            for n in counts:
                corpus = c.corpus(args.work, tok, n)
                for variant in variants:
                    row = one(args.work, model, corpus, variant, n, args.smoke, f"{size}_{n}_{variant}_r{rep}")
                    rows.append({"size": size, "repeat": rep, **row})
                    (args.out / "gpu_cli.json").write_text(json.dumps({"rows": rows}, indent=1))
    result = {"rows": rows, "table": medians(rows), "device": torch.cuda.get_device_name() if torch.cuda.is_available()
              else "cpu", **c.provenance()}
    if args.checkpoints:
        size = sizes[0]
        shape = c.SMOKE_SHAPE if args.smoke else c.QWEN[size]
        result["checkpoints"] = checkpoints(args.work, tok, shape, args.checkpoints,
                                            c.corpus(args.work, tok, counts[-1]), counts[-1], args.smoke,
                                            args.repeats)
    (args.out / "gpu_cli.json").write_text(json.dumps(result, indent=1))
    print(markdown(result["table"]))


if __name__ == "__main__":
    main()
