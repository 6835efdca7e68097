"""Captions from ``.json`` fields (open_clip main's ``--json-text-key 'a;b'``, recaptioned data): the
shard reader, the evaluator's ``--json-text-key`` and its COCO protocol (each field its own text)."""
import io
import json
import tarfile

import numpy as np
import pytest

from openclip_structure.evaluation.coco import has_multi_captions
from openclip_structure.data.reader import DataError, iter_shard_samples
from openclip_structure.data.reader import Sample
from openclip_structure.data.sources import digits_samples
from openclip_structure.data.writer import write_shards

from test_multicaption import random_checkpoint  # noqa: F401 (fixture)

KEYS = "cap_a;cap_b;cap_c"


def write_json_shard(path, rows, decoy_txt=True):
    """One shard: per row ``(key, png bytes, label, meta dict)`` as ``.png``, ``.cls``, ``.json`` and,
    with ``decoy_txt``, a ``.txt`` that is NOT one of the captions (a reader of the .txt would differ)."""
    with tarfile.open(path, "w") as tar:
        for key, image, label, meta in rows:
            members = [("png", image), ("cls", str(label).encode()), ("json", json.dumps(meta).encode())]
            if decoy_txt:
                members.append(("txt", f"decoy text of {key}".encode()))
            for ext, data in members:
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


def digit_captions(n, start=0):
    """1..3 distinct captions per digit sample (as test_multicaption's multi-caption shards)."""
    base = digits_samples()[start:start + n]
    lines = [[f"{s.caption}, picture {i}", f"the digit {s.label}, image {i}", f"picture {i}"][: 1 + i % 3]
             for i, s in enumerate(base)]
    return base, lines


def as_meta(captions):
    """The captions as the fields cap_a, cap_b, cap_c, with an empty field and an unrelated key."""
    meta = dict(zip(("cap_a", "cap_b", "cap_c"), captions))
    meta.setdefault("cap_c", "")
    meta["url"] = "http://example.invalid/not-a-caption"
    return meta


def test_reader_takes_the_named_json_fields_as_the_captions(tmp_path):
    digits = digits_samples()
    rows = [("s0", digits[0].image, 0, {"cap_a": "a seven", "cap_b": " the digit\nseven ", "cap_c": ""}),
            ("s1", digits[1].image, 1, {"cap_b": "only b", "other": "not named"}),
            ("s2", digits[2].image, 2, {"cap_a": "", "other": "no named field is non-empty"}),
            ("s3", digits[3].image, 3, {"cap_c": "c first?", "cap_a": "a first"})]
    shard = write_json_shard(tmp_path / "0.tar", rows)
    stats = {}
    got = [(k, c, y) for k, _, c, y in iter_shard_samples(shard, stats, json_keys=KEYS)]
    # key order, not the JSON's; inner whitespace (a line break too) becomes one space; s2 has no caption
    assert got == [("s0", "a seven\nthe digit seven", 0), ("s1", "only b", 1), ("s3", "a first\nc first?", 3)]
    assert stats["skipped"] == 1
    assert [c for _, _, c, _ in iter_shard_samples(shard)] == [f"decoy text of s{i}" for i in range(4)]  # .txt
    assert [c for _, _, c, _ in iter_shard_samples(shard, json_keys=["cap_b"])] == ["the digit seven", "only b"]
    assert has_multi_captions(shard, KEYS) and not has_multi_captions(shard, "cap_b")
    assert not has_multi_captions(shard)  # the .txt: one line each
    with pytest.raises(DataError, match="name no key"):
        next(iter_shard_samples(shard, json_keys=" ; "))
    # a .txt-only shard read by JSON keys: every sample skipped, counted
    plain = write_shards([Sample("t0", digits[0].image, "a\nb", 0)], tmp_path / "plain", num_shards=1)["pattern"]
    stats = {}
    assert list(iter_shard_samples(plain, stats, json_keys=KEYS)) == [] and stats["skipped"] == 1


def test_evaluator_rejects_a_json_key_list_without_keys(tmp_path, capsys):
    from openclip_structure.evaluation import evaluator as evaluate

    digits = digits_samples()
    shard = write_json_shard(tmp_path / "0.tar", [("s0", digits[0].image, 0, {"cap_a": "x"})])
    assert evaluate.main(["--model", "structure-tiny", "--data", shard, "--json-text-key", " ; ",
                          "--compare", "x=/nonexistent.pt"]) == 2  # refused before any checkpoint is read
    assert "error: --json-text-key ' ; ' names no key" in capsys.readouterr().err


@pytest.mark.slow
def test_evaluator_json_text_key_scores_every_field(random_checkpoint, tmp_path):
    """The same captions as .json fields (--json-text-key, with a decoy .txt beside them) and as
    .txt lines give exactly the same evaluation: num_texts, COCO-protocol recalls, gap and group
    metrics; without the flag the evaluator reads the decoy .txt (one text per image)."""
    from openclip_structure.evaluation import evaluator as evaluate

    base, lines = digit_captions(60)
    shard = write_json_shard(tmp_path / "json.tar", [(s.key, s.image, s.label, as_meta(c))
                                                     for s, c in zip(base, lines)])
    txt = write_shards([Sample(s.key, s.image, "\n".join(c), s.label) for s, c in zip(base, lines)],
                       tmp_path / "txt", num_shards=1)["pattern"]
    assert evaluate.main(["--model", "structure-tiny", "--pretrained", random_checkpoint, "--data", shard,
                          "--json-text-key", KEYS, "--out", str(tmp_path / "res.json")]) == 0
    doc = json.loads((tmp_path / "res.json").read_text())
    res = next(iter(doc["checkpoints"].values()))
    assert doc["args"]["json_text_key"] == KEYS and res["json_text_key"] == KEYS
    want = evaluate.evaluate_checkpoint("structure-tiny", random_checkpoint, txt, device="cpu")
    assert (res["num_samples"], res["num_texts"]) == (want["num_samples"], want["num_texts"]) == (60, 120)
    assert set(res["metrics"]) == set(want["metrics"])
    for key, value in want["metrics"].items():
        assert res["metrics"][key] == pytest.approx(value, abs=1e-6), key
    decoy = evaluate.evaluate_checkpoint("structure-tiny", random_checkpoint, shard, device="cpu")
    assert decoy["num_texts"] == 60 and decoy["metrics"]["gap"] != pytest.approx(want["metrics"]["gap"], abs=1e-4)
    assert np.isfinite(res["metrics"]["mixed_v_measure"])


def test_text_aug_help_and_flag_table_name_the_json_keys():
    """--text-aug's help and its README row say that on open_clip main the .json fields of
    --json-text-key are the captions."""
    from openclip_structure.flags import GENERAL_OPTIONS, flag_table, option_help

    option = next(o for o in GENERAL_OPTIONS if o.flag == "--text-aug")
    assert "--json-text-key" in option_help(option) and "open_clip main" in option_help(option)
    row = next(line for line in flag_table().splitlines() if line.startswith("| `--text-aug"))
    assert "`.json` fields of `--json-text-key 'a;b'`" in row
