"""Apply (or check, or revert) open_clip's generic plugin hook (the patches shipped in this package).

    python -m openclip_structure.patch                # patch the open_clip this Python imports
    python -m openclip_structure.patch --check        # dry run: report the state, change nothing
    python -m openclip_structure.patch --revert       # undo (--check --revert: dry run)
    python -m openclip_structure.patch --target DIR   # DIR contains open_clip_train/ (or training/):
                                                      # site-packages, or an open_clip checkout's src/

The patch follows the layout it finds: ``open_clip_train/`` (open_clip_torch 3.x):
``patches/open_clip_train-3.x-plugins.patch``; ``training/`` (the legacy 2.16 - 2.24):
``patches/training-2.x-plugins.patch``. Other versions are refused (``--force`` skips the version
check; the hunks must still match exactly); open_clip main (4.x dev) needs no patch, the launcher
uses its task API. It is applied with the ``patch`` program when there is one, else with
:mod:`openclip_structure.integration.unified_diff`; either way every hunk must match (no fuzz) or nothing is
changed. Applying twice reports "already applied"; exit status 0 = done / nothing to do, 1 = refused.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from .unified_diff import FilePatch, apply_hunks, parse_patch

PATCHES = Path(__file__).resolve().parent.parent / "patches"
DEFAULT_PATCH = PATCHES / "open_clip_train-3.x-plugins.patch"
LEGACY_PATCH = PATCHES / "training-2.x-plugins.patch"
PACKAGE = "open_clip_train"
LEGACY_PACKAGE = "training"
SUPPORTED_MAJOR = 3
#: the legacy patch's versions (module ``training``), first and last minor of 2.x
LEGACY_MINORS = (16, 24)
COMMAND = "python -m openclip_structure.patch"
GUIDE = PATCHES / "README.md"
#: versions outside 3.x that the 3.x patch was checked to apply to (usable with --force)
ALSO_APPLIES: Tuple[str, ...] = ()  # (2.32.0 took the earlier, smaller patch; not this one)


class Refused(Exception):
    """The patch cannot be applied / reverted here; the message says why."""


def file_state(target: Path, fp: FilePatch) -> Tuple[str, Optional[str]]:
    """('clean' | 'patched' | 'bad', reason) of one file."""
    path = target / fp.path
    if fp.creates or fp.deletes:
        content = "".join(line[1:] for h in fp.hunks for line in h.lines)
        if not path.exists():
            return ("clean", None) if fp.creates else ("patched", None)
        if path.read_text() == content:
            return ("patched", None) if fp.creates else ("clean", None)
        return "bad", f"{fp.path} exists with other content"
    if not path.exists():
        return "bad", f"{fp.path} is missing"
    lines = path.read_text().splitlines(keepends=True)
    errors = []
    for reverse in (False, True):
        try:
            apply_hunks(lines, fp.hunks, reverse)
            errors.append(None)
        except ValueError as e:
            errors.append(str(e))
    if errors[0] is None and errors[1] is None:
        return "bad", f"{fp.path}: the hunks match both unpatched and patched (ambiguous)"
    if errors[0] is None:
        return "clean", None
    if errors[1] is None:
        return "patched", None
    return "bad", f"{fp.path}: {errors[0]}"


def patch_state(target: Path, files: List[FilePatch], patch_name: str = "") -> str:
    """'clean' (not applied), 'applied'; raises Refused for anything else."""
    states = {fp.path: file_state(target, fp) for fp in files}
    bad = [reason for state, reason in states.values() if state == "bad"]
    if bad:
        raise Refused(f"the patch {patch_name} does not match these files (modified, or another open_clip "
                      "version):\n  "
                      + "\n  ".join(bad))
    if all(state == "patched" for state, _ in states.values()):
        return "applied"
    edited = [fp for fp in files if not fp.creates]
    # a file the patch creates may be left over from an earlier install: identical, so harmless
    if all(states[fp.path][0] == "clean" for fp in edited):
        return "clean"
    raise Refused(f"the patch {patch_name} is partly applied: patched " + ", ".join(
        p for p, (s, _) in states.items() if s == "patched") + "; unpatched " + ", ".join(
        p for p, (s, _) in states.items() if s == "clean")
        + ". Reinstall open_clip_torch (pip install --force-reinstall --no-deps open_clip_torch==<version>).")


def python_apply(target: Path, files: List[FilePatch], reverse: bool) -> None:
    """Apply (or revert) with the applier above; all files are computed before any is written."""
    results: Dict[Path, Optional[str]] = {}
    for fp in files:
        path = target / fp.path
        removes = fp.deletes if not reverse else fp.creates
        adds = fp.creates if not reverse else fp.deletes
        if removes:
            results[path] = None
        elif adds:
            if path.exists():
                continue  # identical left-over (checked by patch_state)
            results[path] = "".join(line[1:] for h in fp.hunks for line in h.lines)
        else:
            results[path] = "".join(apply_hunks(path.read_text().splitlines(keepends=True), fp.hunks, reverse))
    for path, text in results.items():
        if text is None:
            path.unlink()
            continue
        mode = path.stat().st_mode if path.exists() else None
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        with os.fdopen(fd, "w", newline="") as f:
            f.write(text)
        if mode is not None:
            os.chmod(tmp, mode & 0o7777)
        else:
            os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def binary_apply(target: Path, patch_file: Path, reverse: bool) -> None:
    """Apply (or revert) with GNU ``patch``: dry run first, no fuzz, no backup or reject files."""
    cmd = ["patch", "-p1", "--batch", "--fuzz=0", "--no-backup-if-mismatch", "--reject-file=-",
           "--silent", "-d", str(target), "-i", str(patch_file)]
    cmd += ["--reverse"] if reverse else ["--forward"]
    for extra in (["--dry-run"], []):
        proc = subprocess.run(cmd + extra, capture_output=True, text=True)
        if proc.returncode != 0:
            raise Refused(f"`{' '.join(cmd + extra)}` failed:\n{proc.stdout}{proc.stderr}")


# ------------------------------------------------------------------------------ target & version
def find_target(target: Optional[str]) -> Path:
    """The directory holding ``open_clip_train/`` (or the legacy ``training/``): ``target``, or the
    one this Python imports."""
    if target is not None:
        path = Path(target).resolve()
        if path.name in (PACKAGE, LEGACY_PACKAGE) and (path / "main.py").exists():  # the package folder itself
            path = path.parent
        if not path.is_dir():
            raise Refused(f"--target {target}: not a directory")
        return path
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        legacy = importlib.util.find_spec(LEGACY_PACKAGE)
        if legacy is not None and legacy.submodule_search_locations:
            site = Path(list(legacy.submodule_search_locations)[0]).resolve().parent
            if (site / "open_clip").is_dir():  # open_clip 2.x's `training`, not some other package of that name
                return site
        raise Refused(f"no installed `{PACKAGE}` (open_clip_torch 3.x) or open_clip 2.x `{LEGACY_PACKAGE}` in this "
                      f"Python ({sys.executable}); install open_clip_torch[training] or give --target DIR")
    return Path(list(spec.submodule_search_locations)[0]).resolve().parent


def detect_version(target: Path) -> Tuple[Optional[str], str]:
    """(open_clip version, where it was read) for the open_clip next to ``target/open_clip_train``."""
    version_py = target / "open_clip" / "version.py"
    if version_py.exists():
        m = re.search(r"__version__\s*=\s*['\"]([^'\"]+)['\"]", version_py.read_text())
        if m:
            return m.group(1), str(version_py)
    for meta in sorted(target.glob("open_clip_torch-*.dist-info/METADATA")):
        m = re.search(r"(?m)^Version:\s*(\S+)", meta.read_text())
        if m:
            return m.group(1), str(meta)
    return None, ""


def _unknown() -> str:
    return ("version unknown (no open_clip/version.py or open_clip_torch-*.dist-info next to it); relying on the "
            "exact hunk check")


def check_version(target: Path, force: bool) -> str:
    """The 3.x layout (``open_clip_train/``): refuses anything but open_clip_torch 3.x."""
    version, where = detect_version(target)
    if version is None:
        return _unknown()
    major = version.split(".")[0]
    if major != str(SUPPORTED_MAJOR):
        if force:
            return f"open_clip_torch {version} (from {where}); --force: version check skipped"
        if major == "2" and version not in ALSO_APPLIES:
            extra = (" 2.26 - 2.32 ship an older open_clip_train: upgrade to open_clip_torch 3.x, or try --force "
                     "(the hunks must still match). Up to 2.24 open_clip ships the module `training`, which "
                     f"{COMMAND} patches with {LEGACY_PATCH.name}.")
        elif version in ALSO_APPLIES:
            extra = f" The patch was checked to apply to {version} too: rerun with --force to use it."
        elif major.isdigit() and int(major) > SUPPORTED_MAJOR:
            extra = (" open_clip main (4.x dev, task API) needs no patch: the launcher `python -m "
                     "openclip_structure.main` hooks its task API.")
        else:
            extra = ""
        raise Refused(f"open_clip_torch {version} (from {where}) is not supported: this patch is for "
                      f"open_clip_torch {SUPPORTED_MAJOR}.x.{extra}")
    return f"open_clip_torch {version}"


def check_legacy_version(target: Path, force: bool) -> str:
    """The legacy layout (``training/``): open_clip_torch 2.16 - 2.24."""
    version, where = detect_version(target)
    if version is None:
        return _unknown()
    numbers = [int(n) for n in re.findall(r"\d+", version)[:2]]
    first, last = LEGACY_MINORS
    if numbers[:1] == [2] and len(numbers) == 2 and first <= numbers[1] <= last:
        return f"open_clip_torch {version}, module `{LEGACY_PACKAGE}`"
    if force:
        return f"open_clip_torch {version} (from {where}), module `{LEGACY_PACKAGE}`; --force: version check skipped"
    raise Refused(f"open_clip_torch {version} (from {where}) is not supported: {LEGACY_PATCH.name} is for the "
                  f"module `{LEGACY_PACKAGE}` of open_clip_torch 2.{first} - 2.{last}. Older 2.x: add the hook by "
                  f"hand ('Legacy route' in {GUIDE}), or upgrade to open_clip_torch 3.x.")


def select_patch(target: Path, force: bool) -> Tuple[Path, str]:
    """(the patch for the layout in ``target``, what was found there)."""
    if (target / PACKAGE / "main.py").exists():
        return DEFAULT_PATCH, check_version(target, force)
    if (target / LEGACY_PACKAGE / "main.py").exists():
        return LEGACY_PATCH, check_legacy_version(target, force)
    raise Refused(f"{target} has no {PACKAGE}/main.py (open_clip_torch 3.x) nor {LEGACY_PACKAGE}/main.py (2.16 - "
                  f"2.24): give --target the directory that contains it (site-packages, or an open_clip "
                  "checkout's src/)")


# ------------------------------------------------------------------------------------------ main
def run(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog=COMMAND, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", help=f"directory containing {PACKAGE}/ or {LEGACY_PACKAGE}/ (default: the installed one)")
    p.add_argument("--check", action="store_true", help="dry run: report what would happen, change nothing")
    p.add_argument("--revert", action="store_true", help="undo the patch")
    p.add_argument("--force", action="store_true", help="skip the open_clip version check (hunks must still match)")
    p.add_argument("--patch", default=None,
                   help=f"the patch file (default: {DEFAULT_PATCH.name} or {LEGACY_PATCH.name} from {PATCHES}, "
                        "by the layout found)")
    p.add_argument("--python-applier", action="store_true",
                   help="use the built-in applier even when the `patch` program is available")
    a = p.parse_args(argv)
    try:
        target = find_target(a.target)
        patch_file, about = select_patch(target, a.force)
        patch_file = Path(a.patch) if a.patch else patch_file
        package = PACKAGE if (target / PACKAGE / "main.py").exists() else LEGACY_PACKAGE
        where = f"{target / package} ({about}; {patch_file.name})"
        files = parse_patch(patch_file.read_text())
        state = patch_state(target, files, patch_file.name)
        if a.revert:
            if state == "clean":
                print(f"not applied, nothing to revert: {where}")
                return 0
        elif state == "applied":
            print(f"already applied: {where}")
            return 0
        verb = "revert" if a.revert else "apply"
        if a.check:
            print(f"would {verb} cleanly: {where}")
            return 0
        orphans = [fp for fp in files if fp.creates and (target / fp.path).exists()]
        use_binary = shutil.which("patch") is not None and not a.python_applier and not (orphans and not a.revert)
        if use_binary:
            binary_apply(target, patch_file, a.revert)
        else:
            python_apply(target, files, a.revert)
        if a.revert:  # drop the compiled module of a file the patch had created
            for fp in files:
                if fp.creates:
                    for pyc in (target / fp.path).parent.glob(f"__pycache__/{Path(fp.path).stem}.*.pyc"):
                        pyc.unlink()
        expected = "clean" if a.revert else "applied"
        if patch_state(target, files, patch_file.name) != expected:
            raise Refused(f"after {verb}ing, the files are not in the expected state; check {target / package}")
        tool = "patch" if use_binary else "built-in applier"
        print(f"{'reverted' if a.revert else 'applied'} ({tool}): {where}")
        return 0
    except Refused as e:
        print(f"refused: {e}", file=sys.stderr)
        return 1
    except PermissionError as e:
        print(f"refused: no permission to write {e.filename}: run with a Python/user that owns that "
              "installation, or use --target on a copy", file=sys.stderr)
        return 1
