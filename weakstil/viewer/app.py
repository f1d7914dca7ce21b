"""The `weakstil view` web app (Starlette): ``create_app(config)`` and ``serve(...)``.

Pages: ``/`` the cohort (every slide of ``results/scores.csv``: thumbnail, heatmap, score, label,
status; sortable), ``/slides/<id>`` one slide in OpenSeadragon with the heatmap layers as overlays.
The JSON and image endpoints under ``/api/`` serve them. Only GET and HEAD exist: the viewer never
writes anything.

Safety: it listens on 127.0.0.1 unless told otherwise, and refuses a non-loopback address without
``allow_remote=True`` (there is no login: whoever reaches the port sees every slide). While bound to
loopback it also refuses requests whose ``Host`` is not a loopback name, so a web page cannot reach it
through DNS rebinding. Files are only ever found by listing the folders it was given (see
``results.py``); an unknown id, a ``..`` path, an absolute or encoded path gives 404.

OpenSeadragon is pinned by ``weakstil/viewer/package-lock.json`` and put into the package by the build
(``setup.py`` fetches it from the npm registry and checks its integrity; no Node.js needed) under
``weakstil/viewer/vendor/openseadragon/``; nothing is loaded from a CDN.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import numpy as np

from weakstil.errors import ConfigError, ResultsFileError, WeakstilError
from weakstil.viewer.confined import ConfinedCohort, confine_slides
from weakstil.viewer.deepzoom import DeepZoomGeometry, encode, overlay_tile, slide_tile
from weakstil.viewer.reduced import ReducedLevels
from weakstil.viewer.reduced import thumbnail as reduced_thumbnail
from weakstil.viewer.results import (
    LAYERS,
    REVIEW_FILES,
    discover_slides,
    evaluation,
    find_labels,
    legend,
)

log = logging.getLogger(__name__)

VIEWER_DIR = Path(__file__).resolve().parent
STATIC_DIR = VIEWER_DIR / "static"
OSD_DIR = VIEWER_DIR / "vendor" / "openseadragon"
INSTALL_COMMAND = 'pip install -e ".[dev]"'
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
THUMB_PX = 320
TILE_CACHE_ITEMS = 1024
# OpenSeadragon 6 injects one <style> (no focus outline on touch screens); it is allowed by its hash
OSD_STYLE_HASH = "sha256-9xTiqzfwFaL2SGb1rmr8gysEwVVjIvqWAgmZgqFqpEE="
CSP = (f"default-src 'self'; script-src 'self'; style-src 'self' '{OSD_STYLE_HASH}'; img-src 'self' data: blob:; "
       "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


@dataclass
class ViewerConfig:
    """What `weakstil view` serves and where.

    ``slides_dir``: folder (or file) of the slides; None looks for ``slides/`` beside ``results_dir``.
    ``osd_dir``: OpenSeadragon's build folder (default: the copy the build put in ``weakstil/viewer/vendor``).
    ``check_assets``: refuse to start without OpenSeadragon (tests of the JSON API may turn it off).
    ``labels``: a labels CSV (slide_id,patient_id,stil) for the cohort table; None looks for a
    ``labels.csv`` in or beside ``results_dir``.
    """

    results_dir: Path
    slides_dir: Path | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    allow_remote: bool = False
    backend: str = "auto"
    mpp: float | None = None
    mpp_override: bool = False
    mpp_by_slide: Mapping[str, float] | None = None
    osd_dir: Path = OSD_DIR
    check_assets: bool = True
    cache_dir: Path | None = None  # reduced copies of slides without a pyramid (default: a temp folder)
    labels: Path | None = None  # labels.csv to show beside the scores (default: one in or beside the results)

    @classmethod
    def from_any(cls, config: ViewerConfig | Mapping[str, Any]) -> ViewerConfig:
        if isinstance(config, cls):
            return config
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(config) - names)
        if unknown:
            raise ConfigError(f"unknown viewer option(s): {', '.join(unknown)}",
                              fix=f"use: {', '.join(sorted(names))}")
        return cls(**dict(config))


# --- checks -----------------------------------------------------------------------------------
def is_loopback(host: str) -> bool:
    """True for localhost and loopback IP literals (127.0.0.0/8, ::1); hostnames other than
    ``localhost`` count as not loopback (they may resolve anywhere)."""
    host = host.strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, allow_remote: bool) -> None:
    """Refuse a non-loopback address unless ``allow_remote`` (ConfigError says why and what to do)."""
    if not host or not isinstance(host, str):
        raise ConfigError(f"bad host {host!r}", fix="use --host 127.0.0.1 (the default)")
    if not is_loopback(host) and not allow_remote:
        raise ConfigError(
            f"refusing to listen on {host!r}: the viewer has no login, so anyone who can reach that "
            "address would see every slide and result",
            fix="keep the default --host 127.0.0.1 (reach it from elsewhere through an SSH tunnel: "
                "ssh -L 8000:127.0.0.1:8000 HOST), or pass --allow-remote if you really mean to serve "
                "the network",
        )


def check_assets(osd_dir: Path) -> None:
    """OpenSeadragon must be in the package (the build fetches it; never committed, never from a CDN)."""
    if not (Path(osd_dir) / "openseadragon.min.js").is_file():
        raise ConfigError(
            f"the viewer's JavaScript (OpenSeadragon) is not installed: {osd_dir} has no openseadragon.min.js",
            fix=f"install weakstil from a wheel (`pip install weakstil-*.whl`), or run `{INSTALL_COMMAND}` "
                "again in the source folder: the build fetches the version pinned in "
                "weakstil/viewer/package-lock.json from the npm registry (no Node.js needed)",
        )


def _host_of(header: str) -> str:
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


# --- ASGI guard ---------------------------------------------------------------------------------
class Guard:
    """Outermost middleware: GET/HEAD only, Host check on loopback, no dot segments, safety headers."""

    def __init__(self, app, allowed_hosts: set[str] | None):
        self.app = app
        self.allowed_hosts = allowed_hosts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method = scope.get("method", "GET")
        if method not in ("GET", "HEAD"):
            await _plain(send, 405, b"method not allowed: the viewer is read-only\n", {"allow": "GET, HEAD"})
            return
        if self.allowed_hosts is not None:
            headers = dict(scope.get("headers") or [])
            host = _host_of(headers.get(b"host", b"").decode("latin-1"))
            if host not in self.allowed_hosts:
                await _plain(send, 400, b"bad Host header (the viewer only answers to localhost)\n")
                return
        raw = scope.get("raw_path") or scope.get("path", "").encode()
        decoded = unquote(unquote(raw.decode("latin-1")))
        segments = decoded.split("/")
        if "\\" in decoded or "\x00" in decoded or any(s in (".", "..") for s in segments) or "//" in decoded:
            await _plain(send, 404, b"not found\n")
            return

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                extra = [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer"),
                         (b"x-frame-options", b"DENY"), (b"cross-origin-resource-policy", b"same-origin"),
                         (b"content-security-policy", CSP.encode())]
                message = {**message, "headers": list(message.get("headers", [])) + extra}
            await send(message)

        await self.app(scope, receive, send_with_headers)


async def _plain(send, status: int, body: bytes, headers: dict | None = None) -> None:
    head = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode())]
    head += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body})


class _LRU:
    def __init__(self, maxsize: int):
        self._items: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        self._maxsize = maxsize

    def get(self, key):
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        return None

    def put(self, key, value):
        with self._lock:
            self._items[key] = value
            while len(self._items) > self._maxsize:
                self._items.popitem(last=False)


# --- the app --------------------------------------------------------------------------------------
def create_app(config: ViewerConfig | Mapping[str, Any]):
    """The viewer as an ASGI app. ``config``: a ViewerConfig or a mapping of its fields.

    Raises ConfigError for a non-loopback host without ``allow_remote``, a missing results folder,
    or OpenSeadragon missing from the package (see ``check_assets``).
    """
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.responses import FileResponse, JSONResponse, Response
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    cfg = ViewerConfig.from_any(config)
    check_bind(cfg.host, cfg.allow_remote)
    if cfg.check_assets:
        check_assets(cfg.osd_dir)
    results_dir = Path(cfg.results_dir)
    if not results_dir.is_dir():
        raise ConfigError("the results folder does not exist", path=results_dir,
                          fix="give the folder `weakstil score --out` wrote (it holds scores.csv)")
    if not (results_dir / "scores.csv").is_file() and not (results_dir / "slides").is_dir():
        raise ConfigError("this is not a results folder: it has neither scores.csv nor slides/", path=results_dir,
                          fix="give the folder `weakstil score --out` wrote (it holds scores.csv)")
    slide_paths, slides_dir, how = discover_slides(results_dir, cfg.slides_dir)
    slide_paths = confine_slides(slide_paths, slides_dir)
    open_kwargs = {"backend": cfg.backend, "mpp": cfg.mpp, "mpp_override": cfg.mpp_override,
                   "mpp_by_slide": cfg.mpp_by_slide}
    labels, labels_file = find_labels(results_dir, cfg.labels)
    cohort = ConfinedCohort(results_dir, slide_paths, open_kwargs, labels)
    reduced = ReducedLevels(cfg.cache_dir)  # coarse views of slides without a pyramid (#13)
    tile_cache = _LRU(TILE_CACHE_ITEMS)
    thumbs = _LRU(256)
    log.info("results: %s; slides: %s (%s, %d files)", results_dir, slides_dir, how, len(slide_paths))

    def not_found(what: str = "not found"):
        return HTTPException(status_code=404, detail=what)

    def known(slide_id: str) -> None:
        if not cohort.known(slide_id):
            raise not_found("unknown slide id")

    def row_of(slide_id: str) -> dict:
        row = cohort.row(slide_id)
        if row is None:
            raise not_found("unknown slide id")
        return row

    def slide_handle(slide_id: str):
        known(slide_id)
        path = slide_paths.get(slide_id)
        if path is None:
            raise not_found("the slide file of this id is not in the slides folder")
        return cohort.slides.get(path)

    def geometry(slide_id: str) -> DeepZoomGeometry:
        handle, _ = slide_handle(slide_id)
        return DeepZoomGeometry(*handle.dimensions)

    def public_row(row: dict) -> dict:
        sid = row["slide_id"]
        return {k: v for k, v in row.items() if not k.startswith("_")} | {
            "url": f"/slides/{_quote(sid)}",
            "thumbnail": f"/api/slides/{_quote(sid)}/thumbnail.jpg" if row["has_slide"] else None,
            "heatmap_thumbnail": (f"/api/slides/{_quote(sid)}/heatmap-thumbnail.jpg"
                                  if row["has_slide"] and row["has_tiles"] else None),
        }

    # --- pages ---
    def index(request):
        return FileResponse(STATIC_DIR / "index.html", headers={"cache-control": "no-cache"})

    def slide_page(request):
        known(request.path_params["slide_id"])
        return FileResponse(STATIC_DIR / "slide.html", headers={"cache-control": "no-cache"})

    def favicon(request):
        return FileResponse(STATIC_DIR / "favicon.ico", headers={"cache-control": "max-age=86400"})

    # --- JSON ---
    def api_cohort(request):
        rows = [public_row(r) for r in cohort.rows()]
        return JSONResponse({"results_dir": str(results_dir), "slides_dir": str(slides_dir) if slides_dir else None,
                             "has_label": cohort.has_label(), "slides": rows, "evaluation": evaluation(rows),
                             "labels_file": str(labels_file) if labels_file else None},
                            headers={"cache-control": "no-cache"})

    def api_slide(request):
        sid = request.path_params["slide_id"]
        row = public_row(row_of(sid))
        info: dict[str, Any] = {"slide": row, "layers": [], "files": {}}
        for name in REVIEW_FILES:
            if cohort.review_file(sid, name) is not None:
                info["files"][name] = f"/api/slides/{_quote(sid)}/files/{name}"
        if row["has_slide"]:
            try:
                handle, _ = slide_handle(sid)
            except WeakstilError as exc:  # a damaged slide: say so on the page, keep the rest
                info["slide_error"] = str(exc)
            else:
                w, h = handle.dimensions
                info["image"] = {"width": w, "height": h, "dzi": f"/api/slides/{_quote(sid)}/slide.dzi",
                                 "mpp": handle.mpp if handle.mpp_source != "unknown" else None,
                                 "levels": len(handle.level_dimensions), "backend": handle.backend}
        tiles = cohort.tiles_checked(sid)
        if tiles is not None:
            info["tiles_url"] = f"/api/slides/{_quote(sid)}/tiles.json"
            info["n_tiles"] = len(tiles)
            for layer in LAYERS:
                if np.isfinite(tiles.values[layer]).any():
                    entry = legend(layer)
                    entry["dzi"] = f"/api/slides/{_quote(sid)}/overlay/{layer}.dzi"
                    info["layers"].append(entry)
        return JSONResponse(info, headers={"cache-control": "no-cache"})

    def api_tiles(request):
        sid = request.path_params["slide_id"]
        known(sid)
        tiles = cohort.tiles_checked(sid)
        if tiles is None:
            raise not_found("no tiles.csv for this slide")
        body = json.dumps(tiles.as_json(), separators=(",", ":"), allow_nan=False)
        return Response(body, media_type="application/json", headers={"cache-control": "no-cache"})

    def review_file(request):
        sid, name = request.path_params["slide_id"], request.path_params["name"]
        known(sid)
        path = cohort.review_file(sid, name)
        if path is None:
            raise not_found()
        disposition = "inline" if name.endswith(".png") else "attachment"
        return FileResponse(path, media_type=REVIEW_FILES[name],
                            headers={"cache-control": "no-cache",
                                     "content-disposition": f'{disposition}; filename="{sid}_{name}"'})

    # --- images ---
    def thumbnail(request):
        sid = request.path_params["slide_id"]
        overlay = request.url.path.endswith("heatmap-thumbnail.jpg")
        handle, lock = slide_handle(sid)
        tiles = cohort.tiles_checked(sid) if overlay else None
        if overlay and tiles is None:
            raise not_found("no tiles.csv for this slide")
        key = ("thumb", sid, overlay, tiles.stamp if tiles else None)
        data = thumbs.get(key)
        if data is None:
            base = thumbs.get(("rgb", sid))
            if base is None:
                with lock:
                    base = reduced_thumbnail(handle, THUMB_PX, reduced)
                thumbs.put(("rgb", sid), base)
            image = base
            if overlay:
                from weakstil.outputs.colors import overlay_rgb

                pred = tiles.values["prediction"]
                size = float(np.median(tiles.width)) if len(tiles) else 1.0
                image = overlay_rgb(base, handle.dimensions, np.stack([tiles.x, tiles.y], 1), size, pred, alpha=0.7)
            data = encode(image, "jpeg")
            thumbs.put(key, data)
        return Response(data, media_type="image/jpeg", headers={"cache-control": "no-cache"})

    def slide_dzi(request):
        geo = geometry(request.path_params["slide_id"])
        return Response(geo.dzi_xml("jpeg"), media_type="application/xml")

    def slide_tile_view(request):
        sid = request.path_params["slide_id"]
        level, col, row = (request.path_params[k] for k in ("level", "col", "row"))
        handle, lock = slide_handle(sid)
        geo = DeepZoomGeometry(*handle.dimensions)
        if not geo.has_tile(level, col, row):
            raise not_found("no such tile")
        key = ("slide", str(handle.path), level, col, row)
        data = tile_cache.get(key)
        if data is None:
            with lock:
                pixels = slide_tile(handle, geo, level, col, row, reduced)
            data = encode(pixels, "jpeg")
            tile_cache.put(key, data)
        return Response(data, media_type="image/jpeg", headers={"cache-control": "private, max-age=3600"})

    def overlay_dzi(request):
        sid, layer = request.path_params["slide_id"], request.path_params["layer"]
        if layer not in LAYERS or cohort.tiles_checked(sid) is None:
            raise not_found("no such layer")
        return Response(geometry(sid).dzi_xml("png"), media_type="application/xml")

    def overlay_tile_view(request):
        sid, layer = request.path_params["slide_id"], request.path_params["layer"]
        level, col, row = (request.path_params[k] for k in ("level", "col", "row"))
        if layer not in LAYERS:
            raise not_found("no such layer")
        geo = geometry(sid)
        tiles = cohort.tiles_checked(sid)
        if tiles is None or not geo.has_tile(level, col, row):
            raise not_found("no such tile")
        key = ("overlay", sid, tiles.stamp, layer, level, col, row)
        data = tile_cache.get(key)
        if data is None:
            data = encode(overlay_tile(_layer(tiles, layer), geo, level, col, row), "png")
            tile_cache.put(key, data)
        return Response(data, media_type="image/png", headers={"cache-control": "no-cache"})

    layer_cache = _LRU(64)

    def _layer(tiles, layer):
        key = (tiles.stamp, layer)
        value = layer_cache.get(key)
        if value is None:
            value = tiles.layer(layer)
            layer_cache.put(key, value)
        return value

    def api_model_card(request):
        return JSONResponse(model_card_of(results_dir), headers={"cache-control": "no-cache"})

    api = "/api/slides/{slide_id}"
    routes = [
        Route("/", index),
        Route("/favicon.ico", favicon),
        Route("/slides/{slide_id}", slide_page),
        Route("/api/cohort", api_cohort),
        Route("/api/model-card", api_model_card),
        Route(api, api_slide),
        Route(api + "/tiles.json", api_tiles),
        Route(api + "/thumbnail.jpg", thumbnail),
        Route(api + "/heatmap-thumbnail.jpg", thumbnail),
        Route(api + "/files/{name}", review_file),
        Route(api + "/slide.dzi", slide_dzi),
        Route(api + "/slide_files/{level:int}/{col:int}_{row:int}.jpeg", slide_tile_view),
        Route(api + "/overlay/{layer}.dzi", overlay_dzi),
        Route(api + "/overlay/{layer}_files/{level:int}/{col:int}_{row:int}.png", overlay_tile_view),
        Mount("/static", app=StaticFiles(directory=STATIC_DIR), name="static"),
    ]
    if Path(cfg.osd_dir).is_dir():
        routes.append(Mount("/vendor/openseadragon", app=StaticFiles(directory=cfg.osd_dir), name="osd"))

    async def http_error(request, exc):
        return Response(f"{exc.detail}\n", status_code=exc.status_code, media_type="text/plain; charset=utf-8")

    async def results_file_error(request, exc):
        log.warning("%s: %s", request.url.path, exc)
        return JSONResponse({"error": str(exc), "file": str(exc.path) if exc.path else None, "problem": exc.problem,
                             "fix": exc.fix}, status_code=422, headers={"cache-control": "no-cache"})

    async def slide_error(request, exc):
        log.warning("%s: %s", request.url.path, exc)
        return Response(f"{exc}\n", status_code=500, media_type="text/plain; charset=utf-8")

    async def server_error(request, exc):
        log.exception("error serving %s", request.url.path)
        return Response(f"error: {exc}\n", status_code=500, media_type="text/plain; charset=utf-8")

    @asynccontextmanager
    async def lifespan(app):
        yield
        cohort.close()

    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error, ResultsFileError: results_file_error,
                                                        WeakstilError: slide_error,
                                                        Exception: server_error},
                    lifespan=lifespan)
    app.state.config = cfg
    app.state.cohort = cohort
    allowed = None if cfg.allow_remote else {*LOOPBACK_NAMES, cfg.host.strip("[]").lower()}
    return Guard(app, allowed)


def model_card_of(results_dir: Path) -> dict:
    """The card of the model that scored ``results_dir`` (named by its latest ``runs/*.json``):
    ``{"model", "card", "markdown"}``, with None where there is no run record or no card."""
    from weakstil.mil.card import CARD_MD, read_card

    runs = sorted(Path(results_dir, "runs").glob("*.json"))
    try:
        model = json.loads(runs[-1].read_text(encoding="utf-8")).get("model") if runs else None
    except (OSError, ValueError):
        model = None
    if not model:
        return {"model": None, "card": None, "markdown": None}
    model_dir = Path(model) if Path(model).is_dir() else Path(model).parent
    try:
        markdown = (model_dir / CARD_MD).read_text(encoding="utf-8")
    except OSError:
        markdown = None
    return {"model": str(model), "card": read_card(model_dir), "markdown": markdown}


def _quote(slide_id: str) -> str:
    from urllib.parse import quote

    return quote(slide_id, safe="")


# --- running it -----------------------------------------------------------------------------------
def _uvicorn_server(app, host: str, port: int):
    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                            lifespan="on", server_header=False)
    return uvicorn.Server(config)


@contextmanager
def running_server(app, host: str = "127.0.0.1", port: int = 0, timeout: float = 20.0) -> Iterator[str]:
    """Run ``app`` with uvicorn in a background thread; yield its base URL (``port=0``: a free port)."""
    server = _uvicorn_server(app, host, port)
    thread = threading.Thread(target=server.run, name="weakstil-viewer", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the viewer did not start on {host}:{port}")
        time.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{'[' + host + ']' if ':' in host else host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(timeout)


def serve(results_dir, slides_dir=None, host: str = "127.0.0.1", port: int = 8000, allow_remote: bool = False,
          backend: str = "auto", mpp: float | None = None, open_browser: bool = False, **options) -> None:
    """Run the viewer until Ctrl+C (`weakstil view RESULTS [--slides DIR] [--host] [--port] [--allow-remote]`).

    Extra ``options`` are ViewerConfig fields (``mpp_override``, ``mpp_by_slide``).
    """
    check_bind(host, allow_remote)
    config = ViewerConfig(results_dir=Path(results_dir), slides_dir=Path(slides_dir) if slides_dir else None,
                          host=host, port=port, allow_remote=allow_remote, backend=backend, mpp=mpp, **options)
    app = create_app(config)
    check_port_free(host, port)
    server = _uvicorn_server(app, host, port)
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{port}/"
    print(f"weakstil viewer: {url}  (results: {results_dir}; Ctrl+C stops it)", flush=True)
    if open_browser:
        def _open():
            import webbrowser

            while not server.started and not server.should_exit:
                time.sleep(0.05)
            if server.started:
                webbrowser.open(url)

        threading.Thread(target=_open, daemon=True).start()
    try:
        server.run()
    except SystemExit as exc:  # uvicorn exits on a startup failure it has already logged
        raise ConfigError(f"the viewer could not start on {host}:{port}",
                          fix="see the error above; choose another --port or --host") from exc


def check_port_free(host: str, port: int) -> None:
    """ConfigError now, rather than a uvicorn log line and exit code 3, when the port is taken."""
    import socket

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}",
                          fix="choose another --port (e.g. --port 8001), or stop the program that uses this one") from exc
