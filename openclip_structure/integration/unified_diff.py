"""A unified-diff applier without fuzz (for :mod:`openclip_structure.integration.hook_patch` where there is no
``patch`` program): parse a patch, apply or revert its hunks; every hunk must match exactly (its
position may move, nearest match first)."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import List, Optional, Tuple


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
