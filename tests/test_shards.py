import io
import json
import re
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from openclip_structure.data.reader import Sample, read_shards
from openclip_structure.data.sources import (DIGIT_TEMPLATES, DIGIT_WORDS, DIGIT_ZEROSHOT_TEMPLATES, csv_samples,
                                             digits_samples, folder_class_names, folder_samples)
from openclip_structure.data.writer import split_train_val, write_dataset, write_shards

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def digits():
    return digits_samples(image_size=24, seed=0)


def _template_of(caption):
    for i, t in enumerate(DIGIT_TEMPLATES):
        pattern = re.escape(t).replace(r"\{w\}", "(?P<w>[a-z]+)").replace(r"\{n\}", "(?P<n>[0-9])")
        m = re.fullmatch(pattern, caption)
        if m:
            return i, m.group("w") if "w" in m.groupdict() else m.group("n")
    raise AssertionError(f"caption matches no template: {caption!r}")


def _png(path, size=(20, 12), color=(200, 10, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def test_digits_samples(digits):
    assert len(digits) == 1797
    assert len({s.key for s in digits}) == 1797
    assert Counter(s.label for s in digits).keys() == set(range(10))
    for s in digits[:50]:
        img = Image.open(io.BytesIO(s.image))
        assert img.format == "PNG" and img.mode == "RGB" and img.size == (24, 24)
    # pixel content is the real digit: upscaled image correlates with the 8x8 source
    from sklearn.datasets import load_digits
    src = load_digits().images[0]
    img = np.asarray(Image.open(io.BytesIO(digits[0].image)).convert("L").resize((8, 8), Image.BOX), float)
    assert np.corrcoef(img.ravel(), src.ravel())[0, 1] > 0.9
    used = set()
    for s in digits:
        t, mention = _template_of(s.caption)
        used.add(t)
        assert mention in (DIGIT_WORDS[s.label], str(s.label)), s
    assert len(used) >= 10
    captions = [s.caption for s in digits if s.label == 7]
    assert any("seven" in c for c in captions) and any("7" in c for c in captions)
    # deterministic per seed, different across seeds
    assert [s.caption for s in digits_samples(24, seed=0)[:100]] == [s.caption for s in digits[:100]]
    assert [s.caption for s in digits_samples(24, seed=1)[:100]] != [s.caption for s in digits[:100]]


def test_round_trip(digits, tmp_path):
    import webdataset as wds

    samples = digits[:300]
    info = write_shards(samples, tmp_path, samples_per_shard=128)
    assert info == {"pattern": f"{tmp_path.resolve()}/{{00000..00002}}.tar", "num_samples": 300, "num_shards": 3}
    sizes = json.loads((tmp_path / "sizes.json").read_text())
    assert sizes == {"00000.tar": 128, "00001.tar": 128, "00002.tar": 44}
    for name, n in sizes.items():
        with tarfile.open(tmp_path / name) as tar:
            members = tar.getmembers()
        names = [m.name for m in members]
        assert len(names) == 3 * n and names[:3] == [f"{names[0][:-4]}.{e}" for e in ("cls", "png", "txt")]
        assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in members} == {(0, 0, 0, "", "", 0o644)}
        assert all(name.count(".") == 1 for name in names)

    back = read_shards(info["pattern"])
    assert back == samples

    ds = wds.WebDataset(info["pattern"], shardshuffle=False)
    raw = list(ds)
    assert [r["__key__"] for r in raw] == [s.key for s in samples]
    for r, s in zip(raw, samples):
        assert r["png"] == s.image
        assert r["txt"].decode("utf-8") == s.caption
        assert int(r["cls"]) == s.label

    # open_clip's own sample count and its decode/rename pipeline
    data = pytest.importorskip("open_clip_train.data")
    assert data.get_dataset_size(info["pattern"]) == (300, 3)
    first = next(iter(wds.WebDataset(info["pattern"], shardshuffle=False)
                      .decode("pilrgb").rename(image="jpg;png;jpeg;webp", text="txt")))
    assert first["image"].size == (24, 24) and first["text"] == samples[0].caption


def test_unlabelled_and_single_shard(tmp_path):
    samples = [Sample(f"s{i}", b"\x89PNG fake", f"caption {i}", None) for i in range(3)]
    info = write_shards(samples, tmp_path)
    assert info["pattern"] == str(tmp_path.resolve() / "00000.tar") and info["num_shards"] == 1
    with tarfile.open(tmp_path / "00000.tar") as tar:
        assert not any(n.endswith(".cls") for n in tar.getnames())
    assert read_shards([tmp_path / "00000.tar"]) == samples


def test_write_shards_refuses_bad_input(digits, tmp_path):
    with pytest.raises(ValueError, match="no samples"):
        write_shards([], tmp_path)
    with pytest.raises(ValueError, match="duplicate.*digits_000000"):
        write_shards([digits[0], digits[1], digits[0]], tmp_path)
    with pytest.raises(ValueError, match="no dots"):
        write_shards([Sample("a.b", digits[0].image, "x", 1)], tmp_path)
    with pytest.raises(ValueError, match="non-empty shards"):
        write_shards(digits[:3], tmp_path, num_shards=4)


def test_deterministic(digits, tmp_path):
    a = write_shards(digits[:200], tmp_path / "a", num_shards=2)
    b = write_shards(digits_samples(24, seed=0)[:200], tmp_path / "b", num_shards=2)
    assert a["num_shards"] == b["num_shards"] == 2
    for name in ("00000.tar", "00001.tar", "sizes.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_split_train_val(digits):
    train, val = split_train_val(digits, val_fraction=0.25, seed=0)
    train_keys, val_keys = {s.key for s in train}, {s.key for s in val}
    assert not train_keys & val_keys
    assert train_keys | val_keys == {s.key for s in digits}
    assert len(train) + len(val) == len(digits) and abs(len(val) - 0.25 * len(digits)) <= 10
    counts = Counter(s.label for s in digits)
    val_counts = Counter(s.label for s in val)
    assert {s.label for s in train} == set(val_counts) == set(range(10))
    for label, n in counts.items():
        assert abs(val_counts[label] - 0.25 * n) <= 1
    again = split_train_val(digits, 0.25, seed=0)
    assert [s.key for s in again[1]] == [s.key for s in val]
    assert [s.key for s in split_train_val(digits, 0.25, seed=1)[1]] != [s.key for s in val]
    # tiny classes still land in both splits
    few = [Sample(f"k{i}", b"", "", i % 3) for i in range(6)]
    tr, va = split_train_val(few, 0.1)
    assert {s.label for s in tr} == {s.label for s in va} == {0, 1, 2}


def test_write_dataset(digits, tmp_path):
    info = write_dataset(digits, tmp_path, val_fraction=0.25, train_shards=8, val_shards=2)
    assert info["num_classes"] == 10
    assert json.loads((tmp_path / "dataset.json").read_text()) == info
    assert info["train"]["num_shards"] == 8 and info["val"]["num_shards"] == 2
    assert info["train"]["num_samples"] + info["val"]["num_samples"] == 1797
    sizes = json.loads((tmp_path / "train" / "sizes.json").read_text())
    assert len(sizes) == 8 and max(sizes.values()) - min(sizes.values()) <= 1
    assert sum(sizes.values()) == info["train"]["num_samples"]
    val = read_shards(info["val"]["pattern"])
    assert len(val) == info["val"]["num_samples"] and {s.label for s in val} == set(range(10))


def test_folder_samples_class_subfolders(tmp_path):
    for cls, color in (("dog", (0, 0, 255)), ("cat", (255, 0, 0))):
        for i in range(2):
            _png(tmp_path / cls / f"img {i}.png", color=color)
            (tmp_path / cls / f"img {i}.txt").write_text(f"a photo of a {cls} number {i}\n")
    samples = folder_samples(tmp_path, image_size=6)
    assert [s.key for s in samples] == ["cat_img_0", "cat_img_1", "dog_img_0", "dog_img_1"]
    assert [s.label for s in samples] == [0, 0, 1, 1]  # sorted subfolders: cat=0, dog=1
    assert samples[2].caption == "a photo of a dog number 0"
    img = Image.open(io.BytesIO(samples[0].image))
    assert img.format == "PNG" and img.size == (10, 6)  # shorter side 12 -> 6, aspect kept
    assert img.getpixel((3, 3)) == (255, 0, 0)
    write_shards(samples, tmp_path / "out")
    assert read_shards(str(tmp_path / "out" / "00000.tar")) == samples
    assert folder_class_names(tmp_path) == ["cat", "dog"]  # the class names of ids 0, 1


def test_folder_samples_flat_cls_and_errors(tmp_path):
    Image.new("L", (8, 8), 128).save(tmp_path / "a.jpg")
    (tmp_path / "a.txt").write_text("grey square")
    (tmp_path / "a.cls").write_text("5\n")
    _png(tmp_path / "b.png")
    (tmp_path / "b.txt").write_text("red rectangle")
    a, b = folder_samples(tmp_path)
    assert (a.key, a.label, a.caption, b.label) == ("a", 5, "grey square", None)
    assert Image.open(io.BytesIO(a.image)).mode == "RGB"
    assert Image.open(io.BytesIO(b.image)).size == (20, 12)

    _png(tmp_path / "sub" / "c.png")
    with pytest.raises(ValueError, match=r"missing caption for image .*c\.png"):
        folder_samples(tmp_path)
    (tmp_path / "sub" / "c.txt").write_text("ok")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    (tmp_path / "broken.txt").write_text("x")
    with pytest.raises(ValueError, match=r"cannot read image .*broken\.png"):
        folder_samples(tmp_path)
    with pytest.raises(ValueError, match="no images"):
        folder_samples(tmp_path / "sub" / "c.txt")


def test_csv_samples(tmp_path):
    _png(tmp_path / "imgs" / "x.png", color=(0, 255, 0))
    _png(tmp_path / "y.png")
    abs_path = tmp_path / "y.png"
    (tmp_path / "data.csv").write_text(
        "filepath\ttitle\tkind\nimgs/x.png\ta green box\tplant\n" f"{abs_path}\ta red box\tanimal\n")
    samples = csv_samples(tmp_path / "data.csv", label_key="kind", sep="\t", image_size=6)
    assert [(s.key, s.caption, s.label) for s in samples] == [
        ("data_000000", "a green box", 1), ("data_000001", "a red box", 0)]
    assert Image.open(io.BytesIO(samples[0].image)).getpixel((0, 0)) == (0, 255, 0)

    (tmp_path / "ids.csv").write_text("path,caption,y\nimgs/x.png,green,3\ny.png,red,\n")
    samples = csv_samples(tmp_path / "ids.csv", img_key="path", caption_key="caption", label_key="y")
    assert [s.label for s in samples] == [3, None]
    with pytest.raises(ValueError, match=r"'title' not in .*available columns: \['path', 'caption', 'y'\]"):
        csv_samples(tmp_path / "ids.csv", img_key="path")


def test_cli_digits(tmp_path):
    out = tmp_path / "digits"
    cmd = [sys.executable, "scripts/make_shards.py", "--source", "digits", "--out", str(out),
           "--image-size", "16", "--train-shards", "3", "--val-shards", "1", "--val-fraction", "0.2"]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    info = json.loads((out / "dataset.json").read_text())
    assert info["train"]["pattern"] in res.stdout and info["val"]["pattern"] in res.stdout
    assert info["train"]["num_shards"] == 3 and info["val"]["num_shards"] == 1
    assert info["train"]["num_samples"] + info["val"]["num_samples"] == 1797
    assert sorted(p.name for p in (out / "train").iterdir()) == ["00000.tar", "00001.tar", "00002.tar", "sizes.json"]
    s = read_shards(info["val"]["pattern"])[0]
    assert Image.open(io.BytesIO(s.image)).size == (16, 16)
    # zero-shot prompts beside the splits: class names (id i = line i) and the held-out templates
    assert (out / "classnames.txt").read_text().splitlines() == list(DIGIT_WORDS)
    assert (out / "zeroshot_classification_templates.txt").read_text().splitlines() == list(DIGIT_ZEROSHOT_TEMPLATES)
    assert info["prompts"]["classnames"] == str((out / "classnames.txt").resolve())

    res = subprocess.run([sys.executable, "-m", "openclip_structure.data.cli", "--source", "folder", "--out",
                          str(tmp_path / "f")], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and "needs --path" in res.stderr
