"""OQFL on Flower's simulation runtime (oqfl_ext.fl.flower.simulate): the package's ServerApp and
ClientApp with 20 virtual SuperNodes (Ray actors), 2 sampled per round, 2 rounds on a small
Fashion-MNIST subset, started with ``flwr run`` on a simulation SuperLink:

* the run finishes with status ``finished:completed``, every virtual SuperNode's partition is
  mapped, and the global model equals the in-process trainer's (same seed and partitions, same
  torch threads) within float tolerance; each round samples, accepts and counts the same
  clients and bytes, and each client's blob has the in-process client's length;
* the peak memory covers Ray's processes (raylet, the ClientApp actors), and every process of
  the run is gone once the simulation has stopped, those that outlived their parents included.

And without Flower: :class:`ProcessTree` finds a process whose parent died, measures the memory
it touched, and stops it.

Nothing waits for a fixed time: every wait is for an event (a line on a pipe, a status, a
process gone), with deadlines that only bound a failure. The simulation is skipped when flwr or
Ray is missing, unless OQFL_REQUIRE_FLOWER=1 (then it fails). About 40 s on 2 cores (mostly
Ray's start).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from oqfl_ext.data import fashion_mnist_dir
from oqfl_ext.fl.flower import flwr_available
from oqfl_ext.fl.flower.simulate import LocalSimulation, ProcessTree, ray_available

if os.environ.get("OQFL_REQUIRE_FLOWER") == "1":  # CI: a missing extra is a failure, not a skip
    import flwr  # noqa: F401
    import ray  # noqa: F401

needs_simulation = pytest.mark.skipif(
    not (flwr_available() and ray_available()),
    reason="flwr[simulation] is not installed (pip install \"flwr[simulation]==1.41.0\": Ray)")
needs_fashion_mnist = pytest.mark.skipif(
    fashion_mnist_dir() is None,
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")

NODES = 20
RUN_CONFIG = {"rounds": 2, "seed": 3, "train-subset": 400, "test-subset": 200,
              "image-size": 14, "width": 8, "weight-bits": 4, "act-bits": 4, "uplink": "int4",
              "error-feedback": True, "batch-size": 10, "lr": 0.05, "momentum": 0.9,
              "fraction": 0.1, "threads": 1, "round-timeout": 600.0,
              "wait-nodes-timeout": 600.0}


@needs_simulation
@needs_fashion_mnist
def test_simulation_matches_in_process(tmp_path):
    from safetensors.torch import load_file

    from helpers import assert_state_close, torch_threads
    from oqfl_ext.fl.flower.task import parse_run_config, run_in_process
    from oqfl_ext.fl.metrics import load_run

    run_config = dict(RUN_CONFIG, clients=NODES)
    cfg, settings = parse_run_config(run_config)
    # one ClientApp actor: fewer processes to start on a 2-core machine
    sim = LocalSimulation(tmp_path / "sim", NODES, cpus_per_client=1, ray_cpus=1,
                          memory_interval=0.2)
    with sim:
        run_id = sim.submit(run_config)
        info = sim.wait(run_id, timeout=900)  # raises unless finished:completed
    assert info["status"] == "finished:completed"
    # every process of the run is gone, whoever its parent was
    assert sim.tree.survivors() == []

    config, rounds = load_run(sim.out_dir)
    assert config["engine"] == "flower" and config["run_id"] == run_id
    assert sorted(config["nodes"], key=int) == [str(i) for i in range(NODES)]
    assert len(set(config["nodes"].values())) == NODES

    with torch_threads(settings.threads):
        server, ref = run_in_process(cfg)
    assert [r["round"] for r in rounds] == list(range(cfg.rounds))
    for got, want in zip(rounds, ref):
        assert got["sampled"] == want.sampled and len(want.sampled) == 2
        assert got["accepted"] == want.accepted, (got["round"], got["dropped"])
        assert got["num_samples"] == want.num_samples
        assert got["uplink_bytes"] == want.uplink_bytes
        assert got["downlink_bytes"] == want.downlink_bytes
        assert sum(c["blob_bytes"] for c in got["clients"].values()) == want.uplink_bytes
        assert got["accuracy"] == pytest.approx(want.accuracy, abs=0.011)
        assert got["loss"] == pytest.approx(want.loss, rel=1e-3, abs=1e-3)
    assert_state_close(load_file(sim.out_dir / "model.safetensors"), server.model.state_dict())

    mem = sim.tree.report()
    print(f"simulation: memory {mem}, round times "
          f"{[round(r['wall_time_s'], 2) for r in rounds]}, partition map "
          f"{config['partition_map_s']} s, left behind {sim.left_behind}")
    names = mem["process_names"]
    assert "raylet" in names and any(n.startswith("ray::") for n in names), names
    assert 0 < mem["peak_pss_bytes"] <= mem["peak_rss_bytes"] <= mem["sum_peak_rss_bytes"]
    assert (sim.run_dir / "memory.json").is_file()


_CHILD = ("import sys, time\n"
          "data = b'x' * (64 << 20)\n"  # 64 MiB written: resident
          "print('ready', flush=True)\n"
          "time.sleep(600)\n")
_PARENT = ("import subprocess, sys\n"
           f"p = subprocess.Popen([sys.executable, '-c', {_CHILD!r}], stdout=sys.stdout)\n"
           "print(p.pid, flush=True)\n"
           "sys.stdin.read()\n")  # exits when the test closes its stdin


def test_process_tree_follows_orphans_and_stops_them():
    parent = subprocess.Popen([sys.executable, "-c", _PARENT], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    tree = ProcessTree(parent.pid, interval=60)  # sampled by hand below
    try:
        lines = sorted(parent.stdout.readline().strip() for _ in range(2))
        assert lines[1] == "ready"  # the child's memory is written
        child = int(lines[0])
        tree.sample()
        assert child in tree.known and parent.pid in tree.known
        assert tree.peak_rss >= 64 << 20
        assert tree.peak_pss <= tree.peak_rss <= tree.sum_hwm
        parent.stdin.close()  # the parent exits; the child is orphaned
        parent.wait(timeout=60)
        tree.sample()  # still known by pid and start time
        assert tree.survivors() == [child]
        assert tree.stop_survivors(grace=30) == [child]
        assert tree.survivors() == []
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        parent.stdout.close()
        for pid in tree.survivors():  # only the child this test started
            os.kill(pid, 9)
