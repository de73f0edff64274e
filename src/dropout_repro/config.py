"""Checking a workflow config against its JSON schema, with messages a person can act on.

jsonschema's own messages quote the failing sub-schema; these name the key by its dotted path,
the bad value and the valid range or choices, one line per problem.
"""

from __future__ import annotations

from typing import Any

import jsonschema


class ConfigError(ValueError):
    """The config does not match the schema."""


def _valid(schema: dict) -> str:
    if "enum" in schema:
        return "one of " + ", ".join(map(repr, schema["enum"]))
    if "const" in schema:
        return repr(schema["const"])
    lo = schema.get("minimum", schema.get("exclusiveMinimum"))
    hi = schema.get("maximum", schema.get("exclusiveMaximum"))
    if lo is not None or hi is not None:
        left = "(" if "exclusiveMinimum" in schema else "["
        right = ")" if "exclusiveMaximum" in schema else "]"
        kind = "an integer" if schema.get("type") == "integer" else "a number"
        return f"{kind} in {left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}"
    if "type" in schema:
        t = schema["type"]
        return " or ".join(t) if isinstance(t, list) else t
    return "see workflow/schemas/config.schema.yaml"


def _describe(error: jsonschema.ValidationError) -> str:
    path = ".".join(str(p) for p in error.absolute_path) or "(top level)"
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        extra = sorted(set(error.instance) - set(allowed))
        where = f" in {path}" if error.absolute_path else ""
        return (
            f"unknown config key(s) {', '.join(map(repr, extra))}{where}; "
            f"valid keys: {', '.join(allowed) or 'none'}"
        )
    if error.validator == "propertyNames":
        return (
            f"name {error.instance!r} in {path} is not valid: "
            f"names may use only letters, digits, '_' and '-'"
        )
    if error.validator in ("required", "minProperties", "minItems", "uniqueItems", "oneOf"):
        return f"config key {path} is not valid: {error.message}"
    return f"config key {path} = {error.instance!r} is not valid: expected {_valid(error.schema)}"


def check_config(config: dict[str, Any], schema: dict[str, Any]) -> None:
    """Raise ``ConfigError`` listing every place where ``config`` breaks ``schema``."""
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        lines = [_describe(e) for e in errors]
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(lines))
