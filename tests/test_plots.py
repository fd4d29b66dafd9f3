"""Pictures: written after fit/test and by `python -m convmixer_pl.plots`, each a non-blank PNG of the right size."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from convmixer_pl.model import ConvMixer
from convmixer_pl.plots import CONFUSION, CURVES, FILTERS, KERNELS, depthwise_kernel_grid, main


def grid(count: int, cell: int, pad: int) -> int:
    """Pixels across `count` cells of `cell` pixels with `pad` pixels around each (torchvision's make_grid)."""
    return count * (cell + pad) + pad


# TINY_DIGITS: dim 16, depth 2, kernel 3, patch 2, 1 channel
PANEL = grid(4, 24, 3)  # 4x4 kernels of 3x3, each shown 24 px wide
KERNELS_SIZE = (grid(2, PANEL, 6), grid(1, PANEL, 6))  # 2 blocks side by side
FILTERS_SIZE = (grid(4, 16, 3),) * 2  # 4x4 filters of 2x2, each shown 16 px wide
SIZES = {CURVES: (900, 340), CONFUSION: (750, 750), KERNELS: KERNELS_SIZE, FILTERS: FILTERS_SIZE}


def assert_picture(path: Path, size: tuple[int, int]) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    with Image.open(path) as image:
        assert image.size == size, path
        pixels = np.asarray(image.convert("L"), dtype=np.float32)
    assert pixels.std() > 10, f"{path} is (nearly) blank"


def test_fit_and_test_write_their_pictures(digits_run):
    logs = digits_run / "lightning_logs"
    for name in (CURVES, KERNELS, FILTERS):
        assert_picture(logs / "version_0" / "plots" / name, SIZES[name])
    assert_picture(logs / "version_1" / "report" / CONFUSION, SIZES[CONFUSION])
    counts = (logs / "version_1" / "report" / "confusion_matrix.csv").read_text().splitlines()
    assert len(counts) == 11 and sum(int(v) for line in counts[1:] for v in line.split(",")[1:]) == 359


def test_plots_command_draws_all_four_from_a_checkpoint_and_its_logs(digits_run, tmp_path):
    written = main(["--ckpt_path", str(digits_run / "last.ckpt"), "--out", str(tmp_path / "images")])
    assert sorted(path.name for path in written) == sorted(SIZES)
    for name, size in SIZES.items():
        assert_picture(tmp_path / "images" / name, size)


def test_kernel_grid_has_one_panel_per_chosen_layer_each_from_its_own_weights():
    model = ConvMixer(dim=9, depth=3, kernel_size=5, patch_size=2, in_chans=3, num_classes=2)
    image = depthwise_kernel_grid(model, layers=3)
    panel = grid(3, 25, 3)  # 3x3 kernels of 5x5 upscaled to 25 px
    assert image.shape == (3, grid(1, panel, 6), grid(3, panel, 6))
    first, last = image[0, 6:6 + panel, 6:6 + panel], image[0, 6:6 + panel, -6 - panel:-6]
    assert not np.allclose(first.numpy(), last.numpy())


def test_without_matplotlib_the_weight_grids_are_still_written(digits_run, tmp_path):
    # matplotlib hidden from imports and package metadata, as when it is not installed
    script = textwrap.dedent(f"""
        import importlib.abc, importlib.metadata, sys
        class Hide(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "matplotlib":
                    raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        sys.meta_path.insert(0, Hide())
        version = importlib.metadata.version
        def hidden(name):
            if name.lower() == "matplotlib":
                raise importlib.metadata.PackageNotFoundError(name)
            return version(name)
        importlib.metadata.version = hidden
        from convmixer_pl.plots import main
        main(["--ckpt_path", {str(digits_run / "last.ckpt")!r}, "--out", {str(tmp_path)!r}])
        assert "matplotlib" not in sys.modules
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == [KERNELS, FILTERS]
    assert f"no {CURVES}: matplotlib is not installed" in result.stderr
    for name in (KERNELS, FILTERS):
        assert_picture(tmp_path / name, SIZES[name])


def test_plots_command_names_a_missing_log_dir(digits_run, tmp_path, capsys):
    missing = tmp_path / "missing"
    with pytest.raises(SystemExit) as exit_info:
        main(["--ckpt_path", str(digits_run / "last.ckpt"), "--log_dir", str(missing), "--out", str(tmp_path)])
    assert exit_info.value.code == 2 and f"--log_dir {missing}: no such folder" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
