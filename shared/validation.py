"""Validation errors in words: the field and the rule it broke, as a person would say them, never
a library's prefix or type name. Every place that explains a refused command or parameter (the
API's 422s, the console, segmentctl, the import check, invalid outcomes) says it this way."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from shared.commands import SLUG_PATTERN

_PATTERNS = {  # a pattern a person cannot be expected to read, and what it means
    SLUG_PATTERN: "may only hold the letters A-Z and a-z, digits and _ - .",
    r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$": "must begin with a letter or a digit, then hold only A-Z a-z 0-9 _ - .",
}


def field_name(location: tuple | list, *, tagged: bool = True) -> str:
    """`add.0` as `add[0]`; the first part dropped when it is a tagged union's tag (the command type)."""
    parts = list(location[1:] if tagged else location)
    name = ""
    for part in parts:
        name += f"[{part}]" if isinstance(part, int) else (f".{part}" if name else str(part))
    return name or "the command"


def rule(error: dict[str, Any]) -> str:
    """One error's rule in words."""
    kind, context = error["type"], error.get("ctx") or {}
    if kind == "missing":
        return "is required"
    if kind in ("int_parsing", "int_type", "int_from_float"):
        return "must be a whole number"
    if kind == "string_too_short":
        return "must not be empty" if context.get("min_length") == 1 else \
            f"must be at least {context.get('min_length')} characters"
    if kind == "string_too_long":
        return f"must be at most {context.get('max_length')} characters"
    if kind == "too_long":
        return f"must hold at most {context.get('max_length')} items"
    if kind == "string_pattern_mismatch":
        return _PATTERNS.get(context.get("pattern"), f"must match {context.get('pattern')}")
    if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        word = {"greater_than_equal": "at least", "greater_than": "more than", "less_than_equal": "at most",
                "less_than": "less than"}[kind]
        limit = next(iter(context.values()), "")
        return f"must be {word} {limit}"
    if kind == "union_tag_not_found":
        return "is required"
    if kind == "union_tag_invalid":
        return f"must be one of {context.get('expected_tags')}"
    if kind == "decimal_max_places":
        return f"must have at most {context.get('decimal_places')} decimals"
    message = str(error["msg"])
    for prefix in ("Value error, ", "Assertion failed, "):
        message = message.removeprefix(prefix)
    return message


def in_words(error: ValidationError, *, tagged: bool = True, limit: int | None = None) -> list[str]:
    """Each problem as "field: rule", at most `limit` of them."""
    problems = error.errors(include_url=False)
    return [f"{_where(item, tagged)}: {rule(item)}" for item in problems[:limit]]


def _where(error: dict[str, Any], tagged: bool) -> str:
    if error["type"] in ("union_tag_invalid", "union_tag_not_found"):
        return "type"
    return field_name(error["loc"], tagged=tagged)


def sentence(error: ValidationError, *, tagged: bool = True, limit: int | None = 5) -> str:
    return "; ".join(in_words(error, tagged=tagged, limit=limit))
