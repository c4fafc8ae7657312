"""The agent loop: user turn -> model turn -> validate calls -> approve -> run -> answer.

    session.send("teach the model my dog")   # True when the model answered without tools

The loop knows tools only through the registry (`booth.tools.TOOLS`), asks the approval
policy before running anything, and records every event in the transcript as it happens.
Control flow that ends a user turn early is a small exception carrying its message.
"""

from __future__ import annotations

import json
import logging
import signal
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from booth.agent import wire
from booth.agent.events import make_event, text_content, tool_answer
from booth.agent.history import estimate_tokens, fit_history
from booth.agent.model import AssistantTurn, ChatModel, EndpointError, ToolCall, TurnEnded
from booth.agent.transcript import TranscriptWriter, open_for_resume, unanswered_calls
from booth.agent.ui import ChatUI
from booth.tools import (
    TOOLS,
    Terminated,
    ToolArgumentError,
    ToolError,
    get_tool,
    parse_arguments,
)

log = logging.getLogger("booth.agent")

MAX_MODEL_TURNS = 25  # per user message: a confused model cannot loop forever
MAX_INVALID_IN_ROW = 3


class AgentStop(Exception):
    """Ends the current user turn early; the message tells the user why and what to do."""


class InvalidCallLimit(AgentStop):
    pass


class TurnLimit(AgentStop):
    pass


class SessionEnded(Exception):
    """The user ended the session at a prompt (Ctrl-D, end of input); nothing is wrong."""


class UserStopped(AgentStop):
    """A Ctrl-C stopped a tool at a safe point: the turn ends there and the person types
    next; the model reads of the stop (in the tool's answer) with that next message."""


class SessionAborted(KeyboardInterrupt):
    """The second Ctrl-C: the session ends now, leaving checkpoints and transcript behind.

    A KeyboardInterrupt, so that a tool's `except Exception` cannot swallow it.
    """


def _as_text(turn: AssistantTurn) -> AssistantTurn:
    """The turn as booth sends it back and records it: a server may answer with content
    parts, or with names and reasons that are no text; what it sent is data, never a crash."""
    def text(value):
        return value if isinstance(value, str) else "" if value is None else str(value)

    calls = [ToolCall(text(c.id), text(c.name),
                      c.arguments if isinstance(c.arguments, dict) else text(c.arguments))
             for c in turn.tool_calls]
    reason = None if turn.finish_reason is None else text(turn.finish_reason)
    return AssistantTurn(text_content(turn.content) or "", calls, reason)


class Session:
    """One conversation: the messages, the model, the approval policy and the transcript."""

    def __init__(self, model: ChatModel, ctx, policy, *, system_prompt: str | None = None,
                 transcript: TranscriptWriter | None = None, ui: ChatUI | None = None,
                 messages: list[dict] | None = None, tools: dict | None = None,
                 context_window: int | None = None, reserve_tokens: int = 4096,
                 max_model_turns: int = MAX_MODEL_TURNS,
                 on_result: Callable[[dict], None] | None = None,
                 gpu_share=None,
                 live_workspace: bool | None = None):
        from booth.agent.prompt import build_system_prompt

        self.model, self.ctx, self.policy = model, ctx, policy
        self.system_prompt = system_prompt or build_system_prompt(ctx)
        # Rebuild the prompt's workspace facts before each request, so that after a tool made
        # a dataset or a checkpoint the model reads it there; a given prompt stays as given.
        self.live_workspace = system_prompt is None if live_workspace is None else live_workspace
        self.transcript, self.ui = transcript, ui or ChatUI()
        self.messages: list[dict] = list(messages or [])
        self.tools = TOOLS if tools is None else tools
        self.context_window, self.reserve_tokens = context_window, reserve_tokens
        self.max_model_turns = max_model_turns
        self.on_result = on_result  # called with each tool_result event (replay compares them)
        # Frees the card from the LLM server around GPU tools (booth.agent.gpu_share).
        self.gpu_share = gpu_share
        self._end_recorded = False
        self.invalid_in_row = 0
        self._last_notice: str | None = None

    @property
    def tool_specs(self) -> list[dict]:
        return [tool.openai_spec() for tool in self.tools.values()]

    # -- a user turn ----------------------------------------------------------------------
    def send(self, text: str | list) -> bool:
        """Add the user's message and run the model until it answers without tool calls.

        `text` may also be OpenAI content parts; they are sent and recorded as one text.
        Returns False when the turn ended early (endpoint error, too many invalid calls,
        too many model turns, Ctrl-C); the session goes on. SIGTERM (Terminated) and a
        second Ctrl-C (SessionAborted) end the session: they propagate, after the history
        has been made valid again and the end recorded.
        """
        self._add("user", {"role": "user", "content": text_content(text)})
        return self.run()

    def retry(self) -> bool:
        """Ask the model again for the last turn (/retry). A turn that ended early goes on
        from where it stopped; a final answer is withdrawn first (a "retracted" event, so
        that --resume and replay leave it out) and asked for anew. False when there is
        nothing to retry or the turn ended early again."""
        last = self.messages[-1] if self.messages else None
        if last is None or (last["role"] == "assistant" and last.get("tool_calls")):
            self.ui.info("nothing to retry yet: type a message")
            return False
        if last["role"] == "assistant":
            self.messages.pop()
            self._record("retracted", text="the last answer was withdrawn for a retry")
            self.ui.info("(the last answer is withdrawn; asking the model again)")
        return self.run()

    def run(self) -> bool:
        """Query the model (again) from the current messages; see `send`."""
        self.invalid_in_row = 0
        try:
            for _ in range(self.max_model_turns):
                turn, sent = self._query()
                if not turn.tool_calls:
                    return True
                self._execute(turn.tool_calls, [c["id"] for c in sent["tool_calls"]])
            raise TurnLimit(f"Stopped after {self.max_model_turns} model turns without a final "
                            "answer; tell the model how to go on, or start over.")
        except EndpointError as error:
            self.ui.error(str(error))
            self._record("endpoint_error", error=str(error))
        except (AgentStop, TurnEnded) as error:
            self._answer_unanswered("the turn ended before it ran")
            self.ui.notice(str(error))
            self._record("notice", text=str(error))
        except SessionAborted:
            self._answer_unanswered("the user aborted the session")
            raise
        except EOFError:  # Ctrl-D at an approval prompt: the session ends, as at the chat prompt
            self._answer_unanswered("the user ended the session")
            self._record("interrupted", text="the user ended the session (Ctrl-D)")
            raise SessionEnded from None
        except Terminated as ending:
            name = ending.signal_name
            self._answer_unanswered(f"booth was terminated ({name}) before it ran")
            self.record_end(f"terminated ({name}): the session ends")
            raise
        except KeyboardInterrupt:  # Ctrl-C outside a tool, e.g. while the model was answering
            self._answer_unanswered("the user interrupted")
            self.ui.notice("Interrupted. Type a new message.")
            self._record("interrupted", text="the user interrupted the turn")
        return False

    def record_end(self, text: str) -> None:
        """Record why the session ends, once (a signal at a prompt comes from outside)."""
        if not self._end_recorded:
            self._end_recorded = True
            self._record("interrupted", text=text)

    def notice(self, text: str) -> None:
        """Show one line to the user and record it."""
        self.ui.notice(text)
        self._record("notice", text=text)

    def _answer_unanswered(self, why: str) -> None:
        """Answer the calls of the last turn left without a result: Mistral refuses a history
        in which a call has no answer."""
        for call_id, name in unanswered_calls(self.messages):
            self._answer(call_id, f"Error: not run: {why}.", "tool_result", tool=name,
                         ok=False, error=f"not run: {why}")

    def _query(self) -> tuple[AssistantTurn, dict]:
        if self.gpu_share is not None:
            self.gpu_share.before_model()  # the server asleep since a GPU tool: wake it
        if self.live_workspace:
            from booth.agent.prompt import build_system_prompt

            note = self.gpu_share.describe() if self.gpu_share is not None else None
            self.system_prompt = build_system_prompt(self.ctx, gpu_note=note)
        messages = [{"role": "system", "content": self.system_prompt}, *self.messages]
        if self.context_window:
            reserve = self.reserve_tokens + estimate_tokens(self.tool_specs)
            messages, notice = fit_history(messages, self.context_window, reserve)
            if notice and notice != self._last_notice:
                self.ui.notice(notice)
                self._record("notice", text=notice)
            self._last_notice = notice
        turn = self.model.complete(messages, self.tool_specs, on_text=self.ui.text,
                                   on_status=self.ui.status)
        self.ui.end_text()
        # What the endpoint learned of the server: notices said once, the server's identity.
        notices, server, raw_text = turn.notices, turn.server, turn.raw_content
        turn = _as_text(turn)
        # The one place call ids are made valid and unique; calls are answered with these.
        sent = wire.assistant_message(turn, self._used_ids())
        raw_calls = [{"id": c.id, "name": c.name, "arguments": c.arguments}
                     for c in turn.tool_calls]
        for notice in notices:  # recorded before the turn: a notice after a user turn's
            self.ui.notice(notice)  # last answer is what a replay reads as why it ended
            self._record("notice", text=notice)
        self._add("assistant", sent, content=turn.content, tool_calls=raw_calls,
                  finish_reason=turn.finish_reason, raw_content=raw_text, server=server)
        return turn, sent

    def _used_ids(self) -> set[str]:
        return wire.used_call_ids(self.messages)

    # -- tool calls -----------------------------------------------------------------------
    def _execute(self, calls: list[ToolCall], ids: list[str]) -> None:
        """Answer every call of the turn, in order, each with its own tool message."""
        for call, call_id in zip(calls, ids, strict=True):
            if self.invalid_in_row >= MAX_INVALID_IN_ROW:
                self._answer(call_id, "Error: not run: the loop stopped after "
                             f"{MAX_INVALID_IN_ROW} invalid calls in a row.", "tool_result",
                             tool=call.name, ok=False, error="skipped")
            else:
                self._handle(call, call_id)
        if self.invalid_in_row >= MAX_INVALID_IN_ROW:
            raise InvalidCallLimit(
                f"The model made {MAX_INVALID_IN_ROW} invalid tool calls in a row, so booth "
                "stopped asking it. Say how to go on (e.g. name the dataset or the values to use)."
            )

    def _handle(self, call: ToolCall, call_id: str) -> None:
        try:
            tool = get_tool(call.name, self.tools)
            arguments = tool.validate(parse_arguments(call.arguments))
        except ToolArgumentError as error:
            self.invalid_in_row += 1
            self.ui.invalid_call(call.name, str(error))
            text = f"Error: {str(error).rstrip('.')}. Nothing was run; correct the call and retry."
            self._answer(call_id, text, "validation_error", tool=call.name, error=str(error))
            return
        self.invalid_in_row = 0
        decision = self.policy.decide(tool, call_id, arguments, self.ctx)
        fields = dict(tool=tool.name, decision=decision.label, arguments=decision.arguments,
                      edited=decision.edited, reason=decision.reason)
        if decision.action != "run":
            reason = f": {decision.reason}" if decision.reason else "."
            self._answer(call_id, f"Cancelled by the user{reason}", "approval", **fields)
            if decision.end_turn:
                raise AgentStop(f"Nothing ran: {decision.reason}.")
            return
        self._record("approval", call_id=call_id, **fields)
        self._run_tool(tool, call_id, decision.arguments, edited=decision.edited)

    def _run_tool(self, tool, call_id: str, arguments: dict, edited: bool = False) -> None:
        outcome: dict[str, Any] = {"ok": True}
        if self.gpu_share is not None:
            self.gpu_share.before_tool(tool)
        start = time.monotonic()
        try:
            with self.ctx.interruptible(SessionAborted, "abort the session"):
                outcome["result"] = tool.call(self.ctx, arguments)  # validated in _handle
        except ToolError as error:
            outcome = {"ok": False, "error": str(error)}
        except KeyboardInterrupt:  # the second signal: answer the call, then end the session
            self._answer(call_id, "Error: the user aborted the session (Ctrl-C) while this "
                         "tool ran.", "tool_result", tool=tool.name, arguments=arguments,
                         ok=False, error="aborted", seconds=round(time.monotonic() - start, 3))
            self._record("interrupted", text="session aborted by a second Ctrl-C")
            raise SessionAborted from None
        except Exception as error:  # a bug in a tool must not end the session
            log.exception("tool %s failed", tool.name)
            outcome = {"ok": False, "error": f"{type(error).__name__}: {error}",
                       "traceback": traceback.format_exc()}
        outcome["seconds"] = round(time.monotonic() - start, 3)
        self._report(tool, call_id, arguments, outcome, edited)

    def _report(self, tool, call_id: str, arguments: dict, outcome: dict,
                edited: bool = False) -> None:
        if outcome["ok"]:
            self.ui.tool_result(tool.name, outcome["result"], outcome["seconds"])
            text = json.dumps(outcome["result"], ensure_ascii=False, default=str)
        else:
            self.ui.tool_error(tool.name, outcome["error"])
            text = f"Error: {outcome['error']}"
        stopped, terminated = self.ctx.stop_requested.is_set(), self.ctx.terminated.is_set()
        if stopped:
            self.ctx.stop_requested.clear()
            ending = signal.Signals(self.ctx.exit_code - 128).name
            who = f"booth was terminated ({ending})" if terminated else "The user pressed Ctrl-C"
            text = f"{who} while the tool ran, asking it to stop at a safe point; its result: " \
                + text
            self._record("interrupted", call_id=call_id,
                         text=f"{ending if terminated else 'Ctrl-C'}: tool asked to stop")
        if edited:  # the history holds the model's arguments: say what really ran
            changed = json.dumps(arguments, ensure_ascii=False, default=str)
            text = f"The user edited the arguments before running; it ran with {changed}. " + text
        event = self._answer(call_id, text, "tool_result", tool=tool.name, arguments=arguments,
                             **outcome)
        if self.on_result:
            self.on_result(event)
        if terminated:
            raise Terminated(self.ctx.exit_code - 128)
        if stopped:
            raise UserStopped("Stopped at a safe point, as you asked. Type what to do next "
                              "(the model will be told it stopped).")

    # -- messages and transcript ------------------------------------------------------------
    def _answer(self, call_id: str, content: str, kind: str, **fields: Any) -> dict:
        """Answer the call `call_id` with a tool message, recorded as a `kind` event."""
        return self._keep(tool_answer(kind, call_id, content, **fields))

    def _add(self, kind: str, message: dict, **fields: Any) -> dict:
        """Append a message to the conversation and record it with its event."""
        return self._keep(make_event(kind, message=message, **fields))

    def _keep(self, event: dict) -> dict:
        # The event's message, not the one given: the event holds it as text.
        self.messages.append(event["message"])
        return self._write(event)

    def _record(self, kind: str, **fields: Any) -> dict:
        """Record an event that adds nothing to the conversation."""
        return self._write(make_event(kind, **fields))

    def _write(self, event: dict) -> dict:
        if self.transcript is not None:
            self.transcript.write(event)
        return event

    # -- resuming -------------------------------------------------------------------------
    @classmethod
    def from_transcript(cls, path: str | Path, model: ChatModel, ctx, policy, *,
                        header: dict, new_path: str | Path | None = None,
                        secrets: list[str] | None = None, **options: Any) -> Session:
        """Continue a saved conversation (`booth chat --resume PATH`); see `open_for_resume`.

        `header` describes the new session; its fresh system prompt replaces the old one,
        because the workspace has changed since.
        """
        writer, messages = open_for_resume(path, header, new_path, secrets)
        options.setdefault("live_workspace", True)
        return cls(model, ctx, policy, system_prompt=header.get("system_prompt"),
                   transcript=writer, messages=messages, **options)
