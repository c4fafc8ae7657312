"""One definition per tool: a typed Python function becomes the JSON schema sent to the
model, the jsonschema validation run before execution, and the `booth call` command.

A tool is written as

    @tool
    def sample(ctx: ToolContext,
               prompts: Annotated[list[str], Param("Prompts to render", min_items=1)],
               seed: Annotated[int, Param("Random seed", minimum=0)] = 0) -> dict:
        "First docstring line is the description the model reads."

The first parameter is always the `ToolContext`; it is not part of the schema.
"""

from __future__ import annotations

import inspect
import json
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import jsonschema


@dataclass(frozen=True)
class Param:
    """Description and bounds of one tool parameter, carried in `Annotated[...]`."""

    description: str
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: float | None = None
    min_length: int | None = None
    max_length: int | None = None
    pattern: str | None = None
    min_items: int | None = None
    max_items: int | None = None
    multiple_of: int | None = None

    def constraints(self) -> dict[str, Any]:
        names = {
            "minimum": "minimum",
            "maximum": "maximum",
            "exclusive_minimum": "exclusiveMinimum",
            "min_length": "minLength",
            "max_length": "maxLength",
            "pattern": "pattern",
            "min_items": "minItems",
            "max_items": "maxItems",
            "multiple_of": "multipleOf",
        }
        return {
            json_name: getattr(self, attr)
            for attr, json_name in names.items()
            if getattr(self, attr) is not None
        }


class ToolError(Exception):
    """A tool could not do what was asked, for a reason the user or model can act on.

    Its message is shown as is (no traceback) and returned to the model as `Error: ...`.
    """


class ToolArgumentError(ToolError):
    """The arguments of a call do not match the tool's schema; nothing was run."""


_SCALARS: dict[type, str] = {str: "string", int: "integer", float: "number", bool: "boolean"}


def _type_schema(annotation: Any) -> dict[str, Any]:
    """JSON schema of a Python annotation (the small set of types tools use)."""
    origin = get_origin(annotation)
    if annotation in _SCALARS:
        return {"type": _SCALARS[annotation]}
    if origin is Literal:
        values = list(get_args(annotation))
        return {"type": _SCALARS[type(values[0])], "enum": values}
    if origin in (list, tuple) or annotation is list:
        (item,) = get_args(annotation) or (str,)
        return {"type": "array", "items": _type_schema(item)}
    if origin in (Union, types.UnionType):
        non_null = [a for a in get_args(annotation) if a is not type(None)]
        if len(non_null) == 1:
            # Optional[X]: the model omits the field rather than sending null.
            return _type_schema(non_null[0])
    raise TypeError(f"tool parameters cannot be of type {annotation!r}")


def _param_schema(annotation: Any) -> tuple[dict[str, Any], str]:
    if get_origin(annotation) is not Annotated:
        raise TypeError(f"tool parameter needs Annotated[type, Param(...)], got {annotation!r}")
    base, *extras = get_args(annotation)
    param = next((e for e in extras if isinstance(e, Param)), None)
    if param is None:
        raise TypeError(f"tool parameter {annotation!r} carries no Param(...)")
    schema = _type_schema(base)
    constraints = param.constraints()
    if schema["type"] == "array":
        array_keys = {"minItems", "maxItems"}
        schema.update({k: v for k, v in constraints.items() if k in array_keys})
        schema["items"].update({k: v for k, v in constraints.items() if k not in array_keys})
    else:
        schema.update(constraints)
    schema["description"] = param.description
    return schema, param.description


def _pattern(validator, pattern: str, instance: Any, schema: dict):
    """JSON Schema's `pattern`, where `$` means the end of the text: Python's `$` also
    matches before a final newline, which would let "rex\n" pass as a name."""
    if not validator.is_type(instance, "string"):
        return
    if re.search(pattern, instance) is None or (pattern.endswith("$") and instance.endswith("\n")):
        yield jsonschema.ValidationError(f"{instance!r} does not match {pattern!r}")


_Validator = jsonschema.validators.extend(
    jsonschema.Draft202012Validator, {"pattern": _pattern}
)


@dataclass
class Tool:
    name: str
    description: str
    function: Callable[..., dict]
    parameters: dict[str, Any]
    defaults: dict[str, Any] = field(default_factory=dict)
    # Optional: (ctx, validated arguments) -> one line on what the call will cost
    # ("800 steps, about 2 min on cuda"), shown when the user is asked to approve it.
    estimate: Callable[[Any, dict[str, Any]], str | None] | None = None

    def openai_spec(self) -> dict[str, Any]:
        """The entry of the `tools` list of a chat-completions request."""
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": self.parameters,
            },
        }

    def validate(self, arguments: Any) -> dict[str, Any]:
        """Check `arguments` against the schema; return them with defaults filled in."""
        if not isinstance(arguments, dict):
            raise ToolArgumentError(
                f"arguments of {self.name} must be a JSON object, got {type(arguments).__name__}"
            )
        validator = _Validator(self.parameters)
        errors = sorted(validator.iter_errors(arguments), key=lambda e: list(e.absolute_path))
        if errors:
            raise ToolArgumentError(
                f"invalid arguments for {self.name}: " + "; ".join(map(_describe_error, errors))
            )
        return {**self.defaults, **arguments}

    def run(self, ctx: Any, arguments: Any) -> dict[str, Any]:
        """Validate, then call. Nothing runs unless the arguments are valid."""
        return self.function(ctx, **self.validate(arguments))


def _describe_error(error: jsonschema.ValidationError) -> str:
    """One schema error in words, quoting at most an excerpt of the value: the text goes to
    the model, the terminal and the transcript, and a value may be a megabyte long."""
    where = ".".join(_excerpt(p) if isinstance(p, str) else str(p) for p in error.absolute_path)
    if error.validator == "additionalProperties":
        extra = sorted(set(error.instance) - set(error.schema.get("properties", {})))
        return f"unknown field(s) {', '.join(_excerpt(name, quote=True) for name in extra)}"
    if error.validator == "required":
        return error.message.replace("is a required property", "is required")
    message = error.message
    whole = repr(error.instance)
    if len(whole) > _QUOTE_CHARS:  # jsonschema's messages quote the value as its repr
        message = message.replace(whole, _excerpt(error.instance, quote=True), 1)
    return f"{where}: {message}" if where else message


_QUOTE_CHARS = 60  # of a value quoted in an error


def _excerpt(value: Any, quote: bool = False) -> str:
    """`value` (repr'd when `quote`) cut to its first characters, saying how long it was."""
    text = repr(value) if quote else str(value)
    if len(text) <= _QUOTE_CHARS:
        return text
    size = f"{len(value)} characters" if isinstance(value, str) else f"{len(text)} as written"
    return f"{text[:_QUOTE_CHARS]}… ({size})"


def tool(function: Callable[..., dict]) -> Tool:
    """Turn a typed function into a `Tool` (see the module docstring)."""
    hints = typing.get_type_hints(function, include_extras=True)
    signature = inspect.signature(function)
    properties: dict[str, Any] = {}
    required: list[str] = []
    defaults: dict[str, Any] = {}
    for name, parameter in list(signature.parameters.items())[1:]:  # skip ctx
        schema, _ = _param_schema(hints[name])
        if parameter.default is inspect.Parameter.empty:
            required.append(name)
        elif parameter.default is not None:
            schema["default"] = parameter.default
            defaults[name] = parameter.default
        properties[name] = schema
    description = inspect.cleandoc(function.__doc__ or "").strip()
    if not description:
        raise TypeError(f"tool {function.__name__} needs a docstring: the model reads it")
    parameters = {
        "type": "object",
        "properties": properties,
        "required": required,
        "additionalProperties": False,
    }
    jsonschema.Draft202012Validator.check_schema(parameters)
    return Tool(function.__name__, description, function, parameters, defaults)


def parse_words(words: list[str], parameters: dict | None = None) -> dict[str, Any]:
    """Arguments a person typed: one JSON object, or key=value words whose values are read as
    JSON when they parse (`steps=400`, `prompts='["a dog"]'`) and as text otherwise
    (`class_noun=dog`). A parameter the schema (`parameters`) declares a string is always
    taken as typed: `checkpoint=400` means the text "400"."""
    properties = (parameters or {}).get("properties", {})
    if len(words) == 1 and words[0].lstrip().startswith("{"):
        parsed = parse_arguments(words[0])
        if not isinstance(parsed, dict):
            raise ToolArgumentError("give a JSON object")
        return parsed
    merged: dict[str, Any] = {}
    for word in words:
        key, sep, value = word.partition("=")
        if not sep or not key:
            raise ToolArgumentError(
                f"cannot read {word!r}: give one JSON object or key=value pairs"
            )
        if properties.get(key, {}).get("type") == "string":
            merged[key] = value
            continue
        try:
            merged[key] = _loads(value)
        except json.JSONDecodeError:
            merged[key] = value
    return merged


def _no_constant(name: str):
    # json accepts NaN and Infinity, and every bound check against NaN is false: a NaN
    # learning rate would pass `maximum` and train.
    raise ToolArgumentError(f"{name} is not a number booth accepts")


def _loads(text: str) -> Any:
    return json.loads(text, parse_constant=_no_constant)


def parse_arguments(raw: str | dict | None) -> Any:
    """Arguments as the model or the command line sent them: a JSON text (or already parsed)."""
    if raw is None or raw == "":
        return {}
    if isinstance(raw, dict):
        return raw
    try:
        return _loads(raw)
    except json.JSONDecodeError as error:
        raise ToolArgumentError(
            f"arguments are not valid JSON ({error.msg} at line {error.lineno} "
            f"column {error.colno}): {raw[:200]!r}"
        ) from None
