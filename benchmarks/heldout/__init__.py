"""HOG — a held-out synthetic H&E generator (breast carcinoma, stromal TILs).

Tissue drawn in a way weakstil was never tuned on, to test it out of its own distribution. It is not
a ``weakstil synth`` family and was written without reading weakstil's generators (only
``synth/truth.py`` for the truth format and ``wsi/writer.py`` for the slide file).

``python -m benchmarks.heldout OUT --n 40 --seed S --setting standard|hard --size-um 1200 [--workers 2]``
(or :func:`write_cohort`) writes ``OUT/slides/HOG-NNN.svs`` (Aperio-like pyramidal JPEG TIFF),
``OUT/truth/HOG-NNN.npz``, ``OUT/labels.csv`` (``slide_id,patient_id,stil`` = the noisy pathologist
label; patient = slide), ``OUT/render_log.csv`` (true sTIL, target, label, mpp, render / write seconds)
and ``OUT/DONE``. Deterministic per (seed, index, setting, size): one rng stream
``[seed, index, setting_id, size, 2711]`` for the slide, ``[…, 99]`` for its label. The order and the
number of random draws is part of that contract.

Rendering (explicit geometry, not random-field thresholds, lattices or Voronoi): a ``size`` × 0.8·``size``
µm canvas at 0.5 µm/px in optical density (H, E, red cells), resampled to a scan mpp from {0.25, 0.5,
0.2631} (``scene``, ``stroma``, ``cells``, ``sprites``, ``geometry``):

* tissue: a star polygon (harmonic radius perturbation + jagged high harmonics) + 0-2 fragments;
* fat lobules: star polygons; adipocytes are cells of an anisotropic superellipse metric around
  hard-core centres (curved thin septa), occasional flattened nuclei on the septa;
* invasive ductal tumour: unions of disks along branching random walks (nests, trabeculae / cords,
  irregular clouds), budding satellites, retraction clefts; invasive lobular pattern (~25 % of slides,
  ~35 % of those also ductal): single files and small clusters of round uniform cells (the lymphocyte
  confounder); DCIS (comedo necrosis or cribriform) and normal ducts / lobules as perturbed
  superellipses with a myoepithelial rim; necrosis (~22 % standard, ~45 % hard) deep in large nests;
* vessels: elliptical rings with endothelial / smooth-muscle nuclei and red cells; tapered tears;
* cells: hard-core dart throwing per compartment, each pasting a sprite from per-slide banks
  (ductal nuclei 8-16 µm by grade, vesicular / hyperchromatic, mitoses; lymphocytes 5-7 µm; plasma
  cells; neutrophils, eosinophils; fibroblasts aligned with the collagen);
* collagen: streamlines of an orientation field (wrapping around tumour), wavy, splatted and blurred
  per width class, soft-saturated; myxoid patches; cells displace collagen;
* TILs: intensity = diffuse + tumour-stroma interface + perivascular + 0-6 aggregates / TLS, in stroma;
  hard-core samples pasted until the TIL area reaches the slide's target sTIL (stroma saturates near
  65-70 %); plasma cells 5-30 % of TILs. Intratumoral lymphocytes (in tumour, not counted): most hard
  slides (3-25 % of tumour cells), ~15 % of standard ones (1-5 %).

Truth (before stain / scanner), area fractions per 16 µm pixel over the whole canvas: ``stroma`` =
tissue that is not tumour (invasive or in situ), normal epithelium, fat, necrosis, vessel lumen or
glass (vessel walls and the cells lying in stroma are stroma); ``lymph_in_stroma`` = TIL body area
(lymphocytes + plasma cells) × stroma; ``tumour``, ``fat``, ``tissue``, ``necrosis``, ``vessel_lumen``,
``normal_epithelium``; ``stil`` = 100 · Σ lymph_in_stroma / Σ stroma (= ``stil_from_truth``), ``label``,
``um_per_px`` = 16. Target sTIL: 72 % lognormal (median 4.5 %, σlog 0.75), 28 % 12 + 78·Beta(1, 2),
clipped 0.5-90.

Label (``labels``): truth + N(0, 1 + 0.15·truth); 5 % gross errors (×/÷ 1.5-2); rounded under 10 to 1
(55 %) or 5, above to 5 (60 %) or 10; a 0 with truth ≥ 0.5 becomes 1; clipped 0-100.

Stain and scanner (``stain``): Beer-Lambert with perturbed Macenko-like vectors, lognormal H / E
intensities, 10 % faded, 10 % over-stained, smooth uneven-staining fields, folds (7 %, hard 20 %), pen
marks (8 %, hard 25 %); variable defocus, field vignetting with seams, illumination 238-252, sensor
noise, JPEG quality 80-92 (hard 65-85).

Settings: ``standard`` — tumour 20-60 % of tissue, 1 unit of stain variation; ``hard`` — tumour 10-85 %,
intratumoral lymphocytes in ~80 % of slides, 2× stain variation, more blur / vignetting / noise / tears /
clefts / folds / pen marks / necrosis, lower JPEG quality.
"""

from __future__ import annotations

from .cohort import make_one, write_cohort
from .params import MPPS, SETTINGS, VERSION
from .render import render

__all__ = ["MPPS", "SETTINGS", "VERSION", "make_one", "render", "write_cohort"]
