"""Model and adapter folders are input like any other: checked before anything loads, each fault one line
naming the file and how to fix it. Everything here reads only what is cheap to read: JSON files, the header of
each safetensors file (never its tensors), and the pickle opcodes of a PyTorch weights file (never run, and
at most MAX_PICKLE_BYTES of them)."""
from __future__ import annotations

import hashlib
import json
import pickletools
import stat
import struct
import zipfile
from pathlib import Path

from extractor.errors import ModelError

WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt")
# The weight files transformers loads, in its order of preference: a single file, else a sharded index.
WEIGHT_NAMES = (("model.safetensors", "model.safetensors.index.json"),
                ("pytorch_model.bin", "pytorch_model.bin.index.json"))
# Files a Trainer checkpoint keeps beside the weights: pickles of Python objects, never loaded as weights.
TRAINER_STATE = ("training_args.bin", "optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state.pth")
# Files that hold a tokenizer's vocabulary (tokenizer_config.json alone holds none: it loads as an empty
# tokenizer that encodes every text to nothing).
VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
               "sentencepiece.bpe.model", "vocab.model")
SMALL_JSON = ("config.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
              "added_tokens.json", "adapter_config.json")
MAX_JSON_BYTES = 64 << 20  # config-like files; anything larger is not one
MAX_HEADER_BYTES = 100 << 20  # safetensors' own reader refuses headers above 100 MB
# A state dict's pickle holds names, shapes and storage keys, never tensor data (stored apart from it): torch.save
# of 15,360 tensors named like an MoE's experts wrote 135 bytes a tensor, so this is room for some 500,000 tensors.
# The scan reads at most this much of a pickle.
MAX_PICKLE_BYTES = 64 << 20
# safetensors dtypes and their widths in bits (the format's full list, sub-byte floats included).
DTYPE_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F8_E4M3FNUZ": 8,
              "F8_E5M2FNUZ": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
              "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64}
# What a state dict's pickle may name: torch's own rebuild functions and storages, and a few containers.
# Anything else (os.system, builtins.eval, ...) can only be there to run code when the file is loaded.
PICKLE_MODULES = ("torch", "torch.")
PICKLE_GLOBALS = {("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"),
                  ("builtins", "bytearray"), ("builtins", "slice"), ("builtins", "complex"), ("_codecs", "encode")}
CONVERT = "convert it to safetensors where it was made, or fetch the model again"


def check_model_dir(path: Path) -> None:
    """Fail before any work when a model folder is unusable: config, weight headers, tokenizer files."""
    if not path.is_dir():
        raise ModelError(f"model directory '{path}' does not exist; pass a local Hugging Face model folder")
    refuse_special_files(path)
    if not (path / "config.json").is_file():
        raise ModelError(f"{path}: no config.json; is this a Hugging Face model folder?")
    _check_json_files(path)
    config = read_json(path / "config.json")
    if not isinstance(config.get("model_type"), str) or not config["model_type"]:
        raise ModelError(f"{path / 'config.json'}: no model_type; the file is not a transformers model config "
                         "(save the model with save_pretrained, or fetch it again)")
    weights = weight_files(path)
    if not weights:
        raise ModelError(f"{path}: no weight files (*.safetensors or *.bin); the download or save is incomplete")
    for file in weights:
        check_weight_file(file)
    check_tokenizer_files(path)


def check_quantization(path: Path) -> None:
    """The hf backend reads the quantized checkpoints backends/quant/schemes.py lists; any other
    quantization_config is refused in one line before torch loads (vllm reads more: it does not call this)."""
    from extractor.backends.quant.schemes import read_scheme
    read_scheme(read_json(path / "config.json"), str(path / "config.json"))


def check_adapter_dir(path: Path) -> None:
    if path.is_dir():
        refuse_special_files(path)
    if not (path / "adapter_config.json").is_file():
        raise ModelError(f"adapter '{path}' has no adapter_config.json; pass a folder saved by peft's save_pretrained")
    _check_json_files(path)
    for file in path.glob("adapter_model.*"):
        if file.suffix in (".safetensors", ".bin", ".pt"):
            check_weight_file(file)


def refuse_special_files(path: Path) -> None:
    """A FIFO, socket or device in the folder (itself or behind a link) is refused: opening a FIFO to read it
    waits for a writer forever, and a device is no saved file. Sub-folders and regular files pass."""
    for entry in sorted(path.iterdir()):
        try:
            mode = entry.stat().st_mode
        except OSError:  # a dangling link: what reads it later says so
            continue
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            kind = "FIFO" if stat.S_ISFIFO(mode) else "socket" if stat.S_ISSOCK(mode) else "device"
            raise ModelError(f"{entry}: a {kind}, not a saved file; put the file itself in the folder (or save "
                             "the model again)")


def read_json(file: Path) -> dict:
    """A config-like JSON file as a dict, or one line naming the file."""
    try:
        if file.stat().st_size > MAX_JSON_BYTES:
            raise ModelError(f"{file}: {file.stat().st_size} bytes, too large for a config file; fetch the model again")
        data = json.loads(file.read_bytes().decode("utf-8"))
    except OSError as exc:
        raise ModelError(f"{file}: cannot read ({exc.strerror or exc}); check the file's permissions") from None
    except UnicodeDecodeError:
        raise ModelError(f"{file}: not UTF-8 text; the file is corrupt, fetch the model again") from None
    except (ValueError, RecursionError) as exc:
        raise ModelError(f"{file}: not valid JSON ({str(exc)[:120]}); the file is corrupt, fetch the model "
                         "again") from None
    if not isinstance(data, dict):
        raise ModelError(f"{file}: holds a JSON {type(data).__name__}, not an object; the file is corrupt, "
                         "fetch the model again")
    return data


def _check_json_files(path: Path) -> None:
    for name in SMALL_JSON:
        if (path / name).exists():
            read_json(path / name)


# -- weights --------------------------------------------------------------------------------------------
def weight_files(path: Path) -> list[Path]:
    """The weight files a model load reads: transformers' names (a single file, else an index's shards),
    else every *.safetensors (vLLM reads any), else every *.bin / *.pt that is not a Trainer's state."""
    for single, index in WEIGHT_NAMES:
        if (path / single).is_file():
            return [path / single]
        if (path / index).is_file():
            return _shards(path / index)
    found = sorted(path.glob("*.safetensors"))
    return found or sorted(p for pattern in WEIGHT_PATTERNS[1:] for p in path.glob(pattern)
                           if p.name not in TRAINER_STATE and p.is_file())


def _shards(index: Path) -> list[Path]:
    """The shard files a sharded checkpoint's index names, each inside the folder and present."""
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str) for v in weight_map.values()):
        raise ModelError(f"{index}: no weight_map of tensor names to shard files; fetch the model again")
    shards = []
    for name in dict.fromkeys(weight_map.values()):
        # Judged by its spelling, not where it resolves: a hub cache's snapshot links every file into blobs/.
        if Path(name).is_absolute() or ".." in Path(name).parts or "\\" in name:
            raise ModelError(f"{index}: shard '{name}' is outside the model folder; the index is corrupt")
        shard = index.parent / name
        if not shard.is_file():
            raise ModelError(f"{index}: names shard '{name}', which is missing; the download is incomplete")
        shards.append(shard)
    return shards


def check_weight_file(file: Path) -> None:
    if file.suffix == ".safetensors":
        check_safetensors(file)
    else:
        check_pickle(file)


def check_safetensors(file: Path) -> None:
    """The header of a safetensors file (8 bytes of little-endian length, then that much JSON) describes a
    file of exactly this size: known dtypes, each tensor's bytes its shape's, the tensors tiling the data."""
    def bad(what: str) -> ModelError:
        return ModelError(f"{file}: {what}; the file is corrupt or truncated, fetch the model again")
    try:
        size = file.stat().st_size
        with file.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise bad(f"{size} bytes, too short for a safetensors header")
            (length,) = struct.unpack("<Q", head)
            if length > min(MAX_HEADER_BYTES, size - 8):
                raise bad(f"header length {length} is larger than the file ({size} bytes) or than 100 MB")
            raw = f.read(length)
    except OSError as exc:
        raise ModelError(f"{file}: cannot read ({exc.strerror or exc}); check the file's permissions") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise bad("header is not valid JSON") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    _check_tensors(header, size - 8 - length, bad)


def _check_tensors(header: dict, data_size: int, bad) -> None:
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise bad("__metadata__ is not an object of strings")
            continue
        if not isinstance(info, dict):
            raise bad(f"tensor '{name[:80]}' is not described by an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in DTYPE_BITS:
            raise bad(f"tensor '{name[:80]}' has unknown dtype {str(dtype)[:40]!r}")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise bad(f"tensor '{name[:80]}' has no valid shape")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise bad(f"tensor '{name[:80]}' has no valid data_offsets")
        if offsets[1] > data_size:
            raise bad(f"tensor '{name[:80]}' ends at byte {offsets[1]} of the data, beyond the file's "
                      f"{data_size} bytes of data")
        count = 1
        for d in shape:
            count *= d
        if count * DTYPE_BITS[dtype] != 8 * (offsets[1] - offsets[0]):
            raise bad(f"tensor '{name[:80]}' of shape {shape} and dtype {dtype} does not fill its "
                      f"{offsets[1] - offsets[0]} bytes")
        spans.append(offsets)
    end = 0
    for start, stop in sorted(spans):
        if start != end:
            raise bad(f"the tensors leave a gap or overlap at byte {end} of the data")
        end = stop
    if end != data_size:
        raise bad(f"the tensors cover {end} of the file's {data_size} bytes of data")


def check_pickle(file: Path) -> None:
    """A PyTorch weights file (a zip holding data.pkl, or the older plain pickles): its pickle opcodes read,
    never run, and every global it names one a state dict needs. transformers loads it with torch's
    weights_only unpickler anyway; this says so in one line, before anything loads."""
    try:
        if zipfile.is_zipfile(file):
            _check_zip_directory(file)
            with zipfile.ZipFile(file) as archive:
                pkl = next((n for n in archive.namelist() if n == "data.pkl" or n.endswith("/data.pkl")), None)
                if pkl is None:
                    raise ModelError(f"{file}: a zip without data.pkl, not a PyTorch weights file; {CONVERT}")
                with archive.open(pkl) as f:
                    _scan_pickle(_Capped(f, file), file)
        else:
            with file.open("rb") as f:  # magic number, protocol, sys info, the state dict, its storage keys
                capped = _Capped(f, file)
                for _ in range(5):
                    _scan_pickle(capped, file)
    except (zipfile.BadZipFile, ValueError, EOFError, NotImplementedError):
        raise ModelError(f"{file}: not a readable PyTorch weights file (corrupt or truncated); {CONVERT}") from None
    except OSError as exc:
        raise ModelError(f"{file}: cannot read ({exc.strerror or exc}); check the file's permissions") from None


def _check_zip_directory(file: Path) -> None:
    """A zip's central directory (which ZipFile reads whole, into memory) within MAX_PICKLE_BYTES: a torch.save
    archive lists one short entry per storage."""
    find_end = getattr(zipfile, "_EndRecData", None)  # the end record, zip64 included, as ZipFile finds it
    if find_end is None:  # a Python without it: ZipFile's own checks only
        return
    with file.open("rb") as f:
        end = find_end(f)
    if end and end[zipfile._ECD_SIZE] > MAX_PICKLE_BYTES:
        raise ModelError(f"{file}: its zip directory declares {end[zipfile._ECD_SIZE]:,} bytes, far more than a "
                         f"PyTorch weights file's; refused unread; {CONVERT}")


class _Capped:
    """A pickle stream read at most MAX_PICKLE_BYTES far, and never more than that in one read: an opcode that
    declares a larger argument, or a line longer than what is left, is refused before anything is read."""

    def __init__(self, f, file: Path, limit: int = MAX_PICKLE_BYTES):
        self.f, self.file, self.left, self.pos = f, file, limit, 0

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0 or n > self.left:
            raise self._too_big()
        return self._took(self.f.read(n))

    def readline(self, n: int = -1) -> bytes:
        line = self.f.readline(self.left + 1 if n is None or n < 0 else min(n, self.left + 1))
        if len(line) > self.left:
            raise self._too_big()
        return self._took(line)

    def tell(self) -> int:
        return self.pos

    def _took(self, data: bytes) -> bytes:
        self.left -= len(data)
        self.pos += len(data)
        return data

    def _too_big(self) -> ModelError:
        return ModelError(f"{self.file}: its pickle is over {MAX_PICKLE_BYTES >> 20} MB, far more than a state "
                          "dict's (the tensors are stored apart from it); refused without reading further; "
                          f"{CONVERT}")


def _scan_pickle(f, file: Path) -> None:
    """One pickle's opcodes up to its STOP; the module and name of each global it imports checked."""
    strings: list = []  # the values most recently pushed, for STACK_GLOBAL (its arguments come off the stack)
    memo: dict = {}
    for op, arg, _ in pickletools.genops(f):
        if op.name in ("GLOBAL", "INST"):
            _check_global(*arg.split(" ", 1), file)
        elif op.name == "STACK_GLOBAL":
            if len(strings) < 2 or not all(isinstance(s, str) for s in strings[-2:]):
                raise ModelError(f"{file}: its pickle imports a global it hides; it may run code when loaded; "
                                 f"{CONVERT}")
            _check_global(strings[-2], strings[-1], file)
        if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING",
                       "BINSTRING", "STRING"):
            strings.append(arg)
        elif op.name in ("BINGET", "LONG_BINGET", "GET"):
            strings.append(memo.get(arg))
        elif op.name == "MEMOIZE":
            memo[len(memo)] = strings[-1] if strings else None
        elif op.name in ("BINPUT", "LONG_BINPUT", "PUT") and strings:
            memo[arg] = strings[-1]
        elif op.name not in ("MEMOIZE", "BINPUT", "LONG_BINPUT", "PUT", "FRAME", "PROTO"):
            strings.append(None)
        del strings[:-2]


def _check_global(module: str, name: str, file: Path) -> None:
    if module.startswith(PICKLE_MODULES) or module == "torch" or (module, name) in PICKLE_GLOBALS:
        return
    raise ModelError(f"{file}: its pickle imports {module}.{name}, which no weights file needs: it would run "
                     f"code when loaded, and is refused; {CONVERT}")


# -- tokenizer ------------------------------------------------------------------------------------------
def check_tokenizer_files(path: Path) -> None:
    """A vocabulary file beside the model (a tokenizer from remote code may keep it under its own name)."""
    if any((path / name).is_file() for name in VOCAB_FILES) or any(path.glob("*.tiktoken")):
        return
    config = path / "tokenizer_config.json"
    if config.is_file() and "auto_map" in read_json(config):
        return
    raise ModelError(f"{path}: no tokenizer vocabulary ({', '.join(VOCAB_FILES[:3])}, ...); save the tokenizer "
                     "beside the model (tokenizer.save_pretrained) or fetch the model again")


def load_tokenizer(path: Path, trust_remote_code: bool):
    """The folder's tokenizer, loaded and proven to encode text; a failure names the file at fault."""
    from transformers import AutoTokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001 — untrusted files: any failure of the loader is the folder's fault
        if (path / "tokenizer.json").is_file():
            read_json(path / "tokenizer.json")  # names the file when it is not JSON
        first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise ModelError(f"{path}: the tokenizer files cannot be loaded ({first}); save the tokenizer beside "
                         "the model (tokenizer.save_pretrained) or fetch the model again") from None
    check_tokenizer(tokenizer, path)
    return tokenizer


PROBE = "Salary 40k-65k; Python 3 and SQL; 本科"


def check_tokenizer(tokenizer, path: Path) -> None:
    """A tokenizer that encodes text to nothing (or to unknown tokens only) has no vocabulary: every
    prompt would reach the model empty."""
    ids = tokenizer(PROBE, add_special_tokens=False)["input_ids"]
    unk = getattr(tokenizer, "unk_token_id", None)
    if not ids or all(i == unk for i in ids):
        name = "tokenizer.json" if (path / "tokenizer.json").is_file() else "tokenizer files"
        raise ModelError(f"{path / name}: the tokenizer has no vocabulary (it encodes text to nothing); save "
                         "the tokenizer beside the model (tokenizer.save_pretrained) or fetch the model again")


def weights_size(path: Path) -> int:
    """Bytes of a folder's weight files (WEIGHT_PATTERNS): what loading it reads, about."""
    return sum(p.stat().st_size for pattern in WEIGHT_PATTERNS for p in path.glob(pattern) if p.is_file())


def file_fingerprint(path: Path) -> dict:
    """Cheap identity of a model or adapter folder: config hash plus weight file names and sizes."""
    config = path / ("adapter_config.json" if (path / "adapter_config.json").is_file() else "config.json")
    weights = sorted((p.name, p.stat().st_size) for pattern in WEIGHT_PATTERNS for p in path.glob(pattern))
    return {"path": str(path.resolve()),
            "config_sha": hashlib.sha256(config.read_bytes()).hexdigest()[:16],
            "weights": [f"{n}:{s}" for n, s in weights]}
