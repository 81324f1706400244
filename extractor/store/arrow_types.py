"""A task's JSON Schema as an Arrow type: the typed `prediction` column of a Parquet output.

A Parquet output keeps every prediction losslessly as JSON text (`prediction_json`) and, beside it, a typed
view (`prediction`): a struct built from the schema (objects → structs of their properties, strings,
integers → int64, numbers → float64, booleans, arrays → lists), so `SELECT prediction.salary.min` works in
any Parquet reader. A row's typed value is null where it does not fit the type exactly (a prediction that
failed validation, an extra key, 1.5 where an integer is due): pyarrow would otherwise cut 1.5 to 1 or drop
the key without a word. A schema the view cannot express (anyOf of several types, refs to other files,
free-form objects) keeps the JSON text alone, and says why.
"""
from __future__ import annotations

_DEPTH = 32  # refs and nesting deeper than this: not expressed (and no recursion past it)


class NotExpressible(Exception):
    pass


def compile_type(schema) -> tuple[object | None, str | None]:
    """(node, None) for an expressible schema, else (None, why). A node is ("string"|"int"|"float"|"bool",),
    ("list", node) or ("struct", ((name, node), ...))."""
    try:
        return _node(schema, schema, 0), None
    except NotExpressible as exc:
        return None, str(exc)


def arrow_type(node):
    import pyarrow as pa
    kind = node[0]
    if kind == "struct":
        return pa.struct([pa.field(name, arrow_type(child)) for name, child in node[1]])
    if kind == "list":
        return pa.list_(arrow_type(node[1]))
    return {"string": pa.string(), "int": pa.int64(), "float": pa.float64(), "bool": pa.bool_()}[kind]


def conforms(value, node) -> bool:
    """Whether `value` converts to the node's Arrow type exactly (None anywhere: a null)."""
    if value is None:
        return True
    kind = node[0]
    if kind == "struct":
        fields = dict(node[1])
        return isinstance(value, dict) and set(value) <= set(fields) and \
            all(conforms(v, fields[k]) for k, v in value.items())
    if kind == "list":
        return isinstance(value, list) and all(conforms(v, node[1]) for v in value)
    if kind == "string":
        return isinstance(value, str)
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool) and -2 ** 63 <= value < 2 ** 63
    return isinstance(value, (int, float)) and not isinstance(value, bool)  # float


def _node(schema, root, depth: int):
    if depth > _DEPTH:
        raise NotExpressible("the schema nests (or refers) too deep")
    if not isinstance(schema, dict):
        raise NotExpressible("a boolean schema has no type")
    if "$ref" in schema:
        return _node(_resolve(schema["$ref"], root), root, depth + 1)
    for key in ("anyOf", "oneOf"):
        if key in schema:
            options = [s for s in schema[key] if not (isinstance(s, dict) and s.get("type") == "null")]
            if len(options) != 1:
                raise NotExpressible(f"{key} of several types")
            return _node(options[0], root, depth + 1)
    types = schema.get("type")
    if isinstance(types, list):
        types = [t for t in types if t != "null"]
        if len(types) != 1:
            raise NotExpressible(f"a value of several types ({', '.join(types)})")
        types = types[0]
    if types is None:
        types = _enum_type(schema)
    return _typed(types, schema, root, depth)


def _typed(types: str, schema: dict, root, depth: int):
    if types == "object":
        props = schema.get("properties") or {}
        if not props:
            raise NotExpressible("an object without properties")
        return ("struct", tuple((name, _node(sub, root, depth + 1)) for name, sub in props.items()))
    if types == "array":
        items = schema.get("items")
        if not isinstance(items, dict):
            raise NotExpressible("an array without one items schema")
        return ("list", _node(items, root, depth + 1))
    simple = {"string": "string", "integer": "int", "number": "float", "boolean": "bool"}
    if types in simple:
        return (simple[types],)
    raise NotExpressible(f"type {types!r}")


def _enum_type(schema: dict) -> str:
    values = schema.get("enum", [schema["const"]] if "const" in schema else None)
    if not values:
        raise NotExpressible("a value without a type")
    if all(isinstance(v, str) for v in values):
        return "string"
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return "integer"
    raise NotExpressible("an enum of mixed types")


def _resolve(ref, root):
    if not isinstance(ref, str) or not ref.startswith("#/"):
        raise NotExpressible(f"$ref {ref!r} outside the schema's own file")
    node = root
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        if not isinstance(node, dict) or part not in node:
            raise NotExpressible(f"$ref {ref!r} does not resolve")
        node = node[part]
    return node
