"""oqfl_ext.data: the CIFAR-10 batch reader (no unpickling) on files written here -- by Python 3's
pickle in protocols 2-5 and byte by byte in the Python 2 layout of the original files -- its
rejection of anything else (a stream naming os.system is refused without running anything),
the CIFAR-10 loader, and scikit-learn's 8x8 digits."""

from __future__ import annotations

import os
import pickle
import struct

import numpy as np
import pytest
import torch

from oqfl_ext.data import (CIFAR10_MEAN, CIFAR10_STD, DIGITS_MEAN, DIGITS_STD, CifarFormatError,
                           cifar10_dir, load_cifar10, load_digits)
from oqfl_ext.data.cifar10 import read_batch

PROTOCOLS = [2, 3, 4, 5]


def make_batch(n: int, seed: int, label: bytes = b"training batch 1 of 5"):
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, 10, size=n)]
    return {b"batch_label": label, b"labels": labels, b"data": data,
            b"filenames": [f"img_{seed}_{i:05d}.png".encode() for i in range(n)]}


def assert_same_batch(got: dict, want: dict):
    assert set(got) == set(want)
    for k, v in want.items():
        if isinstance(v, np.ndarray):
            assert isinstance(got[k], np.ndarray) and got[k].dtype == np.uint8
            assert got[k].shape == v.shape and got[k].flags.c_contiguous
            np.testing.assert_array_equal(got[k], v)
        else:
            assert got[k] == v and type(got[k]) is type(v)


# ------------------------------------------------------------------ Python 2 layout, by hand

def _py2_str(b: bytes) -> bytes:  # a Python 2 str: SHORT_BINSTRING / BINSTRING
    return (b"U" + bytes([len(b)]) if len(b) < 256 else b"T" + struct.pack("<i", len(b))) + b


def _py2_int(v: int) -> bytes:
    if 0 <= v < 256:
        return b"K" + bytes([v])
    if 0 <= v < 65536:
        return b"M" + struct.pack("<H", v)
    return b"J" + struct.pack("<i", v)


def py2_cpickle(batch: dict) -> bytes:
    """The batch as Python 2's cPickle.dump(batch, f, 2) writes it (the layout of the files in
    cifar-10-python.tar.gz), numpy 1.x's array reduction with the raw data as a str."""
    memo = iter(range(1, 100000))

    def put():
        i = next(memo)
        return b"q" + bytes([i]) if i < 256 else b"r" + struct.pack("<I", i)

    out = [b"\x80\x02}" + put() + b"("]
    for key, value in batch.items():
        out.append(_py2_str(key) + put())
        if isinstance(value, np.ndarray):
            out.append(b"cnumpy.core.multiarray\n_reconstruct\n" + put()
                       + b"cnumpy\nndarray\n" + put() + b"K\x00\x85" + _py2_str(b"b")
                       + b"\x87R" + put() + b"(K\x01" + b"".join(map(_py2_int, value.shape))
                       + (b"\x86" if value.ndim == 2 else b"")
                       + b"cnumpy\ndtype\n" + put() + _py2_str(b"u1") + b"K\x00K\x01\x87R"
                       + put() + b"(K\x03" + _py2_str(b"|") + b"NNN"
                       + b"J\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89"
                       + _py2_str(value.tobytes()) + b"tb")
        elif isinstance(value, list):
            out.append(b"]" + put() + b"(")
            out += [_py2_int(v) if isinstance(v, int) else _py2_str(v) + put() for v in value]
            out.append(b"e")
        else:
            out.append(_py2_str(value) + put())
    out.append(b"u.")
    return b"".join(out)


def test_py2_layout_helper_is_a_valid_pickle():
    # the hand-written stream is what pickle itself reads (test data check, not the reader)
    batch = make_batch(3, 0)
    loaded = pickle.loads(py2_cpickle(batch), encoding="bytes")
    assert_same_batch(loaded, batch)


# ------------------------------------------------------------------ the reader

@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_read_batch_every_protocol(tmp_path, protocol):
    batch = make_batch(7, protocol)
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps(batch, protocol=protocol))
    assert_same_batch(read_batch(path), batch)


def test_read_batch_python2_layout(tmp_path):
    batch = make_batch(300, 9)  # labels above 255 bytes of filenames: BINSTRING and BININT2
    batch[b"extra"] = [70000, 1 << 20]
    path = tmp_path / "data_batch_1"
    path.write_bytes(py2_cpickle(batch))
    assert_same_batch(read_batch(path), batch)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_read_batch_other_array_forms(tmp_path, protocol):
    arrays = {b"fortran": np.asfortranarray(np.arange(24, dtype=np.uint8).reshape(4, 6)),
              b"empty": np.zeros((0, 3072), dtype=np.uint8), b"scalar_shape": np.uint8(7)
              .reshape(()), b"3d": np.arange(60, dtype=np.uint8).reshape(3, 4, 5)}
    value = {k: np.array(v) if k != b"fortran" else v for k, v in arrays.items()}
    value[b"tuple"] = (1, b"x", "text", None, True, -5, 2 ** 40)
    path = tmp_path / "b"
    path.write_bytes(pickle.dumps(value, protocol=protocol))
    got = read_batch(path)
    for k, v in arrays.items():
        np.testing.assert_array_equal(got[k], v)
        assert got[k].shape == v.shape and got[k].flags.c_contiguous
    assert got[b"tuple"] == value[b"tuple"]


def test_read_batch_shared_references(tmp_path):
    shared = [1, 2, 3]
    arr = np.arange(5, dtype=np.uint8)
    value = {b"a": shared, b"b": shared, b"c": arr, b"d": arr}
    for protocol in PROTOCOLS:
        path = tmp_path / f"p{protocol}"
        path.write_bytes(pickle.dumps(value, protocol=protocol))
        got = read_batch(path)
        assert got[b"a"] == got[b"b"] == shared
        np.testing.assert_array_equal(got[b"d"], arr)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("protocol", [0, 1] + PROTOCOLS)
def test_malicious_stream_is_rejected_without_running_it(tmp_path, protocol):
    marker = tmp_path / "pwned"
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": _Evil(marker)}, protocol=protocol))
    with pytest.raises(CifarFormatError) as info:
        read_batch(path)
    msg = str(info.value)
    assert str(path) in msg and "opcode" in msg
    assert not marker.exists()
    if protocol >= 2:
        assert "system" in msg and ("GLOBAL" in msg or "STACK_GLOBAL" in msg)
    else:
        assert "PROTO" in msg or "not accepted" in msg


def test_global_os_system_by_hand(tmp_path):
    path = tmp_path / "test_batch"
    marker = tmp_path / "pwned"
    path.write_bytes(b"\x80\x02cos\nsystem\nX" + struct.pack("<I", len(f"touch {marker}"))
                     + f"touch {marker}".encode() + b"\x85R.")
    with pytest.raises(CifarFormatError, match=r"os\.system.*opcode GLOBAL at byte 2"):
        read_batch(path)
    assert not marker.exists()


def _reject(tmp_path, data: bytes, match: str):
    path = tmp_path / "bad"
    path.write_bytes(data)
    with pytest.raises(CifarFormatError, match=match) as info:
        read_batch(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("value,match", [
    ({b"data": np.zeros(3, dtype=np.float64)}, "dtype"),
    ({b"data": np.zeros(3, dtype=np.int64)}, "dtype"),
    ({b"x": 1.5}, "BINFLOAT"),
    ({b"x": {1, 2}}, "not accepted"),
    ({b"x": bytearray(b"ab")}, "bytearray"),
    ({b"x": np.float32(1.0)}, "scalar|not accepted"),
    ([1, 2], "holds a list"),
])
def test_values_outside_the_subset_are_rejected(tmp_path, value, match):
    _reject(tmp_path, pickle.dumps(value, protocol=4), match)


def test_corrupt_streams_are_rejected(tmp_path):
    good = pickle.dumps(make_batch(2, 1), protocol=2)
    _reject(tmp_path, good[:-1], "STOP|unreadable")
    _reject(tmp_path, good[:len(good) // 2], "unreadable|STOP")
    _reject(tmp_path, good + b"\x00", "after STOP")
    _reject(tmp_path, b"", "STOP|unreadable")
    _reject(tmp_path, b"\x80\x02e.", "MARK|underflow")
    _reject(tmp_path, b"\x80\x02h\x05.", "memo")
    _reject(tmp_path, b"\x80\x02K\x01K\x02.", "exactly one value")
    # the array's data does not match its shape
    arr = pickle.dumps({b"data": np.zeros((2, 3), np.uint8)}, protocol=3)
    bad = arr.replace(b"C\x06" + bytes(6), b"C\x05" + bytes(5))
    assert bad != arr
    _reject(tmp_path, bad, "needs 6 bytes")
    # object-building opcodes
    _reject(tmp_path, b"\x80\x02(cos\nsystem\no.", "os.system")
    _reject(tmp_path, b"\x80\x02)\x81.", "NEWOBJ|underflow|not accepted")


def _binput(i: int) -> bytes:
    return b"q" + bytes([i])


def _binget(i: int) -> bytes:
    return b"h" + bytes([i])


def _shared_lists(levels: int, fan: int) -> bytes:
    """Stream ops building lists L0 = [0], L(i) = [L(i-1)] * fan (memo GETs of one list):
    a few bytes per level, fan ** levels elements when unfolded. Leaves L(levels) on the
    stack, memoized under ``levels``."""
    out = [b"]" + _binput(0) + b"K\x00a"]
    for i in range(1, levels + 1):  # POP the level below, then build this one
        out.append(b"0]" + _binput(i) + b"(" + _binget(i - 1) * fan + b"e")
    return b"".join(out)


@pytest.mark.parametrize("name,stream", [
    # one list appended to itself 16 times: a list that contains itself, at every depth
    ("self", b"\x80\x02}q\xc8U\x06labels]q\x00(" + _binget(0) * 16 + b"es."),
    # no cycle: 17 levels of a list holding 8 references to the level below (8**17 elements)
    ("shared", b"\x80\x02}q\xc8U\x06labels" + _shared_lists(17, 8) + b"s."),
    # the same structure inside a tuple given to numpy.dtype: refused, and the message about it
    # is short (a full repr would be 8**17 elements long)
    ("message", b"\x80\x02cnumpy\ndtype\n" + _shared_lists(17, 8) + b"K\x00K\x01\x87R."),
])
def test_memo_reuse_cannot_blow_up(tmp_path, name, stream):
    # a few hundred bytes that describe an exponentially large value are refused, in linear
    # time (the old reader expanded them: MemoryError or no end)
    assert len(stream) < 500
    path = tmp_path / name
    path.write_bytes(stream)
    with pytest.raises(CifarFormatError) as info:
        read_batch(path)
    msg = str(info.value)
    assert str(path) in msg and len(msg) < 1000


def test_shared_lists_are_read_when_they_unfold_to_little(tmp_path):
    # sharing itself is accepted (pickle writes a list referenced twice with a memo GET)
    stream = b"\x80\x02}q\xc8(U\x01a" + _shared_lists(3, 2) + b"U\x01b" + _binget(1) + b"u."
    path = tmp_path / "b"
    path.write_bytes(stream)
    got = read_batch(path)
    want = pickle.loads(stream, encoding="bytes")  # the reference reader, on our own bytes
    assert got == want and got[b"a"] == [[[[0]] * 2] * 2] * 2 and got[b"b"] == [[0], [0]]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_array_shape_products_do_not_wrap(tmp_path, protocol):
    # a shape whose element count is 2**64 (0 in int64) with no data; another of 0 elements
    # whose sides numpy cannot hold; both named in a CifarFormatError, never a numpy error
    for shape, match in [((2 ** 32, 2 ** 32), f"needs {2 ** 64} bytes"),
                         ((0, 2 ** 40, 2 ** 40), "larger")]:
        arr = np.zeros((0, 7), np.uint8)
        data = pickle.dumps({b"data": arr}, protocol=protocol)
        op = b"K\x00K\x07\x86"  # the shape (0, 7) as the pickle writes it
        assert data.count(op) == 1
        big = b"(" + b"".join(b"\x8a" + bytes([len(v)]) + v for v in
                              (d.to_bytes(8, "little").rstrip(b"\x00") or b"" for d in shape))
        bad = data.replace(op, big + b"t")
        path = tmp_path / f"wrap{len(shape)}"
        path.write_bytes(bad)
        with pytest.raises(CifarFormatError, match=match) as info:
            read_batch(path)
        assert str(path) in str(info.value)


# ------------------------------------------------------------------ the loader

def write_cifar(folder, n_train=(3, 4, 2, 5, 3), n_test=4, protocol=2):
    folder.mkdir(parents=True, exist_ok=True)
    batches = {}
    for i, n in enumerate(n_train, start=1):
        batches[f"data_batch_{i}"] = make_batch(n, i)
    batches["test_batch"] = make_batch(n_test, 99, b"testing batch 1 of 1")
    for name, b in batches.items():
        data = py2_cpickle(b) if protocol == "py2" else pickle.dumps(b, protocol=protocol)
        (folder / name).write_bytes(data)
    return batches


@pytest.mark.parametrize("protocol", ["py2", 2, 5])
def test_load_cifar10(tmp_path, protocol):
    batches = write_cifar(tmp_path / "cifar-10-batches-py", protocol=protocol)
    want_x = np.concatenate([batches[f"data_batch_{i}"][b"data"] for i in range(1, 6)])
    want_y = sum((batches[f"data_batch_{i}"][b"labels"] for i in range(1, 6)), [])
    for folder in (tmp_path, tmp_path / "cifar-10-batches-py"):  # parent or the folder itself
        x, y = load_cifar10(folder)
        assert x.dtype == torch.uint8 and x.shape == (17, 3, 32, 32)
        assert y.dtype == torch.int64 and y.tolist() == want_y
        np.testing.assert_array_equal(x.reshape(17, -1).numpy(), want_x)
    # the channel planes: R then G then B, each 32x32 row-major
    first = batches["data_batch_1"][b"data"][0]
    assert x[0, 1, 2, 3].item() == first[1024 + 2 * 32 + 3]
    xt, yt = load_cifar10(tmp_path, "test")
    assert xt.shape == (4, 3, 32, 32) and yt.tolist() == batches["test_batch"][b"labels"]
    xl, yl = load_cifar10(tmp_path, limit=5)  # crosses a batch boundary
    assert torch.equal(xl, x[:5]) and torch.equal(yl, y[:5])
    xn, yn = load_cifar10(tmp_path, normalize=True)
    assert xn.dtype == torch.float32 and xn.shape == x.shape and torch.equal(yn, y)
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(xn * std + mean, x.float() / 255)


def test_load_cifar10_environment_variable(tmp_path, monkeypatch):
    write_cifar(tmp_path / "cifar-10-batches-py", protocol=3)
    monkeypatch.setenv("OQFL_DATA", str(tmp_path))
    assert cifar10_dir() == tmp_path / "cifar-10-batches-py"
    assert load_cifar10(split="test")[0].shape == (4, 3, 32, 32)


def test_load_cifar10_missing_files_say_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.delenv("OQFL_DATA", raising=False)
    for args in ((tmp_path / "nowhere",), (tmp_path,), ()):
        with pytest.raises(FileNotFoundError) as info:
            load_cifar10(*args)
        msg = str(info.value)
        assert "cifar-10-python.tar.gz" in msg and "OQFL_DATA" in msg and "--data-dir" in msg
    write_cifar(tmp_path, protocol=3)
    (tmp_path / "data_batch_4").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_4"):
        load_cifar10(tmp_path)
    assert load_cifar10(tmp_path, "test")[0].shape[0] == 4  # the test split is all there


def test_load_cifar10_checks_contents(tmp_path):
    batches = write_cifar(tmp_path, protocol=3)
    b = dict(batches["test_batch"])
    b[b"labels"] = b[b"labels"][:-1]
    (tmp_path / "test_batch").write_bytes(pickle.dumps(b, protocol=3))
    with pytest.raises(CifarFormatError, match="labels"):
        load_cifar10(tmp_path, "test")
    b = dict(batches["test_batch"])
    b[b"data"] = b[b"data"][:, :100].copy()
    (tmp_path / "test_batch").write_bytes(pickle.dumps(b, protocol=3))
    with pytest.raises(CifarFormatError, match="3072"):
        load_cifar10(tmp_path, "test")
    (tmp_path / "test_batch").write_bytes(pickle.dumps({b"labels": []}, protocol=3))
    with pytest.raises(CifarFormatError, match="'data'"):
        load_cifar10(tmp_path, "test")
    with pytest.raises(ValueError, match="split"):
        load_cifar10(tmp_path, "val")
    with pytest.raises(ValueError, match="limit"):
        load_cifar10(tmp_path, limit=0)


# ------------------------------------------------------------------ digits

def test_load_digits_split_and_form():
    x, y = load_digits()
    xt, yt = load_digits("test")
    assert x.shape == (1438, 8, 8) and xt.shape == (359, 8, 8)
    assert x.dtype == torch.uint8 and y.dtype == torch.int64 and int(x.max()) <= 16
    # stratified: every class's share of the test split is 20% of the class, rounded
    counts = torch.bincount(torch.cat([y, yt]), minlength=10)
    assert torch.equal(torch.bincount(yt, minlength=10),
                       torch.round(counts.double() * 0.2).long())
    # the splits partition the data set, in its order
    from sklearn.datasets import load_digits as sk
    d = sk()
    both = torch.cat([x, xt]).reshape(-1, 64).numpy().astype(np.float64)
    assert both.shape == d.data.shape
    rows = lambda a: a[np.lexsort(a.T[::-1])]  # noqa: E731  (rows in lexicographic order)
    np.testing.assert_array_equal(rows(both), rows(d.data))
    assert torch.equal(torch.cat([y, yt]).sort()[0], torch.from_numpy(d.target).sort()[0])
    # the constants are the training split's statistics
    f = x.float() / 16
    assert abs(f.mean().item() - DIGITS_MEAN) < 1e-4
    assert abs(f.std(unbiased=False).item() - DIGITS_STD) < 1e-4


def test_load_digits_normalize_seed_limit():
    x, y = load_digits()
    xn, yn = load_digits(normalize=True)
    assert xn.dtype == torch.float32 and xn.shape == (1438, 1, 8, 8) and torch.equal(yn, y)
    torch.testing.assert_close(xn.squeeze(1) * DIGITS_STD + DIGITS_MEAN, x.float() / 16)
    a, b = load_digits(seed=0), load_digits(seed=0)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    c = load_digits(seed=1)
    assert not torch.equal(a[1], c[1])
    xl, yl = load_digits(limit=10)
    assert torch.equal(xl, x[:10]) and torch.equal(yl, y[:10])
    assert load_digits("test", test_fraction=0.5)[0].shape[0] in range(890, 910)
    for bad in ({"split": "val"}, {"limit": 0}, {"test_fraction": 1.0}, {"seed": -1}):
        with pytest.raises(ValueError):
            load_digits(**bad)

