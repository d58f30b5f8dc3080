"""experiments/paper_grid.py: every run of the grid is a valid oqfl-fl command, the arms differ only
in their quantization and uplink codec, and the report's splicing keeps the hand-written text."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from oqfl_ext.fl.cli import build_config, build_parser
from oqfl_ext.fl.codec import DEFAULT_COMPRESSION

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def grid():
    spec = importlib.util.spec_from_file_location("paper_grid", ROOT / "experiments" /
                                                  "paper_grid.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _config(grid, net, split, arm, seed=0):
    argv = grid.command(Path("/tmp/grid"), net, split, arm, 20, seed)
    assert argv[0] == "oqfl-fl"
    return build_config(build_parser().parse_args(argv[1:]))


QUANT_KEYS = {"name", "weight_bits", "act_bits", "first_last_bits", "uplink", "stochastic",
              "error_feedback", "eval_integer"}


@pytest.mark.parametrize("net", ["small_cnn", "vgg", "resnet20", "mobilenet_v2"])
@pytest.mark.parametrize("split", ["iid", "dirichlet", "dirichlet0.1"])
def test_arms_share_everything_but_the_quantization(grid, net, split):
    configs = {arm: _config(grid, net, split, arm) for arm in grid.ARMS}
    base = configs["fp32"]
    assert base["weight_bits"] is None and base["act_bits"] is None
    assert base["uplink"] == "float32"
    for arm, cfg in configs.items():
        shared = {k: v for k, v in cfg.items() if k not in QUANT_KEYS}
        assert shared == {k: v for k, v in base.items() if k not in QUANT_KEYS}, arm
        assert cfg["model"] == net and cfg["clients"] == 10
        assert cfg["partition"] == ("iid" if split == "iid" else "dirichlet")
        assert cfg["dataset"] == "fashion-mnist" and cfg["seed"] == 0
        assert cfg["uplink_compression"] == DEFAULT_COMPRESSION
    if split != "iid":
        assert base["alpha"] == {"dirichlet": 0.5, "dirichlet0.1": 0.1}[split]
    bits = {arm: (c["weight_bits"], c["act_bits"], c["uplink"]) for arm, c in configs.items()}
    assert bits == {"fp32": (None, None, "float32"), "w8a8": (8, 8, "int8"),
                    "w4a4": (4, 4, "int4"), "w3a3": (3, 3, "int4"), "w2a2": (2, 2, "int4"),
                    "w4af": (4, None, "int4")}


def test_the_grid_uses_the_package_quantizer_defaults(grid):
    from oqfl_ext.fl.experiment import ExperimentConfig
    d = ExperimentConfig()
    cfg = _config(grid, "resnet20", "dirichlet", "w4a4")
    for key in ("first_last_bits", "quant_init", "grad_scale", "act_grad_count",
                "step_size_lr_scale"):
        assert cfg[key] == getattr(d, key), key


def test_seeds_change_only_the_seed_and_the_folder(grid):
    a, b = _config(grid, "vgg", "iid", "w4a4"), _config(grid, "vgg", "iid", "w4a4", seed=2)
    assert b["seed"] == 2 and {k: v for k, v in a.items() if k != "seed"} == \
        {k: v for k, v in b.items() if k != "seed"}
    out = Path("/g")
    assert grid.run_dir(out, "vgg", "iid", "w4a4") == out / "vgg-iid" / "w4a4"
    assert grid.run_dir(out, "vgg", "iid", "w4a4", 2) == out / "vgg-iid" / "w4a4-seed2"


def test_bad_lists_name_the_option(grid, capsys):
    for argv, option in ((["run", "--nets", "vgg,alexnet"], "--nets"),
                         (["run", "--arms", "w5a5"], "--arms"),
                         (["run", "--seeds", "1,x"], "--seeds"),
                         (["run", "--jobs", "0"], "--jobs"),
                         (["report", "--rounds", "0"], "--rounds")):
        with pytest.raises(SystemExit):
            grid.main(argv)
        assert option in capsys.readouterr().err


def test_splice_replaces_only_between_the_markers(grid, tmp_path):
    doc = tmp_path / "R.md"
    doc.write_text("intro\n<!-- t:begin -->\nold\n<!-- t:end -->\noutro\n")
    grid._splice(doc, {"t": "new table\n"})
    assert doc.read_text() == "intro\n<!-- t:begin -->\nnew table\n<!-- t:end -->\noutro\n"
    before = doc.read_text()
    with pytest.raises(SystemExit, match="markers"):
        grid._splice(doc, {"t": "changed", "missing": "x"})
    assert doc.read_text() == before                   # all or nothing
    doc.write_text("<!-- t:end -->\n<!-- t:begin -->\n")
    with pytest.raises(SystemExit, match="markers"):
        grid._splice(doc, {"t": "x"})


def test_unfinished_runs_count_as_not_done(grid, tmp_path):
    from oqfl_ext.fl.metrics import write_metrics
    folder = tmp_path / "run"
    assert grid.rounds_done(folder) == 0
    folder.mkdir()
    rec = {"round": 0, "accuracy": 0.5, "loss": 1.0, "uplink_bytes": 1, "downlink_bytes": 1,
           "wall_time_s": 1.0}
    write_metrics(folder / "metrics.json", {}, [rec])
    assert grid.rounds_done(folder) == 0             # no final model yet: still running
    (folder / "model.safetensors").write_bytes(b"x")
    assert grid.rounds_done(folder) == 1
    assert grid.finished(folder, 1) and not grid.finished(folder, 2)
    # a finished run resumed for more rounds: metrics.json is newer than the model again
    import os
    st = (folder / "model.safetensors").stat()
    os.utime(folder / "metrics.json", ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))
    assert grid.rounds_done(folder) == 0


def test_finished_run_with_other_options_is_stale(grid, tmp_path):
    from oqfl_ext.fl.cli import build_config, build_parser
    from oqfl_ext.fl.metrics import write_metrics
    job = (tmp_path, "vgg", "iid", "w4a4", 2, 0)
    cfg = build_config(build_parser().parse_args(grid.command(*job)[1:]))
    folder = grid.run_dir(*job[:4])
    folder.mkdir(parents=True)
    write_metrics(folder / "metrics.json", cfg, [])
    assert grid.config_mismatch(folder, job) is None
    write_metrics(folder / "metrics.json", dict(cfg, uplink_compression="none"), [])
    assert "uplink_compression" in grid.config_mismatch(folder, job)


def test_each_trial_changes_one_knob_of_its_arm(grid):
    uplink_keys = {"uplink", "stochastic", "error_feedback"}  # the last two go with the codec
    for trial in grid.TRIALS:
        arm = trial.split("-")[0]
        base = _config(grid, "small_cnn", "dirichlet", arm)
        cfg = _config(grid, "small_cnn", "dirichlet", trial)
        changed = {k for k in cfg if cfg[k] != base[k]} - {"name"}
        assert len(changed) == 1 or ("uplink" in changed and changed <= uplink_keys), \
            (trial, changed)
    assert _config(grid, "vgg", "iid", "fp32-uplink-int4")["weight_bits"] is None
    assert _config(grid, "vgg", "iid", "w4a4-uplink-f32")["uplink"] == "float32"


def test_a_fresh_run_starts_and_logs_beside_its_folder(grid, tmp_path, monkeypatch):
    # oqfl-fl starts a new run only in an empty folder: the grid's log must not be inside it
    common = list(grid.COMMON)
    for opt, small in (("--train-subset", "1000"), ("--test-subset", "200")):
        common[common.index(opt) + 1] = small
    monkeypatch.setattr(grid, "COMMON", common)
    folder, rc, _ = grid._run_one((tmp_path, "small_cnn", "iid", "fp32", 1, 0))
    log = grid.log_path(folder)
    assert rc == 0, log.read_text()[-2000:]
    assert log.parent == folder.parent and "--resume" in log.read_text()
    assert grid.rounds_done(folder) == 1


def test_claim_table_gaps_against_the_same_seed(grid, tmp_path, monkeypatch):
    """The claim row: W4A4's last-rounds gap to FP32 of the same seed (mean and range over the
    seeds), its margin over the PTQ baseline, the traffic ratios; float64 arithmetic as the
    reference. PTQ is stubbed: it needs a real trained model and data."""
    from oqfl_ext.fl.metrics import write_metrics

    def run(arm, seed, accs, up, down):
        folder = grid.run_dir(tmp_path, "vgg", "iid", arm, seed)
        folder.mkdir(parents=True)
        recs = [{"round": i, "accuracy": a, "loss": 1.0, "uplink_bytes": up, "downlink_bytes": down,
                 "wall_time_s": 1.0} for i, a in enumerate(accs)]
        write_metrics(folder / "metrics.json", {"seed": seed}, recs)
        (folder / "model.safetensors").write_bytes(b"x")
        return accs

    fp32 = {s: run("fp32", s, [0.5, 0.80, 0.81, 0.82 + s / 100], 4000, 4000) for s in (0, 1, 2)}
    w4 = {s: run("w4a4", s, [0.5, 0.79, 0.80, 0.80 + s / 50], 500, 4000) for s in (0, 1, 2)}
    run("w3a3", 0, [0.5, 0.70, 0.70, 0.70], 500, 4000)
    monkeypatch.setattr(grid, "_ptq_accuracy", lambda base, cfg: 0.75)
    table, folders = grid.claim_table(tmp_path, ["vgg"], ["iid"], 4)
    gaps = [100 * (sum(w4[s][-3:]) - sum(fp32[s][-3:])) / 3 for s in (0, 1, 2)]
    over_ptq = [100 * (w4[s][-1] - 0.75) for s in (0, 1, 2)]
    row = table.splitlines()[2].split(" | ")
    assert row[2] == "3"
    assert row[5] == f"{sum(gaps) / 3:+.2f} ({min(gaps):+.2f} .. {max(gaps):+.2f})"
    assert row[6] == ("met" if sum(gaps) / 3 >= -0.5 else "not met")    # 3 seeds: no caveat
    assert row[7] == f"{sum(over_ptq) / 3:+.2f} ({min(over_ptq):+.2f} .. {max(over_ptq):+.2f})"
    w3_gap = 100 * (0.70 - sum(fp32[0][-3:]) / 3)
    assert row[8] == "—" and row[9] == f"{w3_gap:+.2f}" and row[10] == "—"
    assert row[11].rstrip(" |") == f"{4000 / 500:.2f}x / {4000 / 4000:.2f}x / {8000 / 4500:.2f}x"
    assert len(folders) == 7                             # 3 x (W4A4, FP32) + W3A3


def test_claim_keeps_rows_of_pairs_run_elsewhere(grid):
    """A claim run on a machine holding only some of the grid's folders updates those rows and
    keeps the others (computed in an earlier session), in the grid's order, under the new header."""
    head = "| network | split | x |\n|---|---|---|"
    old = "\n".join([head, "| vgg | iid | old |", "| small_cnn | dirichlet | old |",
                     "| resnet20 | iid | old |"])
    new = "\n".join([head.replace(" x ", " y "), "| resnet20 | dirichlet | new |",
                     "| vgg | iid | new |"])
    merged = grid.merge_claim_tables(old, new).splitlines()
    assert merged[0] == "| network | split | y |"
    assert merged[2:] == ["| small_cnn | dirichlet | old |", "| vgg | iid | new |",
                          "| resnet20 | iid | old |", "| resnet20 | dirichlet | new |"]
    placeholder = "(no network and split has finished FP32 and W4A4 runs yet)"
    assert grid.merge_claim_tables(old, placeholder) == old
    assert grid.merge_claim_tables("", placeholder) == placeholder


@pytest.mark.parametrize("net", ["small_cnn_full", "resnet20_full"])
def test_full_scale_runs_change_only_the_images(grid, net):
    """The full-scale networks: 28x28 images and all 60000 training images; everything else as
    the grid's run of the same network."""
    small = net.removesuffix("_full")
    full, grid_cfg = _config(grid, net, "iid", "w4a4"), _config(grid, small, "iid", "w4a4")
    assert (full["image_size"], full["train_subset"]) == (28, None)
    assert (grid_cfg["image_size"], grid_cfg["train_subset"]) == (14, 20000)
    assert {k for k, v in full.items() if grid_cfg[k] != v} == {"image_size", "train_subset"}
