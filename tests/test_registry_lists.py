"""The term registry is the one list of terms (issue #21): every plugin flag's ``--help`` and the
README's flag table are built from the same registry fields, and the benchmark cases, the GPU
check's expected loss keys, the demo's "all" method and the sweeps take their terms from
:data:`openclip_structure.registry.TERMS`. Fast: nothing trains."""
import argparse
import dataclasses
import os
import subprocess
import sys

import pytest

from openclip_structure import flags, registry
from openclip_structure.registry import TERMS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

EVERY_LOGGED = [key for spec in TERMS for key in spec.logged]


def plugin_helps(parser):
    group = next(g for g in parser._action_groups if g.title == flags.GROUP_TITLE)
    return {a.option_strings[0]: a.help for a in group._group_actions}


def test_every_plugin_flag_help_is_built_from_its_registry_fields():
    helps = plugin_helps(flags.add_arguments(argparse.ArgumentParser()))
    options = flags.all_options()
    assert list(helps) == [o.flag for o, _ in options]
    for option, spec in options:
        assert "help" not in option.kwargs, option.flag  # no second, hand-written text
        assert helps[option.flag] == flags.option_help(option, spec), option.flag
        plain = flags._plain
        if spec is not None and option.flag == spec.flag:
            for part in (spec.name, spec.summary, spec.paper, *spec.logged):
                assert plain(part) in helps[option.flag], (option.flag, part)
        else:
            assert plain(option.text[1:]) in helps[option.flag], option.flag
            if spec is not None:  # a term's option names its term
                assert f"{spec.flag} ({spec.name})" in helps[option.flag], option.flag


def test_help_is_plain_readable_text():
    text = flags.add_arguments(argparse.ArgumentParser(prog="train")).format_help()  # argparse expands %%
    assert text.isascii() and "`" not in text
    assert "Weight of Align-True-Pairs" in text and "0 = off" in text


def test_changing_a_term_field_changes_its_help_and_readme_row(monkeypatch):
    spec = registry.BY_KEY["gc"]
    option = registry.Option("--gc-new-option", dict(default="x"), "a brand-new `option` text")
    changed = dataclasses.replace(spec, summary="a brand-new summary", paper="Someone et al., 2099",
                                  options=(option,))
    monkeypatch.setattr(flags, "TERMS", tuple(changed if s.key == "gc" else s for s in TERMS))
    helps = plugin_helps(flags.add_arguments(argparse.ArgumentParser()))
    assert "a brand-new summary" in helps["--gc-weight"] and "Someone et al., 2099" in helps["--gc-weight"]
    assert helps[option.flag].startswith("A brand-new option text. With --gc-weight (geometric consistency)")
    table = flags.flag_table()
    assert "| `--gc-weight W` | 0 (off) | geometric consistency L_gc: a brand-new summary; Someone et al., 2099;" in table
    assert "a brand-new `option` text |" in table


def test_weight_flags_follow_the_registry():
    assert registry.weight_flags() == []
    assert registry.weight_flags(default=1)[::2] == [s.flag for s in TERMS]
    assert registry.weight_flags({"sep": 0.5, "gap_atp": "{w}"}) == ["--gap-atp-weight", "{w}", "--sep-weight", "0.5"]
    with pytest.raises(KeyError, match="no registry term"):
        registry.weight_flags({"gap": 1})


# ---- scripts --------------------------------------------------------------------------------

def test_bench_losses_cases_cover_every_registry_term():
    import bench_losses_cases

    cases = bench_losses_cases.CASES
    built = {name: [t.name for t in factory()] for name, (factory, _) in cases.items()}
    # each registry term alone (separation: one case per added term, as logged)
    singles = {n for n in bench_losses_cases.SINGLE_TERMS if n not in bench_losses_cases.VARIANTS}
    assert sorted(f"{t}_loss" for n in singles for t in built[n]) == sorted(EVERY_LOGGED)
    assert all(len(built[n]) == 1 and built[n][0] == n for n in singles)
    assert [f"{t}_loss" for t in built["all"]] == EVERY_LOGGED
    assert [f"{t}_loss" for t in built["no-view (gap+gc)"]] == [k for s in TERMS if not s.views for k in s.logged]
    for name, (key, _, _) in bench_losses_cases.VARIANTS.items():
        assert key in registry.BY_KEY and built[name] == [key], name
    # option values are the registry's flag defaults
    sep_temperature = next(o for o in registry.BY_KEY["sep"].options if o.flag == "--sep-temperature")
    (icon,) = cases["sep_icon"][0]()
    assert icon.temperature == sep_temperature.kwargs["default"]
    (bridge,) = cases["bridge"][0]()
    assert bridge.t == registry.BY_KEY["bridge"].options[0].kwargs["default"]


def test_bench_common_imports_without_side_effects():
    code = ("import sys; sys.path.insert(0, 'scripts'); import bench_common; "
            "assert 'torch' not in sys.modules and 'openclip_structure' not in sys.modules; "
            "assert bench_common.median([3.0, float('nan'), 1.0]) == 2.0; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
    for script in ("bench_losses.py", "bench_step.py", "check_precision.py"):
        text = open(os.path.join(ROOT, "scripts", script), encoding="utf-8").read()
        assert "from bench_losses import" not in text, script


def test_gpu_check_expects_the_registry_terms():
    import gpu_check_sections

    terms = gpu_check_sections.train_terms(gpu_check_sections.train_flags())
    assert set(terms) == set(gpu_check_sections.TRAIN_CONFIGS)
    assert terms["plain"] == []
    assert terms["all"] == EVERY_LOGGED
    assert terms["views"] == [k for s in TERMS if s.views for k in s.logged]


def test_demo_all_trains_every_registry_term_but_the_documented_ones():
    import demo

    methods = demo.available_methods()
    parser = flags.add_arguments(argparse.ArgumentParser())
    on = [s.key for s in registry.enabled(parser.parse_args(methods["all"]))]
    assert on == [s.key for s in TERMS if s.key not in demo.LEFT_OUT]
    assert set(on) | set(demo.LEFT_OUT) == {s.key for s in TERMS}
    for key, why in demo.LEFT_OUT.items():  # each exception says why, in the printed description too
        assert key in registry.BY_KEY and len(why) > 40
        assert f"leaves out {key}: {why}" in demo.all_description()
    # the default run (bash scripts/demo.sh): the same methods and flags as the README's results
    assert methods == {
        "baseline": [], "gap": ["--gap-atp-weight", "1", "--gap-cu-weight", "1"], "gc": ["--gc-weight", "0.25"],
        "gc_aug": ["--gc-aug-weight", "0.25"], "bridge": ["--bridge-weight", "1"], "separation": ["--sep-weight", "1"],
        "all": ["--gap-atp-weight", "1", "--gap-cu-weight", "1", "--gc-weight", "0.25", "--gc-aug-weight", "0.25",
                "--bridge-weight", "1", "--sep-weight", "1"]}


def test_every_registry_term_is_swept():
    import sweep

    swept = {f for flags_, _, _ in sweep.SWEEPS.values() for f in flags_}
    assert {s.flag for s in TERMS} <= swept
