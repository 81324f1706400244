"""The contract every backend passes: same number of generations as requests, in order, with token counts
and a finish reason; identity is JSON; greedy generation is deterministic. The vLLM backend runs this suite
in its own environment (tests/test_vllm.py, `make test-vllm`)."""
import json

import pytest

from extractor.plugins import backend_class
from extractor.backends.base import GenParams, Request

PROMPTS = ["本科，java", "硕士及以上学历，计算机相关专业，熟练掌握python和go，有开源项目经验者优先。" * 3, "x", "3年以上"]


def check_contract(backend, schema=None):
    requests = [Request(f"<|im_start|>user\n{p}<|im_end|>\n<|im_start|>assistant\n", f"r{i}") for i, p in enumerate(PROMPTS)]
    params = GenParams(max_new_tokens=12)
    first = backend.generate(requests, params, schema)
    assert len(first) == len(requests)
    for gen, count in zip(first, backend.count_tokens([r.prompt for r in requests])):
        assert isinstance(gen.text, str) and gen.finish_reason in ("stop", "length")
        assert gen.prompt_tokens == count and 0 <= gen.output_tokens <= 12
        assert gen.finish_reason == "stop" or gen.output_tokens == 12
    # Order: generating the same requests reversed gives the same texts reversed.
    second = backend.generate(list(reversed(requests)), params, schema)
    assert [g.text for g in second] == [g.text for g in reversed(first)]
    json.dumps(backend.identity())
    return first


def test_hf_backend_contract(tiny_model):
    check_contract(backend_class("hf")(model=str(tiny_model), batch_size=2))


def test_echo_backend_contract(tmp_path):
    gold = tmp_path / "g.jsonl"
    gold.write_text("".join(json.dumps({"id": f"r{i}", "gold": {"k": i}}) + "\n" for i in range(len(PROMPTS))))
    backend = backend_class("echo")(model=str(gold))
    backend.count_tokens = lambda prompts: [len(p) for p in prompts]
    gens = check_contract(backend)
    assert [json.loads(g.text) for g in gens] == [{"k": i} for i in range(len(PROMPTS))]


def test_unknown_backend_suggests():
    from extractor.errors import ExtractorError
    with pytest.raises(ExtractorError, match="Did you mean 'vllm'"):
        backend_class("vlm")
