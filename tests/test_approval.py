"""Approval policies: what the user sees before a call, and every answer they can give."""

from __future__ import annotations

import io
from typing import Annotated

import pytest
from rich.console import Console

from booth.agent.approval import (
    NO_TERMINAL,
    AskUser,
    AutoApprove,
    RefuseAll,
    parse_edit,
    show_call,
)
from booth.tools.registry import Param, ToolArgumentError, tool


@tool
def paint(
    ctx,
    color: Annotated[str, Param("Colour of the paint", min_length=1)],
    coats: Annotated[int, Param("How many coats", minimum=1, maximum=5)] = 2,
    glossy: Annotated[bool, Param("Glossy finish")] = False,
) -> dict:
    """Paint the wall."""
    return {"color": color, "coats": coats}


paint.estimate = lambda ctx, args: f"{args['coats']} coats, about {args['coats'] * 2} hours"


def scripted(*answers: str):
    """An input function answering in order, then raising EOFError like a closed stdin."""
    queue = list(answers)
    prompts: list[str] = []

    def read(prompt: str) -> str:
        prompts.append(prompt)
        if not queue:
            raise EOFError
        return queue.pop(0)

    read.prompts = prompts
    return read


def console():
    return Console(file=io.StringIO(), width=120, color_system=None)


def shown(policy) -> str:
    return policy.ui.console.file.getvalue()


ARGS = paint.validate({"color": "red"})


def test_the_prompt_shows_tool_arguments_defaults_and_cost():
    policy = AskUser(console(), input=scripted("y"))
    decision = policy.decide(paint, "abcDEF123", ARGS, ctx=None)
    assert decision.action == "run" and decision.label == "approved"
    text = shown(policy)
    assert "paint" in text and "red" in text
    assert "coats" in text and "default" in text  # coats=2 came from the default
    assert "cost: 2 coats, about 4 hours" in text


def test_refusal_carries_the_optional_reason():
    policy = AskUser(console(), input=scripted("n", "too expensive"))
    decision = policy.decide(paint, "abcDEF123", ARGS, ctx=None)
    assert (decision.action, decision.reason, decision.label) == ("refuse", "too expensive",
                                                                  "refused")
    empty = AskUser(console(), input=scripted("n", "")).decide(paint, "x", ARGS, ctx=None)
    assert empty.action == "refuse" and empty.reason is None


def test_always_approves_the_same_tool_for_the_rest_of_the_session():
    read = scripted("a")
    policy = AskUser(console(), input=read)
    first = policy.decide(paint, "id1", ARGS, ctx=None)
    second = policy.decide(paint, "id2", ARGS, ctx=None)
    assert first.always and first.label == "always"
    assert second.action == "run" and len(read.prompts) == 1  # not asked again
    assert "always run paint" in shown(policy)


def test_an_invalid_edit_is_asked_again_and_a_valid_one_runs():
    read = scripted("e", "coats=9", "coats=3 color='deep blue'", "y")
    policy = AskUser(console(), input=read)
    decision = policy.decide(paint, "abcDEF123", ARGS, ctx=None)
    assert decision.action == "run" and decision.edited and decision.label == "edited"
    assert decision.arguments == {"color": "deep blue", "coats": 3, "glossy": False}
    text = shown(policy)
    assert "coats: 9 is greater than the maximum of 5" in text  # the error was shown
    assert "edited call" in text and "6 hours" in text  # the edit was shown with its cost


def test_an_edit_can_be_a_json_object_and_an_empty_line_cancels_it():
    policy = AskUser(console(), input=scripted("e", '{"glossy": true}', "y"))
    assert policy.decide(paint, "x", ARGS, ctx=None).arguments["glossy"] is True
    policy = AskUser(console(), input=scripted("e", "", "y"))
    decision = policy.decide(paint, "x", ARGS, ctx=None)
    assert decision.arguments == ARGS and not decision.edited


def test_unknown_answers_are_asked_again_and_end_of_input_ends_the_session():
    read = scripted("maybe")
    policy = AskUser(console(), input=read)
    with pytest.raises(EOFError):  # the loop turns it into the end of the session
        policy.decide(paint, "x", ARGS, ctx=None)
    assert len(read.prompts) == 2 and "please answer y, n, e or a" in shown(policy)


def test_auto_approve_still_shows_the_call():
    policy = AutoApprove(console())
    assert policy.decide(paint, "x", ARGS, ctx=None).action == "run"
    assert "paint" in shown(policy) and "approved automatically" in shown(policy)


def test_refuse_all_says_how_to_approve():
    policy = RefuseAll(console=console())
    decision = policy.decide(paint, "x", ARGS, ctx=None)
    assert decision.action == "refuse" and decision.reason == NO_TERMINAL
    assert "--yes" in decision.reason and "rerun with --yes" in shown(policy)


def test_a_broken_estimate_does_not_block_approval():
    @tool
    def wobble(ctx, n: Annotated[int, Param("n")] = 1) -> dict:
        """Wobble."""
        return {}

    wobble.estimate = lambda ctx, args: 1 / 0
    assert AskUser(console(), input=scripted("y")).decide(wobble, "x", {"n": 1}, None).action \
        == "run"


@pytest.mark.parametrize(
    ("text", "patch"),
    [
        ("steps=400", {"steps": 400}),
        ('prompt="a photo of sks dog" lora=true', {"prompt": "a photo of sks dog", "lora": True}),
        ("name=rex", {"name": "rex"}),
        ('{"steps": 10, "prompts": ["a", "b"]}', {"steps": 10, "prompts": ["a", "b"]}),
    ],
)
def test_parse_edit(text, patch):
    assert parse_edit(text) == patch


@pytest.mark.parametrize("text", ["steps", "{oops", "[1]", "a='unclosed"])
def test_parse_edit_rejects_what_it_cannot_read(text):
    with pytest.raises(ToolArgumentError):
        parse_edit(text)


def test_result_lines_keep_hints_and_paths_whole_and_a_stopped_tool_says_where():
    from booth.agent.ui import ChatUI

    out = io.StringIO()
    ui = ChatUI(Console(file=out, width=60))
    hint = ("sample with run='medor-1' (final model), or checkpoint='checkpoint-20' to "
            "compare an earlier step")
    path = "/home/someone/booth-workspace/runs/medor-1/final/unet/diffusion_pytorch_model.bin"
    ui.tool_result("train", {"status": "completed", "final_model": path, "hint": hint}, 3.0)
    shown = out.getvalue()
    assert hint in shown and path in shown  # whole, each on one line the terminal wraps
    out.truncate(0)
    ui.tool_result("train", {"status": "interrupted", "steps": 14,
                             "checkpoints": ["checkpoint-10", "checkpoint-14"]}, 2.0)
    assert "train stopped at step 14 (checkpoint-14)" in out.getvalue()
    assert "done" not in out.getvalue()


def test_settings_the_model_is_not_shown_appear_in_the_panel_only_when_changed():
    from booth.agent.ui import ChatUI
    from booth.tools import get_tool

    train = get_tool("train")
    out = io.StringIO()
    ui = ChatUI(Console(file=out, width=120))
    arguments = train.validate({"dataset": "rex", "max_train_steps": 10, "learning_rate": 1e-5,
                                "max_grad_norm": 0.5})
    show_call(ui, train, arguments, None)
    shown = " ".join(out.getvalue().split())
    assert "max_grad_norm" in shown and "0.5" in shown  # changed: named
    assert "adam_beta1" not in shown and "more settings" in shown  # at its default: counted


def test_arguments_are_shown_as_text_never_as_markup():
    from booth.agent.ui import ChatUI

    out = io.StringIO()
    ui = ChatUI(Console(file=out, width=200))
    ui.tool_call("sample", {"prompts": ["a photo of [/] dog"], "negative_prompt": "[bold]x[/]",
                            "run": "[red]"}, {"seed": 0})  # MarkupError before; hidden text
    shown = out.getvalue()
    assert "a photo of [/] dog" in shown and "[bold]x[/]" in shown and "[red]" in shown
