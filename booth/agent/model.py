"""The model side of the loop: one assistant turn from a list of messages.

`ChatModel` is what the loop talks to. `OpenAIChatModel` reaches a live OpenAI-compatible
endpoint (vLLM, Mistral, Ollama, llama.cpp); `ReplayModel` plays back the assistant turns of a
saved transcript, so replay and the demo drive the very same loop without any LLM.
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


class EndpointError(Exception):
    """The endpoint could not answer (down, refused, rate limited after retries, 4xx).

    The message is complete and user-facing: which URL, what happened, what to do.
    """


class ChatModel(Protocol):
    def complete(
        self,
        messages: list[dict],
        tools: list[dict],
        on_text: Callable[[str], None] | None = None,
    ) -> AssistantTurn:
        """One assistant turn. `on_text` receives text chunks as they stream in."""
        ...
