"""oqfl_ext.data: the IDX reader on files written here byte by byte (every type code, gzip or
not, corrupt files), and the Fashion-MNIST loader on a tiny fake copy and on the Debian
package's files when installed."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch

from oqfl_ext.data import (FASHION_MNIST_MEAN, FASHION_MNIST_STD, fashion_mnist_dir,
                           load_fashion_mnist, read_idx)


def _idx_bytes(array: np.ndarray, code: int, big_endian_dtype: str) -> bytes:
    head = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return head + array.astype(big_endian_dtype).tobytes()


def _write(path, data: bytes, gz: bool):
    if gz:
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("code,dtype,values", [
    (0x08, "u1", [0, 1, 255, 7, 128, 3]), (0x09, "i1", [-128, 127, 0, -1, 5, 6]),
    (0x0B, ">i2", [-32768, 32767, 0, 1, -2, 300]), (0x0C, ">i4", [-2**31, 2**31 - 1, 0, 1, 2, 3]),
    (0x0D, ">f4", [0.5, -1.25, 3e38, 0.0, 1.0, -2.0]), (0x0E, ">f8", [1e-300, 2.5, -1, 0, 3, 4]),
])
def test_read_idx_every_type(tmp_path, gz, code, dtype, values):
    array = np.array(values, dtype=np.dtype(dtype).newbyteorder("=")).reshape(2, 3)
    path = _write(tmp_path / ("a.idx.gz" if gz else "a.idx"), _idx_bytes(array, code, dtype), gz)
    got = read_idx(path)
    assert got.shape == (2, 3) and got.dtype.isnative
    np.testing.assert_array_equal(got, array)


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_rejects_corrupt_files(tmp_path, gz):
    good = _idx_bytes(np.arange(12, dtype=np.uint8).reshape(3, 4), 0x08, "u1")
    cases = {
        "magic": b"\x01" + good[1:],
        "type code": good[:2] + b"\x07" + good[3:],
        "truncated": good[:-1],
        "after": good + b"\x00",
        "at least one dimension": bytes([0, 0, 8, 0]),
        "more than": bytes([0, 0, 0x0E, 3]) + struct.pack(">3I", 2**31, 2**31, 2),
        "header": b"\x00\x00",
    }
    for i, (what, data) in enumerate(cases.items()):
        path = _write(tmp_path / f"bad{i}", data, gz)
        with pytest.raises(ValueError, match=what) as info:
            read_idx(path)
        assert str(path) in str(info.value)


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("shape,code", [
    ((65536,) * 4, 0x08),                 # 2**64 elements: 0 in 64-bit arithmetic
    ((2 ** 32 - 1,) * 3, 0x0E),           # wraps to a smaller, still huge, count
    ((0, 2 ** 32 - 1, 2 ** 32 - 1, 2 ** 32 - 1), 0x08),  # 0 elements, sides numpy cannot hold
])
def test_read_idx_shape_products_do_not_wrap(tmp_path, gz, shape, code):
    # the header alone (no data, or 8 bytes of it): a ValueError naming the file and the exact
    # byte count of the shape, never numpy's reshape error
    itemsize = {0x08: 1, 0x0E: 8}[code]
    exact = itemsize
    for d in shape:
        exact *= d
    for tail in (b"", bytes(8)):
        data = bytes([0, 0, code, len(shape)]) + struct.pack(f">{len(shape)}I", *shape) + tail
        path = _write(tmp_path / f"wrap{len(tail)}", data, gz)
        with pytest.raises(ValueError, match="more than the") as info:
            read_idx(path)
        msg = str(info.value)
        assert str(path) in msg and str(shape) in msg
        if exact:
            assert f" {exact} bytes" in msg


def test_read_idx_bad_gzip(tmp_path):
    data = gzip.compress(_idx_bytes(np.zeros((4, 4), np.uint8), 0x08, "u1"))
    path = tmp_path / "broken.gz"
    path.write_bytes(data[:-6])  # cut into the gzip trailer
    with pytest.raises(ValueError, match="broken.gz"):
        read_idx(path)


def _fake_fashion_mnist(folder, n=5, gz=True, labels=None):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = np.arange(n, dtype=np.uint8) % 10 if labels is None else labels
    for split, stem in (("train", "train"), ("test", "t10k")):
        _write(folder / f"{stem}-images-idx3-ubyte{'.gz' if gz else ''}",
               _idx_bytes(images, 0x08, "u1"), gz)
        _write(folder / f"{stem}-labels-idx1-ubyte{'.gz' if gz else ''}",
               _idx_bytes(labels, 0x08, "u1"), gz)
    return images, labels


@pytest.mark.parametrize("gz", [True, False])
def test_load_fake_fashion_mnist(tmp_path, gz):
    images, labels = _fake_fashion_mnist(tmp_path, gz=gz)
    x, y = load_fashion_mnist("test", root=tmp_path)
    assert x.dtype == torch.uint8 and x.shape == (5, 28, 28)
    assert torch.equal(x, torch.from_numpy(images)) and y.dtype == torch.int64
    assert y.tolist() == labels.tolist()
    xn, yn = load_fashion_mnist("train", root=tmp_path, limit=3, normalize=True)
    assert xn.shape == (3, 1, 28, 28) and xn.dtype == torch.float32 and yn.shape == (3,)
    want = (torch.from_numpy(images[:3]).double() / 255 - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
    torch.testing.assert_close(xn[:, 0].double(), want, rtol=1e-6, atol=1e-6)
    assert fashion_mnist_dir(tmp_path) == tmp_path


def test_fashion_mnist_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("OQFL_FASHION_MNIST", raising=False)
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(root=tmp_path)
    assert fashion_mnist_dir(tmp_path) is None
    _fake_fashion_mnist(tmp_path, labels=np.array([0, 1, 12, 3, 4], np.uint8))
    with pytest.raises(ValueError, match="labels expected in 0..9"):
        load_fashion_mnist(root=tmp_path)
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist("validation", root=tmp_path)
    with pytest.raises(ValueError, match="limit"):
        load_fashion_mnist(root=tmp_path, limit=0)
    monkeypatch.setenv("OQFL_FASHION_MNIST", str(tmp_path))
    assert fashion_mnist_dir() == tmp_path


@pytest.mark.skipif(fashion_mnist_dir() is None,
                    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
def test_debian_fashion_mnist():
    x, y = load_fashion_mnist("test")
    assert x.shape == (10000, 28, 28) and y.shape == (10000,)
    assert torch.bincount(y).tolist() == [1000] * 10  # balanced classes
    xt, yt = load_fashion_mnist("train", limit=2000)
    assert xt.shape == (2000, 28, 28) and int(yt.max()) == 9
    mean = xt.double().mean() / 255
    assert abs(mean - FASHION_MNIST_MEAN) < 0.01
