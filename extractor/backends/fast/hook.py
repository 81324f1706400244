"""How our attention enters the model's own forward: transformers' attention-function interface is pointed at
`_attention` for our passes only (ModelRunner._native), and that function, and only it, is ours; compiled code
sees its work as one op (`fast_attention`), so a compiled decoder layer is one graph. Also the head's hook that
keeps each prefill row's last position only. The decoder whose pass is running is `active.decoder`.
"""
import threading  # no `from __future__ import annotations`: torch.library reads fast_attention's hints as types

import torch

from extractor.backends.fast.families import FastPathError, check_attention_kwargs

ATTENTION = "extractor_fast"  # the name our attention function is registered under in transformers
active = threading.local()   # the decoder whose forward pass is running on this thread


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None,
               softcap=None, **kwargs):
    """transformers' attention-function contract: q [B, H, T, D], k/v [B, KVH, T, D] after the layer's own
    rotary and norms; returns ([B, T, H, D], None). Compiled code traces this function and calls the work as
    one opaque op (`fast_attention`), so a compiled layer is one graph rather than a graph break per
    attention call (each break split every enclosing function into frames of their own: 28 frames for one
    layer class, and each 0/1 or stride guard doubled them)."""
    check_attention_kwargs(module, kwargs)
    if scaling is None:  # what transformers' eager attention does without one
        scaling = module.head_dim ** -0.5
    layer = getattr(module, LAYER_INDEX, None)
    if layer is None:
        raise FastPathError(f"{type(module).__name__} has no layer index the fast path registered")
    if torch.compiler.is_compiling():
        return fast_attention(query, key, value, layer, float(scaling), softcap, sliding_window), None
    return _attend_now(query, key, value, layer, float(scaling), softcap, sliding_window), None


# Each attention module's layer index as a 0-d CPU tensor: a regionally compiled layer reads it as an input,
# where a Python int would be a constant guarded per layer (a recompile per layer). A plain attribute, not a
# buffer: not in the state dict, and a `.to(device)` of the model (loading an adapter) leaves it on the CPU,
# where reading it needs no sync with the GPU (none is allowed while a CUDA graph captures).
LAYER_INDEX = "_extractor_layer_index"


def _attend_now(query, key, value, layer: torch.Tensor, scaling: float, softcap, window) -> torch.Tensor:
    decoder = getattr(active, "decoder", None)
    if decoder is None:
        raise FastPathError("the fast path's attention was called outside FastDecoder")
    out = decoder._attend(int(layer), query, key, value, scaling, softcap, window)
    return out.transpose(1, 2).contiguous()  # [B, T, H, D], laid out as fast_attention's fake says


@torch.library.custom_op("extractor::fast_attention", mutates_args=())
def fast_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layer: torch.Tensor,
                   scaling: float, softcap: float | None, window: int | None) -> torch.Tensor:
    """`_attend_now` as one op for compiled code: it stores K/V in the decoder's cache (state compiled code
    never reads: declared pure) and returns a new contiguous [B, T, H, D] tensor."""
    return _attend_now(query, key, value, layer, scaling, softcap, window)


@fast_attention.register_fake
def _fast_attention_shape(query, key, value, layer, scaling, softcap, window):
    b, h, t, _ = query.shape
    return query.new_empty((b, t, h, value.shape[-1]))


def index_layers(model) -> None:
    """Give every module that has a `layer_idx` its LAYER_INDEX (once per model)."""
    for module in model.modules():
        idx = getattr(module, "layer_idx", None)
        if isinstance(idx, int) and not hasattr(module, LAYER_INDEX):
            setattr(module, LAYER_INDEX, torch.tensor(idx))


@torch._dynamo.disable
def _last_positions(_head, args):
    """Forward pre-hook of the head: in a prefill pass, each row's hidden state at its last real position."""
    decoder = getattr(active, "decoder", None)
    last = decoder._mode.get("last") if decoder is not None else None
    if last is None:
        return None
    hidden = args[0]
    return (hidden[torch.arange(len(last), device=hidden.device), last].unsqueeze(1), *args[1:])


def hook_head(model) -> None:
    """The head sees each prefill row's last position only. One hook per model, for good (a no-op outside
    our prefill passes): a hook made per pass would make compiled code recompile at every prefill chunk."""
    head = model.get_output_embeddings()
    if not getattr(head, "_extractor_last_positions", False):
        head.register_forward_pre_hook(_last_positions)
        head._extractor_last_positions = True


def register() -> None:
    from transformers import AttentionInterface
    AttentionInterface.register(ATTENTION, _attention)
