"""One definition per tool: a typed Python function becomes the JSON schema sent to the
model, the jsonschema validation run before execution, and the `booth call` command.

A tool is written as

    @tool
    def sample(ctx: ToolContext,
               prompts: Annotated[list[str], Param("Prompts to render", min_items=1)],
               seed: Annotated[int, Param("Random seed", minimum=0)] = 0) -> dict:
        "First docstring line is the description the model reads."

The first parameter is always the `ToolContext`; it is not part of the schema. A tool whose
parameters are the settings of a config dataclass (`train`: `TrainConfig`) takes them as
`**settings` with `@tool(settings=TrainConfig)`: every field that carries a Param becomes a
parameter with the field's bounds and default, so the config stays their only definition.
`model_sees` names the parameters the model is shown (all by default); the others are still
accepted, from an approval edit or `booth call`, and validated the same way.

`Tool.call` is the one place where the engine's user errors (and running out of GPU memory)
become a `ToolError`; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import inspect
import json
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from booth.dreambooth.errors import UserError
from booth.schema import Param, errors, excerpt, object_schema, property_schema, settings_of

__all__ = ["Param", "Tool", "ToolArgumentError", "ToolError", "parse_arguments",
           "parse_words", "read_arguments_file", "tool"]


class ToolError(UserError):
    """A tool could not do what was asked, for a reason the user or model can act on.

    Its message is shown as is (no traceback) and returned to the model as `Error: ...`.
    """


class ToolArgumentError(ToolError):
    """The arguments of a call do not match the tool's schema; nothing was run."""


@dataclass
class Tool:
    name: str
    description: str
    function: Callable[..., dict]
    parameters: dict[str, Any]  # every parameter: what validation and `booth call` accept
    defaults: dict[str, Any] = field(default_factory=dict)
    model_sees: tuple[str, ...] = ()  # the parameters in the schema sent to the model
    # Optional: (ctx, validated arguments) -> one line on what the call will cost
    # ("800 steps, about 2 min on cuda"), shown when the user is asked to approve it.
    estimate: Callable[[Any, dict[str, Any]], str | None] | None = None
    # Optional: (ctx, validated arguments) -> what to do when the GPU ran out of memory.
    out_of_memory: Callable[[Any, dict[str, Any]], str] | None = None
    # Optional: (ctx, validated arguments) -> a memory plan (booth.tools.memory.Plan) to show
    # before approving; None where there is no GPU to plan for.
    memory_plan: Callable[[Any, dict[str, Any]], Any] | None = None
    # Runs on the GPU when there is one: the LLM server may be asked to free the card first.
    uses_gpu: bool = False

    def openai_spec(self) -> dict[str, Any]:
        """The entry of the `tools` list of a chat-completions request: the parameters the
        model is shown, without the keywords only validation needs (see _VALIDATION_ONLY)."""
        properties = self.parameters["properties"]
        shown = {k: _for_the_model(properties[k]) for k in self.model_sees}
        parameters = {**self.parameters, "properties": shown,
                      "required": [k for k in self.parameters["required"] if k in shown]}
        return {"type": "function",
                "function": {"name": self.name, "description": self.description,
                             "parameters": parameters}}

    def validate(self, arguments: Any) -> dict[str, Any]:
        """Check `arguments` against the schema; return them with defaults filled in."""
        if not isinstance(arguments, dict):
            raise ToolArgumentError(
                f"arguments of {self.name} must be a JSON object, got {type(arguments).__name__}"
            )
        problems = errors(self.parameters, arguments)
        if problems:
            raise ToolArgumentError(f"invalid arguments for {self.name}: " + "; ".join(problems))
        return {**self.defaults, **arguments}

    def call(self, ctx: Any, arguments: dict[str, Any]) -> dict[str, Any]:
        """Run the tool on arguments `validate` returned. A user error of the engine becomes
        a ToolError with its message; so does running out of GPU memory."""
        try:
            return self.function(ctx, **arguments)
        except ToolError:
            raise
        except UserError as error:
            raise ToolError(str(error)) from None
        except RuntimeError as error:
            if not _out_of_memory(error):
                raise
            advice = self.out_of_memory(ctx, arguments) if self.out_of_memory else (
                "close other programs using the GPU, or ask for fewer images at a time")
            raise ToolError(f"the GPU ran out of memory. {advice}") from None

    def run(self, ctx: Any, arguments: Any) -> dict[str, Any]:
        """Validate, then call. Nothing runs unless the arguments are valid."""
        return self.call(ctx, self.validate(arguments))


# Schema text paid for in tokens on every request that helps no one write a call: names come
# from the workspace state, lengths are far beyond real ones, and a call that breaks a pattern
# gets an error saying the rule in words (booth.schema.pattern). Bounds no sensible call meets
# (a count of at least 1, a seed up to 2**32-1) go too; bounds that guide a choice (a
# resolution up to 1024, at most 16 images) stay. `validate` still checks every one.
_VALIDATION_ONLY = frozenset({"pattern", "minLength", "maxLength"})
_OBVIOUS_MINIMUM = (0, 1)
_UNREACHED_MAXIMUM = 2000


def _for_the_model(schema: dict[str, Any]) -> dict[str, Any]:
    shown = {k: v for k, v in schema.items() if k not in _VALIDATION_ONLY}
    for lower in ("minimum", "exclusiveMinimum"):
        if shown.get(lower) in _OBVIOUS_MINIMUM:
            del shown[lower]
    if shown.get("maximum", 0) >= _UNREACHED_MAXIMUM:
        del shown["maximum"]
    if isinstance(shown.get("items"), dict):
        shown["items"] = _for_the_model(shown["items"])
    return shown


def _out_of_memory(error: RuntimeError) -> bool:
    import sys

    torch = sys.modules.get("torch")  # whatever ran out of memory has imported torch
    return torch is not None and isinstance(error, torch.OutOfMemoryError)


def tool(function: Callable[..., dict] | None = None, *, settings: type | None = None,
         model_sees: Iterable[str] | None = None):
    """Turn a typed function into a `Tool` (see the module docstring)."""
    if function is None:
        return lambda f: tool(f, settings=settings, model_sees=model_sees)
    hints = typing.get_type_hints(function, include_extras=True)
    parameters = list(inspect.signature(function).parameters.values())[1:]  # skip ctx
    declared = [(p.name, hints[p.name], p.default) for p in parameters
                if p.kind is not inspect.Parameter.VAR_KEYWORD]
    takes_settings = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)
    if (settings is not None) != takes_settings:
        raise TypeError(f"tool {function.__name__}: settings= and **settings go together")
    if settings is not None:
        names = {name for name, _, _ in declared}
        declared += [(name, annotation, default)
                     for name, (annotation, default) in settings_of(settings).items()
                     if name not in names]
    properties: dict[str, Any] = {}
    required: list[str] = []
    defaults: dict[str, Any] = {}
    for name, annotation, default in declared:
        properties[name] = property_schema(annotation)
        if default is inspect.Parameter.empty:
            required.append(name)
        elif default is not None:
            properties[name]["default"] = default
            defaults[name] = default
    description = inspect.cleandoc(function.__doc__ or "").strip()
    if not description:
        raise TypeError(f"tool {function.__name__} needs a docstring: the model reads it")
    shown = tuple(properties) if model_sees is None else tuple(model_sees)
    unknown = set(shown) - set(properties)
    if unknown or not set(required) <= set(shown):
        raise TypeError(f"tool {function.__name__}: model_sees names unknown parameters "
                        f"{sorted(unknown)} or leaves out required ones")
    return Tool(function.__name__, description, function, object_schema(properties, required),
                defaults, shown)


def parse_words(words: list[str], parameters: dict | None = None) -> dict[str, Any]:
    """Arguments a person typed: one JSON object, or key=value words whose values are read as
    JSON when they parse (`steps=400`, `prompts='["a dog"]'`) and as text otherwise
    (`class_noun=dog`). A parameter the schema (`parameters`) declares a string is always
    taken as typed: `checkpoint=400` means the text "400". A first word `@FILE` reads the
    arguments from a YAML or JSON file; the words after it override them."""
    if words and words[0].startswith("@"):
        return {**read_arguments_file(words[0][1:]), **parse_words(words[1:], parameters)}
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
                f"cannot read {excerpt(word)}: give one JSON object or key=value pairs"
            )
        merged[key] = _typed_word(value, properties.get(key, {}))
    return merged


MAX_ARGUMENTS_FILE = 1_000_000  # bytes: an argument file is a few lines; more is a wrong file


def read_arguments_file(path: str) -> dict[str, Any]:
    """The mapping of arguments in a YAML or JSON file (`booth call train @args.yaml`), the
    path read from the current folder like any path on a command line."""
    import yaml

    file = Path(path).expanduser()
    where = f"argument file {excerpt(path)}"
    try:
        if not path:
            raise ToolArgumentError("give a file after @, e.g. @runs/rex-1/args.yaml")
        if file.is_dir():
            raise ToolArgumentError(f"{where} is a folder, not a file; give @FILE.yaml")
        if file.stat().st_size > MAX_ARGUMENTS_FILE:
            raise ToolArgumentError(f"{where} is over {MAX_ARGUMENTS_FILE:,} bytes: not an "
                                    "argument file")
        loaded = yaml.load(file.read_text(encoding="utf-8"), Loader=_arguments_loader())
    except FileNotFoundError:
        raise ToolArgumentError(f"{where} does not exist") from None
    except (OSError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or str(error)
        raise ToolArgumentError(f"cannot read {where}: {reason}") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        at = f" at line {mark.line + 1} column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or "not YAML or JSON"
        raise ToolArgumentError(f"{where} is not valid YAML/JSON ({problem}{at})") from None
    except RecursionError:
        raise ToolArgumentError(f"{where} is nested too deeply to be read") from None
    if loaded is None:
        raise ToolArgumentError(f"{where} is empty: write one `name: value` line per argument")
    if not isinstance(loaded, dict) or not all(isinstance(k, str) for k in loaded):
        raise ToolArgumentError(f"{where} must hold a mapping of argument names to values "
                                f"(name: value lines), not {type(loaded).__name__}")
    return loaded


@functools.cache
def _arguments_loader():
    """YAML's safe loader, where `1e-4` is a number as in JSON (YAML 1.1 reads it as text,
    so a learning rate written the usual way would fail as a string)."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
        list("-+0123456789"))
    return Loader


def _typed_word(value: str, schema: dict) -> Any:
    """One typed value: as text for a string parameter (`checkpoint=400` is "400"), a list of
    one for a list of strings given one text (`prompts=a photo of sks dog`), else JSON when
    it parses."""
    if schema.get("type") == "string":
        return value
    try:
        parsed = _loads(value)
    except (json.JSONDecodeError, RecursionError):
        parsed = value
    wants_texts = schema.get("type") == "array" and schema.get("items", {}).get("type") == "string"
    if wants_texts and not isinstance(parsed, list):
        return [value]
    return parsed


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
            f"column {error.colno}): {excerpt(raw)}"
        ) from None
    except RecursionError:  # json's decoder recurses once per nesting level
        raise ToolArgumentError("arguments are nested too deeply to be read (thousands of "
                                "levels); send a flat JSON object") from None
