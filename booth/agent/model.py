"""The model side of the loop: one assistant turn from a list of messages.

`ChatModel` is what the loop talks to. `booth.agent.endpoint.OpenAIChatModel` reaches a live
OpenAI-compatible endpoint (vLLM, Mistral, Ollama, llama.cpp); `ReplayModel` plays back the
assistant turns of a saved transcript, so replay and the demo drive the very same loop without
any LLM; `ScriptedModel` does the same for tests and for recording the demo.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # the raw text the model sent; it may not even be JSON


@dataclass
class AssistantTurn:
    content: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    finish_reason: str | None = None
    # What the loop records beside the turn, not part of it (so not compared); a live
    # endpoint fills them, scripted turns need not:
    # the server's text, when calls were read out of it
    raw_content: str | None = field(default=None, compare=False)
    # about the server, each said once a session: shown and recorded by the loop
    notices: list[str] = field(default_factory=list, compare=False)
    # what the server says it is (the first turn of a session only)
    server: dict | None = field(default=None, compare=False)
    served_model: str | None = field(default=None, compare=False)  # the response's `model`


class EndpointError(Exception):
    """The endpoint could not answer (down, refused, rate limited after retries, 4xx).

    The message is complete and user-facing: which URL, what happened, what to do.
    """


class TurnEnded(Exception):
    """The model side ends the user's turn without an answer, and that is no fault: a replay
    has reached the point where the recorded turn stopped. Shown as a notice."""


class ChatModel(Protocol):
    def complete(
        self,
        messages: list[dict],
        tools: list[dict],
        on_text: Callable[[str], None] | None = None,
        on_status: Callable[..., None] | None = None,
    ) -> AssistantTurn:
        """One assistant turn. `on_text` receives the turn's text (in chunks as they stream
        in); `on_status(text, lasting=False)` what the model side is waiting for (a ticking
        wait when not `lasting`, e.g. a retry notice when it is; None clears it)."""
        ...


class ScriptedModel:
    """Answers with the given turns in order, recording what it was sent (for tests).

    A turn may be an `EndpointError` instead: it is raised, as a failing endpoint would.
    """

    def __init__(self, turns: list[AssistantTurn | EndpointError]):
        self.turns = list(turns)
        self.requests: list[tuple[list[dict], list[dict]]] = []

    def complete(self, messages, tools, on_text=None, on_status=None) -> AssistantTurn:
        self.requests.append((list(messages), list(tools)))
        if not self.turns:
            raise EndpointError(
                f"The scripted model has no turn left (it was asked {len(self.requests)} times)."
            )
        turn = self.turns.pop(0)
        if isinstance(turn, EndpointError):
            raise turn
        if on_text and turn.content:
            on_text(turn.content)
        return turn


class ReplayModel(ScriptedModel):
    """Plays back the assistant turns recorded in a transcript, in order.

    A replay gives it one user message's turns at a time (`next_user_turn`), so that a user
    turn the recording ended early (endpoint error, Ctrl-C, a limit) ends at the same place
    instead of borrowing the next user message's turns.
    """

    def __init__(self, turns: list[AssistantTurn], ended: str | None = None):
        super().__init__(turns)
        self.ended = ended
        self._recorded, self._asked = len(self.turns), 0

    def next_user_turn(self, turns: list[AssistantTurn], ended: str | None = None) -> None:
        """Play `turns` for the next user message; `ended` says why the recorded user turn
        stopped before a final answer (None when it did not)."""
        self.turns, self.ended = list(turns), ended
        self._recorded, self._asked = len(self.turns), 0

    def complete(self, messages, tools, on_text=None, on_status=None) -> AssistantTurn:
        self._asked += 1
        if self.turns:
            return super().complete(messages, tools, on_text, on_status)
        if self.ended:
            raise TurnEnded(f"The recorded session ended this turn here ({self.ended}).")
        raise EndpointError(
            "The transcript has no more recorded assistant turns: the replay asked the "
            f"model for turn {self._asked}, but the session recorded {self._recorded}. "
            "The conversation went differently from the recording."
        )
