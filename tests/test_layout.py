"""fastdpo.kernels (the top-level kernels/ folder) imports in all four install layouts.

Regular and editable installs, each run from the repository root (where ./fastdpo shadows an installed copy,
as `python -m pytest` does) and from elsewhere. Wheels are built from a copy of the package sources with
setuptools' own build hooks and unpacked into a private site directory; the child interpreter runs with -S so
that this environment's own (editable) install of fastdpo cannot be picked up by accident.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PROBE = textwrap.dedent(
    """
    import json, site, sys
    site_packages, wheel_site = sys.argv[1], sys.argv[2]
    site.addsitedir(wheel_site)         # processes the editable wheel's .pth (its import finder)
    sys.path.append(site_packages)      # torch and the other dependencies, without their .pth files
    import fastdpo, fastdpo.kernels
    print(json.dumps({"fastdpo": fastdpo.__file__, "kernels": fastdpo.kernels.__file__,
                      "triton_available": fastdpo.kernels.triton_available()}))
    """
)


def build(kind: str, source: Path, out: Path) -> Path:
    hook = "build_wheel" if kind == "regular" else "build_editable"
    code = f"import setuptools.build_meta as b; print(b.{hook}({str(out)!r}))"
    done = subprocess.run([sys.executable, "-c", code], cwd=source, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return out / done.stdout.strip().splitlines()[-1]


def probe(cwd: Path, wheel_site: Path) -> dict:
    site_packages = sysconfig.get_paths()["purelib"]
    done = subprocess.run(
        [sys.executable, "-S", "-c", PROBE, site_packages, str(wheel_site)], cwd=cwd, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["regular", "editable"])
def test_kernels_import_from_repo_root_and_elsewhere(kind, tmp_path):
    source = tmp_path / "repo"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for name in ("fastdpo", "kernels"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    wheel = build(kind, source, tmp_path / "dist")
    wheel_site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(wheel_site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    from_root = probe(source, wheel_site)
    assert Path(from_root["fastdpo"]).parent == source / "fastdpo"  # the shadowing the layout must survive
    assert Path(from_root["kernels"]) == source / "kernels" / "__init__.py"

    if kind == "regular":  # every module of the source tree made it into the wheel (a subpackage left off
        # pyproject's package list would be missing)
        shipped = {p.relative_to(wheel_site).as_posix() for p in wheel_site.rglob("*.py")}
        expected = {
            f"fastdpo/{p.relative_to(source / 'fastdpo').as_posix()}" for p in (source / "fastdpo").rglob("*.py")
        }
        expected |= {
            f"fastdpo/kernels/{p.relative_to(source / 'kernels').as_posix()}"
            for p in (source / "kernels").rglob("*.py")
        }
        assert shipped == expected, sorted(shipped ^ expected)

    from_elsewhere = probe(elsewhere, wheel_site)
    if kind == "regular":
        assert Path(from_elsewhere["kernels"]) == wheel_site / "fastdpo" / "kernels" / "__init__.py"
    else:
        assert Path(from_elsewhere["kernels"]) == source / "kernels" / "__init__.py"
