"""GPU JPEG decoding (weakstil.embed.gpu_decode): the CPU-side parts everywhere, through the same code
path with torchvision's CPU decoder; the CUDA run where a GPU is present."""

from __future__ import annotations

import numpy as np
import pytest

from weakstil.embed.gpu_decode import (
    MAX_MEAN_DIFF,
    decode_raw_blocks,
    has_raw_path,
    resolve_decode,
)
from weakstil.errors import ConfigError, WeakstilError
from weakstil.wsi.reader import plan_blocks, read_block_tiles, read_raw_tiles
from weakstil.wsi.slide import open_slide
from weakstil.wsi.tiling import TileSpec, tile_grid

pytest.importorskip("torchvision")


@pytest.fixture(scope="module")
def he_slides(tmp_path_factory):
    """A small synthetic H&E slide scanned at 0.25 and at 0.5 µm/px (JPEG tiles, 2 levels)."""
    from weakstil.synth.lattice import SlideParams, write_slide

    root = tmp_path_factory.mktemp("he-gpu")
    params = SlideParams(3, stil_target=40.0, size_um=(640.0, 512.0))
    paths = {}
    for mpp in (0.25, 0.5):
        paths[mpp] = root / f"he-{mpp:g}.svs"
        write_slide(paths[mpp], params, mpp)
    return paths


def tiles_both_ways(path, spec: TileSpec, device: str = "cpu"):
    """(CPU reader tiles, raw JPEG tiles decoded by the GPU path on ``device``) for every grid tile."""
    with open_slide(path) as slide:
        size_l0 = spec.size_l0(slide.mpp)
        coords = tile_grid(slide.dimensions, size_l0, spec.stride_l0(slide.mpp))
        order, blocks = plan_blocks(coords, size_l0, block=4)
        coords = coords[order]
        cpu = np.concatenate([read_block_tiles(slide, b, coords, size_l0=size_l0, tile_px=spec.tile_px)
                              for b in blocks])
        raws = [read_raw_tiles(slide, coords[b.index], size_l0=size_l0, tile_px=spec.tile_px) for b in blocks]
    assert all(r is not None for r in raws)
    return cpu, decode_raw_blocks(raws, device).cpu().numpy()


def mean_abs_diff(a, b) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def test_decode_choice_is_cpu_without_cuda_and_gpu_is_refused_there():
    assert resolve_decode("auto", "cpu") == "cpu" and resolve_decode("cpu", "cuda") == "cpu"
    assert resolve_decode("auto", "cuda:1") == "gpu" and resolve_decode("gpu", "cuda") == "gpu"
    with pytest.raises(ConfigError, match="needs a CUDA device") as info:
        resolve_decode("gpu", "cpu")
    assert isinstance(info.value, ValueError) and isinstance(info.value, WeakstilError) and info.value.fix
    with pytest.raises(ValueError, match="unknown decode"):
        resolve_decode("nvjpeg", "cuda")


def test_raw_tiles_are_the_files_own_complete_jpeg_streams(he_slides):
    import io

    from PIL import Image

    with open_slide(he_slides[0.5]) as slide:
        raw = read_raw_tiles(slide, np.array([[0, 0], [224, 224]]), size_l0=224.0, tile_px=224)
    assert raw is not None and raw.touched == sorted(raw.touched) and len(raw.jpegs) == len(raw.touched)
    assert raw.touched[0] == (0, 0) and (1, 1) in raw.touched and raw.span == pytest.approx(224.0)
    for data in raw.jpegs:
        assert data[:2] == b"\xff\xd8" and data[-2:] == b"\xff\xd9"
        with Image.open(io.BytesIO(data)) as image:  # decodable on its own: tables merged in
            assert image.size == (raw.tile_w, raw.tile_h)


@pytest.mark.parametrize("mpp,spec,limit", [
    (0.5, TileSpec(tile_px=224, mpp=0.5), 0.05),  # 1:1: the same libjpeg decode, bar IDCT rounding
    (0.25, TileSpec(tile_px=224, mpp=0.5), MAX_MEAN_DIFF),  # full decode + 2x box vs DCT-domain 1/2
    (0.25, TileSpec(tile_px=112, mpp=0.6), MAX_MEAN_DIFF),  # 2.4x: resized, not a box reduce
])
def test_gpu_path_decoded_on_the_cpu_matches_the_cpu_reader(he_slides, mpp, spec, limit):
    cpu, gpu_path = tiles_both_ways(he_slides[mpp], spec)
    assert gpu_path.shape == cpu.shape and gpu_path.dtype == np.uint8
    assert mean_abs_diff(cpu, gpu_path) <= limit
    per_tile = np.abs(cpu.astype(np.int16) - gpu_path.astype(np.int16)).mean(axis=(1, 2, 3))
    assert per_tile.max() <= 4 * max(limit, 0.5)  # no tile misplaced (a shift costs tens of levels)


def test_a_slide_without_jpeg_tiles_has_no_raw_path(tiny_png):
    with open_slide(tiny_png, mpp=0.5) as slide:
        assert not has_raw_path(slide, 224.0, 224)
        assert read_raw_tiles(slide, np.zeros((1, 2)), size_l0=224.0, tile_px=224) is None


def test_gpu_batches_on_the_cpu_keep_row_order_and_batch_sizes(he_slides):
    from weakstil.embed.extract import (
        BlockDataset,
        ExtractOptions,
        _thread_reader,
        iter_batches,
    )
    from weakstil.embed.gpu_decode import gpu_batches

    path, spec = he_slides[0.25], TileSpec(tile_px=224, mpp=0.5)
    with open_slide(path) as slide:
        size_l0 = spec.size_l0(slide.mpp)
        coords = tile_grid(slide.dimensions, size_l0, spec.stride_l0(slide.mpp))
    order, blocks = plan_blocks(coords, size_l0, block=2)
    coords = coords[order]
    dataset = BlockDataset(path, coords, blocks, size_l0, 224, {})
    got = [(start, t.numpy().copy()) for start, t in gpu_batches(dataset, 8, "cpu", _thread_reader)]
    want = [(start, t.numpy().copy()) for start, t in
            iter_batches(dataset, ExtractOptions(device="cpu", batch_size=8, workers=0), "cpu")]
    dataset.close()
    assert [s for s, _ in got] == [s for s, _ in want] and len(got) > 1
    assert mean_abs_diff(np.concatenate([t for _, t in got]), np.concatenate([t for _, t in want])) <= MAX_MEAN_DIFF


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA (nvJPEG)")
def test_on_cuda_gpu_decoded_tiles_match_the_cpu_reader(he_slides):
    for mpp in (0.25, 0.5):
        cpu, gpu = tiles_both_ways(he_slides[mpp], TileSpec(tile_px=224, mpp=0.5), device="cuda")
        assert gpu.shape == cpu.shape and mean_abs_diff(cpu, gpu) <= MAX_MEAN_DIFF


# --- several GPUs: one worker per device ----------------------------------------------------------
def test_one_worker_per_device_each_seeing_only_its_gpu():
    from weakstil.runs.executors import device_worker_specs

    device, specs = device_worker_specs(["cuda:0", "cuda:3"])
    assert device == "cuda" and len(specs) == 2
    assert [s["options"]["env"]["CUDA_VISIBLE_DEVICES"] for s in specs.values()] == ["0", "3"]
    assert all(s["options"]["nthreads"] == 1 for s in specs.values())
    device, specs = device_worker_specs(["cpu", "cpu"])
    assert device == "cpu" and [s["options"]["env"]["CUDA_VISIBLE_DEVICES"] for s in specs.values()] == ["", ""]
    for bad in (["cuda:0", "cpu"], ["cuda:1", "cuda:1"], ["gpu1"], []):
        with pytest.raises(ConfigError, match="--devices"):
            device_worker_specs(bad)


@pytest.mark.slow
def test_two_fake_devices_extract_a_folder_with_the_batch_runners_locks(slide_folder, tmp_path):
    """``--devices cpu,cpu``: two worker processes, each with its own slot; every slide done once."""
    import os

    from distributed import Client

    from weakstil.embed.extract import ExtractOptions, slide_sources
    from weakstil.runs.executors import device_cluster, run_on_devices
    from weakstil.wsi.tiling import TileSpec
    from weakstil.wsi.tissue import TissueParams

    with device_cluster(["cpu", "cpu"]) as cluster, Client(cluster) as client:
        slots = client.run(lambda: os.environ.get("WEAKSTIL_DEVICE_SLOT"))  # pickled by value: runs there
        assert sorted(slots.values()) == ["0", "1"]
    sources = slide_sources([slide_folder / "a.svs", slide_folder / "sub" / "b.svs"])
    job_args = {"features": tmp_path / "features", "encoder": "resnet18-random", "weights": None,
                "spec": TileSpec(tile_px=112, mpp=1.0), "tissue": TissueParams(),
                "opts": ExtractOptions(device="auto", batch_size=8, workers=0, progress=False), "roi_dir": None,
                "lock": True}
    outcomes = run_on_devices("extract", sources, job_args, ["cpu", "cpu"])
    assert [o.status for o in outcomes] == ["done", "done"], outcomes
    again = run_on_devices("extract", sources, job_args, ["cpu", "cpu"])
    assert [o.status for o in again] == ["skipped", "skipped"]
