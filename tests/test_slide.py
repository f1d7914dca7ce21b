"""open_slide and friends: the backend contract, mpp resolution, typed errors, finding slides."""

from __future__ import annotations

import math
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
from conftest import TINY_MPP, TINY_SIZE, tissue_like_image

import weakstil.wsi.backends as backends_mod
import weakstil.wsi.slide as slide_mod
from weakstil.errors import (
    AnisotropicMppError,
    ConfigError,
    DuplicateSlideIdError,
    MissingMppError,
    MppCsvError,
    NotASlideError,
    SlideNotFoundError,
    TruncatedSlideError,
    UnsupportedFormatError,
    WeakstilError,
)
from weakstil.wsi.slide import (
    SlideHandle,
    find_slides,
    open_slide,
    read_mpp_csv,
    slide_id_from_path,
)

BACKENDS = ("openslide", "tiffslide")
# (x, y, w, h) in level-0 px: inside, unaligned, straddling every edge, fully outside
REGIONS = [
    (0, 0, 64, 64), (401, 403, 50, 37), (256, 256, 256, 256), (-20, -30, 64, 64),
    (1450, 1150, 100, 80), (-8, 600, 1600, 16), (2000, 2000, 8, 8), (1499, 1199, 1, 1),
]


def stored_levels(path: Path) -> list[np.ndarray]:
    """Decode the level pages with tifffile (page 1 is the thumbnail): the ground truth of a read."""
    with tifffile.TiffFile(path) as tf:
        return [tf.pages[0].asarray()] + [page.asarray() for page in tf.pages[2:]]


def expected_region(level: np.ndarray, x_lv: int, y_lv: int, w: int, h: int) -> np.ndarray:
    pad = max(w, h) + abs(x_lv) + abs(y_lv) + 1
    padded = np.pad(level, ((pad, pad), (pad, pad), (0, 0)), constant_values=255)
    return padded[pad + y_lv : pad + y_lv + h, pad + x_lv : pad + x_lv + w]


@pytest.fixture(scope="module")
def tiny_levels(tiny_slide):
    return stored_levels(tiny_slide)


@pytest.mark.parametrize("backend", BACKENDS)
class TestBackendContract:
    """Every backend must give the same geometry, resolution and pixels."""

    def test_geometry(self, tiny_slide, backend):
        with open_slide(tiny_slide, backend=backend) as slide:
            assert slide.backend == backend
            assert slide.dimensions == TINY_SIZE
            assert slide.level_dimensions == (TINY_SIZE, (375, 300))
            assert slide.level_downsamples == pytest.approx((1.0, 4.0), rel=1e-6)
            assert slide.mpp == pytest.approx(TINY_MPP)
            assert slide.mpp_source == f"{backend}.mpp"
            assert slide.objective_power == 40
            assert slide.vendor == "aperio"
            assert slide.slide_id == "tiny"

    @pytest.mark.parametrize("level", [0, 1])
    @pytest.mark.parametrize("region", REGIONS)
    def test_pixels(self, tiny_slide, tiny_levels, backend, level, region):
        x, y, w, h = region
        with open_slide(tiny_slide, backend=backend) as slide:
            got = slide.read_region((x, y), level, (w, h))
            ds = slide.level_downsamples[level]
        assert got.dtype == np.uint8 and got.shape == (h, w, 3) and got.flags.writeable
        want = expected_region(tiny_levels[level], math.floor(x / ds), math.floor(y / ds), w, h)
        np.testing.assert_array_equal(got, want)

    def test_odd_downsample_is_not_rounded(self, odd_slide, backend):
        with open_slide(odd_slide, backend=backend) as slide:
            ds = slide.level_downsamples[1]
            assert slide.level_dimensions[1] == (376, 301)
            assert ds == pytest.approx((1501 / 376 + 1203 / 301) / 2)
            assert ds != 4.0

    @pytest.mark.parametrize("region", REGIONS)
    def test_odd_downsample_pixels(self, odd_slide, backend, region):
        """Level 0 is exact; at a non-integer downsample OpenSlide resamples by < 1/8 px."""
        levels = stored_levels(odd_slide)
        x, y, w, h = region
        with open_slide(odd_slide, backend=backend) as slide:
            ds = slide.level_downsamples[1]
            np.testing.assert_array_equal(slide.read_region((x, y), 0, (w, h)), expected_region(levels[0], x, y, w, h))
            got = slide.read_region((x, y), 1, (w, h)).astype(int)
        want = expected_region(levels[1], math.floor(x / ds), math.floor(y / ds), w, h).astype(int)
        if backend == "tiffslide":
            np.testing.assert_array_equal(got, want)
        else:
            assert np.abs(got - want).mean() < 3

    @pytest.mark.parametrize("max_px", [64, 200, 400, 5000])
    def test_thumbnail(self, tiny_slide, backend, max_px):
        with open_slide(tiny_slide, backend=backend) as slide:
            thumb = slide.get_thumbnail(max_px)
        long_side = min(max_px, max(TINY_SIZE))
        assert thumb.dtype == np.uint8 and thumb.ndim == 3 and thumb.shape[2] == 3
        assert max(thumb.shape[:2]) == long_side
        assert thumb.shape[1] / thumb.shape[0] == pytest.approx(TINY_SIZE[0] / TINY_SIZE[1], rel=0.02)

    def test_pickle_reopens(self, tiny_slide, backend):
        with open_slide(tiny_slide, backend=backend, mpp=0.3, mpp_override=True) as slide:
            clone = pickle.loads(pickle.dumps(slide))
        with clone:
            assert (clone.backend, clone.mpp, clone.mpp_source) == (backend, 0.3, "mpp-override")
            assert clone.read_region((0, 0), 0, (4, 4)).shape == (4, 4, 3)

    @pytest.mark.parametrize("kind", ["empty", "truncated", "not_a_slide", "no_mpp", "anisotropic"])
    def test_bad_slides(self, bad_slides, backend, kind):
        path = getattr(bad_slides, kind)
        with pytest.raises(bad_slides.expected[path]) as info:
            open_slide(path, backend=backend)
        assert isinstance(info.value, (WeakstilError, ValueError))
        assert str(path) in str(info.value) and "fix:" in str(info.value)

    def test_reading_a_file_truncated_after_opening(self, tiny_slide, tmp_path, backend):
        path = tmp_path / "copy.svs"
        shutil.copy(tiny_slide, path)
        with open_slide(path, backend=backend) as slide:
            os.truncate(path, path.stat().st_size // 3)
            with pytest.raises(TruncatedSlideError) as info:
                slide.read_region((0, 0), 0, TINY_SIZE)
        assert info.value.__cause__ is not None


def test_thumbnails_identical_across_backends(tiny_slide, odd_slide):
    for path in (tiny_slide, odd_slide):
        thumbs = []
        for backend in BACKENDS:
            with open_slide(path, backend=backend) as slide:
                thumbs.append(slide.get_thumbnail(300))
        np.testing.assert_array_equal(thumbs[0], thumbs[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_thumbnail_in_bands_equals_one_piece(tiny_slide, tmp_path, monkeypatch, backend):
    single = write_generic_tiff(tmp_path / "single.tif", (4e4, 4e4), "CENTIMETER")  # 1 level: reduce by 5
    for path in (tiny_slide, single):
        with open_slide(path, backend=backend) as slide:
            whole = slide.get_thumbnail(100)
            monkeypatch.setattr(slide_mod, "_THUMB_BAND_BYTES", 3 * 512 * 7)  # bands of a few rows
            banded = slide.get_thumbnail(100)
            monkeypatch.undo()
        np.testing.assert_array_equal(whole, banded)


def test_auto_prefers_openslide_then_tiffslide(tiny_slide, monkeypatch):
    with open_slide(tiny_slide) as slide:
        assert slide.backend == "openslide"
    monkeypatch.setattr(slide_mod, "openslide_module", lambda: None)
    with open_slide(tiny_slide) as slide:
        assert slide.backend == "tiffslide"


def test_truncated_at_a_directory_boundary(tiny_slide, tmp_path):
    """Level 0 complete, the rest cut off: TiffSlide alone would open it as a 1-level slide."""
    with tifffile.TiffFile(tiny_slide) as tf:
        cut = tf.pages[1].offset
    path = tmp_path / "cut.svs"
    path.write_bytes(tiny_slide.read_bytes()[:cut])
    for backend in ("auto", *BACKENDS):
        with pytest.raises(TruncatedSlideError, match="next directory"):
            open_slide(path, backend=backend)


def test_truncated_before_first_directory(tmp_path):
    path = tmp_path / "head.svs"
    path.write_bytes(b"II*\x00" + (10_000).to_bytes(4, "little") + b"\x00" * 32)
    with pytest.raises(TruncatedSlideError, match="first directory"):
        open_slide(path)


# --- resolution ---------------------------------------------------------------------------------
def test_mpp_argument_is_a_fallback(tiny_slide, bad_slides):
    with open_slide(tiny_slide, mpp=0.5) as slide:
        assert (slide.mpp, slide.mpp_source) == (TINY_MPP, "openslide.mpp")
    with open_slide(bad_slides.no_mpp, mpp=0.5) as slide:
        assert (slide.mpp, slide.mpp_source) == (0.5, "mpp-argument")
    with open_slide(bad_slides.anisotropic, mpp=0.27) as slide:
        assert (slide.mpp, slide.mpp_source) == (0.27, "mpp-argument")


@pytest.mark.parametrize("backend", BACKENDS)
def test_mpp_override_replaces_stated(tiny_slide, backend):
    with open_slide(tiny_slide, backend=backend, mpp=0.5, mpp_override=True) as slide:
        assert (slide.mpp, slide.mpp_source) == (0.5, "mpp-override")


@pytest.mark.parametrize("kwargs", [{"mpp": 0}, {"mpp": -1}, {"mpp": float("nan")}, {"mpp": "x"},
                                    {"mpp_override": True}, {"backend": "vips"}])
def test_bad_open_arguments(tiny_slide, kwargs):
    with pytest.raises(ConfigError):
        open_slide(tiny_slide, **kwargs)


def write_generic_tiff(path: Path, resolution, unit: str) -> Path:
    image = tissue_like_image(512, 384)
    tifffile.imwrite(path, image, tile=(256, 256), photometric="rgb", metadata=None,
                     resolution=resolution, resolutionunit=unit)
    return path


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "resolution, unit, expected",
    [
        ((2e4, 2e4), "CENTIMETER", 0.5),
        ((50800, 50800), "INCH", 0.5),
        ((4e4, 4e4 / 1.008), "CENTIMETER", 0.251),  # 0.8 % apart: square enough, the mean
        ((4e4, 4e4 / 1.04), "CENTIMETER", AnisotropicMppError),
        ((2, 2), "NONE", MissingMppError),
        ((72, 72), "INCH", MissingMppError),  # 352.8 µm/px: a display dpi, not a scan
    ],
)
def test_mpp_from_resolution_tags(tmp_path, backend, resolution, unit, expected):
    path = write_generic_tiff(tmp_path / "generic.tif", resolution, unit)
    if isinstance(expected, type):
        with pytest.raises(expected):
            open_slide(path, backend=backend)
        return
    with open_slide(path, backend=backend) as slide:
        assert slide.mpp == pytest.approx(expected, rel=1e-3)
        assert slide.level_count == 1


def write_ome_tiff(path: Path, pixels: dict | None) -> Path:
    """An OME-TIFF as tifffile writes it: OME-XML in page 0, the reduced levels in SubIFDs."""
    image = tissue_like_image(1024, 768)
    with tifffile.TiffWriter(path) as tif:
        tif.write(image, subifds=2, tile=(256, 256), photometric="rgb", compression="jpeg",
                  metadata={"axes": "YXS", **(pixels or {})})
        for k in (2, 4):
            tif.write(image[::k, ::k], subfiletype=1, tile=(256, 256), photometric="rgb", compression="jpeg")
    return path


@pytest.mark.parametrize("pixels, expected", [
    ({"PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5}, 0.5),  # µm, the OME default unit
    ({"PhysicalSizeX": 250, "PhysicalSizeXUnit": "nm", "PhysicalSizeY": 250, "PhysicalSizeYUnit": "nm"}, 0.25),
    ({"PhysicalSizeX": 350, "PhysicalSizeY": 350}, MissingMppError),  # 350 µm/px: no scan resolution
    (None, MissingMppError),
])
def test_ome_tiff_mpp_from_its_xml_and_its_subifd_pyramid(tmp_path, pixels, expected):
    path = write_ome_tiff(tmp_path / "S1.ome.tif", pixels)
    if isinstance(expected, type):
        with pytest.raises(expected, match="OME-XML"):
            open_slide(path)
        return
    with open_slide(path) as slide:
        assert (slide.mpp, slide.mpp_source) == (pytest.approx(expected), "ome-xml")
        # OpenSlide sees only the first level of a SubIFD pyramid; auto opens it with TiffSlide
        assert slide.backend == "tiffslide" and slide.level_downsamples == pytest.approx((1.0, 2.0, 4.0))
        assert slide.read_region((0, 0), 2, (64, 48)).shape[:2] == (48, 64)
    with open_slide(path, backend="openslide") as slide:  # asked for by name: OpenSlide it is
        assert slide.backend == "openslide" and slide.mpp_source == "ome-xml"


def test_a_subifd_pyramid_without_ome_opens_with_every_level(tmp_path):
    path = tmp_path / "plain.tif"
    image = tissue_like_image(1024, 768)
    with tifffile.TiffWriter(path) as tif:
        tif.write(image, subifds=2, tile=(256, 256), photometric="rgb", compression="jpeg", metadata=None,
                  resolution=(2e4, 2e4), resolutionunit="CENTIMETER")
        for k in (2, 4):
            tif.write(image[::k, ::k], subfiletype=1, tile=(256, 256), photometric="rgb", compression="jpeg")
    with open_slide(path) as slide:
        assert slide.backend == "tiffslide" and slide.level_count == 3 and slide.mpp == pytest.approx(0.5)
    with open_slide(tmp_path / "plain.tif", backend="openslide") as slide:
        assert slide.level_count == 1  # why auto does not pick it


def test_plain_image_needs_mpp(tiny_png):
    with pytest.raises(MissingMppError, match="PNG"):
        open_slide(tiny_png)
    with open_slide(tiny_png, mpp=TINY_MPP) as slide:
        assert (slide.backend, slide.dimensions, slide.level_downsamples) == ("image", TINY_SIZE, (1.0,))
        got = slide.read_region((-10, 1190), 0, (30, 20))
    want = expected_region(tissue_like_image(*TINY_SIZE), -10, 1190, 30, 20)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("slide_id, kwargs, expected", [
    ("a", {}, {"backend": "auto", "mpp": None, "mpp_override": False}),
    ("a", {"mpp": 0.5}, {"backend": "auto", "mpp": 0.5, "mpp_override": False}),
    ("b", {"mpp": 0.5, "mpp_by_slide": {"b": 0.3}}, {"backend": "auto", "mpp": 0.3, "mpp_override": True}),
    ("c", {"mpp": 0.5, "mpp_override": True, "mpp_by_slide": {"b": 0.3}, "backend": "tiffslide"},
     {"backend": "tiffslide", "mpp": 0.5, "mpp_override": True}),
])
def test_open_kwargs_for(slide_id, kwargs, expected):
    assert slide_mod.open_kwargs_for(Path(f"slides/{slide_id}.svs"), **kwargs) == expected


# --- other errors -------------------------------------------------------------------------------
def test_missing_file(tmp_path):
    with pytest.raises(SlideNotFoundError) as info:
        open_slide(tmp_path / "nope.svs")
    assert isinstance(info.value, FileNotFoundError)


@pytest.mark.parametrize("name, content, error", [
    ("slide.txt", b"II*\x00", UnsupportedFormatError),  # unknown suffix
    ("slide.mrxs", b"[GENERAL]\n", UnsupportedFormatError),  # no data folder: OpenSlide refuses
    ("slide.svs", b"<html>not a slide</html>", NotASlideError),
    ("slide.tif", b"\x89PNG\r\n\x1a\n" + b"\x00" * 32, NotASlideError),  # PNG magic, garbage after
])
def test_unsupported_and_not_a_slide(tmp_path, name, content, error):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(error) as info:
        open_slide(path)
    assert info.value.fix


def test_folder_is_not_a_slide(tmp_path):
    with pytest.raises(UnsupportedFormatError, match="folder"):
        open_slide(tmp_path)


def test_mrxs_without_openslide(tmp_path, monkeypatch):
    monkeypatch.setattr(slide_mod, "openslide_module", lambda: None)
    monkeypatch.setattr(backends_mod, "openslide_module", lambda: None)
    path = tmp_path / "slide.mrxs"
    path.write_bytes(b"\xff\xd8\xff\xe0")
    with pytest.raises(UnsupportedFormatError, match="OpenSlide is not available"):
        open_slide(path)
    with pytest.raises(UnsupportedFormatError, match="not available"):
        open_slide(tmp_path / "slide.mrxs", backend="openslide")


@pytest.mark.parametrize("backend", BACKENDS)
def test_png_with_a_tiff_only_backend(tiny_png, backend):
    with pytest.raises(UnsupportedFormatError):
        open_slide(tiny_png, backend=backend, mpp=0.25)


def test_closed_handle_and_bad_reads(tiny_slide):
    slide = open_slide(tiny_slide)
    with pytest.raises(ValueError):
        slide.read_region((0, 0), 2, (4, 4))
    with pytest.raises(ValueError):
        slide.read_region((0, 0), 0, (-1, 4))
    slide.close()
    slide.close()
    with pytest.raises(ValueError, match="closed"):
        slide.read_region((0, 0), 0, (4, 4))


# --- level choice (pure) ------------------------------------------------------------------------
def handle_with_downsamples(downsamples) -> SlideHandle:
    dims = tuple((int(10000 / d), int(8000 / d)) for d in downsamples)
    return SlideHandle(path=Path("x.svs"), slide_id="x", backend="image", vendor=None, mpp=0.25,
                       mpp_source="", objective_power=None, level_dimensions=dims,
                       level_downsamples=tuple(downsamples))


@pytest.mark.parametrize("downsample, level", [
    (0.5, 0), (1.0, 0), (1.5, 0), (3.9, 0), (3.96, 1), (3.99, 1), (4.0, 1), (8, 1),
    (15.8, 1), (15.84, 2), (15.9, 2), (16, 2), (63.9, 3), (64, 3), (1000, 3),
])
def test_best_level_for_downsample(downsample, level):
    slide = handle_with_downsamples((1.0, 3.9957, 15.9957, 63.98))
    assert slide.best_level_for_downsample(downsample) == level


# --- finding slides, ids, mpp CSV ---------------------------------------------------------------
@pytest.mark.parametrize("path, slide_id", [
    ("slides/TCGA-XX.svs", "TCGA-XX"), ("a/b/c.tiff", "c"), ("x.ome.tif", "x.ome"), ("s 1.ndpi", "s 1"),
])
def test_slide_id_from_path(path, slide_id):
    assert slide_id_from_path(path) == slide_id


def test_find_slides_folder(slide_folder):
    found = find_slides(slide_folder)
    assert [p.relative_to(slide_folder).as_posix() for p in found] == ["a.svs", "sub/b.svs"]
    assert find_slides(found[1]) == [found[1]]


def test_find_slides_errors(tmp_path):
    with pytest.raises(SlideNotFoundError):
        find_slides(tmp_path / "missing")
    with pytest.raises(SlideNotFoundError, match="no slide files"):
        find_slides(tmp_path)
    (tmp_path / "a.svs").write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.TIF").write_bytes(b"x")
    with pytest.raises(DuplicateSlideIdError, match="a.svs"):
        find_slides(tmp_path)


def test_read_mpp_csv(tmp_path):
    path = tmp_path / "mpp.csv"
    path.write_text("\ufeffslide_id, mpp ,note\nA, 0.25,x,extra\nB,0.5\n", encoding="utf-8")
    assert read_mpp_csv(path) == {"A": 0.25, "B": 0.5}


@pytest.mark.parametrize("text, needle", [
    ("slide,mpp\nA,0.25\n", "columns"),
    ("", "columns"),
    ("slide_id,mpp\nA,abc\nB,0.25\nB,0.3\n,0.2\nC,40\nD,0\n",
     "line 2.*line 4.*line 5.*line 6.*line 7"),
])
def test_read_mpp_csv_errors(tmp_path, text, needle):
    path = tmp_path / "mpp.csv"
    path.write_text(text)
    with pytest.raises(MppCsvError, match=f"(?s){needle}"):
        read_mpp_csv(path)


def test_read_mpp_csv_missing(tmp_path):
    with pytest.raises(MppCsvError, match="does not exist"):
        read_mpp_csv(tmp_path / "none.csv")

