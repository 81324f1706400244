"""Which `quantization_config` (config.json) the `hf` backend reads, decided from the config alone (no torch, no
tensors), so that a folder it cannot read is refused in one line by the model-folder check, before anything
loads. Read, and dequantized at load (unpack.py, checkpoints.py):

- compressed-tensors `float-quantized` (llm-compressor's FP8, FP8_DYNAMIC): e4m3 weights, `weight_scale` per
  channel [N, 1], per tensor, or per block; a static `input_scale` is not used (activations are dynamic);
- transformers `fp8` (FineGrainedFP8): e4m3 weights, `weight_scale_inv` [N / bn, K / bk] per block
  (`weight_block_size`), or one per tensor;
- transformers `fbgemm_fp8`: e4m3 weights, `weight_scale` [N, 1];
- AWQ GEMM (`awq`, version gemm, 4 bits): qweight int32 [K, N / 8] packed in AWQ's order, qzeros
  [K / g, N / 8] the same way, scales [K / g, N];
- GPTQ (`gptq`, 4 or 8 bits): qweight int32 [K / (32 / bits), N] packed along K, qzeros [groups, N / (32 /
  bits)] packed along N, stored minus one in the classic format (`checkpoint_format` gptq; gptq_v2 stores them
  as they are), scales [groups, N], g_idx [K] (act-order: any group per input row).

Anything else (bitsandbytes, exl2, hqq, int compressed-tensors, MoE expert formats, ...) is refused."""
from __future__ import annotations

from dataclasses import dataclass, field

from extractor.errors import ModelError

FP8_KINDS = ("compressed-tensors", "fp8", "fbgemm_fp8")
HOW = "dequantize it to bf16 first (save it without quantization_config) or run it with --backend vllm"


@dataclass(frozen=True)
class Scheme:
    """A checkpoint's quantization as read from its config. method: the config's quant_method; bits; group:
    AWQ/GPTQ group size (0: one group over all inputs); zero_offset: GPTQ's stored zeros are one less than
    the zeros (classic format); block: FineGrainedFP8's [bn, bk] (None: per tensor or as the scales' shape
    says)."""
    method: str
    bits: int = 8
    group: int = 0
    zero_offset: bool = False
    block: tuple | None = None
    extra: dict = field(default_factory=dict)

    @property
    def fp8(self) -> bool:
        return self.method in FP8_KINDS

    def describe(self, loaded_as: str) -> dict:
        """The run key's record of the checkpoint's quantization."""
        out = {"checkpoint": self.method, "bits": self.bits, **self.extra, "loaded_as": loaded_as}
        if self.group:
            out["group_size"] = self.group
        if self.block:
            out["weight_block_size"] = list(self.block)
        return out


def read_scheme(config: dict, where: str) -> Scheme | None:
    """The checkpoint's quantization (None: none); ModelError naming `where` (the config file) for one the
    backend does not read."""
    q = config.get("quantization_config")
    if q is None:
        return None
    if not isinstance(q, dict):
        raise ModelError(f"{where}: quantization_config is not an object; the file is corrupt, fetch the model again")
    method = str(q.get("quant_method", "")).lower()
    reader = _READERS.get(method)
    if reader is None:
        raise ModelError(f"{where}: quantization_config quant_method '{q.get('quant_method')}' is not read by the hf "
                         f"backend (it reads compressed-tensors FP8, fp8, fbgemm_fp8, awq, gptq); {HOW}")
    return reader(q, where)


def _refuse(where: str, what: str) -> ModelError:
    return ModelError(f"{where}: quantization_config: {what}, which the hf backend does not read; {HOW}")


def _compressed_tensors(q: dict, where: str) -> Scheme:
    if q.get("kv_cache_scheme"):
        raise _refuse(where, "compressed-tensors kv_cache_scheme (a quantized K/V cache)")
    groups = q.get("config_groups") or {}
    if not isinstance(groups, dict) or not groups:
        raise _refuse(where, "compressed-tensors without config_groups")
    strategies = set()
    for name, group in groups.items():
        group = group if isinstance(group, dict) else {}
        fmt = group.get("format") or q.get("format")
        if fmt != "float-quantized":
            raise _refuse(where, f"compressed-tensors format '{fmt}' in {name} (read: float-quantized FP8)")
        weights = group.get("weights") or {}
        if weights.get("type") != "float" or weights.get("num_bits") != 8:
            raise _refuse(where, f"compressed-tensors {name} weights of {weights.get('num_bits')}-bit "
                                 f"{weights.get('type')} (read: 8-bit float)")
        if weights.get("symmetric") is False:
            raise _refuse(where, f"compressed-tensors {name} asymmetric FP8 weights")
        strategy = weights.get("strategy")
        if strategy not in ("channel", "tensor", "block"):
            raise _refuse(where, f"compressed-tensors {name} weight strategy '{strategy}' (read: channel, tensor, block)")
        strategies.add(strategy)
        for side in ("input_activations", "output_activations"):
            acts = group.get(side)
            if side == "output_activations" and acts:
                raise _refuse(where, f"compressed-tensors {name} quantized output activations")
            if acts and (acts.get("type") != "float" or acts.get("num_bits") != 8):
                raise _refuse(where, f"compressed-tensors {name} {acts.get('num_bits')}-bit {acts.get('type')} "
                                     "activations (read: 8-bit float)")
    return Scheme("compressed-tensors", extra={"format": "float-quantized",
                                               "weight_strategy": "/".join(sorted(strategies))})


def _fp8(q: dict, where: str) -> Scheme:
    block = q.get("weight_block_size")
    if block is not None and (not isinstance(block, list) or len(block) != 2 or
                              not all(type(b) is int and b > 0 for b in block)):
        raise _refuse(where, f"fp8 weight_block_size {block!r} (read: two positive integers)")
    return Scheme("fp8", block=tuple(block) if block else None,
                  extra={"activation_scheme": str(q.get("activation_scheme", "dynamic"))})


def _fbgemm_fp8(q: dict, where: str) -> Scheme:
    return Scheme("fbgemm_fp8", extra={"weight_scale": "per output channel"})


def _awq(q: dict, where: str) -> Scheme:
    version = str(q.get("version", "gemm")).lower()
    if version != "gemm":
        raise _refuse(where, f"awq version '{q.get('version')}' (read: gemm)")
    if q.get("bits", q.get("w_bit", 4)) != 4:
        raise _refuse(where, f"awq with {q.get('bits')} bits (read: 4)")
    if q.get("zero_point", True) is False:
        raise _refuse(where, "awq without zero points")
    return Scheme("awq", bits=4, group=_group(q, where), extra={"version": "gemm"})


def _gptq(q: dict, where: str) -> Scheme:
    bits = q.get("bits", 4)
    if bits not in (4, 8):
        raise _refuse(where, f"gptq with {bits} bits (read: 4, 8)")
    fmt = str(q.get("checkpoint_format") or q.get("format") or "gptq").lower()
    if fmt not in ("gptq", "gptq_v2"):
        raise _refuse(where, f"gptq checkpoint_format '{fmt}' (read: gptq, gptq_v2)")
    return Scheme("gptq", bits=bits, group=_group(q, where), zero_offset=fmt == "gptq",
                  extra={"checkpoint_format": fmt, "desc_act": bool(q.get("desc_act", False)),
                         "sym": bool(q.get("sym", True))})


def _group(q: dict, where: str) -> int:
    group = q.get("group_size", q.get("q_group_size", 128))
    if type(group) is not int or (group <= 0 and group != -1):
        raise _refuse(where, f"group_size {group!r}")
    return 0 if group == -1 else group


_READERS = {"compressed-tensors": _compressed_tensors, "fp8": _fp8, "fbgemm_fp8": _fbgemm_fp8, "awq": _awq,
            "gptq": _gptq}
