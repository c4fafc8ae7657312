"""How many tokens booth's fixed prefix costs on every request, by Mistral's own tokenizer.

The prefix is what every chat request starts with: the system prompt of an empty workspace
and the five tool schemas as sent (`Tool.openai_spec()`), here followed by a one-line user
message. Counted with `encode_chat_completion` and the tekken tokenizer shipped in
mistral-common's data/ folder (an older tekken than Small 3.2's own: the counts are close,
not exact). tests/test_prompt_budget.py holds the total to BUDGET.

    python benchmarks/prompt_tokens.py
"""

from __future__ import annotations

import sys
import tempfile
from datetime import date
from pathlib import Path

# Count the booth of this checkout, not whichever one is installed.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

BUDGET = 2000  # tokens: under half of Ollama's default 4,096-token window
GOAL = "Teach the model my corgi from ~/photos/rex, then show him as an astronaut."
WORKSPACE = "/home/someone/booth-workspace"
DEVICE = "cuda: NVIDIA GeForce RTX 4090 Laptop GPU, 16 GB (x2)"  # a long device line


def load_tokenizer():
    """mistral-common's shipped tekken tokenizer (the newest tekken*.json in its data/)."""
    import mistral_common
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    data = Path(mistral_common.__file__).parent / "data"
    files = sorted(data.glob("tekken*.json"))
    if not files:
        raise SystemExit(f"no tekken*.json in {data}: is mistral-common installed whole?")
    return MistralTokenizer.from_file(str(files[-1]))


def empty_workspace_prompt() -> str:
    """The system prompt of an empty workspace, as `booth chat` builds it, with the workspace
    shown at WORKSPACE: a random temporary path would change the count from run to run."""
    from booth.agent.prompt import build_system_prompt
    from booth.tools import ToolContext

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "workspace"
        ctx = ToolContext.from_options(workspace=str(root),
                                       base_model="stable-diffusion-v1-5/stable-diffusion-v1-5")
        prompt = build_system_prompt(ctx, today=date(2026, 12, 1), device=DEVICE)
        return prompt.replace(str(ctx.workspace.root), WORKSPACE)


def tool_specs() -> list[dict]:
    from booth.tools import TOOLS

    return [tool.openai_spec() for tool in TOOLS.values()]


def count(tokenizer, system: str | None = None, specs: list[dict] | None = None,
          user: str = GOAL) -> int:
    """Tokens of one request: an optional system prompt, optional tools, one user message."""
    from mistral_common.protocol.instruct.request import ChatCompletionRequest

    messages = ([{"role": "system", "content": system}] if system else [])
    messages.append({"role": "user", "content": user})
    request = ChatCompletionRequest(messages=messages, tools=specs or None)
    return len(tokenizer.encode_chat_completion(request).tokens)


def breakdown(tokenizer) -> dict[str, int]:
    """{'total': ..., 'system prompt': ..., 'tool schemas': ..., 'tool <name>': ...}; each
    part is what it adds to a request that holds only the user message."""
    system, specs = empty_workspace_prompt(), tool_specs()
    bare = count(tokenizer)
    parts = {"total": count(tokenizer, system, specs),
             "system prompt": count(tokenizer, system) - bare,
             "tool schemas": count(tokenizer, specs=specs) - bare}
    for spec in specs:
        parts[f"tool {spec['function']['name']}"] = count(tokenizer, specs=[spec]) - bare
    parts["user message and framing"] = bare
    return parts


def main() -> None:
    parts = breakdown(load_tokenizer())
    for name, tokens in parts.items():
        print(f"{name:<28} {tokens:>6}")
    verdict = "within" if parts["total"] <= BUDGET else "OVER"
    print(f"budget {BUDGET}: {verdict}")


if __name__ == "__main__":
    main()
