"""`hf` backend: a local transformers model, with peft adapters. This module routes requests and switches
adapters; the decoding is elsewhere:
- hf_fast.py: FastDecoder for greedy decoding of the model types on fast/families.py's list (Llama, Mistral,
  Qwen2/3, Gemma, GLM, Phi-3, Granite, OLMo-2, Cohere, StableLM, SmolLM3, each proven by a test), with base
  weights, LoRA adapters (one merged, or several mixed) and proven prompt-learning kinds; CUDA graphs and
  compilation on CUDA only;
- hf_plain.py: everything else, through `generate` in length-sorted, token-budgeted, left-padded batches;
- hf_weights.py: the weights, the one place they change (adapters loaded, merged, mixed).

What decodes together is decided here and only here (`_runs`). The pipeline only tags each request with its
adapter (`Request.adapter`; pipeline/lanes.py places a record's requests side by side, one per adapter) and
asks `decodes_together` whether one pass over the corpus for several adapters pays off. Requests of LoRA
adapters that mix exactly (and base weights) decode in one mixed decoder; otherwise each adapter's run of
requests decodes with that adapter loaded, the stream read at most PEEK requests ahead."""
from __future__ import annotations

import sys
from collections import defaultdict, deque
from contextlib import nullcontext
from pathlib import Path

from extractor.backends.base import GenParams, Generation, Lookahead, Request, TokenizerBackend, name_adapters
from extractor.backends.hf_fast import FastPath
from extractor.backends.hf_plain import Knobs, Loaded, PlainGenerator
from extractor.backends.hf_weights import Weights
from extractor.backends.model_files import (check_adapter_dir, check_model_dir, check_quantization, file_fingerprint,
                                            load_tokenizer)
from extractor.backends.model_load import load_base_model, resolve_device, resolve_dtype
from extractor.errors import ModelError

IN_USE = object()  # a request's key when it names no adapter in a call that names none: the adapter in use
TOGETHER = object()  # a run's key when its requests name several adapters, decoded mixed in one decoder


def _knob(name: str) -> property:
    """An attribute that is the backend's Knobs field of that name, where both decoding paths read it."""
    return property(lambda self: getattr(self.knobs, name), lambda self, value: setattr(self.knobs, name, value))


class HFBackend(TokenizerBackend):
    name = "hf"
    supports_constrained = True
    mixes_adapters = True  # requests naming different adapters (or None: base) may share one call or stream
    swaps_checkpoints = True  # use_checkpoint: weights loaded in place, decoder and compiled code kept
    quantizes = True  # --quantize fp8 (backends/quant/fp8.py)
    PEEK = 256  # requests looked at ahead: which adapters come next, the shared prefix and the cache length

    def __init__(self, model: str, adapters=(), dtype: str = "auto", device: str = "auto",
                 trust_remote_code: bool = False, batch_size: int = 32, batch_tokens: int = 32768,
                 fast: str = "auto", compile: str | bool = "auto", quiet: bool = False, quantize: str = "none", **_):
        check_model_dir(Path(model))  # before torch is imported: a broken folder is refused in a second
        check_quantization(Path(model))  # and a quantization_config this backend does not read
        self.quantize = quantize  # none, fp8 (fp8-emulated from Python): backends/quant/fp8.py
        from extractor.backends.startup import Startup
        self.startup = Startup(say=not quiet and sys.stderr.isatty())  # in logs the manifest has the times
        # A phase only where this imports them: the command's checks may have (then began_at_process_s holds it)
        imported = "transformers" in sys.modules
        with nullcontext() if imported else self.startup.phase("importing torch and transformers"):
            import torch
            from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
        self.torch = torch
        self.model_path = Path(model)
        self.adapter_paths = name_adapters(adapters, check_adapter_dir)
        self.knobs = Knobs(resolve_device(device), None, batch_size, batch_tokens, fast, compile)
        self.dtype = resolve_dtype(dtype, self.device)
        self.trust_remote_code = trust_remote_code
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(1) as pool:  # the tokenizer is read while the weights load
            tokenizer = pool.submit(load_tokenizer, self.model_path, trust_remote_code)
            base = self._load_weights(self.model_path)
            self.tokenizer = tokenizer.result()
        self._attach(base, self.tokenizer)

    def _load_weights(self, path: Path):
        return load_base_model(path, self.dtype, self.device, self.trust_remote_code, self.startup, self.quantize)

    @classmethod
    def from_loaded(cls, model, tokenizer, model_path: str | Path, batch_size: int = 32,
                    batch_tokens: int = 32768, fast: str = "auto", compile: bool = False) -> "HFBackend":
        """Wrap a model already in memory (training's F1 evaluation) in the same generation code, fast path
        included: a peft model being trained (LoRA, P-tuning, prefix or prompt tuning) is its adapter.
        compile: off by default, since a checkpoint's evaluation is short and compiling would cost more."""
        import torch

        from extractor.backends.startup import Startup
        self = cls.__new__(cls)
        self.torch = torch
        self.model_path = Path(model_path)
        self.adapter_paths = {}
        parameter = next(model.parameters())
        self.knobs = Knobs(str(parameter.device), parameter.dtype, batch_size, batch_tokens, fast, compile)
        self.trust_remote_code = False
        self.startup = Startup(say=False)
        self._attach(model, tokenizer)
        if hasattr(model, "peft_config") and hasattr(model, "get_base_model"):
            self.weights.hand_over(model)
        return self

    def _attach(self, model, tokenizer) -> None:
        self._said: set[str] = set()
        self.weights = Weights(model, self.model_path, self.adapter_paths, self.device, self._say_once)
        self.tokenizer = tokenizer
        self.base.eval()
        self.loaded = Loaded.attach(self.weights, tokenizer, self.knobs)
        self.eos_ids = self.loaded.eos_ids
        self.plain = PlainGenerator(self.loaded)
        self.fast = FastPath(self.loaded, self.plain, self.startup, self._ids,
                             lambda prompts: self.encoder().encode_batch(prompts), self._say_once)

    # The settings both decoding paths read (hf_plain.Knobs), by their constructor names.
    device, dtype, batch_size = _knob("device"), _knob("dtype"), _knob("batch_size")
    batch_tokens, fast_mode, compile = _knob("batch_tokens"), _knob("fast_mode"), _knob("compile")
    # What decodes (hf_weights.Weights owns them): the model, the base model under it, the adapter in it.
    model = property(lambda self: self.weights.model)
    base = property(lambda self: self.weights.base)
    adapter = property(lambda self: self.weights.adapter)
    # The fast path's decoders and last constraint (hf_fast.FastPath owns them), for tests and benches.
    _fast_decoder = property(lambda self: self.fast.decoder)
    _mix_decoder = property(lambda self: self.fast.mixed)
    last_constraint = property(lambda self: self.fast.last_constraint)

    def _compiles(self, cuda: bool) -> bool:
        return self.fast.compiles(cuda)

    def startup_record(self) -> dict | None:
        return self.startup.as_dict()

    def expect(self, records: int | None, params: GenParams) -> None:
        """How many records the run will decode at most (None: unknown): what `--compile auto` weighs."""
        self.knobs.expected_tokens = None if records is None else records * params.max_new_tokens

    # -- the weights ----------------------------------------------------------------------------------------
    def use_checkpoint(self, path: Path) -> None:
        """Another full checkpoint of the same architecture and tokenizer, its weights copied into the loaded
        model's own tensors: the decoder keeps its cache, compiled code and graphs; its shared-prefix K/V
        are recomputed. Anything else is refused in one line (run that checkpoint in its own command)."""
        from extractor.backends.checkpoint_swap import check_swappable, load_in_place
        from extractor.backends.startup import size_text
        path = Path(path)
        check_swappable(self.model_path, path)
        if self.quantization() is not None:  # an in-place copy would bypass the FP8 scales or the dequantization
            raise ModelError("several --model with --quantize or a quantized checkpoint: run each checkpoint in a "
                             "command of its own")
        if self.adapter_paths:
            raise ModelError("several --model with --adapter: score each checkpoint's adapters in a command of its own")
        # No adapter can be loaded here, so the decoder stays with the model (use_adapter would drop it).
        size = sum(p.stat().st_size for p in path.glob("*.safetensors"))
        with self.startup.phase("switching weights", f"{size_text(size)} from {path}"):
            load_in_place(self.base, path)
        self.model_path = self.weights.model_path = path
        self.fast.checkpoint_swapped()

    def weights_changed(self) -> None:
        """The model's own tensors were updated in place (a training step): decoders keep their cache,
        graphs and compiled code, which read those tensors; the shared prefix's K/V and a prompt-learning
        adapter's virtual part are recomputed before the next record. Training scores every checkpoint
        through one backend so, that the fast path's first-use cost is paid once per training."""
        self.weights.trained()
        self.fast.weights_changed()

    # -- identity and adapters ----------------------------------------------------------------------------
    def identity(self, adapter: str | None = None) -> dict:
        """The weights requests naming `adapter` decode with (None: base weights). --fast is left out: both
        paths decode the same tokens, and a run the fast path stopped part-way must resume with --fast off.
        Which path each record took is in the manifest's summary."""
        ident = {"backend": self.name, "model": file_fingerprint(self.model_path),
                 "dtype": str(self.dtype).replace("torch.", ""), "trust_remote_code": self.trust_remote_code}
        if adapter in self.adapter_paths:
            ident["adapter"] = {"name": adapter, **file_fingerprint(self.adapter_paths[adapter])}
        if self.quantization() is not None:
            ident["quantization"] = self.quantization()
        return ident

    def quantization(self) -> dict | None:
        """What was done to the weights at load (FP8 layers; a quantized checkpoint dequantized); None: nothing."""
        from extractor.backends.quant import description
        return description(self.base)

    def use_adapter(self, name: str | None) -> None:
        """Swap adapters on the one base model (hf_weights.Weights.use). The decoder goes with the weights it
        was built on; switching to another adapter keeps it as the spare (its cache and compiled code serve
        the next adapter, its shared-prefix K/V recomputed)."""
        self.fast.switching(keep_spare=name is not None)
        self.weights.use(name)

    def max_input_tokens(self, params: GenParams, adapter: str | None = None) -> int | None:
        limit = getattr(self.base.config, "max_position_embeddings", None)
        return None if limit is None else limit - params.max_new_tokens - self.weights.virtual_tokens(adapter)

    def decodes_together(self, adapters: list[str], params: GenParams) -> bool:
        """Only LoRA adapters that mix exactly in one FastDecoder (else each switch re-merges the weights and
        drains the decoder: one adapter after another is faster)."""
        return self.mixes_adapters and self._mixes(list(adapters), params)

    def _mixes(self, keys: list, params: GenParams) -> bool:
        """Whether requests of these keys (adapter names, None: base) decode mixed in one FastDecoder: two
        or more sets of weights, at least one a LoRA adapter, all of them mixable exactly (else said in one
        line, and they decode one adapter at a time); loads them if another set is loaded."""
        names = [k for k in keys if k is not None]
        if IN_USE in keys or len(keys) < 2 or not names or any(n not in self.adapter_paths for n in names):
            return False
        if self.weights.mixing(names):
            return True
        if self.fast_mode == "off" or params.temperature > 0:
            return False  # the per-adapter path says why it goes plain
        from extractor.backends.fast.families import refusal
        if refusal(self.base) is not None or self.weights.refuses_mix(names):
            return False
        self.use_adapter(None)
        self.fast.drop_all()
        return self.weights.load_mix(names)

    # -- generation: what decodes together ------------------------------------------------------------------
    @staticmethod
    def _key(request: Request, named: bool):
        """The weights a request decodes with: its adapter; None is base weights once the call (stream) has
        named an adapter, else the adapter in use (IN_USE: nothing switched)."""
        return request.adapter if request.adapter is not None or named else IN_USE

    def _runs(self, requests, params: GenParams, window: int):
        """(key, requests) runs that decode together, in order: a run of one adapter's requests (key: its
        name, None for base weights, IN_USE) lasts as long as the stream keeps naming it; TOGETHER: requests
        of adapters mixed in one decoder, as long as they last; where the next `window` requests name
        several adapters that do not mix, each one's requests of that window in turn."""
        source = Lookahead(requests)
        named = False
        while ahead := source.peek(window):
            named = named or any(r.adapter is not None for r in ahead)
            keys = list(dict.fromkeys(self._key(r, named) for r in ahead))
            if len(keys) > 1 and self._mixes(keys, params):
                members = set(self.weights.mix.names) | {None}
                yield TOGETHER, source.take_while(lambda r: r.adapter in members)
            elif len(keys) == 1:
                yield keys[0], source.take_while(lambda r, key=keys[0], named=named: self._key(r, named) == key)
            else:
                ahead = source.take(len(ahead))
                for key in keys:
                    yield key, iter([r for r in ahead if self._key(r, named) == key])

    def _switch(self, key) -> None:
        if key is not TOGETHER and key is not IN_USE and key != self.adapter:
            self.use_adapter(key)

    def generate(self, requests: list[Request], params: GenParams, schema: dict | None = None) -> list[Generation]:
        """Requests naming different adapters: served per adapter (in order of first appearance), each
        generation the one a run of that adapter alone gives, or mixed in one decoder."""
        out: dict[int, deque] = defaultdict(deque)
        for key, run in self._runs(requests, params, window=max(1, len(requests))):
            run = list(run)
            self._switch(key)
            if key is TOGETHER:
                pairs = [p for ps in self.fast.stream(iter(run), params, schema, (), self.PEEK, mixed=True) for p in ps]
            else:
                pairs = zip(run, self._generate_one(run, params, schema))
            for request, gen in pairs:
                out[id(request)].append(gen)
        return [out[id(r)].popleft() for r in requests]

    def _generate_one(self, requests: list[Request], params: GenParams, schema) -> list[Generation]:
        """One adapter's requests (the one in use), fast where it takes them, else plain."""
        encoded = [self._ids(r) for r in requests]
        budgets = [r.new_tokens(params) for r in requests]
        if encoded and self.fast.takes(params):
            return self.fast.generate(encoded, budgets, params, schema)
        return self.plain.generate(encoded, params, schema, self.fast.plain_reason, budgets=budgets)

    def generate_stream(self, requests, params: GenParams, schema: dict | None = None, probes: list[str] = ()):
        """Each run (`_runs`) streams through one decoder for as long as it lasts, so the stream is read a
        bounded window ahead, never whole."""
        for key, run in self._runs(requests, params, window=self.PEEK):
            self._switch(key)
            yield from self.fast.stream(run, params, schema, probes, self.PEEK, mixed=key is TOGETHER)

    def grammar(self, schema: dict):
        """The compiled grammar of a JSON schema, built once per schema."""
        return self.loaded.grammar(schema)

    def _say_once(self, line: str, key: str | None = None) -> None:
        """A line on stderr, once per backend for its key (default: the line itself)."""
        key = line if key is None else key
        if key not in self._said:
            self._said.add(key)
            print(line, file=sys.stderr, flush=True)
