"""Packaging (issue #15): one version source, an SPDX license with its LICENSE file, py.typed,
classifiers, the example configs inside the wheel (`xai init` reads them), no setuptools warnings."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from conftest import ROOT

tomllib = pytest.importorskip("tomllib")


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_one_version_source_and_an_spdx_license():
    from xaicli import __version__

    doc = _pyproject()
    assert "version" not in doc["project"] and "version" in doc["project"]["dynamic"]
    assert doc["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "xaicli._version.__version__"}
    assert __version__.count(".") == 2
    assert doc["project"]["license"] == "Apache-2.0"  # an SPDX string, not a table
    assert doc["project"]["license-files"] == ["LICENSE"]
    assert (ROOT / "LICENSE").read_text().lstrip().startswith("Apache License")
    assert "Typing :: Typed" in doc["project"]["classifiers"] and (ROOT / "xaicli" / "py.typed").is_file()


def test_every_package_is_listed():
    listed = set(_pyproject()["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "xaicli").rglob("__init__.py")}
    assert found <= listed and "xaicli.configs" in listed


@pytest.mark.slow
def test_wheel_builds_offline_without_warnings_and_ships_the_configs(tmp_path):
    import setuptools

    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip("needs setuptools >= 77 installed (the build backend pyproject.toml asks for)")
    src = tmp_path / "src"
    shutil.copytree(
        ROOT, src, ignore=shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info", "__pycache__", "xai-out")
    )
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            ".",
            "--no-deps",
            "--no-build-isolation",
            "-v",
            "-w",
            str(tmp_path / "w"),
        ],
        cwd=src,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    log = (r.stdout + r.stderr).lower()
    assert "deprecat" not in log, [ln for ln in log.splitlines() if "deprecat" in ln]
    (whl,) = (tmp_path / "w").glob("xaicli-*.whl")
    names = zipfile.ZipFile(whl).namelist()
    for f in ("xaicli/py.typed", "xaicli/configs/example.yaml", "xaicli/configs/nightly.yaml"):
        assert f in names, f
    assert any(n.endswith("licenses/LICENSE") for n in names)
    # installed from the wheel (no checkout next to it), `xai init` reads the packaged config
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "--target", str(target), str(whl)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    r = subprocess.run(
        [sys.executable, "-m", "xaicli", "init"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0 and "target_fallback" in r.stdout and "path: imgs/" in r.stdout, r.stderr
