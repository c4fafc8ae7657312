"""A benchmark shim, not part of booth: the few torchvision pieces diffusers' example needs.

diffusers' examples/dreambooth/train_dreambooth.py imports torchvision for six image
transforms. torchvision from PyPI is a CUDA build that does not load beside the CPU torch
(FIELD-NOTES). So side_by_side.py writes a package `torchvision_shim` and a runner into a
temporary folder; the diffusers child runs the runner, which executes the unmodified script
file's text with its one line `from torchvision import transforms` read as
`from torchvision_shim import transforms`. No module named torchvision exists anywhere:
transformers, which imports torchvision whenever `find_spec("torchvision")` finds one, still
sees none.

The transforms follow torchvision's documented semantics on PIL images: Resize(int) matches
the short side (bilinear, as PIL resizes), CenterCrop rounds the offset as torchvision does,
ToTensor gives CHW floats in [0, 1], Normalize subtracts and divides per channel.
"""

from __future__ import annotations

from pathlib import Path

INIT = "from . import transforms  # noqa: F401\n"
IMPORT = "from torchvision import transforms"

RUNNER = f'''
import sys

path = sys.argv[1]
source = open(path, encoding="utf-8").read()
if {IMPORT!r} not in source:
    sys.exit(f"{{path}} does not import torchvision as this shim expects; update the shim")
source = source.replace({IMPORT!r}, "from torchvision_shim import transforms", 1)
sys.argv = [path, *sys.argv[2:]]
exec(compile(source, path, "exec"), {{"__name__": "__main__", "__file__": path}})
'''

TRANSFORMS = '''
import enum

import numpy as np
import torch
from PIL import Image


class InterpolationMode(enum.Enum):
    NEAREST = "nearest"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"


_PIL = {InterpolationMode.NEAREST: Image.NEAREST, InterpolationMode.BILINEAR: Image.BILINEAR,
        InterpolationMode.BICUBIC: Image.BICUBIC}


def _pair(size):
    return (size, size) if isinstance(size, int) else tuple(size)


class Compose:
    def __init__(self, steps):
        self.steps = list(steps)

    def __call__(self, value):
        for step in self.steps:
            value = step(value)
        return value


class Resize:
    def __init__(self, size, interpolation=InterpolationMode.BILINEAR, antialias=True):
        self.size, self.interpolation = size, interpolation

    def __call__(self, image):
        width, height = image.size
        if isinstance(self.size, int):
            short, long = sorted((width, height))
            new_long = int(self.size * long / short)
            size = (self.size, new_long) if width <= height else (new_long, self.size)
        else:
            size = (self.size[1], self.size[0])
        return image.resize(size, _PIL[self.interpolation])


class CenterCrop:
    def __init__(self, size):
        self.height, self.width = _pair(size)

    def __call__(self, image):
        width, height = image.size
        top = int(round((height - self.height) / 2.0))
        left = int(round((width - self.width) / 2.0))
        return image.crop((left, top, left + self.width, top + self.height))


class RandomCrop:
    def __init__(self, size):
        self.height, self.width = _pair(size)

    def __call__(self, image):
        width, height = image.size
        top = int(torch.randint(0, height - self.height + 1, (1,)))
        left = int(torch.randint(0, width - self.width + 1, (1,)))
        return image.crop((left, top, left + self.width, top + self.height))


class ToTensor:
    def __call__(self, image):
        pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
        return torch.from_numpy(pixels.copy()).permute(2, 0, 1).contiguous()


class Normalize:
    def __init__(self, mean, std):
        self.mean, self.std = mean, std

    def __call__(self, tensor):
        mean = torch.tensor(self.mean, dtype=tensor.dtype).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=tensor.dtype).view(-1, 1, 1)
        return (tensor - mean) / std
'''


def write_shim(folder: Path) -> Path:
    """Write the shim package and the runner under `folder` (to put on PYTHONPATH); return
    the runner, to run as `python RUNNER train_dreambooth.py ARGS...`."""
    package = Path(folder) / "torchvision_shim"
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text(INIT, encoding="utf-8")
    (package / "transforms.py").write_text(TRANSFORMS.lstrip(), encoding="utf-8")
    runner = Path(folder) / "run_script.py"
    runner.write_text(RUNNER.lstrip(), encoding="utf-8")
    return runner
