"""How long a checkpoint's dev F1 takes in `extractor train`: its evaluation (HFBackend.from_loaded + Predictor,
as training/loop.py runs it) with the plain path (`fast="off"`, what training did before adapters ran on the
fast path) and with the fast path, on the same records, for the demo's full checkpoint and for a LoRA and a
P-tuning adapter on it.
Both paths' outputs are compared record by record.

    python bench/bench_train_eval.py [--model eval/demo/model] [--records eval/demo/test.jsonl] [--n 300] [--device cuda]
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path


def adapter(model_dir: Path, kind: str, out: Path) -> Path:
    import torch
    from peft import LoraConfig, PromptEncoderConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM") if kind == "lora" \
        else PromptEncoderConfig(num_virtual_tokens=16, encoder_hidden_size=64, task_type="CAUSAL_LM")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), config)
    model.save_pretrained(out)
    return out


def evaluate(model, tokenizer, model_dir, records, fast: str) -> tuple[list[str], float]:
    from extractor.backends.base import GenParams
    from extractor.backends.hf import HFBackend
    from extractor.pipeline import Predictor
    from extractor.tasks.task import load_task
    task = load_task("jd_requirements")
    backend = HFBackend.from_loaded(model, tokenizer, model_dir, batch_size=32, fast=fast)
    predictor = Predictor(task, backend, GenParams(max_new_tokens=task.spec.generation.max_new_tokens),
                          on_long="truncate", few_shot=0)
    start = time.perf_counter()
    raws = []
    for i in range(0, len(records), 64):  # as Trainer._dev_f1 does
        raws += [row["raw"] for row in predictor.predict(records[i:i + 64])]
    return raws, time.perf_counter() - start


def main() -> None:
    import tempfile

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from extractor.store.corpus import CorpusReader
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="eval/demo/model")
    parser.add_argument("--records", default="eval/demo/test.jsonl")
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--out", default=None)
    parser.add_argument("--device", default="cpu", help="cpu or cuda: where the checkpoint is evaluated")
    args = parser.parse_args()
    model_dir = Path(args.model)
    records = [r for window in CorpusReader(Path(args.records), ["text"]) for r in window][: args.n]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    machine = torch.cuda.get_device_name() if args.device.startswith("cuda") else \
        f"{platform.node()} ({torch.get_num_threads()} threads)"
    result = {"machine": machine, "date": time.strftime("%Y-%m-%d"),
              "model": str(model_dir), "records": len(records), "rows": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("full", "lora", "ptuning"):
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
            if kind != "full":
                model = PeftModel.from_pretrained(model, adapter(model_dir, kind, Path(tmp) / kind))
            model.to(args.device).eval()
            plain, plain_s = evaluate(model, tokenizer, model_dir, records, "off")
            fast, fast_s = evaluate(model, tokenizer, model_dir, records, "auto")
            row = {"plain_s": round(plain_s, 2), "fast_s": round(fast_s, 2), "speedup": round(plain_s / fast_s, 2),
                   "same_raw": sum(a == b for a, b in zip(plain, fast))}
            result["rows"][kind] = row
            print(kind, json.dumps(row), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
