"""The README's Layout section is the package tree, one line per module, and the tree keeps the
shape it describes: at most 14 top-level modules, no two modules with the same name."""
import os
import re

from helpers import ROOT

PACKAGE = os.path.join(ROOT, "openclip_structure")
DATA_FOLDERS = {"model_configs", "patches"}  # package data, no modules


def package_modules():
    """Paths (relative to the package) of every module and subpackage, ``__init__.py`` left out."""
    out = set()
    for folder, dirs, files in os.walk(PACKAGE):
        dirs[:] = [d for d in dirs if d != "__pycache__" and d not in DATA_FOLDERS]
        rel = os.path.relpath(folder, PACKAGE)
        if rel != ".":
            out.add(rel + "/")
        out |= {os.path.normpath(os.path.join(rel, f)) for f in files if f.endswith(".py") and f != "__init__.py"}
    return out


def readme_layout():
    """The entries of the Layout block under ``openclip_structure/``, as paths."""
    text = open(os.path.join(ROOT, "README.md")).read()
    block = re.search(r"## Layout\n.*?```\n(.*?)```", text, re.S).group(1)
    entries, stack, inside = set(), [], False
    for line in block.splitlines():
        m = re.match(r"^( *)(\S+)", line)
        if not m:
            continue
        indent, name = len(m.group(1)), m.group(2)
        if indent == 0:
            inside = name == "openclip_structure/"
            continue
        if not inside or not (name.endswith(".py") or name.endswith("/")):
            continue
        depth = indent // 2 - 1
        stack = stack[:depth] + [name]
        if stack[0].rstrip("/") in DATA_FOLDERS:
            continue
        entries.add("".join(stack))
    return entries


def test_the_layout_parser_reads_nesting():
    assert {"losses/", "losses/gap.py", "main.py", "evaluation/evaluator.py"} <= readme_layout()


def test_readme_layout_matches_the_tree():
    tree, readme = package_modules(), readme_layout()
    assert not tree - readme, f"modules missing from the README's Layout: {sorted(tree - readme)}"
    assert not readme - tree, f"README's Layout names modules that do not exist: {sorted(readme - tree)}"


def test_no_two_modules_share_a_name():
    names = {}
    for path in package_modules():
        if path.endswith(".py"):
            names.setdefault(os.path.basename(path)[:-3], []).append(path)
        else:
            names.setdefault(path.rstrip("/").rsplit("/", 1)[-1], []).append(path)
    shared = {k: v for k, v in names.items() if len(v) > 1}
    assert not shared, shared


def test_the_top_level_keeps_at_most_14_modules():
    top = [p for p in package_modules() if "/" not in p]
    assert len(top) <= 14, sorted(top)


def test_the_commands_keep_their_module_names():
    """``python -m openclip_structure.evaluate|export|benchmark_shards|patch`` (the README's commands)
    still run from their top-level entry modules after the move into subpackages."""
    import subprocess
    import sys

    for command, words in (("evaluate", "--pretrained"), ("export", "--checkpoint"),
                           ("benchmark_shards", "--task"), ("patch", "--check")):
        proc = subprocess.run([sys.executable, "-m", f"openclip_structure.{command}", "--help"], capture_output=True,
                              text=True, timeout=120, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
        assert proc.returncode == 0 and words in proc.stdout, (command, proc.stdout[-500:], proc.stderr[-1500:])
