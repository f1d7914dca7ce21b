"""One slide, start to finish: scene → cells and textures → truth maps → stain → scanner → label.

:func:`render` runs the stages in the generator's fixed order on one rng stream
(``[seed, index, setting_id, size, 2711]``); the pathologist label has its own stream (``…, 99``).
"""

from __future__ import annotations

import numpy as np

from .cells import (
    clear_glass,
    draw_adipocytes,
    draw_duct_cells,
    draw_necrosis_texture,
    draw_tumour_cells,
    draw_vessel_cells,
)
from .labels import draw_target, pathologist_label
from .params import FAT, GLASS, LUMEN, MPPS, NECROSIS, NORMAL_EPI, SETTINGS, TRUTH_UM, TUMOUR, VERSION
from .scene import Canvas, draw_scene
from .stain import scan, stain
from .stroma import (
    Layers,
    coarse_fields,
    draw_collagen,
    draw_fibroblasts,
    draw_granulocytes,
    draw_tils,
    myxoid_patches,
    orientation_field,
)


def paint(rng, cv, sc, target):
    """Cells and textures, in order: TILs, granulocytes, orientation field, myxoid patches, fibroblasts,
    collagen, vessel cells, tumour cells, duct cells, necrosis, adipocytes, glass.
    Returns (layers, fields, TIL centres, intratumoral lymphocyte centres)."""
    ly = Layers.zeros(cv.shape)
    fl = coarse_fields(cv, sc)
    lpts, lymph_bank = draw_tils(rng, cv, fl, ly, target)
    draw_granulocytes(rng, cv, fl, ly, lpts)
    orientation_field(rng, fl)
    myxoid_patches(rng, cv, fl)
    draw_fibroblasts(rng, cv, fl, ly, lpts)
    draw_collagen(rng, cv, sc, fl, ly)
    draw_vessel_cells(rng, sc, ly)
    intra = draw_tumour_cells(rng, cv, sc, fl, ly, lymph_bank)
    draw_duct_cells(rng, sc, ly)
    draw_necrosis_texture(rng, cv, sc, ly)
    draw_adipocytes(rng, cv, sc, fl, ly)
    clear_glass(sc, ly)
    return ly, fl, lpts, intra


def truth_maps(cv, sc, fl, ly):
    """Area fractions per ``TRUTH_UM`` µm block (before stain / scanner effects) and the true sTIL."""
    H, W, blk = cv.H, cv.W, cv.blk
    lab = sc.lab

    def bmean(a):
        return a.reshape(H // blk, blk, W // blk, blk).mean((1, 3)).astype(np.float32)

    stroma_f = fl.stroma.astype(np.float32)
    stroma_t = bmean(stroma_f)
    lis_t = bmean(ly.Mtil * stroma_f)
    truth = {
        "stroma": stroma_t,
        "lymph_in_stroma": lis_t,
        "tumour": bmean((lab == TUMOUR).astype(np.float32)),
        "fat": bmean((lab == FAT).astype(np.float32)),
        "tissue": bmean((lab != GLASS).astype(np.float32)),
        "necrosis": bmean((lab == NECROSIS).astype(np.float32)),
        "vessel_lumen": bmean((lab == LUMEN).astype(np.float32)),
        "normal_epithelium": bmean((lab == NORMAL_EPI).astype(np.float32)),
        "um_per_px": np.float64(TRUTH_UM),
    }
    ss = float(np.sum(stroma_t, dtype=np.float64))
    stil = 100.0 * float(np.sum(lis_t, dtype=np.float64)) / ss if ss else 0.0
    truth["stil"] = np.float64(stil)
    return truth


def render(seed, idx, setting, size_um):
    """Render slide ``idx``: returns (level-0 RGB uint8, mpp, JPEG quality, truth dict, label, plan dict,
    render-grid label map)."""
    rng = np.random.default_rng([seed, idx, SETTINGS[setting], round(float(size_um)), 2711])
    cv = Canvas.make(setting, size_um)
    mpp = float(MPPS[rng.integers(0, 3)])
    target = draw_target(rng)
    plan = {"version": VERSION, "seed": seed, "index": idx, "setting": setting, "size_um": size_um,
            "mpp": mpp, "target_stil": round(target, 3)}
    sc = draw_scene(rng, cv, plan)
    ly, fl, lpts, intra = paint(rng, cv, sc, target)
    truth = truth_maps(cv, sc, fl, ly)
    plan["n_lymph"] = len(lpts)
    plan["n_intratumoral"] = len(intra)
    img = stain(rng, cv, sc, ly, plan)
    del ly
    out, q = scan(rng, cv, img, mpp)
    plan["jpeg_q"] = q
    stil = float(truth["stil"])
    label = pathologist_label(np.random.default_rng([seed, idx, SETTINGS[setting], round(float(size_um)), 99]), stil)
    truth["label"] = np.float64(label)
    return out, mpp, q, truth, label, plan, sc.lab
