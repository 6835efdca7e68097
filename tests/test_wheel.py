"""pip: the wheel carries the hook patches and ``python -m openclip_structure.patch``, its open_clip
requirement admits every open_clip of the README's support table, and, installed beside open_clip
3.3.0, 2.24.0 (``pip install --target``, as tests/test_version_matrix.py; skipped with the reason
when pip fails) and the open_clip main snapshot, the launcher's ``--help`` and the patch ``--check``
work from outside the source tree.

Each run is ``python -S`` (no site-packages) in an empty folder, with PYTHONPATH = the installed
wheel, the open_clip under test, and the venv's site-packages less open_clip, open_clip_train and
this package (symlinks): nothing of the repository, and no other open_clip, can be imported."""
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from helpers import ROOT
from test_open_clip_main import SNAPSHOT
from test_version_matrix import installed

pytestmark = pytest.mark.slow
HIDDEN = ("open_clip", "openclip_structure", "__editable__")  # name prefixes left out of the base site


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built offline from a copy of the package sources."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), src / name)
    shutil.copytree(os.path.join(ROOT, "openclip_structure"), src / "openclip_structure",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = (tmp / "dist").glob("openclip_structure-*.whl")
    return path


@pytest.fixture(scope="module")
def wheel_site(wheel, tmp_path_factory) -> Path:
    site = tmp_path_factory.mktemp("wheel-site")
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return site


@pytest.fixture(scope="module")
def base_site(tmp_path_factory) -> Path:
    """The venv's site-packages (torch, webdataset, ...) without any open_clip or this package."""
    site = tmp_path_factory.mktemp("base-site")
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if not entry.name.lower().startswith(HIDDEN) and not entry.name.endswith(".pth"):
            (site / entry.name).symlink_to(entry)
    return site


def open_clip_site(which: str) -> str:
    if which == "main":
        if SNAPSHOT is None:
            pytest.skip("no open_clip main snapshot at ../shared/upstream/open_clip-main")
        return os.path.join(SNAPSHOT, "src")
    return installed(which)  # skips with pip's reason when it cannot install


def outside(args, *path, cwd, timeout=180):
    """``python -S args`` in ``cwd`` with only ``path`` importable."""
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "PYTHONPATH")}
    env["PYTHONPATH"] = os.pathsep.join(map(str, path))
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run([sys.executable, "-S", *args], capture_output=True, text=True, env=env, cwd=str(cwd),
                          timeout=timeout)


def test_wheel_carries_the_patches_the_patch_module_and_a_wide_open_clip_requirement(wheel):
    from packaging.requirements import Requirement

    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        metadata = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        entry_points = z.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    for name in ("patch.py", "integration/hook_patch.py", "integration/unified_diff.py", "data/check.py",
                 "evaluation/evaluator.py", "views/towers.py", "losses/runtime.py",
                 "patches/open_clip_train-3.x-plugins.patch", "patches/training-2.x-plugins.patch", "patches/README.md",
                 "model_configs/structure-tiny.json"):
        assert f"openclip_structure/{name}" in names, name
    assert "open_clip_train.plugins" in entry_points and "openclip_structure.plugin" in entry_points
    (line,) = [line for line in metadata.splitlines() if line.startswith("Requires-Dist: open_clip_torch")]
    requirement = Requirement(line.split(": ", 1)[1])
    assert "training" in requirement.extras
    for version in ("2.16.0", "2.20.0", "2.24.0", "3.0.0", "3.1.0", "3.2.0", "3.3.0", "4.2.0.dev0"):
        # pip keeps an installed pre-release that satisfies the range (open_clip main installed from source)
        assert requirement.specifier.contains(version, prereleases=True), version


@pytest.mark.parametrize("which", ["3.3.0", "2.24.0", "main"])
def test_installed_wheel_beside_open_clip(which, wheel_site, base_site, tmp_path):
    site = open_clip_site(which)
    path = (wheel_site, site, base_site)
    where = outside(["-c", "import open_clip.version as v, openclip_structure, openclip_structure.integration.hook_patch as p; "
                           "print(openclip_structure.__file__); print(v.__version__); print(p.PATCHES)"],
                    *path, cwd=tmp_path)
    assert where.returncode == 0, where.stderr[-3000:]
    module, version, patches = where.stdout.split()
    assert module.startswith(str(wheel_site)) and patches.startswith(str(wheel_site))  # the wheel's, not the repo's
    assert not module.startswith(ROOT)

    help_ = outside(["-m", "openclip_structure.main", "--help"], *path, cwd=tmp_path)
    check = outside(["-m", "openclip_structure.patch", "--check"], *path, cwd=tmp_path)
    if which == "3.3.0":
        assert version == "3.3.0"
        assert help_.returncode == 0 and "--gap-atp-weight" in help_.stdout, help_.stderr[-3000:]
        assert check.returncode == 0, check.stderr
        assert check.stdout.startswith(f"would apply cleanly: {Path(site).resolve() / 'open_clip_train'}")
        assert "open_clip_torch 3.3.0; open_clip_train-3.x-plugins.patch" in check.stdout
    elif which == "2.24.0":
        assert version == "2.24.0"
        # the launcher refuses at startup, names the version and the legacy route
        assert help_.returncode != 0 and "open_clip_torch 2.24.0" in help_.stderr, help_.stderr[-3000:]
        assert "python -m openclip_structure.patch" in help_.stderr and "Traceback" not in help_.stderr
        assert check.returncode == 0, check.stderr
        assert check.stdout.startswith(f"would apply cleanly: {Path(site).resolve() / 'training'}")
        assert "module `training`; training-2.x-plugins.patch" in check.stdout
    else:
        assert version.startswith("4.")
        assert help_.returncode == 0 and "--gap-atp-weight" in help_.stdout, help_.stderr[-3000:]
        assert check.returncode == 1 and "needs no patch" in check.stderr, check.stdout + check.stderr


def test_wheel_patches_legacy_training_main(wheel_site, base_site, tmp_path):
    """Beside open_clip 2.24.0: the wheel's patch module applies the legacy patch to a copy, and the
    plain ``python -m training.main --help`` then lists the plugin's flags (its entry point)."""
    source = open_clip_site("2.24.0")
    site = tmp_path / "site"
    for name in ("open_clip", "training"):
        shutil.copytree(os.path.join(source, name), site / name, ignore=shutil.ignore_patterns("__pycache__"))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    path = (wheel_site, site, base_site)
    applied = outside(["-m", "openclip_structure.patch", "--target", str(site)], *path, cwd=run_dir)
    assert applied.returncode == 0 and applied.stdout.startswith("applied"), applied.stdout + applied.stderr
    help_ = outside(["-m", "training.main", "--help"], *path, cwd=run_dir)
    assert help_.returncode == 0, help_.stderr[-3000:]
    assert "--gap-atp-weight" in help_.stdout and "openclip-structure (modality gap" in help_.stdout
