"""open_clip_train's plugin hook (openclip_structure/patches/open_clip_train-3.x-plugins.patch) and our
plugin in it.

Copies of the installed open_clip_train are patched with ``python -m openclip_structure.patch``
(``--target``): check/apply/revert round trips, refusals, and then ``python -m
open_clip_train.main`` from the patched copy (first on PYTHONPATH) training with the plugin.
"""
import filecmp
import importlib.metadata
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import open_clip_train
from openclip_structure.data.sources import digits_samples
from openclip_structure.data.writer import write_dataset

ROOT = Path(__file__).resolve().parent.parent
INSTALLED = Path(open_clip_train.__file__).resolve().parent
GROUP = "open_clip_train.plugins"
HAVE_PATCH = shutil.which("patch") is not None


def copy_package(dest: Path, version: str = None) -> Path:
    """``dest/open_clip_train`` = the installed package (sources only); with ``version``, a
    minimal ``open_clip_torch-<version>.dist-info`` next to it, as in site-packages."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copytree(INSTALLED, dest / "open_clip_train", ignore=shutil.ignore_patterns("__pycache__"))
    if version is not None:
        info = dest / f"open_clip_torch-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: open_clip_torch\nVersion: {version}\n")
    return dest


def script(*args):
    """``python -m openclip_structure.patch args``."""
    return subprocess.run([sys.executable, "-m", "openclip_structure.patch", *map(str, args)], capture_output=True,
                          text=True, timeout=60, env=env(Path(ROOT)), cwd=str(ROOT))


def tree(path: Path) -> dict:
    """{relative path: bytes} of every file under ``path`` except compiled ones."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file() and "__pycache__" not in p.parts}


def register_plugin(site: Path) -> None:
    """Make the plugin discoverable from ``site`` when the installed metadata lacks the entry point
    (setup.cfg gained it after the editable install)."""
    names = {ep.name for ep in importlib.metadata.entry_points(group=GROUP)}
    if "openclip_structure" in names:
        return
    info = site / "openclip_structure_plugin_test-0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: openclip-structure-plugin-test\nVersion: 0\n")
    (info / "entry_points.txt").write_text(f"[{GROUP}]\nopenclip_structure = openclip_structure.plugin\n")


def env(site: Path) -> dict:
    e = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "PYTHONPATH")}
    e["PYTHONPATH"] = os.pathsep.join([str(site), str(ROOT)])
    return e


def train_main(site: Path, *argv, module="open_clip_train.main", timeout=240):
    """``python -m module argv`` (``module=None``: ``python argv``, a script) with ``site`` first."""
    command = [sys.executable, "-m", module, *argv] if module else [sys.executable, *argv]
    return subprocess.run(command, capture_output=True, text=True, env=env(site), cwd=str(site.parent),
                          timeout=timeout)


@pytest.fixture(scope="module")
def patched_site(tmp_path_factory):
    site = copy_package(tmp_path_factory.mktemp("patched") / "site")
    proc = script("--target", site)
    assert proc.returncode == 0, proc.stderr
    register_plugin(site)
    return site


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    info = write_dataset(digits_samples()[:200], tmp_path_factory.mktemp("data") / "wds",
                         train_shards=2, val_shards=1)
    return info


# ------------------------------------------------------------------------------ the apply script
@pytest.mark.parametrize("applier", [
    pytest.param([], id="patch-program", marks=pytest.mark.skipif(not HAVE_PATCH, reason="no `patch` program")),
    pytest.param(["--python-applier"], id="built-in"),
])
def test_apply_check_revert_round_trip(tmp_path, applier):
    import open_clip

    site = copy_package(tmp_path / "site", version=open_clip.__version__)
    before = tree(site)
    proc = script("--target", site, "--check", *applier)
    assert proc.returncode == 0 and "would apply cleanly" in proc.stdout, proc.stdout + proc.stderr
    assert tree(site) == before  # a dry run

    proc = script("--target", site, *applier)
    assert proc.returncode == 0 and proc.stdout.startswith("applied"), proc.stdout + proc.stderr
    assert f"open_clip_torch {open_clip.__version__}" in proc.stdout
    after = tree(site)
    assert "open_clip_train/plugins.py" in after and after != before
    assert b"plugins.add_arguments(parser)" in after["open_clip_train/params.py"]
    assert b'plugins.wrap("create_loss", create_loss)(args)' in after["open_clip_train/main.py"]
    assert b'plugins.wrap("get_clip_metrics", get_clip_metrics)(' in after["open_clip_train/train.py"]

    for extra in (["--check"], []):  # idempotent
        proc = script("--target", site, *extra, *applier)
        assert proc.returncode == 0 and "already applied" in proc.stdout, proc.stdout + proc.stderr
    assert tree(site) == after

    proc = script("--target", site, "--check", "--revert", *applier)
    assert proc.returncode == 0 and "would revert cleanly" in proc.stdout
    proc = script("--target", site, "--revert", *applier)
    assert proc.returncode == 0 and proc.stdout.startswith("reverted"), proc.stdout + proc.stderr
    assert tree(site) == before  # byte-identical, plugins.py gone
    assert not filecmp.dircmp(site / "open_clip_train", INSTALLED, ignore=["__pycache__"]).diff_files
    proc = script("--target", site, "--revert", *applier)
    assert proc.returncode == 0 and "nothing to revert" in proc.stdout


def test_patch_module_does_not_import_torch():
    """``python -m openclip_structure.patch`` patches open_clip without loading torch (fast, and
    usable where torch is broken)."""
    proc = subprocess.run([sys.executable, "-c", "import sys, openclip_structure.integration.hook_patch as p; "
                           "p.run(['--check']); sys.exit('torch' in sys.modules)"],
                          capture_output=True, text=True, timeout=60, env=env(Path(ROOT)))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_patch_program_and_built_in_applier_agree(tmp_path):
    if not HAVE_PATCH:
        pytest.skip("no `patch` program")
    a, b = copy_package(tmp_path / "a"), copy_package(tmp_path / "b")
    assert script("--target", a).returncode == 0
    assert script("--target", b, "--python-applier").returncode == 0
    assert tree(a) == tree(b)


def test_left_over_plugins_module_is_reused(tmp_path):
    """After a reinstall of open_clip_torch the created module may remain: still applies/reverts."""
    site = copy_package(tmp_path / "site")
    assert script("--target", site).returncode == 0
    plugins_py = (site / "open_clip_train" / "plugins.py").read_bytes()
    shutil.rmtree(site / "open_clip_train")
    copy_package(tmp_path / "fresh")
    shutil.copytree(tmp_path / "fresh" / "open_clip_train", site / "open_clip_train")
    (site / "open_clip_train" / "plugins.py").write_bytes(plugins_py)
    proc = script("--target", site)
    assert proc.returncode == 0 and proc.stdout.startswith("applied"), proc.stdout + proc.stderr
    assert script("--target", site, "--check").stdout.startswith("already applied")


@pytest.mark.parametrize("version", ["2.24.0", "2.32.0", "4.0.0"])
def test_refuses_other_versions(tmp_path, version):
    site = copy_package(tmp_path / "site", version=version)
    before = tree(site)
    proc = script("--target", site)
    assert proc.returncode == 1
    assert f"open_clip_torch {version}" in proc.stderr and "is not supported" in proc.stderr
    assert "3.x" in proc.stderr
    assert tree(site) == before


def test_2x_layout_takes_the_legacy_patch(tmp_path):
    """A ``training/`` folder (open_clip 2.x) is checked against the legacy patch; not one of its
    files here, so it is refused with that patch named and nothing changed."""
    (tmp_path / "training").mkdir()
    (tmp_path / "training" / "main.py").write_text("# open_clip 2.x\n")
    proc = script("--target", tmp_path)
    assert proc.returncode == 1
    assert "the patch training-2.x-plugins.patch does not match" in proc.stderr
    assert (tmp_path / "training" / "main.py").read_text() == "# open_clip 2.x\n"


@pytest.mark.parametrize("version", ["2.6.1", "2.26.1"])
def test_legacy_layout_refuses_versions_outside_2_16_to_2_24(tmp_path, version):
    (tmp_path / "training").mkdir()
    (tmp_path / "training" / "main.py").write_text("# open_clip 2.x\n")
    (tmp_path / "open_clip").mkdir()
    (tmp_path / "open_clip" / "version.py").write_text(f"__version__ = '{version}'\n")
    proc = script("--target", tmp_path, "--check")
    assert proc.returncode == 1
    assert f"open_clip_torch {version}" in proc.stderr and "2.16 - 2.24" in proc.stderr


def test_refuses_a_target_without_open_clip_train(tmp_path):
    proc = script("--target", tmp_path)
    assert proc.returncode == 1 and "no open_clip_train/main.py" in proc.stderr


@pytest.mark.parametrize("applier", [[], ["--python-applier"]])
def test_refuses_modified_files_and_changes_nothing(tmp_path, applier):
    site = copy_package(tmp_path / "site")
    main_py = site / "open_clip_train" / "main.py"
    main_py.write_text(main_py.read_text().replace("    loss = create_loss(args)\n", "    loss = my_loss(args)\n"))
    before = tree(site)
    for extra in (["--check"], []):
        proc = script("--target", site, *extra, *applier)
        assert proc.returncode == 1, proc.stdout
        assert "does not match" in proc.stderr and "open_clip_train/main.py: hunk #12" in proc.stderr
    assert tree(site) == before


def test_refuses_a_partly_applied_patch(tmp_path):
    site = copy_package(tmp_path / "site")
    original_params = (site / "open_clip_train" / "params.py").read_bytes()
    assert script("--target", site).returncode == 0
    (site / "open_clip_train" / "params.py").write_bytes(original_params)
    proc = script("--target", site)
    assert proc.returncode == 1 and "partly applied" in proc.stderr


# ------------------------------------------------------------------------- the patched entrypoint
def test_unpatched_entrypoint_rejects_plugin_flags(tmp_path):
    site = copy_package(tmp_path / "site")
    register_plugin(site)  # registered, but nothing calls it without the patch
    proc = train_main(site, "--gap-atp-weight", "1", timeout=120)
    assert proc.returncode == 2
    assert "unrecognized arguments: --gap-atp-weight 1" in proc.stderr


def test_patched_entrypoint_validates_plugin_flags(patched_site):
    proc = train_main(patched_site, "--gap-schedule", "ramp", timeout=120)
    assert proc.returncode == 2
    assert "--gap-schedule ramp needs --gap-atp-weight or --gap-cu-weight > 0" in proc.stderr


def test_patched_help_lists_plugin_flags_once(patched_site, tmp_path):
    """``--help`` shows the plugin's group, once even with a second registration of the same plugin
    (e.g. the test one plus a reinstall)."""
    extra = tmp_path / "extra-site"
    info = extra / "second_registration-0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: second-registration\nVersion: 0\n")
    (info / "entry_points.txt").write_text(f"[{GROUP}]\nzz_again = openclip_structure.plugin\n")
    e = env(patched_site)
    e["PYTHONPATH"] = os.pathsep.join([e["PYTHONPATH"], str(extra)])
    proc = subprocess.run([sys.executable, "-m", "open_clip_train.main", "--help"], capture_output=True,
                          text=True, env=e, timeout=120)
    assert proc.returncode == 0, proc.stderr  # twice would be an argparse conflict
    assert "--gap-atp-weight" in proc.stdout
    assert proc.stdout.count("openclip-structure (modality gap") == 1


def _train_args(shards, logs, name):
    return ["--train-data", shards["train"]["pattern"], "--dataset-type", "webdataset",
            "--train-num-samples", "128", "--model", "structure-tiny", "--batch-size", "32", "--epochs", "1",
            "--workers", "1", "--lr", "1e-3", "--warmup", "2", "--gap-atp-weight", "1",
            "--logs", str(logs), "--name", name]


@pytest.mark.slow
def test_patched_entrypoint_trains_with_the_plugin(patched_site, shards, tmp_path):
    proc = train_main(patched_site, *_train_args(shards, tmp_path, "p"),
                      "--fixed-temperature", "0.1")
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-5000:])
    log = (tmp_path / "p" / "out.log").read_text()
    assert "Gap_atp_loss" in log
    assert "openclip-structure loss: base ClipLoss, terms {'gap_atp': 1.0}" in log
    assert "Logit Scale: 10.000" in log  # --fixed-temperature: applied by install()'s model hook
    params = (tmp_path / "p" / "params.txt").read_text()
    assert "gap_atp_weight: 1.0" in params


@pytest.mark.slow
def test_launcher_on_a_patched_open_clip_train_does_not_double_patch(patched_site, shards, tmp_path):
    """``python -m openclip_structure.main`` with the hook present: the plugin's hooks stand aside."""
    proc = train_main(patched_site, *_train_args(shards, tmp_path, "l"), module="openclip_structure.main")
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-5000:])
    log = (tmp_path / "l" / "out.log").read_text()
    assert "Gap_atp_loss" in log
    assert log.count("openclip-structure loss:") == 1  # one StructureLoss, not one wrapped in another


# -------------------------------------------------------------------------------- the patch files
def test_patches_are_generic_twins():
    """The 3.x and 2.x patches create the same plugins module; neither names this project."""
    from openclip_structure.integration import unified_diff as tool
    from openclip_structure.integration.hook_patch import PATCHES

    created = {}
    for name, package in (("open_clip_train-3.x-plugins.patch", "open_clip_train"),
                          ("training-2.x-plugins.patch", "training")):
        text = (PATCHES / name).read_text()
        files = tool.parse_patch(text)
        assert {fp.path for fp in files} == {f"{package}/{m}.py" for m in ("main", "params", "plugins", "train")}
        plugins = next(fp for fp in files if fp.creates)
        created[package] = "".join(line[1:] for h in plugins.hunks for line in h.lines)
        added = [line for fp in files for h in fp.hunks for line in h.lines if line[0] == "+"]
        assert not [line for line in added if "openclip" in line.lower() or "structure" in line.lower()]
    assert created["open_clip_train"] == created["training"]


def test_built_in_applier_offsets_and_missing_final_newline():
    from openclip_structure.integration import unified_diff as tool

    patch = ("--- a/x.py\n+++ b/x.py\n@@ -2,3 +2,3 @@\n a\n-b\n+B\n c\n"
             "@@ -8,2 +8,2 @@\n g\n-h\n\\ No newline at end of file\n+H\n\\ No newline at end of file\n")
    (fp,) = tool.parse_patch(patch)
    lines = ["0\n", "extra\n", "x\n", "a\n", "b\n", "c\n", "d\n", "e\n", "f\n", "g\n", "h"]  # shifted by 1
    out = tool.apply_hunks(lines, fp.hunks)
    assert "".join(out) == "0\nextra\nx\na\nB\nc\nd\ne\nf\ng\nH"
    assert tool.apply_hunks(out, fp.hunks, reverse=True) == lines
    with pytest.raises(ValueError, match="hunk #1"):
        tool.apply_hunks(["a\n", "X\n", "c\n"], fp.hunks)
