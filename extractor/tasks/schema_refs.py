"""A task's JSON Schema, checked in full at load and resolved only inside its own folder.

`load_registry` reads the schema file, meta-validates it, and walks every subschema and every `$ref`,
`$dynamicRef` and `$id` it can reach. A reference may only name a file inside the task folder (nothing is
ever fetched: the registry's `retrieve` reads task files and refuses everything else); a reference must
resolve; references applied in place must not loop (`{"$ref": "#"}` would recurse forever on any value);
nesting is bounded. Every fault is one TaskError naming the file and the JSON pointer.

Validators are built from the returned `SchemaRegistry` (outputs.Validator), so validation finds every
resource here and never goes to the network.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urldefrag, urljoin, urlsplit

from extractor.errors import TaskError

MAX_DEPTH = 100  # JSON nesting of a schema file, and of a chain of in-place references
MAX_FILES = 100  # schema files one task may reference
DIALECT = "https://json-schema.org/draft/2020-12/schema"
INLINE_URI = "file:///inline-schema.json"  # the base of a schema given without a task folder

# 2020-12 keywords holding subschemas. "In place" ones apply to the same value as their parent, so a
# cycle through them (or through $ref) never consumes any of the value and recurses forever.
_IN_PLACE_ONE = ("not", "if", "then", "else")
_IN_PLACE_LIST = ("allOf", "anyOf", "oneOf")
_IN_PLACE_MAP = ("dependentSchemas",)
_CHILD_ONE = ("additionalProperties", "contains", "items", "propertyNames", "unevaluatedItems",
              "unevaluatedProperties", "contentSchema")
_CHILD_LIST = ("prefixItems",)
_CHILD_MAP = ("properties", "patternProperties", "$defs", "definitions")
_REFS = ("$ref", "$dynamicRef")


@dataclass(frozen=True)
class SchemaRegistry:
    """The resources one schema may use (a `referencing.Registry`) and the URI of its root."""

    registry: object
    root_uri: str
    has_patterns: bool  # some subschema uses `pattern` or `patternProperties`


class _Refused(Exception):
    """Raised by the registry's `retrieve`: carries the TaskError to report."""

    def __init__(self, error: TaskError):
        super().__init__(str(error))
        self.error = error


def load_registry(schema_path: Path, root: Path) -> tuple[object, SchemaRegistry]:
    """The schema at `schema_path` and its registry, every file it references inside `root`."""
    schema = read_schema_file(schema_path)
    if isinstance(schema, bool):
        what = "accepts every output" if schema else "rejects every output"
        raise TaskError(f"{schema_path}: the schema is `{json.dumps(schema)}`, which {what}; write an object "
                        "schema such as {\"type\": \"object\", \"properties\": {...}}")
    return schema, _Walk(schema_path.resolve().as_uri(), schema, root.resolve(), schema_path).run()


def inline_registry(schema) -> SchemaRegistry:
    """The registry of a schema given as a value: only its own resources, no files, no network."""
    _check_depth(schema, Path("schema"))
    return _Walk(INLINE_URI, schema, None, Path("schema")).run()


def read_schema_file(path: Path):
    """A schema file's JSON, nesting bounded and meta-validated against 2020-12."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TaskError(f"{path}: not a readable JSON file ({exc})") from None
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TaskError(f"{path}: not a readable JSON file ({exc})") from None
    except RecursionError:
        raise TaskError(f"{path}: nested deeper than {MAX_DEPTH} levels; flatten it with $defs") from None
    _check_depth(schema, path)
    _meta_validate(schema, path)
    return schema


def _check_depth(value, path: Path) -> None:
    stack = [(value, 1, "")]
    while stack:
        node, depth, pointer = stack.pop()
        if depth > MAX_DEPTH:
            raise TaskError(f"{path}: {pointer or '/'}: nested deeper than {MAX_DEPTH} levels; "
                            "flatten it with $defs")
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        stack.extend((v, depth + 1, f"{pointer}/{_escape(k)}") for k, v in items)


def _meta_validate(schema, path: Path) -> None:
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        where = "".join(f"/{_escape(p)}" for p in exc.path) or "/"
        raise TaskError(f"{path}: {where}: invalid JSON Schema: {_short(exc.message)}") from None


def _escape(key) -> str:
    return str(key).replace("~", "~0").replace("/", "~1")


def _short(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit] + "…"


class _Walk:
    """One pass over every reachable subschema: checks, file loading, and the in-place reference graph."""

    def __init__(self, root_uri: str, schema, folder: Path | None, schema_path: Path):
        from referencing import Registry
        from referencing.jsonschema import DRAFT202012
        self.spec = DRAFT202012
        schema = copy.deepcopy(schema)  # the walk drops `$schema` from the registry's copy (see _visit)
        self.root_uri = root_uri
        self.folder = folder
        self.files: dict[str, Path] = {root_uri: schema_path}
        self.docs = {root_uri: DRAFT202012.create_resource(schema)}
        self.registry = Registry(retrieve=self._retrieve).with_resources(self.docs.items()).crawl()
        self.where: dict[int, str] = {}
        self.edges: dict[int, list[int]] = {}
        self.keywords: set[str] = set()

    def run(self) -> SchemaRegistry:
        from referencing import Registry
        # Entered as the validator enters it (outputs.Validator): through a $ref to the root's URI.
        root = self.registry.resolver().lookup(self.root_uri)
        stack = [(root.contents, self.root_uri, "", root.resolver, True)]
        while stack:
            node, uri, pointer, resolver, by_ref = stack.pop()
            if id(node) in self.where:
                continue
            self.where[id(node)] = self._name(uri, pointer)
            if isinstance(node, dict):
                stack.extend(self._visit(node, uri, pointer, resolver, by_ref))
        self._check_acyclic()
        if {"unevaluatedProperties", "patternProperties"} <= self.keywords:
            raise TaskError(f"{self.files[self.root_uri]}: uses both patternProperties and unevaluatedProperties; "
                            "their combination is not supported (its regexes could not be time-limited): use "
                            "additionalProperties instead")
        registry = Registry(retrieve=_refuse_retrieval).with_resources(self.docs.items()).crawl()
        return SchemaRegistry(registry, self.root_uri, bool({"pattern", "patternProperties"} & self.keywords))

    def _visit(self, node: dict, uri: str, pointer: str, resolver, by_ref: bool):
        """Check one subschema; return the subschemas to visit next (children and reference targets).

        Resolution follows jsonschema's exactly (the same `referencing` calls): a subschema reached by a
        reference keeps the resolver the lookup returned; one reached as a child enters its own `$id`."""
        where = self._name(uri, pointer)
        self.keywords.update(k for k in node if isinstance(k, str))
        dialect = node.get("$schema")
        if dialect is not None and dialect.rstrip("#") != DIALECT:
            raise TaskError(f"{where}/$schema: '{_short(dialect)}' is not JSON Schema 2020-12; set it to "
                            f"{DIALECT} (or remove it)")
        # Checked, so dropped: jsonschema picks a validator class by `$schema` at every subschema, and would
        # leave the bounded one (schema_regex) for its own 2020-12 class.
        node.pop("$schema", None)
        if isinstance(node.get("$id"), str):  # (referencing has no public accessor for the base URI)
            self._check_inside(urljoin(resolver._base_uri, node["$id"]), where + "/$id", node["$id"])
        if not by_ref:
            resolver = resolver.in_subresource(self.spec.create_resource(node))
        self._compile_patterns(node, where)
        found = []
        for key in _REFS:
            if isinstance(node.get(key), str):
                target = self._lookup(resolver, node[key], f"{where}/{key}")
                self.edges.setdefault(id(node), []).append(id(target.contents))
                found.append((target.contents, *self._locate(resolver, node[key]), target.resolver, True))
        for key, sub, in_place in _subschemas(node):
            if in_place:
                self.edges.setdefault(id(node), []).append(id(sub))
            found.append((sub, uri, f"{pointer}/{key}", resolver, False))
        return found

    def _lookup(self, resolver, ref: str, where: str):
        from referencing.exceptions import NoSuchAnchor, PointerToNowhere, Unresolvable
        try:
            target = resolver.lookup(ref)
        except (PointerToNowhere, NoSuchAnchor, ValueError):
            raise TaskError(f"{where}: '{_short(ref)}' points to nothing in its file; fix the pointer or "
                            "anchor") from None
        except Unresolvable as exc:
            cause = exc.__cause__.__cause__ if exc.__cause__ is not None else None
            if isinstance(cause, _Refused):
                raise TaskError(f"{where}: {cause.error}") from None
            raise TaskError(f"{where}: '{_short(ref)}' cannot be resolved; fix the reference") from None
        if not isinstance(target.contents, (dict, bool)):
            raise TaskError(f"{where}: '{_short(ref)}' points to a {type(target.contents).__name__}, not a "
                            "schema; point it at an object")
        return target

    def _locate(self, resolver, ref: str) -> tuple[str, str]:
        """The (document URI, JSON pointer) a reference's target is reported under."""
        doc, fragment = urldefrag(urljoin(resolver._base_uri, ref))
        return doc, (fragment if fragment.startswith("/") else f"#{fragment}" if fragment else "")

    def _retrieve(self, uri: str):
        """Read a referenced schema file inside the task folder; refuse anything else (no network)."""
        path = self._check_inside(uri, None, uri)
        if not path.is_file():
            raise _Refused(TaskError(f"'{_short(uri)}' names {path}, which does not exist; create it or fix "
                                     "the reference"))
        if len(self.docs) >= MAX_FILES:
            raise _Refused(TaskError(f"references more than {MAX_FILES} schema files; merge them"))
        try:
            schema = read_schema_file(path)
        except TaskError as exc:
            raise _Refused(exc) from None
        self.files[uri] = path
        self.docs[uri] = self.spec.create_resource(schema)
        return self.docs[uri]

    def _check_inside(self, uri: str, where: str | None, raw: str) -> Path:
        """The file a URI names, which must lie inside the task folder."""
        parts = urlsplit(uri)
        path = Path(unquote(parts.path)).resolve() if parts.scheme == "file" and parts.netloc in ("", "localhost") \
            else None
        if self.folder is None:
            inside = path is not None and uri.startswith("file:///") and where is not None
        else:
            inside = path is not None and path.is_relative_to(self.folder)
        if not inside:
            scope = f"inside {self.folder}" if self.folder else "inside this schema"
            error = TaskError(f"'{_short(raw)}' leaves the task folder; references may only name files {scope} "
                              "(nothing is fetched): copy what you need into schemas/ and refer to it by a "
                              "relative path")
            if where is None:
                raise _Refused(error)
            raise TaskError(f"{where}: {error}")
        return path

    def _compile_patterns(self, node: dict, where: str) -> None:
        import regex
        patterns = [("pattern", node["pattern"])] if isinstance(node.get("pattern"), str) else []
        if isinstance(node.get("patternProperties"), dict):
            patterns += [(f"patternProperties/{_escape(p)}", p) for p in node["patternProperties"]]
        for key, pattern in patterns:
            try:
                regex.compile(pattern)
            except (regex.error, ValueError, OverflowError) as exc:
                raise TaskError(f"{where}/{key}: not a valid regular expression ({_short(exc)}); fix it") \
                    from None

    def _name(self, uri: str, pointer: str) -> str:
        path = self.files.get(uri)
        if path is None:  # an embedded resource ($id): name the URI, relative to the folder where possible
            path = uri[len(self.folder.as_uri()) + 1:] if self.folder and uri.startswith(self.folder.as_uri()) \
                else uri
        return f"{path}: {pointer or '/'}" if not pointer.startswith("#") else f"{path}: {pointer}"

    def _check_acyclic(self) -> None:
        """No loop of in-place subschemas and references; no chain of them deeper than MAX_DEPTH."""
        depth: dict[int, int] = {}
        on_path: set[int] = set()
        for start in list(self.edges):
            if start in depth:
                continue
            stack = [(start, iter(self.edges.get(start, ())))]
            on_path.add(start)
            while stack:
                node, children = stack[-1]
                child = next(children, None)
                if child is None:
                    stack.pop()
                    on_path.discard(node)
                    depth[node] = 1 + max((depth[c] for c in self.edges.get(node, ())), default=0)
                    if depth[node] > MAX_DEPTH:
                        raise TaskError(f"{self.where[node]}: references chain deeper than {MAX_DEPTH} levels; "
                                        "shorten the chain")
                elif child in on_path:
                    loop = [self.where[n] for n, _ in stack[[n for n, _ in stack].index(child):]]
                    raise TaskError(f"{self.where[child]}: reference cycle that never reaches a concrete schema "
                                    f"({' -> '.join(loop + [self.where[child]])}); break the loop")
                elif child not in depth:
                    on_path.add(child)
                    stack.append((child, iter(self.edges.get(child, ()))))


def _subschemas(node: dict):
    """(pointer key, subschema, applies in place) for each subschema a 2020-12 keyword holds."""
    for key in _IN_PLACE_ONE + _CHILD_ONE:
        if isinstance(node.get(key), (dict, bool)):
            yield key, node[key], key in _IN_PLACE_ONE
    for key in _IN_PLACE_LIST + _CHILD_LIST:
        if isinstance(node.get(key), list):
            yield from ((f"{key}/{i}", sub, key in _IN_PLACE_LIST) for i, sub in enumerate(node[key]))
    for key in _IN_PLACE_MAP + _CHILD_MAP:
        if isinstance(node.get(key), dict):
            yield from ((f"{key}/{_escape(name)}", sub, key in _IN_PLACE_MAP) for name, sub in node[key].items())


def _refuse_retrieval(uri: str):
    # Every resource a task may use was loaded at load time; anything else is refused, never fetched.
    raise _Refused(TaskError(f"'{_short(uri)}' is not part of the task; nothing is fetched"))
