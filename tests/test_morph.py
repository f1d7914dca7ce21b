"""The stain-morphometry encoder (weakstil.embed.morph): what its numbers measure on drawn tiles."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from weakstil.embed.encoders import MORPH_DIM, create_encoder, get_encoder_spec
from weakstil.embed.morph import NAMES, N_FEATURES, StainMorph
from weakstil.embed.stain import IO, REF_HE

PX = 224


def render(h: np.ndarray, e: np.ndarray) -> np.ndarray:
    """(PX, PX) hematoxylin and eosin amounts → a uint8 RGB tile with the reference stains."""
    od = h[..., None] * REF_HE[:, 0] + e[..., None] * REF_HE[:, 1]
    return np.clip(IO * np.exp(-od), 0, 255).round().astype(np.uint8)


def disks(centres, radius: float, amount: float) -> np.ndarray:
    yy, xx = np.mgrid[:PX, :PX]
    out = np.zeros((PX, PX))
    for cy, cx in centres:
        out[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2] = amount
    return out


def grid(step: int, offset: int = 12):
    return [(y, x) for y in range(offset, PX - 8, step) for x in range(offset, PX - 8, step)]


def features(*tiles) -> dict:
    x = torch.as_tensor(np.stack(tiles)).permute(0, 3, 1, 2).float() / 255.0
    out = StainMorph()(x).numpy()
    return {name: out[:, i] for i, name in enumerate(NAMES)}


def test_dimension_matches_the_registered_encoders():
    assert N_FEATURES == len(NAMES) == MORPH_DIM
    assert get_encoder_spec("stainmorph").embed_dim == N_FEATURES
    assert get_encoder_spec("resnet18-random+stainmorph").embed_dim == 512 + N_FEATURES


def test_lymphocytes_in_stroma_are_counted_and_located():
    stroma = np.full((PX, PX), 0.6)  # eosin-rich background, no nuclei
    lymph = disks(grid(28), 4.0, 1.6)  # dark round nuclei ~8 px (4 µm) across
    blank, tils = render(np.zeros((PX, PX)), stroma), render(lymph, stroma)
    f = features(blank, tils)
    assert f["dark_nuclei_s1"][1] + f["dark_nuclei_s2"][1] > 1.0
    assert f["dark_nuclei_s1"][0] == f["dark_nuclei_s2"][0] == 0.0
    assert f["small_in_stroma"][1] > 1.0 and f["small_per_stroma"][1] > f["small_per_stroma"][0]
    assert f["stroma_like"][0] > 0.9 and f["e_rich"][0] > 0.9
    assert f["h_mean"][1] > f["h_mean"][0]
    assert f["stroma_est"][0] > 0.95 and f["stroma_est"][1] > 0.8  # dense TILs are still stroma


def test_tumour_nests_are_told_from_stroma():
    # large pale nuclei packed together: a nest, with a few lymphocytes among them
    big = disks(grid(32, 12), 9.0, 0.6)  # 9 µm across, 16 µm apart
    lymph = disks([(92, 92), (124, 124), (156, 60)], 4.0, 1.6)  # 4 µm, between tumour cells
    nest = render(np.maximum(big, lymph), np.full((PX, PX), 0.2))
    stroma = render(disks([(92, 92), (124, 124), (156, 60)], 4.0, 1.6), np.full((PX, PX), 0.6))
    f = features(nest, stroma)
    assert f["nuclei_s3"][0] + f["nuclei_s4"][0] > f["nuclei_s3"][1] + f["nuclei_s4"][1]
    assert f["nest_like"][0] > 0.5 > f["nest_like"][1]
    assert f["stroma_like"][0] < 0.2 < f["stroma_like"][1]
    assert f["small_in_nests"][0] > f["small_in_nests"][1]
    assert f["stroma_est"][0] < 0.2 and f["stroma_est"][1] > 0.95


def test_background_is_not_tissue_and_values_are_finite():
    white = np.full((PX, PX, 3), 240, np.uint8)
    noise = np.random.default_rng(0).integers(0, 256, (PX, PX, 3), dtype=np.uint8)
    f = features(white, noise)
    assert f["tissue"][0] == 0.0
    assert all(np.isfinite(v).all() for v in f.values())


@pytest.mark.parametrize("name", ["stainmorph", "resnet18-random+stainmorph"])
def test_encoders_run_through_the_common_path(name):
    enc = create_encoder(name)
    tiles = torch.as_tensor(np.stack([render(disks(grid(28), 4.0, 1.6), np.full((PX, PX), 0.6))] * 2))
    out = enc(enc.preprocess(tiles))
    assert out.shape == (2, enc.spec.embed_dim)
    assert enc.fingerprint()["name"] == name
    if "+" in name:  # the network half is resnet18-random's, same weights and input normalisation
        ref = create_encoder("resnet18-random")
        torch.testing.assert_close(out[:, :512], ref(ref.preprocess(tiles)), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(out[:, 512:], create_encoder("stainmorph")(tiles.permute(0, 3, 1, 2) / 255.0),
                                       rtol=1e-3, atol=1e-4)


def test_any_encoder_with_file_weights_takes_the_morphometry_beside_it(tmp_path):
    """ciga-simclr from a checkpoint built here: the pair's first 512 features are that encoder's,
    with its own normalisation (mean/std 0.5), and the fingerprint names the weights."""
    from weakstil.embed.resnet import create_resnet

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        net = create_resnet("resnet18")
    path = tmp_path / "tenpercent_resnet18.ckpt"
    torch.save({"state_dict": {f"model.resnet.{k}": v for k, v in net.state_dict().items()}}, path)
    base = create_encoder("ciga-simclr", f"file:{path}")
    pair = create_encoder("ciga-simclr+stainmorph", f"file:{path}")
    assert pair.spec.embed_dim == 512 + N_FEATURES and pair.spec.mean == (0.0, 0.0, 0.0)
    assert get_encoder_spec("ciga-simclr+stainmorph") == pair.spec
    fp = pair.fingerprint()
    assert fp["weights"] == f"file:{path}" and fp["weights_sha256"] == base.fingerprint()["weights_sha256"]
    assert fp["arch"] != base.fingerprint()["arch"]  # caches of the two never mix
    tiles = torch.as_tensor(np.stack([render(disks(grid(28), 4.0, 1.6), np.full((PX, PX), 0.6))] * 2))
    torch.testing.assert_close(pair(pair.preprocess(tiles))[:, :512], base(base.preprocess(tiles)),
                               rtol=1e-4, atol=1e-4)


def test_morphometry_is_not_added_twice():
    from weakstil.errors import UnknownEncoderError

    with pytest.raises(UnknownEncoderError, match="already"):
        get_encoder_spec("resnet18-random+stainmorph+stainmorph")
    with pytest.raises(UnknownEncoderError, match="already"):
        get_encoder_spec("stainmorph+stainmorph")


def test_features_are_the_same_under_the_extractors_autocast():
    """TileEmbedder runs encoders under autocast (bf16 on AMX CPUs, fp16 on GPUs); the morphometry
    must not follow it (the FFTs refuse bf16, and thresholds must mean the same everywhere)."""
    tiles = np.stack([render(disks(grid(28), 4.0, 1.6), np.full((PX, PX), 0.6)),
                      render(disks(grid(32, 12), 9.0, 0.6), np.full((PX, PX), 0.2))])
    x = torch.as_tensor(tiles).permute(0, 3, 1, 2).float() / 255.0
    module = StainMorph()
    plain = module(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = module(x)
    assert under.dtype == torch.float32
    torch.testing.assert_close(under, plain)


def test_the_encoders_table_says_the_morphometry_has_no_weights():
    from weakstil.embed.encoders import DEFAULT_ENCODER, encoders_table, list_encoders

    table = encoders_table(list_encoders())
    names = list(table.columns[0].cells)
    row = names.index("stainmorph")
    assert list(table.columns[3].cells)[row] == "none (fixed)"
    assert DEFAULT_ENCODER in str(table.caption) and "+stainmorph" in str(table.caption)


def test_the_stroma_estimate_is_read_only_from_this_morphometry():
    from weakstil.embed.encoders import MORPH_ARCH, stroma_estimate, with_morph

    feats = np.random.default_rng(0).uniform(0, 1, (5, 10))
    spec = with_morph(get_encoder_spec("resnet18-random"))
    assert spec.arch.endswith(MORPH_ARCH)
    assert np.array_equal(stroma_estimate(feats, {"arch": spec.arch}), feats[:, -6])  # v7: the wide rule's
    assert NAMES[-6] == "stroma_est_wide"
    assert np.array_equal(stroma_estimate(feats, {"arch": "resnet18+stainmorph.v6"}), feats[:, -1])
    assert stroma_estimate(feats, {"arch": get_encoder_spec("resnet18-random").arch}) is None
    assert stroma_estimate(feats, {"arch": "resnet18+stainmorph.v1"}) is None  # its last column was another feature
    assert stroma_estimate(feats, None) is None
    assert np.array_equal(stroma_estimate(feats, {"arch": "resnet18+stainmorph.v2"}), feats[:, -1])  # older caches
    assert NAMES[-1] == "stroma_est"


def test_lymphocyte_area_is_read_on_stroma_and_kept_apart_from_nests():
    """``lymph_per_stroma`` is the share of the stroma that is lymphocyte: it grows with the lymphocytes
    in the stroma (about the drawn area share), not with lymphocytes packed inside a tumour nest (those
    go to ``lymph_per_nest``), and a tile with no stroma cannot reach a high ratio."""
    e = np.full((PX, PX), 0.6)
    sparse, dense = disks(grid(40), 4.0, 1.6), disks(grid(20), 4.0, 1.6)
    share = lambda h: float((h > 0).mean())  # noqa: E731 - the drawn lymphocyte area
    big = disks(grid(32, 12), 9.0, 0.6)
    nest_tils = np.maximum(big, disks([(y + 16, x + 16) for y, x in grid(32, 12)][:20], 4.0, 1.6))
    f = features(render(np.zeros((PX, PX)), e), render(sparse, e), render(dense, e),
                 render(nest_tils, np.full((PX, PX), 0.2)))
    lps = f["lymph_per_stroma"]
    assert lps[0] < 0.01 and lps[1] < lps[2]
    assert lps[1] == pytest.approx(share(sparse), abs=0.04) and lps[2] == pytest.approx(share(dense), abs=0.08)
    assert f["lymph_per_stroma_loose"][2] >= lps[2] - 0.02
    assert f["lymph_per_nest"][3] > 0.015 and f["lymph_per_nest"][1] < 0.01  # 2 % of the nest is drawn lymphocyte
    assert lps[3] < lps[2]


def test_size_aware_share_leaves_hyperchromatic_tumour_nuclei_out():
    """Dark *large* nuclei (a nest of hyperchromatic tumour cells) read as lymphocytes by darkness
    alone; ``lymph_per_stroma_sized`` leaves them out and still counts lymphocytes in stroma."""
    e = np.full((PX, PX), 0.6)
    lymph = disks(grid(40), 6.0, 1.6)  # lymphocytes ~6 µm across in stroma
    nest = disks(grid(36, 12), 15.0, 1.6)  # hyperchromatic tumour nuclei 15 µm across, 18 µm apart
    f = features(render(lymph, e), render(nest, np.full((PX, PX), 0.2)))
    share = float((lymph > 0).mean())
    assert f["lymph_per_stroma_sized"][0] == pytest.approx(share, abs=0.04)
    assert f["lymph_per_stroma_sized"][0] == pytest.approx(f["lymph_per_stroma"][0], abs=0.03)
    assert f["lymph_per_stroma"][1] > 0.2  # darkness alone: the nest is "stroma full of lymphocytes"
    assert f["lymph_per_stroma_sized"][1] < 0.05
    # the measured block (encoders.MEASURED_DIM), whose last four read lymphocytes by darkness alone
    assert NAMES[-5:] == ("lymph_per_stroma_sized", "lymph_per_stroma", "lymph_per_stroma_loose",
                          "lymph_per_nest", "stroma_est")


def test_a_crowd_of_lymphocytes_is_stroma_full_of_lymphocytes_not_a_nest():
    """Lymphocytes packed side by side (7.6 µm apart, blurred as a scanner does): their rims and the
    seams between them pass through the pale-nucleus range; they must not make the tile a "tumour
    nest" without stroma. Vesicular tumour nuclei (pale, 9 µm across) still do."""
    from scipy import ndimage

    from weakstil.embed.morph import PALE, pale_nuclei

    e = np.full((PX, PX), 0.5)
    step = 15  # px at 0.5 µm/px: 7.5 µm
    crowd = ndimage.gaussian_filter(disks([(y, x + (step // 2) * (i % 2)) for i, y in enumerate(range(6, PX, 13))
                                           for x in range(6, PX, step)], 6.0, 1.8), 1.5)
    tumour = disks(grid(32, 12), 9.0, 0.6)  # vesicular tumour nuclei 9 µm across, 16 µm apart
    f = features(render(crowd, e), render(tumour, np.full((PX, PX), 0.2)))
    assert f["lymph_per_stroma"][0] > 0.3 and f["stroma_est"][0] > 0.8
    assert f["stroma_est"][1] < 0.3
    h = torch.as_tensor(ndimage.zoom(crowd, 0.5, order=1))[None, None].float()  # 1 µm/px, as the encoder looks
    drawn_pale = ((h >= PALE[0]) & (h < PALE[1])).float().mean()
    assert drawn_pale > 0.15 and pale_nuclei(h, torch.ones_like(h)).mean() < 0.1 * drawn_pale  # rims are not nuclei


def test_the_wide_rule_marks_nests_of_moderately_dense_nuclei():
    """Tumour nuclei with clumped, moderately dense chromatin (H 1.0, 9 µm across: the regions family's)
    are too dark for the pale nest rule, which reads their nest as stroma; the wide rule (H up to
    1.2) marks it. Both rules agree on plain stroma with lymphocytes, and on vesicular nests."""
    e = np.full((PX, PX), 0.5)
    dense = disks(grid(32, 12), 9.0, 1.0)
    vesicular = disks(grid(32, 12), 9.0, 0.6)
    lymph = disks(grid(40), 6.0, 1.6)
    f = features(render(dense, np.full((PX, PX), 0.2)), render(vesicular, np.full((PX, PX), 0.2)), render(lymph, e))
    assert f["stroma_est"][0] > 0.5 and f["stroma_est_wide"][0] < 0.3  # the dense nest: pale rule misses it
    assert f["stroma_est"][1] < 0.3 and f["stroma_est_wide"][1] < 0.3
    assert f["stroma_est"][2] > 0.8 and f["stroma_est_wide"][2] > 0.8
    assert f["lymph_per_stroma_wide"][2] == pytest.approx(f["lymph_per_stroma"][2], abs=0.02)
    assert (f["stroma_est_wide"] <= f["stroma_est"] + 1e-6).all()  # its nests hold the pale rule's
    # the wide block sits right before the last (encoders.WIDE_ARCHS; mil.select's "-wide" column sets)
    assert NAMES[-10:-5] == tuple(f"{n}_wide" for n in NAMES[-5:])


def test_a_nest_crowded_with_lymphocytes_stays_a_nest():
    """Vesicular tumour nuclei with intratumoral lymphocytes packed between them (a fifth of the nest):
    counted over all the tissue, the pale nuclei fall under the nest share and the nest read as stroma
    full of lymphocytes (v7: half the tile "stroma", sTIL 22 %); counted over the tissue that is not
    lymphocyte (v8) it stays a nest, its lymphocytes in ``lymph_per_nest``. Stroma crowded with
    lymphocytes stays stroma (the test above)."""
    from weakstil.embed.morph import PALE_NEST, lymphocyte_room

    tumour = grid(32, 12)
    lymph = disks([(y + dy, x + dx) for y, x in tumour for dy, dx in ((16, 16), (0, 16), (16, 0), (8, 8))], 4.0, 1.6)
    nest = np.maximum(disks(tumour, 9.0, 0.6), lymph)
    assert 0.15 < (lymph > 0).mean() < 0.25 and (disks(tumour, 9.0, 0.6) > 0).mean() < PALE_NEST
    stroma = disks(grid(16), 4.0, 1.6)  # as many lymphocytes, in stroma
    f = features(render(nest, np.full((PX, PX), 0.2)), render(stroma, np.full((PX, PX), 0.6)))
    assert f["stroma_est"][0] < 0.1 and f["stroma_est_wide"][0] < 0.1
    assert f["lymph_per_nest"][0] > 0.15 and f["lymph_per_stroma"][0] < 0.05
    assert f["stroma_est"][1] > 0.8 and f["lymph_per_stroma"][1] > 0.12
    h = torch.as_tensor(lymph[::2, ::2])[None, None].float()  # 1 µm/px, as the encoder looks
    room = lymphocyte_room(h, torch.ones_like(h))
    assert room.mean() > (h >= 1.0).float().mean()  # grown over their rims


def test_the_wide_rule_takes_big_dark_nuclei_for_a_nest():
    """Hyperchromatic tumour nuclei (H 1.6, 15 µm across) are as dark as lymphocytes: both rules read
    their nest as stroma full of lymphocytes up to v8. The wide rule (v9) takes nuclei too big for a
    lymphocyte (:func:`~weakstil.embed.morph.big_nuclei`) for nest nuclei whatever their darkness, and
    never for the lymphocytes' room; lymphocytes in stroma, scattered or packed side by side and
    blurred, stay stroma under both rules."""
    from scipy import ndimage

    nest = disks(grid(36, 12), 15.0, 1.6)
    lymph = disks(grid(20), 6.0, 1.6)
    crowd = ndimage.gaussian_filter(disks([(y, x + 7 * (i % 2)) for i, y in enumerate(range(6, PX, 13))
                                           for x in range(6, PX, 15)], 6.0, 1.8), 1.5)
    f = features(render(nest, np.full((PX, PX), 0.2)), render(lymph, np.full((PX, PX), 0.6)),
                 render(crowd, np.full((PX, PX), 0.5)))
    assert f["stroma_est"][0] > 0.9 and f["lymph_per_stroma"][0] > 0.3  # the pale rule: "stroma"
    assert f["stroma_est_wide"][0] < 0.1 and f["lymph_per_nest_wide"][0] > 0.3
    assert (f["stroma_est_wide"][1:] > 0.9).all() and (f["lymph_per_stroma_wide"][1:] > 0.2).all()


def test_a_lymphocyte_counts_with_its_whole_nucleus_not_its_dark_core():
    """sTIL% counts a lymphocyte's area. Nuclei drawn with a dark core (H 1.5, 4 µm across) in a paler
    body (H 0.8, 7 µm) read as their cores alone up to v9 (a third of their area: generators and
    scanners that render lymphocytes so made the pixel-read sTIL% half the true one on three of the four
    synthetic families, and each family's scale different — docs/accuracy.md, twenty-eighth run). v10
    grows the cores to the nucleus's edge (:func:`~weakstil.embed.morph.lymphocyte_area`), by at most
    LYMPH_GROW, never into pale stroma."""
    from weakstil.embed.morph import LYMPH_EDGE, LYMPH_GROW, _max_filter, lymphocyte_area

    centres = grid(24)
    nucleus, core = (float((disks(centres, r, 1.0) > 0).mean()) for r in (7.0, 4.0))
    rimmed = np.maximum(disks(centres, 7.0, 0.8), disks(centres, 4.0, 1.5))
    f = features(render(rimmed, np.full((PX, PX), 0.6)))
    assert f["lymph_per_stroma"][0] == pytest.approx(nucleus, abs=0.04) and f["lymph_per_stroma"][0] > 2.5 * core
    assert f["lymph_per_stroma_wide"][0] == pytest.approx(nucleus, abs=0.04)
    assert f["lymph_per_stroma_sized"][0] == pytest.approx(nucleus, abs=0.04)
    h = torch.as_tensor(np.maximum(rimmed, 0.1)[::2, ::2])[None, None].float()  # 1 µm/px, as the encoder looks
    area, cores = lymphocyte_area(h, torch.ones_like(h)), (h >= 1.0).float()
    assert (area >= cores).all() and (area <= _max_filter(cores, LYMPH_GROW)).all()
    assert area[h < LYMPH_EDGE].sum() == 0  # stroma between them stays stroma


def test_specks_of_tumour_chromatin_make_no_room_for_lymphocytes():
    """Clumped chromatin reaches lymphocyte darkness in specks 1.5 µm across inside a pale tumour
    nucleus. Up to v10 every dark pixel, grown by ROOM_GROW, was the lymphocytes' room and left out of
    the nest count: the specks took their nuclei with them and a crowded nest of such nuclei read a
    third stroma under the wide rule. v11 reads the wide rule's room on the H blurred by ROOM_SIGMA:
    the specks fade, lymphocytes' cores stay (the nest crowded with lymphocytes and the crowd in stroma
    above still pass). The pale rule, whose nest nuclei are vesicular, keeps its room."""
    rng = np.random.default_rng(0)
    centres = grid(22, 11)
    specks = [(cy + dy, cx + dx) for cy, cx in centres for dy, dx in rng.integers(-6, 7, (4, 2))]
    nest = np.maximum(disks(centres, 9.0, 0.55), disks(specks, 1.5, 1.6))
    f = features(render(nest, np.full((PX, PX), 0.3)))
    assert f["stroma_est_wide"][0] < 0.05  # v10: 0.35


def _fft_blur(x, sigma, pad, mode, ratio=None):
    """The 2-D FFT blur ``gaussian_blurs`` computed before its separable form: padded, one rfft2,
    the Gaussian transfer function (minus the wider one for a DoG), irfft2, cropped."""
    import math

    import torch.nn.functional as F

    h, w = x.shape[-2:]
    xp = F.pad(x, (pad,) * 4, mode=mode)
    fy = torch.fft.fftfreq(xp.shape[-2], dtype=torch.float64)[:, None]
    fx = torch.fft.rfftfreq(xp.shape[-1], dtype=torch.float64)[None, :]
    f2 = (fy.square() + fx.square()) * (2 * math.pi ** 2)
    transfer = torch.exp(-f2 * sigma ** 2) - (torch.exp(-f2 * (sigma * ratio) ** 2) if ratio else 0)
    y = torch.fft.irfft2(torch.fft.rfft2(xp.double()) * transfer, s=xp.shape[-2:])
    return y[..., pad:pad + h, pad:pad + w].float()


@pytest.mark.parametrize("shape, sigmas, ratio, mode", [
    ((3, 2, 112, 112), (8.0,), None, "reflect"),  # the neighbourhood: 9 maps in the morphometry
    ((2, 1, 112, 96), (0.75, 3.3), 1.6, "reflect"),  # a difference of Gaussians, a tile that is not square
    ((2, 1, 20, 30), (8.0,), None, "replicate"),  # narrower than 3 σ: replicated borders
])
def test_the_separable_blur_is_the_fft_blur_it_replaced(shape, sigmas, ratio, mode):
    from weakstil.embed.morph import gaussian_blurs

    x = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    pad = int(np.ceil(3 * max(sigmas) * (ratio or 1.0)))
    for s, y in zip(sigmas, gaussian_blurs(x, sigmas, ratio=ratio)):
        reference = _fft_blur(x, s, pad, mode, ratio)
        assert y.shape == x.shape
        assert torch.allclose(y, reference, atol=2e-6), float((y - reference).abs().max())
    # periodic, not zero-padded: a constant image stays constant up to the border (a DoG is zero)
    flat = gaussian_blurs(torch.ones(shape), sigmas, ratio=ratio)[0]
    assert torch.allclose(flat, torch.zeros(shape) if ratio else torch.ones(shape), atol=1e-5)


def test_a_lymphocyte_sheet_with_some_faint_lymphocytes_is_stroma_under_the_wide_rule(monkeypatch):
    """A dense sheet of lymphocytes (7.5 µm apart, blurred), one in ten fainter than the wide rule's
    darkness bound (H 1.0 against 1.8): the dark ones and their rims are the lymphocytes' room, and the
    faint ones are all that is left. Counted over that sliver of tissue (v11: a floor of 5 % of the
    neighbourhood) they made the sheet a nest; counted over at least half the neighbourhood (v12) they
    are a minority, and the sheet is stroma full of lymphocytes (regions-hard: every slide above 38 %
    sTIL had read its lymphocyte sheets as nests; docs/accuracy.md)."""
    from scipy import ndimage

    from weakstil.embed import morph

    step = 15  # px at 0.5 µm/px: 7.5 µm
    centres = [(y, x + (step // 2) * (i % 2)) for i, y in enumerate(range(6, PX, 13)) for x in range(6, PX, step)]
    faint = np.random.default_rng(0).random(len(centres)) < 0.1
    sheet = np.maximum(disks([c for c, f in zip(centres, faint) if not f], 6.0, 1.8),
                       disks([c for c, f in zip(centres, faint) if f], 6.0, 1.0))
    tile = render(ndimage.gaussian_filter(sheet, 1.5), np.full((PX, PX), 0.5))
    f = features(tile)
    assert f["stroma_est_wide"][0] > 0.7 and f["lymph_per_stroma_wide"][0] > 0.8
    monkeypatch.setattr(morph, "WIDE_MIN_ROOM", morph.MIN_ROOM)  # v11
    assert features(tile)["stroma_est_wide"][0] < 0.2
