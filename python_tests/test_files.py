"""The one safetensors writer (oqfl_ext._io.encode_safetensors) and the files written with it:
the bytes depend only on the content (dict order, process and hash seed do not matter), and
safetensors' own reader reads them back exactly, with the header safetensors itself writes."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load as st_load, save as st_save

import oqfl_ext
from oqfl_ext import _io, models
from oqfl_ext.fl.codec import encode_model
from oqfl_ext.nn import save_packed

ROOT = Path(__file__).resolve().parents[1]


def _content():
    """Tensors of every dtype the writer supports (0-D, empty, non-contiguous, odd sizes) and
    metadata with many keys, including non-ASCII text."""
    g = torch.Generator().manual_seed(7)
    tensors = {
        "w.f32": torch.randn(3, 5, generator=g),
        "a.f64": torch.randn(3, generator=g, dtype=torch.float64),
        "b.i64": torch.arange(5, dtype=torch.int64) - 2,
        "c.i32": torch.tensor([-7, 1 << 30], dtype=torch.int32),
        "d.bf16": torch.randn(7, generator=g).to(torch.bfloat16),
        "e.f16": torch.randn(2, 3, generator=g).to(torch.float16),
        "f.i16": torch.tensor([-300, 5], dtype=torch.int16),
        "g.i8": torch.tensor([-128, 127, 0], dtype=torch.int8),
        "h.u8": torch.arange(11, dtype=torch.uint8),
        "i.bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
        "transposed": torch.randn(4, 6, generator=g).t(),
    }
    metadata = {f"key{i}": f"value {i}" for i in range(12)}
    metadata.update({"format": "test", "text": "Grüße, 世界", "json": '{"a":[1,2]}'})
    return tensors, metadata


def _reversed(d):
    return dict(reversed(list(d.items())))


def _header(blob: bytes):
    (n,) = struct.unpack("<Q", blob[:8])
    return n, blob[8:8 + n]


# ------------------------------------------------------------------------------ the writer


def test_bytes_do_not_depend_on_insertion_order():
    tensors, metadata = _content()
    a = _io.encode_safetensors(tensors, metadata)
    assert _io.encode_safetensors(_reversed(tensors), _reversed(metadata)) == a
    shuffled = dict(sorted(metadata.items(), key=lambda kv: hashlib.sha256(
        kv[0].encode()).digest()))
    assert _io.encode_safetensors(tensors, shuffled) == a


def test_round_trip_through_safetensors_reader(tmp_path):
    tensors, metadata = _content()
    blob = _io.encode_safetensors(tensors, metadata)
    back = st_load(blob)
    assert back.keys() == tensors.keys()
    for k, t in tensors.items():
        assert back[k].dtype == t.dtype and back[k].shape == t.shape, k
        assert torch.equal(back[k], t), k
    path = tmp_path / "f.safetensors"
    path.write_bytes(blob)
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == metadata


def test_header_is_the_one_safetensors_writes_in_canonical_form():
    tensors, metadata = _content()
    blob = _io.encode_safetensors(tensors, metadata)
    ref = st_save({k: t.contiguous() for k, t in tensors.items()}, metadata=metadata)
    n, text = _header(blob)
    rn, rtext = _header(ref)
    # the same content (offsets included) once parsed, and the same data section
    assert json.loads(text) == json.loads(rtext)
    assert blob[8 + n:] == ref[8 + rn:]
    assert len(blob) == len(ref)
    # canonical: compact, every object's keys sorted, padded with (at most 7) spaces
    body = text.rstrip(b" ")
    assert n % 8 == 0 and n - len(body) < 8
    parsed = json.loads(body)
    assert body.decode() == json.dumps(parsed, sort_keys=True, separators=(",", ":"),
                                       ensure_ascii=False)
    # every tensor starts at a multiple of its item size (8 + n is a multiple of 8)
    for k, t in tensors.items():
        assert parsed[k]["data_offsets"][0] % t.element_size() == 0, k


def test_bytes_equal_across_processes_and_hash_seeds():
    script = (
        "import hashlib, sys; sys.path.insert(0, sys.argv[1]); "
        "import test_files as t; from oqfl_ext import _io; "
        "tensors, meta = t._content(); "
        "print(hashlib.sha256(_io.encode_safetensors(tensors, meta)).hexdigest(), "
        "hashlib.sha256(_io.encode_state(tensors)).hexdigest())")
    tensors, metadata = _content()
    want = (hashlib.sha256(_io.encode_safetensors(tensors, metadata)).hexdigest() + " "
            + hashlib.sha256(_io.encode_state(tensors)).hexdigest())
    for seed in ("0", "1", "12345"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        out = subprocess.run([sys.executable, "-c", script, str(Path(__file__).parent)],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.strip() == want, seed


def test_writer_argument_errors():
    with pytest.raises(TypeError, match="tensors\\['x'\\] expected a Tensor"):
        _io.encode_safetensors({"x": [1, 2]})
    with pytest.raises(TypeError, match="tensors\\['c'\\]: dtype torch.complex64"):
        _io.encode_safetensors({"c": torch.zeros(2, dtype=torch.complex64)})
    with pytest.raises(ValueError, match="__metadata__"):
        _io.encode_safetensors({"__metadata__": torch.zeros(1)})
    with pytest.raises(TypeError, match="metadata expected a dict of str -> str"):
        _io.encode_safetensors({"x": torch.zeros(1)}, {"round": 3})
    with pytest.raises(ValueError, match="valid Unicode"):
        _io.encode_safetensors({"x": torch.zeros(1)}, {"k": "\ud800"})


# ------------------------------------------------------------------------------ its users


def test_saved_state_is_reproducible():
    # safetensors' writer put the two metadata keys in a per-call random order
    state = models.create("small_cnn", in_channels=1, image_size=8, width=2).state_dict()
    blobs = {_io.encode_state(state) for _ in range(20)}
    assert len(blobs) == 1
    back = st_load(blobs.pop())
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], v) for k, v in state.items())


def test_packed_model_file_is_reproducible(tmp_path):
    torch.manual_seed(0)
    model = models.create("small_cnn", in_channels=1, image_size=8, width=2).eval()
    files = set()
    for i in range(6):
        save_packed(model, tmp_path / f"m{i}.safetensors")
        files.add((tmp_path / f"m{i}.safetensors").read_bytes())
    assert len(files) == 1


def test_codec_blobs_come_from_the_writer_with_unchanged_lengths():
    # model broadcast blobs (update blobs have their own layout since version 2, 4.2)
    torch.manual_seed(3)
    state = {"w": torch.randn(4, 3), "b": torch.randn(4), "n": torch.tensor(3),
             "zp": torch.zeros(1, dtype=torch.int32), "flag": torch.tensor(True)}
    for blob in (encode_model(state), encode_model(state, bits=8)):
        tensors = st_load(blob)
        n, text = _header(blob)
        metadata = json.loads(text)["__metadata__"]
        assert _io.encode_safetensors(tensors, metadata) == blob
        # safetensors' own writer gives the same length and the same parsed header
        ref = st_save(tensors, metadata=metadata)
        assert len(ref) == len(blob)
        assert json.loads(_header(ref)[1]) == json.loads(text)
