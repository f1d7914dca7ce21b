"""tiles.geojson: QuPath-importable tile objects in level-0 px with their measurements.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np

from weakstil.fs import atomic_path
from weakstil.outputs.colors import DEFAULT_CMAP, LAYERS, check_tiles, stil_rgb

STIL_MEASUREMENT = "sTIL %"  # QuPath measurement names in tiles.geojson


_UUID_NAMESPACE = uuid.UUID("5a0c8f8e-2b44-4b8e-9a51-7e1c3f0d9a77")


# --- tiles.geojson ----------------------------------------------------------------------------
def tiles_feature_collection(coords_l0, size_l0, prediction, attention=None, *, slide_id: str,
                             cutoff: float = 30.0, contribution=None, cmap: str = DEFAULT_CMAP) -> dict:
    """QuPath (≥ 0.4) GeoJSON FeatureCollection of tile objects, level-0 px.

    Each feature: a closed square ring [x, x + size_l0] × [y, y + size_l0]; ``objectType: "tile"``
    (QuPath's tile object, a kind of detection); ``classification`` "sTIL high" (≥ cutoff) or
    "sTIL low" with a fixed class colour; ``color`` = the tile's own heatmap colour (QuPath draws the
    object in it); ``measurements`` as a name → number map (the form QuPath ≥ 0.4 writes and reads):
    ``sTIL %`` (0–100), ``attention`` (raw, sums to 1), ``relative attention`` (N × attention, 1 =
    uniform) and ``contribution`` (sTIL% points, sums to the slide score). Missing values are left out.
    """
    coords, size, pred, extra = check_tiles(coords_l0, size_l0, prediction,
                                            attention=attention, contribution=contribution)
    tile_rgb = stil_rgb(pred, cmap)
    class_rgb = {name: stil_rgb([value], cmap)[0].tolist() for name, value in (("sTIL high", 100.0),
                                                                                ("sTIL low", 0.0))}
    attention, contribution = extra["attention"], extra["contribution"]
    relative = LAYERS["attention"].shown(attention) if attention is not None else None
    features = []
    for i, (x, y) in enumerate(coords.tolist()):
        x1, y1 = round(x + size, 2), round(y + size, 2)
        props: dict = {"objectType": "tile", "isLocked": True}
        measurements = {}
        if np.isfinite(pred[i]):
            name = "sTIL high" if pred[i] >= cutoff else "sTIL low"
            props["classification"] = {"name": name, "color": class_rgb[name]}
            props["color"] = tile_rgb[i].tolist()
            measurements[STIL_MEASUREMENT] = round(float(pred[i]), 4)
        for key, values in (("attention", attention), ("relative attention", relative),
                            ("contribution", contribution)):
            if values is not None and np.isfinite(values[i]):
                measurements[key] = float(values[i])
        props["measurements"] = measurements
        features.append({
            "type": "Feature",
            "id": str(uuid.uuid5(_UUID_NAMESPACE, f"{slide_id}:{x}:{y}")),
            "geometry": {"type": "Polygon",
                         "coordinates": [[[x, y], [x1, y], [x1, y1], [x, y1], [x, y]]]},
            "properties": props,
        })
    return {"type": "FeatureCollection", "features": features,
            "weakstil": {"slide_id": slide_id, "units": "level-0 px", "stil_scale": "0-100",
                         "cutoff": cutoff, "cmap": cmap}}


def tiles_geojson(path, coords_l0, size_l0, prediction, attention=None, *, slide_id: str,
                  cutoff: float = 30.0, contribution=None, cmap: str = DEFAULT_CMAP) -> Path:
    """Write tiles.geojson atomically (see ``tiles_feature_collection``)."""
    collection = tiles_feature_collection(coords_l0, size_l0, prediction, attention, slide_id=slide_id,
                                          cutoff=cutoff, contribution=contribution, cmap=cmap)
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(collection, allow_nan=False, separators=(",", ":")), encoding="utf-8")
    return path
