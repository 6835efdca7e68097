"""Evaluator CLI, local-dir export and plots (openclip_structure.evaluation.evaluator / export / plots)."""
import argparse
import io
import json
import math
import os
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from openclip_structure.evaluation import evaluator as evaluate
from openclip_structure.evaluation import exporter as export
from openclip_structure.evaluation import plots
from openclip_structure.evaluation.metrics import gap_metrics
from openclip_structure.data.reader import Sample
from openclip_structure.data.sources import DIGIT_WORDS, DIGIT_ZEROSHOT_TEMPLATES, digits_samples
from openclip_structure.data.writer import write_digits_dataset, write_prompt_files, write_shards

REPO = Path(__file__).resolve().parents[1]
MODEL = "structure-tiny"
GAP_KEYS = ["gap", "cos_true_pairs", "intra_image_cos", "intra_text_cos", "uniformity", "separability",
            "relative_gap", "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"]
GROUP_KEYS = ["mixed_v_measure", "mixed_nmi", "mixed_ari", "mixed_homogeneity", "mixed_knn_accuracy",
              "mixed_linear_probe_accuracy", "image_v_measure", "text_v_measure"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Digits shards: train (2 shards) and val (1 shard, 450 labelled pairs), with class names and
    held-out zero-shot templates beside them."""
    out = tmp_path_factory.mktemp("digits")
    return write_digits_dataset(out, train_shards=2, val_shards=1)


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """One tiny checkpoint, 1 epoch through the plugin's launcher in a subprocess."""
    logs = tmp_path_factory.mktemp("logs")
    cmd = [sys.executable, "-m", "openclip_structure.main", "--", "--train-data", data["train"]["pattern"],
           "--dataset-type", "webdataset", "--train-num-samples", "640", "--model", MODEL, "--batch-size", "64",
           "--epochs", "1", "--lr", "2e-3", "--warmup", "20", "--wd", "0.1", "--workers", "1",
           "--logs", str(logs), "--name", "base", "--seed", "0"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    ckpt = logs / "base" / "checkpoints" / "epoch_1.pt"
    assert res.returncode == 0 and ckpt.is_file(), res.stderr[-3000:]
    return ckpt


@pytest.fixture(scope="module")
def random_ckpt(tmp_path_factory):
    """A checkpoint of an untrained tiny model in open_clip's format, plus its state dict."""
    import open_clip

    from openclip_structure.configs import register_model_configs

    register_model_configs()
    torch.manual_seed(0)
    model = open_clip.create_model(MODEL)
    sd = model.state_dict()
    path = tmp_path_factory.mktemp("ckpt") / "epoch_0.pt"
    torch.save({"epoch": 0, "name": "random", "state_dict": sd, "optimizer": {}}, path)
    return path, sd


@pytest.fixture(scope="module")
def unlabelled_shards(tmp_path_factory):
    samples = [Sample(s.key, s.image, s.caption, None) for s in digits_samples(32, 0)[:24]]
    return write_shards(samples, tmp_path_factory.mktemp("nolabels"), num_shards=1)["pattern"]


def _run_main(fn, argv, capsys):
    rc = fn([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _table_rows(out: str) -> dict:
    """metric -> list of cells, from the printed metrics table (first table of the output)."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("metric"))
    rows = {"metric": lines[start].split()}
    for line in lines[start + 2:]:
        if not line.strip():
            break
        cells = line.split()
        rows[cells[0]] = cells[1:]
    return rows


# ----------------------------------------------------------------------------- evaluator on a trained checkpoint


@pytest.mark.slow
def test_evaluate_json_table_shift_plots(trained, data, tmp_path, capsys):
    out_json, plot_dir = tmp_path / "res.json", tmp_path / "plots"
    argv = ["--model", MODEL, "--pretrained", trained, "--data", data["val"]["pattern"], "--batch-size", 100,
            "--device", "cpu", "--max-samples", 300, "--out", out_json, "--shift", "--plots", plot_dir]
    rc, out, err = _run_main(evaluate.main, argv, capsys)
    assert rc == 0, err

    doc = json.loads(out_json.read_text())
    assert doc["argv"] == [str(a) for a in argv]
    assert doc["command"].startswith("python -m openclip_structure.evaluate --model structure-tiny")
    assert "--shift" in doc["command"] and doc["args"]["max_samples"] == 300
    assert list(doc["checkpoints"]) == ["base/epoch_1"]
    res = doc["checkpoints"]["base/epoch_1"]
    assert res["num_samples"] == 300 and res["num_classes"] == 10 and res["embed_dim"] == 32
    assert res["labels_used"] is True and res["labels_note"] is None
    m = res["metrics"]
    for key in GAP_KEYS + GROUP_KEYS:
        assert key in m, key
        assert isinstance(m[key], float) and math.isfinite(m[key]), (key, m[key])
    assert 0 < m["gap"] <= 2 and 0 <= m["mixed_v_measure"] <= 1
    # zero-shot classification with the digits' own class names and held-out templates
    for key in ("zeroshot_top1", "zeroshot_top5", "zeroshot_mean_per_class_recall", "i2t_class_r1", "t2i_class_r5"):
        assert 0.0 <= m[key] <= 1.0, key
    assert res["zeroshot_prompts"]["classnames"] == list(DIGIT_WORDS)
    assert res["zeroshot_prompts"]["templates"] == list(DIGIT_ZEROSHOT_TEMPLATES)

    # table: one column named after the run, a row per metric with the JSON value
    rows = _table_rows(out)
    assert rows["metric"] == ["metric", "base/epoch_1"]
    assert rows["samples"] == ["300"]
    assert float(rows["gap"][0]) == pytest.approx(m["gap"], abs=1e-4)
    assert float(rows["mixed_v_measure"][0]) == pytest.approx(m["mixed_v_measure"], abs=1e-4)

    # shift: the alpha grid, gap closed at alpha = 1, table printed
    shift = res["shift"]
    assert [r["alpha"] for r in shift] == list(evaluate.DEFAULT_ALPHAS)
    by_alpha = {r["alpha"]: r for r in shift}
    assert by_alpha[0.0]["gap"] == pytest.approx(m["gap"], rel=1e-5)
    assert by_alpha[1.0]["gap"] < 0.1 * by_alpha[0.0]["gap"]
    assert by_alpha[-0.5]["gap"] > by_alpha[0.0]["gap"]
    for r in shift:
        assert {"gap", "i2t_r1", "t2i_r1", "mixed_v_measure"} <= set(r)
    assert "shift along the gap" in out and "+1.00" in out and "-0.50" in out

    # plots: non-empty PNGs, listed in the JSON
    pngs = sorted(p.name for p in plot_dir.glob("*.png"))
    assert pngs == ["embeddings_base_epoch_1.png", "shift_base_epoch_1.png"]
    for p in plot_dir.glob("*.png"):
        assert p.stat().st_size > 5000 and p.read_bytes()[:8] == PNG_MAGIC
    assert Path(res["plots"]["embeddings"]).is_file()


@pytest.mark.slow
def test_evaluate_compare_two_columns(trained, exported, data, capsys):
    argv = ["--model", MODEL, "--data", data["val"]["pattern"], "--max-samples", 120, "--device", "cpu",
            "--compare", f"baseline={trained}", f"exported=local-dir:{exported}"]
    rc, out, err = _run_main(evaluate.main, argv, capsys)
    assert rc == 0, err
    rows = _table_rows(out)
    assert rows["metric"] == ["metric", "baseline", "exported"]
    assert len(rows["gap"]) == 2 and len(rows["mixed_v_measure"]) == 2
    # same weights through both loaders: identical numbers
    for key in ("gap", "cos_true_pairs", "i2t_r1", "mixed_v_measure"):
        assert rows[key][0] == rows[key][1], key


# ----------------------------------------------------------------------------- export


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("exported") / "base"
    info = export.export_checkpoint(MODEL, trained, out)
    assert sorted(p.name for p in out.iterdir()) == ["open_clip_config.json", "open_clip_model.safetensors"]
    return Path(info["dir"])


FRESH = textwrap.dedent("""
    import sys, numpy as np, torch, open_clip
    assert "structure-tiny" not in open_clip.list_models()
    name = "local-dir:" + sys.argv[1]
    model = open_clip.create_model(name).eval()
    tok = open_clip.get_tokenizer(name)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(4, 3, 32, 32, generator=g)
    texts = tok(["a handwritten seven", "the digit 3 written by hand", "zero", "an image of the numeral 9"])
    with torch.no_grad():
        fi = model.encode_image(images, normalize=True)
        ft = model.encode_text(texts, normalize=True)
    assert "openclip_structure" not in sys.modules
    np.savez(sys.argv[2], img=fi.numpy(), txt=ft.numpy(), tokens=texts.numpy(),
             size=np.array(model.visual.preprocess_cfg["size"]))
""")


@pytest.mark.slow
def test_export_loads_in_fresh_process(trained, exported, tmp_path):
    import open_clip

    cfg = json.loads((exported / "open_clip_config.json").read_text())
    assert set(cfg) == {"model_cfg", "preprocess_cfg"} and cfg["model_cfg"]["embed_dim"] == 32
    out = tmp_path / "fresh.npz"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, "-c", FRESH, str(exported), str(out)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    fresh = np.load(out)

    from openclip_structure.configs import register_model_configs

    register_model_configs()
    ref = open_clip.create_model(MODEL, pretrained=str(trained)).eval()
    tok = open_clip.get_tokenizer(MODEL)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(4, 3, 32, 32, generator=g)
    texts = tok(["a handwritten seven", "the digit 3 written by hand", "zero", "an image of the numeral 9"])
    with torch.no_grad():
        fi = ref.encode_image(images, normalize=True).numpy()
        ft = ref.encode_text(texts, normalize=True).numpy()
    np.testing.assert_array_equal(fresh["tokens"], texts.numpy())
    assert tuple(fresh["size"]) == (32, 32)
    np.testing.assert_allclose(fresh["img"], fi, atol=1e-6, rtol=0)
    np.testing.assert_allclose(fresh["txt"], ft, atol=1e-6, rtol=0)
    assert np.abs(fi).max() > 0.01  # not trivially zero


def test_export_strips_module_and_ignores_extra_keys(random_ckpt, tmp_path, capsys):
    _, sd = random_ckpt
    path = tmp_path / "ddp.pt"
    torch.save({"epoch": 3, "name": "ddp", "state_dict": {f"module.{k}": v for k, v in sd.items()},
                "optimizer": {"state": {}}, "structure_plugin": {"weights": [1.0, 2.0], "note": "extra"}}, path)
    rc, out, err = _run_main(export.main, ["--model", MODEL, "--checkpoint", path, "--out", tmp_path / "x"], capsys)
    assert rc == 0, err
    assert "open_clip_model.safetensors" in out
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "x" / "open_clip_model.safetensors"))
    assert set(saved) == set(sd)
    assert all(torch.equal(saved[k], sd[k]) for k in sd)
    # a second export into the same folder needs --overwrite
    rc, _, err = _run_main(export.main, ["--model", MODEL, "--checkpoint", path, "--out", tmp_path / "x"], capsys)
    assert rc == 2 and "--overwrite" in err


# ----------------------------------------------------------------------------- errors


def test_error_missing_checkpoint(tmp_path, capsys):
    missing = tmp_path / "nope" / "epoch_9.pt"
    rc, _, err = _run_main(evaluate.main, ["--model", MODEL, "--pretrained", missing, "--data", "x.tar"], capsys)
    assert rc == 2 and "checkpoint file not found" in err and str(missing) in err
    rc, _, err = _run_main(export.main, ["--model", MODEL, "--checkpoint", missing, "--out", tmp_path / "o"], capsys)
    assert rc == 2 and "checkpoint file not found" in err
    rc, _, err = _run_main(evaluate.main, ["--pretrained", f"local-dir:{tmp_path / 'nodir'}", "--data", "x.tar"],
                           capsys)
    assert rc == 2 and "model folder not found" in err


def test_error_pickled_object_refused(random_ckpt, tmp_path, capsys):
    _, sd = random_ckpt
    path = tmp_path / "with_args.pt"
    torch.save({"epoch": 1, "state_dict": sd, "args": argparse.Namespace(lr=1e-3)}, path)
    for fn, argv in ((evaluate.main, ["--model", MODEL, "--pretrained", path, "--data", "x.tar"]),
                     (export.main, ["--model", MODEL, "--checkpoint", path, "--out", tmp_path / "o"])):
        rc, _, err = _run_main(fn, argv, capsys)
        assert rc == 2, err
        assert "refusing to load" in err and "argparse.Namespace" in err and "weights_only=True" in err
    assert not (tmp_path / "o").exists()


def test_error_renamed_key_lists_keys(random_ckpt, tmp_path, capsys):
    _, sd = random_ckpt
    bad = {("text_proj" if k == "text_projection" else k): v for k, v in sd.items()}
    path = tmp_path / "renamed.pt"
    torch.save({"epoch": 1, "state_dict": bad}, path)
    for fn, argv in ((evaluate.main, ["--model", MODEL, "--pretrained", path, "--data", "x.tar"]),
                     (export.main, ["--model", MODEL, "--checkpoint", path, "--out", tmp_path / "o"])):
        rc, _, err = _run_main(fn, argv, capsys)
        assert rc == 2, err
        assert "does not match" in err
        assert "1 missing key(s): text_projection" in err and "1 unexpected key(s): text_proj" in err
        assert "Error(s) in loading state_dict" not in err  # our summary, not torch's full key dump
    assert not (tmp_path / "o").exists()


def test_error_shape_mismatch(random_ckpt, tmp_path):
    _, sd = random_ckpt
    bad = dict(sd, text_projection=torch.zeros(64, 16))
    path = tmp_path / "shape.pt"
    torch.save({"state_dict": bad}, path)
    with pytest.raises(export.CheckpointError, match=r"shape mismatch.*text_projection.*\(64, 16\)"):
        export.export_checkpoint(MODEL, path, tmp_path / "o")


def test_error_shards_without_samples(random_ckpt, tmp_path, capsys):
    ckpt, _ = random_ckpt
    empty = tmp_path / "empty.tar"
    with tarfile.open(empty, "w"):
        pass
    only_txt = tmp_path / "only_txt.tar"
    with tarfile.open(only_txt, "w") as tar:
        info = tarfile.TarInfo("a.txt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    for shard, extra in ((empty, ""), (only_txt, "1 incomplete")):
        rc, _, err = _run_main(evaluate.main, ["--model", MODEL, "--pretrained", ckpt, "--data", shard], capsys)
        assert rc == 2 and "no samples" in err and extra in err, err
    rc, _, err = _run_main(evaluate.main, ["--model", MODEL, "--pretrained", ckpt, "--data",
                                           str(tmp_path / "{00000..00001}.tar")], capsys)
    assert rc == 2 and "2 shard(s) not found" in err


def test_compare_entry_must_be_name_equals_ckpt(capsys):
    rc, _, err = _run_main(evaluate.main, ["--model", MODEL, "--data", "x.tar", "--compare", "just_a_path.pt"], capsys)
    assert rc == 2 and "NAME=CKPT" in err


# ----------------------------------------------------------------------------- reusable pieces


def test_encode_shards_without_labels_skips_group_metrics(random_ckpt, unlabelled_shards):
    ckpt, _ = random_ckpt
    model, preprocess, tokenizer = evaluate.load_model(MODEL, str(ckpt), "cpu")
    stats = {}
    img, txt, labels = evaluate.encode_shards(model, preprocess, tokenizer, unlabelled_shards, batch_size=10,
                                              device="cpu", max_samples=None, stats=stats)
    assert img.shape == txt.shape == (24, 32) and labels is None
    np.testing.assert_allclose(np.linalg.norm(img, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(txt, axis=1), 1, atol=1e-5)
    assert stats["num_samples"] == 24 and stats["num_labelled"] == 0
    # batching does not change the embeddings; max_samples takes the first N in shard order
    img2, txt2, _ = evaluate.encode_shards(model, preprocess, tokenizer, unlabelled_shards, batch_size=7,
                                           device="cpu", max_samples=9)
    np.testing.assert_allclose(img2, img[:9], atol=1e-6)
    np.testing.assert_allclose(txt2, txt[:9], atol=1e-6)

    res = evaluate.evaluate_checkpoint(MODEL, str(ckpt), unlabelled_shards, device="cpu", label="rand")
    assert res["labels_used"] is False and "no .cls labels" in res["labels_note"]
    assert "mixed_v_measure" not in res["metrics"]
    assert res["metrics"]["gap"] == pytest.approx(gap_metrics(img, txt)["gap"], abs=1e-6)
    table = evaluate.format_metrics_table({"rand": res})
    assert "group metrics skipped" in table and "mixed_v_measure" not in table


def test_zero_shot_in_evaluator_matches_independent_computation(random_ckpt, tmp_path, capsys):
    ckpt, _ = random_ckpt
    samples = digits_samples(32, 0)[:40]
    shards = write_shards(samples, tmp_path / "val", num_shards=1)["pattern"]
    names, templates = ["nought", "uno", "deux", "drei", "quattro", "five", "six", "seven", "eight", "nine"], \
        ["a sketch of {c}", "{c}!"]
    files = write_prompt_files(tmp_path / "prompts", names, templates)
    argv = ["--model", MODEL, "--pretrained", ckpt, "--data", shards, "--device", "cpu", "--out", tmp_path / "r.json",
            "--zeroshot-classnames", files["classnames"], "--zeroshot-templates", files["templates"]]
    rc, out, err = _run_main(evaluate.main, argv, capsys)
    assert rc == 0, err
    res = json.loads((tmp_path / "r.json").read_text())["checkpoints"]["epoch_0"]
    assert res["zeroshot_prompts"]["classnames"] == names
    # independently: encode images and prompts, average the unit prompt embeddings, argmax of cosine
    model, preprocess, tokenizer = evaluate.load_model(MODEL, str(ckpt), "cpu")
    img, _, labels = evaluate.encode_shards(model, preprocess, tokenizer, shards)
    with torch.no_grad():
        cls = []
        for name in names:
            e = model.encode_text(tokenizer([t.replace("{c}", name) for t in templates]), normalize=True).mean(0)
            cls.append((e / e.norm()).numpy())
    pred = (img @ np.stack(cls).T).argmax(1)
    assert res["metrics"]["zeroshot_top1"] == pytest.approx(float((pred == labels).mean()), abs=1e-9)
    assert float(_table_rows(out)["zeroshot_top1"][0]) == pytest.approx(res["metrics"]["zeroshot_top1"], abs=1e-4)
    # a class-name file that does not cover the labels is a clear error
    (tmp_path / "few.txt").write_text("a\nb\n")
    rc, _, err = _run_main(evaluate.main, argv[:-4] + ["--zeroshot-classnames", tmp_path / "few.txt"], capsys)
    assert rc == 2 and "has no class name" in err and "few.txt names 2 classes" in err


def test_plot_gap_over_training(tmp_path):
    runs = {}
    for name, start in (("clip", 0.8), ("gap", 0.7)):
        ck = tmp_path / name / "checkpoints"
        ck.mkdir(parents=True)
        lines = [json.dumps({"epoch": e, "val/gap": start / e, "val/relative_gap": 0.5 / e, "clip_val_loss": 3.0})
                 for e in range(1, 5)]
        (ck / "results.jsonl").write_text("\n".join(lines) + "\n")
        runs[name] = ck / "results.jsonl"
    png = tmp_path / "gap.png"
    assert plots.plot_gap_over_training(list(runs.values()), png) == str(png)
    assert png.stat().st_size > 5000 and png.read_bytes()[:8] == PNG_MAGIC
    parsed = plots.read_results_jsonl([tmp_path / "clip", runs["gap"]])
    assert sorted(parsed) == ["clip", "gap"] and len(parsed["clip"]) == 4
    # a dict of in-memory records works too; records without a gap key are an error
    plots.plot_gap_over_training({"a": [{"epoch": 1, "gap": 0.3}, {"epoch": 2, "gap": 0.2}]}, tmp_path / "b.png")
    assert (tmp_path / "b.png").stat().st_size > 0
    with pytest.raises(ValueError, match="gap"):
        plots.plot_gap_over_training({"a": [{"epoch": 1, "loss": 1.0}]}, tmp_path / "c.png")


def test_plot_embeddings_and_shift_curve_synthetic(tmp_path):
    rng = np.random.default_rng(0)
    img = rng.normal(size=(40, 8)) + 2
    txt = img + rng.normal(size=(40, 8)) - 4
    labels = np.repeat(np.arange(4), 10)
    p1 = plots.plot_embeddings(img, txt, labels, tmp_path / "e.png", title="synthetic")
    p2 = plots.plot_embeddings(img, txt, None, tmp_path / "e_nolabels.png")
    rows = evaluate.shift_diagnostic(img, txt, labels, alphas=(0.0, 0.5, 1.0))
    assert rows[2]["gap"] < 0.1 * rows[0]["gap"]
    p3 = plots.plot_shift_curve(rows, tmp_path / "s.png")
    for p in (p1, p2, p3):
        assert Path(p).stat().st_size > 5000
