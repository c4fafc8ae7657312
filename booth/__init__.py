"""booth: describe a DreamBooth goal; an LLM plans it and runs the tools with your approval."""

__version__ = "0.1.0"
