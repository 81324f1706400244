"""The `hf` backend's fast path: FastDecoder (backends/fast/) over the loaded weights. It takes greedy
decoding of the model types on its list (fast/families.py) with base weights, one LoRA adapter (merged),
several LoRA adapters mixed in one decoder (lora_mixed.py), or a prompt-learning adapter of a proven kind
(its virtual part first in the shared prefix). --fast auto (the default): anything else decodes plain
(hf_plain.py), said once on stderr; --fast on: that is one line and exit 2; --fast off: always plain.

It keeps the decoders, since they are the expensive part (cache, shared-prefix K/V, compiled code, CUDA
graphs): the decoder of the weights in use, one shared prefix at a time; the last adapter's decoder as a spare
for the next one (its prefix K/V recomputed); and the mixed adapters' decoder. A failure of the fast path
before any record is out hands the records to the plain path; after that it is one line and exit 2, the
output kept for --resume --fast off."""
from __future__ import annotations

import itertools
import sys

from extractor.backends.base import STOP, GenParams, Generation, Request
from extractor.backends.hf_plain import Loaded, PlainGenerator
from extractor.errors import ModelError

# Python's switch interval while the fast path decodes with a constraint (None: leave it). There the main
# thread mostly waits (on the GPU, on grammar workers' answers) and must take the GIL back from the writer
# thread (parsing, validating) as soon as an answer arrives; by default that can take 5 ms. Measured (run 19,
# docs/benchmarks.md): the constrained run path went from 29,812 to 34,129 output tok/s with 0.5 ms.
CONSTRAINED_SWITCH_INTERVAL: float | None = 0.0005


class FastPath:
    """The fast path over `loaded`'s weights; `plain` takes what it cannot. `ids_of(request)`: a request's
    token ids; `encode_batch(prompts)`: prompts' token ids; `say(line, key)`: a line on stderr, once per key."""

    def __init__(self, loaded: Loaded, plain: PlainGenerator, startup, ids_of, encode_batch, say):
        import torch
        self.torch = torch
        self.loaded, self.weights, self.knobs, self.plain = loaded, loaded.weights, loaded.knobs, plain
        self.startup, self.ids_of, self.encode_batch, self.say = startup, ids_of, encode_batch, say
        self.decoder = None  # the decoder of the weights in use
        self.spare = None  # the last adapter's decoder, kept for the next one (its cache, compiled code, graphs)
        self.mixed = None  # the mixed adapters' decoder (weights.mix), built on first use
        self.stale = False  # the weights changed in place since the decoder computed its prefix K/V
        self.plain_reason: str | None = None  # why records last went the plain way (None: --fast off)
        self.last_constraint = None  # the last constrained call's BatchConstraint (its stats: CPU time)

    # -- whether: --fast auto (default): wherever proven, else plain; on: fast or exit 2; off ------------------
    def refusal(self, params: GenParams) -> str | None:
        """Why this call does not take FastDecoder (None: it does)."""
        if self.knobs.fast_mode == "off":
            return "--fast off"
        if params.temperature > 0:
            return "sampling (--temperature > 0) decodes with plain generate"
        if self.weights.prompt_learning():
            from extractor.backends.prompt_learning import KINDS, kind
            if kind(self.weights.model) not in KINDS:
                return f"peft adapters of type {kind(self.weights.model)} decode with plain generate"
        from extractor.backends.fast.families import refusal
        # A LoRA adapter's layers are injected into the base: the base's forward runs them.
        return refusal(self.weights.base)

    def takes(self, params: GenParams) -> bool:
        reason = self.refusal(params)
        if reason is not None:
            self.go_plain(reason)
        return reason is None

    def go_plain(self, reason: str) -> None:
        """Plain generate from here on for this reason: said once on stderr; with --fast on, one line and exit 2."""
        self.plain_reason = None if reason == "--fast off" else reason
        if self.plain_reason is None:
            return
        if self.knobs.fast_mode == "on":
            raise ModelError(f"--fast on: {reason}; use --fast auto to decode with plain generate instead")
        self.say(f"fast path: {reason}; decoding with plain generate", key=reason)

    # -- a batch ------------------------------------------------------------------------------------------
    def generate(self, encoded: list[list[int]], budgets: list[int], params: GenParams,
                 schema=None) -> list[Generation]:
        from extractor.backends.fast import common_prefix
        from extractor.backends.fast.families import FastPathError
        prefix = common_prefix(encoded)
        need = max(len(e) + b for e, b in zip(encoded, budgets)) - len(prefix)
        try:
            decoder = self.decoder_for(prefix, need)
        except FastPathError as exc:
            self.go_plain(str(exc))
            return self.plain.generate(encoded, params, schema, self.plain_reason, budgets=budgets)
        constraint = self._constraint(params, schema)
        outs = decoder.generate([e[len(prefix):] for e in encoded], budgets, constraint=constraint)
        return [self._generation(len(ids), tokens, finish) for ids, (tokens, finish) in zip(encoded, outs)]

    # -- a stream -----------------------------------------------------------------------------------------
    def stream(self, requests, params: GenParams, schema, probes, peek: int, mixed: bool = False):
        """The fast path over one adapter's requests (mixed: the mixed adapters' and base requests, each row
        its own adapter's LoRA): later requests enter slots freed by earlier ones, so the GPU never drains.
        The shared prefix is the task template's (from the probes and the first `peek` requests); a record
        that does not start with it, or is longer than the cache, goes through the plain path, in batches."""
        from extractor.backends.fast import common_prefix
        from extractor.backends.fast.families import FastPathError
        first = list(itertools.islice(requests, peek))
        if not first:
            return
        flat = itertools.chain(first, requests)
        if not self.takes(params):
            yield from self.plain.stream(flat, self.ids_of, params, schema, lambda: self.plain_reason)
            return
        encoded_first = [self.ids_of(r) for r in first]
        prefix = common_prefix(encoded_first + self.encode_batch(list(probes)))
        own = max(len(e) + r.new_tokens(params) for e, r in zip(encoded_first, first)) - len(prefix)
        try:
            decoder = (self.mixed_decoder if mixed else self.decoder_for)(prefix, max(2 * own, 1024))
        except FastPathError as exc:
            self.go_plain(str(exc))
            yield from self.plain.stream(flat, self.ids_of, params, schema, lambda: self.plain_reason)
            return
        yield from self._run(decoder, prefix, flat, params, schema, mixed)

    def _run(self, decoder, prefix: list[int], flat, params: GenParams, schema, mixed: bool):
        """The decoder's loop over the stream, misfits through the plain path a batch at a time."""
        from extractor.backends.fast.families import FastPathError
        misfits: list[tuple[Request, list[int], str]] = []
        pending: dict[int, tuple[Request, int]] = {}
        batch = max(1, self.knobs.batch_size)

        def source():
            key = 0
            for request in flat:
                ids = self.ids_of(request)
                why = self.misfit(ids, prefix, request.new_tokens(params), decoder.unique_len)
                if why:
                    misfits.append((request, ids, why))
                    continue
                pending[key] = (request, len(ids))
                item = (key, ids[len(prefix):], request.new_tokens(params))
                yield (*item, self.weights.mix.lora.group(request.adapter)) if mixed else item
                key += 1

        def plain(items):
            return self.plain.pairs(items, params, schema, self.plain_reason)

        constraint = self._constraint(params, schema)
        interval = sys.getswitchinterval()
        if constraint is not None and CONSTRAINED_SWITCH_INTERVAL:
            sys.setswitchinterval(CONSTRAINED_SWITCH_INTERVAL)
        done = 0
        try:
            for key, tokens, finish in decoder.stream(source(), constraint=constraint):
                request, n_prompt = pending.pop(key)
                yield [(request, self._generation(n_prompt, tokens, finish))]
                done += 1
                if len(misfits) >= self.knobs.batch_size:
                    yield plain(misfits)
                    done += len(misfits)
                    misfits.clear()
        except (FastPathError, RuntimeError, ValueError, IndexError, TypeError) as exc:
            self.decoder = self.mixed = None
            first = str(exc).splitlines()[0][:160] if str(exc) else ""
            reason = f"the fast path failed ({type(exc).__name__}: {first})"
            if done or self.knobs.fast_mode == "on":
                raise ModelError(f"{reason} after {done} records; the output so far is kept: rerun with --resume "
                                 "--fast off to finish on the plain path") from None
            self.go_plain(reason)
            misfits += [(request, self.ids_of(request), reason) for request, _ in pending.values()]
            misfits += [(request, self.ids_of(request), reason) for request in flat]
        finally:
            sys.setswitchinterval(interval)
        for start in range(0, len(misfits), batch):
            yield plain(misfits[start:start + batch])

    @staticmethod
    def misfit(ids: list[int], prefix: list[int], budget: int, unique_len: int) -> str | None:
        """Why this record cannot go through the decoder (None: it can)."""
        if ids[: len(prefix)] != prefix or len(ids) == len(prefix):
            return "the record does not start with the task's shared prompt prefix"
        if len(ids) - len(prefix) + budget > unique_len:
            return "the record is longer than the fast path's cache"
        return None

    def _constraint(self, params: GenParams, schema):
        if not params.constrained:
            return None
        from extractor.constrain.batch import BatchConstraint
        self.last_constraint = BatchConstraint(self.loaded.grammar(schema))
        return self.last_constraint

    def _generation(self, prompt_tokens: int, tokens: list[int], finish: str) -> Generation:
        text = self.loaded.tokenizer.decode(tokens[:-1] if finish == STOP else tokens, skip_special_tokens=True)
        return Generation(text if finish == STOP else text.rstrip("\ufffd"), prompt_tokens, len(tokens), finish,
                          decoder="fast")

    # -- the decoders: kept while the weights they were built on last --------------------------------------
    def switching(self, keep_spare: bool) -> None:
        """The weights are about to change adapter: the decoder goes with them; kept as the spare when another
        adapter comes (its cache and compiled code serve it, its shared-prefix K/V recomputed)."""
        spare = self.decoder or self.spare
        self.decoder = self.mixed = None
        if keep_spare:
            self.spare = spare

    def drop_all(self) -> None:
        """Every decoder dropped: mixing adapters moves some base weights' storage (lora_mixed's fold)."""
        self.decoder = self.spare = self.mixed = None

    def weights_changed(self) -> None:
        """The weights changed in place: the decoder's prefix K/V recomputed before its next record."""
        self.stale = True
        self.spare = self.mixed = None

    def checkpoint_swapped(self) -> None:
        """Another checkpoint's weights copied into the model's tensors: the decoder's prefix K/V recomputed."""
        self.spare = self.mixed = None
        if self.decoder is not None:
            with self.startup.phase("recomputing the shared prefix"):
                self.decoder.reuse_for(None)

    def mixed_decoder(self, prefix: list[int], need: int):
        """The mixed adapters' decoder, kept while they are loaded; rebuilt for another prefix or a longer cache."""
        dec = self.mixed
        if dec is None or dec.prefix != prefix or dec.unique_len < need:
            self.mixed = None
            self.mixed = self._new_decoder(prefix, need, adapters=self.weights.mix.lora)
        return self.mixed

    def decoder_for(self, prefix: list[int], need: int):
        """One decoder per shared prefix, kept across calls (its cache, prefix KV and CUDA graphs are the
        expensive part); rebuilt when a call needs a longer cache."""
        self.weights.merge()

        def fits(dec) -> bool:
            return dec is not None and dec.prefix == prefix and dec.unique_len >= need
        if fits(self.decoder):
            if self.stale and not self.decoder.reuse_for(self._virtual()):
                self.decoder = None  # the virtual part changed shape: a decoder of its own
                return self.decoder_for(prefix, need)
            self.stale = False
            return self.decoder
        spare, self.spare = self.spare, None
        if fits(spare) and spare.reuse_for(self._virtual()):  # another adapter: same cache, K/V recomputed
            self.decoder = spare
            return spare
        self.decoder = spare = None  # the old one's memory free before the new one's is taken
        self.decoder = self._new_decoder(prefix, need, virtual=self._virtual())
        return self.decoder

    def _virtual(self):
        return self.weights.virtual_prefix(self.knobs.dtype)

    def _new_decoder(self, prefix: list[int], need: int, **kwargs):
        from extractor.backends.fast import FastDecoder, slots_for_memory
        knobs = self.knobs
        cuda = knobs.device.startswith("cuda")
        if cuda:
            self.torch.cuda.empty_cache()
        unique_len = -(-need // 64) * 64
        # Off CUDA the cache is host memory: --batch-size rows, at most --batch-tokens positions in all.
        slots = slots_for_memory(self.weights.base, unique_len, knobs.device) if cuda else \
            max(1, min(knobs.batch_size, knobs.batch_tokens // unique_len))
        compile = self.compiles(cuda)
        with self.startup.phase("compiling the fast path" if compile else "building the fast path",
                                f"({slots} slots of {unique_len} positions)"):
            dec = FastDecoder(self.weights.base, prefix, slots=slots, unique_len=unique_len,
                              eos_ids=self.loaded.eos_ids, compile=compile, **kwargs)
        dec.capture()
        return dec

    def compiles(self, cuda: bool) -> bool:
        """torch.compile around the layers' forward (`--compile`; from_loaded takes a bool): auto compiles on
        CUDA only where the run's output tokens repay the compile (startup.choose_compile); the choice and
        why go in the start-up record of the manifest."""
        from extractor.backends.startup import choose_compile
        setting = self.knobs.compile
        setting = setting if isinstance(setting, str) else ("on" if setting else "off")
        choice = choose_compile(setting, cuda, self.knobs.expected_tokens)
        self.startup.note("compile", choice.as_dict())
        return choice.compile
