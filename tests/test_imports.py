"""No import cycle inside the package, counting imports inside functions too (the import graph
is read from the source, so a lazy import that closes a circle fails here)."""
import ast
import os

from helpers import ROOT

PACKAGE = os.path.join(ROOT, "openclip_structure")


def module_graph():
    modules = {}
    for folder, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                name = os.path.relpath(path[:-3], ROOT).replace(os.sep, ".")
                modules[name.removesuffix(".__init__")] = path
    graph = {m: set() for m in modules}
    for name, path in modules.items():
        package = name if path.endswith("__init__.py") else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
                targets = ([base] if node.module else []) + [f"{base}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def cycles(graph):
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle_in_the_package():
    graph = module_graph()
    assert "openclip_structure.integration.shim" in graph and graph["openclip_structure.main"]
    assert cycles(graph) == []


# ---- no process-wide side effect at import ---------------------------------------------------

FILTER_PROBE = r"""
import importlib, inspect, json, os, sys, warnings
root = sys.argv[1]
installed = []
def recorder(original):
    def record(*a, **kw):
        frame = inspect.currentframe().f_back
        installed.append(os.path.abspath(frame.f_code.co_filename))
        return original(*a, **kw)
    return record
warnings.filterwarnings = recorder(warnings.filterwarnings)
warnings.simplefilter = recorder(warnings.simplefilter)
failed = {}
for name in sys.argv[2:]:
    try:
        importlib.import_module(name)
    except Exception as e:  # a module that needs another open_clip: reported, not hidden
        failed[name] = repr(e)
ours = sorted({f for f in installed if f.startswith(root + os.sep)})
print(json.dumps({"ours": ours, "failed": failed}))
"""


def _filters_installed_by_importing(package_dir, modules, root):
    import json
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", FILTER_PROBE, package_dir] + modules, capture_output=True,
                          text=True, timeout=300, cwd=root, env={**os.environ, "PYTHONPATH": root})
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_filter_probe_sees_a_module_that_installs_a_filter(tmp_path):
    pkg = tmp_path / "noisy"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "loud.py").write_text("import warnings\nwarnings.filterwarnings('ignore', message='x')\n")
    got = _filters_installed_by_importing(str(pkg), ["noisy.loud"], str(tmp_path))
    assert got["ours"] == [str(pkg / "loud.py")]


def test_importing_every_module_of_the_package_adds_no_warnings_filter():
    """No module of the package installs a process-wide ``warnings`` filter when imported (the
    other libraries and the user's code share the process); scoped ``catch_warnings`` is fine."""
    modules = sorted(m for m in module_graph() if m != "openclip_structure.evaluation.plots" or _has("matplotlib"))
    got = _filters_installed_by_importing(PACKAGE, modules, ROOT)
    assert got["ours"] == [], got["ours"]
    assert set(got["failed"]) <= {"openclip_structure.views.audio"}, got["failed"]


def _has(name):
    import importlib.util

    return importlib.util.find_spec(name) is not None
