"""The ``oqfl-fl`` command line, run in-process through ``main([...])`` on a small Fashion-MNIST
subset (14x14 images, a narrow SmallCNN): files written, a sane accuracy, the --compare table,
argument errors naming the option, and the metrics module. A few seconds on 2 cores."""

from __future__ import annotations

import json
import math

import pytest
import torch

from oqfl_ext.data import fashion_mnist_dir
from oqfl_ext.fl import metrics
from oqfl_ext.fl.cli import main
from oqfl_ext.fl.experiment import ExperimentConfig, model_fn


def _model_fn(record, in_channels, num_classes, image_size):
    return model_fn(ExperimentConfig.from_record(record), in_channels, num_classes, image_size)

needs_fmnist = pytest.mark.skipif(
    fashion_mnist_dir() is None,
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")

SMALL = ["--train-subset", "900", "--test-subset", "300", "--image-size", "14", "--width", "8",
         "--clients", "3", "--fraction", "1", "--batch-size", "32", "--lr", "0.05",
         "--quiet", "--seed", "0", "--threads", "1"]
PNG = b"\x89PNG\r\n\x1a\n"


@needs_fmnist
def test_end_to_end_fp32_run_writes_files(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(SMALL + ["--rounds", "2", "--weight-bits", "float", "--act-bits", "float",
                       "--uplink", "float32", "--uplink-compression", "none",
                       "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "fp32: 2 rounds, final accuracy" in printed
    doc = json.loads((out / "metrics.json").read_text())
    # bytes per direction and in total, per round and per run, in the file and the summary line
    up = sum(r["uplink_bytes"] for r in doc["rounds"])
    down = sum(r["downlink_bytes"] for r in doc["rounds"])
    assert all(r["total_bytes"] == r["uplink_bytes"] + r["downlink_bytes"] for r in doc["rounds"])
    assert doc["traffic"] == {"rounds": 2, "uplink_bytes": up, "downlink_bytes": down,
                              "total_bytes": up + down, "uplink_bytes_per_round": up / 2,
                              "downlink_bytes_per_round": down / 2,
                              "total_bytes_per_round": (up + down) / 2}
    assert (f"uplink {up / 1e6:.2f} MB ({up / 2e6:.3f}/round), downlink {down / 1e6:.2f} MB "
            f"({down / 2e6:.3f}/round), total {(up + down) / 1e6:.2f} MB") in printed
    assert doc["config"]["weight_bits"] is None and doc["config"]["uplink"] == "float32"
    rounds = doc["rounds"]
    assert [r["round"] for r in rounds] == [0, 1]
    for r in rounds:
        for key in metrics.REQUIRED_KEYS:
            assert key in r
        assert r["uplink_bytes"] > 3 * 4 * 3000  # three float32 updates of a ~3.4k-float model
        assert r["downlink_bytes"] > 0 and r["wall_time_s"] > 0 and not r["dropped"]
    assert rounds[-1]["accuracy"] > 0.6, [r["accuracy"] for r in rounds]
    assert math.isfinite(rounds[-1]["loss"])
    assert (out / "accuracy.png").read_bytes()[:8] == PNG
    assert (out / "checkpoints" / "checkpoint.json").is_file()
    from safetensors.torch import load_file
    model = load_file(str(out / "model.safetensors"))
    assert "classifier.weight" in model


@needs_fmnist
def test_compare_prints_table_and_plot(tmp_path, capsys):
    out = tmp_path / "cmp"
    rc = main(SMALL + ["--rounds", "2", "--compare", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "FP32 FedAvg" in printed and "OQFL W4A4" in printed and "uplink ratio" in printed
    assert "x smaller" in printed
    for sub in ("fp32", "oqfl-w4a4"):
        assert (out / sub / "metrics.json").is_file() and (out / sub / "accuracy.png").is_file()
    assert (out / "compare.png").read_bytes()[:8] == PNG
    assert "OQFL W4A4" in (out / "compare.txt").read_text()
    summary = json.loads((out / "compare.json").read_text())["summary"]
    fp32, q = summary["FP32 FedAvg"], summary["OQFL W4A4"]
    # int4 codes + scales vs float32; with a 3k-parameter model the blobs' per-tensor metadata
    # weighs as much as the codes
    assert fp32["uplink_mb"] / q["uplink_mb"] > 1.3
    assert fp32["final_accuracy"] > 0.6 and q["final_accuracy"] > 0.45, summary
    # the converted integer model (oqfl_ext.convert) is evaluated too, and agrees closely
    assert fp32["final_integer_accuracy"] is None  # not evaluated: NaN, stored as null
    assert abs(q["final_integer_accuracy"] - q["final_accuracy"]) < 0.02, summary
    rounds = json.loads((out / "oqfl-w4a4" / "metrics.json").read_text())["rounds"]
    assert all("integer_accuracy" in r for r in rounds)
    cfg = json.loads((out / "oqfl-w4a4" / "metrics.json").read_text())["config"]
    assert (cfg["weight_bits"], cfg["act_bits"], cfg["uplink"]) == (4, 4, "int4")
    cfg32 = json.loads((out / "fp32" / "metrics.json").read_text())["config"]
    same = ("seed", "clients", "partition", "rounds", "lr", "train_subset")
    assert all(cfg[k] == cfg32[k] for k in same)
    _check_ptq(out, cfg, json.loads((out / "compare.json").read_text())["ptq"])
    assert "PTQ baseline" in printed


def _check_ptq(out, cfg, ptq):
    """The PTQ row recomputed by hand: the saved FP32 model, quantize_model with the OQFL
    arm's bits, eval-mode calibration on the server's calibration images, the accuracy on the
    test subset."""
    from safetensors.torch import load_file

    from oqfl_ext import data as datasets
    from oqfl_ext.fl import experiment as ex
    from oqfl_ext.nn import calibrate, quantize_model
    qcfg = ExperimentConfig.from_record(cfg)
    fp32 = _model_fn(dict(cfg, weight_bits=None, act_bits=None), 1, 10, 14)()
    fp32.load_state_dict(load_file(str(out / "fp32" / "model.safetensors")))
    tx, ty = datasets.load_fashion_mnist("train", limit=900, normalize=True)
    vx, vy = datasets.load_fashion_mnist("test", limit=300, normalize=True)
    tx, vx = torch.nn.functional.adaptive_avg_pool2d(tx, 14), \
        torch.nn.functional.adaptive_avg_pool2d(vx, 14)
    part0 = ex.make_partitions(qcfg, ty)[0]
    edge = "float" if qcfg.first_last_bits is None else qcfg.first_last_bits
    q = quantize_model(fp32, 4, 4, first_last_bits=edge, init="mse").eval()
    calibrate(q, tx[part0][:256])
    with torch.no_grad():
        want = float((q(vx).argmax(1) == vy).float().mean())
    assert ptq["accuracy"] == pytest.approx(want, abs=1e-6)
    assert abs(ptq["integer_accuracy"] - ptq["accuracy"]) < 0.03, ptq


@pytest.mark.parametrize("args, option", [
    (["--fraction", "0"], "--fraction"),
    (["--fraction", "1.5"], "--fraction"),
    (["--clients", "0"], "--clients"),
    (["--rounds", "two"], "--rounds"),
    (["--weight-bits", "9"], "--weight-bits"),
    (["--act-bits", "x"], "--act-bits"),
    (["--uplink", "int3"], "--uplink"),
    (["--downlink", "int2"], "--downlink"),
    (["--uplink-compression", "gzip"], "--uplink-compression"),
    (["--quant-init", "max"], "--quant-init"),
    (["--grad-scale", "2"], "--grad-scale"),
    (["--step-size-lr-scale", "0"], "--step-size-lr-scale"),
    (["--partition", "random"], "--partition"),
    (["--model", "resnet50"], "--model"),
    (["--lr", "-1"], "--lr"),
    (["--server-momentum", "1"], "--server-momentum"),
    (["--client-time-limit", "0"], "--client-time-limit"),
    (["--resume"], "--resume"),
    (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "nope"],
     "--device"),
])
def test_bad_arguments_name_the_option(args, option, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}" in err, err


@needs_fmnist
def test_compressed_uplink_is_lossless_and_smaller(tmp_path):
    # the same seeded run with each compression: the same models and accuracies, fewer bytes
    from safetensors.torch import load_file
    runs = {}
    for compression in ("none", "zlib", "zstd"):
        out = tmp_path / compression
        assert main(SMALL + ["--rounds", "2", "--uplink-compression", compression,
                             "--out", str(out)]) == 0
        doc = json.loads((out / "metrics.json").read_text())
        assert doc["config"]["uplink_compression"] == compression
        runs[compression] = (doc["rounds"], load_file(str(out / "model.safetensors")))
    plain, m0 = runs["none"]
    for compression in ("zlib", "zstd"):
        packed, m1 = runs[compression]
        assert m0.keys() == m1.keys() and all(torch.equal(m0[k], m1[k]) for k in m0)
        assert [r["accuracy"] for r in plain] == [r["accuracy"] for r in packed]
        for a, b in zip(plain, packed):
            assert b["downlink_bytes"] == a["downlink_bytes"]
            # (a width-8 model: its steps and bfloat16 vectors, a large share, hardly shrink)
            assert b["uplink_bytes"] < a["uplink_bytes"], (compression, a, b)


def test_quantizer_options_reach_every_quantizer():
    from oqfl_ext.fl.cli import build_config, build_parser
    from oqfl_ext.nn import LSQQuantizer
    for argv, init, factor, count in (
            (["--quant-init", "mse", "--act-grad-count", "all"], "mse", None, "all"),
            (["--quant-init", "lsq", "--grad-scale", "none", "--act-grad-count", "example"],
             "lsq", 1.0, "example")):
        cfg = build_config(build_parser().parse_args(["--model", "vgg", "--first-last-bits",
                                                      "8"] + argv))
        model = _model_fn(cfg, 1, 10, 14)()
        quantizers = [m for m in model.modules() if isinstance(m, LSQQuantizer)]
        assert len(quantizers) == 2 * 8                # weights and inputs of 6 conv + 2 linear
        assert {(q.init, q.grad_factor) for q in quantizers} == {(init, factor)}
        assert {q.grad_count for q in quantizers if q.per_channel_axis is None} == {count}
    # the step sizes LSQ's init gives differ from the MSE search's: the option is used
    x = torch.randn(64, 1, 14, 14)
    steps = {}
    for init in ("mse", "lsq"):
        cfg = build_config(build_parser().parse_args(["--quant-init", init,
                                                      "--first-last-bits", "8"]))
        m = _model_fn(cfg, 1, 10, 14)()
        m(x)
        conv = m.features[0][0]
        steps[init] = conv.weight_quantizer.step_size.detach().clone()
        if init == "lsq":                              # 8-bit first layer: qmax 127
            want = 2 * conv.weight.detach().abs().mean(dim=(1, 2, 3)) / math.sqrt(127)
            torch.testing.assert_close(steps[init].flatten(), want)
    assert not torch.allclose(steps["mse"], steps["lsq"])


def test_first_last_bits_float_keeps_the_edge_layers_float():
    from torch import nn

    from oqfl_ext.fl.cli import build_config, build_parser
    from oqfl_ext.nn import QuantConv2d, QuantLinear
    layers = {}
    for edge in ("float", "4", "8"):
        cfg = build_config(build_parser().parse_args(["--model", "small_cnn",
                                                      "--first-last-bits", edge]))
        m = _model_fn(cfg, 1, 10, 14)()
        layers[edge] = [mod for mod in m.modules() if isinstance(mod, (nn.Conv2d, nn.Linear))]
    first, *middle, last = layers["float"]
    assert type(first) is nn.Conv2d and type(last) is nn.Linear
    assert middle and all(isinstance(x, QuantConv2d) and x.weight_bits == 4 for x in middle)
    for edge, bits in (("4", 4), ("8", 8)):
        first, *middle, last = layers[edge]
        assert isinstance(first, QuantConv2d) and isinstance(last, QuantLinear)
        assert (first.weight_bits, first.act_bits, last.weight_bits) == (bits, bits, bits)
        assert all(x.weight_bits == 4 and x.act_bits == 4 for x in middle)


def test_digits_with_int8_downlink(tmp_path, capsys):
    """scikit-learn's bundled 8x8 digits (no files needed) and the int8 model broadcast."""
    common = ["--dataset", "digits", "--width", "8", "--clients", "4", "--fraction", "0.5",
              "--rounds", "3", "--weight-bits", "float", "--act-bits", "float",
              "--uplink", "int8", "--quiet", "--threads", "1"]
    assert main(common + ["--downlink", "int8", "--out", str(tmp_path / "i8")]) == 0
    assert main(common + ["--downlink", "float32", "--out", str(tmp_path / "f32")]) == 0
    r8 = metrics.load_run(tmp_path / "i8")[1]
    r32 = metrics.load_run(tmp_path / "f32")[1]
    assert r8[-1]["accuracy"] > 0.6 and r32[-1]["accuracy"] > 0.6, (r8, r32)
    assert r8[0]["downlink_bytes"] < 0.6 * r32[0]["downlink_bytes"]
    assert metrics.load_run(tmp_path / "i8")[0]["image_size"] is None  # native 8x8


def test_cifar10_without_files_says_how_to_get_it(tmp_path, capsys):
    rc = main(["--dataset", "cifar10", "--data-dir", str(tmp_path / "none"), "--rounds", "1",
               "--quiet", "--out", str(tmp_path / "o")])
    assert rc == 1
    err = capsys.readouterr().err
    assert "--dataset cifar10" in err and "cifar" in err.lower()


def test_missing_dataset_says_how_to_get_it(tmp_path, capsys):
    rc = main(["--data-dir", str(tmp_path / "nothing"), "--rounds", "1", "--quiet",
               "--out", str(tmp_path / "o")])
    assert rc == 1
    err = capsys.readouterr().err
    assert "apt-get install dataset-fashion-mnist" in err


@needs_fmnist
def test_existing_output_folder_is_not_overwritten(tmp_path, capsys):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "keep.txt").write_text("x")
    assert main(SMALL + ["--rounds", "1", "--out", str(tmp_path / "o")]) == 1
    assert "not empty" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# the metrics module (API shared with the Flower app)


def _records(n, up):
    return [{"round": i, "accuracy": 0.5 + 0.1 * i, "loss": float("nan") if i == 0 else 1.0,
             "uplink_bytes": up, "downlink_bytes": 2 * up, "wall_time_s": 0.5,
             "dropped": [("c1", "late")]} for i in range(n)]


def test_save_run_and_load_run(tmp_path):
    paths = metrics.save_run(tmp_path / "r", {"name": "x", "lr": 0.1}, _records(3, 1_000_000))
    assert paths["metrics"].name == "metrics.json" and paths["plot"].name == "accuracy.png"
    assert paths["plot"].read_bytes()[:8] == PNG
    config, rounds = metrics.load_run(tmp_path / "r")
    assert config == {"name": "x", "lr": 0.1}
    assert rounds[0]["loss"] is None  # NaN -> null: strict JSON
    assert rounds[2]["dropped"] == [["c1", "late"]]
    assert metrics.cumulative_uplink_mb(rounds) == [1.0, 2.0, 3.0]
    s = metrics.summarize(rounds)
    assert s["best_accuracy"] == pytest.approx(0.7) and s["uplink_mb_per_round"] == 1.0
    assert s["downlink_mb"] == 6.0 and s["total_mb"] == 9.0 and s["total_mb_per_round"] == 3.0
    doc = json.loads(paths["metrics"].read_text())
    assert doc["traffic"]["total_bytes"] == 9_000_000
    assert doc["traffic"]["downlink_bytes_per_round"] == 2_000_000
    with pytest.raises(ValueError, match="uplink_bytes"):
        metrics.save_run(tmp_path / "bad", {}, [{"round": 0, "accuracy": 0.1}])
    assert not list((tmp_path / "r").glob(".*.tmp"))


def test_plot_runs_and_table(tmp_path):
    runs = {"FP32": _records(3, 800_000), "OQFL": _records(3, 100_000)}
    path = metrics.plot_runs(runs, tmp_path / "c.png", title="t")
    assert path.read_bytes()[:8] == PNG
    table = metrics.format_table(runs)
    assert "8.00x smaller" in table and "FP32" in table.splitlines()[2]


def test_digits_with_int4_delta_downlink_reports_bytes_and_resumes(tmp_path, capsys):
    """The compressed downlink from the command line: per-round bytes per direction and the
    clients sent a snapshot in metrics.json, later rounds' downlink smaller than the float32
    broadcast's, and --resume continuing the run with the same bytes and model."""
    common = ["--dataset", "digits", "--width", "8", "--clients", "4", "--fraction", "0.5",
              "--weight-bits", "float", "--act-bits", "float", "--uplink", "int4",
              "--quiet", "--threads", "1"]
    assert main(common + ["--rounds", "4", "--downlink", "int4-delta",
                          "--out", str(tmp_path / "d")]) == 0
    assert main(common + ["--rounds", "4", "--downlink", "float32",
                          "--out", str(tmp_path / "f")]) == 0
    assert main(common + ["--rounds", "2", "--downlink", "int4-delta",
                          "--out", str(tmp_path / "r")]) == 0
    assert main(common + ["--rounds", "4", "--downlink", "int4-delta",
                          "--out", str(tmp_path / "r"), "--resume"]) == 0
    delta, f32 = metrics.load_run(tmp_path / "d")[1], metrics.load_run(tmp_path / "f")[1]
    resumed = metrics.load_run(tmp_path / "r")[1]
    # first contact: a sparse snapshot on the initial template both sides build, never the
    # full model
    assert all(r["downlink_snapshots"] == [] for r in delta)
    assert all(r["total_bytes"] == r["uplink_bytes"] + r["downlink_bytes"] for r in delta)
    # every round (the first included): a fraction of the float32 broadcast
    assert all(r["downlink_bytes"] < 0.5 * f32[r["round"]]["downlink_bytes"] for r in delta)
    assert [r["downlink_bytes"] for r in resumed] == [r["downlink_bytes"] for r in delta]
    assert [r["accuracy"] for r in resumed] == [r["accuracy"] for r in delta]
    assert delta[-1]["accuracy"] > 0.6
