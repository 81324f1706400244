"""Fast JSON when orjson is installed (it is a dependency), stdlib json otherwise (e.g. the GPU image)."""
import json

try:
    import orjson

    def loads(data):
        return orjson.loads(data)

    def dumps(obj) -> str:
        return orjson.dumps(obj).decode()

    DecodeError = orjson.JSONDecodeError
except ImportError:  # pragma: no cover - exercised only where orjson is absent
    def loads(data):
        return json.loads(data)

    def dumps(obj) -> str:
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))

    DecodeError = json.JSONDecodeError
