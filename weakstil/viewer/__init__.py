"""`weakstil view`: a local web viewer of slides, heatmaps and scores (see ``app.py``, docs/review.md)."""

from weakstil.viewer.app import (
    ViewerConfig,
    check_assets,
    check_bind,
    create_app,
    running_server,
    serve,
)

__all__ = ["ViewerConfig", "check_assets", "check_bind", "create_app", "running_server", "serve"]
