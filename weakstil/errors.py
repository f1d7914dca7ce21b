"""The exception hierarchy.

Every error a user can cause is a :class:`WeakstilError` that also subclasses the builtin that
means the same thing (``MissingMppError`` is a ``ValueError``), so callers can catch either.
Messages say what is wrong, with which file, and how to fix it.
"""

from __future__ import annotations

from pathlib import Path


class WeakstilError(Exception):
    """Base class of every error weakstil raises on bad input.

    ``fix`` is the one-line advice shown after the problem; ``path`` the file concerned, if any.
    """

    fix: str = ""

    def __init__(self, message: str, *, fix: str | None = None, path: str | Path | None = None):
        self.problem = message
        if fix is not None:
            self.fix = fix
        self.path = Path(path) if path is not None else None
        where = f"{self.path}: " if self.path is not None else ""
        text = f"{where}{message}"
        if self.fix:
            text += f"\n  fix: {self.fix}"
        super().__init__(text)

    @property
    def reason(self) -> str:
        """Short machine-friendly name of the failure (the class name)."""
        return type(self).__name__


# --- slides -----------------------------------------------------------------------------------
class SlideError(WeakstilError):
    """A slide file cannot be used."""


class SlideNotFoundError(SlideError, FileNotFoundError):
    fix = "check the path; SLIDES may be a folder of slides or a single slide file"


class EmptySlideFileError(SlideError, ValueError):
    fix = "the file has zero bytes (an interrupted copy?); copy the slide again"


class TruncatedSlideError(SlideError, ValueError):
    fix = "the file ends early (an interrupted copy?); copy the slide again and compare its size"


class NotASlideError(SlideError, ValueError):
    fix = "the file is not an image; remove it from the folder or give the right file"


class UnsupportedFormatError(SlideError, ValueError):
    fix = "convert the slide to a pyramidal TIFF (e.g. `vips tiffsave in out.tif --tile --pyramid`)"


class MissingMppError(SlideError, ValueError):
    fix = (
        "the slide does not say its resolution; pass --mpp 0.25 (µm per pixel; 40x scans are ~0.25, "
        "20x ~0.5) or a CSV of slide_id,mpp with --mpp-csv"
    )


class AnisotropicMppError(SlideError, ValueError):
    fix = "x and y resolutions differ; give the intended square pixel size with --mpp or --mpp-csv"


class NoTissueError(SlideError, ValueError):
    fix = "no tile passed the tissue filter; check the QC picture, lower --min-tissue, or check the ROI"


class DuplicateSlideIdError(WeakstilError, ValueError):
    fix = "slide ids are file stems and must be unique; rename one of the files"


class RoiError(WeakstilError, ValueError):
    fix = "export the annotation from QuPath as GeoJSON (File > Export objects as GeoJSON) in level-0 pixels"


# --- encoders ---------------------------------------------------------------------------------
class UnknownEncoderError(WeakstilError, LookupError):
    fix = "run `weakstil encoders` to list the registered names"


class WeightSourceError(WeakstilError, ValueError):
    fix = "give weights as file:/path/to/checkpoint.pth or hf-hub:org/name"


class CheckpointMismatchError(WeakstilError, ValueError):
    fix = "the checkpoint does not fit this encoder; check that --encoder names the right architecture"


# --- feature cache ----------------------------------------------------------------------------
class CacheError(WeakstilError):
    """Problem with a feature cache."""


class CacheNotFoundError(CacheError, FileNotFoundError):
    fix = "run `weakstil extract SLIDES --features DIR` first, or point --features at the right folder"


class CacheMismatchError(CacheError, ValueError):
    fix = "use another --features folder, or the encoder and tiling the cache was made with"


class CacheCorruptError(CacheError, ValueError):
    fix = "delete the named slide group (or the store) and run `weakstil extract` again"


# --- labels, models, config -------------------------------------------------------------------
class LabelsError(WeakstilError, ValueError):
    fix = "correct the rows listed above; the file needs columns slide_id,patient_id,stil (0-100)"


class ModelNotFoundError(WeakstilError, FileNotFoundError):
    fix = "train one with `weakstil train LABELS --name NAME`, or give --model models/NAME"


class ModelMismatchError(WeakstilError, ValueError):
    fix = "score with the encoder and tiling the model was trained on (see models/NAME/config.yaml)"


class ConfigError(WeakstilError, ValueError):
    fix = "check the option names and values in the config file against `weakstil COMMAND --help`"


# --- labels and folds (labels.py) -------------------------------------------------------------
class LabelsNotFoundError(WeakstilError, FileNotFoundError):
    fix = "check the path of the labels CSV (columns slide_id,patient_id,stil[,center])"


class TooFewGroupsError(WeakstilError, ValueError):
    fix = "use fewer folds (--folds N with N at most the number of groups), or add more patients"


# --- training and models (train.py, mil.py) ---------------------------------------------------
class ModelExistsError(WeakstilError, FileExistsError):
    fix = "choose another --name, or pass --overwrite to replace the existing model"


class EmptyBagError(WeakstilError, ValueError):
    fix = "the slide has no tiles in the feature cache; re-extract it or remove it from the labels"


# --- encoder weights (encoders.py) ------------------------------------------------------------
class WeightsNotFoundError(WeakstilError, FileNotFoundError):
    fix = "check the path after file: — it must name a checkpoint file (.pth, .ckpt, .safetensors), not a folder"


class CheckpointReadError(WeakstilError, ValueError):
    fix = "the file is not a readable PyTorch or safetensors checkpoint (an interrupted download?); download it again"


class WeightsDownloadError(WeakstilError, OSError):
    fix = ("check the network, the hf-hub:org/name spelling and access (HF_TOKEN for gated models), "
           "or download the weights by hand and give --weights file:/path")


# --- heatmaps and review outputs --------------------------------------------------------------
class HeatmapInputError(WeakstilError, ValueError):
    fix = (
        "pass per-tile arrays of one length N: coords_l0 (N, 2) level-0 px, size_l0 > 0, prediction "
        "(N,) in sTIL% 0-100 (multiply model outputs in 0-1 by 100; NaN marks a tile without one)"
    )


# --- feature cache (cache.py) -----------------------------------------------------------------
class CacheWriteError(CacheError, ValueError):
    fix = "the features handed to the cache do not fit the slide (rows, shape or values); report it"


class AmbiguousCacheError(CacheError, ValueError):
    fix = "pass --encoder NAME, or point --features at one of the .zarr stores listed"


# --- added with slide.py / slide preflight ----------------------------------------------------
class CorruptSlideError(SlideError, ValueError):
    fix = (
        "the slide's image data cannot be decoded although the file is complete; copy it again, or "
        "re-export it from the scanner software"
    )


class MppCsvError(WeakstilError, ValueError):
    fix = "the file needs a header `slide_id,mpp` and one row per slide with mpp in µm per pixel (e.g. 0.25)"


# --- outputs (score.py) -------------------------------------------------------------------------
class OutputWriteError(WeakstilError, OSError):
    fix = ("check that the output folder exists, is writable and its disk is not full "
           "(`df -h`); choose another one with --out")


class OutputFolderGoneError(WeakstilError, OSError):
    """The folder a batch writes into vanished while it ran; the batch stops at once."""

    fix = ("restore that folder (or point --features / --out at one that exists) and run again; the run "
           "stopped rather than fail every remaining slide the same way, and rerunning skips what is done")


class DiskFullError(WeakstilError, OSError):
    """The disk (or the user's quota) ran out while writing an output (ENOSPC / EDQUOT)."""

    fix = "free some space on that disk (or write the outputs elsewhere with --out/--features), then run again"


class SlidesLeftToOthersError(WeakstilError, RuntimeError):
    """Some slides were locked by another live process and left to it (exit code 3)."""

    fix = ("another weakstil run is working on them: wait for it and run again (or pass --wait); if no "
           "such run exists, delete the lock files named above")
# --- reliability (#13) ---------------------------------------------------------------------------
class ModelCorruptError(WeakstilError, ValueError):
    fix = ("the model file changed after training (a bad copy or disk?); copy the model folder again "
           "from its source, or train it again with `weakstil train`")


class UnsafeOutputPathError(WeakstilError, PermissionError):
    fix = ("a file or folder in the results is a symbolic link that points outside the results folder; "
           "remove the link (or choose another --out) and run again")


class ResultsFileError(WeakstilError, ValueError):
    fix = "the results file is damaged; run `weakstil score` again for this slide (or `weakstil heatmap`)"


# --- encoder folders and pretraining (#16) -------------------------------------------------------
class EncoderFolderError(WeakstilError, ValueError):
    fix = "the folder's encoder.json is damaged or from another tool; pretrain again or restore it from a backup"


class ResumeError(WeakstilError, FileNotFoundError):
    fix = "run without --resume to start afresh, or point --out at the folder of the interrupted run"


class NoPretrainTilesError(WeakstilError, ValueError):
    fix = "check the slides with `weakstil check SLIDES --qc-dir qc/`, or lower --min-tissue"

