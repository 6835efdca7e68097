"""torch's own ``torch.amp.GradScaler`` under FSDP2 (gloo, CPU, 2 processes via torchrun): why
``--fsdp --precision amp`` needs no scaler of the plugin's.

With FSDP2 every gradient is a ``Shard(0)`` DTensor, so each rank only holds (and checks) its own
part. The test puts an inf into rank 1's local gradient shard only: torch's scaler makes BOTH
ranks skip the step and halve the scale, because DTensor's handler of
``_amp_foreach_non_finite_check_and_unscale_`` all-reduces the found-inf flag over the mesh (a
check of the local shards alone would let rank 0 step and the ranks drift apart). Finite steps
follow an unsharded reference trained with its own scaler.

The worker is tests/grad_scaler_worker.py.
"""
import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(__file__)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    d = tmp_path_factory.mktemp("grad_scaler")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(HERE, "grad_scaler_worker.py"), json.dumps({"dir": str(d)})]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    out = []
    for r in range(2):
        with open(d / f"rank{r}.json") as f:
            out.append(json.load(f))
    return out


@pytest.mark.slow
def test_torch_grad_scaler_follows_the_unsharded_reference(ranks):
    for res in ranks:
        assert res["sharded"] and res["grads_dtensor"]
        for s in res["steps"]:
            assert s["fsdp"] == pytest.approx(s["ref"], rel=1e-3)  # loss of the whole batch, grad norm
        assert res["param_max_diff"] < 1e-4
        assert res["scale_after_finite_steps"] == [1024.0, 1024.0]


@pytest.mark.slow
def test_torch_grad_scaler_skips_on_every_rank_when_one_shard_overflows(ranks):
    r0, r1 = ranks
    assert r1["local_shard_has_inf"] and not r0["local_shard_has_inf"]  # rank 0's own shard is finite ...
    for res in ranks:  # ... yet it skips the step and backs off like rank 1
        assert res["params_unchanged"]
        assert res["scales"] == [1024.0, 512.0]
