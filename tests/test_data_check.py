"""Data checks before the run: a ``--train-data``/``--val-data`` that names a missing local file is
refused at flag validation (argparse error, exit status 2) with the path named; a shell glob gets
the brace pattern that matches its files; remote sources are left to open_clip."""
import argparse
import re
import subprocess
import time

import pytest

from openclip_structure import plugin
from openclip_structure.data import check as data_check
from openclip_structure import main as launcher
from openclip_structure.data.check import brace_pattern, expand_sources, missing_source
from openclip_structure.errors import FlagError

from helpers import ROOT, command, env


@pytest.fixture
def shards(tmp_path):
    """Eight empty files ``shards/00000.tar .. 00007.tar`` (the check looks at names, not contents)."""
    folder = tmp_path / "shards"
    folder.mkdir()
    for i in range(8):
        (folder / f"{i:05d}.tar").write_bytes(b"")
    return folder


def refused(argv, capsys) -> str:
    """The launcher's parse of ``argv`` exits 2 (an argparse error); its stderr."""
    with pytest.raises(SystemExit) as e:
        launcher.parse_args(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


def test_existing_brace_pattern_and_joined_sources_pass(shards):
    args = launcher.parse_args(["--train-data", f"{shards}/{{00000..00005}}.tar::{shards}/{{00006..00007}}.tar",
                                "--val-data", f"{shards}/00000.tar", "--dataset-type", "webdataset"])
    assert args.train_data.startswith(str(shards))


def test_wrong_brace_range_names_the_first_missing_shard(shards, capsys):
    err = refused(["--train-data", f"{shards}/{{00000..00009}}.tar"], capsys)
    assert f"error: --train-data: '{shards}/00008.tar' (one of the 10 paths of" in err
    assert "00009.tar" not in err  # the first missing one only


def test_missing_val_source_after_the_join(shards, tmp_path, capsys):
    err = refused(["--train-data", f"{shards}/00000.tar",
                   "--val-data", f"{shards}/{{00000..00001}}.tar::{tmp_path}/val/00000.tar"], capsys)
    assert f"error: --val-data: '{tmp_path}/val/00000.tar'" in err and "does not exist" in err
    assert f"nor does its folder '{tmp_path}/val'" in err


def test_shell_glob_gets_the_brace_pattern_that_matches(shards, capsys):
    err = refused(["--train-data", f"{shards}/*.tar"], capsys)
    assert "not shell globs" in err
    suggested = f"{shards}/{{00000..00007}}.tar"
    assert f"--train-data '{suggested}'" in err
    assert launcher.parse_args(["--train-data", suggested]).train_data == suggested  # the suggestion works


def test_glob_that_matches_nothing_says_so(tmp_path, capsys):
    err = refused(["--train-data", f"{tmp_path}/*.tar"], capsys)
    assert "not shell globs" in err and "the glob matches no file either" in err


@pytest.mark.parametrize("source", ["pipe:curl -s https://example.org/{0..3}.tar", "s3://bucket/train-{0..3}.tar",
                                    "https://example.org/shard-{00..09}.tar", "hf://datasets/x/{0..1}.tar"])
def test_remote_sources_are_left_to_open_clip(source):
    assert missing_source("--train-data", source, "webdataset") is None
    assert launcher.parse_args(["--train-data", source]).train_data == source


def test_csv_and_synthetic(tmp_path, capsys):
    err = refused(["--train-data", str(tmp_path / "train.csv"), "--dataset-type", "csv"], capsys)
    assert f"'{tmp_path / 'train.csv'}' does not exist" in err
    (tmp_path / "train.csv").write_text("filepath,title\n")
    assert launcher.parse_args(["--train-data", str(tmp_path / "train.csv")]).dataset_type == "auto"
    assert launcher.parse_args(["--train-data", "nothing.tar", "--dataset-type", "synthetic"]).train_data


def test_a_folder_is_not_a_shard(tmp_path, capsys):
    err = refused(["--train-data", str(tmp_path)], capsys)
    assert "is a directory, not a file" in err


def test_the_hook_patch_route_checks_too(tmp_path):
    """open_clip_train with the hook patch calls the plugin's ``validate``: the same refusal."""
    parser = argparse.ArgumentParser(prog="open_clip_train")
    plugin.add_arguments(parser)
    parser.add_argument("--train-data")
    parser.add_argument("--val-data")
    parser.add_argument("--dataset-type", default="auto")
    args = parser.parse_args(["--train-data", str(tmp_path / "{0..1}.tar")])
    with pytest.raises(SystemExit) as e:
        plugin.validate(args, parser)
    assert e.value.code == 2


@pytest.mark.slow
def test_launcher_exits_within_seconds(tmp_path):
    """The whole launcher: status 2, the path named, long before open_clip would start its retries."""
    start = time.time()
    proc = subprocess.run(command(["--train-data", f"{tmp_path}/{{00000..00007}}.tar", "--dataset-type", "webdataset",
                                   "--model", "structure-tiny", "--gap-atp-weight", "1"]),
                          capture_output=True, text=True, env=env(), cwd=ROOT, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"error: --train-data: '{tmp_path}/00000.tar'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert time.time() - start < 60
    assert len(proc.stdout) + len(proc.stderr) < 20000  # no flood of retry warnings


# ------------------------------------------------------------------------ the expansion helper
def test_expansion_is_open_clips(shards):
    from open_clip_train.data import expand_urls

    pattern = f"{shards}/{{00000..00002}}.tar::{shards}/0000{{5,7}}.tar"
    assert expand_sources(pattern) == expand_urls(pattern)[0]
    assert expand_sources(pattern) == [f"{shards}/{n:05d}.tar" for n in (0, 1, 2, 5, 7)]
    assert expand_sources([shards / "00000.tar"]) == [f"{shards}/00000.tar"]  # a list is taken as it is


def test_one_expansion_helper_and_one_image_extension_list():
    """Shard patterns are expanded in one place (data/check.py: open_clip's own expansion) and the
    image extensions are listed once (data/reader.py): no other module of the package expands a
    pattern itself or lists extensions again."""
    from pathlib import Path

    import openclip_structure

    package = Path(openclip_structure.__file__).parent
    expanders, ext_lists = [], []
    for path in sorted(package.rglob("*.py")):
        text = path.read_text()
        if path.relative_to(package).as_posix() != "data/check.py" and re.search(
                r"braceexpand|expand_urls|def _?expand", text):
            expanders.append(path.name)
        if re.search(r"^IMAGE_EXTS\s*=|\(\s*\"\.?png\",\s*\"\.?jpe?g\"", text, re.M):
            ext_lists.append(path.relative_to(package).as_posix())
    assert expanders == []
    assert ext_lists == ["data/reader.py"]


@pytest.mark.parametrize("names, pattern", [
    (["d/00000.tar", "d/00001.tar", "d/00002.tar"], "d/{00000..00002}.tar"),
    (["d/shard-09.tar", "d/shard-10.tar", "d/shard-11.tar"], "d/shard-{09..11}.tar"),
    (["d/00000.tar", "d/00002.tar"], "d/{00000,00002}.tar"),
    (["d/train.tar", "d/val.tar"], "d/{train,val}.tar"),
    (["d/a-1.tar", "d/a-10.tar", "d/a-2.tar"], "d/a-{1,10,2}.tar"),
    (["d/only.tar"], "d/only.tar"),
])
def test_brace_pattern_expands_to_exactly_the_files(names, pattern):
    from braceexpand import braceexpand

    assert brace_pattern(names) == pattern
    assert sorted(braceexpand(pattern)) == sorted(names)


def test_flag_error_is_raised_directly(tmp_path):
    with pytest.raises(FlagError, match="--val-data"):
        data_check.check_data_args(argparse.Namespace(train_data=None, val_data=str(tmp_path / "v.tar"),
                                                      dataset_type="webdataset"))
    assert data_check.check_data_args(argparse.Namespace()) is None  # no data flag: nothing to check
