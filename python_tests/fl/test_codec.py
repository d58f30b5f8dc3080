"""The federated update wire format (oqfl_ext.fl.codec, docs/DESIGN.md section 4)."""

from __future__ import annotations

import json
import math
import pickle
import random
import struct
import zlib

import pytest
import torch
from safetensors.torch import save as st_save

import oqfl_ext  # noqa: F401
from oqfl_ext.fl import UpdateRejected, decode_update, encode_update

from helpers import forge, read_blob

QMAX = {4: 7, 8: 127}


def small_update(dtype=torch.float32):
    torch.manual_seed(1)
    u = {
        "conv.weight": torch.randn(6, 3, 3, 3),    # 4-D: per-channel
        "fc.weight": torch.randn(5, 7) * 0.01,     # 2-D: per-channel
        "bn.bias": torch.randn(6),                 # 1-D: bfloat16 values
        "temp": torch.tensor(0.75),                # 0-D: bfloat16 values
        "odd": torch.randn(3, 7),                  # odd count: int4 padding nibble
    }
    u["conv.weight"][2].zero_()                    # a zero channel gets a tiny positive scale
    return {k: v.to(dtype) for k, v in u.items()}


def expected_scale(x: torch.Tensor, bits: int) -> torch.Tensor:
    """The step size each element of x (2 or more dimensions) was quantized with (broadcast to
    x's shape)."""
    x = x.float()
    assert x.dim() >= 2, "0-D and 1-D entries travel as bfloat16 values"
    s = x.abs().reshape(x.shape[0], -1).amax(1) / QMAX[bits]
    s = s.clamp_min(torch.finfo(torch.float32).tiny)
    return s.reshape([-1] + [1] * (x.dim() - 1)).expand_as(x)


def template_of(update):
    return {k: torch.zeros_like(v, dtype=torch.float32) for k, v in update.items()}


# ------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("stochastic", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_within_quantization_bound(bits, stochastic, dtype):
    u = small_update(dtype)
    blob = encode_update(u, bits=bits, stochastic=stochastic,
                         generator=torch.Generator().manual_seed(3))
    out = decode_update(blob, template_of(u))
    assert list(out) == list(u)
    for name, x in u.items():
        y = out[name]
        assert y.dtype == torch.float32 and y.shape == x.shape
        if x.dim() <= 1:  # bfloat16 values, rounded to nearest once
            assert torch.equal(y, x.to(torch.bfloat16).float()), name
            continue
        s = expected_scale(x, bits)
        err = (y - x.float()).abs()
        # |error| <= s/2 when rounding to nearest, < s with stochastic rounding (a hair of
        # float32 slack for x/s computed in float32)
        bound = s * (1.0 if stochastic else 0.5) * (1 + 1e-5)
        assert bool((err <= bound).all()), (name, (err / s).max())
    assert bool((out["conv.weight"][2] == 0).all())


@pytest.mark.parametrize("bits", [4, 8])
def test_values_near_float32_max_round_trip(bits):
    u = {"w": torch.tensor([[3.4e38, -3.4e38], [1e38, 0.0]]), "c": torch.full((2, 2), -3e38)}
    out = decode_update(encode_update(u, bits=bits, stochastic=False), template_of(u))
    for k in u:
        assert bool(torch.isfinite(out[k]).all())
        assert bool(((out[k] - u[k]).abs() <= expected_scale(u[k], bits) * 0.5001).all())


def test_vector_beyond_bfloat16_range_is_an_error():
    # finite in float32, infinite in bfloat16: refused at the sender, never sent as inf
    with pytest.raises(ValueError, match=r"update\['b'\] has values beyond bfloat16's range"):
        encode_update({"b": torch.tensor([3.4e38, 1.0])}, bits=4)


def test_round_trip_float32_exact_and_info():
    u = small_update()
    u["big"] = torch.randn(4, 2, 1, 1).to(torch.float64)
    u["huge"] = torch.tensor([3.4e38, -3.4e38, 1.0])  # near float32's limit, still finite
    blob = encode_update(u, bits=32, round=7, client_id="client-7", num_samples=123)
    out, info = decode_update(blob, template_of(u), return_info=True)
    for k in u:
        assert torch.equal(out[k], u[k].float())
    assert info["round"] == 7 and info["client_id"] == "client-7"
    assert info["num_samples"] == 123 and info["bits"] == 32


def test_decoded_follows_template_order_and_device():
    u = small_update()
    template = dict(reversed(list(template_of(u).items())))
    out = decode_update(encode_update(u, bits=8, stochastic=False), template)
    assert list(out) == list(template)
    assert all(out[k].device == template[k].device for k in out)


def test_deterministic_codes_match_fake_quant_and_stochastic_depends_on_seed():
    u = small_update()
    a = encode_update(u, bits=4, stochastic=False)
    # (the blob bytes may differ: safetensors writes the metadata map in hash order)
    a2 = decode_update(encode_update(u, bits=4, stochastic=False), template_of(u))
    assert all(torch.equal(decode_update(a, template_of(u))[k], a2[k]) for k in u)
    b1 = decode_update(encode_update(u, bits=4, generator=torch.Generator().manual_seed(1)),
                       template_of(u))
    b2 = decode_update(encode_update(u, bits=4, generator=torch.Generator().manual_seed(1)),
                       template_of(u))
    b3 = decode_update(encode_update(u, bits=4, generator=torch.Generator().manual_seed(2)),
                       template_of(u))
    assert all(torch.equal(b1[k], b2[k]) for k in u)
    assert not all(torch.equal(b1[k], b3[k]) for k in u)
    # round-half-to-even codes equal the fake quantizer's output
    d = decode_update(a, template_of(u))
    x = u["fc.weight"]
    s = x.abs().amax(1) / 7
    ref = oqfl_ext.ops.fake_quant(x, s, None, quant_min=-8, quant_max=7, axis=0)
    torch.testing.assert_close(d["fc.weight"], ref, rtol=0, atol=0)


def test_stochastic_rounding_is_unbiased():
    # x sits 0.3 of a step above a grid point everywhere (scale 0.25, exact in float32), so
    # round-to-nearest has bias -0.3 * s on every element. With stochastic rounding each
    # error e = (q - v) * s lies in [-0.3 s, 0.7 s] (range s) with mean 0; by Hoeffding the mean
    # of n independent errors exceeds t with probability <= 2 exp(-2 n t^2 / s^2). With
    # delta = 1e-9 the bounds below are t = s * sqrt(ln(2 / delta) / (2 n)): per element
    # (n = R seeds) and overall (n = R * N). The seeds are fixed, so the test is deterministic;
    # the bounds say it would pass for all but a 1e-9 fraction of seed choices.
    N, R, s = 1024, 1024, 0.25
    k = torch.arange(N) % 14 - 7                       # v in [-6.7, 6.3]
    x = (k.float() + 0.3) * s
    x[0] = 7 * s                                       # fixes the row's scale: 1.75 / 7
    x = x.reshape(1, N)                                # one channel (1-D entries go as bfloat16)
    template = {"w": torch.zeros(1, N)}
    errs = torch.stack([
        decode_update(encode_update({"w": x}, bits=4, generator=torch.Generator().manual_seed(i)),
                      template)["w"][0] - x[0] for i in range(R)])
    log_term = math.log(2 / 1e-9)
    per_elem = s * math.sqrt(log_term / (2 * R))
    overall = s * math.sqrt(log_term / (2 * R * N))
    assert errs[:, 1:].mean(0).abs().max().item() <= per_elem
    assert abs(errs[:, 1:].mean().item()) <= overall
    det = decode_update(encode_update({"w": x}, bits=4, stochastic=False), template)["w"][0] - x[0]
    torch.testing.assert_close(det[1:], torch.full((N - 1,), -0.3 * s))  # the bias it detects
    assert 0.3 * s > 10 * overall and 0.3 * s > 2 * per_elem


def resnet18_like_update():
    """Random values with the shapes of torchvision's ResNet-18 floating-point state
    (11.7M parameters plus BatchNorm running statistics)."""
    shapes = {"conv1.weight": (64, 3, 7, 7)}

    def bn(prefix, c):
        for n in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.{n}"] = (c,)

    bn("bn1", 64)
    cin = 64
    for li, c in enumerate((64, 128, 256, 512), start=1):
        for b in range(2):
            p = f"layer{li}.{b}"
            stride_block = b == 0 and c != cin
            shapes[f"{p}.conv1.weight"] = (c, cin if b == 0 else c, 3, 3)
            bn(f"{p}.bn1", c)
            shapes[f"{p}.conv2.weight"] = (c, c, 3, 3)
            bn(f"{p}.bn2", c)
            if stride_block:
                shapes[f"{p}.downsample.0.weight"] = (c, cin, 1, 1)
                bn(f"{p}.downsample.1", c)
        cin = c
    shapes["fc.weight"] = (1000, 512)
    shapes["fc.bias"] = (1000,)
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(v, generator=g) * 0.01 for k, v in shapes.items()}


def test_blob_size_ratio_resnet18_sized():
    u = resnet18_like_update()
    n = sum(v.numel() for v in u.values())
    assert 11_600_000 < n < 11_800_000
    f32 = 4 * n
    ratios = {}
    for bits, limit in ((4, 0.127), (8, 0.255)):
        blob = encode_update(u, bits=bits, stochastic=False)
        ratios[bits] = len(blob) / f32                 # headers and scales included
        assert ratios[bits] <= limit, ratios
    blob32 = encode_update(u, bits=32)
    assert len(blob32) / f32 < 1.01
    print("blob / float32 bytes:", ratios)


# ------------------------------------------------------------------------------ rejections


def reject(blob, template, match=None):
    with pytest.raises(UpdateRejected, match=match):
        decode_update(blob, template)


@pytest.fixture(scope="module")
def fuzz_case():
    u = small_update()
    return u, template_of(u)


@pytest.mark.parametrize("bits", [4, 32])
def test_every_single_bit_flip_is_rejected(fuzz_case, bits):
    u, template = fuzz_case
    blob = encode_update(u, bits=bits, round=1, client_id="c", num_samples=5)
    assert len(blob) < 4096
    for pos in range(len(blob)):                       # header and body, every bit
        for bit in range(8):
            bad = bytearray(blob)
            bad[pos] ^= 1 << bit
            with pytest.raises(UpdateRejected):
                decode_update(bytes(bad), template)
    assert decode_update(blob, template).keys() == template.keys()


def test_truncations_and_appended_bytes_are_rejected(fuzz_case):
    u, template = fuzz_case
    blob = encode_update(u, bits=8)
    for n in range(len(blob)):
        reject(blob[:n], template)
    for extra in (b"\x00", b" ", b"x" * 100, blob):
        reject(blob + extra, template)
    decode_update(bytearray(blob), template)           # bytes-like inputs are fine


@pytest.mark.parametrize("garbage", [
    b"", b"garbage", b"\xff" * 64, bytes(range(256)) * 4, pickle.dumps({"a": 1}),
    struct.pack("<Q", 2) + b"{}", struct.pack("<Q", 1 << 60) + b"{}",
    struct.pack("<Q", 8) + b'[1,2,3] ', None, 12345, "text",
])
def test_garbage_is_rejected(fuzz_case, garbage):
    reject(garbage, fuzz_case[1])


def test_foreign_safetensors_blob_is_rejected(fuzz_case):
    reject(st_save({"conv.weight": torch.zeros(6, 3, 3, 3)}), fuzz_case[1])
    reject(st_save({"a": torch.zeros(2)}, metadata={"format": "pt"}), fuzz_case[1], "format")


def test_random_byte_corruption_is_rejected(fuzz_case):
    u, template = fuzz_case
    blob = encode_update(u, bits=4)
    rnd = random.Random(0)
    for _ in range(300):
        bad = bytearray(blob)
        for _ in range(rnd.randint(2, 8)):
            bad[rnd.randrange(len(bad))] = rnd.randrange(256)
        if bytes(bad) != blob:
            reject(bytes(bad), template)


def test_template_disagreements_are_rejected(fuzz_case):
    u, template = fuzz_case
    blob = encode_update(u, bits=4)
    t = dict(template)
    t["extra"] = torch.zeros(3)
    reject(blob, t, "names differ")
    t = dict(template)
    del t["odd"]
    reject(blob, t, "names differ")
    t = dict(template)
    t["renamed"] = t.pop("bn.bias")
    reject(blob, t, "names differ")
    for name, shape in (("conv.weight", (3, 6, 3, 3)), ("fc.weight", (7, 5)),
                        ("bn.bias", (6, 1)), ("temp", (1,)), ("odd", (8,)), ("fc.weight", (35,))):
        t = dict(template)
        t[name] = torch.zeros(shape)
        reject(blob, t, "shape")
    # names swapped between differently-shaped parameters at the sender
    swapped = dict(u)
    swapped["bn.bias"], swapped["odd"] = u["odd"], u["bn.bias"]
    reject(encode_update(swapped, bits=8), template, "shape")
    reject(encode_update(swapped, bits=32), template, "shape")
    decode_update(blob, template)


def _set(d, k, v):
    d[k] = v


def _set_param_field(meta, name, field, value):
    params = json.loads(meta["params"])
    for p in params:
        if p["name"] == name:
            p[field] = value
    meta["params"] = json.dumps(params)


FORGERIES_Q = {  # (tensor change, metadata change, message expected with a valid digest)
    "nan_scale": (lambda t: _set(t, "fc.weight::scale", t["fc.weight::scale"].clone().fill_(
        float("nan"))), None, "scale"),
    "inf_scale": (lambda t: _set(t, "bn.bias::scale", torch.tensor([float("inf")])), None,
                  "scale"),
    "negative_scale": (lambda t: _set(t, "conv.weight::scale", -t["conv.weight::scale"]), None,
                       "scale"),
    "huge_scale": (lambda t: _set(t, "bn.bias::scale", torch.tensor([3e38])), None, "scale"),
    "zero_scale": (lambda t: _set(t, "temp::scale", torch.zeros(1)), None, "scale"),
    "scale_shape": (lambda t: _set(t, "fc.weight::scale", torch.ones(7)), None, "scale"),
    "scale_dtype": (lambda t: _set(t, "odd::scale", torch.ones(1, dtype=torch.float16)), None,
                    None),
    "scale_2d": (lambda t: _set(t, "fc.weight::scale", torch.ones(5, 1)), None, "scale"),
    "short_codes": (lambda t: _set(t, "odd::codes", t["odd::codes"][:-1].clone()), None,
                    "packed"),
    "long_codes": (lambda t: _set(t, "odd::codes", torch.zeros(5, dtype=torch.uint8)), None,
                   "packed"),
    "codes_dtype": (lambda t: _set(t, "odd::codes", torch.zeros(4, dtype=torch.int8)), None,
                    None),
    "missing_tensor": (lambda t: t.pop("fc.weight::scale"), None, "tensors differ"),
    "extra_tensor": (lambda t: _set(t, "x::codes", torch.zeros(1, dtype=torch.uint8)), None,
                     "tensors differ"),
    "shape_lie": (None, lambda m: _set_param_field(m, "odd", "shape", [3, 9]), "shape"),
    "numel_lie": (None, lambda m: _set_param_field(m, "fc.weight", "shape", [5, 9]), "shape"),
    "axis_lie": (None, lambda m: _set_param_field(m, "fc.weight", "axis", 1), "scale"),
    "axis_range": (None, lambda m: _set_param_field(m, "fc.weight", "axis", 5), "axis"),
    "dtype_lie": (None, lambda m: _set_param_field(m, "odd", "dtype", "int64"), "dtype"),
    "bits_2": (None, lambda m: _set(m, "bits", "2"), "bits"),
    "bits_16": (None, lambda m: _set(m, "bits", "16"), "bits"),
    "bits_8": (None, lambda m: _set(m, "bits", "8"), "packed"),
    "bits_32": (None, lambda m: _set(m, "bits", "32"), "axis|tensors differ"),
    "format": (None, lambda m: _set(m, "format", "other"), "format"),
    "version": (None, lambda m: _set(m, "version", "2"), "version"),
    "extra_key": (None, lambda m: _set(m, "note", "hi"), "metadata keys"),
    "missing_key": (None, lambda m: m.pop("num_samples"), "metadata keys"),
    "round": (None, lambda m: _set(m, "round", "-1"), "round"),
    "num_samples": (None, lambda m: _set(m, "num_samples", "1e3"), "num_samples"),
    "params_json": (None, lambda m: _set(m, "params", "[{"), "params"),
    "params_dup": (None, lambda m: _set(m, "params", json.dumps(
        json.loads(m["params"]) + json.loads(m["params"])[:1])), "twice"),
    "params_empty": (None, lambda m: _set(m, "params", "[]"), "params"),
}


@pytest.mark.parametrize("valid_digest", [True, False], ids=["valid-digest", "stale-digest"])
@pytest.mark.parametrize("case", sorted(FORGERIES_Q))
def test_forged_quantized_blobs_are_rejected(fuzz_case, case, valid_digest):
    u, template = fuzz_case
    blob = encode_update(u, bits=4)
    tfn, mfn, msg = FORGERIES_Q[case]
    bad = forge(blob, tfn, mfn, valid_digest)
    reject(bad, template, msg if valid_digest else None)
    if not valid_digest:
        reject(bad, template, "digest|format|version|metadata keys|dtype")


FORGERIES_F = {
    "nan_value": (lambda t: t["bn.bias::values"].__setitem__(2, float("nan")), None,
                  "non-finite"),
    "inf_value": (lambda t: t["conv.weight::values"].__setitem__((0, 0, 0, 0), float("-inf")),
                  None, "non-finite"),
    "values_shape": (lambda t: _set(t, "fc.weight::values", torch.zeros(7, 5)), None,
                     "values"),
    "values_flat": (lambda t: _set(t, "fc.weight::values", torch.zeros(35)), None, "values"),
    "values_u8": (lambda t: _set(t, "temp::values", torch.zeros((), dtype=torch.uint8)), None,
                  "values"),
    "axis_with_32": (None, lambda m: _set_param_field(m, "odd", "axis", 0), "axis"),
    "bits_4": (None, lambda m: _set(m, "bits", "4"), "tensors differ"),
}


@pytest.mark.parametrize("valid_digest", [True, False], ids=["valid-digest", "stale-digest"])
@pytest.mark.parametrize("case", sorted(FORGERIES_F))
def test_forged_float32_blobs_are_rejected(fuzz_case, case, valid_digest):
    u, template = fuzz_case
    blob = encode_update(u, bits=32)
    tfn, mfn, msg = FORGERIES_F[case]
    reject(forge(blob, tfn, mfn, valid_digest), template, msg if valid_digest else "digest")


HUGE = "A" * (2 << 20)   # 2 MiB of attacker-chosen text

FORGERIES_LONG = {  # (tensor change, metadata change, message expected)
    "client_id_2mb": (None, lambda m: _set(m, "client_id", HUGE), "client_id"),
    "client_id_257": (None, lambda m: _set(m, "client_id", "c" * 257), "client_id"),
    "client_id_newline": (None, lambda m: _set(m, "client_id", "evil\n" + HUGE), "client_id"),
    "client_id_control": (None, lambda m: _set(m, "client_id", "a\x1b[2Jb"), "client_id"),
    "round": (None, lambda m: _set(m, "round", "9" * 5 + HUGE), "round"),
    "format": (None, lambda m: _set(m, "format", HUGE), "format"),
    "extra_key": (None, lambda m: _set(m, HUGE, "x"), "metadata keys"),
    "param_name": (None, lambda m: _set_param_field(m, "odd", "name", HUGE), "names differ"),
    "param_shape": (None, lambda m: _set_param_field(m, "odd", "shape", [HUGE]), "shape"),
    "param_entry": (None, lambda m: _set(m, "params", json.dumps([{"name": HUGE}])),
                    "malformed entry"),
    "codec": (None, lambda m: _set(m, "codec", HUGE), "codec"),
    "tensor_name": (lambda t: _set(t, HUGE, torch.zeros(1)), None, "tensors differ"),
    "tensor_dtype": (lambda t: _set(t, HUGE, torch.zeros(1, dtype=torch.float64)), None,
                     "dtype"),
}


@pytest.mark.parametrize("case", sorted(FORGERIES_LONG))
def test_rejections_quote_only_a_short_prefix_of_long_text(fuzz_case, case):
    # the drop reason goes into metrics.json and the log every round: a client must not be
    # able to make it large
    u, template = fuzz_case
    tfn, mfn, msg = FORGERIES_LONG[case]
    bad = forge(encode_update(u, bits=4, client_id="c-7"), tfn, mfn)
    with pytest.raises(UpdateRejected, match=msg) as e:
        decode_update(bad, template)
    assert len(str(e.value)) <= 600, (case, len(str(e.value)))


def test_client_id_limit_on_decode_and_encode(fuzz_case):
    u, template = fuzz_case
    longest = "\u00e9" * 256   # the documented limit counts characters, not bytes
    _, info = decode_update(encode_update(u, bits=8, client_id=longest), template,
                            return_info=True)
    assert info["client_id"] == longest
    for bad in ("c" * 257, HUGE, "tab\there"):
        with pytest.raises(ValueError, match="client_id") as e:
            encode_update(u, bits=8, client_id=bad)
        assert len(str(e.value)) <= 300


def test_forge_without_changes_still_decodes(fuzz_case):
    # the forging helper itself produces valid blobs: rejections above come from the changes
    u, template = fuzz_case
    for bits in (4, 8, 32):
        out = decode_update(forge(encode_update(u, bits=bits)), template)
        assert out.keys() == template.keys()


def test_non_canonical_header_is_rejected(fuzz_case):
    u, template = fuzz_case
    blob = encode_update(u, bits=8)
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    text = json.dumps(header, indent=1).encode()      # same content, other whitespace
    text += b" " * (-len(text) % 8)
    reject(struct.pack("<Q", len(text)) + text + blob[8 + n:], template, "canonical")
    # duplicated JSON key: the last one would win in a lenient parser
    body = blob[8:8 + n].rstrip(b" ")
    dup = body[:-1] + b',"__metadata__":{}}'
    dup += b" " * (-len(dup) % 8)
    reject(struct.pack("<Q", len(dup)) + dup + blob[8 + n:], template)


def test_encode_argument_errors():
    u = small_update()
    for bad in (2, 16, 0, True, "8"):
        with pytest.raises(ValueError, match="bits"):
            encode_update(u, bits=bad)
    with pytest.raises(ValueError, match="round"):
        encode_update(u, bits=8, round=-1)
    with pytest.raises(ValueError, match="num_samples"):
        encode_update(u, bits=8, num_samples=1.5)
    with pytest.raises(ValueError, match="client_id"):
        encode_update(u, bits=8, client_id="a\nb")
    with pytest.raises(ValueError, match="non-finite"):
        encode_update({"w": torch.tensor([1.0, float("nan")])}, bits=4)
    with pytest.raises(ValueError, match="non-finite"):
        encode_update({"w": torch.tensor([1.0, float("inf")])}, bits=32)
    with pytest.raises(ValueError, match="floating"):
        encode_update({"w": torch.ones(3, dtype=torch.int64)}, bits=8)
    with pytest.raises(ValueError):
        encode_update({}, bits=8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("bits", [4, 8, 32])
def test_cuda_update_and_template(bits):
    u = {k: v.cuda() for k, v in small_update().items()}
    blob = encode_update(u, bits=bits, stochastic=False)
    out = decode_update(blob, {k: torch.zeros_like(v) for k, v in u.items()})
    cpu = decode_update(encode_update({k: v.cpu() for k, v in u.items()}, bits=bits,
                                      stochastic=False), template_of(u))
    for k in u:
        assert out[k].device.type == "cuda"
        torch.testing.assert_close(out[k].cpu(), cpu[k], rtol=0, atol=0)


def test_empty_tensors_round_trip():
    u = {"e2": torch.zeros(0, 3), "e1": torch.zeros(0), "w": torch.ones(2, 2)}
    for bits in (4, 8, 32):
        out = decode_update(encode_update(u, bits=bits), template_of(u))
        assert out["e2"].shape == (0, 3) and out["e1"].shape == (0,)
        torch.testing.assert_close(out["w"], u["w"])


def test_same_update_gives_the_same_bytes():
    # round half to even (or a seeded generator) makes the blob a pure function of the update
    u = small_update()
    assert encode_update(u, bits=4, stochastic=False) == encode_update(u, bits=4, stochastic=False)
    assert encode_update(u, bits=8, generator=torch.Generator().manual_seed(5)) == \
        encode_update(u, bits=8, generator=torch.Generator().manual_seed(5))
    assert encode_update(u, bits=32, round=2) == encode_update(u, bits=32, round=2)


def test_blob_is_a_plain_safetensors_file():
    u = small_update()
    for bits in (4, 32):
        tensors, meta = read_blob(encode_update(u, bits=bits, round=4))
        assert meta["format"] == "oqfl-update" and meta["round"] == "4"
        if bits == 32:
            for k, v in u.items():
                assert torch.equal(tensors[k + "::values"], v)
        else:
            assert all(t.dtype in (torch.uint8, torch.float32, torch.bfloat16)
                       for t in tensors.values())


# ------------------------------------------------------------------------------ zlib wrapping


@pytest.mark.parametrize("bits", [4, 8, 32])
def test_zlib_wrapping_is_lossless_and_a_plain_zlib_stream(bits):
    u = small_update()
    template = template_of(u)
    plain = encode_update(u, bits=bits, round=3, client_id="c", num_samples=7, stochastic=False)
    packed = encode_update(u, bits=bits, round=3, client_id="c", num_samples=7,
                           stochastic=False, compression="zlib")
    assert zlib.decompress(packed) == plain            # any zlib implementation can read it
    got, info = decode_update(packed, template, return_info=True, compression="zlib")
    want = decode_update(plain, template)
    assert info["round"] == 3 and info["num_samples"] == 7
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_zlib_shrinks_int4_codes_of_a_real_sized_update():
    # a ResNet-20-sized update of small Gaussian deltas: the int4 codes are far from uniform
    g = torch.Generator().manual_seed(0)
    u = {f"conv{i}.weight": torch.randn(64, 64, 3, 3, generator=g) * 0.01 for i in range(8)}
    plain = encode_update(u, bits=4, stochastic=False)
    packed = encode_update(u, bits=4, stochastic=False, compression="zlib")
    # entropy of a rounded Gaussian with absmax/7 steps is about 3.1 bits; DEFLATE gets close
    assert len(packed) < 0.85 * len(plain), (len(packed), len(plain))


def test_zlib_stream_errors_are_rejections(fuzz_case):
    u, template = fuzz_case
    plain = encode_update(u, bits=4)
    packed = encode_update(u, bits=4, compression="zlib")
    with pytest.raises(UpdateRejected, match="zlib"):
        decode_update(plain, template, compression="zlib")   # sender did not compress
    reject(packed, template)                                  # receiver did not expect zlib
    for n in (0, 1, len(packed) // 2, len(packed) - 1):
        with pytest.raises(UpdateRejected, match="zlib"):
            decode_update(packed[:n], template, compression="zlib")
    with pytest.raises(UpdateRejected, match="after the end"):
        decode_update(packed + b"\x00", template, compression="zlib")
    with pytest.raises(UpdateRejected, match="bytes"):
        decode_update("text", template, compression="zlib")
    # a valid stream of a corrupted blob: the blob's own checks still apply
    bad = bytearray(plain)
    bad[-1] ^= 1
    with pytest.raises(UpdateRejected, match="digest"):
        decode_update(zlib.compress(bytes(bad)), template, compression="zlib")


def test_zlib_bomb_is_refused_before_it_is_inflated(fuzz_case):
    from oqfl_ext.fl.codec import update_size_limit
    template = fuzz_case[1]
    limit = update_size_limit(template)
    bomb = zlib.compress(b"\x00" * (limit + 1), 9)          # about 1000x smaller than it inflates
    assert len(bomb) < limit // 500
    with pytest.raises(UpdateRejected, match="more than"):
        decode_update(bomb, template, compression="zlib")
    # the bound holds every valid blob: float32 values of the template, long client id
    big = encode_update({k: torch.randn_like(v) for k, v in template.items()}, bits=32,
                        client_id="x" * 256, num_samples=10 ** 18, round=10 ** 18,
                        compression="zlib")
    assert decode_update(big, template, compression="zlib").keys() == template.keys()
    # names whose JSON escapes are long (quotes, characters outside the BMP) fit too
    odd = {'"\\' * 3000: torch.zeros(2, 2), "\U0001F600" * 3000: torch.zeros(3)}
    for bits in (4, 8, 32):
        blob = encode_update(odd, bits=bits)
        assert len(blob) < update_size_limit(odd)
        decode_update(encode_update(odd, bits=bits, compression="zlib"), odd, compression="zlib")


def test_compression_argument_errors(fuzz_case):
    u, template = fuzz_case
    for bad in ("gzip", None, "", "ZLIB"):
        with pytest.raises(ValueError, match="compression"):
            encode_update(u, bits=4, compression=bad)
        with pytest.raises(ValueError, match="compression"):
            decode_update(encode_update(u, bits=4), template, compression=bad)
