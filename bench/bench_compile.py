"""What compiling the fast path costs a process: FastDecoder(compile=True) built (the probe compiles) and its
first generation (any further compiles), with dynamo's frame, graph and graph-break counts; each case in a
process of its own, first with an empty Inductor cache, then again with the cache that run left (warm).

    python bench/bench_compile.py --out bench/results/compile_cpu.json          # CPU, tiny Qwen2, 2 and 4 layers
    python bench/bench_compile.py --device cuda --dtype bfloat16 --layers 28    # on a GPU (--dtype: a torch dtype's name)

Results (with machine and date) go to docs/benchmarks.md ("Compiling the fast path").
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# One case, in a fresh process: argv = model folder, device, dtype, scope.
_CASE = r"""
import json, sys, time
import torch
from torch._dynamo.utils import counters
from transformers import AutoModelForCausalLM
from extractor.backends.fast import FastDecoder
path, device, dtype, scope = sys.argv[1:5]
model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(device).eval()
prompts = [[5 + i, 6, 7, 8 + i] for i in range(5)]
start = time.perf_counter()
decoder = FastDecoder(model, [3, 4, 9, 10], slots=3, unique_len=32, eos_ids=[], compile=True, compile_scope=scope)
built = time.perf_counter()
decoder.generate(prompts, 8)
if device == "cuda":
    torch.cuda.synchronize()
done = time.perf_counter()
print(json.dumps({"compiled": decoder.compiled, "build_s": round(built - start, 2),
                  "first_generate_s": round(done - built, 2), "frames": counters["frames"]["total"],
                  "graphs": counters["stats"]["unique_graphs"],
                  "graph_breaks": sum(counters["graph_break"].values())}))
"""


def run_case(model: Path, device: str, dtype: str, scope: str, cache: Path) -> dict:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"), "TRITON_CACHE_DIR": str(cache / "triton")}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _CASE, str(model), device, dtype, scope], capture_output=True,
                          text=True, env=env, timeout=1200)
    if proc.returncode != 0:
        raise SystemExit(f"case failed:\n{proc.stderr[-3000:]}")
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "process_s": round(time.perf_counter() - start, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--layers", default="2,4", help="tiny Qwen2 depths to compare (regional: equal cost)")
    parser.add_argument("--scope", default="layers", choices=("layers", "model"))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    from extractor.datasets.tiny_models import build_tiny_model
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for layers in map(int, args.layers.split(",")):
            model = build_tiny_model(Path(tmp) / f"l{layers}", layers=layers)
            cache = Path(tmp) / f"cache{layers}"  # empty, then as the first run left it
            for state in ("empty cache", "warm cache"):
                row = {"layers": layers, "cache": state, **run_case(model, args.device, args.dtype, args.scope, cache)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    import torch
    result = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.node()} ({os.cpu_count()} cores)",
              "device": args.device, "dtype": args.dtype, "scope": args.scope, "torch": torch.__version__,
              "rows": rows}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    print("| layers | cache | built (probe compiled) | first generation | whole process | frames | graphs | breaks |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['layers']} | {r['cache']} | {r['build_s']} s | {r['first_generate_s']} s | {r['process_s']} s "
              f"| {r['frames']} | {r['graphs']} | {r['graph_breaks']} |")


if __name__ == "__main__":
    main()
