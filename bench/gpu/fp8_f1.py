"""Does `--quantize fp8` keep the demo model's quality? The demo trained on the card (`extractor demo`), then its
best checkpoint run on the test split as the demo runs it (zero-shot, --constrained), in bf16 and with
`--quantize fp8`, each scored by `extractor eval`: micro-F1 side by side (the target: within 0.01 of bf16).

Writes OUT/fp8_f1.json and prints the two scores.

    python bench/gpu/fp8_f1.py --out $OUT/fp8_f1                         # GPU with FP8 units
    python bench/gpu/fp8_f1.py --out /tmp/f1 --smoke      # CPU: the harness only (a short demo; no fp8 there)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import common as c


def extractor(args: list, log: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(c.ROOT), os.environ.get("PYTHONPATH", "")])}
    with open(log, "a", encoding="utf-8") as fh:
        fh.write("$ extractor " + " ".join(map(str, args)) + "\n")
        fh.flush()
        done = subprocess.run([sys.executable, "-m", "extractor", *map(str, args)], env=env, stdout=subprocess.PIPE,
                              stderr=fh, text=True)
    if done.returncode:
        raise SystemExit(f"extractor {args[0]} exited {done.returncode}: see {log}")
    return done


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/fp8_f1"))
    ap.add_argument("--max-steps", type=int, default=2500)
    ap.add_argument("--smoke", action="store_true", help="CPU: 60 steps, 40 test records, both rows unquantized")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "fp8_f1.log"
    demo = args.work / "demo"
    best = demo / "train" / "best"
    start = time.perf_counter()
    if not (best / "config.json").exists():
        extractor(["demo", "--out", demo, "--max-steps", 60 if args.smoke else args.max_steps,
                   *(["--train-n", 500, "--test-n", 40] if args.smoke else [])], log)
    demo_s = time.perf_counter() - start
    test, gold = demo / "data" / "test.jsonl", demo / "data" / "test.gold.jsonl"
    device = ["--device", "cpu", "--dtype", "fp32"] if args.smoke else ["--dtype", "bf16"]
    fp8 = [] if args.smoke else ["--quantize", "fp8"]  # the CLI refuses fp8 on a CPU: smoke checks the harness
    result = {"demo_s": demo_s, "device": "cpu" if args.smoke else c.provenance(), "rows": {}}
    for name, extra in (("bf16" if not args.smoke else "fp32", []), ("fp8", fp8)):
        preds = args.work / f"test.{name}.jsonl"
        run_start = time.perf_counter()
        extractor(["run", test, "--task", "jd_requirements", "--model", best, "--out", preds, "--overwrite",
                   "--constrained", "--quiet", *device, *extra], log)
        wall = time.perf_counter() - run_start
        metrics = json.loads(extractor(["eval", preds, "--gold", gold, "--task", "jd_requirements", "--json",
                                        "--quiet"], log).stdout)
        result["rows"][name] = {"micro_f1": metrics["micro"]["f1"], "run_wall_s": wall,
                                "statuses": metrics.get("statuses")}
        print(name, result["rows"][name], flush=True)
    f1 = [r["micro_f1"] for r in result["rows"].values()]
    result["f1_gap"] = f1[0] - f1[1]
    (args.out / "fp8_f1.json").write_text(json.dumps(result, indent=1))
    print(f"micro-F1 {f1[0]:.4f} -> {f1[1]:.4f} with fp8 (gap {result['f1_gap']:+.4f})")


if __name__ == "__main__":
    main()
