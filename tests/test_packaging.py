"""Packaging: the build hook that puts OpenSeadragon into the package (setup.py), the wheel, and
environment.yml kept in step with pyproject.toml. Offline: the hook is fed local tarballs."""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import io
import json
import re
import subprocess
import sys
import tarfile
import time
import tomllib
import urllib.request
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def hook():
    """setup.py imported as a module (its setup() call runs only as __main__)."""
    spec = importlib.util.spec_from_file_location("weakstil_setup", REPO / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tarball(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _sri(data: bytes) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()


def _lock(tmp_path: Path, tgz: Path, integrity: str) -> Path:
    lock = {"lockfileVersion": 3, "packages": {"node_modules/openseadragon": {
        "version": "9.9.9", "resolved": f"file:{tgz}", "integrity": integrity}}}
    path = tmp_path / "package-lock.json"
    path.write_text(json.dumps(lock))
    return path


FAKE = {"package/build/openseadragon/openseadragon.min.js": b"/* OpenSeadragon fake */",
        "package/build/openseadragon/openseadragon.min.js.map": b"{}",
        "package/build/openseadragon/images/home_rest.png": b"\x89PNG fake",
        "package/LICENSE.txt": b"BSD-3-Clause", "package/src/other.js": b"not wanted"}


def test_the_real_lock_pins_a_registry_tarball_and_sha512(hook):
    pin = hook.locked_package()
    assert pin["resolved"].startswith("https://registry.npmjs.org/openseadragon/-/openseadragon-")
    assert pin["resolved"].endswith(f"-{pin['version']}.tgz") and pin["integrity"].startswith("sha512-")


def test_hook_unpacks_only_the_viewer_files_of_a_verified_tarball(hook, tmp_path):
    data = _tarball(FAKE)
    tgz = tmp_path / "osd.tgz"
    tgz.write_bytes(data)
    dest = tmp_path / "vendor" / "openseadragon"
    hook.vendor_openseadragon(_lock(tmp_path, tgz, _sri(data)), dest, log=lambda _: None)
    files = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())
    assert files == ["LICENSE.txt", "SOURCE.json", "images/home_rest.png", "openseadragon.min.js"]
    assert json.loads((dest / "SOURCE.json").read_text())["version"] == "9.9.9"
    tgz.unlink()  # already there with the same pin: no fetch at all (a wheel built from the sdist)
    hook.vendor_openseadragon(_lock(tmp_path, tgz, _sri(data)), dest, log=lambda _: None)


def test_hook_rejects_a_tarball_whose_integrity_does_not_match(hook, tmp_path):
    data = _tarball(FAKE)
    tgz = tmp_path / "osd.tgz"
    tgz.write_bytes(data)
    tampered = _sri(data + b"x")
    dest = tmp_path / "vendor" / "openseadragon"
    with pytest.raises(hook.VendorError, match="integrity mismatch"):
        hook.vendor_openseadragon(_lock(tmp_path, tgz, tampered), dest, log=lambda _: None)
    assert not dest.exists() and not list(tmp_path.rglob(".osd-*"))  # nothing half-unpacked left behind


def test_hook_refuses_paths_that_leave_the_folder_and_non_https_urls(hook, tmp_path):
    with pytest.raises(hook.VendorError, match="unsafe path"):
        hook.unpack(_tarball({**FAKE, "package/build/openseadragon/images/../../../../x.js": b"x"}),
                    tmp_path / "osd")
    assert not (tmp_path / "osd").exists()
    with pytest.raises(hook.VendorError, match="https"):
        hook.fetch("http://registry.npmjs.org/openseadragon/-/openseadragon-6.1.1.tgz")


# --- environment.yml --------------------------------------------------------------------------------
def _requirements(items) -> dict[str, str]:
    """``{name: version bounds}`` of requirement strings (names lower-case, spaces dropped)."""
    out = {}
    for item in items:
        name, bounds = re.match(r"([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?(.*)", item.replace(" ", "")).groups()
        out[name.lower().replace("_", "-")] = bounds
    return out


def test_environment_yml_lists_the_same_dependencies_as_pyproject():
    import yaml

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = _requirements(project["dependencies"] + project["optional-dependencies"]["dev"])
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    items = []
    for dep in env["dependencies"]:
        items += [i for i in (dep["pip"] if isinstance(dep, dict) else [dep]) if not i.startswith("-")]
    listed = _requirements(items)
    assert listed.pop("python") == ">=" + project["requires-python"].removeprefix(">=")
    listed.pop("pip")
    assert sorted(set(wanted) - set(listed)) == [], "in pyproject.toml but not in environment.yml"
    assert sorted(set(listed) - set(wanted)) == [], "in environment.yml but not in pyproject.toml"
    assert {n: b for n, b in listed.items() if b != wanted[n]} == {}, "different version bounds"


# --- the wheel ----------------------------------------------------------------------------------------
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_wheel_carries_openseadragon_and_its_viewer_serves_it(tmp_path):
    """Build the wheel offline (the source tree already holds the vendored copy), install it without
    dependencies into a fresh venv that borrows this environment's packages, run `weakstil view` with
    no node on PATH. (.ci/check-wheel does the same with a fully clean install.)"""
    from weakstil.viewer.app import OSD_DIR

    if not (OSD_DIR / "openseadragon.min.js").is_file():
        pytest.skip('OpenSeadragon not vendored in the source tree: run `pip install -e ".[dev]"`')
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist"), str(REPO)], check=True)
    (wheel,) = (tmp_path / "dist").glob("weakstil-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "weakstil/viewer/vendor/openseadragon/openseadragon.min.js" in names
    assert "weakstil/viewer/vendor/openseadragon/images/home_rest.png" in names
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next((venv / "lib").glob("python3*/site-packages"))
    borrowed = [p for p in sys.path if p.endswith("site-packages")]
    (site / "borrowed.pth").write_text("\n".join(borrowed) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                    "--target", str(site), str(wheel)], check=True)
    results = tmp_path / "results"
    (results / "slides").mkdir(parents=True)
    port = _free_port()
    env = {"PATH": str(venv / "bin"), "HOME": str(tmp_path)}
    proc = subprocess.Popen([str(venv / "bin" / "python"), "-m", "weakstil", "view", str(results),
                             "--port", str(port)], env=env, cwd=tmp_path)
    try:
        url = f"http://127.0.0.1:{port}/vendor/openseadragon/openseadragon.min.js"
        for _ in range(120):
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    assert response.status == 200 and b"OpenSeadragon" in response.read()[:4000]
                break
            except OSError:
                assert proc.poll() is None, "weakstil view exited"
                time.sleep(0.5)
        else:
            pytest.fail("the viewer did not answer within 60 s")
        origin = subprocess.run([str(venv / "bin" / "python"), "-c", "import weakstil; print(weakstil.__file__)"],
                                env=env, cwd=tmp_path, capture_output=True, text=True, check=True).stdout
        assert str(site) in origin and str(REPO) not in origin
    finally:
        proc.terminate()
        proc.wait(timeout=20)
