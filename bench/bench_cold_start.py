"""`extractor run` from process start to exit on a model folder that is not in the page cache (a fresh machine,
tonight's new checkpoint): with the weights read ahead while the process imports torch and transformers (the
default) against EXTRACTOR_READAHEAD=0, rounds alternating, the folder's weight files evicted from the page cache
before every command (posix_fadvise DONTNEED: no root needed for files nobody is writing).

    python bench/bench_cold_start.py --out bench/results/cold_start_cpu.json            # ~1.6 GB fp32 folder, CPU
    python bench/bench_cold_start.py --model ./folder --device cuda --records 256 ...   # a folder of your own

Results (with machine and date) go to docs/benchmarks.md ("Start-up from a cold page cache").
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build_model(folder: Path) -> Path:
    """A random Qwen2 of ~405M parameters (1.6 GB of fp32 safetensors), built once."""
    if not (folder / "config.json").is_file():
        from extractor.datasets.tiny_models import build_tiny_model
        build_tiny_model(folder, hidden=1536, layers=12, heads=12, kv_heads=2, intermediate=6144)
    return folder


def evict(folder: Path) -> None:
    from extractor.backends.model_files import weight_files
    for file in weight_files(folder):
        fd = os.open(file, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def corpus(path: Path, records: int) -> Path:
    texts = ["Senior data engineer; 5+ years of Python and SQL; Spark a plus; bachelor's degree in CS.",
             "Nurse, night shifts; BLS certification required; 2 years in an ICU; salary 60k-75k."]
    with path.open("w") as f:
        for i in range(records):
            f.write(json.dumps({"id": f"r{i}", "text": texts[i % 2]}) + "\n")
    return path


def one_command(model: Path, data: Path, out: Path, args, read_ahead: bool) -> dict:
    evict(model)
    env = {**os.environ, "EXTRACTOR_READAHEAD": "1" if read_ahead else "0"}
    cmd = [sys.executable, "-m", "extractor", "run", str(data), "--task", "jd_requirements", "--model", str(model),
           "--out", str(out), "--overwrite", "--allow-no-result", "-q", "--device", args.device,
           "--max-new-tokens", str(args.max_new_tokens)]
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"the command failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    startup = json.loads(Path(f"{out}.manifest.json").read_text())["startup"]
    return {"read_ahead": read_ahead, "wall_s": round(wall, 2), "began_at_process_s": startup["began_at_process_s"],
            "loading_weights_s": startup["phases_s"].get("loading weights")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="a model folder (default: build the ~1.6 GB random Qwen2)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--records", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench/results/cold_start_cpu.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or build_model(Path(os.environ.get("EXTRACTOR_BENCH_MODEL", Path(tmp) / "model")))
        data = corpus(Path(tmp) / "corpus.jsonl", args.records)
        rows = []
        for r in range(args.rounds):
            for read_ahead in (False, True) if r % 2 == 0 else (True, False):
                rows.append({"round": r, **one_command(model, data, Path(tmp) / "preds.jsonl", args, read_ahead)})
                print(json.dumps(rows[-1]), flush=True)
        from extractor.backends.model_files import weights_size
        size = weights_size(model)
    medians = {}
    for read_ahead in (False, True):
        mine = [row for row in rows if row["read_ahead"] is read_ahead]
        medians["on" if read_ahead else "off"] = {
            key: statistics.median(row[key] for row in mine) for key in ("wall_s", "loading_weights_s")}
    result = {"bench": "cold_start", "date": str(date.today()), "machine": platform.node(),
              "cpus": os.cpu_count(), "python": platform.python_version(), "device": args.device,
              "weights_bytes": size, "records": args.records, "max_new_tokens": args.max_new_tokens,
              "rows": rows, "medians": medians}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(medians))


if __name__ == "__main__":
    main()
