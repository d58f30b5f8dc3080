"""The federated update wire format (oqfl_ext.fl.codec, docs/DESIGN.md section 4)."""

from __future__ import annotations

import hashlib
import math
import pickle
import random
import struct
import zlib

import pytest
import torch
from safetensors.torch import save as st_save

import oqfl_ext  # noqa: F401
from oqfl_ext.fl import UpdateRejected
from oqfl_ext.fl import decode_update as _decode_update
from oqfl_ext.fl import encode_update as _encode_update


QMAX = {4: 7, 8: 127}
COMPRESSED = ("zlib", "zstd")


def encode_update(update, **kwargs):
    """The raw version 2 blob unless told otherwise (the compressed streams have their own
    tests at the end)."""
    kwargs.setdefault("compression", "none")
    return _encode_update(update, **kwargs)


def decode_update(blob, template, **kwargs):
    kwargs.setdefault("compression", "none")
    return _decode_update(blob, template, **kwargs)


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
    from oqfl_ext.fl.codec import update_layout
    u = resnet18_like_update()
    template = template_of(u)
    n = sum(v.numel() for v in u.values())
    assert 11_600_000 < n < 11_800_000
    f32 = 4 * n
    vectors = sum(v.numel() for v in u.values() if v.dim() <= 1)
    steps = sum(v.shape[0] for v in u.values() if v.dim() >= 2)
    for bits in (4, 8):
        blob = encode_update(u, bits=bits, stochastic=False, client_id="client-0")
        parts = update_layout(template, bits, client_id="client-0")
        assert parts["total"] == len(blob)
        assert parts["vectors"] == 2 * vectors and parts["steps"] == 4 * steps
        assert parts["codes"] == sum((v.numel() * bits + 7) // 8 for v in u.values()
                                     if v.dim() >= 2)
        # everything that is not a code, a step or a value: under 1 % plus a few hundred bytes
        overhead = len(blob) - parts["codes"] - parts["steps"] - parts["vectors"]
        assert overhead == parts["header"] + parts["digest"] <= 0.01 * len(blob) + 300
        assert len(blob) / f32 <= bits / 32 + 0.002     # steps and vectors: 0.11 % of float32
        packed = encode_update(u, bits=bits, stochastic=False, compression="zstd")
        # the codes of Gaussian deltas are far from uniform: about 3.1 of 4 bits, 7.1 of 8
        assert len(packed) < {4: 0.8, 8: 0.92}[bits] * len(blob)
    blob32 = encode_update(u, bits=32)
    assert len(blob32) - f32 <= 300


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
    reject(st_save({"a": torch.zeros(2)}, metadata={"format": "pt"}), fuzz_case[1], "not an")


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
    # the blob names no parameter: any other name set or shape changes the template digest
    u, template = fuzz_case
    blob = encode_update(u, bits=4)
    t = dict(template)
    t["extra"] = torch.zeros(3)
    reject(blob, t, "template digest")
    t = dict(template)
    del t["odd"]
    reject(blob, t, "template digest")
    t = dict(template)
    t["renamed"] = t.pop("bn.bias")
    reject(blob, t, "template digest")
    for name, shape in (("conv.weight", (3, 6, 3, 3)), ("fc.weight", (7, 5)),
                        ("bn.bias", (6, 1)), ("temp", (1,)), ("odd", (8,)), ("fc.weight", (35,)),
                        ("odd", (7, 3))):
        t = dict(template)
        t[name] = torch.zeros(shape)
        reject(blob, t, "template digest")
    # names swapped between differently-shaped parameters at the sender
    swapped = dict(u)
    swapped["bn.bias"], swapped["odd"] = u["odd"], u["bn.bias"]
    for bits in (4, 8, 32):
        reject(encode_update(swapped, bits=bits), template, "template digest")
    decode_update(blob, template)


# ------------------------------------------------------------------------------ forged blobs
# The layout of docs/DESIGN.md section 4.2, written out here independently of the codec: a
# forged blob gets a valid final digest, so each check behind the digest is reached.

HEAD = struct.Struct("<4sBBBBQQ32sH")
FIELDS = ("magic", "version", "bits", "rounding", "reserved", "round", "num_samples",
          "template", "nid")


def parse_v2(blob):
    """(header fields, client id bytes, payload between the padding and the final digest)."""
    f = dict(zip(FIELDS, HEAD.unpack_from(blob)))
    start = HEAD.size + f["nid"]
    cid = bytes(blob[HEAD.size:start])
    start += -start % 8
    return f, cid, bytearray(blob[start:-32])


def redigest(body):
    body = bytes(body)
    return body + hashlib.sha256(body).digest()


def forge_v2(blob, fields=None, cid=None, payload_fn=None, valid_digest=True):
    f, c, payload = parse_v2(blob)
    if cid is not None:
        c, f["nid"] = cid, len(cid)
    f.update(fields or {})
    if payload_fn:
        payload_fn(payload)
    head = HEAD.pack(*[f[k] for k in FIELDS]) + c
    body = head + bytes(-len(head) % 8) + bytes(payload)
    return redigest(body) if valid_digest else body + bytes(blob[-32:])


def put(fmt, offset, value):
    return lambda p: struct.pack_into(fmt, p, offset, value)


# payload of small_update() at bits 4, entries in sorted-name order: steps conv.weight [0, 6),
# fc.weight [6, 11), odd [11, 14) (float32, bytes 0-55); vectors bn.bias [0, 6), temp [6]
# (bfloat16, bytes 56-69); codes conv.weight (81 bytes), fc.weight (18), odd (11)
STEPS, VECTORS, CODES = 0, 56, 70
BF16_NAN, BF16_INF = 0x7FC0, 0xFF80
FORGERIES_Q = {  # name: (forge_v2 keyword arguments, message expected with a valid digest)
    "nan_step": ({"payload_fn": put("<f", STEPS + 4 * 7, float("nan"))}, "step sizes"),
    "inf_step": ({"payload_fn": put("<f", STEPS, float("inf"))}, "step sizes"),
    "negative_step": ({"payload_fn": put("<f", STEPS + 4 * 12, -0.5)}, "step sizes"),
    "zero_step": ({"payload_fn": put("<f", STEPS + 4 * 13, 0.0)}, "step sizes"),
    "huge_step": ({"payload_fn": put("<f", STEPS + 4 * 6, 3e38)}, "overflows"),
    "nan_vector": ({"payload_fn": put("<H", VECTORS + 2 * 3, BF16_NAN)}, "'bn.bias'.*non-finite"),
    "inf_vector": ({"payload_fn": put("<H", VECTORS + 2 * 6, BF16_INF)}, "'temp'.*non-finite"),
    "short_payload": ({"payload_fn": lambda p: p.pop()}, "truncated or trailing"),
    "long_payload": ({"payload_fn": lambda p: p.append(0)}, "truncated or trailing"),
    "no_payload": ({"payload_fn": lambda p: p.clear()}, "truncated or trailing"),
    "bits_2": ({"fields": {"bits": 2}}, "bits 2"),
    "bits_16": ({"fields": {"bits": 16}}, "bits 16"),
    "bits_8": ({"fields": {"bits": 8}}, "template digest"),
    "bits_32": ({"fields": {"bits": 32}}, "rounding"),
    "rounding_none": ({"fields": {"rounding": 0}}, "rounding"),
    "rounding_3": ({"fields": {"rounding": 3}}, "rounding"),
    "reserved": ({"fields": {"reserved": 1}}, "reserved"),
    "template": ({"fields": {"template": bytes(32)}}, "template digest"),
    "magic": ({"fields": {"magic": b"OQFV"}}, "not an"),
    "version_1": ({"fields": {"version": 1}}, "version 1, expected 2"),
    "version_3": ({"fields": {"version": 3}}, "version 3, expected 2"),
    "client_id_control": ({"cid": b"a\x1b[2Jb"}, "client id"),
    "client_id_utf8": ({"cid": b"\xff\xfe"}, "UTF-8"),
    "client_id_257": ({"cid": b"c" * 257}, "client id"),
    "client_id_1025_bytes": ({"cid": b"c" * 1025}, "1025 bytes"),
    "client_id_length_lie": ({"fields": {"nid": 2}}, "client id|padding"),
}


@pytest.mark.parametrize("valid_digest", [True, False], ids=["valid-digest", "stale-digest"])
@pytest.mark.parametrize("case", sorted(FORGERIES_Q))
def test_forged_quantized_blobs_are_rejected(fuzz_case, case, valid_digest):
    u, template = fuzz_case
    blob = encode_update(u, bits=4, client_id="c")
    kwargs, msg = FORGERIES_Q[case]
    bad = forge_v2(blob, valid_digest=valid_digest, **kwargs)
    assert bad != blob
    # with the old digest every forgery fails the digest (or an earlier, cheaper check)
    reject(bad, template, msg if valid_digest else "digest|not an|version")


def test_nonzero_padding_is_rejected(fuzz_case):
    u, template = fuzz_case
    blob = bytearray(encode_update(u, bits=4, client_id="c"))  # 59 header bytes, 5 of padding
    blob[HEAD.size + 1] = 1
    reject(redigest(blob[:-32]), template, "padding")


FORGERIES_F = {
    "nan_value": ({"payload_fn": put("<f", 4 * 2, float("nan"))}, "'bn.bias'.*non-finite"),
    "inf_value": ({"payload_fn": put("<f", 4 * 6, float("-inf"))},
                  "'conv.weight'.*non-finite"),
    "rounding": ({"fields": {"rounding": 1}}, "rounding"),
    "bits_4": ({"fields": {"bits": 4, "rounding": 1}}, "template digest"),
    "short_payload": ({"payload_fn": lambda p: p.pop()}, "truncated or trailing"),
}


@pytest.mark.parametrize("valid_digest", [True, False], ids=["valid-digest", "stale-digest"])
@pytest.mark.parametrize("case", sorted(FORGERIES_F))
def test_forged_float32_blobs_are_rejected(fuzz_case, case, valid_digest):
    u, template = fuzz_case
    kwargs, msg = FORGERIES_F[case]
    bad = forge_v2(encode_update(u, bits=32), valid_digest=valid_digest, **kwargs)
    reject(bad, template, msg if valid_digest else "digest")


def test_rejections_quote_only_a_short_prefix_of_long_text(fuzz_case):
    # the drop reason goes into metrics.json and the log every round: a client must not be
    # able to make it large (the client id is the only text a version 2 blob carries)
    u, template = fuzz_case
    blob = encode_update(u, bits=4, client_id="c-7")
    for cid in (b"A" * 1024, b"evil\n" + b"A" * 1000, "\u00e9".encode() * 300):
        with pytest.raises(UpdateRejected, match="client id") as e:
            decode_update(forge_v2(blob, cid=cid), template)
        assert len(str(e.value)) <= 600, len(str(e.value))


def test_client_id_limit_on_decode_and_encode(fuzz_case):
    u, template = fuzz_case
    for longest in ("\u00e9" * 256, "\U0001F600" * 256):  # characters, not bytes, are limited
        _, info = decode_update(encode_update(u, bits=8, client_id=longest), template,
                                return_info=True)
        assert info["client_id"] == longest
    for bad in ("c" * 257, HUGE, "tab\there"):
        with pytest.raises(ValueError, match="client_id") as e:
            encode_update(u, bits=8, client_id=bad)
        assert len(str(e.value)) <= 300


HUGE = "A" * (2 << 20)   # 2 MiB of attacker-chosen text


def test_forge_without_changes_still_decodes(fuzz_case):
    # the forging helper itself produces valid blobs: rejections above come from the changes
    u, template = fuzz_case
    for bits in (4, 8, 32):
        blob = encode_update(u, bits=bits, client_id="c-1")
        assert forge_v2(blob) == blob
        out = decode_update(forge_v2(blob), template)
        assert out.keys() == template.keys()


def test_version_1_and_model_blobs_are_refused_by_name(fuzz_case):
    # a version 1 update (safetensors with metadata) is refused with a message naming it
    from oqfl_ext._io import encode_safetensors
    from oqfl_ext.fl import encode_model
    u, template = fuzz_case
    v1 = encode_safetensors({"fc.weight::values": torch.zeros(5, 7)},
                            {"bits": "32", "format": "oqfl-update", "version": "1"})
    reject(v1, template, "version 1")
    reject(encode_model(u), template, "format 'oqfl-model'")


def test_encode_argument_errors():
    u = small_update()
    for bad in (2, 16, 0, True, "8"):
        with pytest.raises(ValueError, match="bits"):
            encode_update(u, bits=bad)
    with pytest.raises(ValueError, match="round"):
        encode_update(u, bits=8, round=-1)
    with pytest.raises(ValueError, match=r"num_samples expected an integer in \[0, 18446744073709551615\]"):
        encode_update(u, bits=8, num_samples=1 << 64)
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


def test_blob_layout_is_the_documented_one():
    # parses a blob by docs/DESIGN.md section 4.2 alone and checks each buffer against values
    # computed here: step sizes (float64 absmax / qmax), bfloat16 vectors, the template digest,
    # and a payload of nothing but codes, steps and values
    u = small_update()
    blob = encode_update(u, bits=4, round=4, num_samples=9, client_id="c-1", stochastic=False)
    f, cid, payload = parse_v2(blob)
    assert (f["magic"], f["version"], f["bits"], f["rounding"], f["reserved"]) == \
        (b"OQFU", 2, 4, 1, 0)
    assert (f["round"], f["num_samples"], cid) == (4, 9, b"c-1")
    assert blob[-32:] == hashlib.sha256(blob[:-32]).digest()
    h = hashlib.sha256(b"oqfl-update-template-v2\0" + bytes([4]))
    names = sorted(u)
    for name in names:
        shape = list(u[name].shape)
        kind = 1 if len(shape) <= 1 else 2
        h.update(struct.pack("<Q", len(name)) + name.encode() + bytes([kind])
                 + struct.pack(f"<{1 + len(shape)}Q", len(shape), *shape))
    assert f["template"] == h.digest()
    coded = [n for n in names if u[n].dim() >= 2]
    vectors = [n for n in names if u[n].dim() <= 1]
    n_steps = sum(u[n].shape[0] for n in coded)
    n_vec = sum(u[n].numel() for n in vectors)
    n_codes = sum((u[n].numel() * 4 + 7) // 8 for n in coded)
    assert len(payload) == 4 * n_steps + 2 * n_vec + n_codes
    assert len(blob) - len(payload) == 58 + 3 + 3 + 32          # header, id, padding, digest
    steps = torch.frombuffer(payload[:4 * n_steps], dtype=torch.float32)
    want = torch.cat([(u[n].double().abs().reshape(u[n].shape[0], -1).amax(1) / 7)
                      .clamp_min(torch.finfo(torch.float32).tiny) for n in coded])
    torch.testing.assert_close(steps.double(), want, rtol=1e-6, atol=0)
    vec = torch.frombuffer(payload[4 * n_steps:4 * n_steps + 2 * n_vec], dtype=torch.bfloat16)
    assert torch.equal(vec, torch.cat([u[n].reshape(-1) for n in vectors]).to(torch.bfloat16))
    codes = bytes(payload[4 * n_steps + 2 * n_vec:])
    start = 0
    for n in coded:                                            # each entry's codes in turn
        nbytes = (u[n].numel() * 4 + 7) // 8
        want = oqfl_ext.ops.quantize_pack(u[n], (u[n].abs().reshape(u[n].shape[0], -1)
                                                 .amax(1) / 7).clamp_min(1e-38), bits=4, axis=0,
                                          stochastic=False)
        assert codes[start:start + nbytes] == bytes(want.numpy()), n
        start += nbytes


# ------------------------------------------------------------------------------ compression


def decompress(data, compression):
    """An independent reader of each compressed stream."""
    if compression == "zlib":
        return zlib.decompress(data)
    import zstandard
    return zstandard.ZstdDecompressor().decompress(data)


@pytest.mark.parametrize("compression", COMPRESSED)
@pytest.mark.parametrize("bits", [4, 8, 32])
def test_compression_is_lossless_and_a_plain_stream(bits, compression):
    u = small_update()
    template = template_of(u)
    plain = encode_update(u, bits=bits, round=3, client_id="c", num_samples=7, stochastic=False)
    packed = encode_update(u, bits=bits, round=3, client_id="c", num_samples=7,
                           stochastic=False, compression=compression)
    assert decompress(packed, compression) == plain    # any implementation can read it
    got, info = decode_update(packed, template, return_info=True, compression=compression)
    want = decode_update(plain, template)
    assert info["round"] == 3 and info["num_samples"] == 7
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_default_compression_is_zstd(fuzz_case):
    u, template = fuzz_case
    plain = encode_update(u, bits=4, stochastic=False)
    default = _encode_update(u, bits=4, stochastic=False)
    assert decompress(default, "zstd") == plain
    assert _decode_update(default, template).keys() == template.keys()
    reject(default, template, "not an")                 # a receiver expecting raw blobs


@pytest.mark.parametrize("compression", COMPRESSED)
def test_compression_shrinks_int4_codes_of_a_real_sized_update(compression):
    # a ResNet-20-sized update of small Gaussian deltas: the int4 codes are far from uniform
    g = torch.Generator().manual_seed(0)
    u = {f"conv{i}.weight": torch.randn(64, 64, 3, 3, generator=g) * 0.01 for i in range(8)}
    plain = encode_update(u, bits=4, stochastic=False)
    packed = encode_update(u, bits=4, stochastic=False, compression=compression)
    # entropy of a rounded Gaussian with absmax/7 steps is about 3.1 bits of 4
    assert len(packed) < 0.85 * len(plain), (len(packed), len(plain))


@pytest.mark.parametrize("compression", COMPRESSED)
def test_stream_errors_are_rejections(fuzz_case, compression):
    u, template = fuzz_case
    plain = encode_update(u, bits=4)
    packed = encode_update(u, bits=4, compression=compression)
    with pytest.raises(UpdateRejected, match=compression):
        decode_update(plain, template, compression=compression)   # sender did not compress
    reject(packed, template)                                  # receiver expected a raw blob
    other = "zstd" if compression == "zlib" else "zlib"
    with pytest.raises(UpdateRejected, match=other):
        decode_update(packed, template, compression=other)
    for n in (0, 1, len(packed) // 2, len(packed) - 1):
        with pytest.raises(UpdateRejected, match=compression):
            decode_update(packed[:n], template, compression=compression)
    with pytest.raises(UpdateRejected, match="after the end|unused data"):
        decode_update(packed + b"\x00", template, compression=compression)
    with pytest.raises(UpdateRejected, match="bytes"):
        decode_update("text", template, compression=compression)
    # a valid stream of a corrupted blob: the blob's own checks still apply
    bad = bytearray(plain)
    bad[-1] ^= 1
    from oqfl_ext.fl.codec import wrap_update
    with pytest.raises(UpdateRejected, match="digest"):
        decode_update(wrap_update(bytes(bad), compression), template, compression=compression)


def test_every_byte_change_of_a_zstd_stream_is_rejected(fuzz_case):
    u, template = fuzz_case
    packed = encode_update(u, bits=4, client_id="c", compression="zstd")
    for pos in range(len(packed)):
        for mask in (0x01, 0x80, 0xFF):
            bad = bytearray(packed)
            bad[pos] ^= mask
            with pytest.raises(UpdateRejected):
                decode_update(bytes(bad), template, compression="zstd")


def _bomb(compression, n):
    if compression == "zlib":
        return zlib.compress(b"\x00" * n, 9)
    import zstandard
    return zstandard.ZstdCompressor(level=19).compress(b"\x00" * n)


@pytest.mark.parametrize("compression", COMPRESSED)
def test_bomb_is_refused_before_it_is_decompressed(fuzz_case, compression):
    from oqfl_ext.fl.codec import update_size_limit
    template = fuzz_case[1]
    limit = update_size_limit(template)
    bomb = _bomb(compression, limit + 1)                # far smaller than it decompresses
    assert len(bomb) < limit // 20
    with pytest.raises(UpdateRejected, match="more than"):
        decode_update(bomb, template, compression=compression)
    # the bound holds every valid blob: float32 values of the template, long client id
    big = encode_update({k: torch.randn_like(v) for k, v in template.items()}, bits=32,
                        client_id="\U0001F600" * 256, num_samples=(1 << 64) - 1,
                        round=10 ** 18, compression=compression)
    assert decode_update(big, template, compression=compression).keys() == template.keys()
    # names whose encodings are long (quotes, characters outside the BMP) fit too
    odd = {'"\\' * 3000: torch.zeros(2, 2), "\U0001F600" * 3000: torch.zeros(3)}
    for bits in (4, 8, 32):
        blob = encode_update(odd, bits=bits, client_id="\U0001F600" * 256)
        assert len(blob) <= update_size_limit(odd)
        decode_update(encode_update(odd, bits=bits, compression=compression), odd,
                      compression=compression)


def test_zstd_frame_without_content_size_is_refused(fuzz_case):
    import zstandard
    u, template = fuzz_case
    plain = encode_update(u, bits=4)
    frame = zstandard.ZstdCompressor(write_content_size=False).compress(plain)
    with pytest.raises(UpdateRejected, match="content size"):
        decode_update(frame, template, compression="zstd")


def test_compression_argument_errors(fuzz_case):
    u, template = fuzz_case
    for bad in ("gzip", None, "", "ZLIB"):
        with pytest.raises(ValueError, match="compression"):
            encode_update(u, bits=4, compression=bad)
        with pytest.raises(ValueError, match="compression"):
            decode_update(encode_update(u, bits=4), template, compression=bad)


def test_large_zstd_blob_round_trip_and_stream_errors():
    # above 1 MiB the receiver hashes beside the decompression (codec._unzstd_hashed): the same
    # result and the same rejections as the small path
    g = torch.Generator().manual_seed(0)
    u = {"a.weight": torch.randn(512, 4500, generator=g) * 0.01, "b": torch.randn(300, generator=g)}
    template = template_of(u)
    plain = encode_update(u, bits=4, stochastic=False)
    assert len(plain) > 1 << 20
    packed = encode_update(u, bits=4, stochastic=False, compression="zstd")
    assert decompress(packed, "zstd") == plain
    got = decode_update(packed, template, compression="zstd")
    want = decode_update(plain, template)
    assert all(torch.equal(got[k], want[k]) for k in want)
    for n in (len(packed) // 3, len(packed) - 1):
        with pytest.raises(UpdateRejected, match="zstd"):
            decode_update(packed[:n], template, compression="zstd")
    with pytest.raises(UpdateRejected, match="after the end"):
        decode_update(packed + b"\x00", template, compression="zstd")
    with pytest.raises(UpdateRejected, match="after the end"):
        decode_update(packed + packed, template, compression="zstd")
    bad = bytearray(plain)
    bad[len(bad) // 2] ^= 1                               # a valid stream of a corrupted blob
    from oqfl_ext.fl.codec import wrap_update
    with pytest.raises(UpdateRejected, match="digest"):
        decode_update(wrap_update(bytes(bad), "zstd"), template, compression="zstd")
    for pos in (len(packed) // 2, len(packed) - 5):        # the stream itself corrupted
        mangled = bytearray(packed)
        mangled[pos] ^= 0xFF
        with pytest.raises(UpdateRejected):
            decode_update(bytes(mangled), template, compression="zstd")


@pytest.mark.parametrize("shape", [(6, 3, 3, 3), (512, 4500)])
def test_wrap_update_with_layout_is_the_encoders_frame(shape):
    # with the blob's layout, wrap_update starts a zstd block at each part: still one plain
    # frame of the same blob, the same bytes encode_update makes (small and hashed-aside sizes)
    from oqfl_ext.fl.codec import update_layout, wrap_update
    g = torch.Generator().manual_seed(0)
    u = {"w": torch.randn(shape, generator=g), "b": torch.randn(shape[0], generator=g)}
    plain = encode_update(u, bits=4, client_id="c-1", stochastic=False)
    layout = update_layout(template_of(u), 4, client_id="c-1")
    packed = wrap_update(plain, "zstd", layout)
    assert decompress(packed, "zstd") == plain
    assert packed == encode_update(u, bits=4, client_id="c-1", stochastic=False,
                                   compression="zstd")
    for mode in ("zlib", "none"):                           # the layout only guides zstd
        assert wrap_update(plain, mode, layout) == wrap_update(plain, mode)
    with pytest.raises(ValueError, match="layout"):
        wrap_update(plain + b"\0" * 8, "zstd", layout)


# ------------------------------------------------------------------ per-channel step sizes

@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (64, 3, 3, 3), (7, 4099), (5000, 2), (4, 0)])
def test_row_absmax_matches_float64(shape):
    # the one-pass CPU op behind the steps against |x| in float64, with a -0.0, subnormals and
    # the largest finite value placed in some rows
    gen = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=gen) * torch.logspace(-40, 36, shape[0]).reshape(
        (-1,) + (1,) * (len(shape) - 1)).float()
    flat = x.reshape(shape[0], -1)
    if flat.shape[1]:
        flat[0, 0] = -0.0
        flat[-1, -1] = -torch.finfo(torch.float32).max
        flat[shape[0] // 2, 0] = 1e-45
    want = flat.double().abs().amax(dim=1).float() if flat.shape[1] else torch.zeros(shape[0])
    got = torch.ops.oqfl._row_absmax(x)
    assert got.dtype == torch.float32 and got.shape == (shape[0],)
    assert torch.equal(got, want)
    # a strided view gives the same as its contiguous copy
    if x.numel() > 1:
        wide = torch.stack([x, torch.full_like(x, float("nan"))], dim=-1)[..., 0]
        assert not wide.is_contiguous()
        assert torch.equal(torch.ops.oqfl._row_absmax(wide), want)


def test_row_absmax_non_finite_rows_and_errors():
    x = torch.ones(4, 6)
    x[1, 2], x[2, 5], x[3, 0] = float("nan"), float("-inf"), float("inf")
    got = torch.ops.oqfl._row_absmax(x)
    assert got[0] == 1.0 and torch.isnan(got[1]) and torch.isinf(got[2]) and torch.isinf(got[3])
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.oqfl._row_absmax(torch.ones(3, 3, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="dimension"):
        torch.ops.oqfl._row_absmax(torch.tensor(1.0))
    torch.library.opcheck(torch.ops.oqfl._row_absmax.default, (torch.randn(5, 3, 2),))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_refused_at_the_sender(bits, bad):
    u = small_update()
    name = next(k for k, v in u.items() if v.dim() >= 2)
    u[name].view(-1)[3] = bad
    with pytest.raises(ValueError, match=f"{name}.*non-finite"):
        encode_update(u, bits=bits)
