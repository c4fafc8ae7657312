"""The DreamBooth engine: a library that knows nothing of the agent or the tools."""

import os

# Library warnings (e.g. transformers' torchvision fallback notes) would drown booth's own
# progress and messages; a user who wants them back sets these variables.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
