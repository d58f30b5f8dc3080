"""oqfl_ext.fl.experiment: one configuration with one set of defaults (the command line's, the
Flower apps', ExperimentConfig's own), options that read back to the same configuration, bad
values named, and a run built from a configuration equal to one built by hand from the data
loaders, the partitioners, the model zoo and quantize_model (the construction the command line
used before the configuration had its own module)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch.nn import functional as F

from oqfl_ext import data as datasets
from oqfl_ext.fl import derive_seed
from oqfl_ext.fl import experiment as ex
from oqfl_ext.fl.cli import build_config, build_parser
from oqfl_ext.fl.experiment import ConfigError, ExperimentConfig
from oqfl_ext.models import MODELS, SmallCNN
from oqfl_ext.nn import LSQQuantizer, calibrate, quantize_model

FIELDS = [f.name for f in dataclasses.fields(ExperimentConfig)]


# ----------------------------------------------------------------------------------------------
# one set of defaults


def test_the_command_lines_defaults_are_the_configs():
    args = build_parser().parse_args([])
    assert ExperimentConfig.from_args(args) == ExperimentConfig()
    assert build_config(args) == ExperimentConfig().record()
    # every option's default, one by one (a default given twice would show here)
    defaults = ExperimentConfig()
    dests = {a.dest: a.default for a in build_parser()._actions}
    assert set(FIELDS) - set(dests) == {"name"}
    for field in FIELDS[1:]:
        assert dests[field] == getattr(defaults, field), field


def test_the_flower_apps_use_the_same_defaults():
    tomllib = pytest.importorskip("tomllib")
    from oqfl_ext.fl.flower import app_pyproject
    from oqfl_ext.fl.flower.task import FlowerSettings, parse_run_config, run_config_defaults

    # what `flwr run` hands both apps without overrides: the app's pyproject.toml config
    written = tomllib.loads(app_pyproject())["tool"]["flwr"]["app"]["config"]
    assert written == run_config_defaults()
    cfg, settings = parse_run_config(written)
    assert cfg == ExperimentConfig() and settings == FlowerSettings()
    assert parse_run_config({}) == (ExperimentConfig(), FlowerSettings())
    assert settings.threads == build_parser().parse_args([]).threads
    # the same client ids and seeds as the command line's run
    assert [ex.client_id(cfg, i) for i in (0, 9)] == ["client-0", "client-9"]
    assert ex.client_seed(cfg, 3) == derive_seed(0, 0xC1, 3)


def test_the_documented_defaults():
    """The values docs/RESULTS.md and the README describe (written out, not read back)."""
    d = ExperimentConfig()
    assert (d.model, d.width, d.dataset, d.resolved_image_size) == ("small_cnn", 16,
                                                                     "fashion-mnist", 14)
    assert (d.clients, d.fraction, d.rounds, d.partition) == (10, 0.5, 10, "iid")
    assert (d.lr, d.momentum, d.batch_size, d.local_epochs) == (0.05, 0.9, 32, 1)
    assert (d.weight_bits, d.act_bits, d.first_last_bits, d.uplink) == (4, 4, 8, "int4")
    # the quantizers' defaults chosen on the validation split (docs/RESULTS.md)
    assert (d.quant_init, d.grad_scale, d.act_grad_count, d.step_size_lr_scale) == \
        ("lsq", "lsq", "all", 0.1)
    assert d.eval_split == "test"
    assert d.stochastic and d.error_feedback and d.eval_integer
    assert d.run_name == "oqfl-w4a4" and ExperimentConfig(weight_bits=None,
                                                          act_bits=None).run_name == "fp32"


# ----------------------------------------------------------------------------------------------
# conversions and checks

ODD = ExperimentConfig(model="vgg", width=8, dataset="digits", image_size=8, train_subset=None,
                       test_subset=100, clients=7, fraction=1.0, rounds=3,
                       partition="dirichlet", alpha=0.3, server_lr=0.5, server_momentum=0.9,
                       norm_bound=2.5, client_time_limit_s=30.0, weight_decay=1e-4,
                       weight_bits=3, act_bits=None, first_last_bits=None, quant_init="lsq",
                       grad_scale="none", step_size_lr_scale=0.1, uplink="int8",
                       eval_split="validation", validation_size=300, act_grad_count="example",
                       uplink_compression="zlib", stochastic=False, error_feedback=False,
                       downlink="int8", seed=2 ** 63 - 1, eval_integer=False)


@pytest.mark.parametrize("cfg", [ExperimentConfig(), ODD], ids=["defaults", "odd"])
def test_options_and_records_read_back(cfg):
    assert ExperimentConfig.from_options(cfg.options()) == cfg
    # the command line's words for None: "float" bits, "all" examples; no option for the rest
    words = {"train-subset": "all", "test-subset": "all", "weight-bits": "float",
             "act-bits": "float", "first-last-bits": "float"}
    argv = []
    for key, value in cfg.options().items():
        if isinstance(value, bool):
            argv.append(f"--{key}" if value else f"--no-{key}")
        elif getattr(cfg, key.replace("-", "_").replace("client_time_limit",
                                                        "client_time_limit_s")) is None:
            argv += [f"--{key}={words[key]}"] if key in words else []
        else:
            argv.append(f"--{key}={value}")
    parsed = build_parser().parse_args(argv)
    assert ExperimentConfig.from_args(parsed) == cfg
    named = dataclasses.replace(cfg, name=cfg.run_name,
                                image_size=cfg.resolved_image_size)
    assert ExperimentConfig.from_record(cfg.record()) == named
    assert named.record() == cfg.record()


def test_a_record_says_none_for_options_that_do_not_apply():
    rec = ExperimentConfig(model="resnet20", uplink="float32", weight_bits=None,
                           act_bits=None).record()
    assert rec["width"] is None and rec["alpha"] is None and rec["classes_per_client"] is None
    assert rec["stochastic"] is None and rec["error_feedback"] is None
    assert rec["first_last_bits"] is None and rec["eval_integer"] is False
    assert ExperimentConfig(partition="shards").record()["classes_per_client"] == 2


@pytest.mark.parametrize("kwargs, option", [
    ({"clients": 0}, "--clients"), ({"clients": 2.0}, "--clients"), ({"lr": True}, "--lr"),
    ({"lr": math.inf}, "--lr"), ({"momentum": 1.0}, "--momentum"),
    ({"fraction": 0.0}, "--fraction"), ({"weight_bits": 32}, "--weight-bits"),
    ({"weight_bits": 1}, "--weight-bits"), ({"model": "alexnet"}, "--model"),
    ({"stochastic": 1}, "--stochastic"), ({"seed": -1}, "--seed"), ({"width": None}, "--width"),
    ({"model": "resnet20", "image_size": 3}, "--image-size"), ({"device": 0}, "--device"),
])
def test_bad_values_name_the_option(kwargs, option):
    with pytest.raises(ConfigError) as e:
        ExperimentConfig(**kwargs)
    assert e.value.option == option
    assert f"ExperimentConfig.{option[2:].replace('-', '_')}" in str(e.value)


def test_bad_options_name_the_key():
    for options, match in (({"clientz": 3}, r"unknown keys \['clientz'\]"),
                           ({"weight-bits": 9}, "run config weight-bits: expected bits"),
                           ({"stochastic": "yes"}, "run config stochastic: expected true"),
                           ({"clients": [3]}, "run config clients: expected a number"),
                           ({"partition": "bogus"}, "run config partition: invalid choice"),
                           ({"model": "resnet20", "image-size": 2},
                            "run config image-size: resnet20 needs")):
        with pytest.raises(ValueError, match=match):
            ExperimentConfig.from_options(options)
    # "none" is a value only where an option takes one
    assert ExperimentConfig.from_options({"norm-bound": "none"}).norm_bound is None
    with pytest.raises(ValueError, match="run config clients"):
        ExperimentConfig.from_options({"clients": "none"})


def test_flower_settings_are_checked():
    from oqfl_ext.fl.flower.task import parse_run_config
    for config, match in (({"round-timeout": 0}, "round-timeout"),
                          ({"threads": -1}, "threads"), ({"wait-nodes-timeout": "x"},
                                                         "wait-nodes-timeout"),
                          ({"device": "meta"}, "run config device")):
        with pytest.raises(ValueError, match=match):
            parse_run_config(config)


# ----------------------------------------------------------------------------------------------
# building a run


def _by_hand_model(cfg, shape, calibration):
    """The quantized model as the command line built it: zoo model under the seed,
    quantize_model, the quantizer options set afterwards, calibrated on partition 0."""
    in_channels, num_classes, size = shape
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        m = SmallCNN(in_channels=in_channels, num_classes=num_classes, image_size=size,
                     width=cfg.width)
        m = quantize_model(m, weight_bits=cfg.weight_bits, act_bits=cfg.act_bits,
                           first_last_bits=cfg.first_last_bits, inplace=True)
    for q in m.modules():
        if isinstance(q, LSQQuantizer):
            q.init, q.grad_factor = cfg.quant_init, 1.0 if cfg.grad_scale == "none" else None
    if calibration is not None:
        m.train()
        calibrate(m, calibration)
    return m


@pytest.mark.parametrize("grad_scale", ["lsq", "none"])
def test_a_built_run_equals_one_built_by_hand(grad_scale):
    cfg = ExperimentConfig(dataset="digits", width=4, clients=5, partition="dirichlet",
                           alpha=0.5, seed=11, quant_init="lsq", grad_scale=grad_scale,
                           weight_bits=3, act_bits=4, uplink="int8")
    built = ex.build(cfg)
    tx, ty = datasets.load_digits("train", normalize=True)
    vx, vy = datasets.load_digits("test", normalize=True)
    assert torch.equal(built.data.train_x, tx) and torch.equal(built.data.train_y, ty)
    assert torch.equal(built.data.test_x, vx) and torch.equal(built.data.test_y, vy)
    parts = datasets.partition_dirichlet(ty, 5, 0.5, seed=11)
    assert len(built.parts) == 5 and all(torch.equal(a, b) for a, b in zip(built.parts, parts))
    for i, client in enumerate(built.clients):
        assert client.client_id == f"client-{i}" and client.seed == derive_seed(11, 0xC1, i)
        assert torch.equal(client.inputs, tx[parts[i]])
        assert torch.equal(client.labels, ty[parts[i]])
        c = client.config
        assert (c.lr, c.momentum, c.batch_size, c.uplink_bits, c.error_feedback) == \
            (0.05, 0.9, 32, 8, True)
    want = _by_hand_model(cfg, (1, 10, 8), tx[parts[0]][:256]).state_dict()
    got = built.server.model.state_dict()
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)
    quantizers = [q for q in built.server.model.modules() if isinstance(q, LSQQuantizer)]
    assert quantizers and {(q.init, q.grad_factor) for q in quantizers} == \
        {("lsq", 1.0 if grad_scale == "none" else None)}
    assert built.server.fraction == 0.5 and built.server.evaluate_integer


def test_the_initial_template_is_the_servers_model_before_calibration():
    from oqfl_ext.fl.downlink import state_digest

    cfg = ExperimentConfig(dataset="digits", width=4, clients=3, seed=11, weight_bits=4,
                           act_bits=4, uplink="int4", downlink="int4-delta")
    rng = torch.get_rng_state()
    template = ex.initial_template(cfg, 1, 10, 8)
    assert torch.equal(torch.get_rng_state(), rng)  # the run's RNG stream is untouched
    want = _by_hand_model(cfg, (1, 10, 8), None).state_dict()
    assert list(template) == list(want) and all(torch.equal(template[k], want[k]) for k in want)
    built = ex.build(cfg)
    digest = state_digest(template)
    assert built.server.broadcast.initial_digest == digest
    assert all(c.held.initial_digest == digest for c in built.clients)
    # the server's initial model is still the one built by hand (template + calibration)
    tx = datasets.load_digits("train", normalize=True)[0]
    calibrated = _by_hand_model(cfg, (1, 10, 8), tx[built.parts[0]][:256]).state_dict()
    got = built.server.model.state_dict()
    assert all(torch.equal(got[k], calibrated[k]) for k in calibrated)
    assert ex.initial_template(dataclasses.replace(cfg, downlink="float32"), 1, 10, 8) is None
    assert ex.build(dataclasses.replace(cfg, downlink="float32")).clients[0].held.initial is None


def test_the_validation_split_is_held_out_of_the_training_images():
    tx, ty = datasets.load_digits("train", normalize=True)
    n = len(ty)
    cfg = ExperimentConfig(dataset="digits", eval_split="validation", validation_size=300,
                           train_subset=None, clients=4)
    built = ex.build(cfg)
    d = built.data
    # evaluation: the last 300 training images; training: the others, in file order
    assert torch.equal(d.test_x, tx[n - 300:]) and torch.equal(d.test_y, ty[n - 300:])
    assert torch.equal(d.train_x, tx[:n - 300]) and torch.equal(d.train_y, ty[:n - 300])
    assert torch.equal(built.server.test_x.cpu(), tx[n - 300:])
    # a training subset is taken from the images left after the validation set
    small = ex.load_data(dataclasses.replace(cfg, train_subset=500))
    assert torch.equal(small.train_x, tx[:500]) and torch.equal(small.test_x, tx[n - 300:])
    rec = cfg.record()
    assert (rec["eval_split"], rec["validation_size"]) == ("validation", 300)
    assert ExperimentConfig(dataset="digits").record()["validation_size"] is None
    # the test split is unchanged by the option's existence
    plain = ex.load_data(ExperimentConfig(dataset="digits", train_subset=None))
    assert torch.equal(plain.train_x, tx)
    for bad in (dict(validation_size=n), dict(validation_size=300, train_subset=n - 299)):
        with pytest.raises(ex.ExperimentError, match="--validation-size"):
            ex.load_data(dataclasses.replace(cfg, **bad))
    with pytest.raises(ConfigError, match="eval_split"):
        ExperimentConfig(eval_split="train")


@pytest.mark.skipif(datasets.fashion_mnist_dir() is None, reason="Fashion-MNIST not installed")
def test_fashion_mnist_is_pooled_to_its_default_size():
    cfg = ExperimentConfig(train_subset=64, test_subset=32, clients=2)
    data = ex.load_data(cfg)
    tx, _ = datasets.load_fashion_mnist("train", limit=64, normalize=True)
    vx, _ = datasets.load_fashion_mnist("test", limit=32, normalize=True)
    torch.testing.assert_close(data.train_x, F.avg_pool2d(tx, 2), rtol=0, atol=1e-6)
    torch.testing.assert_close(data.test_x, F.avg_pool2d(vx, 2), rtol=0, atol=1e-6)
    assert data.model_shape == (1, 10, 14)


@pytest.mark.parametrize("partition", ex.PARTITIONS)
def test_a_thousand_clients_of_fashion_mnists_60k(partition):
    """1000 clients (the Flower simulation's scale) on Fashion-MNIST's 60000 training labels:
    every partition scheme gives each client its own non-empty share (iid and shards: all of
    them), client ids sort in index order, and fraction 0.01 samples 10 distinct clients a
    round."""
    from oqfl_ext.fl import RemoteClient

    cfg = ExperimentConfig.from_options({"clients": 1000, "fraction": 0.01,
                                         "train-subset": "all", "partition": partition})
    assert cfg.train_subset is None  # all 60000
    labels = torch.arange(60000) % 10
    parts = ex.make_partitions(cfg, labels)
    assert len(parts) == 1000 and min(len(q) for q in parts) > 0
    flat = torch.cat(parts)
    assert len(flat.unique()) == len(flat)  # disjoint
    if partition != "dirichlet":
        assert sorted(flat.tolist()) == list(range(60000))
    ids = [ex.client_id(cfg, i) for i in range(1000)]
    assert ids[0] == "client-000" and ids[-1] == "client-999" and ids == sorted(ids)
    data = ex.ExperimentData(torch.randn(60000, 1, 1, 1).expand(60000, 1, 14, 14), labels,
                             torch.randn(20, 1, 14, 14), labels[:20])
    server = ex.make_server(cfg, data, parts,
                            [RemoteClient(ids[i], len(parts[i])) for i in range(1000)])
    for r in range(3):
        sampled, _ = server.begin_round(r)
        names = [c.client_id for c in sampled]
        assert len(names) == 10 == len(set(names)) and set(names) <= set(ids)


def test_a_partition_the_data_cannot_give_names_the_options():
    cfg = ExperimentConfig(dataset="digits", clients=2000)
    with pytest.raises(ex.ExperimentError, match="--clients 2000 is more than the 1438"):
        ex.build(cfg)
    cfg = ExperimentConfig(dataset="digits", clients=20, partition="shards",
                           classes_per_client=11)
    with pytest.raises(ex.ExperimentError, match="--partition shards --clients 20 "
                                                  "--classes-per-client 11"):
        ex.build(cfg)


def test_the_model_names_are_the_zoos():
    assert ex.MODEL_NAMES == tuple(MODELS)
    assert {m for m in MODELS if ExperimentConfig(model=m).takes_width} == {"small_cnn", "vgg"}
