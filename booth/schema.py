"""Typed Python -> JSON Schema: the one mechanism behind tool schemas and config bounds.

A tool parameter or a config field is written `Annotated[type, Param("what it means", bounds)]`.
From that one line come the JSON schema the model reads, the validation run before a tool
executes, and the check of a `TrainConfig` read from YAML, so bounds can never disagree.

A leaf module: the engine (booth.dreambooth) and the tools both import it; it imports nothing
of booth.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import re
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import jsonschema

_JSON_NAMES = {
    "minimum": "minimum",
    "maximum": "maximum",
    "exclusive_minimum": "exclusiveMinimum",
    "exclusive_maximum": "exclusiveMaximum",
    "min_length": "minLength",
    "max_length": "maxLength",
    "pattern": "pattern",
    "min_items": "minItems",
    "max_items": "maxItems",
    "multiple_of": "multipleOf",
}
_ARRAY_KEYS = {"minItems", "maxItems"}
_SCALARS: dict[type, str] = {str: "string", int: "integer", float: "number", bool: "boolean"}
EXCERPT = 80  # characters of a value quoted in an error: enough to recognise it
MAX_ERRORS = 10  # problems named in one validation message
_PATTERN_WORDS: dict[str, str] = {}


def pattern(regex: str, words: str) -> str:
    """A pattern for a Param, with the rule said in words for the person or model who broke
    it ("use 1-64 letters, ..."): a raw regex in an error helps nobody."""
    _PATTERN_WORDS[regex] = words
    return regex


# Patterns for text a tool would refuse anyway, so the schema refuses it first (and the call
# counts as invalid): a path with a NUL byte cannot be opened; blank text means nothing.
PATH = pattern(r"^[^\x00]+$", "a path without NUL bytes")
NOT_BLANK = pattern(r"\S", "some text (not blank)")


@dataclass(frozen=True)
class Param:
    """Description and bounds of one parameter or config field, carried in `Annotated[...]`."""

    description: str
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: float | None = None
    exclusive_maximum: float | None = None
    min_length: int | None = None
    max_length: int | None = None
    pattern: str | None = None
    min_items: int | None = None
    max_items: int | None = None
    multiple_of: int | None = None

    def constraints(self) -> dict[str, Any]:
        return {json_name: getattr(self, attr) for attr, json_name in _JSON_NAMES.items()
                if getattr(self, attr) is not None}


def type_schema(annotation: Any) -> dict[str, Any]:
    """JSON schema of a Python annotation (the small set of types tools and configs use)."""
    origin = get_origin(annotation)
    if annotation in _SCALARS:
        return {"type": _SCALARS[annotation]}
    if origin is Literal:
        values = list(get_args(annotation))
        return {"type": _SCALARS[type(values[0])], "enum": values}
    if origin in (list, tuple) or annotation is list:
        (item,) = get_args(annotation) or (str,)
        return {"type": "array", "items": type_schema(item)}
    if origin in (Union, types.UnionType):
        non_null = [a for a in get_args(annotation) if a is not type(None)]
        if len(non_null) == 1:
            # Optional[X]: the model omits the field rather than sending null.
            return type_schema(non_null[0])
    raise TypeError(f"parameters cannot be of type {annotation!r}")


def param_of(annotation: Any) -> Param | None:
    """The Param carried by `Annotated[type, Param(...)]`, or None."""
    if get_origin(annotation) is not Annotated:
        return None
    return next((e for e in get_args(annotation)[1:] if isinstance(e, Param)), None)


def property_schema(annotation: Any) -> dict[str, Any]:
    """The JSON schema of one `Annotated[type, Param(...)]` parameter."""
    param = param_of(annotation)
    if param is None:
        raise TypeError(f"parameter needs Annotated[type, Param(...)], got {annotation!r}")
    schema = type_schema(get_args(annotation)[0])
    constraints = param.constraints()
    if schema["type"] == "array":
        schema.update({k: v for k, v in constraints.items() if k in _ARRAY_KEYS})
        schema["items"].update({k: v for k, v in constraints.items() if k not in _ARRAY_KEYS})
    else:
        schema.update(constraints)
    schema["description"] = param.description
    return schema


# --- dataclass fields as settings ------------------------------------------------------------


def settings_of(config_class: type) -> dict[str, tuple[Any, Any]]:
    """{name: (annotation, default)} of the fields of a dataclass that carry a Param: the
    settings a user may give. Fields without one are filled in by code (paths, say)."""
    hints = typing.get_type_hints(config_class, include_extras=True)
    found = {}
    for item in dataclasses.fields(config_class):
        if param_of(hints[item.name]) is None:
            continue
        default = (item.default_factory() if item.default_factory is not dataclasses.MISSING
                   else item.default)
        found[item.name] = (hints[item.name], default)
    return found


def setting(config_class: type, name: str, description: str | None = None,
            default_note: str | None = None) -> Param:
    """The Param of field `name` of `config_class`, for a tool parameter that stands for it:
    the same bounds, optionally other words, and "(default: ...)" when the tool fills it in."""
    param = param_of(typing.get_type_hints(config_class, include_extras=True)[name])
    if param is None:
        raise TypeError(f"{config_class.__name__}.{name} carries no Param")
    text = description or param.description
    if default_note:
        text = f"{text} (default: {default_note})"
    return dataclasses.replace(param, description=text)


def object_schema(properties: dict[str, dict], required: list[str]) -> dict[str, Any]:
    schema = {"type": "object", "properties": properties, "required": required,
              "additionalProperties": False}
    jsonschema.Draft202012Validator.check_schema(schema)
    return schema


@functools.cache
def settings_schema(config_class: type) -> dict[str, Any]:
    """The object schema of every setting of a dataclass (none required: all have defaults).
    Built once per class; do not modify it."""
    return object_schema({name: property_schema(annotation)
                          for name, (annotation, _) in settings_of(config_class).items()}, [])


# --- validation ------------------------------------------------------------------------------


def _pattern(validator, regex: str, instance: Any, schema: dict):
    """JSON Schema's `pattern`, where `$` means the end of the text: Python's `$` also
    matches before a final newline, which would let "rex\n" pass as a name."""
    if not validator.is_type(instance, "string"):
        return
    if re.search(regex, instance) is None or (regex.endswith("$") and instance.endswith("\n")):
        words = _PATTERN_WORDS.get(regex)
        rule = f"use {words}" if words else f"it must match {regex!r}"
        yield jsonschema.ValidationError(f"{excerpt(instance)} is not allowed: {rule}")


_TYPE = jsonschema.Draft202012Validator.VALIDATORS["type"]


def _type(validator, types_: Any, instance: Any, schema: dict):
    """JSON Schema's `type`, where a number is finite: NaN passes every bound (comparisons
    with it are false), so a NaN learning rate read from YAML would train."""
    yield from _TYPE(validator, types_, instance, schema)
    if isinstance(instance, float) and not math.isfinite(instance):
        yield jsonschema.ValidationError(f"{instance} is not a number booth accepts")


_Validator = jsonschema.validators.extend(
    jsonschema.Draft202012Validator, {"pattern": _pattern, "type": _type}
)


def errors(schema: dict, instance: Any) -> list[str]:
    """What is wrong with `instance` under `schema`, one phrase per problem, in field order;
    values are quoted as short excerpts, never whole."""
    try:
        # A million bad list items would make a million messages: the first few tell enough.
        found = list(itertools.islice(_Validator(schema).iter_errors(instance), MAX_ERRORS + 1))
    except RecursionError:  # the validator recurses once per nesting level
        return ["the value is nested too deeply (thousands of levels)"]
    found.sort(key=lambda e: [str(p) for p in e.absolute_path])
    described = [describe_error(error) for error in found[:MAX_ERRORS]]
    if len(found) > MAX_ERRORS:
        described.append("and more")
    return described


def describe_error(error: jsonschema.ValidationError) -> str:
    where = ".".join(str(p) for p in error.absolute_path)
    if error.validator == "additionalProperties":
        extra = sorted(set(error.instance) - set(error.schema.get("properties", {})))
        return f"unknown field(s) {', '.join(excerpt(name) for name in extra)}"
    if error.validator == "required":
        return error.message.replace("is a required property", "is required")
    message = error.message
    if error.validator != "pattern" and isinstance(error.instance, (str, list, dict)):
        # jsonschema quotes the whole value: a 1 MB prompt would be quoted whole.
        message = message.replace(repr(error.instance), excerpt(error.instance), 1)
    return f"{where}: {message}" if where else message


def excerpt(value: Any, limit: int = EXCERPT) -> str:
    """A value as quoted in a message: its repr, cut to `limit` characters with its size."""
    text = repr(value) if isinstance(value, str) else json.dumps(value, default=str)
    if len(text) <= limit:
        return text
    return f"{text[:limit - 1]}… ({len(text)} characters)"
