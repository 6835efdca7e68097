"""The released open_clip_torch versions the launcher supports, each installed beside the pinned
torch (``pip install --target DIR --no-deps "open_clip_torch[training]==V"``, cached under the
repository's ignored ``data/open_clip_versions/V``) and trained for one short epoch with gap,
gc_aug and separation through the launcher; a version outside the support is refused at startup
with its number named."""
import os
import subprocess
import sys

import pytest

from openclip_structure.data.sources import digits_samples

from openclip_structure.data.writer import write_dataset

from helpers import ROOT, command, logged

CACHE = os.path.join(ROOT, "data", "open_clip_versions")
SUPPORTED = ["3.0.0", "3.1.0", "3.2.0", "3.3.0"]
pytestmark = pytest.mark.slow


def installed(version: str) -> str:
    """DIR with open_clip_torch ``version`` (and open_clip_train) installed; pip runs once per version."""
    target = os.path.join(CACHE, version)
    if not os.path.isfile(os.path.join(target, "open_clip", "version.py")):
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--target", target, "--no-deps",
                               f"open_clip_torch[training]=={version}"], capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            pytest.skip(f"cannot install open_clip_torch {version} from PyPI: {proc.stderr.strip()[-300:]}")
    return target


def env(site: str) -> dict:
    e = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    e["PYTHONPATH"] = os.pathsep.join([site, ROOT])
    e["OMP_NUM_THREADS"] = "1"
    return e


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_dataset(digits_samples()[:120], tmp_path_factory.mktemp("data") / "wds", train_shards=2,
                         val_shards=1)


@pytest.mark.parametrize("version", SUPPORTED)
def test_release_trains_with_gap_gc_aug_and_separation(version, shards, tmp_path):
    site = installed(version)
    argv = ["--train-data", shards["train"]["pattern"], "--dataset-type", "webdataset", "--train-num-samples", "64",
            "--val-data", shards["val"]["pattern"], "--val-num-samples", "24", "--model", "structure-tiny",
            "--batch-size", "32", "--epochs", "1", "--workers", "1", "--lr", "1e-3", "--warmup", "2",
            "--gap-atp-weight", "1", "--gap-cu-weight", "1", "--gc-aug-weight", "0.25", "--sep-weight", "1",
            "--logs", str(tmp_path), "--name", "v"]
    proc = subprocess.run(command(argv), capture_output=True, text=True, env=env(site), cwd=ROOT, timeout=400)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    log = (tmp_path / "v" / "out.log").read_text()
    assert f"openclip-structure: open_clip {version} through the shim" in log
    for key in ("gap_atp_loss", "gap_cu_loss", "gc_aug_loss", "sep_icon_loss"):
        assert len(logged(tmp_path / "v", key)) == 2, key
    assert "modality_gap:" in log and "relative_modality_gap:" in log  # the validation gap metrics
    assert (tmp_path / "v" / "checkpoints" / "structure_heads_epoch_1.pth").exists()


def test_unsupported_release_is_refused_naming_its_version(tmp_path):
    """open_clip 2.x is refused before anything runs (a fake 2.32.0 open_clip in front of the real one)."""
    fake = tmp_path / "site" / "open_clip"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("from .version import __version__\nadd_model_config = lambda path: None\n")
    (fake / "version.py").write_text("__version__ = '2.32.0'\n")
    proc = subprocess.run(command(["--help"]), capture_output=True, text=True, env=env(str(tmp_path / "site")),
                          cwd=ROOT, timeout=120)
    assert proc.returncode != 0
    assert "open_clip_torch 2.32.0" in proc.stderr and "supported are 3.x" in proc.stderr


def test_legacy_training_main_with_the_2x_hook_patch(shards, tmp_path):
    """open_clip 2.24 (module ``training``, ``python -m training.main``) with
    ``openclip_structure/patches/training-2.x-plugins.patch`` applied by ``python -m
    openclip_structure.patch`` (which picks it for the ``training`` layout): the same hooks train gap,
    gc_aug and separation."""
    import shutil

    from test_patch import register_plugin

    source = installed("2.24.0")
    site = tmp_path / "site"
    for name in ("open_clip", "training"):
        shutil.copytree(os.path.join(source, name), site / name, ignore=shutil.ignore_patterns("__pycache__"))
    proc = subprocess.run([sys.executable, "-m", "openclip_structure.patch", "--target", str(site)],
                          capture_output=True, text=True, env=env(ROOT), timeout=60)
    assert proc.returncode == 0 and proc.stdout.startswith("applied"), proc.stdout + proc.stderr
    assert "open_clip_torch 2.24.0, module `training`; training-2.x-plugins.patch" in proc.stdout
    register_plugin(site)
    argv = ["--train-data", shards["train"]["pattern"], "--dataset-type", "webdataset", "--train-num-samples", "64",
            "--val-data", shards["val"]["pattern"], "--val-num-samples", "24", "--model", "structure-tiny",
            "--batch-size", "32", "--epochs", "1", "--workers", "1", "--lr", "1e-3", "--warmup", "2",
            "--gap-atp-weight", "1", "--gc-aug-weight", "0.25", "--sep-weight", "1", "--logs", str(tmp_path),
            "--name", "legacy"]
    proc = subprocess.run([sys.executable, "-m", "training.main"] + argv, capture_output=True, text=True,
                          env=env(str(site)), cwd=str(site), timeout=400)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    log = (tmp_path / "legacy" / "out.log").read_text()
    assert "openclip-structure: open_clip 2.24.0 through open_clip_train's plugin hook" in log
    for key in ("gap_atp_loss", "gc_aug_loss", "sep_icon_loss"):
        assert len(logged(tmp_path / "legacy", key)) == 2, key
    assert "modality_gap:" in log
    assert (tmp_path / "legacy" / "checkpoints" / "structure_heads_epoch_1.pth").exists()
