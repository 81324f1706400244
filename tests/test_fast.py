"""FastDecoder: greedy outputs equal `generate`, with the shared prefix prefilled once, fewer slots than
requests (slots refilled as sequences finish) and EOS handling; its kernels and buckets."""
import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from extractor.backends.fast import FastDecoder
from tests.helpers import generate_reference


@pytest.mark.parametrize("slots,refill,prefix_len,budgets", [(3, 2, 25, 14), (8, 8, 25, "mixed"),
                                                              (1, 1, 0, 14), (5, 3, 1, "mixed")])
def test_fast_decoder_equals_generate(tiny_model, slots, refill, prefix_len, budgets):
    """Refills, one slot, no prefix, per-record budgets: every output equals `generate` token for token."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    rng = random.Random(slots)
    prefix = [rng.randrange(5, 1000) for _ in range(prefix_len)]
    suffixes = [[rng.randrange(5, 1000) for _ in range(rng.randint(2, 30))] for _ in range(9)]
    budget = [rng.randint(1, 14) for _ in suffixes] if budgets == "mixed" else [budgets] * len(suffixes)
    eos = [model.config.eos_token_id]
    decoder = FastDecoder(model, prefix, slots=slots, unique_len=30 + 14, eos_ids=eos)
    got = decoder.generate(suffixes, max_new=budget, refill=refill)
    for suffix, n, (tokens, finish) in zip(suffixes, budget, got):
        assert tokens == generate_reference(model, prefix + suffix, n, eos)
        assert finish == ("stop" if tokens[-1] == eos[0] else "length")
    assert decoder.stats["steps"] > 0 and decoder.stats["prefills"] >= -(-len(suffixes) // slots)


def _attention_reference(q, k_cache, v_cache, pk, pv, slot, n, scale):
    """Plain SDPA over each row's prefix + own keys, K/V expanded per query head."""
    import torch
    import torch.nn.functional as F
    group = q.shape[1] // k_cache.shape[1]
    out = []
    for row in range(q.shape[0]):
        k = torch.cat((pk, k_cache[slot[row], :, : n[row]]), dim=1).repeat_interleave(group, dim=0)
        v = torch.cat((pv, v_cache[slot[row], :, : n[row]]), dim=1).repeat_interleave(group, dim=0)
        out.append(F.scaled_dot_product_attention(q[row].unsqueeze(1), k, v, scale=scale).squeeze(1))
    return torch.stack(out)


def test_torch_decode_attention_equals_sdpa_reference():
    """The CPU decode attention (prefix as one shared operand, slots trimmed to the longest live row) equals
    SDPA over each row's concatenated keys: per-row lengths, scattered slots, grouped heads, prefix or none."""
    import torch

    from extractor.backends.fast import attention as fa
    torch.manual_seed(0)
    for heads, kv_heads, p in [(12, 2, 20), (7, 1, 0), (4, 4, 5)]:
        q = torch.randn(4, heads, 32)
        kc, vc = torch.randn(5, kv_heads, 70, 32), torch.randn(5, kv_heads, 70, 32)
        pk, pv = torch.randn(kv_heads, p, 32), torch.randn(kv_heads, p, 32)
        slot = torch.tensor([3, 0, 4, 1])
        for n in (torch.tensor([1, 70, 33, 64]), torch.tensor([1, 2, 9, 5])):
            want = _attention_reference(q, kc, vc, pk, pv, slot, n, 0.17)
            for max_len in (None, int(n.max())):
                got = fa.decode_attention_torch(q, kc, vc, pk, pv, slot, n, 0.17, max_len=max_len)
                assert (got - want).abs().max() < 1e-5, (heads, p, max_len)


def test_decode_attention_kernels_agree():
    """The Triton decode kernel (run by Triton's interpreter on CPU) equals the SDPA reference: per-row
    lengths, scattered slots, grouped heads, with and without a shared prefix, softcaps, and sliding windows
    that cut into the prefix or leave all of it (and some own keys) behind, a head dim not a power of two;
    and with prefix groups (one prefix per mixed LoRA adapter, a group per row)."""
    fa = pytest.importorskip("extractor.backends.fast.attention")
    if not fa.available():
        pytest.skip("triton is not installed")
    import subprocess
    import sys
    code = """
import torch
from extractor.backends.fast import attention as fa
torch.manual_seed(0)
# windows: wider than everything, cutting into the prefix, past the whole prefix and into the own keys
for heads, kv_heads, p, softcap, window, *rest in [(12, 2, 20, None, None), (7, 1, 0, None, None), (4, 4, 5, None, None),
                                            (12, 2, 20, 5.0, None), (4, 2, 20, None, 200), (4, 2, 20, None, 30),
                                            (4, 2, 20, 2.0, 8), (4, 1, 70, None, 3), (6, 2, 9, None, 12, 48)]:
    dim = rest[0] if rest else 32  # 48: a head dim that is not a power of two (Phi-3's is 96)
    q = torch.randn(4, heads, dim) * 3
    kc, vc = torch.randn(5, kv_heads, 70, dim), torch.randn(5, kv_heads, 70, dim)
    pk, pv = torch.randn(kv_heads, p, dim), torch.randn(kv_heads, p, dim)
    slot, n = torch.tensor([3, 0, 4, 1]), torch.tensor([1, 70, 33, 64])
    a = fa.decode_attention_torch(q, kc, vc, pk, pv, slot, n, 0.17, softcap=softcap, window=window)
    b = fa.decode_attention_triton(q, kc, vc, pk, pv, slot, n, 0.17, softcap=softcap, window=window)
    # Each fp32 path against an fp64 reference: a wrong mask or rescale is off by ~1e-1. The bound leaves room
    # for fp32 rounding (here ~1e-6; 2 of ~6 full-suite runs once saw ~1e-4 between the two paths in the
    # softcap case, never reproduced alone), and the message says which path moved.
    exact = fa.decode_attention_torch(q.double(), kc.double(), vc.double(), pk.double(), pv.double(), slot, n, 0.17,
                                      softcap=softcap, window=window)
    errors = (float((a.double() - exact).abs().max()), float((b.double() - exact).abs().max()))
    assert max(errors) < 5e-4, (heads, p, softcap, window, "torch, triton off fp64 by", errors)
# prefix groups (mixed LoRA adapters, one prefix K/V each): every row equals the one-prefix path with its own
# group's prefix, in both implementations
for heads, kv_heads, p, softcap, window in [(12, 2, 20, None, None), (4, 2, 20, 2.0, 8), (4, 1, 0, None, None)]:
    q = torch.randn(4, heads, 32) * 3
    kc, vc = torch.randn(5, kv_heads, 70, 32), torch.randn(5, kv_heads, 70, 32)
    pk, pv = torch.randn(3, kv_heads, p, 32), torch.randn(3, kv_heads, p, 32)
    slot, n, group = torch.tensor([3, 0, 4, 1]), torch.tensor([1, 70, 33, 64]), torch.tensor([2, 0, 2, 1])
    a = fa.decode_attention_torch(q, kc, vc, pk, pv, slot, n, 0.17, softcap=softcap, window=window, prefix_group=group)
    b = fa.decode_attention_triton(q, kc, vc, pk, pv, slot, n, 0.17, softcap=softcap, window=window, prefix_group=group)
    assert (a - b).abs().max() < 1e-5, ("grouped", heads, p, (a - b).abs().max())
    for row, g in enumerate(group.tolist()):
        one = fa.decode_attention_torch(q[row:row + 1], kc, vc, pk[g], pv[g], slot[row:row + 1], n[row:row + 1],
                                        0.17, softcap=softcap, window=window)
        assert (one[0] - a[row]).abs().max() < 1e-5, ("grouped row", row)
print("ok")
"""
    import os
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]


def test_buckets_cover_every_batch_size():
    from extractor.backends.fast import buckets_up_to
    sizes = buckets_up_to(100)
    assert sizes == [8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 100]
    for slots in (100, 1024, 1500):
        sizes = buckets_up_to(slots)
        assert sizes[-1] == slots
        for live in range(1, slots + 1):
            b = next(s for s in sizes if s >= live)
            assert b - live <= max(7, live // 4)


@pytest.mark.parametrize("constrained,workers", [(False, 0), (True, 0), (True, 2)])
def test_hf_backend_fast_path_equals_plain_path(tmp_path, tiny_model, run_cli, constrained, workers, monkeypatch):
    """`extractor run --fast on` (shared prompt prefix found, FastDecoder, grammar masks filled per packed
    row, in this process or in two grammar worker processes) gives the plain path's outputs, constrained
    or not."""
    import sys

    from tests.conftest import read_jsonl, synth_corpus
    monkeypatch.setenv("EXTRACTOR_GRAMMAR_WORKERS", str(workers))
    interval = sys.getswitchinterval()
    corpus, _ = synth_corpus(tmp_path, n=10)
    outs = {}
    extra = ["--constrained"] if constrained else []
    for mode in ("off", "on"):
        out = tmp_path / f"{mode}.jsonl"
        result = run_cli("run", corpus, "--task", "jd_requirements", "--model", tiny_model, "--out", out,
                         "--max-new-tokens", "40" if constrained else "20", "--quiet", "--fast", mode,
                         "--batch-size", "4", "--window", "6", *extra)
        assert result.exit_code == 0, result.output
        outs[mode] = read_jsonl(out)
    for a, b in zip(outs["off"], outs["on"]):
        assert (a["id"], a["raw"], a["status"], a["prompt_tokens"], a["output_tokens"], a["finish_reason"]) == \
               (b["id"], b["raw"], b["status"], b["prompt_tokens"], b["output_tokens"], b["finish_reason"])
    if constrained:
        assert all(r["status"] == "ok" for r in outs["on"]), [r["raw"] for r in outs["on"]]
    assert sys.getswitchinterval() == interval  # the constrained fast path shortens it only while decoding


def test_cpu_default_takes_the_fast_path_within_the_token_budget(tmp_path, tiny_model):
    """--fast auto on CPU: FastDecoder, its host cache bounded by --batch-tokens like the plain path's
    batches (slots x cached positions), and the same outputs as --fast off."""
    from extractor.backends.base import GenParams
    from extractor.backends.hf import HFBackend
    from extractor.store.corpus import CorpusReader
    from extractor.pipeline import Predictor
    from extractor.tasks.task import load_task
    from tests.conftest import synth_corpus
    corpus, _ = synth_corpus(tmp_path, n=6)
    records = [r for window in CorpusReader(corpus) for r in window]
    backend = HFBackend(model=str(tiny_model), device="cpu", batch_size=32, batch_tokens=2048)
    assert backend.fast_mode == "auto"
    predictor = Predictor(load_task("jd_requirements"), backend, GenParams(max_new_tokens=12))
    fast = predictor.predict(records)
    dec = backend._fast_decoder
    assert dec is not None and dec.slots * dec.unique_len <= 2048 and dec.slots >= 1
    plain = HFBackend(model=str(tiny_model), device="cpu", batch_size=32, batch_tokens=2048, fast="off")
    predictor = Predictor(load_task("jd_requirements"), plain, GenParams(max_new_tokens=12))
    assert [r["raw"] for r in predictor.predict(records)] == [r["raw"] for r in fast]


def test_common_prefix_leaves_each_sequence_a_token():
    from extractor.backends.fast import common_prefix
    assert common_prefix([[1, 2, 3, 4], [1, 2, 3, 9], [1, 2, 3]]) == [1, 2]
    assert common_prefix([[5, 6], [7]]) == []


@pytest.mark.parametrize("slots", [2, 5])
def test_fast_decoder_early_stops_equal_generate(tiny_model, slots):
    """Rows stopping at EOS mid-batch (the pipelined loop runs them one step over and drops that token;
    their slots are refilled): outputs still equal `generate` with the same EOS."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    rng = random.Random(7)
    prefix = [rng.randrange(5, 1000) for _ in range(12)]
    suffixes = [[rng.randrange(5, 1000) for _ in range(rng.randint(2, 20))] for _ in range(10)]
    free_run = FastDecoder(model, prefix, slots=slots, unique_len=40, eos_ids=[]).generate(suffixes, max_new=16)
    counts = {}
    for tokens, _ in free_run:
        for t in set(tokens[1:8]):
            counts[t] = counts.get(t, 0) + 1
    eos = max(counts, key=counts.get)  # a token many outputs reach early: several rows stop mid-batch
    got = FastDecoder(model, prefix, slots=slots, unique_len=40, eos_ids=[eos]).generate(suffixes, max_new=16)
    stops = 0
    for suffix, (tokens, finish) in zip(suffixes, got):
        ids = torch.tensor([prefix + suffix])
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False,
                             eos_token_id=eos, pad_token_id=0)[0, ids.shape[1]:].tolist()
        if eos in ref:
            ref = ref[: ref.index(eos) + 1]
        assert tokens == ref
        stops += finish == "stop"
    assert stops >= 3


def test_run_stream_with_misfits_equals_plain_path(tmp_path, tiny_model, run_cli):
    """The fast path across windows: the first window's records share an opening sentence that later ones
    lack (the prefix must stop at the task template, found with placeholder probes), and one record is too
    long for the decoder's cache (it goes through the plain path). Outputs, order and counts equal --fast off."""
    from tests.conftest import read_jsonl, write_jsonl
    shared = "Senior backend engineer wanted. "
    texts = [shared + f"Python and SQL, {y}+ years, bachelor degree." for y in range(1, 5)]
    texts.append("We need Go and Rust. " * 150)  # ~1,500 own tokens: beyond the decoder's cache
    texts += [f"Java developer, master degree, {y} years of experience." for y in range(3)]
    corpus = tmp_path / "corpus.jsonl"
    write_jsonl(corpus, [{"id": f"r{i}", "text": t} for i, t in enumerate(texts)])
    outs = {}
    for mode in ("off", "on"):
        out = tmp_path / f"{mode}.jsonl"
        result = run_cli("run", corpus, "--task", "jd_requirements", "--model", tiny_model, "--out", out,
                         "--max-new-tokens", "12", "--quiet", "--fast", mode, "--window", "4", "--few-shot", "0")
        assert result.exit_code == 0, result.output
        outs[mode] = read_jsonl(out)
    assert [r["id"] for r in outs["on"]] == [f"r{i}" for i in range(len(texts))]
    for a, b in zip(outs["off"], outs["on"]):
        assert (a["raw"], a["status"], a["prompt_tokens"], a["output_tokens"]) == \
               (b["raw"], b["status"], b["prompt_tokens"], b["output_tokens"])


def test_compile_failure_falls_back_to_eager(tiny_model, monkeypatch):
    """Where torch.compile cannot work (no compiler, unsupported GPU) the decoder warns once and runs eager."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()

    def broken_compile(fn, **_):
        def run(*args, **kwargs):
            raise RuntimeError("no C++ compiler found")
        return run
    monkeypatch.setattr(torch, "compile", broken_compile)
    with pytest.warns(UserWarning, match="runs eager"):
        decoder = FastDecoder(model, [5, 6, 7], slots=2, unique_len=20, eos_ids=[], compile=True)
    assert decoder.compiled is False
    tokens, _ = decoder.generate([[8, 9, 10]], max_new=4)[0]
    assert len(tokens) == 4


def test_compile_policy(tiny_model):
    """--compile auto (the default): on CUDA only where the run's output tokens repay the compile, never on
    CPU; on/off as said; from_loaded's bool; the choice and why recorded for the manifest."""
    from extractor.backends.base import GenParams
    from extractor.backends.hf import HFBackend
    from extractor.backends.startup import COMPILE_PAYS_FROM_TOKENS
    backend = HFBackend(str(tiny_model), device="cpu", quiet=True)
    assert not backend._compiles(cuda=True)  # the run's size unknown: eager
    backend.expect(-(-COMPILE_PAYS_FROM_TOKENS // 128), GenParams(max_new_tokens=128))
    assert backend._compiles(cuda=True) and not backend._compiles(cuda=False)
    assert backend.startup.as_dict()["compile"]["compile"] is False
    backend.expect(10, GenParams(max_new_tokens=128))
    assert not backend._compiles(cuda=True)
    backend.compile = "on"
    assert backend._compiles(cuda=False)
    backend.compile = False
    assert not backend._compiles(cuda=True)
    # transformers is imported in this process already: no phase that would read 0 s (the process's age when
    # the backend began holds the imports)
    phases = backend.startup.as_dict()["phases_s"]
    assert "loading weights" in phases and "importing torch and transformers" not in phases
    assert backend.startup.as_dict()["began_at_process_s"] > 0
    assert not any(p.requires_grad for p in backend.base.parameters()), "inference only: the base is frozen"


@pytest.mark.parametrize("fast", ["on", "off"])
def test_each_request_keeps_its_own_budget(tiny_model, fast):
    """Request.budget: a request's own cap on new tokens, in one call beside requests without one, on both
    paths, batch and stream; each output equals that request decoded alone with max_new_tokens = its budget."""
    from extractor.backends.base import GenParams, Request
    from extractor.backends.hf import HFBackend
    backend = HFBackend(str(tiny_model), device="cpu", batch_size=3, fast=fast)
    prompts = [f"岗位：工程师{i}，要求本科，熟悉java" for i in range(6)]
    budgets = [3, None, 7, 3, 1, None]
    params = GenParams(max_new_tokens=10)
    requests = [Request(p, str(i), seq=i, budget=b) for i, (p, b) in enumerate(zip(prompts, budgets))]
    alone = [backend.generate([Request(p)], GenParams(max_new_tokens=b or 10))[0] for p, b in zip(prompts, budgets)]
    batch = backend.generate(requests, params)
    streamed = {r.seq: g for pairs in backend.generate_stream(iter(requests), params) for r, g in pairs}
    for i, want in enumerate(alone):
        assert (batch[i].text, batch[i].output_tokens) == (want.text, want.output_tokens), i
        assert (streamed[i].text, streamed[i].output_tokens) == (want.text, want.output_tokens), i
        assert want.output_tokens <= (budgets[i] or 10)
    assert {g.decoder for g in batch} == {"fast" if fast == "on" else "plain"}
