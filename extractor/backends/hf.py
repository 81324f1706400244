"""`hf` backend: transformers (+ peft adapters). Greedy base-weight runs of Llama/Qwen2-style models go
through FastDecoder (`--fast`, fast.py; CUDA graphs and compilation on CUDA only); everything else through
`generate` in length-sorted, token-budgeted, left-padded batches."""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

from extractor.backends.base import LENGTH, STOP, GenParams, Generation, Request, TokenizerBackend, name_adapters
from extractor.errors import ModelError

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt")


def check_model_dir(path: Path) -> None:
    """Fail before any work when a model directory is unusable."""
    if not path.is_dir():
        raise ModelError(f"model directory '{path}' does not exist; pass a local Hugging Face model folder")
    if not (path / "config.json").is_file():
        raise ModelError(f"{path}: no config.json; is this a Hugging Face model folder?")
    if not any(any(path.glob(p)) for p in WEIGHT_PATTERNS):
        raise ModelError(f"{path}: no weight files (*.safetensors or *.bin); the download or save is incomplete")
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise ModelError(f"{path}: no tokenizer files; save the tokenizer beside the model")


def check_adapter_dir(path: Path) -> None:
    if not (path / "adapter_config.json").is_file():
        raise ModelError(f"adapter '{path}' has no adapter_config.json; pass a folder saved by peft's save_pretrained")


def file_fingerprint(path: Path) -> dict:
    """Cheap identity of a model or adapter folder: config hash plus weight file names and sizes."""
    config = path / ("adapter_config.json" if (path / "adapter_config.json").is_file() else "config.json")
    weights = sorted((p.name, p.stat().st_size) for pattern in WEIGHT_PATTERNS for p in path.glob(pattern))
    return {"path": str(path.resolve()),
            "config_sha": hashlib.sha256(config.read_bytes()).hexdigest()[:16],
            "weights": [f"{n}:{s}" for n, s in weights]}


# Python's switch interval while the fast path decodes with a constraint (None: leave it). There the main
# thread mostly waits (on the GPU, on grammar workers' answers) and must take the GIL back from the writer
# thread (parsing, validating) as soon as an answer arrives; by default that can take 5 ms. Measured (run 19,
# docs/benchmarks.md): the constrained run path went from 29,812 to 34,129 output tok/s with 0.5 ms.
CONSTRAINED_SWITCH_INTERVAL: float | None = 0.0005


class HFBackend(TokenizerBackend):
    name = "hf"
    supports_constrained = True

    def __init__(self, model: str, adapters=(), dtype: str = "auto", device: str = "auto",
                 trust_remote_code: bool = False, batch_size: int = 32, batch_tokens: int = 32768,
                 fast: str = "auto", **_):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
        self.torch = torch
        self.model_path = Path(model)
        check_model_dir(self.model_path)
        self.adapter_paths = name_adapters(adapters, check_adapter_dir)
        self.device = self._device(device)
        self.dtype = self._dtype(dtype)
        self.trust_remote_code = trust_remote_code
        self.batch_size, self.batch_tokens = batch_size, batch_tokens
        self.fast_mode = fast
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.model_path, trust_remote_code=trust_remote_code)
            self.base = AutoModelForCausalLM.from_pretrained(
                self.model_path, dtype=self.dtype, trust_remote_code=trust_remote_code,
                use_safetensors=any(self.model_path.glob("*.safetensors")) or None).to(self.device)
        except (OSError, ValueError, AttributeError, ImportError, KeyError, RuntimeError) as exc:
            first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            raise ModelError(f"{self.model_path}: cannot load ({first})") from None
        self._attach(self.base, self.tokenizer)

    @classmethod
    def from_loaded(cls, model, tokenizer, model_path: str | Path, batch_size: int = 32,
                    batch_tokens: int = 32768) -> "HFBackend":
        """Wrap a model already in memory (training's F1 evaluation) in the same generation code."""
        import torch
        self = cls.__new__(cls)
        self.torch = torch
        self.model_path = Path(model_path)
        self.adapter_paths = {}
        self.device = str(next(model.parameters()).device)
        self.dtype = next(model.parameters()).dtype
        self.trust_remote_code = False
        self.batch_size, self.batch_tokens = batch_size, batch_tokens
        self.fast_mode = "off"
        self._attach(model, tokenizer)
        return self

    def _attach(self, model, tokenizer) -> None:
        self.base, self.tokenizer = model, tokenizer
        self.base.eval()
        self._check_tokenizer()
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.eos_ids = self._eos_ids()
        self.model = self.base
        self.adapter = None
        self._grammars: dict[str, object] = {}
        self._fast_decoder = None

    # -- setup ---------------------------------------------------------------------------------------
    def _device(self, device: str) -> str:
        torch = self.torch
        if device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ModelError(f"--device {device} asked for but no CUDA device is available; use --device cpu")
        return device

    def _dtype(self, dtype: str):
        torch = self.torch
        if dtype == "auto":
            if self.device.startswith("cuda"):
                return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            return torch.float32
        if dtype not in DTYPES:
            raise ModelError(f"unknown --dtype '{dtype}'; use auto, bf16, fp16 or fp32")
        return getattr(torch, DTYPES[dtype])

    def _check_tokenizer(self) -> None:
        vocab = self.base.get_input_embeddings().weight.shape[0]
        if len(self.tokenizer) > vocab:
            raise ModelError(f"{self.model_path}: tokenizer has {len(self.tokenizer)} tokens but the model's "
                             f"embedding has {vocab}; the tokenizer does not belong to this model")

    def _eos_ids(self) -> list[int]:
        ids = self.base.generation_config.eos_token_id
        ids = [ids] if isinstance(ids, int) else list(ids or [])
        if self.tokenizer.eos_token_id is not None and self.tokenizer.eos_token_id not in ids:
            ids.append(self.tokenizer.eos_token_id)
        if not ids:
            raise ModelError(f"{self.model_path}: neither the generation config nor the tokenizer names an EOS token")
        return ids

    # -- identity and adapters ----------------------------------------------------------------------------
    def identity(self) -> dict:
        ident = {"backend": self.name, "model": file_fingerprint(self.model_path),
                 "dtype": str(self.dtype).replace("torch.", ""), "trust_remote_code": self.trust_remote_code,
                 "fast": self.fast_mode}
        if self.adapter is not None:
            ident["adapter"] = {"name": self.adapter, **file_fingerprint(self.adapter_paths[self.adapter])}
        return ident

    def use_adapter(self, name: str | None) -> None:
        """Swap adapters on the one base model: LoRA layers are unloaded, prompt-learning wrappers dropped."""
        from peft import PeftModel
        if self.adapter is not None:
            self.base = self.model.unload() if hasattr(self.model, "unload") and not self._prompt_learning() \
                else self.model.get_base_model()
            self.model, self.adapter = self.base, None
        if name is None:
            return
        try:
            self.model = PeftModel.from_pretrained(self.base, self.adapter_paths[name]).to(self.device)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise ModelError(f"adapter '{self.adapter_paths[name]}' cannot be loaded on {self.model_path} "
                             f"({str(exc).splitlines()[0][:200]})") from None
        self.model.eval()
        self.adapter = name

    def _prompt_learning(self) -> bool:
        config = getattr(self.model, "peft_config", {}).get("default")
        return bool(config and config.is_prompt_learning)

    def _virtual_tokens(self) -> int:
        return self.model.peft_config["default"].num_virtual_tokens if self._prompt_learning() else 0

    # -- tokens --------------------------------------------------------------------------------------
    def max_input_tokens(self, params: GenParams) -> int | None:
        limit = getattr(self.base.config, "max_position_embeddings", None)
        return None if limit is None else limit - params.max_new_tokens - self._virtual_tokens()

    # -- generation ----------------------------------------------------------------------------------
    def generate(self, requests: list[Request], params: GenParams, schema: dict | None = None) -> list[Generation]:
        encoded = [self._ids(r) for r in requests]
        if encoded and self._use_fast(params):
            return self._generate_fast(encoded, params, schema)
        return self._generate_plain(encoded, params, schema)

    def _generate_plain(self, encoded: list[list[int]], params: GenParams, schema) -> list[Generation]:
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        results: list[Generation | None] = [None] * len(encoded)
        for batch in self._batches(order, encoded, params.max_new_tokens):
            for i, gen in zip(batch, self._generate_safe([encoded[i] for i in batch], params, schema)):
                results[i] = gen
        return results

    # -- the fast path: --fast auto (default) and on: wherever the model and decoding allow it; off ------------
    def _use_fast(self, params: GenParams) -> bool:
        """Greedy decoding with base weights of a Llama/Qwen2-style model (constrained or not): FastDecoder."""
        if self.fast_mode == "off" or params.temperature > 0 or self.adapter is not None:
            return False
        from extractor.backends.fast import supports
        return supports(self.base)

    def _generate_fast(self, encoded: list[list[int]], params: GenParams, schema=None) -> list[Generation]:
        from extractor.backends.fast import common_prefix
        prefix = common_prefix(encoded)
        need = max(len(e) for e in encoded) - len(prefix) + params.max_new_tokens
        decoder = self._decoder(prefix, need)
        outs = decoder.generate([e[len(prefix):] for e in encoded], params.max_new_tokens,
                                constraint=self._constraint(params, schema))
        return [self._generation(len(ids), tokens, finish) for ids, (tokens, finish) in zip(encoded, outs)]

    def _ids(self, request: Request) -> list[int]:
        ids = request.options.get("ids")
        return ids if ids is not None else self._encode(request.prompt)

    def _constraint(self, params: GenParams, schema):
        if not params.constrained:
            return None
        from extractor.constrain_batch import BatchConstraint
        self.last_constraint = BatchConstraint(self.grammar(schema))  # its stats: where the CPU time went
        return self.last_constraint

    def _generation(self, prompt_tokens: int, tokens: list[int], finish: str) -> Generation:
        text = self.tokenizer.decode(tokens[:-1] if finish == STOP else tokens, skip_special_tokens=True)
        return Generation(text if finish == STOP else text.rstrip("\ufffd"), prompt_tokens, len(tokens), finish)

    def generate_stream(self, batches, params: GenParams, schema: dict | None = None, probes: list[str] = ()):
        """The fast path over a whole run: records from later batches enter slots freed by earlier ones, so
        the GPU never drains between batches. The shared prefix is the task template's (from the probes and
        the first batch); a record that does not start with it, or is longer than the cache, goes through
        the plain path, in batches."""
        import itertools

        from extractor.backends.fast import common_prefix
        batches = iter(batches)
        first = next(batches, None)
        if first is None:
            return
        batches = itertools.chain([first], batches)
        if not first or not self._use_fast(params):
            yield from super().generate_stream(batches, params, schema)
            return
        encoded_first = [self._ids(r) for r in first]
        prefix = common_prefix(encoded_first + [self._encode(p) for p in probes])
        own = max(len(e) for e in encoded_first) - len(prefix) + params.max_new_tokens
        decoder = self._decoder(prefix, max(2 * own, 1024))
        misfits: list[tuple[Request, list[int]]] = []
        pending: dict[int, tuple[Request, int]] = {}

        def source():
            key = 0
            for batch in batches:
                for request in batch:
                    ids = self._ids(request)
                    if ids[: len(prefix)] != prefix or len(ids) - len(prefix) + params.max_new_tokens > \
                            decoder.unique_len or len(ids) == len(prefix):
                        misfits.append((request, ids))
                        continue
                    pending[key] = (request, len(ids))
                    yield key, ids[len(prefix):], params.max_new_tokens
                    key += 1

        def plain(items):
            gens = self._generate_plain([ids for _, ids in items], params, schema)
            return [(request, gen) for (request, _), gen in zip(items, gens)]

        constraint = self._constraint(params, schema)
        interval = sys.getswitchinterval()
        if constraint is not None and CONSTRAINED_SWITCH_INTERVAL:
            sys.setswitchinterval(CONSTRAINED_SWITCH_INTERVAL)
        try:
            for key, tokens, finish in decoder.stream(source(), constraint=constraint):
                request, n_prompt = pending.pop(key)
                yield [(request, self._generation(n_prompt, tokens, finish))]
                if len(misfits) >= self.batch_size:
                    yield plain(misfits)
                    misfits.clear()
        finally:
            sys.setswitchinterval(interval)
        if misfits:
            yield plain(misfits)

    def _decoder(self, prefix: list[int], need: int):
        """One decoder per shared prefix, kept across calls (its cache, prefix KV and CUDA graphs are the
        expensive part); rebuilt when a call needs a longer cache."""
        from extractor.backends.fast import FastDecoder, slots_for_memory
        dec = self._fast_decoder
        if dec is not None and dec.prefix == prefix and dec.unique_len >= need:
            return dec
        self._fast_decoder = dec = None
        cuda = self.device.startswith("cuda")
        if cuda:
            self.torch.cuda.empty_cache()
        unique_len = -(-need // 64) * 64
        # Off CUDA the cache is host memory: --batch-size rows, at most --batch-tokens positions in all.
        slots = slots_for_memory(self.base, unique_len, self.device) if cuda else \
            max(1, min(self.batch_size, self.batch_tokens // unique_len))
        dec = FastDecoder(self.base, prefix, slots=slots, unique_len=unique_len, eos_ids=self.eos_ids)
        dec.capture()
        self._fast_decoder = dec
        return dec

    def _batches(self, order: list[int], encoded: list[list[int]], max_new: int):
        """Consecutive runs of the length-sorted order, each under the batch size and the token budget."""
        batch: list[int] = []
        for i in order:
            longest = len(encoded[i]) + max_new  # sorted ascending: the newest is the longest
            if batch and (len(batch) + 1 > self.batch_size or (len(batch) + 1) * longest > self.batch_tokens):
                yield batch
                batch = []
            batch.append(i)
        if batch:
            yield batch

    def _generate_safe(self, batch: list[list[int]], params: GenParams, schema) -> list[Generation]:
        """Out of memory: split the batch in halves; a single record that still fails gets an error."""
        try:
            return self._generate_batch(batch, params, schema)
        except self.torch.OutOfMemoryError:
            if self.device.startswith("cuda"):
                self.torch.cuda.empty_cache()
            if len(batch) == 1:
                return [Generation("", len(batch[0]), 0, STOP, error="out of memory on this record")]
            mid = len(batch) // 2
            return self._generate_safe(batch[:mid], params, schema) + self._generate_safe(batch[mid:], params, schema)

    def _generate_batch(self, batch: list[list[int]], params: GenParams, schema) -> list[Generation]:
        torch = self.torch
        width = max(len(ids) for ids in batch)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in batch], device=self.device)
        attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch], device=self.device)
        kwargs = {"max_new_tokens": params.max_new_tokens, "pad_token_id": pad, "eos_token_id": self.eos_ids}
        if params.temperature > 0:
            torch.manual_seed(params.seed)
            kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if params.constrained:
            from extractor.constrain import SchemaLogitsProcessor
            kwargs["logits_processor"] = [SchemaLogitsProcessor(self.grammar(schema), params.max_new_tokens)]
        with torch.inference_mode():
            out = self.model.generate(input_ids=input_ids, attention_mask=attention, **kwargs)
        new_tokens = out[:, width:].tolist()
        return [self._finish(ids, tokens) for ids, tokens in zip(batch, new_tokens)]

    def _finish(self, prompt: list[int], tokens: list[int]) -> Generation:
        for n, tok in enumerate(tokens):
            if tok in self.eos_ids:
                text = self.tokenizer.decode(tokens[:n], skip_special_tokens=True)
                return Generation(text, len(prompt), n + 1, STOP)
        # A cut-off output can end inside a multi-byte character; drop its replacement character, as vLLM's
        # incremental detokenizer does, so both backends return the same text.
        text = self.tokenizer.decode(tokens, skip_special_tokens=True).rstrip("\ufffd")
        return Generation(text, len(prompt), len(tokens), LENGTH)

    def grammar(self, schema: dict):
        key = json.dumps(schema, sort_keys=True)
        if key not in self._grammars:
            from extractor.constrain import Grammar
            vocab = self.base.get_output_embeddings().weight.shape[0]
            self._grammars[key] = Grammar(schema, self.tokenizer, vocab, self.eos_ids)
        return self._grammars[key]
