"""The scenes task with a large validation set (issue 22): the same training shards as the scenes,
each held-out digit drawn several times; and the demo's fixed-temperature methods."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

from openclip_structure.data import scenes  # noqa: E402
from openclip_structure.data.reader import read_shards


@pytest.mark.slow
def test_bigval_keeps_the_scenes_training_data_and_multiplies_validation(tmp_path):
    split = dict(image_size=32, seed=0, val_fraction=0.25, train_shards=8, val_shards=2)
    plain = scenes.write_scenes_dataset(tmp_path / "plain", **split)
    big = scenes.write_scenes_bigval_dataset(tmp_path / "big", val_repeats=3, **split)
    train_plain, train_big = read_shards(plain["train"]["pattern"]), read_shards(big["train"]["pattern"])
    assert train_plain == train_big  # same keys, images, captions, labels, order: the trainings are the same
    val_plain, val_big = read_shards(plain["val"]["pattern"]), read_shards(big["val"]["pattern"])
    assert big["val"]["num_samples"] == len(val_big) == 3 * len(val_plain) == 3 * plain["val"]["num_samples"]
    plain_keys = {s.key for s in val_plain}
    assert {s.key for s in val_big if "_r" not in s.key} == plain_keys
    by_key = {s.key: s for s in val_big}
    assert all(by_key[s.key] == s for s in val_plain)  # the first draw is the scenes' own validation scene
    train_digits = {s.key for s in train_plain}
    assert not {s.key.split("_r")[0] for s in val_big} & train_digits  # no training digit in validation
    for s in val_big:
        if "_r" in s.key:
            assert s.label == by_key[s.key.split("_r")[0]].label
    # fresh draws: most redrawn scenes differ from their first draw (3 inks x 2 backgrounds x templates)
    redrawn = [s for s in val_big if s.key.endswith("_r01")]
    assert sum(s.image != by_key[s.key[:-4]].image for s in redrawn) > 0.7 * len(redrawn)
    assert (tmp_path / "big" / "classnames.txt").exists() and big["num_classes"] == 10
    with pytest.raises(ValueError):
        scenes.write_scenes_bigval_dataset(tmp_path / "bad", val_repeats=0)


def test_demo_fixed_temperature_methods_run_only_when_named(tmp_path):
    import demo

    assert demo.EXTRA_METHODS["gap_fixed_t"] == ["--gap-atp-weight", "1", "--gap-cu-weight", "1",
                                                 "--fixed-temperature", "0.1"]
    assert demo.EXTRA_METHODS["baseline_fixed_t"] == ["--fixed-temperature", "0.1"]
    default = demo.available_methods()
    assert "gap_fixed_t" not in default and "--fixed-temperature" not in default["all"]
    assert demo.TASKS["scenes-bigval"][1] == "write_scenes_bigval_dataset"
    assert demo.TASK_SIZES["scenes-bigval"] == demo.TASK_SIZES["scenes"]
    with pytest.raises(SystemExit, match="unknown or unavailable"):
        demo.main(["--methods", "nope", "--out", str(tmp_path / "out")])


def test_ls100_config_is_the_default_model_with_logit_scale_100():
    import json
    import math

    import demo

    cfg_dir = os.path.join(ROOT, "openclip_structure", "model_configs")
    base = json.load(open(os.path.join(cfg_dir, "structure-tiny-avg.json")))
    ls100 = json.load(open(os.path.join(cfg_dir, "structure-tiny-avg-ls100.json")))
    assert ls100.pop("init_logit_scale") == pytest.approx(math.log(100))
    assert ls100 == base  # same architecture: its checkpoints load into structure-tiny-avg for evaluation
    assert demo.EXTRA_METHODS["baseline_ls100"] == ["--model", "structure-tiny-avg-ls100"]
    assert demo.SIZES["default"]["model"] == "structure-tiny-avg"
