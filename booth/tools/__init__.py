"""The registered tools: the only thing the agent knows about training.

Importing this package is cheap (no torch); each tool imports the engine when it runs.
"""

from booth.tools.context import ToolContext
from booth.tools.dataset import prepare_dataset
from booth.tools.priors import generate_priors
from booth.tools.registry import Tool, ToolArgumentError, ToolError, parse_arguments
from booth.tools.sample import sample
from booth.tools.train import resume_checkpoint, train

TOOLS: dict[str, Tool] = {
    t.name: t for t in (prepare_dataset, generate_priors, train, sample, resume_checkpoint)
}


def get_tool(name: str) -> Tool:
    """The tool called `name`, or a ToolArgumentError listing the ones that exist."""
    if name not in TOOLS:
        raise ToolArgumentError(f"unknown tool {name!r}; available: {', '.join(TOOLS)}")
    return TOOLS[name]


__all__ = [
    "TOOLS",
    "Tool",
    "ToolArgumentError",
    "ToolContext",
    "ToolError",
    "get_tool",
    "parse_arguments",
]
