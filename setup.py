"""Build hook: put the viewer's OpenSeadragon inside every package, without Node.js.

Everything else about the package is in pyproject.toml. This file only adds one step to setuptools'
``build_py`` (wheels and ``pip install -e``) and ``sdist``: before files are collected, it reads the
pin in ``weakstil/viewer/package-lock.json``, downloads that exact tarball from the npm registry (the
lock's ``resolved`` URL), checks it against the lock's ``integrity`` (sha512, as ``npm ci`` does) and
unpacks ``package/build/openseadragon/{openseadragon.min.js, images/}`` and the licence into
``weakstil/viewer/vendor/openseadragon/`` (gitignored: never committed, never loaded from a CDN). A
folder already there with the same pin (``SOURCE.json``) is kept, so a wheel built from the sdist
needs no network. ``WEAKSTIL_OSD_TARBALL=/path/openseadragon-X.tgz`` uses a local copy of the tarball
instead of the registry (it must still match the lock's integrity).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VIEWER = ROOT / "weakstil" / "viewer"
LOCK = VIEWER / "package-lock.json"
VENDOR = VIEWER / "vendor" / "openseadragon"
PACKAGE = "openseadragon"
REGISTRY = "https://registry.npmjs.org"
MEMBERS = ("package/build/openseadragon/openseadragon.min.js", "package/build/openseadragon/images/",
           "package/LICENSE.txt")
TIMEOUT_S = 60


class VendorError(RuntimeError):
    """The pinned OpenSeadragon could not be fetched, verified or unpacked (the build stops)."""


def locked_package(lock_path: Path = LOCK, name: str = PACKAGE) -> dict:
    """``{name, version, resolved, integrity}`` of ``name`` in an npm v2/v3 lock file."""
    lock = json.loads(Path(lock_path).read_text(encoding="utf-8"))
    entry = lock.get("packages", {}).get(f"node_modules/{name}")
    if not entry or "version" not in entry or "integrity" not in entry:
        raise VendorError(f"{lock_path} pins no version and integrity for {name!r}")
    version = entry["version"]
    resolved = entry.get("resolved") or f"{REGISTRY}/{name}/-/{name}-{version}.tgz"
    return {"name": name, "version": version, "resolved": resolved, "integrity": entry["integrity"]}


def check_integrity(data: bytes, integrity: str) -> None:
    """Raise VendorError unless ``data`` matches an SRI string such as ``sha512-<base64>``."""
    algo, _, expected = integrity.partition("-")
    if algo not in ("sha512", "sha384", "sha256"):
        raise VendorError(f"unsupported integrity algorithm {algo!r} in the lock file")
    actual = base64.b64encode(hashlib.new(algo, data).digest()).decode("ascii")
    if actual != expected:
        raise VendorError(f"integrity mismatch for the OpenSeadragon tarball: the lock file says "
                          f"{integrity}, the download is {algo}-{actual}; refusing to package it")


def fetch(url: str) -> bytes:
    """The tarball's bytes: a local file (``WEAKSTIL_OSD_TARBALL``, or a path/file: URL) or a download."""
    local = os.environ.get("WEAKSTIL_OSD_TARBALL")
    if local:
        return Path(local).read_bytes()
    if url.startswith("file:"):
        return Path(url[5:]).read_bytes()
    if not url.startswith("https://"):
        raise VendorError(f"refusing to fetch {url!r}: only https:// registry URLs")
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:  # noqa: S310 (https only)
            return response.read()
    except OSError as exc:
        raise VendorError(f"could not download {url} ({exc}); the build needs the npm registry once, "
                          "or set WEAKSTIL_OSD_TARBALL to a local copy of that file") from exc


def unpack(data: bytes, dest: Path) -> None:
    """Write the viewer's files of the tarball into ``dest`` (replaced atomically by a rename)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".osd-", dir=dest.parent))
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            wanted = [m for m in tar.getmembers()
                      if m.isfile() and (m.name in MEMBERS or m.name.startswith(MEMBERS[1]))]
            for member in wanted:
                rel = member.name.removeprefix("package/build/openseadragon/").removeprefix("package/")
                if ".." in Path(rel).parts or Path(rel).is_absolute():
                    raise VendorError(f"unsafe path in the tarball: {member.name!r}")
                out = staging / rel
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(tar.extractfile(member).read())
        if not (staging / "openseadragon.min.js").is_file():
            raise VendorError("the tarball holds no build/openseadragon/openseadragon.min.js")
        if dest.exists():
            shutil.rmtree(dest)
        staging.rename(dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def vendor_openseadragon(lock_path: Path = LOCK, dest: Path = VENDOR, *, log=print) -> Path:
    """Make ``dest`` hold the OpenSeadragon pinned by ``lock_path`` (no-op when it already does)."""
    pin = locked_package(lock_path)
    stamp = dest / "SOURCE.json"
    if stamp.is_file() and (dest / "openseadragon.min.js").is_file():
        try:
            if json.loads(stamp.read_text(encoding="utf-8")).get("integrity") == pin["integrity"]:
                return dest
        except ValueError:
            pass  # a damaged stamp: fetch again
    log(f"weakstil build: fetching {pin['name']} {pin['version']} from {pin['resolved']}")
    data = fetch(pin["resolved"])
    check_integrity(data, pin["integrity"])
    unpack(data, dest)
    stamp.write_text(json.dumps(pin, indent=1) + "\n", encoding="utf-8")
    return dest


if __name__ == "__main__":
    from setuptools import setup
    from setuptools.command.build_py import build_py
    from setuptools.command.sdist import sdist

    class BuildPyWithViewer(build_py):
        def run(self):
            vendor_openseadragon()
            super().run()

    class SdistWithViewer(sdist):
        def run(self):
            vendor_openseadragon()
            super().run()

    setup(cmdclass={"build_py": BuildPyWithViewer, "sdist": SdistWithViewer})
