"""Another full checkpoint of the same architecture into a loaded model, in place: every parameter and buffer
keeps its tensor (its storage, device and dtype), only the values change. A decoder built on the model keeps
its cache, compiled code and CUDA graphs, which read those tensors; its shared-prefix K/V must be recomputed.

Nightly runs score several checkpoints of one training; loading each into a new process pays the imports,
the model build and the decoder's start-up again. Here a checkpoint costs reading its weights."""
from __future__ import annotations

import json
from pathlib import Path

from extractor.errors import ModelError

# config.json keys that name or describe a checkpoint without changing what its weights compute with
_IDENTITY_KEYS = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "architectures", "_commit_hash"}


def check_swappable(loaded: Path, other: Path) -> None:
    """ModelError, in one line, unless `other` is a sound model folder whose weights can replace `loaded`'s."""
    from extractor.backends.model_files import check_model_dir
    check_model_dir(other)
    why = same_architecture(loaded, other)
    if why is not None:
        raise ModelError(f"--model {other}: cannot take the place of {loaded} in one process: {why}; "
                         "score it with a command of its own")


def same_architecture(loaded: Path, other: Path) -> str | None:
    """Why `other`'s weights cannot replace `loaded`'s in the same model (None: they can)."""
    try:
        a, b = (json.loads((p / "config.json").read_text(encoding="utf-8")) for p in (loaded, other))
    except (OSError, ValueError) as exc:
        return f"config.json unreadable ({exc})"
    differ = sorted(k for k in (set(a) | set(b)) - _IDENTITY_KEYS if a.get(k) != b.get(k))
    if differ:
        return f"its config differs from {loaded}'s in {', '.join(differ[:6])}"
    if _tokenizer_digest(loaded) != _tokenizer_digest(other):
        return f"its tokenizer differs from {loaded}'s (prompts would tokenize differently)"
    return None


def _tokenizer_digest(path: Path) -> str:
    import hashlib
    h = hashlib.sha256()
    for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "chat_template.jinja",
                 "special_tokens_map.json"):
        f = path / name
        if f.is_file():
            h.update(name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def load_in_place(model, path: Path) -> int:
    """Copy `path`'s safetensors weights into `model`'s own tensors (converted to each tensor's dtype, read
    straight to its device); returns the bytes read. Every tensor of the model must be given, except ones
    tied to another that is (a tied output head). Raises ModelError naming what does not fit."""
    from safetensors import safe_open
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelError(f"{path}: no *.safetensors weights; in-place checkpoint switching reads safetensors only "
                         "(save with safe_serialization=True, or run this checkpoint on its own)")
    targets = dict(model.named_parameters(remove_duplicate=False))
    targets.update(dict(model.named_buffers(remove_duplicate=False)))
    by_storage: dict[int, list[str]] = {}
    for name, tensor in targets.items():
        by_storage.setdefault(tensor.data_ptr(), []).append(name)
    done: set[int] = set()
    nbytes = 0
    import torch
    with torch.no_grad():
        for file in files:
            device = str(next(iter(targets.values())).device)
            with safe_open(str(file), framework="pt", device=device) as fh:
                for key in fh.keys():
                    target = targets.get(key)
                    if target is None:
                        raise ModelError(f"{file}: tensor '{key}' has no place in the loaded model; the checkpoint "
                                         "is not of the same architecture")
                    value = fh.get_tensor(key)
                    if tuple(value.shape) != tuple(target.shape):
                        raise ModelError(f"{file}: tensor '{key}' has shape {tuple(value.shape)}, the loaded model's "
                                         f"{tuple(target.shape)}; the checkpoint is of another size")
                    target.copy_(value)
                    done.add(target.data_ptr())
                    nbytes += value.numel() * value.element_size()
    persistent = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    missing = [names[0] for ptr, names in by_storage.items() if ptr not in done and names[0] in persistent]
    if missing:
        raise ModelError(f"{path}: the checkpoint lacks {len(missing)} of the model's weights (first: {missing[0]}); "
                         "it is incomplete or of another architecture")
    return nbytes
