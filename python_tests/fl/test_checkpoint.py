"""Robustness of federated runs: per-round checkpoints (safetensors + JSON), resuming a killed run
to the uninterrupted run's exact model, refusing a resume with other options, damaged
checkpoints, and clients dropped for exceeding their time limit. Tiny models; a few seconds on
2 cores (the subprocess test kills a real ``python -m oqfl_ext.fl`` run)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from oqfl_ext.data import fashion_mnist_dir
from oqfl_ext.fl import (Client, ClientConfig, ClientTimeout, Server, encode_update)
from oqfl_ext.fl import checkpoint as ck
from oqfl_ext.fl.cli import main
from oqfl_ext.fl.client import float_state
from oqfl_ext.models import SmallCNN
from oqfl_ext.nn import quantize_model

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one thread is as fast and does not suffer from a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

# ----------------------------------------------------------------------------------------------
# tiny tasks


def _blobs(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    centers = torch.eye(8)[:3] * 3
    y = torch.randint(0, 3, (n,), generator=g)
    return centers[y] + 0.5 * torch.randn(n, 8, generator=g), y


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))


def _images(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    x = torch.randn(n, 1, 8, 8, generator=g) * 0.5
    x[torch.arange(n), 0, y * 2, :] += 2.0  # a class-dependent bright row
    return x, y


def _qcnn() -> nn.Module:
    return quantize_model(SmallCNN(in_channels=1, num_classes=4, image_size=8, width=4),
                          weight_bits=4, act_bits=4)


TASKS = {
    "mlp": (_mlp, _blobs, (_blobs(90, 999))),
    "lsq-cnn": (_qcnn, _images, (_images(60, 999))),
}


def _server(task: str, seed: int = 3) -> Server:
    model_fn, data, test = TASKS[task]
    cfg = ClientConfig(batch_size=16, lr=0.1, momentum=0.9, uplink_bits=4, stochastic=True,
                       error_feedback=True)
    clients = [Client(f"c{i}", data(n, 10 + i), cfg, seed=100 + i)
               for i, n in enumerate([24, 32, 40, 48])]
    return Server(model_fn, test, clients=clients, seed=seed, fraction=0.5, server_momentum=0.5)


def _assert_same_state(a: Server, b: Server) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["round"] == sb["round"]
    assert list(sa["model"]) == list(sb["model"])
    for k in sa["model"]:
        assert sa["model"][k].dtype == sb["model"][k].dtype
        assert torch.equal(sa["model"][k], sb["model"][k]), k
    assert (sa["momentum"] is None) == (sb["momentum"] is None)
    for k in sa["momentum"] or {}:
        assert torch.equal(sa["momentum"][k], sb["momentum"][k]), k
    assert sa["clients"].keys() == sb["clients"].keys()
    for cid in sa["clients"]:
        ra, rb = sa["clients"][cid], sb["clients"][cid]
        assert ra.keys() == rb.keys()
        assert all(torch.equal(ra[k], rb[k]) for k in ra), cid


def _strip_times(records):
    return [{k: v for k, v in r.items() if k != "wall_time_s"} for r in records]


@contextlib.contextmanager
def disk_full(monkeypatch, folder, name_pattern: str):
    """Within the block, writing a file into ``folder`` whose name (or its temporary file's)
    matches ``name_pattern`` fails as on a full disk: ``os.fsync`` of it raises ENOSPC, where a
    buffered write's missing space surfaces at the latest. Other files are written normally."""
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc/self/fd to tell which file a descriptor writes")
    real = os.fsync
    folder = Path(os.path.realpath(folder))

    def fsync(fd):
        fd = fd if isinstance(fd, int) else fd.fileno()
        target = Path(os.readlink(f"/proc/self/fd/{fd}"))
        if target.parent == folder and re.search(name_pattern, target.name):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    try:
        yield
    finally:
        monkeypatch.setattr(os, "fsync", real)


# ----------------------------------------------------------------------------------------------
# kill and resume (Python API): fresh objects, as in a new process


@pytest.mark.parametrize("task", list(TASKS))
def test_resume_equals_uninterrupted_run(task, tmp_path):
    rounds, kill_after = 4, 2
    full = _server(task)
    full_records = full.fit(rounds, checkpoint_dir=tmp_path / "full", config={"task": task})

    first = _server(task)
    first.fit(kill_after, checkpoint_dir=tmp_path / "cut", config={"task": task})
    assert ck.load_checkpoint(tmp_path / "cut").round == kill_after
    del first  # "killed": nothing survives but the folder

    torch.manual_seed(12345)  # whatever the new process's global RNG holds
    resumed = _server(task)
    records = resumed.fit(rounds, checkpoint_dir=tmp_path / "cut", config={"task": task},
                          resume=True)
    _assert_same_state(full, resumed)
    assert _strip_times(records) == _strip_times(full_records)
    assert len(records) == rounds
    # the EF residuals and the momentum were part of what had to be restored
    assert resumed.momentum is not None
    assert any(c.residual is not None for c in resumed.clients)


def test_checkpoint_files_are_safetensors_and_json(tmp_path):
    server = _server("mlp")
    server.fit(3, checkpoint_dir=tmp_path, config={"a": 1}, keep=1)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["checkpoint-r000003.safetensors", "checkpoint.json"]  # older removed
    doc = json.loads((tmp_path / "checkpoint.json").read_text())
    assert doc["format"] == "oqfl-checkpoint" and doc["round"] == 3 and len(doc["rounds"]) == 3
    from safetensors import safe_open
    with safe_open(str(tmp_path / doc["tensors"]), "pt") as f:
        keys = set(f.keys())
    assert "model::1.num_batches_tracked" in keys and "rng::torch" in keys
    assert any(k.startswith("momentum::") for k in keys)
    assert any(k.startswith("client::") and "::residual." in k for k in keys)
    # keep=2 keeps the previous tensors file as well
    server.fit(4, checkpoint_dir=tmp_path, config={"a": 1}, resume=True, keep=2)
    assert len(list(tmp_path.glob("checkpoint-r*.safetensors"))) == 2


def test_resume_refuses_other_configuration(tmp_path):
    _server("mlp").fit(1, checkpoint_dir=tmp_path, config={"lr": 0.1, "rounds": 1})
    with pytest.raises(ck.CheckpointMismatch, match=r"option 'lr' differs.*0\.1.*0\.2"):
        _server("mlp").fit(3, checkpoint_dir=tmp_path, config={"lr": 0.2, "rounds": 3},
                           resume=True)
    other = _server("mlp", seed=4)  # the server's own settings are compared too
    with pytest.raises(ck.CheckpointMismatch, match="'seed'"):
        other.fit(3, checkpoint_dir=tmp_path, config={"lr": 0.1}, resume=True)
    # the number of rounds may grow
    _server("mlp").fit(2, checkpoint_dir=tmp_path, config={"lr": 0.1, "rounds": 2}, resume=True)
    # without resume an existing checkpoint is not overwritten
    with pytest.raises(ck.CheckpointError, match="already holds a checkpoint"):
        _server("mlp").fit(2, checkpoint_dir=tmp_path, config={"lr": 0.1})


def test_damaged_checkpoint_is_reported(tmp_path):
    _server("mlp").fit(2, checkpoint_dir=tmp_path, config={})
    tensors = tmp_path / "checkpoint-r000002.safetensors"
    good = tensors.read_bytes()
    bad = bytearray(good)
    bad[-3] ^= 0x01
    tensors.write_bytes(bytes(bad))
    with pytest.raises(ck.CheckpointError, match="damaged checkpoint, SHA-256"):
        _server("mlp").fit(3, checkpoint_dir=tmp_path, config={}, resume=True)
    tensors.unlink()
    with pytest.raises(ck.CheckpointError, match="missing"):
        ck.load_checkpoint(tmp_path)
    tensors.write_bytes(good)
    ck.load_checkpoint(tmp_path)  # intact again
    js = tmp_path / "checkpoint.json"
    js.write_text(js.read_text()[:-40])
    with pytest.raises(ck.CheckpointError, match="not valid JSON"):
        ck.load_checkpoint(tmp_path)
    with pytest.raises(ck.CheckpointError, match="no checkpoint"):
        ck.load_checkpoint(tmp_path / "elsewhere")


def test_resume_refuses_a_folder_without_checkpoint_json(tmp_path):
    _server("mlp").fit(2, checkpoint_dir=tmp_path, config={})
    (tmp_path / ck.CHECKPOINT_JSON).unlink()  # the tensors file is orphaned, not garbage
    orphan = tmp_path / "checkpoint-r000002.safetensors"
    data = orphan.read_bytes()
    with pytest.raises(ck.CheckpointError, match=rf"{re.escape(str(tmp_path))}.*no "
                                                 rf"{ck.CHECKPOINT_JSON}.*not empty"):
        _server("mlp").fit(3, checkpoint_dir=tmp_path, config={}, resume=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [orphan.name]
    assert orphan.read_bytes() == data
    # a folder that does not exist yet, or is empty, has nothing to lose: the run starts
    (tmp_path / "empty").mkdir()
    for folder in (tmp_path / "new", tmp_path / "empty"):
        assert len(_server("mlp").fit(1, checkpoint_dir=folder, config={}, resume=True)) == 1
        assert ck.load_checkpoint(folder).round == 1


@pytest.mark.parametrize("failing", [r"checkpoint-r\d+\.safetensors", r"checkpoint\.json"])
def test_failed_checkpoint_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch, failing):
    full = _server("mlp")
    full.fit(3, checkpoint_dir=tmp_path / "full", config={})
    _server("mlp").fit(2, checkpoint_dir=tmp_path / "cut", config={})
    with disk_full(monkeypatch, tmp_path / "cut", failing):
        with pytest.raises(ck.CheckpointWriteError) as exc:
            _server("mlp").fit(3, checkpoint_dir=tmp_path / "cut", config={}, resume=True)
    e = exc.value
    assert isinstance(e, OSError) and e.errno == errno.ENOSPC
    msg = str(e)
    assert "after round 3" in msg and "No space left on device" in msg, msg
    assert f"{tmp_path / 'cut' / ck.CHECKPOINT_JSON} (after round 2)" in msg, msg
    assert ck.load_checkpoint(tmp_path / "cut").round == 2
    resumed = _server("mlp")
    records = resumed.fit(3, checkpoint_dir=tmp_path / "cut", config={}, resume=True)
    assert len(records) == 3
    _assert_same_state(full, resumed)


def test_failed_first_checkpoint_write_says_there_is_none(tmp_path, monkeypatch):
    with disk_full(monkeypatch, tmp_path, r"checkpoint"):
        with pytest.raises(ck.CheckpointWriteError, match="no earlier checkpoint"):
            _server("mlp").fit(1, checkpoint_dir=tmp_path, config={})


@pytest.mark.parametrize("rounds, detail", [
    ([5, 6], r"rounds\[0\] expected a dict"),
    ([{"round": 0}, {"round": 1}], r"rounds\[0\] is missing the key\(s\) accuracy"),
    ([{"round": 0, "accuracy": 0.5, "loss": 1.0, "uplink_bytes": -1, "downlink_bytes": 0,
       "wall_time_s": 0.1}] * 2, r"rounds\[0\]\['uplink_bytes'\] expected an integer >= 0"),
    ([{"round": 1, "accuracy": 0.5, "loss": None, "uplink_bytes": 1, "downlink_bytes": 0,
       "wall_time_s": 0.1}] * 2, r"rounds\[0\]\['round'\] is 1, expected 0"),
])
def test_malformed_rounds_records_are_damage(tmp_path, rounds, detail):
    _server("mlp").fit(2, checkpoint_dir=tmp_path, config={})
    path = tmp_path / ck.CHECKPOINT_JSON
    doc = json.loads(path.read_text())
    ck.load_checkpoint(tmp_path)
    doc["rounds"] = rounds
    path.write_text(json.dumps(doc))
    with pytest.raises(ck.CheckpointError, match=rf"{re.escape(str(path))}: damaged "
                                                 rf"checkpoint, {detail}"):
        ck.load_checkpoint(tmp_path)


# ----------------------------------------------------------------------------------------------
# kill and resume: a real process killed with SIGKILL, resumed by the command line

needs_fmnist = pytest.mark.skipif(
    fashion_mnist_dir() is None,
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")

CLI_ARGS = ["--train-subset", "600", "--test-subset", "200", "--image-size", "14", "--width", "4",
            "--clients", "3", "--fraction", "0.67", "--batch-size", "50", "--lr", "0.05",
            "--uplink", "int4", "--error-feedback", "--server-momentum", "0.5", "--quiet",
            "--threads", "1", "--seed", "1"]


@needs_fmnist
def test_killed_cli_run_resumes_to_the_same_model(tmp_path):
    from safetensors.torch import load_file
    rounds = ["--rounds", "4"]
    assert main(CLI_ARGS + rounds + ["--out", str(tmp_path / "full")]) == 0

    cut = tmp_path / "cut"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "oqfl_ext.fl", *CLI_ARGS, *rounds,
                             "--out", str(cut)], env=env, cwd=str(tmp_path),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpt = cut / "checkpoints" / "checkpoint.json"
    killed = False
    # the event is the first checkpoint on disk; the run ends by itself if it never comes
    while proc.poll() is None:
        if ckpt.is_file():
            os.kill(proc.pid, signal.SIGKILL)
            killed = True
            break
        time.sleep(0.01)
    _, err = proc.communicate()
    assert killed, f"the run ended before its first checkpoint: {err.decode()[-2000:]}"
    done = ck.load_checkpoint(cut / "checkpoints").round
    assert 1 <= done <= 4
    assert main(CLI_ARGS + rounds + ["--out", str(cut), "--resume"]) == 0
    a = load_file(str(tmp_path / "full" / "model.safetensors"))
    b = load_file(str(cut / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ra = json.loads((tmp_path / "full" / "metrics.json").read_text())["rounds"]
    rb = json.loads((cut / "metrics.json").read_text())["rounds"]
    assert _strip_times(ra) == _strip_times(rb)


@needs_fmnist
def test_cli_resume_with_other_option_is_refused(tmp_path, capsys):
    out = ["--out", str(tmp_path / "run")]
    assert main(CLI_ARGS + ["--rounds", "1"] + out) == 0
    capsys.readouterr()
    assert main(CLI_ARGS + ["--rounds", "2", "--lr", "0.1", "--resume"] + out) == 1
    err = capsys.readouterr().err
    assert "option 'lr' differs" in err and "0.05" in err and "0.1" in err
    assert main(CLI_ARGS + ["--rounds", "2"] + out) == 1  # no --resume: the run is kept
    assert "--resume" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# client time limits


class VirtualClock:
    """Replaces ``time`` in the client and server modules: time passes only when a test's slow
    model or late client says so, so the time-limit tests do not depend on the machine's load."""

    def __init__(self):
        self.now = 1000.0

    def monotonic(self):
        return self.now

    def perf_counter(self):
        return time.perf_counter()

    def sleep(self, seconds):
        self.now += seconds


@pytest.fixture
def clock(monkeypatch):
    import oqfl_ext.fl.client as client_mod
    import oqfl_ext.fl.server as server_mod
    c = VirtualClock()
    monkeypatch.setattr(client_mod, "time", c)
    monkeypatch.setattr(server_mod, "time", c)
    return c


class SlowClient(Client):
    """A real client whose model takes ``delay`` (virtual) seconds per forward pass."""

    def __init__(self, *args, delay: float, clock: VirtualClock, **kwargs):
        super().__init__(*args, **kwargs)
        self.delay, self.clock = delay, clock

    def train(self, global_state, model_fn, *, round_idx=0, deadline=None):
        def slow_model():
            m = model_fn()
            m.register_forward_pre_hook(lambda *_: self.clock.sleep(self.delay))
            return m
        return super().train(global_state, slow_model, round_idx=round_idx, deadline=deadline)


class LateClient:
    """Ignores its deadline: returns a valid update after ``delay`` (virtual) seconds."""

    client_id = "late"
    num_samples = 40

    def __init__(self, delay: float, clock: VirtualClock):
        self.delay, self.clock, self.blobs = delay, clock, []

    def train(self, global_state, model_fn, *, round_idx=0, deadline=None):
        self.clock.sleep(self.delay)
        delta = {k: torch.zeros_like(v) for k, v in float_state(global_state).items()}
        blob = encode_update(delta, bits=32, round=round_idx, client_id=self.client_id,
                             num_samples=40)
        self.blobs.append(blob)
        return blob


CFG = ClientConfig(batch_size=4, lr=0.1, momentum=0.0, uplink_bits=4, error_feedback=True)


def _fast_clients():
    return [Client(f"c{i}", _blobs(32, i), CFG, seed=i) for i in range(2)]


def test_client_over_its_time_limit_is_stopped_and_dropped(clock, caplog):
    # 16 batches of 0.1 s: past the 0.55 s limit at the check before the 7th batch
    slow = SlowClient("slow", _blobs(64, 7), CFG, seed=7, delay=0.1, clock=clock)
    server = Server(_mlp, TASKS["mlp"][2], clients=_fast_clients() + [slow], seed=0,
                    client_time_limit_s=0.55)
    reference = Server(_mlp, TASKS["mlp"][2], clients=_fast_clients(), seed=0)
    with caplog.at_level("WARNING", logger="oqfl_ext.fl"):
        res = server.run_round(0)
    reference.run_round(0)
    assert res.accepted == ["c0", "c1"]
    assert [cid for cid, _ in res.dropped] == ["slow"]
    reason = res.dropped[0][1]
    assert "time limit of 0.55 s" in reason and "ClientTimeout" in reason
    assert "stopped after 24 of 64 samples" in reason  # cooperative: between mini-batches
    assert "slow" in caplog.text and "time limit" in caplog.text
    assert slow.residual is None  # the interrupted round left the client's state alone
    sa, sb = server.model.state_dict(), reference.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    # the same client within its budget is accepted
    patient = Server(_mlp, TASKS["mlp"][2], clients=[slow], seed=0, client_time_limit_s=10)
    assert patient.run_round(0).accepted == ["slow"] and slow.residual is not None


def test_late_result_is_discarded(clock):
    late = LateClient(delay=0.4, clock=clock)
    server = Server(_mlp, TASKS["mlp"][2], clients=_fast_clients() + [late], seed=0,
                    client_time_limit_s=0.2)
    reference = Server(_mlp, TASKS["mlp"][2], clients=_fast_clients(), seed=0)
    res = server.run_round(0)
    ref = reference.run_round(0)
    assert res.accepted == ["c0", "c1"] and res.dropped[0][0] == "late"
    assert "took 0.40 s" in res.dropped[0][1] and "late update discarded" in res.dropped[0][1]
    assert len(late.blobs) == 1 and res.uplink_bytes == ref.uplink_bytes  # not received
    sa, sb = server.model.state_dict(), reference.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_clients_within_the_limit_are_unaffected():
    limited = Server(_mlp, TASKS["mlp"][2], clients=_fast_clients(), seed=0,
                     client_time_limit_s=60)
    free = Server(_mlp, TASKS["mlp"][2], clients=_fast_clients(), seed=0)
    for r in range(2):
        assert not limited.run_round(r).dropped
        free.run_round(r)
    _assert_same_state(limited, free)


def test_deadline_in_the_past_raises_client_timeout():
    client = _fast_clients()[0]
    state = _mlp().state_dict()
    with pytest.raises(ClientTimeout, match="deadline"):
        client.train(state, _mlp, round_idx=0, deadline=time.monotonic() - 1)
    assert client.residual is None
    with pytest.raises(ValueError, match="client_time_limit_s"):
        Server(_mlp, TASKS["mlp"][2], clients=_fast_clients(), client_time_limit_s=0)


@needs_fmnist
def test_checkpoint_from_before_uplink_compression_resumes(tmp_path, capsys):
    # a checkpoint written before --uplink-compression existed has no such key anywhere (and
    # ran uncompressed: the default since is zstd; and with the quantizer settings of then)
    out = tmp_path / "run"
    none = ["--uplink-compression", "none", "--quant-init", "mse", "--step-size-lr-scale", "1",
            "--act-grad-count", "all"]
    assert main(CLI_ARGS + none + ["--rounds", "1", "--out", str(out)]) == 0
    path = out / "checkpoints" / "checkpoint.json"
    from oqfl_ext.fl.checkpoint import ADDED_SETTINGS

    def strip(v):
        if isinstance(v, dict):
            return {k: strip(x) for k, x in v.items() if k not in ADDED_SETTINGS}
        return [strip(x) for x in v] if isinstance(v, list) else v

    doc = json.loads(path.read_text())
    assert doc["config"]["uplink_compression"] == "none"
    assert doc["server"]["clients"][0]["config"]["uplink_compression"] == "none"
    old = strip(doc)
    assert all(k not in json.dumps(old) for k in ADDED_SETTINGS)
    path.write_text(json.dumps(old))
    assert main(CLI_ARGS + none + ["--rounds", "2", "--resume", "--out", str(out)]) == 0
    capsys.readouterr()
    # ... but not with the option changed (here to the default)
    assert main(CLI_ARGS + none[2:] + ["--rounds", "3", "--resume", "--out", str(out)]) == 1
    assert "'uplink_compression' differs" in capsys.readouterr().err
