"""Trials behind the demo's model settings: train small models on the compositional corpus and score the
in-distribution test and the held-out split (values and phrasings never in training) at several step
counts. Self-contained (torch, transformers, tokenizers, jinja2, yaml), so it also runs on a machine
without the package's other dependencies; one trial per process, `--threads` each.

    python bench/demo_trials.py --name small --layers 2 --hidden 128 --steps 1000,2000,3000 --out trials/
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
import unicodedata
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from extractor.datasets.synth import ABSENT, FIELDS  # noqa: E402
from extractor.datasets.synth_compose import generate  # noqa: E402
from extractor.datasets.tiny_models import CHAT_TEMPLATE, EOS, PAD, train_tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def prompt_parts():
    import yaml
    from jinja2 import Template
    spec = yaml.safe_load((REPO / "prompts" / "jd_requirements.yaml").read_text(encoding="utf-8"))
    return [(m["role"], Template(m["content"])) for m in spec["messages"]]


def render(parts, text: str) -> str:
    from jinja2 import Template
    messages = [{"role": r, "content": t.render(text=text)} for r, t in parts]
    return Template(CHAT_TEMPLATE).render(messages=messages, add_generation_prompt=True)


def target(gold: dict) -> str:
    return json.dumps(gold, ensure_ascii=False)


def norm(v: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", v).casefold().split())


def facts(obj) -> set:
    out = set()
    if not isinstance(obj, dict):
        return out
    for f in FIELDS:
        vals = obj.get(f)
        if isinstance(vals, list):
            out |= {(f, norm(v)) for v in vals if isinstance(v, str) and v != ABSENT}
    return out


def f1s(preds: list, golds: list) -> dict:
    """Micro F1 and each field's F1 (set-based, normalised, the absent marker scored as empty)."""
    counts = {f: [0, 0, 0] for f in ("micro",) + FIELDS}
    for p, g in zip(preds, golds):
        pf, gf = facts(p), facts(g)
        for key, n in ((0, pf & gf), (1, pf - gf), (2, gf - pf)):
            for fld, _ in n:
                counts[fld][key] += 1
                counts["micro"][key] += 1
    return {f: round(2 * tp / max(1, 2 * tp + fp + fn), 4) for f, (tp, fp, fn) in counts.items()}


def build(args, train):
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config
    parts = prompt_parts()
    texts = []
    for rec, gold in train:
        texts += [rec["text"], target(gold["gold"])]
    whole = ()
    if args.whole:
        lines = [ln for _, t in parts for ln in t.render(text="").splitlines() if ln.strip()]
        # as the demo's tokenizer (extractor.demo.fixed_tokens): prompt lines, roles, the answer's skeleton
        skeleton = target({f: ["\ue000", "\ue000"] for f in FIELDS}).split("\ue000")
        whole = tuple(dict.fromkeys(lines + ["system", "user", "assistant"] + skeleton + list(FIELDS) + [ABSENT]))
    tok = train_tokenizer(texts, args.vocab, True, per_char=args.per_char, whole=whole)
    heads = args.hidden // 32
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=args.hidden, intermediate_size=args.ffn or 2 * args.hidden,
                      num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=heads,
                      head_dim=32, max_position_embeddings=512, initializer_range=0.02, tie_word_embeddings=True,
                      bos_token_id=tok.convert_tokens_to_ids(EOS), eos_token_id=tok.convert_tokens_to_ids(EOS),
                      pad_token_id=tok.convert_tokens_to_ids(PAD))
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    return tok, model, parts


def encode(tok, prompt: str, tgt: str) -> dict:
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    t = tok(tgt, add_special_tokens=False)["input_ids"][:159] + [tok.eos_token_id]
    return {"input_ids": p + t, "labels": [-100] * len(p) + t}


def collate(batch, pad):
    import torch
    w = max(len(b["input_ids"]) for b in batch)
    return {"input_ids": torch.tensor([b["input_ids"] + [pad] * (w - len(b["input_ids"])) for b in batch]),
            "labels": torch.tensor([b["labels"] + [-100] * (w - len(b["labels"])) for b in batch]),
            "attention_mask": torch.tensor([[1] * len(b["input_ids"]) + [0] * (w - len(b["input_ids"])) for b in batch])}


def loss_fn(model, batch):
    import torch.nn.functional as F
    labels = batch["labels"]
    first = int((labels != -100).float().argmax(dim=1).min())
    keep = max(first - 1, 0)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   logits_to_keep=labels.shape[1] - keep).logits
    tg = labels[:, keep + 1:]
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), tg.reshape(-1), ignore_index=-100)


def evaluate(model, tok, parts, data, batch=50, errors: list | None = None) -> dict:
    import torch
    model.eval()
    tok.padding_side = "left"
    preds, golds, ok = [], [], 0
    with torch.no_grad():
        for i in range(0, len(data), batch):
            chunk = data[i:i + batch]
            enc = tok([render(parts, r["text"]) for r, _ in chunk], return_tensors="pt", padding=True,
                      add_special_tokens=False)
            out = model.generate(**enc, max_new_tokens=160, do_sample=False, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id)
            for row, (_, g) in zip(out[:, enc["input_ids"].shape[1]:], chunk):
                text = tok.decode(row, skip_special_tokens=True)
                try:
                    preds.append(json.loads(text))
                    ok += 1
                except ValueError:
                    preds.append(None)
                golds.append(g["gold"])
                if errors is not None and facts(preds[-1]) != facts(g["gold"]):
                    errors.append({"text": chunk[len(golds) - 1 - i][0]["text"], "gold": g["gold"], "raw": text})
    model.train()
    return {**f1s(preds, golds), "parse_rate": round(ok / max(1, len(data)), 3)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--name", required=True)
    ap.add_argument("--out", default="trials")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--ffn", type=int, default=0)
    ap.add_argument("--vocab", type=int, default=1500)
    ap.add_argument("--per-char", type=int, default=1)
    ap.add_argument("--whole", type=int, default=1)
    ap.add_argument("--train-n", type=int, default=5000)
    ap.add_argument("--eval-n", type=int, default=150)
    ap.add_argument("--steps", default="1000,2000,3000")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    import torch
    torch.set_num_threads(args.threads)
    from transformers import get_cosine_schedule_with_warmup
    t0 = time.perf_counter()
    train = list(generate(args.train_n, seed=1, split="in", prefix="train"))
    test = list(generate(args.eval_n, seed=3, split="in", prefix="test"))
    held = list(generate(args.eval_n, seed=4, split="heldout", prefix="held"))
    tok, model, parts = build(args, train)
    enc = [encode(tok, render(parts, r["text"]), target(g["gold"])) for r, g in train]
    lengths = [len(e["input_ids"]) for e in enc]
    marks = [int(s) for s in args.steps.split(",")]
    total = marks[-1]
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    sched = get_cosine_schedule_with_warmup(opt, int(0.05 * total), total)
    result = {"args": vars(args), "vocab": len(tok), "params": sum(p.numel() for p in model.parameters()),
              "mean_len": sum(lengths) / len(lengths), "setup_s": round(time.perf_counter() - t0, 1), "evals": []}
    rng = random.Random(args.seed)
    errors: list = []  # the held-out split's mistakes at the last step, for reading
    step, train_s = 0, 0.0
    model.train()
    while step < total:
        order = list(range(len(enc)))
        rng.shuffle(order)
        for i in range(0, len(order) - args.batch + 1, args.batch):
            t = time.perf_counter()
            loss = loss_fn(model, collate([enc[j] for j in order[i:i + args.batch]], tok.pad_token_id))
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad()
            train_s += time.perf_counter() - t
            step += 1
            if step in marks:
                t = time.perf_counter()
                row = {"step": step, "train_s": round(train_s, 1), "loss": round(loss.item(), 4),
                       "test": evaluate(model, tok, parts, test),
                       "heldout": evaluate(model, tok, parts, held, errors=errors if step == total else None)}
                row["eval_s"] = round(time.perf_counter() - t, 1)
                result["evals"].append(row)
                print(args.name, json.dumps(row, ensure_ascii=False), flush=True)
            if step >= total:
                break
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"{args.name}.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    (Path(args.out) / f"{args.name}.errors.jsonl").write_text(
        "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in errors), encoding="utf-8")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
