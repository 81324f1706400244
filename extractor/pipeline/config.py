"""`extractor run`'s settings as one typed object, built once from the command line and passed down (to the
backend, the `Run`, the Ray runner) instead of threading each option through every call."""
from __future__ import annotations

from dataclasses import dataclass, fields

from extractor.store import locations
from extractor.backends.base import GenParams
from extractor.errors import InputError
from extractor.pipeline.chunks import DEFAULT_OVERLAP, ChunkSettings
from extractor.pipeline.options import RunOptions
from extractor.plugins import backend_class


@dataclass(frozen=True)
class RunConfig:
    """One field per `extractor run` option (`--help` says what each means); `from_params` takes click's."""

    corpus: str
    task_name: str
    models: tuple[str, ...]  # --model, repeated: full checkpoints of one architecture, one output each
    out: str
    backend: str = "hf"
    tensor_parallel: int = 1
    adapters: tuple[str, ...] = ()
    dtype: str = "auto"
    device: str = "auto"
    trust_remote_code: bool = False
    fast: str = "auto"
    compile: str = "auto"
    quantize: str = "none"  # hf: fp8 (FP8 W8A8 decoder layers, backends/quant/fp8.py)
    constrained: bool = False
    max_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int = 0
    batch_size: int = 32
    batch_tokens: int = 32768
    window: int = 256
    max_input_tokens: int | None = None
    on_long: str | None = None  # None: the task's on_long, else fail
    chunk_tokens: int | None = None  # None: the task's chunk_tokens, else as many as fit
    chunk_overlap: int | None = None  # None: the task's chunk_overlap, else chunks.DEFAULT_OVERLAP
    few_shot: int | None = None
    keep_fields: tuple[str, ...] = ()
    resume: bool = False
    overwrite: bool = False
    allow_no_result: bool = False
    limit: int | None = None
    quiet: bool = False
    verbose: bool = False
    log_file: str | None = None  # stderr's lines also appended here
    print_prompt: str | None = None  # a record id: show its model input, load no weights, write nothing
    dry_run: bool = False
    gpus: int | None = None
    shard: str | None = None
    ray_address: str | None = None
    ray_workers: int = 2
    id_field: str = "id"
    text_field: str | None = None
    on_bad_record: str = "fail"
    rejects: str | None = None
    tasks_dirs: tuple[str, ...] = ()
    openai_base_url: str | None = None  # --backend openai (the key is read from $OPENAI_API_KEY only)
    openai_concurrency: int = 16
    openai_timeout: float = 600.0
    openai_retries: int = 5

    @property
    def model(self) -> str:
        """The first (or only) --model: the one the backend loads."""
        return self.models[0]

    @classmethod
    def from_params(cls, params: dict) -> "RunConfig":
        """From click's parsed parameters (a name the config does not know is a bug, raised here)."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(params) - names)
        if unknown:
            raise TypeError(f"RunConfig has no field for {', '.join(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in params.items()})

    def gen_params(self, task) -> GenParams:
        """The generation settings: the command line's where given, else the task's."""
        gen = task.spec.generation
        return GenParams(max_new_tokens=self.max_new_tokens or gen.max_new_tokens,
                         temperature=gen.temperature if self.temperature is None else self.temperature,
                         top_p=gen.top_p if self.top_p is None else self.top_p, seed=self.seed,
                         constrained=self.constrained)

    def run_options(self, task) -> RunOptions:
        return RunOptions(corpus=locations.target(self.corpus), out=locations.target(self.out),
                          params=self.gen_params(task), id_field=self.id_field, text_field=self.text_field,
                          keep_fields=tuple(self.keep_fields), on_bad=self.on_bad_record,
                          rejects=locations.target(self.rejects) if self.rejects else None, resume=self.resume,
                          overwrite=self.overwrite, on_long=self.long_input_policy(task),
                          chunking=self.chunking(task), max_input_tokens=self.max_input_tokens,
                          few_shot=self.few_shot, window=self.window, quiet=self.quiet, limit=self.limit,
                          shard=parse_shard(self.shard))

    def long_input_policy(self, task) -> str:
        """--on-long, else the task file's on_long, else fail."""
        return self.on_long or task.spec.on_long or "fail"

    def chunking(self, task) -> ChunkSettings | None:
        """The chunk size and overlap under --on-long chunk (the command line's, else the task's); None under
        another policy, where a chunk option given on the command line is refused (it would do nothing)."""
        if self.long_input_policy(task) != "chunk":
            flags = (("--chunk-tokens", self.chunk_tokens), ("--chunk-overlap", self.chunk_overlap))
            given = [flag for flag, v in flags if v is not None]
            if given:
                raise InputError(f"{', '.join(given)} applies to --on-long chunk only (this run's policy is "
                                 f"{self.long_input_policy(task)}); add --on-long chunk or drop it")
            return None
        spec = task.spec
        tokens = self.chunk_tokens if self.chunk_tokens is not None else spec.chunk_tokens
        overlap = next((v for v in (self.chunk_overlap, spec.chunk_overlap) if v is not None), DEFAULT_OVERLAP)
        if tokens is not None and overlap >= tokens:
            raise InputError(f"--chunk-overlap {overlap} must be less than the chunk size {tokens} tokens "
                             "(--chunk-tokens or the task's chunk_tokens); lower the overlap")
        return ChunkSettings(tokens, overlap)

    def backend_kwargs(self, model: str, adapters: tuple[str, ...]) -> dict:
        """What the backend class is built with (model and adapters as local folders)."""
        if self.quantize != "none" and not backend_class(self.backend).quantizes:
            raise InputError(f"--quantize {self.quantize} is an hf backend option; --backend {self.backend} takes a "
                             "quantized checkpoint as it is (vllm: its quantization_config)")
        return dict(model=model, adapters=adapters, dtype=self.dtype, device=self.device,
                    trust_remote_code=self.trust_remote_code, batch_size=self.batch_size,
                    batch_tokens=self.batch_tokens, tensor_parallel=self.tensor_parallel, seed=self.seed,
                    fast=self.fast, compile=self.compile, quantize=self.quantize, quiet=self.quiet,
                    base_url=self.openai_base_url,
                    concurrency=self.openai_concurrency, timeout=self.openai_timeout, retries=self.openai_retries)


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """`--shard K/N` (set by --gpus for its workers)."""
    if text is None:
        return None
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise InputError(f"--shard must look like K/N, got '{text}'") from None
    if not 0 <= k < n:
        raise InputError(f"--shard {text}: K must be in 0..N-1")
    return k, n
