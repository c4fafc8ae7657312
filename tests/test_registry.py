"""The one-definition-per-tool mechanism: schema, validation and defaults from a typed function."""

from __future__ import annotations

from typing import Annotated, Literal

import pytest

from booth.tools.registry import Param, ToolArgumentError, parse_arguments, tool


@tool
def demo_tool(
    ctx,
    prompts: Annotated[list[str], Param("What to draw", min_items=1, max_items=4, max_length=50)],
    steps: Annotated[int, Param("Denoising steps", minimum=1, maximum=200)] = 30,
    precision: Annotated[Literal["no", "fp16", "bf16"], Param("Mixed precision")] = "no",
    run: Annotated[str | None, Param("Run name", pattern=r"^[a-z]+$")] = None,
    size: Annotated[int, Param("Pixels", minimum=64, multiple_of=8)] = 64,
) -> dict:
    """Draw some pictures.

    A second paragraph the model also reads.
    """
    return {"prompts": prompts, "steps": steps, "precision": precision, "run": run,
            "size": size}


def test_schema_comes_from_the_signature():
    spec = demo_tool.openai_spec()["function"]
    assert spec["name"] == "demo_tool"
    assert spec["description"].startswith("Draw some pictures.")
    params = spec["parameters"]
    assert params["required"] == ["prompts"]
    assert params["additionalProperties"] is False
    # Validation keeps every bound; the model is sent them less what only validation needs.
    assert demo_tool.parameters["properties"]["prompts"] == {
        "type": "array",
        "items": {"type": "string", "maxLength": 50},
        "minItems": 1,
        "maxItems": 4,
        "description": "What to draw",
    }
    assert params["properties"]["steps"]["maximum"] == 200
    assert params["properties"]["steps"]["default"] == 30
    assert params["properties"]["precision"]["enum"] == ["no", "fp16", "bf16"]
    # Optional parameters are omitted by the model, never sent as null.
    assert params["properties"]["run"]["type"] == "string"


def test_valid_arguments_run_with_defaults_filled_in():
    assert demo_tool.run(None, {"prompts": ["a dog"]}) == {
        "prompts": ["a dog"], "steps": 30, "precision": "no", "run": None, "size": 64,
    }


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({}, "'prompts' is required"),
        ({"prompts": ["a"], "colour": "red"}, "unknown field(s) 'colour'"),
        ({"prompts": "a dog"}, "prompts: 'a dog' is not of type 'array'"),
        ({"prompts": ["a"], "steps": 0}, "steps: 0 is less than the minimum of 1"),
        ({"prompts": ["a"], "steps": 2.5}, "steps: 2.5 is not of type 'integer'"),
        ({"prompts": ["a"], "precision": "fp8"}, "precision: 'fp8' is not one of"),
        ({"prompts": []}, "prompts: [] should be non-empty"),
        ({"prompts": ["a"], "run": "../etc"}, "run: '../etc' is not allowed: it must match"),
        ({"prompts": ["a"], "size": 100}, "size: 100 is not a multiple of 8"),
        (["a dog"], "must be a JSON object, got list"),
    ],
)
def test_invalid_arguments_are_named_and_nothing_runs(arguments, message):
    ran = []
    demo_tool.function, original = (lambda ctx, **kw: ran.append(kw)), demo_tool.function
    try:
        with pytest.raises(ToolArgumentError) as error:
            demo_tool.run(None, arguments)
    finally:
        demo_tool.function = original
    assert message in str(error.value)
    assert ran == []


def test_unparseable_json_is_reported_with_its_position():
    with pytest.raises(ToolArgumentError, match=r"not valid JSON \(Expecting .* column"):
        parse_arguments('{"prompts": ["a dog"]')
    assert parse_arguments("") == {}
    assert parse_arguments('{"a": 1}') == {"a": 1}


def test_a_tool_without_annotations_or_docstring_is_refused_at_definition():
    with pytest.raises(TypeError, match="Annotated"):
        @tool
        def bare(ctx, x: int) -> dict:
            """Doc."""
            return {}

    with pytest.raises(TypeError, match="docstring"):
        @tool
        def undocumented(ctx, x: Annotated[int, Param("x")]) -> dict:
            return {}


def test_registered_tools_have_strict_valid_schemas():
    import jsonschema

    from booth.tools import TOOLS

    assert list(TOOLS) == [
        "prepare_dataset", "generate_priors", "train", "sample", "resume_checkpoint",
    ]
    for spec in TOOLS.values():
        params = spec.parameters
        jsonschema.Draft202012Validator.check_schema(params)
        assert params["additionalProperties"] is False
        for name, prop in params["properties"].items():
            assert prop.get("description"), f"{spec.name}.{name} has no description"


def test_typed_words_follow_the_schema_types():
    from booth.tools.registry import parse_words

    parameters = demo_tool.parameters | {
        "properties": {**demo_tool.parameters["properties"], "run": {"type": "string"}}}
    words = ["steps=40", "run=400", 'prompts=["a dog"]', "precision=fp16"]
    assert parse_words(words, parameters) == {
        "steps": 40, "run": "400", "prompts": ["a dog"], "precision": "fp16"}
    # Without a schema, numbers are numbers.
    assert parse_words(["run=400"]) == {"run": 400}


@pytest.mark.parametrize("text", ['{"prompts": ["a"], "steps": NaN}',
                                  '{"prompts": ["a"], "steps": Infinity}'])
def test_nan_and_infinity_never_slip_past_the_bounds(text):
    with pytest.raises(ToolArgumentError, match="not a number booth accepts"):
        parse_arguments(text)
    from booth.tools.registry import parse_words

    with pytest.raises(ToolArgumentError, match="NaN is not a number"):
        parse_words(["prompts=[\"a\"]", "steps=NaN"], demo_tool.parameters)


def test_a_trailing_newline_does_not_pass_a_pattern():
    with pytest.raises(ToolArgumentError, match="is not allowed"):
        demo_tool.validate({"prompts": ["a"], "run": "abc\n"})
