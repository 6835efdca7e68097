#!/usr/bin/env python
"""Apply (or check, or revert) open_clip_train's generic plugin hook.

    python scripts/apply_open_clip_patch.py            # patch the installed open_clip_train
    python scripts/apply_open_clip_patch.py --check    # dry run: report the state, change nothing
    python scripts/apply_open_clip_patch.py --revert   # undo
    python scripts/apply_open_clip_patch.py --target DIR   # DIR contains open_clip_train/
                                                       # (site-packages, or an open_clip src/)

The patch (``patches/open_clip_train-3.x-plugins.patch``) is for open_clip_torch 3.x; other
versions are refused (``--force`` skips the version check, the hunks must still match exactly).
It is applied with the ``patch`` program when there is one, else with the small unified-diff
applier below; either way every hunk must match (no fuzz) or nothing is changed. Applying twice
reports "already applied"; exit status 0 = done / nothing to do, 1 = refused.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PATCH = ROOT / "patches" / "open_clip_train-3.x-plugins.patch"
LEGACY_PATCH = ROOT / "patches" / "training-2.x-plugins.patch"
PACKAGE = "open_clip_train"
SUPPORTED_MAJOR = 3
#: versions outside 3.x that the 3.x patch was checked to apply to (usable with --force)
ALSO_APPLIES: Tuple[str, ...] = ()  # (2.32.0 took the earlier, smaller patch; not this one)


class Refused(Exception):
    """The patch cannot be applied / reverted here; the message says why."""


# ---------------------------------------------------------------- unified diff parsing & applying
@dataclass
class Hunk:
    old_start: int
    new_start: int
    lines: List[str]  # each with its leading ' ', '-' or '+'

    def side(self, reverse: bool) -> Tuple[int, List[str], List[str]]:
        """(1-based start, lines to find, lines to put) for applying forward or in reverse."""
        old = [line[1:] for line in self.lines if line[0] in " -"]
        new = [line[1:] for line in self.lines if line[0] in " +"]
        return (self.new_start, new, old) if reverse else (self.old_start, old, new)


@dataclass
class FilePatch:
    path: str  # relative to the target directory (after stripping a/ and b/)
    creates: bool = False
    deletes: bool = False
    hunks: List[Hunk] = field(default_factory=list)


_HUNK = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")


def _strip(path: str) -> Optional[str]:
    path = path.split("\t")[0].strip()
    if path == "/dev/null":
        return None
    return path.split("/", 1)[1] if "/" in path else path  # -p1


def parse_patch(text: str) -> List[FilePatch]:
    lines = text.splitlines(keepends=True)
    files: List[FilePatch] = []
    i = 0
    while i < len(lines):
        if not (lines[i].startswith("--- ") and i + 1 < len(lines) and lines[i + 1].startswith("+++ ")):
            i += 1
            continue
        old, new = _strip(lines[i][4:]), _strip(lines[i + 1][4:])
        fp = FilePatch(path=new or old, creates=old is None, deletes=new is None)
        files.append(fp)
        i += 2
        while i < len(lines) and lines[i].startswith("@@"):
            m = _HUNK.match(lines[i])
            if not m:
                raise ValueError(f"bad hunk header: {lines[i]!r}")
            old_n = 1 if m.group(2) is None else int(m.group(2))
            new_n = 1 if m.group(4) is None else int(m.group(4))
            hunk = Hunk(int(m.group(1)), int(m.group(3)), [])
            i += 1
            while old_n > 0 or new_n > 0:
                if i >= len(lines):
                    raise ValueError(f"{fp.path}: truncated hunk")
                line = lines[i]
                if line.startswith("\\"):  # "\ No newline at end of file"
                    hunk.lines[-1] = hunk.lines[-1].rstrip("\r\n")
                    i += 1
                    continue
                tag = line[0] if line not in ("\n", "\r\n") else " "
                if line in ("\n", "\r\n"):
                    line = " " + line
                if tag not in " -+":
                    raise ValueError(f"{fp.path}: bad hunk line {line!r}")
                hunk.lines.append(line)
                old_n -= tag in " -"
                new_n -= tag in " +"
                i += 1
            if i < len(lines) and lines[i].startswith("\\"):
                hunk.lines[-1] = hunk.lines[-1].rstrip("\r\n")
                i += 1
            fp.hunks.append(hunk)
    if not files:
        raise ValueError("no file in the patch")
    return files


def apply_hunks(lines: List[str], hunks: List[Hunk], reverse: bool = False) -> List[str]:
    """``lines`` with the hunks applied; every hunk must match exactly (its position may move,
    nearest match first), else ValueError naming the hunk."""
    out: List[str] = []
    pos, offset = 0, 0
    for n, hunk in enumerate(hunks, 1):
        start, find, put = hunk.side(reverse)
        want = (start if not find else start - 1) + offset
        candidates = sorted(range(pos, len(lines) - len(find) + 1), key=lambda k: (abs(k - want), k))
        at = next((k for k in candidates if lines[k:k + len(find)] == find), None)
        if at is None:
            first = next((line.rstrip("\n") for line in find if line.strip()), "")
            raise ValueError(f"hunk #{n} (near line {start}) does not match: expected {len(find)} lines "
                             f"starting around {first!r}")
        out += lines[pos:at] + put
        pos, offset = at + len(find), at - (start if not find else start - 1)
    return out + lines[pos:]


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


def patch_state(target: Path, files: List[FilePatch]) -> str:
    """'clean' (not applied), 'applied'; raises Refused for anything else."""
    states = {fp.path: file_state(target, fp) for fp in files}
    bad = [reason for state, reason in states.values() if state == "bad"]
    if bad:
        raise Refused("the patch does not match these files (modified, or another open_clip version):\n  "
                      + "\n  ".join(bad))
    if all(state == "patched" for state, _ in states.values()):
        return "applied"
    edited = [fp for fp in files if not fp.creates]
    # a file the patch creates may be left over from an earlier install: identical, so harmless
    if all(states[fp.path][0] == "clean" for fp in edited):
        return "clean"
    raise Refused("the patch is partly applied: patched " + ", ".join(
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
    if target is not None:
        path = Path(target).resolve()
        if path.name == PACKAGE and (path / "main.py").exists():  # the package folder itself
            path = path.parent
        if not path.is_dir():
            raise Refused(f"--target {target}: not a directory")
        return path
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        legacy = importlib.util.find_spec("training")
        hint = (" (found the 2.x module `training`: see the legacy route in patches/README.md)"
                if legacy is not None else "")
        raise Refused(f"no installed `{PACKAGE}` package in this Python ({sys.executable}){hint}; "
                      "install open_clip_torch[training]>=3 or give --target DIR")
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


def check_version(target: Path, force: bool) -> str:
    if not (target / PACKAGE / "main.py").exists():
        if (target / "training" / "main.py").exists():
            raise Refused(f"{target} holds open_clip 2.x's `training` module (open_clip_torch 2.6 - 2.24), not "
                          f"`{PACKAGE}`: this patch is for open_clip_torch 3.x. For 2.16 - 2.24 apply "
                          f"{LEGACY_PATCH.relative_to(ROOT)} by hand: cd {target} && patch -p1 < {LEGACY_PATCH} "
                          "(see patches/README.md, 'Legacy route').")
        raise Refused(f"{target} has no {PACKAGE}/main.py: give --target the directory that contains "
                      f"{PACKAGE}/ (site-packages, or an open_clip checkout's src/)")
    version, where = detect_version(target)
    if version is None:
        return "version unknown (no open_clip/version.py or open_clip_torch-*.dist-info next to it); " \
               "relying on the exact hunk check"
    major = version.split(".")[0]
    if major != str(SUPPORTED_MAJOR):
        if force:
            return f"open_clip_torch {version} (from {where}); --force: version check skipped"
        if major == "2" and version not in ALSO_APPLIES:
            extra = (f" open_clip 2.x up to 2.24 ships the module `training`: use "
                     f"{LEGACY_PATCH.relative_to(ROOT)} (patches/README.md, 'Legacy route'); 2.26 - 2.32 "
                     "ship an older open_clip_train: upgrade to open_clip_torch 3.x, or try --force "
                     "(the hunks must still match).")
        elif version in ALSO_APPLIES:
            extra = f" The patch was checked to apply to {version} too: rerun with --force to use it."
        else:
            extra = ""
        raise Refused(f"open_clip_torch {version} (from {where}) is not supported: this patch is for "
                      f"open_clip_torch {SUPPORTED_MAJOR}.x.{extra}")
    return f"open_clip_torch {version}"


# ------------------------------------------------------------------------------------------ main
def run(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", help=f"directory containing {PACKAGE}/ (default: the installed one)")
    p.add_argument("--check", action="store_true", help="dry run: report what would happen, change nothing")
    p.add_argument("--revert", action="store_true", help="undo the patch")
    p.add_argument("--force", action="store_true", help="skip the open_clip version check (hunks must still match)")
    p.add_argument("--patch", default=str(DEFAULT_PATCH), help="the patch file (default: %(default)s)")
    p.add_argument("--python-applier", action="store_true",
                   help="use the built-in applier even when the `patch` program is available")
    a = p.parse_args(argv)
    try:
        target = find_target(a.target)
        about = check_version(target, a.force)
        where = f"{target / PACKAGE} ({about})"
        files = parse_patch(Path(a.patch).read_text())
        state = patch_state(target, files)
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
            binary_apply(target, Path(a.patch), a.revert)
        else:
            python_apply(target, files, a.revert)
        if a.revert:  # drop the compiled module of a file the patch had created
            for fp in files:
                if fp.creates:
                    for pyc in (target / fp.path).parent.glob(f"__pycache__/{Path(fp.path).stem}.*.pyc"):
                        pyc.unlink()
        expected = "clean" if a.revert else "applied"
        if patch_state(target, files) != expected:
            raise Refused(f"after {verb}ing, the files are not in the expected state; check {target / PACKAGE}")
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


if __name__ == "__main__":
    sys.exit(run())
