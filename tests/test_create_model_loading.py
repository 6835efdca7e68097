"""What loads with plain ``open_clip.create_model`` (the README's "Checkpoints"): a ``--siglip``
checkpoint carries ``logit_bias``, which a model built from a config without ``init_logit_bias``
does not have (``logit_bias = None``), so the load fails (open_clip 3.3.0:
``AttributeError: 'NoneType' object has no attribute 'ndim'`` in its ``load_checkpoint``); ``init_logit_bias=<any float>`` (the value is then
overwritten by the checkpoint's) or a config that has the key loads it exactly."""
import json
import subprocess
import sys

import pytest

from openclip_structure.configs import MODEL_CONFIG_DIR
from openclip_structure.data.sources import digits_samples
from openclip_structure.data.writer import write_dataset

from helpers import run

pytestmark = pytest.mark.slow

LOAD = r"""
import json, sys, torch, open_clip
open_clip.add_model_config(sys.argv[1])
kwargs = json.loads(sys.argv[3])
try:
    m = open_clip.create_model(sys.argv[4], pretrained=sys.argv[2], **kwargs)
except Exception as e:
    print(json.dumps({"error": f"{type(e).__name__}: {e}"}))
    sys.exit(0)
sd = torch.load(sys.argv[2], weights_only=True)["state_dict"]
diff = max((m.state_dict()[k].reshape(v.shape) - v).abs().max().item() for k, v in sd.items())
print(json.dumps({"diff": diff, "logit_bias": m.logit_bias.item(), "saved": sd["logit_bias"].item()}))
"""


@pytest.fixture(scope="module")
def siglip_checkpoint(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("siglip")
    shards = write_dataset(digits_samples()[:96], tmp / "wds", train_shards=2, val_shards=1)
    run(["--train-data", shards["train"]["pattern"], "--dataset-type", "webdataset", "--train-num-samples", "64",
         "--model", "structure-tiny", "--batch-size", "32", "--epochs", "1", "--workers", "1", "--lr", "1e-2",
         "--warmup", "1", "--siglip", "--gap-atp-weight", "1", "--logs", str(tmp), "--name", "s"])
    return tmp / "s" / "checkpoints" / "epoch_1.pt"


def load(ckpt, config_dir, model="structure-tiny", **kwargs):
    proc = subprocess.run([sys.executable, "-c", LOAD, str(config_dir), str(ckpt), json.dumps(kwargs), model],
                          capture_output=True, text=True, timeout=120, cwd="/")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_siglip_checkpoint_needs_init_logit_bias(siglip_checkpoint):
    plain = load(siglip_checkpoint, MODEL_CONFIG_DIR)
    error = plain.get("error", "")
    # open_clip 3.x's load_checkpoint reads model.logit_bias.ndim of a model whose logit_bias is None;
    # a strict load_state_dict would name the unexpected key
    assert "'NoneType' object has no attribute 'ndim'" in error or "logit_bias" in error, plain
    loaded = load(siglip_checkpoint, MODEL_CONFIG_DIR, init_logit_bias=0.0)
    assert loaded["diff"] == 0.0
    assert loaded["logit_bias"] == loaded["saved"] != 0.0  # the checkpoint's bias, not the 0.0 given


def test_siglip_checkpoint_loads_with_a_config_that_has_init_logit_bias(siglip_checkpoint, tmp_path):
    with open(f"{MODEL_CONFIG_DIR}/structure-tiny.json") as f:
        config = json.load(f)
    config["init_logit_bias"] = -10
    (tmp_path / "structure-tiny-siglip.json").write_text(json.dumps(config))
    loaded = load(siglip_checkpoint, tmp_path, model="structure-tiny-siglip")
    assert loaded["diff"] == 0.0 and loaded["logit_bias"] == loaded["saved"]
