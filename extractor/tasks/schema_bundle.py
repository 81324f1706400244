"""A task's schema made self-contained for constrained decoding: every `$ref` that leaves the root
document (another schema file of the task folder, or a subschema with its own `$id`) is copied under the
root's `$defs` and pointed at there. Grammar engines see one document: xgrammar reads any other reference
as "any JSON value" (with only a warning), so a referenced file's constraints were silently not enforced.

The references were all resolved and checked when the task loaded (schema_refs), so this only copies."""
from __future__ import annotations

import copy
from urllib.parse import urldefrag, urljoin

from extractor.tasks.schema_refs import SchemaRegistry


_NAME_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


def self_contained(schema, registry: SchemaRegistry):
    """`schema` with every reference outside its own document bundled under `$defs`."""
    if not isinstance(schema, dict):
        return schema
    return _Bundler(schema, registry).run()


class _Bundler:
    def __init__(self, schema: dict, registry: SchemaRegistry):
        self.root = copy.deepcopy(schema)
        self.registry = registry.registry
        self.root_doc = urldefrag(registry.root_uri)[0]
        existing = self.root.get("$defs")
        self.defs: dict = dict(existing) if isinstance(existing, dict) else {}
        self.names: dict[str, str] = {}  # absolute URI of a bundled target -> its name under $defs

    def run(self) -> dict:
        self.root = self._walk(self.root, self.root_doc, in_root=True)
        if self.names:
            self.root["$defs"] = self.defs
        return self.root

    def _walk(self, node, base: str, in_root: bool):
        if isinstance(node, list):
            return [self._walk(item, base, in_root) for item in node]
        if not isinstance(node, dict):
            return node
        if isinstance(node.get("$id"), str) and node is not self.root:
            base, in_root = urljoin(base, node["$id"]), False  # a subschema with its own $id is its own document
        out = {}
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                out[key] = self._ref(value, base, in_root)
            elif key in _NAME_MAPS and isinstance(value, dict):  # names -> subschemas (a property may be "enum")
                out[key] = {name: self._walk(sub, base, in_root) for name, sub in value.items()}
            elif key in ("enum", "const", "examples", "default"):
                out[key] = value  # values, not subschemas
            elif key == "$id" and not in_root:
                continue  # bundled: the copy lives in the root document now
            else:
                out[key] = self._walk(value, base, in_root)
        return out

    def _ref(self, ref: str, base: str, in_root: bool) -> str:
        target = urljoin(base, ref)
        if in_root and urldefrag(target)[0] == self.root_doc:
            return ref  # inside the root document: left as written
        if target not in self.names:
            name = self._free_name(target)
            self.names[target] = name
            resolved = self.registry.resolver(base_uri=base).lookup(ref)
            doc = urldefrag(target)[0]
            self.defs[name] = self._walk(copy.deepcopy(resolved.contents), doc, in_root=False)
        return f"#/$defs/{self.names[target]}"

    def _free_name(self, target: str) -> str:
        stem = "".join(c if c.isalnum() else "_" for c in target.rsplit("/", 1)[-1])[:40] or "ref"
        name, n = f"bundled_{stem}", 1
        while name in self.defs:
            n += 1
            name = f"bundled_{stem}_{n}"
        self.defs[name] = None  # reserved before the target is walked (a reference cycle names it again)
        return name
