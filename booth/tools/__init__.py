"""The registered tools: the only thing the agent knows about training.

Importing this package is cheap (no torch); each tool imports the engine when it runs.
"""

from booth.tools.context import Terminated, ToolContext, terminate_raises
from booth.tools.dataset import prepare_dataset
from booth.tools.priors import generate_priors
from booth.tools.registry import Tool, ToolArgumentError, ToolError, parse_arguments
from booth.tools.sample import sample
from booth.tools.train import resume_checkpoint, train

TOOLS: dict[str, Tool] = {
    t.name: t for t in (prepare_dataset, generate_priors, train, sample, resume_checkpoint)
}


def get_tool(name: str, tools: dict[str, Tool] = TOOLS) -> Tool:
    """The tool called `name` in `tools`, or a ToolArgumentError listing the ones there are."""
    if name not in tools:
        from booth.schema import excerpt

        raise ToolArgumentError(f"unknown tool {excerpt(name)}; available: {', '.join(tools)}")
    return tools[name]


__all__ = [
    "TOOLS",
    "Terminated",
    "Tool",
    "ToolArgumentError",
    "ToolContext",
    "ToolError",
    "get_tool",
    "parse_arguments",
    "terminate_raises",
]
