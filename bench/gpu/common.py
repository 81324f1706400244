"""What every GPU bench script shares: the anchor workload, timing, result files with provenance, tables.

The anchor workload (../shared/docs/GPU.md): a random-weight model from the Qwen2.5-1.5B config (bf16), N
prompts of a 320-token shared prefix plus 64-448 unique tokens (random ids, seed 0), 128 new tokens with EOS
disabled; and the EOS variant, where record i stops after L_i ~ U[16, 128] tokens (seeded). The run-path
scripts use a text version of it: synthetic postings cut to 64-448 tokens of a locally trained 4k tokenizer.
The token ids are the same as ../shared/bench/gpu_vllm_anchor.py's, so rows of different scripts (and of
vLLM) come from the same inputs.

`use_smoke()` swaps in a tiny shape on CPU (PREFIX 24, NEW 12): a check that a script runs and writes its
table, not a speed. Scripts read the settings as `common.NEW` etc. at call time, after that switch.
"""
from __future__ import annotations

import json
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # the device machine runs the scripts from a plain checkout
    sys.path.insert(0, str(ROOT))

QWEN = {
    "1.5b": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                 intermediate_size=8960, vocab_size=151936, tie_word_embeddings=True),
    "7b": dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
               intermediate_size=18944, vocab_size=152064, tie_word_embeddings=False),
}
SMOKE_SHAPE = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=256, vocab_size=151936, tie_word_embeddings=True, head_dim=32)
PREFIX, NEW = 320, 128
DEVICE = "cuda"
EOS_ID = 151643  # Qwen2.5's <|endoftext|>
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def use_smoke() -> None:
    """Tiny shapes on CPU: every script's --smoke."""
    global DEVICE, PREFIX, NEW
    DEVICE, PREFIX, NEW = "cpu", 24, 12
    QWEN.update({"1.5b": SMOKE_SHAPE, "7b": dict(SMOKE_SHAPE, num_attention_heads=4, num_key_value_heads=1)})


# -- result files ---------------------------------------------------------------------------------------
def provenance() -> dict:
    """Where and when a result was measured: card, date, host, versions, commit."""
    import transformers
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    cuda = DEVICE == "cuda" and torch.cuda.is_available()
    return {"card": torch.cuda.get_device_name() if cuda else "cpu (smoke run)", "date": time.strftime("%Y-%m-%d"),
            "host": platform.node(), "torch": torch.__version__, "transformers": transformers.__version__,
            "git_commit": commit}


class Results:
    """Rows by key, written to OUT/NAME.json after every row (a call cut short keeps what it measured)."""

    def __init__(self, out: Path, name: str, **meta):
        self.out, self.path, self.data = Path(out), Path(out) / f"{name}.json", {}
        self.out.mkdir(parents=True, exist_ok=True)
        for key, value in {**provenance(), **meta}.items():
            self[key] = value

    def __setitem__(self, key, value):
        self.data[key] = value
        print(key, json.dumps(value, default=str), flush=True)
        self.path.write_text(json.dumps(self.data, indent=1, default=str))

    def __getitem__(self, key):
        return self.data[key]

    def get(self, key, default=None):
        return self.data.get(key, default)

    def write_table(self, text: str) -> None:
        print(text, flush=True)
        self.path.with_suffix(".md").write_text(text + "\n")


def row(tokens: int, records: int, seconds: float, **extra) -> dict:
    return {"tok_s": tokens / seconds, "records_s": records / seconds, "seconds": seconds, "tokens": tokens, **extra}


# -- timing ---------------------------------------------------------------------------------------------
def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def timed(fn):
    """fn's value and its seconds, the device's queued work included."""
    sync()
    t = time.perf_counter()
    value = fn()
    sync()
    return value, time.perf_counter() - t


def empty_cache():
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def matmul_tflops() -> float:
    """This card's bf16 matmul rate, measured: the compute floors are taken against it."""
    size = 8192 if DEVICE == "cuda" else 512
    a = torch.randn(size, size, device=DEVICE, dtype=torch.bfloat16)
    b = torch.randn_like(a)
    for _ in range(3):
        a @ b
    _, dt = timed(lambda: [a @ b for _ in range(10)])
    return 10 * 2 * size ** 3 / dt / 1e12


def wall_clock(cmd: list[str], env: dict | None, log: Path) -> dict:
    """A subprocess timed from start to exit; its output kept in `log`."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    log.write_text(proc.stdout + proc.stderr)
    return {"wall_s": round(wall, 3), "rc": proc.returncode, "stderr_tail": proc.stderr[-400:]}


def medians(rows: list[dict], by: tuple[str, ...], values: tuple[str, ...]) -> list[dict]:
    """Rows grouped by the `by` fields (variants measured in turn, alternating): per group the runs, the
    successful ones (rc 0) and the median of each value over them (None where none has it)."""
    groups: dict = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in by), []).append(r)
    out = []
    for key, rs in groups.items():
        ok = [r for r in rs if r.get("rc", 0) == 0]
        line = {**dict(zip(by, key)), "runs": len(rs), "ok": len(ok)}
        for v in values:
            got = [r[v] for r in ok if r.get(v)]
            line[v] = statistics.median(got) if got else None
        out.append(line)
    return out


# -- the anchor workload --------------------------------------------------------------------------------
def workload(n: int, seed: int = 0, vocab: int | None = None):
    """The anchor's token ids (ids folded into `vocab` for a model with a smaller vocabulary)."""
    rng = random.Random(seed)
    fold = (lambda i: i % vocab) if vocab else (lambda i: i)
    prefix = [fold(rng.randrange(1000, 100000)) for _ in range(PREFIX)]
    lo, hi = (64, 448) if NEW == 128 else (4, 40)
    suffixes = [[fold(rng.randrange(1000, 100000)) for _ in range(rng.randint(lo, hi))] for _ in range(n)]
    stops = [random.Random(1000 + i).randint(min(16, NEW), NEW) for i in range(n)]  # the EOS variant's lengths
    return prefix, suffixes, stops


def build(name: str, dtype=torch.bfloat16):
    """A random-weight model of the QWEN shape `name` on DEVICE, and its parameter count."""
    from transformers import AutoModelForCausalLM, Qwen2Config
    cfg = Qwen2Config(**QWEN[name], max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa").eval()
    return model, sum(p.numel() for p in model.parameters())


def lora_config(seed: int):
    """A rank-16 LoRA on every linear layer; init_lora_weights=False makes B random too, so the adapter
    changes the outputs."""
    from peft import LoraConfig
    torch.manual_seed(seed)
    return LoraConfig(r=16, lora_alpha=32, target_modules=LORA_TARGETS, init_lora_weights=False,
                      task_type="CAUSAL_LM")


def tokenizer(work: Path):
    """The run path's tokenizer: 4k tokens trained on synthetic postings, saved in work/model beside a config
    of the 1.5B shape (once)."""
    from transformers import AutoTokenizer

    from extractor.datasets.tiny_models import tokenizer_corpus, train_tokenizer
    path = work / "model"
    if not (path / "tokenizer.json").exists():
        tok = train_tokenizer(tokenizer_corpus(3000), vocab_size=4096)
        tok.save_pretrained(path)
        (path / "config.json").write_text(json.dumps({"model_type": "qwen2", **QWEN["1.5b"]}))
    return AutoTokenizer.from_pretrained(path)


def corpus(work: Path, tok, n: int) -> Path:
    """The anchor as text: postings glued together and cut to 64-448 tokens each (seeded), as JSONL."""
    from extractor.datasets.synth import generate
    path = work / f"corpus{n}.jsonl"
    if path.exists():
        return path
    rng = random.Random(0)
    texts = [rec["text"] for rec, _ in generate(4 * n, seed=3, lang="mix", split="all")]
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n):
            want, ids = (rng.randint(64, 448) if NEW == 128 else rng.randint(4, 40)), []
            while len(ids) < want:
                ids += tok(texts[rng.randrange(len(texts))] + " ", add_special_tokens=False)["input_ids"]
            fh.write(json.dumps({"id": f"r{i}", "text": tok.decode(ids[:want])}, ensure_ascii=False) + "\n")
    return path


def saved_model(path: Path, shape: dict, tok, dtype=None, **config) -> Path:
    """A random-weight Qwen2 of `shape` with the trained tokenizer, saved as a model folder (once)."""
    from transformers import AutoModelForCausalLM, Qwen2Config
    if not (path / "config.json").exists():
        torch.manual_seed(0)
        cfg = Qwen2Config(**dict(shape, vocab_size=max(len(tok), 4096)), max_position_embeddings=4096,
                          eos_token_id=tok.eos_token_id, **config)
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # random init of 7B: seconds there
            model = AutoModelForCausalLM.from_config(cfg, **({"dtype": dtype} if dtype else {}))
        model.save_pretrained(path)
        tok.save_pretrained(path)
        del model
        empty_cache()
    return path


def legacy_decoder(path: str):
    """The FastDecoder class of another version of the decoder's file (a same-call baseline)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("legacy_fast", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.FastDecoder


# -- FastDecoder, timed ---------------------------------------------------------------------------------
def fast_run(model, prefix, suffixes, budgets, slots=None, grammar=None, workers="auto", decoder_cls=None,
             warm=True, **decoder_kw):
    """FastDecoder on token ids; with `grammar`, every output is constrained to it (a fresh BatchConstraint
    per call, `workers` grammar processes) and the grammar's stop token ends a row. decoder_cls: another
    decoder class with the same interface (the legacy one). warm=False: no warm-up run, and the decoder's
    build and graph capture count in the timed span (an adapter switch's whole cost)."""
    from extractor.backends.fast import FastDecoder, slots_for_memory
    from extractor.constrain.batch import BatchConstraint
    decoder_cls = decoder_cls or FastDecoder
    unique = max(len(s) for s in suffixes) + NEW
    sync()
    start = time.perf_counter()
    slots = slots or (slots_for_memory(model, unique, DEVICE) if DEVICE == "cuda" else 16)
    eos = grammar.stop_token_ids if grammar is not None else []
    (dec, build_s) = timed(lambda: decoder_cls(model, prefix, slots=slots, unique_len=unique, eos_ids=eos,
                                               **decoder_kw))
    dec.capture()
    constraint = (lambda: BatchConstraint(grammar, workers)) if grammar is not None else (lambda: None)
    warmup_s = 0.0
    if warm:  # compiles (torch.compile, Triton) and captures the graphs a run of this shape needs
        _, warmup_s = timed(lambda: dec.generate(suffixes[:2 * slots] if slots < len(suffixes) else suffixes,
                                                 max_new=budgets if isinstance(budgets, int) else budgets[:2 * slots],
                                                 constraint=constraint()))
        dec.stats = {k: 0 for k in dec.stats}
    dec.trace = []
    last = constraint()
    got, dt = timed(lambda: dec.generate(suffixes, max_new=budgets, constraint=last))
    if not warm:
        dt = time.perf_counter() - start
    tokens = sum(len(t) for t, _ in got)
    info = {"slots": slots, "buckets_captured": len(dec._graphs), "attention": dec.attention,
            "compiled": dec.compiled, "flash_gqa": dec._flash_gqa, "setup_s": build_s, "warmup_s": warmup_s,
            "time_split": dict(dec.stats), "prefill_chunks": prefill_summary(dec.trace, model, len(prefix)),
            "constraint": dict(last.stats) if last is not None else None}
    del dec
    empty_cache()
    return got, row(tokens, len(suffixes), dt, **info)


def prefill_summary(trace, model, prefix_len: int) -> dict:
    """Each prefill chunk's rows, padded width, real tokens, milliseconds and achieved TFLOP/s (linear layers
    only, real tokens): where prefill falls short of the matmul rate."""
    cfg = model.config
    linear = sum(p.numel() for n, p in model.named_parameters() if "layers." in n and p.dim() == 2)
    chunks = [{"rows": r, "width": w, "tokens": t, "ms": round(s * 1e3, 2),
               "tflops": round(2 * linear * t / s / 1e12, 1)} for r, w, t, s in trace]
    tokens, seconds = sum(c[2] for c in trace), sum(c[3] for c in trace)
    return {"chunks": chunks, "tokens": tokens, "padded": sum(r * w for r, w, _, _ in trace), "seconds": seconds,
            "linear_tflops": 2 * linear * tokens / seconds / 1e12 if seconds else None,
            "hidden": cfg.hidden_size, "prefix": prefix_len}


# -- the decoder and run-path table ---------------------------------------------------------------------
_FLOOR_ROWS = ("sequential", "static_bs128", "generate_batch", "fast", "fast_legacy", "fast_compiled")


def _labels(by_workers: list) -> list[tuple[str, str, str]]:
    """(key, label, workload) of each row, in table order."""
    return [("sequential", "sequential `generate`, batch 1", "fixed"),
            ("static_bs128", "static `generate`, batch 128", "fixed"),
            ("generate_batch", "`generate_batch` (continuous batching)", "fixed"),
            ("fast_legacy", "FastDecoder with its own Llama layer (--legacy)", "fixed"),
            ("fast", "FastDecoder", "fixed"),
            ("fast_compiled", "FastDecoder, torch.compile", "fixed"),
            ("run_path_legacy", "`extractor run` path, FastDecoder with its own Llama layer", "fixed, text"),
            ("run_path", "`extractor run` path (hf, fast)", "fixed, text"),
            ("adapters_run_base", "`extractor run` path, base weights (adapter backend)", "fixed, text"),
            ("adapters_run_x4", "`extractor run` path, 4 LoRA adapters, a quarter each", "fixed, text"),
            ("adapters_run_x4_all", "`extractor run` path, 4 LoRA adapters, all records each", "fixed, text"),
            ("run_path_constrained", "`extractor run` path, --constrained", "text, JSON"),
            ("run_path_constrained_switch", "`extractor run` path, --constrained, other GIL switch interval",
             "text, JSON"),
            ("fast_same_lengths", "FastDecoder, unconstrained, each record as long as its JSON", "JSON lengths"),
            ("fast_constrained", "FastDecoder, constrained", "JSON"),
            ("fast_constrained_no_workers", "FastDecoder, constrained, grammar in-process", "JSON"),
            *[(k, f"FastDecoder, constrained, {n} grammar workers", "JSON") for k, n in by_workers],
            ("static_bs128_eos", "static `generate`, batch 128", "EOS at 16-128"),
            ("fast_eos_legacy", "FastDecoder with its own Llama layer", "EOS at 16-128"),
            ("fast_eos", "FastDecoder", "EOS at 16-128"),
            ("fast_eos_compiled", "FastDecoder, torch.compile", "EOS at 16-128"),
            ("lora_r16", "FastDecoder, one rank-16 LoRA (all linear layers, unmerged)", "fixed"),
            ("lora_r16_compiled", "FastDecoder, rank-16 LoRA, torch.compile", "fixed"),
            ("lora_r16_fp32_weights", "FastDecoder, rank-16 LoRA, float32 adapter weights", "fixed"),
            ("lora_r16_merged", "FastDecoder, rank-16 LoRA merged into the weights", "fixed"),
            ("lora_x4", "FastDecoder, 4 LoRA adapters, records spread evenly", "fixed"),
            ("ptuning_128", "FastDecoder, P-tuning, 128 virtual tokens", "fixed"),
            ("prefix_128", "FastDecoder, prefix tuning, 128 virtual tokens", "fixed"),
            ("prefix_128_projection", "FastDecoder, prefix tuning with projection, 128", "fixed"),
            ("fast_7b", "FastDecoder, 7B config", "fixed"),
            ("fast_7b_compiled", "FastDecoder, 7B config, torch.compile", "fixed"),
            ("fast_7b_eos_compiled", "FastDecoder, 7B config, torch.compile", "EOS at 16-128")]


def table(d: dict) -> str:
    """The markdown table of decoder and run-path rows (decoder.py's and run_path.py's keys; rows a call did
    not measure are left out, ratios to static `generate` only where the same file has it)."""
    floor = d.get("floor_tok_s")
    base = (d.get("static_bs128") or {}).get("tok_s")
    base_eos = (d.get("static_bs128_eos") or {}).get("tok_s")
    by_workers = [(k, k.rsplit("_w", 1)[1]) for k in sorted(d) if k.startswith("fast_constrained_w")]
    rate = (f"bf16 matmul {d['bf16_tflops']:.0f} TFLOP/s; compute floor {floor or 0:,.0f} tok/s; "
            if d.get("bf16_tflops") else "")
    lines = [f"card: {d.get('card')}; torch {d.get('torch')}, transformers {d.get('transformers')}; {rate}"
             f"N = {d.get('n')}; {d.get('date')}", "",
             "| path | workload | output tok/s | records/s | x static bs128 (same workload) | of floor |",
             "| --- | --- | --- | --- | --- | --- |"]
    for key, label, wl in _labels(by_workers):
        r = d.get(key)
        if not r:
            continue
        ref = base_eos if "eos" in key else base
        ratio = f"{r['tok_s'] / ref:.1f}x" if ref and "7b" not in key else "-"
        of_floor = f"{r['tok_s'] / floor:.0%}" if floor and key in _FLOOR_ROWS else "-"
        lines.append(f"| {label} | {wl} | {r['tok_s']:,.0f} | {r['records_s']:,.1f} | {ratio} | {of_floor} |")
    for key in [k for k in d if k.startswith("family_")]:
        r, name = d[key], key[len("family_"):]
        if "tok_s" in r:
            lines.append(f"| FastDecoder, {name} config ({r['params'] / 1e9:.2f} B) | fixed | {r['tok_s']:,.0f} | "
                         f"{r['records_s']:,.1f} | - | {r['of_floor']:.0%} of its linear-layer floor "
                         f"({r['floor_tok_s']:,.0f}) |")
        else:
            lines.append(f"| FastDecoder, {name} config | fixed | {r.get('error')} | | | |")
    if d.get("adapter_ratios"):
        lines.append("adapter rows / base FastDecoder, same call: " +
                     ", ".join(f"{k} {v:.2f}x" for k, v in d["adapter_ratios"].items()))
    pairs = [("run_path", "run_path_constrained", "run path"), ("fast", "fast_constrained", "FastDecoder"),
             ("fast_same_lengths", "fast_constrained", "FastDecoder, same output lengths"),
             ("run_path", "run_path_constrained_switch", "run path, other GIL switch interval"),
             ("fast", "fast_constrained_no_workers", "FastDecoder, grammar in-process")]
    pairs += [("fast", k, f"FastDecoder, {n} workers") for k, n in by_workers]
    for free, cons, label in pairs:
        if d.get(free) and d.get(cons):
            lines.append(f"--constrained costs {1 - d[cons]['tok_s'] / d[free]['tok_s']:.0%} of output tok/s, "
                         f"{1 - d[cons]['records_s'] / d[free]['records_s']:.0%} of records/s ({label})")
    return "\n".join(lines)
