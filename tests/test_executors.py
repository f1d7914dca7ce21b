"""The one runner with the Dask executor: a cluster object or a Client is accepted as it is (as a
dask-jobqueue cluster would be), and the outcomes are the local run's."""

from __future__ import annotations

import logging

import pytest

from tests.conftest import write_tiny_slide

pytest.importorskip("distributed")


@pytest.fixture(scope="module")
def cluster():
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None,
                      silence_logs=logging.ERROR) as cluster:
        yield cluster


def test_extract_on_a_cluster_object_then_skipped_locally(cluster, tmp_path):
    from weakstil.embed.extract import ExtractOptions, slide_sources
    from weakstil.runs.batch import extract_slides
    from weakstil.runs.executors import DaskExecutor, dask_client
    from weakstil.wsi.tiling import TileSpec
    from weakstil.wsi.tissue import TissueParams

    (tmp_path / "slides").mkdir()
    paths = [write_tiny_slide(tmp_path / "slides" / f"S{i}.tif", seed=i) for i in range(2)]
    kwargs = {"spec": TileSpec(), "tissue": TissueParams(), "opts": ExtractOptions(progress=False, device="cpu"),
              "qc": False}
    with dask_client(scheduler=cluster) as client:  # a cluster object, as dask-jobqueue's SLURMCluster
        with dask_client(scheduler=client) as same:  # a Client is used as it is
            assert same is client
        remote = extract_slides(slide_sources(paths), tmp_path / "features", encoder="resnet18-random",
                                executor=DaskExecutor(client), **kwargs)
    assert [(o.key, o.status) for o in remote.outcomes] == [("S0", "done"), ("S1", "done")]
    assert remote.n_tiles == sum(remote.cache.read(k).n_tiles for k in ("S0", "S1")) > 0
    local = extract_slides(slide_sources(paths), tmp_path / "features", encoder="resnet18-random", **kwargs)
    assert [o.reason for o in local.outcomes] == ["already_done", "already_done"]
    assert local.cache.path == remote.cache.path
