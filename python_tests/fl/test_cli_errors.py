"""``oqfl-fl`` refuses bad runs with one line on stderr and a non-zero exit, never a traceback,
and never loses what a user trained: --resume on a folder without a checkpoint, seeds, image
sizes, devices and partitions that cannot work, an --out below a file, a full disk while
checkpointing, a damaged checkpoint.json; and a federation of 1000 clients. Runs in-process on
scikit-learn's bundled 8x8 digits (no files needed): a few seconds on 2 cores."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from oqfl_ext.fl import checkpoint as ck
from oqfl_ext.fl.cli import main
from oqfl_ext.models import create
from test_checkpoint import disk_full

REPO = Path(__file__).resolve().parents[2]

DIGITS = ["--dataset", "digits", "--width", "4", "--clients", "4", "--fraction", "0.5",
          "--weight-bits", "float", "--act-bits", "float", "--uplink", "float32",
          "--batch-size", "32", "--quiet", "--threads", "1", "--seed", "0"]


def _one_line_error(capsys) -> str:
    """The error line of a failed run; the run printed no traceback and nothing else on
    stderr but argparse's usage line."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith(("usage:", " "))]
    assert len(lines) == 1 and "error:" in lines[0], err
    return lines[0]


def _usage_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    return _one_line_error(capsys)


def _snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# ----------------------------------------------------------------------------------------------
# --resume never starts over in a folder that holds something


def test_resume_without_checkpoint_keeps_the_folder(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(DIGITS + ["--rounds", "2", "--out", str(run)]) == 0
    # the checkpoint's JSON is gone: its tensors file is orphaned, not garbage
    (run / "checkpoints" / ck.CHECKPOINT_JSON).unlink()
    before = _snapshot(run)
    capsys.readouterr()
    assert main(DIGITS + ["--rounds", "3", "--resume", "--out", str(run)]) == 1
    line = _one_line_error(capsys)
    assert str(run) in line and "no checkpoint" in line
    assert _snapshot(run) == before  # metrics, model and the orphaned tensors file untouched


def test_resume_with_a_mistyped_out_keeps_the_folder(tmp_path, capsys):
    other = tmp_path / "notes"
    other.mkdir()
    (other / "results.txt").write_text("weeks of work")
    assert main(DIGITS + ["--rounds", "1", "--resume", "--out", str(other)]) == 1
    assert str(other) in _one_line_error(capsys)
    assert _snapshot(other) == {Path("results.txt"): b"weeks of work"}


@pytest.mark.parametrize("make_empty", [False, True])
def test_resume_in_a_new_or_empty_folder_starts_the_run(tmp_path, make_empty):
    run = tmp_path / "run"
    if make_empty:
        run.mkdir()
    assert main(DIGITS + ["--rounds", "1", "--resume", "--out", str(run)]) == 0
    assert ck.load_checkpoint(run / "checkpoints").round == 1


# ----------------------------------------------------------------------------------------------
# options that cannot work are usage errors (exit 2) naming the option and what is expected


def test_seed_out_of_range_says_the_range(tmp_path, capsys):
    for seed in (str(2 ** 64), str(2 ** 63), "-1"):
        line = _usage_error(DIGITS + ["--seed", seed], capsys)
        assert "argument --seed" in line and str(2 ** 63 - 1) in line and seed in line, line
    # the top of the range is a seed the whole run accepts
    assert main(DIGITS + ["--rounds", "1", "--seed", str(2 ** 63 - 1),
                          "--out", str(tmp_path / "r")]) == 0


@pytest.mark.parametrize("model", ["vgg", "small_cnn", "resnet20"])
def test_image_size_too_small_says_the_minimum(model, capsys):
    line = _usage_error(DIGITS + ["--model", model, "--image-size", "3"], capsys)
    assert "argument --image-size" in line and model in line, line
    minimum = int(re.search(r"needs (\d+) or more", line).group(1))
    create(model, in_channels=1, num_classes=10, image_size=minimum)  # the model accepts it
    with pytest.raises(ValueError):
        create(model, in_channels=1, num_classes=10, image_size=minimum - 1)


@pytest.mark.parametrize("device", ["meta", "mps", "cuda:99"])
def test_unusable_device_says_what_is_expected(device, capsys):
    line = _usage_error(DIGITS + ["--device", device], capsys)
    assert "argument --device" in line and device in line and "cpu" in line, line


# ----------------------------------------------------------------------------------------------
# partitions the data cannot give


def test_more_classes_per_client_than_the_data_set_has(tmp_path, capsys):
    assert main(DIGITS + ["--partition", "shards", "--classes-per-client", "11",
                          "--out", str(tmp_path / "r")]) == 1
    line = _one_line_error(capsys)
    assert "--classes-per-client 11" in line and "(10)" in line, line  # digits: 10 classes


def test_partition_layer_value_error_is_one_line(tmp_path, capsys, monkeypatch):
    import oqfl_ext.data as data

    def impossible(*args, **kwargs):
        raise ValueError("partition_dirichlet: no split of this kind exists")

    monkeypatch.setattr(data, "partition_dirichlet", impossible)
    assert main(DIGITS + ["--partition", "dirichlet", "--alpha", "0.1",
                          "--out", str(tmp_path / "r")]) == 1
    line = _one_line_error(capsys)
    assert "--partition dirichlet" in line and "no split of this kind exists" in line, line


@pytest.mark.parametrize("partition", ["iid", "dirichlet"])
def test_a_thousand_clients(partition, tmp_path, capsys):
    """1000 clients on the 1437 training digits: about one example each."""
    out = tmp_path / "r"
    rc = main(DIGITS + ["--clients", "1000", "--fraction", "0.005", "--rounds", "1",
                        "--partition", partition, "--alpha", "0.1", "--train-subset", "all",
                        "--out", str(out)])
    if rc != 0:  # a split the partitioner refuses: said in one line
        assert rc == 1 and "--partition" in _one_line_error(capsys)
        return
    rounds = json.loads((out / "metrics.json").read_text())["rounds"]
    assert len(rounds) == 1 and len(rounds[0]["sampled"]) == 5
    assert "Traceback" not in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# output folders and writes


@pytest.mark.parametrize("resume", [False, True])
def test_out_below_a_file(tmp_path, capsys, resume):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    argv = DIGITS + ["--rounds", "1", "--out", str(blocker / "run")]
    assert main(argv + (["--resume"] if resume else [])) == 1
    line = _one_line_error(capsys)
    assert str(blocker) in line and "not a folder" in line, line
    assert blocker.read_text() == "x"


@pytest.mark.parametrize("failing", [r"checkpoint-r\d+\.safetensors", r"checkpoint\.json"])
def test_full_disk_while_checkpointing_keeps_the_last_checkpoint(tmp_path, capsys, monkeypatch,
                                                                 failing):
    run, ref = tmp_path / "run", tmp_path / "ref"
    assert main(DIGITS + ["--rounds", "3", "--out", str(ref)]) == 0
    assert main(DIGITS + ["--rounds", "2", "--out", str(run)]) == 0
    capsys.readouterr()
    with disk_full(monkeypatch, run / "checkpoints", failing):
        rc = main(DIGITS + ["--rounds", "3", "--resume", "--out", str(run)])
    assert rc == 1
    line = _one_line_error(capsys)
    assert "could not write the checkpoint" in line and "No space left" in line, line
    assert str(run / "checkpoints" / ck.CHECKPOINT_JSON) in line and "round 2" in line, line
    assert ck.load_checkpoint(run / "checkpoints").round == 2
    # the disk has room again: the run continues from round 2 to the uninterrupted run's model
    assert main(DIGITS + ["--rounds", "3", "--resume", "--out", str(run)]) == 0
    from safetensors.torch import load_file
    a, b = load_file(str(ref / "model.safetensors")), load_file(str(run / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_full_disk_while_writing_metrics(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    with disk_full(monkeypatch, run, r"metrics\.json"):
        rc = main(DIGITS + ["--rounds", "1", "--out", str(run)])
    assert rc == 1
    line = _one_line_error(capsys)
    assert "No space left" in line and str(run) in line, line
    assert ck.load_checkpoint(run / "checkpoints").round == 1  # written before the metrics


@pytest.mark.parametrize("rounds", [[7], [{"round": 0}], [{"round": 0, "accuracy": 0.5,
                                     "loss": 1.0, "uplink_bytes": "many",
                                     "downlink_bytes": 1, "wall_time_s": 0.1}]])
def test_malformed_rounds_in_the_checkpoint(tmp_path, capsys, rounds):
    run = tmp_path / "run"
    assert main(DIGITS + ["--rounds", "1", "--out", str(run)]) == 0
    path = run / "checkpoints" / ck.CHECKPOINT_JSON
    doc = json.loads(path.read_text())
    doc["rounds"] = rounds
    path.write_text(json.dumps(doc))
    before = _snapshot(run)
    capsys.readouterr()
    assert main(DIGITS + ["--rounds", "2", "--resume", "--out", str(run)]) == 1
    line = _one_line_error(capsys)
    assert str(path) in line and "rounds[0]" in line, line
    assert _snapshot(run) == before


def test_command_line_process_prints_one_line(tmp_path):
    """The installed entry point's path: a subprocess, its stderr and exit status."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    proc = subprocess.run([sys.executable, "-m", "oqfl_ext.fl", *DIGITS, "--rounds", "1",
                           "--out", str(blocker / "run")], cwd=str(REPO), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and str(blocker) in proc.stderr, proc.stderr
