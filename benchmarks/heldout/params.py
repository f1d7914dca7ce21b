"""Constants of the HOG generator: version tag, render grid, settings, scan mpps, scene label codes."""

from __future__ import annotations

from weakstil.synth.truth import TRUTH_UM

VERSION = "hog-1"
RU = 0.5  # render resolution, µm per pixel
CG = 2.0  # coarse grid for fields, µm per pixel
SETTINGS = {"standard": 1, "hard": 2}  # setting name → id in the rng seed
MPPS = (0.25, 0.5, 0.2631)  # scan resolutions a slide is drawn at (µm per pixel)

# label codes of the render-resolution scene
GLASS, STROMA, TUMOUR, FAT, NECROSIS, LUMEN, NORMAL_EPI = 0, 1, 2, 3, 4, 5, 6

__all__ = ["CG", "FAT", "GLASS", "LUMEN", "MPPS", "NECROSIS", "NORMAL_EPI", "RU", "SETTINGS", "STROMA",
           "TRUTH_UM", "TUMOUR", "VERSION"]
