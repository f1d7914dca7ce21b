"""Shared fixtures: tiny synthetic slides, good and deliberately broken (written once per session).

The files are shared by every test in the session: read them, never modify them (copy first).

- ``tiny_slide``: 1500×1200 px at 0.25 µm/px (375×300 µm), Aperio-like, 2 levels (downsample 4.0
  exactly), white background with one pink "tissue" ellipse sprinkled with purple "nuclei"
  (see :func:`tissue_ellipse_mask` for the ground truth).
- ``odd_slide``: 1501×1203 px, so level 1 (376×301) has the non-integer downsample 3.9943.
- ``tiny_png``: the tiny slide's pixels as a plain PNG (no resolution: needs an mpp).
- ``slide_folder``: two good slides, one in a subfolder, plus a hidden file that must be skipped.
- ``bad_slides``: a folder of broken files, with the error each must raise (``bad_slides.expected``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from weakstil.errors import (
    AnisotropicMppError,
    EmptySlideFileError,
    MissingMppError,
    NotASlideError,
    TruncatedSlideError,
)
from weakstil.wsi.writer import write_aperio_tiff

TINY_SIZE = (1500, 1200)  # (width, height) level 0
TINY_MPP = 0.25
ODD_SIZE = (1501, 1203)
# the tissue ellipse: centre and radii as fractions of (width, height)
TISSUE_ELLIPSE = (0.45, 0.5, 0.32, 0.36)
TISSUE_RGB = (232, 150, 190)
NUCLEUS_RGB = (110, 60, 150)
MIN_LEVEL_PX = 256  # the writer adds a level while the smaller side // 4 stays ≥ this


def tissue_ellipse_mask(width: int, height: int) -> np.ndarray:
    """Ground truth: (height, width) bool, True inside the tissue ellipse."""
    cx, cy, rx, ry = TISSUE_ELLIPSE
    yy, xx = np.mgrid[:height, :width]
    return ((xx + 0.5 - cx * width) / (rx * width)) ** 2 + ((yy + 0.5 - cy * height) / (ry * height)) ** 2 < 1


def tissue_like_image(width: int, height: int, *, seed: int = 0) -> np.ndarray:
    """(height, width, 3) uint8: near-white background, a pink ellipse with purple nuclei."""
    rng = np.random.default_rng(seed)
    image = np.full((height, width, 3), 246, dtype=np.int16)
    image += rng.integers(-4, 5, size=(height, width, 1), dtype=np.int16)
    inside = tissue_ellipse_mask(width, height)
    image[inside] = TISSUE_RGB
    n_nuclei = int(inside.sum() / 400)
    ys, xs = np.nonzero(inside)
    pick = rng.choice(len(xs), size=n_nuclei, replace=False)
    for x, y in zip(xs[pick], ys[pick]):
        image[max(0, y - 3) : y + 4, max(0, x - 3) : x + 4] = NUCLEUS_RGB
    image[inside] += rng.integers(-12, 13, size=(int(inside.sum()), 3), dtype=np.int16)
    return np.clip(image, 0, 255).astype(np.uint8)


def write_tiny_slide(path: Path, size: tuple[int, int] = TINY_SIZE, *, mpp: float | None = TINY_MPP,
                     seed: int = 0, **kwargs) -> Path:
    """Write an Aperio-like tiny slide (see the module docstring) and return its path."""
    return write_aperio_tiff(path, tissue_like_image(*size, seed=seed), mpp, min_level_px=MIN_LEVEL_PX,
                             thumbnail_px=256, **kwargs)


@pytest.fixture(scope="session")
def slides_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("slides")


@pytest.fixture(scope="session")
def tiny_slide(slides_root) -> Path:
    return write_tiny_slide(slides_root / "tiny.svs")


@pytest.fixture(scope="session")
def odd_slide(slides_root) -> Path:
    return write_tiny_slide(slides_root / "odd.svs", ODD_SIZE, seed=1)


@pytest.fixture(scope="session")
def tiny_png(slides_root) -> Path:
    from PIL import Image

    path = slides_root / "plain.png"
    Image.fromarray(tissue_like_image(*TINY_SIZE)).save(path)
    return path


@pytest.fixture(scope="session")
def slide_folder(tmp_path_factory, tiny_slide) -> Path:
    """Two good slides (``a.svs``, ``sub/b.svs``) and a hidden AppleDouble file ``._a.svs``."""
    import shutil

    root = tmp_path_factory.mktemp("slide_folder")
    shutil.copy(tiny_slide, root / "a.svs")
    (root / "sub").mkdir()
    write_tiny_slide(root / "sub" / "b.svs", seed=2)
    (root / "._a.svs").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (root / "notes.txt").write_text("not a slide")
    return root


@dataclass
class BadSlides:
    """Broken slide files in ``folder``; ``expected`` maps each path to the error it must raise."""

    folder: Path
    empty: Path
    truncated: Path
    not_a_slide: Path
    no_mpp: Path
    anisotropic: Path
    expected: dict[Path, type] = field(default_factory=dict)


@pytest.fixture(scope="session")
def bad_slides(tmp_path_factory, tiny_slide) -> BadSlides:
    import tifffile

    folder = tmp_path_factory.mktemp("bad_slides")
    empty = folder / "empty.svs"
    empty.write_bytes(b"")
    data = tiny_slide.read_bytes()
    truncated = folder / "truncated.svs"
    truncated.write_bytes(data[: len(data) // 2])
    not_a_slide = folder / "notes.svs"
    not_a_slide.write_text("slide list\nTCGA-01\nTCGA-02\n")
    no_mpp = write_tiny_slide(folder / "no_mpp.svs", mpp=None)
    # write_aperio_tiff(mpp_y=...) sets anisotropic resolution *tags*, but both readers take the
    # isotropic `MPP = ` from the description first: drop it so the tags speak.
    anisotropic = write_tiny_slide(folder / "anisotropic.svs", mpp=TINY_MPP, mpp_y=0.3)
    with tifffile.TiffFile(anisotropic) as tf:
        description = tf.pages[0].description
    tifffile.tiffcomment(anisotropic, description.replace(f"|MPP = {TINY_MPP:g}", ""), pageindex=0)
    return BadSlides(
        folder=folder, empty=empty, truncated=truncated, not_a_slide=not_a_slide, no_mpp=no_mpp,
        anisotropic=anisotropic,
        expected={empty: EmptySlideFileError, truncated: TruncatedSlideError, not_a_slide: NotASlideError,
                  no_mpp: MissingMppError, anisotropic: AnisotropicMppError},
    )
