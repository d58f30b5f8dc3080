"""OQFL on Flower's deployment engine (oqfl_ext.fl.flower): a SuperLink and 3 SuperNodes as
separate processes on 127.0.0.1, one run of 3 rounds on a small Fashion-MNIST subset started
with ``flwr run``:

* rounds 0-1 with every node: the global model equals the in-process trainer's (same seed and
  partitions) within float tolerance, and the blobs' lengths (and Flower's own traffic count)
  match what the in-process clients produce;
* a run whose ServerApp fails is reported as failed (``flwr run`` exits 0 all the same);
* in round 2, SuperNode 2's ClientApp holds once it has decoded the global model (the
  ``OQFL_FLOWER_HOLD`` fault-injection point of :mod:`oqfl_ext.fl.flower.client_app`, which
  creates a file the test waits for), and the test then kills the SuperNode (SIGKILL to its
  process group, ClientApp included): the round completes with the other two as soon as the
  SuperLink reports the node unavailable (its heartbeats stopped), the dead node's model blob
  is listed as sent but unconfirmed, and in round 3 the node is no longer connected, so it is
  sent nothing and listed as not delivered;
* the run finishes with status ``finished:completed`` (``flwr run`` itself exits 0 even when a
  ServerApp fails, so the status is what is checked) and the final model equals an in-process
  run where client 2 fails in round 2 and is unreachable in round 3;
* Flower's own traffic count bounds the run's byte counts from both sides: what the ServerApp
  counts as delivered (plus the held node's blob, which the test knows arrived) is at most
  what Flower sent, and Flower sent no more than that plus its framing, which is smaller than
  one model blob per message (so a blob counted but never sent, or sent but not counted,
  would show).

Nothing here waits for a fixed time: every wait is for an event (a file, a status, a log
line), with deadlines that only bound a failure and are generous for a loaded 2-core machine.
Every process the test starts is stopped by it (LocalFederation's context manager), which the
test checks too. Skipped when flwr is missing, unless OQFL_REQUIRE_FLOWER=1 (then it fails).
About 2-3 minutes on 2 cores (idle SuperNodes poll every 3 s; round 2 lasts until the
SuperLink misses two of the killed node's 30 s heartbeats).
"""

from __future__ import annotations

import os
import time

import pytest

if os.environ.get("OQFL_REQUIRE_FLOWER") == "1":  # CI: a missing extra is a failure, not a skip
    import flwr  # noqa: F401
pytest.importorskip("flwr", reason="flwr is not installed (pip install '.[flower]', "
                                   "the optional Flower extra)")

from oqfl_ext.data import fashion_mnist_dir  # noqa: E402
from oqfl_ext.fl.flower import FLWR_VERSION, NO_PHONE_HOME  # noqa: E402
from oqfl_ext.fl.flower.client_app import HOLD_ENV  # noqa: E402
from oqfl_ext.fl.flower.local import LocalFederation, RunFailed, group_alive  # noqa: E402
from oqfl_ext.fl import experiment as ex  # noqa: E402
from oqfl_ext.fl.flower.task import parse_run_config, run_in_process  # noqa: E402
from oqfl_ext.fl.metrics import load_run  # noqa: E402
from oqfl_ext.fl.server import NotDelivered  # noqa: E402
from helpers import assert_state_close, torch_threads  # noqa: E402

pytestmark = pytest.mark.skipif(
    fashion_mnist_dir() is None,
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")

# only bounds a failure (a round whose node never answers and is never reported gone)
ROUND_TIMEOUT = float(os.environ.get("OQFL_FLOWER_TEST_ROUND_TIMEOUT", "600"))
KILL_ROUND = 2  # node 2 is killed holding this round's message, and is gone in the next
RUN_CONFIG = {"clients": 3, "rounds": 4, "seed": 5, "train-subset": 300, "test-subset": 200,
              "image-size": 14, "width": 8, "weight-bits": 4, "act-bits": 4, "uplink": "int4",
              "error-feedback": True, "batch-size": 25, "lr": 0.05, "momentum": 0.9,
              "fraction": 1.0, "threads": 1, "round-timeout": ROUND_TIMEOUT,
              "wait-nodes-timeout": 600.0}
C0, C1, C2 = "client-0", "client-1", "client-2"


# Flower's bytes per message besides the blobs (protobuf metadata, object tree, record and
# chunk headers, the reply's acknowledgements), an upper bound measured with flwr 1.41.0
FRAMING_PER_MESSAGE = 4000


class _Recording:
    """An in-process client that keeps its blobs, fails in ``fail_round`` and is unreachable
    after it."""

    def __init__(self, client, fail_round=None):
        self.inner, self.client_id, self.fail_round = client, client.client_id, fail_round
        self.num_samples = client.num_samples
        self.blobs = {}

    def train(self, global_state, model_fn, *, round_idx=0, **kw):
        if self.fail_round is not None and round_idx > self.fail_round:
            raise NotDelivered("gone")
        if round_idx == self.fail_round:
            raise RuntimeError("killed")
        blob = self.inner.train(global_state, model_fn, round_idx=round_idx, **kw)
        self.blobs[round_idx] = blob
        return blob


def _reference(cfg, settings):
    """The in-process run of the same experiment, client 2 failing in KILL_ROUND."""
    with torch_threads(settings.threads):  # as in the Flower processes: same float results
        data = ex.load_data(cfg)
        parts = ex.make_partitions(cfg, data.train_y)
        clients = [_Recording(ex.make_client(cfg, data, parts, i),
                              KILL_ROUND if i == 2 else None) for i in range(cfg.clients)]
        server = ex.make_server(cfg, data, parts, clients)
        results = [server.run_round(r) for r in range(cfg.rounds)]
    return server, results, clients


def _wait_for(predicate, timeout, what, fed):
    """Polls ``predicate`` (an event: a file, a status) until it holds; the deadline only
    bounds a failure."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}\n{fed.log_tail()}")
        time.sleep(0.05)


def test_flower_federation_matches_in_process_and_survives_a_killed_node(tmp_path):
    import flwr

    assert flwr.__version__ == FLWR_VERSION
    cfg, settings = parse_run_config(RUN_CONFIG)
    t_start = time.monotonic()
    held = tmp_path / "node2-holds-round"
    fed = LocalFederation(tmp_path / "fed", nodes=3,
                          node_env={2: {HOLD_ENV: f"{KILL_ROUND}:{held}"}})
    procs = []
    with fed:
        procs = [fed.superlink, *fed.supernodes]
        for p in procs:  # the no-phone-home switches reach every process
            env = fed.envs[p.pid]
            assert all(env.get(k) == v for k, v in NO_PHONE_HOME.items())
            assert env["FLWR_HOME"] == str(fed.flwr_home)
        # `flwr run` succeeds (exit 0) for a run whose ServerApp then fails: the status says it
        bad = fed.submit(dict(RUN_CONFIG, partition="bogus"))
        info = fed.wait(bad, timeout=900, check=False)
        assert info["status"] == "finished:failed", info
        with pytest.raises(RunFailed, match="finished:failed"):
            fed.wait(bad, timeout=900)

        run_id = fed.submit(RUN_CONFIG)
        # node 2's ClientApp creates the file once it has decoded round KILL_ROUND's model
        _wait_for(held.exists, timeout=1800, what=f"node 2 to hold round {KILL_ROUND}",
                  fed=fed)
        fed.kill_node(2)  # SIGKILL: SuperNode and ClientApp, no goodbye to the SuperLink
        info = fed.wait(run_id, timeout=1800)  # raises unless finished:completed
        assert info["status"] == "finished:completed"
    # every process the federation started is gone, children included
    assert all(p.poll() is not None for p in procs)
    assert not any(group_alive(p.pid) for p in procs)
    flower_s = time.monotonic() - t_start

    config, rounds = load_run(fed.out_dir)
    assert config["engine"] == "flower" and config["run_id"] == run_id
    assert [r["round"] for r in rounds] == list(range(cfg.rounds))
    assert sorted(config["nodes"]) == ["0", "1", "2"]
    assert config["flwr_env"] == NO_PHONE_HOME  # and the ServerApp (SuperLink's child) has them

    server, ref, clients = _reference(cfg, settings)
    blob_len = rounds[0]["downlink_bytes"] // 3  # the same model blob length every round
    for got, want in zip(rounds, ref):
        assert got["sampled"] == want.sampled
        assert got["accepted"] == want.accepted, (got["round"], got["dropped"])
        assert got["num_samples"] == want.num_samples
        # the bytes that crossed the wire are the blobs, one per answering client
        assert got["uplink_bytes"] == want.uplink_bytes
        assert got["not_delivered"] == want.not_delivered
        if got["round"] == KILL_ROUND:
            # in process the failing client had the state; over Flower nothing came back
            assert got["unconfirmed"] == [C2] and want.unconfirmed == []
            assert got["downlink_unconfirmed_bytes"] == blob_len
            assert got["downlink_bytes"] + blob_len == want.downlink_bytes
        else:
            assert got["unconfirmed"] == [] and got["downlink_unconfirmed_bytes"] == 0
            assert got["downlink_bytes"] == want.downlink_bytes
        for cid in want.accepted:
            c = next(c for c in clients if c.client_id == cid)
            assert got["clients"][cid]["blob_bytes"] == len(c.blobs[got["round"]])
        assert got["accuracy"] == pytest.approx(want.accuracy, abs=0.011)
        assert got["loss"] == pytest.approx(want.loss, rel=1e-3, abs=1e-3)
    # the killed node's round: completed with the others once Flower reported it gone
    killed = rounds[KILL_ROUND]
    assert killed["accepted"] == [C0, C1]
    assert [d[0] for d in killed["dropped"]] == [C2]
    assert "node unavailable" in killed["dropped"][0][1], killed["dropped"]
    # the round after: the node is not connected, nothing is sent to it
    gone = rounds[KILL_ROUND + 1]
    assert gone["not_delivered"] == [C2] and gone["accepted"] == [C0, C1]
    assert gone["downlink_bytes"] == 2 * blob_len
    assert "not delivered" in gone["dropped"][0][1]

    # the global model: the in-process one within float tolerance
    from safetensors.torch import load_file

    assert_state_close(load_file(fed.out_dir / "model.safetensors"), server.model.state_dict())

    # Flower's own count of the run's traffic against the ServerApp's, both ways
    traffic = info["network-traffic"]
    up = sum(r["uplink_bytes"] for r in rounds)
    down = sum(r["downlink_bytes"] for r in rounds)
    unconfirmed = sum(r["downlink_unconfirmed_bytes"] for r in rounds)
    messages = 3 + sum(len(r["sampled"]) - len(r["not_delivered"]) for r in rounds)
    framing = traffic["outbound-bytes"] - (down + unconfirmed)  # the held node had its blob
    print(f"flower run: {flower_s:.1f} s, round times "
          f"{[round(r['wall_time_s'], 1) for r in rounds]}, traffic {traffic}, "
          f"down {down} + unconfirmed {unconfirmed}, up {up}, {messages} messages, "
          f"blob {blob_len} B, framing out {framing} B, in {traffic['inbound-bytes'] - up} B")
    assert 0 <= framing < messages * FRAMING_PER_MESSAGE, (framing, messages)
    assert FRAMING_PER_MESSAGE < blob_len  # so one blob too many or too few shows
    up_framing = traffic["inbound-bytes"] - up
    assert 0 <= up_framing < messages * FRAMING_PER_MESSAGE, (up_framing, messages)


def test_a_node_config_names_a_partition_of_the_run():
    """The ClientApp's check of its SuperNode's node config against the run config (fast: no
    federation)."""
    from flwr.app import Context, RecordDict

    from oqfl_ext.fl.flower.client_app import _partition

    cfg, _ = parse_run_config(RUN_CONFIG)

    def context(node_config):
        return Context(run_id=1, node_id=2, node_config=node_config, state=RecordDict(),
                       run_config=RUN_CONFIG)

    assert _partition(context({"partition-id": 2, "num-partitions": 3}), cfg) == 2
    for node_config, match in (({}, "needs --node-config"),
                               ({"partition-id": 3, "num-partitions": 3}, "does not fit"),
                               ({"partition-id": 0, "num-partitions": 4}, "clients=3"),
                               ({"partition-id": "0", "num-partitions": 3},
                                "partition-id expected an integer")):
        with pytest.raises(ValueError, match=match):
            _partition(context(node_config), cfg)


def test_flower_carries_the_delta_downlink_as_in_process(tmp_path):
    """The compressed downlink over Flower: 3 SuperNodes, 2 sampled per round, so clients miss
    rounds and catch up. Every round's bytes per direction, and which clients got a snapshot,
    equal the in-process run's (each node holds the broadcast model between rounds in its
    context.state and applies its chain or snapshot to it; a node holding another model would
    refuse its blob and be dropped); first contact is a sparse snapshot on the initial
    template each node builds from the run config (a node whose template differed would
    refuse it and be dropped); Flower's own traffic count bounds the downlink from both
    sides."""
    run_config = dict(RUN_CONFIG, rounds=4, fraction=0.67, downlink="int4-delta",
                      **{"uplink-compression": "zstd"})
    cfg, settings = parse_run_config(run_config)
    with LocalFederation(tmp_path / "fed", nodes=3) as fed:
        run_id = fed.submit(run_config)
        info = fed.wait(run_id, timeout=1800)
    config, rounds = load_run(fed.out_dir)
    assert config["downlink"] == "int4-delta" and config["uplink_compression"] == "zstd"

    with torch_threads(settings.threads):
        _, ref = run_in_process(cfg)
    last, came_back = {}, []  # client -> last round sampled
    for got, want in zip(rounds, ref):
        assert got["sampled"] == want.sampled and len(want.sampled) == 2
        assert got["accepted"] == want.accepted, (got["round"], got["dropped"])
        assert got["downlink_snapshots"] == want.downlink_snapshots
        assert got["downlink_bytes"] == want.downlink_bytes
        assert got["uplink_bytes"] == want.uplink_bytes
        assert got["total_bytes"] == want.uplink_bytes + want.downlink_bytes
        assert want.downlink_snapshots == []  # first contacts too: sparse snapshots
        came_back += [c for c in want.sampled if last.get(c, want.round - 1) < want.round - 1]
        last.update({c: want.round for c in want.sampled})
    # a client came back after missing a round and caught up with a chain
    assert came_back
    traffic = info["network-traffic"]
    down = sum(r["downlink_bytes"] for r in rounds)
    messages = 3 + sum(len(r["sampled"]) for r in rounds)
    assert 0 <= traffic["outbound-bytes"] - down < messages * FRAMING_PER_MESSAGE, traffic
