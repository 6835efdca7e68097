"""--text-aug captions on multi-caption data: a caption and a caption with a DIFFERENT text from the
same sample (.txt lines, or open_clip main's --json-text-key fields), and one log line with the
count of samples that cannot give a different view."""
import io
import json
import logging
import os
import random
import subprocess
import sys
import tarfile
from types import SimpleNamespace

import open_clip
import pytest
import torch

from openclip_structure.data.captions import CaptionPair, json_captions, split_captions
from openclip_structure.data.reader import Sample
from openclip_structure.data.sources import digits_samples
from openclip_structure.data.writer import write_shards
from openclip_structure.integration.loaders import ViewCountingLoader, wrap_get_data
from openclip_structure.views.text import TwoCaptions

import openclip_structure

open_clip.add_model_config(os.path.join(os.path.dirname(openclip_structure.__file__), "model_configs"))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_duplicate_lines_never_give_the_caption_as_its_view():
    text = "a seven\na seven\na seven\nthe digit seven"
    rng = random.Random(0)
    pairs = [CaptionPair()(text, rng) for _ in range(200)]
    assert all(a != b for a, b in pairs)
    assert {a for a, _ in pairs} == {"a seven", "the digit seven"}
    # the caption is drawn per line (3 of 4 lines say "a seven"), the view among the other texts
    assert 0.65 < sum(a == "a seven" for a, _ in pairs) / 200 < 0.85
    # only duplicates: the EDA copy (a permutation of the caption's words, here always different)
    caption, view = CaptionPair()("two words\ntwo words", random.Random(1))
    assert caption == "two words" and sorted(view.split()) == ["two", "words"] and view != caption
    # a one-word caption cannot give a different view: EDA keeps the word
    assert CaptionPair()("seven", random.Random(2)) == ("seven", "seven")


def test_json_fields_are_the_captions():
    meta = json.dumps({"caption_a": " a seven ", "caption_b": "", "caption_c": "the digit 7", "url": "x"})
    assert json_captions(meta, "caption_a;caption_b;caption_c") == ["a seven", "the digit 7"]
    assert json_captions(meta.encode(), ["caption_c", "missing"]) == ["the digit 7"]
    assert json_captions("not json", "caption_a") == [] and json_captions("[1]", "caption_a") == []
    pair = CaptionPair(json_keys="caption_a;caption_b;caption_c")
    rng = random.Random(0)
    assert {pair(meta, rng) for _ in range(40)} == {("a seven", "the digit 7"), ("the digit 7", "a seven")}
    # with the extractor of open_clip main, the caption is the one it picks, the view another field
    first = CaptionPair(json_keys="caption_a;caption_c", json_caption=lambda m: json.loads(m)["caption_c"])
    assert {first(meta, rng) for _ in range(10)} == {("the digit 7", "a seven")}
    assert CaptionPair(json_keys="caption_b")(meta, rng) == ("", "")  # no caption at all
    with pytest.raises(ValueError, match="names no key"):
        CaptionPair(json_keys=" ; ")


def test_view_counting_loader_logs_once_with_the_count(caplog):
    tok = open_clip.get_tokenizer("structure-tiny")
    two = TwoCaptions(tok, CaptionPair())
    texts = ["a seven\nthe digit 7", "seven", "a one\na one", "a two\nthe digit 2"]
    batches = [(torch.zeros(2, 1), two(texts[:2])), {"image": torch.zeros(2, 1), "text": two(texts[2:])}]
    loader = ViewCountingLoader(batches, "captions")
    with caplog.at_level(logging.INFO):
        assert list(loader) == batches and list(loader) == batches  # two epochs, batches unchanged
    # only "seven" (one word) cannot differ; "a one" twice gets an EDA copy, which always differs for two
    # different words (a word dropped, or the two swapped)
    lines = [r.getMessage() for r in caplog.records if "openclip-structure" in r.getMessage()]
    assert lines == ["openclip-structure: --text-aug captions: 1 of 4 training samples in the first epoch had no "
                     "text view different from the caption (a single caption whose EDA copy is unchanged, e.g. "
                     "one word; only duplicate caption lines or JSON fields; no caption): for them the text view "
                     "equals the caption"]
    assert len(loader) == 2 and ViewCountingLoader(batches, "eda").__len__() == 2


def _plugin_args(**kw):
    base = dict(gc_aug_weight=1.0, text_aug="captions", val_data=None, imagenet_val=None, imagenet_v2=None,
                dataset_type="webdataset", rank=0, world_size=1)
    return SimpleNamespace(**{**base, **kw})


def test_webdataset_pipeline_counts_samples_without_a_different_view(tmp_path, caplog):
    """open_clip 3.x's own get_data through the hook: one log line whose count is the number of
    samples that cannot give a different view, counted here by a plain loop over the captions."""
    from openclip_structure import registry
    from open_clip_train.data import get_data

    digits = digits_samples()[:24]
    captions = []
    for i, s in enumerate(digits):
        if i % 4 == 0:
            captions.append(f"picture{i}")  # one word: EDA cannot change it
        elif i % 4 == 1:
            captions.append(f"picture {i}\npicture {i}")  # duplicates: the view is an EDA copy
        else:
            captions.append(f"{s.caption}, picture {i}\nthe number {s.label} in picture {i}")
    shards = write_shards([Sample(s.key, s.image, c, s.label) for s, c in zip(digits, captions)], tmp_path,
                          num_shards=2)
    args = _plugin_args(train_data=shards["pattern"], train_num_samples=24, batch_size=8, workers=1, seed=0,
                        train_data_upsampling_factors=None, dataset_resampled=False, val_num_samples=None,
                        distributed=False)
    assert registry.text_views_enabled(args)
    _, _, preprocess = open_clip.create_model_and_transforms("structure-tiny")
    tok = open_clip.get_tokenizer("structure-tiny")
    with caplog.at_level(logging.INFO):
        data = wrap_get_data(get_data, lambda: args)(args, (preprocess, preprocess), epoch=0, tokenizer=tok)
        texts = torch.cat([t for _, t in data["train"].dataloader])
    assert texts.shape == (24, 2, 16) and data["train"].dataloader.num_batches == 3
    same = int((texts[:, 0] == texts[:, 1]).all(-1).sum())
    # no different view: a single distinct caption of one word (EDA changes any caption of two different words)
    expected = sum(len(set(split_captions(c))) == 1 and len(c.split()) == 1 for c in captions)
    assert same == expected == 6
    assert any(f": {expected} of 24 training samples in the first epoch had no text view" in r.getMessage()
               for r in caplog.records)


def _json_shard(path, rows):
    digits = digits_samples()
    with tarfile.open(path, "w") as tar:
        for i, meta in enumerate(rows):
            for name, data in ((f"s{i:03d}.png", digits[i].image), (f"s{i:03d}.json", json.dumps(meta).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


MAIN_SCRIPT = r"""
import json, sys, open_clip, torch
from open_clip_train.data import get_data
from open_clip_train.params import parse_args
from openclip_structure.integration.loaders import wrap_get_data
shard, model_configs = sys.argv[1:3]
open_clip.add_model_config(model_configs)
args = parse_args(["--train-data", shard, "--dataset-type", "webdataset", "--train-num-samples", "12",
                   "--batch-size", "4", "--workers", "1", "--json-text-key", "cap_a;cap_b;cap_c"])
args.gc_aug_weight, args.text_aug, args.rank, args.world_size = 1.0, "captions", 0, 1
_, _, preprocess = open_clip.create_model_and_transforms("structure-tiny")
tok = open_clip.get_tokenizer("structure-tiny")
data = wrap_get_data(get_data, lambda: args)(args, (preprocess, preprocess), epoch=0, tokenizer=tok)
assert args.json_text_key == "cap_a;cap_b;cap_c" and args.text_key == "txt"  # restored
rows = []
for batch in data["train"].dataloader:
    rows += [[t[0].tolist(), t[1].tolist()] for t in batch["text"]]
print("ROWS" + json.dumps(rows))
"""


@pytest.mark.slow
def test_json_text_keys_on_open_clip_main(tmp_path):
    from test_open_clip_main import SNAPSHOT

    if SNAPSHOT is None:
        pytest.skip("no open_clip main snapshot")
    rows = [{"cap_a": f"a digit, picture {i}", "cap_b": f"the number in picture {i}", "cap_c": ""} for i in range(8)]
    rows += [{"cap_a": "", "cap_b": f"only caption b {i}", "cap_c": f"only caption c {i}"} for i in range(2)]
    rows += [{"cap_a": "lonely", "url": "x"}, {"cap_a": "twin", "cap_b": "twin"}]
    _json_shard(tmp_path / "0.tar", rows)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.join(SNAPSHOT, "src"), ROOT])}
    res = subprocess.run([sys.executable, "-c", MAIN_SCRIPT, str(tmp_path / "0.tar"),
                          os.path.join(ROOT, "openclip_structure", "model_configs")],
                         capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.split("ROWS", 1)[1])
    tok = open_clip.get_tokenizer("structure-tiny")
    by_tokens = {}
    for i, meta in enumerate(rows):
        for key, text in meta.items():
            if key.startswith("cap") and text:
                by_tokens[tuple(tok([text])[0].tolist())] = (i, key)
    pairs = [(by_tokens[tuple(a)], by_tokens[tuple(b)]) for a, b in got]
    assert len(pairs) == 12 and sorted(a[0] for a, _ in pairs) == list(range(12))
    for (i, ka), (j, kb) in pairs:
        assert i == j  # caption and view from the same sample's JSON
        if i < 8:  # open_clip's extractor (no probs): the first non-empty key is the caption
            assert (ka, kb) == ("cap_a", "cap_b")
        elif i < 10:
            assert (ka, kb) == ("cap_b", "cap_c")
    same = [i for (i, _), _ in pairs if i >= 10]
    assert same == [10, 11] or sorted(same) == [10, 11]
    assert "2 of 12 training samples in the first epoch had no text view" in res.stderr
