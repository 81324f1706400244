"""A task schema's validator: compiled once per task, used to check few-shot examples at load and every
model output when judged. A fast compiled check runs first where the schema allows it; the reference
validator (jsonschema, 2020-12, regexes under a time budget) explains any failure."""
from __future__ import annotations

_FAST_KEYWORDS = {"$schema", "$id", "$comment", "title", "description", "default", "examples", "type", "properties",
                  "required", "additionalProperties", "items", "minItems", "maxItems", "enum", "const", "minLength",
                  "maxLength", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "anyOf",
                  "oneOf", "allOf", "not", "uniqueItems", "format"}


def _fast_compatible(schema) -> bool:
    if isinstance(schema, bool):
        return True
    if not isinstance(schema, dict) or not set(schema) <= _FAST_KEYWORDS:
        return False
    subs = list(schema.get("properties", {}).values())
    for key in ("items", "additionalProperties", "not"):
        if isinstance(schema.get(key), (dict, bool)):
            subs.append(schema[key])
    for key in ("anyOf", "oneOf", "allOf"):
        subs.extend(schema.get(key, []))
    return all(_fast_compatible(sub) for sub in subs)


class Validator:
    """Validates predictions against one task's schema (compiled once). A fast compiled check runs first
    where the schema allows it; the reference validator (jsonschema, 2020-12) explains any failure.

    `registry` (Task.registry) holds every resource the schema may reference; without one, the schema may
    only reference itself. Nothing is ever fetched. Schema regexes run under a time budget per value
    (schema_regex), and a value nested too deep to check is an error of that value, not a crash."""

    def __init__(self, schema, registry=None):
        from extractor.tasks.schema_refs import inline_registry
        from extractor.tasks.schema_regex import bounded_validator_class
        registry = inline_registry(schema) if registry is None else registry
        # The root is entered through its URI, so relative $ids and refs resolve as they did at load.
        self._validator = bounded_validator_class()({"$ref": registry.root_uri}, registry=registry.registry)
        self._fast = None
        if isinstance(schema, dict) and _fast_compatible(schema):
            try:
                import fastjsonschema
                body = {k: v for k, v in schema.items() if k not in ("$schema", "$id")}
                self._fast = fastjsonschema.compile(body, formats={})
            except ImportError:  # optional speed-up (absent on some machines)
                self._fast = None

    def first_error(self, value) -> str | None:
        from referencing.exceptions import Unresolvable

        from extractor.tasks.schema_regex import PatternTimeout, record_budget
        if self._fast is not None:
            try:
                self._fast(value)
                return None
            except Exception:  # noqa: BLE001 - fastjsonschema raises JsonSchemaValueException; explain below
                pass
        from jsonschema.exceptions import best_match
        try:
            with record_budget():
                error = best_match(self._validator.iter_errors(value))
        except PatternTimeout as exc:
            return f"$: {exc}"
        except RecursionError:
            return "$: value nested too deeply to check against the schema"
        except Unresolvable as exc:  # every reference was resolved at load: only a $dynamicRef can get here
            return f"$: the schema's reference {str(exc)[:200]!r} cannot be resolved"
        if error is None:
            return None
        path = "$" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)
        return f"{path}: {error.message[:300]}"
