"""benchmarks/side_by_side.py runs here without diffusers' script (booth alone, small), and its
torchvision shim for that script behaves as torchvision documents."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.slow
def test_without_a_script_it_says_so_and_measures_booth_and_the_floor():
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "side_by_side.py"), "--resolution", "64", "--steps",
         "6", "--warmup", "2", "--class-images", "4", "--gen-batch", "2", "--gen-steps", "2",
         "--threads", "1"],
        capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    assert out.startswith("no --diffusers-script given: measuring booth alone")
    assert "images/s     booth " in out and "steps/s      booth " in out
    assert "diffusers" not in out.split("\n", 1)[1]  # no column for what did not run
    assert "booth / floor = " in out


@pytest.fixture
def shim(tmp_path):
    sys.path.insert(0, str(BENCHMARKS))
    from diffusers_shim import write_shim

    runner = write_shim(tmp_path / "shim")
    sys.path.insert(0, str(runner.parent))
    import torchvision_shim.transforms as transforms

    yield runner, transforms
    sys.path.remove(str(runner.parent))
    sys.path.remove(str(BENCHMARKS))
    for name in [n for n in sys.modules if n.startswith("torchvision_shim")]:
        del sys.modules[name]


def test_the_shim_resizes_the_short_side_crops_the_centre_and_normalises(shim):
    from PIL import Image

    _, T = shim
    image = Image.new("RGB", (90, 60), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 45, 60))  # left half blue
    resized = T.Resize(30, interpolation=T.InterpolationMode.BILINEAR)(image)
    assert resized.size == (45, 30)
    cropped = T.CenterCrop(30)(resized)
    assert cropped.size == (30, 30)
    tensor = T.Normalize([0.5], [0.5])(T.ToTensor()(cropped))
    assert tuple(tensor.shape) == (3, 30, 30)
    assert tensor.min() >= -1 and tensor.max() <= 1
    assert tensor[2, 15, 0] == 1 and tensor[0, 15, 29] == 1  # blue left, red right


def test_the_runner_refuses_a_script_that_imports_torchvision_otherwise(shim, tmp_path):
    runner, _ = shim
    script = tmp_path / "train.py"
    script.write_text("import torchvision.transforms as T\nprint('ran')\n")
    done = subprocess.run([sys.executable, str(runner), str(script)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode != 0 and "update the shim" in done.stderr
    assert "ran" not in done.stdout
