"""A user's own Flower app with OQFL (examples/flower_user_app: a small CNN on scikit-learn's
digits, the user's train loop, ``ClientApp(mods=[oqfl_mod])`` and ``OQFLFedAvg``) on Flower's
deployment engine: a SuperLink and 3 SuperNodes as separate processes on 127.0.0.1
(:class:`oqfl_ext.fl.flower.local.LocalFederation`, as test_flower.py), ``flwr run`` of the app
folder, 3 rounds.

Checked: the run finishes ``finished:completed``; every round accepts the 3 nodes' blobs and
drops none; what crossed the wire upwards is the blobs (Flower's own inbound traffic count is
their total plus a bounded framing per message) and each blob is a fraction of the float32
model; the model learns (central test accuracy from chance to above 85 %), and the saved final
model, evaluated here on the same test split, gives the accuracy the ServerApp reported; every
process is gone afterwards. Waits are for events (the run's status), never for a fixed time.
Skipped without flwr (unless OQFL_REQUIRE_FLOWER=1) or scikit-learn. About a minute on 2 cores.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

if os.environ.get("OQFL_REQUIRE_FLOWER") == "1":  # CI: a missing extra is a failure, not a skip
    import flwr  # noqa: F401
pytest.importorskip("flwr", reason="flwr is not installed (pip install '.[flower]')")
pytest.importorskip("sklearn", reason="the example's data are scikit-learn's digits")

from oqfl_ext.fl.flower.local import LocalFederation, group_alive  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "flower_user_app"
ROUNDS = 3
NODES = 3
# Flower's bytes per reply besides the blob (protobuf metadata, the metrics record, chunk
# headers): an upper bound, as in test_flower.py, and far below one blob
FRAMING_PER_MESSAGE = 4000


def test_users_flower_app_with_oqfl_mod_and_strategy(tmp_path):
    app = tmp_path / "app"
    shutil.copytree(EXAMPLE, app, ignore=shutil.ignore_patterns("__pycache__"))
    fed = LocalFederation(tmp_path / "fed", nodes=NODES, app_dir=app)
    with fed:
        procs = [fed.superlink, *fed.supernodes]
        run_id = fed.submit({"num-server-rounds": ROUNDS, "min-nodes": NODES})
        info = fed.wait(run_id, timeout=1800)  # raises unless finished:completed
    assert info["status"] == "finished:completed"
    assert all(p.poll() is not None for p in procs)
    assert not any(group_alive(p.pid) for p in procs)

    rounds = json.loads((fed.out_dir / "rounds.json").read_text())
    assert [r["round"] for r in rounds] == list(range(ROUNDS + 1))
    for r in rounds[1:]:
        assert len(r["accepted"]) == NODES and r["dropped"] == [], r
    assert rounds[0]["accuracy"] < 0.3  # an untrained model: about chance (10 classes)
    assert rounds[-1]["accuracy"] > 0.85, rounds

    # the final model, evaluated here with the example's own code, is the one reported
    sys.path.insert(0, str(app))
    try:
        task = importlib.import_module("digits_app.task")
    finally:
        sys.path.remove(str(app))
    from safetensors.torch import load_file

    model = task.Net()
    model.load_state_dict(load_file(fed.out_dir / "model.safetensors"))
    _, acc = task.test(model, *task.load_data())
    assert acc == pytest.approx(rounds[-1]["accuracy"], abs=1e-6)

    # upwards, the wire carried the blobs: each far smaller than the float32 model
    float_bytes = sum(v.numel() * 4 for v in model.state_dict().values()
                      if v.is_floating_point())
    uplink = sum(r["uplink_bytes"] for r in rounds[1:])
    per_blob = uplink / (ROUNDS * NODES)
    inbound = info["network-traffic"]["inbound-bytes"]
    print(f"user app: blobs {per_blob:.0f} B each against {float_bytes} B float32 "
          f"({per_blob / float_bytes:.3f}); Flower inbound {inbound} B, uplink {uplink} B; "
          f"accuracy {[round(r['accuracy'], 4) for r in rounds]}")
    assert per_blob < 0.35 * float_bytes
    assert 0 <= inbound - uplink < ROUNDS * NODES * FRAMING_PER_MESSAGE
    assert FRAMING_PER_MESSAGE < float_bytes  # so float32 arrays sent instead would show
    for v in model.state_dict().values():
        assert bool(torch.isfinite(v.double()).all())
