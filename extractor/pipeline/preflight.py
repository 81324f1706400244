"""Checks before loading: what can fail without the model's weights fails in the first seconds, before they
load. An output that is already there (without --resume or --overwrite), a --resume whose settings differ,
and (hf) a prompt over the length limit, found with the model's tokenizer alone. The run itself checks all
of it again with the loaded backend: these checks only move the failure earlier, they decide nothing."""
from __future__ import annotations

import json
from pathlib import Path

from extractor.backends.base import Backend, GenParams, TokenizerBackend
from extractor.errors import ManifestError, ModelError
from extractor.pipeline.lanes import Lane
from extractor.pipeline.one_pass import shard_windows
from extractor.pipeline.renderer import Renderer
from extractor.pipeline.run import key_differences, output_store, run_key
from extractor.store.provenance import manifest_path

# peft's prompt-learning types, whose virtual tokens come before every prompt (prompt_learning.KINDS, which
# imports torch: kept equal to it by a test)
PROMPT_LEARNING = ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING")


def refuse_existing(outs, resume: bool, overwrite: bool) -> None:
    """An output already there needs --resume or --overwrite: said before anything loads."""
    if resume or overwrite:
        return
    for out in outs:
        if output_store(out).exists():
            raise ManifestError(f"{out} already exists; pass --resume to continue it or --overwrite to start over")


class TokenizerView(TokenizerBackend):
    """An hf backend as far as its tokenizer and config go: the prompt format, token counts and length limit
    (model context - max new tokens - an adapter's virtual tokens, as `HFBackend.max_input_tokens`), no
    weights. `identity` is the one thing it cannot give: the dtype `auto` resolves to needs torch."""

    name = "hf"
    supports_constrained = True

    def __init__(self, model: str, adapters=(), trust_remote_code: bool = False, name: str = "hf"):
        from extractor.backends.base import name_adapters
        from extractor.backends.model_files import check_adapter_dir, check_model_dir, load_tokenizer
        self.name = name
        self.model_path = Path(model)
        check_model_dir(self.model_path)
        self.adapter_paths = name_adapters(adapters, check_adapter_dir)
        self.tokenizer = load_tokenizer(self.model_path, trust_remote_code)
        self.context = self._context(trust_remote_code)

    def _context(self, trust_remote_code: bool) -> int | None:
        from transformers import AutoConfig
        try:
            config = AutoConfig.from_pretrained(self.model_path, trust_remote_code=trust_remote_code)
        except Exception:  # noqa: BLE001 - the backend reports a config it cannot read, in its own words
            return None
        return getattr(config, "max_position_embeddings", None)

    def max_input_tokens(self, params: GenParams, adapter: str | None = None) -> int | None:
        if self.context is None or self.name != "hf":  # vllm's limit is its engine's max_model_len
            return None
        return self.context - params.max_new_tokens - self._virtual_tokens(adapter)

    def _virtual_tokens(self, adapter: str | None) -> int:
        if adapter not in self.adapter_paths:
            return 0
        try:
            config = json.loads((self.adapter_paths[adapter] / "adapter_config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ModelError(f"{self.adapter_paths[adapter]}/adapter_config.json: cannot read ({exc}); fix or "
                             "replace the adapter") from None
        kind_is_virtual = isinstance(config, dict) and config.get("peft_type") in PROMPT_LEARNING
        return int(config.get("num_virtual_tokens") or 0) if kind_is_virtual else 0

    def identity(self, adapter: str | None = None) -> dict:
        raise NotImplementedError("the weights' identity is the loaded backend's")


class NoTokenizer(Backend):
    """A backend without a local tokenizer (echo, openai) as far as rendering goes: the raw or chat messages
    as text, lengths in characters."""

    supports_constrained = True

    def __init__(self, name: str):
        self.name = name

    def identity(self, adapter: str | None = None) -> dict:
        raise NotImplementedError("the backend's identity is the loaded backend's")


def check_resume(outs, keys: list[dict]) -> None:
    """--resume of outputs already there: every run-key entry but the backend's identity compared now (the
    loaded backend compares the whole key again)."""
    for out, key in zip(outs, keys):
        store = output_store(out)
        if not store.exists():
            continue
        try:
            old = json.loads(store.manifest_text())["run_key"]
        except Exception:  # noqa: BLE001 - a missing or broken manifest is the run's to report, in its words
            continue
        if not isinstance(old, dict) or (key.get("corpus") or {}).get("stream"):
            continue
        old = {k: v for k, v in old.items() if k != "backend"}
        diff = key_differences(old, {k: v for k, v in key.items() if k != "backend"})
        if diff:
            raise ManifestError(f"{out}: --resume refused, this run differs from the one that wrote it in: "
                                f"{', '.join(diff)}; rerun with the same settings or use another --out "
                                f"(manifest: {manifest_path(out).name})")


def partial_key(task, lane: Lane, opts) -> dict:
    """The run key without the backend's identity."""
    class _NoIdentity:
        def identity(self, adapter=None):
            return None
    return run_key(task, _NoIdentity(), lane, opts)


def check_first_window(renderer: Renderer, opts) -> None:
    """Render and length-check the records the run starts with (its first window, within --limit): a
    prompt over the limit with --on-long fail, a record the task cannot render, a bad record with
    --on-bad-record fail, all fail here. Nothing is written (no rejects file)."""
    from extractor.store.corpus import CorpusReader
    n = min(opts.window, opts.limit or opts.window)
    reader = CorpusReader(opts.corpus, renderer.task.spec.input_fields, opts.id_field, opts.text_field,
                          opts.on_bad, None, batch_size=n)
    for window in shard_windows(reader, opts.shard):
        if window:
            renderer.render(window[:n])
            return
