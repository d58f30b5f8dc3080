"""CIFAR-10 (Krizhevsky 2009) from the *python* batches of ``cifar-10-python.tar.gz``
(``data_batch_1`` .. ``data_batch_5``, ``test_batch``), read without pickle.

The batches are pickled dicts (written by Python 2 with protocol 2): ``b"data"``, a numpy uint8
array ``[10000, 3072]`` (each row a 32x32 image, the red, green and blue planes one after the
other), ``b"labels"``, a list of 10000 ints in 0..9, plus ``b"batch_label"`` and
``b"filenames"``. Loading a pickle executes whatever callables the stream names, so this module
never calls :func:`pickle.load`: :func:`read_batch` walks the stream's opcodes with
:func:`pickletools.genops` (a parser that executes nothing) and builds the values itself --
only dicts, lists, tuples, bytes, str, ints, bools and None, plus the numpy array
reconstruction patterns below, recognized by the names the stream gives and never imported or
called:

* protocols 2-4: ``numpy.core.multiarray._reconstruct(numpy.ndarray, (0,), b"b")`` then
  ``BUILD`` with the state ``(1, shape, dtype, is_fortran, raw_bytes)``;
* protocol 5: ``numpy.core.numeric._frombuffer(raw_bytes, dtype, shape, order)``;
* a dtype is ``numpy.dtype("u1", False, True)`` then ``BUILD`` with ``(3, "|", None, None,
  None, -1, -1, 0)``; only ``u1`` (uint8) is accepted;
* bytes written by Python 3 with protocol 2 (``_codecs.encode(text, "latin1")`` and
  ``bytes()``) are rebuilt from their text. (``numpy._core`` spellings are accepted as well.)

Anything else (another global such as ``os.system``, object-building opcodes, out-of-band
buffers, an array that does not match its shape, a list that contains itself, memo references
that unfold to more elements than the stream has bytes) raises :class:`CifarFormatError` naming
the file, the opcode and its position, before anything of the file is used. A list, tuple or
dict the stream refers to more than once is read once and shared, as pickle shares it.
"""

from __future__ import annotations

import io
import math
import os
import pickletools
import reprlib
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np
import torch

from .._checks import check_int

__all__ = ["CIFAR10_CLASSES", "CIFAR10_MEAN", "CIFAR10_STD", "CifarFormatError", "cifar10_dir",
           "load_cifar10", "read_batch"]

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")
# per-channel (R, G, B) mean and standard deviation of the 50000 training images' pixels,
# scaled to [0, 1] (the population std; the often-quoted 0.2023/0.1994/0.2010 is not)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
_TEST_FILES = ("test_batch",)
_SUBDIR = "cifar-10-batches-py"
_IMAGE_BYTES = 3 * 32 * 32
# a batch file is about 31 MB; a larger file is refused rather than read into memory
MAX_BATCH_BYTES = 256 << 20
_HOWTO = ("download cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html "
          "on a machine with network access, extract it (tar xzf cifar-10-python.tar.gz gives "
          f"the folder {_SUBDIR}/) and pass that folder (or its parent) as --data-dir or in "
          "the OQFL_DATA environment variable")


class CifarFormatError(ValueError):
    """A CIFAR batch file is not the expected pickled dict (or uses something not accepted)."""


# ----------------------------------------------------------------------------------------------
# a restricted pickle reader

_RECONSTRUCT = "reconstruct"
_FROMBUFFER = "frombuffer"
_NDARRAY = "ndarray"
_DTYPE = "dtype"
_ENCODE = "codecs.encode"
_BYTES = "bytes"
_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy.core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy._core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _DTYPE,
    ("_codecs", "encode"): _ENCODE,
    ("__builtin__", "bytes"): _BYTES,
    ("builtins", "bytes"): _BYTES,
}
_ACCEPTED_DTYPES = {"u1": np.dtype(np.uint8), "|u1": np.dtype(np.uint8)}
_MAX_NDIM = 8


class _ShortRepr(reprlib.Repr):
    """repr for error messages, bounded in length and in work however the value nests or shares
    its parts (a plain repr of a few hundred bytes of memo GETs can be 10**15 items long)."""

    def __init__(self):
        super().__init__()
        self.maxlevel, self.maxtuple, self.maxlist, self.maxdict = 2, 4, 4, 4
        self.maxstring = self.maxother = 40

    def repr_bytes(self, x, level):
        return repr(x[:self.maxstring]) + ("..." if len(x) > self.maxstring else "")

    repr_bytearray = repr_bytes


_short = _ShortRepr().repr


class _Global:
    """A name the stream refers to (one of _GLOBALS): a token, never imported or called."""

    __slots__ = ("kind", "label")

    def __init__(self, kind: str, label: str):
        self.kind, self.label = kind, label


class _Mark:
    pass


_MARK = _Mark()


class _Array:
    """numpy's ``_reconstruct`` result, waiting for the BUILD that gives it its data."""

    __slots__ = ("array",)

    def __init__(self):
        self.array: Optional[np.ndarray] = None


class _DType:
    """numpy's ``dtype(...)`` result, waiting for the BUILD that gives its state."""

    __slots__ = ("dtype", "built")

    def __init__(self, dtype: np.dtype):
        self.dtype, self.built = dtype, False


def _text(value) -> Optional[str]:
    if isinstance(value, bytes):
        try:
            return value.decode("ascii")
        except UnicodeDecodeError:
            return None
    return value if isinstance(value, str) else None


def _is_int(value) -> bool:
    return type(value) is int


class _Reader:
    def __init__(self, path):
        self.path = path
        self.op = "?"
        self.pos = -1

    def fail(self, msg: str):
        raise CifarFormatError(f"{self.path}: not a CIFAR-10 python batch: {msg} (opcode "
                               f"{self.op} at byte {self.pos}); only pickled dicts, lists, "
                               "numbers, strings and numpy uint8 arrays are accepted")

    # -- stack helpers
    def pop(self, stack):
        if not stack or stack[-1] is _MARK:
            self.fail("stack underflow")
        return stack.pop()

    def pop_mark(self, stack, marks):
        if not marks:
            self.fail("no MARK for this opcode")
        start = marks.pop()
        if len(stack) <= start or stack[start] is not _MARK:
            self.fail("unbalanced MARK")
        items = stack[start + 1:]
        del stack[start:]
        if any(v is _MARK for v in items):
            self.fail("unbalanced MARK")
        return items

    # -- numpy patterns
    def dtype_of(self, args) -> _DType:
        # (Python 2's numpy wrote the flags as the ints 0 and 1)
        if not (isinstance(args, tuple) and len(args) == 3 and type(args[1]) in (bool, int)
                and args[1] == 0 and type(args[2]) in (bool, int) and args[2] == 1):
            self.fail(f"numpy.dtype arguments {_short(args)}, expected (name, False, True)")
        name = _text(args[0])
        if name not in _ACCEPTED_DTYPES:
            self.fail(f"numpy dtype {_short(args[0])}, only uint8 ('u1') is accepted")
        return _DType(_ACCEPTED_DTYPES[name])

    def finished_dtype(self, value) -> np.dtype:
        if not isinstance(value, _DType) or not value.built:
            self.fail(f"expected a numpy dtype, got {type(value).__name__}")
        return value.dtype

    def shape_of(self, value) -> Tuple[int, ...]:
        if (not isinstance(value, tuple) or len(value) > _MAX_NDIM
                or not all(_is_int(d) and d >= 0 for d in value)):
            self.fail(f"malformed array shape {_short(value)}")
        return value

    def array_of(self, data, dtype: np.dtype, shape, order: str) -> np.ndarray:
        if not isinstance(data, (bytes, bytearray)):
            self.fail(f"array data is {type(data).__name__}, expected bytes")
        needed = math.prod(shape) * dtype.itemsize  # Python ints: no wrap-around
        if len(data) != needed:
            self.fail(f"array of shape {shape} and dtype {dtype} needs {needed} bytes, got "
                      f"{len(data)}")
        if math.prod(max(d, 1) for d in shape) * dtype.itemsize > MAX_BATCH_BYTES:
            # an empty array with sides numpy cannot hold (or no batch file could fill)
            self.fail(f"array shape {shape} is larger than a CIFAR batch can be "
                      f"({MAX_BATCH_BYTES} bytes)")
        flat = np.frombuffer(data, dtype=dtype)
        return flat.reshape(shape, order=order).copy(order="C")  # writable, C order

    def reduce(self, func, args):
        if not isinstance(func, _Global) or not isinstance(args, tuple):
            self.fail(f"REDUCE of {type(func).__name__}: only the numpy array and bytes "
                      "patterns are accepted")
        kind = func.kind
        if kind == _RECONSTRUCT:
            if not (len(args) == 3 and isinstance(args[0], _Global) and args[0].kind == _NDARRAY
                    and args[1] == (0,) and _text(args[2]) == "b"):
                self.fail(f"{func.label} arguments are not (numpy.ndarray, (0,), b'b')")
            return _Array()
        if kind == _DTYPE:
            return self.dtype_of(args)
        if kind == _FROMBUFFER:
            if len(args) != 4:
                self.fail(f"{func.label} expects 4 arguments, got {len(args)}")
            order = _text(args[3])
            if order not in ("C", "F"):
                self.fail(f"array order {_short(args[3])}, expected 'C' or 'F'")
            return self.array_of(args[0], self.finished_dtype(args[1]), self.shape_of(args[2]),
                                 order)
        if kind == _ENCODE:
            if not (len(args) == 2 and isinstance(args[0], str)
                    and _text(args[1]) in ("latin1", "latin-1")):
                self.fail(f"{func.label} arguments are not (str, 'latin1')")
            try:
                return args[0].encode("latin-1")
            except UnicodeEncodeError:
                self.fail(f"{func.label}: text is not latin-1")
        if kind == _BYTES:
            if args != ():
                self.fail(f"{func.label} with arguments (only bytes() is accepted)")
            return b""
        self.fail(f"{func.label} cannot be called")

    def build(self, obj, state):
        if isinstance(obj, _DType) and not obj.built:
            if not (isinstance(state, tuple) and len(state) == 8 and state[0] == 3
                    and _text(state[1]) in ("|", "<", "=") and state[2:5] == (None,) * 3
                    and state[5:] == (-1, -1, 0)):
                self.fail(f"numpy dtype state {_short(state)} is not that of uint8")
            obj.built = True
            return
        if isinstance(obj, _Array) and obj.array is None:
            if not (isinstance(state, tuple) and len(state) == 5 and state[0] == 1
                    and type(state[3]) in (bool, int) and state[3] in (0, 1)):
                self.fail(f"numpy array state {_short(state)} is not (1, shape, dtype, "
                          "is_fortran, data)")
            obj.array = self.array_of(state[4], self.finished_dtype(state[2]),
                                      self.shape_of(state[1]), "F" if state[3] else "C")
            return
        self.fail(f"BUILD of {type(obj).__name__}")

    def resolve(self, value, budget: int):
        """``value`` with the reader's placeholders replaced by what they stand for. A list,
        tuple or dict the stream holds several references to (memo GETs) is resolved once and
        shared, as pickle shares it. Refused: a value that contains itself, and sharing that
        unfolds to more than ``budget`` elements (the stream's length: written out without
        sharing, every element takes at least one byte, while a few hundred bytes of GETs can
        describe 10**15 elements)."""
        done: Dict[int, Tuple[Any, int]] = {}  # id of a container -> (resolved, unfolded size)
        open_ids = set()  # the containers being resolved (a cycle comes back to one)

        def walk(v, depth) -> Tuple[Any, int]:
            if isinstance(v, _Array):
                if v.array is None:
                    self.fail("a numpy array was never given its data")
                return v.array, 1
            if isinstance(v, (_Global, _DType, _Mark)):
                self.fail(f"a {type(v).__name__.strip('_')} is not a value")
            if not isinstance(v, (list, tuple, dict)):
                return v, 1
            if id(v) in done:
                return done[id(v)]
            if id(v) in open_ids:
                self.fail(f"a {type(v).__name__} contains itself")
            if depth > 20:
                self.fail("values nested too deeply")
            open_ids.add(id(v))
            items = [walk(x, depth + 1) for x in
                     (v if not isinstance(v, dict) else (x for kv in v.items() for x in kv))]
            size = 1 + sum(n for _, n in items)
            if size > budget:
                self.fail(f"memo references (GET) unfold the value to more than {budget} "
                          f"elements, more than a stream of {budget} bytes can write out")
            out = [x for x, _ in items]
            out = (out if isinstance(v, list) else tuple(out) if isinstance(v, tuple)
                   else dict(zip(out[::2], out[1::2])))
            open_ids.discard(id(v))
            done[id(v)] = (out, size)
            return out, size

        return walk(value, 0)[0]

    def run(self, data: bytes):
        stack: List[Any] = []
        marks: List[int] = []
        memo: Dict[int, Any] = {}
        result = None
        stopped = False
        ops = pickletools.genops(io.BytesIO(data))
        while True:
            try:
                opcode, arg, pos = next(ops)
            except StopIteration:
                break
            except Exception as e:  # pickletools' parse errors (truncation, bad args)
                self.op, self.pos = "?", -1
                self.fail(f"unreadable pickle stream ({type(e).__name__}: {e})")
            self.op, self.pos = opcode.name, pos
            name = opcode.name
            if name == "PROTO":
                if not 2 <= arg <= 5:
                    self.fail(f"pickle protocol {arg}, expected 2 to 5")
            elif name == "FRAME":
                pass
            elif name == "STOP":
                if len(stack) != 1 or marks:
                    self.fail("stream does not end with exactly one value")
                result = stack.pop()
                stopped = True
            elif name == "MARK":
                marks.append(len(stack))
                stack.append(_MARK)
            elif name == "POP":
                self.pop(stack)
            elif name in ("BININT", "BININT1", "BININT2", "LONG1", "INT", "LONG"):
                if isinstance(arg, bool) or not isinstance(arg, int):  # INT "01"/"00"
                    self.fail(f"unexpected argument {_short(arg)}")
                stack.append(arg)
            elif name == "NONE":
                stack.append(None)
            elif name in ("NEWTRUE", "NEWFALSE"):
                stack.append(name == "NEWTRUE")
            elif name in ("BINSTRING", "SHORT_BINSTRING"):  # a Python 2 str: bytes
                stack.append(arg.encode("latin-1"))
            elif name in ("BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8", "UNICODE"):
                stack.append(arg)
            elif name in ("BINBYTES", "SHORT_BINBYTES", "BINBYTES8", "BYTEARRAY8"):
                stack.append(arg)
            elif name == "EMPTY_DICT":
                stack.append({})
            elif name == "EMPTY_LIST":
                stack.append([])
            elif name == "EMPTY_TUPLE":
                stack.append(())
            elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
                n = int(name[-1])
                if len(stack) < n or any(v is _MARK for v in stack[-n:]):
                    self.fail("stack underflow")
                items = tuple(stack[-n:])
                del stack[-n:]
                stack.append(items)
            elif name == "TUPLE":
                stack.append(tuple(self.pop_mark(stack, marks)))
            elif name == "LIST":
                stack.append(list(self.pop_mark(stack, marks)))
            elif name in ("DICT", "SETITEMS", "SETITEM"):
                items = (self.pop_mark(stack, marks) if name != "SETITEM"
                         else [None, None])
                if name == "SETITEM":
                    items[1] = self.pop(stack)
                    items[0] = self.pop(stack)
                if len(items) % 2:
                    self.fail("odd number of items for a dict")
                target = {} if name == "DICT" else self.pop(stack)
                if not isinstance(target, dict):
                    self.fail(f"{name} on a {type(target).__name__}, not a dict")
                for k, v in zip(items[::2], items[1::2]):
                    if not isinstance(k, (str, bytes, int)):
                        self.fail(f"dict key of type {type(k).__name__}")
                    target[k] = v
                stack.append(target)
            elif name in ("APPEND", "APPENDS"):
                items = [self.pop(stack)] if name == "APPEND" else self.pop_mark(stack, marks)
                target = self.pop(stack)
                if not isinstance(target, list):
                    self.fail(f"{name} on a {type(target).__name__}, not a list")
                target.extend(items)
                stack.append(target)
            elif name in ("GLOBAL", "STACK_GLOBAL"):
                if name == "GLOBAL":
                    module, _, attr = arg.partition(" ")
                else:
                    attr = self.pop(stack)
                    module = self.pop(stack)
                    if not isinstance(module, str) or not isinstance(attr, str):
                        self.fail("STACK_GLOBAL of non-strings")
                kind = _GLOBALS.get((module, attr))
                if kind is None:
                    self.fail(f"refers to {module}.{attr}, which is not accepted")
                stack.append(_Global(kind, f"{module}.{attr}"))
            elif name == "REDUCE":
                args = self.pop(stack)
                func = self.pop(stack)
                stack.append(self.reduce(func, args))
            elif name == "BUILD":
                state = self.pop(stack)
                if not stack or stack[-1] is _MARK:
                    self.fail("stack underflow")
                self.build(stack[-1], state)
            elif name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
                if not stack or stack[-1] is _MARK:
                    self.fail("nothing to memoize")
                memo[len(memo) if name == "MEMOIZE" else arg] = stack[-1]
            elif name in ("GET", "BINGET", "LONG_BINGET"):
                if arg not in memo:
                    self.fail(f"memo key {arg} was never stored")
                stack.append(memo[arg])
            else:
                self.fail("this opcode is not accepted")
        if not stopped:
            self.fail("stream ends without STOP")
        if self.pos + 1 != len(data):  # genops stops reading at STOP
            self.fail(f"{len(data) - self.pos - 1} bytes after STOP")
        return self.resolve(result, len(data))


def read_batch(path: Union[str, os.PathLike]) -> dict:
    """The dict stored in a CIFAR python batch file, read without unpickling (see the module
    docstring): keys and Python 2 strings as bytes, numpy arrays as read-write uint8 arrays.
    Raises :class:`CifarFormatError` for anything outside the accepted subset."""
    size = os.path.getsize(path)
    if size > MAX_BATCH_BYTES:
        raise CifarFormatError(f"{path}: {size} bytes, more than the {MAX_BATCH_BYTES} accepted "
                               "for a CIFAR batch")
    with open(path, "rb") as f:
        data = f.read()
    value = _Reader(path).run(data)
    if not isinstance(value, dict):
        raise CifarFormatError(f"{path}: not a CIFAR-10 python batch: the pickle holds a "
                               f"{type(value).__name__}, expected a dict")
    return value


# ----------------------------------------------------------------------------------------------
# the loader

def _folder(folder) -> Optional[Path]:
    root = folder if folder is not None else os.environ.get("OQFL_DATA")
    return Path(root) if root else None


def cifar10_dir(folder=None) -> Optional[Path]:
    """The folder holding the batch files: ``folder`` (else ``$OQFL_DATA``) itself when it
    holds ``data_batch_1`` or ``test_batch``, else its ``cifar-10-batches-py`` subfolder when
    that does; None when neither does (or no folder was given)."""
    root = _folder(folder)
    if root is None:
        return None
    for cand in (root, root / _SUBDIR):
        if any((cand / f).is_file() for f in (_TRAIN_FILES[0], _TEST_FILES[0])):
            return cand
    return None


def _get(batch: dict, key: str, path):
    for k in (key.encode("ascii"), key):
        if k in batch:
            return batch[k]
    raise CifarFormatError(f"{path}: CIFAR batch has no {key!r} entry (keys: "
                           f"{sorted(map(repr, batch))[:8]})")


def load_cifar10(folder=None, split: str = "train", limit: Optional[int] = None,
                 normalize: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(images, labels)`` of a CIFAR-10 split (``"train"``: the 50000 images of
    ``data_batch_1..5`` in file order, ``"test"``: the 10000 of ``test_batch``).

    ``images``: uint8 ``[N, 3, 32, 32]`` (RGB planes), or with ``normalize`` float32
    ``[N, 3, 32, 32]`` scaled to [0, 1] and standardized per channel with
    :data:`CIFAR10_MEAN` / :data:`CIFAR10_STD`. ``labels``: int64 ``[N]`` in 0..9. ``limit``
    keeps the first ``limit`` examples. ``folder``: see :func:`cifar10_dir`. The files are read
    by :func:`read_batch` (no unpickling). FileNotFoundError says how to get the data when
    files are missing; :class:`CifarFormatError` (a ValueError) names the file and what is wrong
    when one is malformed.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split expected 'train' or 'test', got {split!r}")
    check_int("limit", limit, minimum=1, allow_none=True)
    names = _TRAIN_FILES if split == "train" else _TEST_FILES
    root = _folder(folder)
    where = cifar10_dir(folder)
    if where is None or not all((where / n).is_file() for n in names):
        place = ("no folder was given and OQFL_DATA is not set" if root is None else
                 f"{', '.join(names)} not found in {root}"
                 + ("" if where is None or where == root else f" or {where}")
                 + ("" if where is not None else f" or {root / _SUBDIR}"))
        raise FileNotFoundError(f"CIFAR-10 {split} batches: {place}; {_HOWTO}")
    images, labels, count = [], [], 0
    for n in names:
        path = where / n
        batch = read_batch(path)
        data, lab = _get(batch, "data", path), _get(batch, "labels", path)
        if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != _IMAGE_BYTES:
            raise CifarFormatError(f"{path}: 'data' expected a uint8 array of shape (N, "
                                   f"{_IMAGE_BYTES}), got "
                                   f"{getattr(data, 'shape', type(data).__name__)}")
        if (not isinstance(lab, list) or len(lab) != data.shape[0]
                or not all(type(v) is int and 0 <= v <= 9 for v in lab)):
            raise CifarFormatError(f"{path}: 'labels' expected a list of {data.shape[0]} "
                                   "integers in 0..9")
        images.append(data)
        labels.append(np.asarray(lab, dtype=np.int64))
        count += data.shape[0]
        if limit is not None and count >= limit:
            break
    x = torch.from_numpy(np.concatenate(images)[:limit].reshape(-1, 3, 32, 32))
    y = torch.from_numpy(np.concatenate(labels)[:limit])
    if normalize:
        mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
        x = (x.float() / 255 - mean) / std
    return x, y
