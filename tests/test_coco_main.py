"""COCO-protocol ``--val-data`` validation on open_clip main (task API), as on 3.x
(test_multicaption.py::test_val_data_uses_the_coco_protocol): multi-caption validation shards (the
``.txt`` lines, or with ``--json-text-key`` the named ``.json`` fields) give validation results equal
to the evaluator's on the saved checkpoint, every caption its own text."""
from openclip_structure.data.reader import Sample
from openclip_structure.data.sources import digits_samples
from openclip_structure.data.writer import write_shards

from test_json_captions import KEYS, as_meta, digit_captions, write_json_shard
from test_multicaption import coco_val_results
from test_open_clip_main import on_main, pytestmark  # noqa: F401 (slow; skipped without the snapshot)


def _train_args(train, val, logs, name, extra=()):
    return ["--train-data", train, "--dataset-type", "webdataset", "--train-num-samples", "64", "--val-data", val,
            "--val-num-samples", "40", "--model", "structure-tiny", "--batch-size", "32", "--epochs", "1",
            "--workers", "1", "--lr", "1e-3", "--warmup", "1", "--logs", str(logs), "--name", name, "--seed", "0",
            "--gap-atp-weight", "0.5"] + list(extra)


def _checked_log(run_dir, val, json_text_key=None):
    coco_val_results(run_dir, val, json_text_key)  # validation == the evaluator's COCO protocol
    log = (run_dir / "out.log").read_text()
    assert "40 images / 79 captions (extra pass)" in log
    return log


def test_val_data_txt_lines_use_the_coco_protocol_on_main(tmp_path):
    digits = digits_samples()[:104]
    train = write_shards([Sample(s.key, s.image, f"{s.caption}\nthe digit {s.label}", s.label) for s in digits[:64]],
                         tmp_path / "train", num_shards=2)["pattern"]
    val = write_shards([Sample(s.key, s.image, "\n".join(c), s.label) for s, c in zip(*digit_captions(40, 64))],
                       tmp_path / "val", num_shards=1)["pattern"]
    on_main(_train_args(train, val, tmp_path / "logs", "coco"))
    log = _checked_log(tmp_path / "logs" / "coco", val)
    assert "several captions per image (the .txt lines)" in log and "through the task API" in log


def test_val_data_json_text_key_fields_use_the_coco_protocol_on_main(tmp_path):
    """--json-text-key on main: open_clip's validation reads one field per sample; ours scores every
    named field as its own text (the decoy .txt beside them is not read)."""
    digits = digits_samples()[:104]
    train = write_json_shard(tmp_path / "train.tar", [(s.key, s.image, s.label, as_meta([s.caption]))
                                                      for s in digits[:64]])
    val = write_json_shard(tmp_path / "val.tar", [(s.key, s.image, s.label, as_meta(c))
                                                  for s, c in zip(*digit_captions(40, 64))])
    on_main(_train_args(train, val, tmp_path / "logs", "coco_json", ["--json-text-key", KEYS]))
    log = _checked_log(tmp_path / "logs" / "coco_json", val, json_text_key=KEYS)
    assert f"several captions per image (the .json fields '{KEYS}')" in log


def test_val_data_coco_protocol_under_mains_fsdp(tmp_path):
    """torchrun, 2 processes, open_clip main's own --fsdp: every rank runs the COCO pass in lockstep
    on the sharded model (rank 0 alone would wait forever for the others' all-gathers); the numbers
    rank 0 logs are the evaluator's on the saved checkpoint."""
    digits = digits_samples()[:104]
    train = write_shards([Sample(s.key, s.image, s.caption, s.label) for s in digits[:64]],
                         tmp_path / "train", num_shards=2)["pattern"]
    val = write_shards([Sample(s.key, s.image, "\n".join(c), s.label) for s, c in zip(*digit_captions(40, 64))],
                       tmp_path / "val", num_shards=1)["pattern"]
    on_main(_train_args(train, val, tmp_path / "logs", "fsdp", ["--fsdp", "--precision", "fp32"]), nproc=2,
            timeout=500)
    log = _checked_log(tmp_path / "logs" / "fsdp", val)
    assert "FSDP2" in log
