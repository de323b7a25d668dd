"""PyTorch's checkpoint format, read and written with numpy alone: no torch needed.

Every file the project reads or writes in torch's format (RVC and Applio ``.pth``,
``rmvpe.pt``, torchfcpe's ``fcpe_c_v001.pt``, fairseq's ``hubert_base.pt``, Hugging
Face's ``pytorch_model.bin``) is what ``torch.save`` writes:

* **zip** (torch >= 1.6, every RVC-era file): one top-level folder holding ``data.pkl``,
  a protocol-2 pickle of the object, and ``data/<key>``, the raw little-endian bytes of
  each storage (stored uncompressed, 64-byte aligned), plus the records ``version``,
  ``byteorder``, ``.format_version``, ``.storage_alignment`` and
  ``.data/serialization_id``. A tensor in the pickle is the call
  ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks)``
  whose ``storage`` is the persistent id ``("storage", torch.<Type>Storage, key, device, numel)``.
* **legacy** (torch < 1.6): four pickles (a magic number, the protocol, system info, the
  object), a pickled list of storage keys, then each storage as an int64 element count
  followed by its bytes.

:func:`load` rebuilds the object with tensors as numpy arrays (bfloat16 as
``ml_dtypes.bfloat16``). Its unpickler resolves only the globals such files hold
(tensor rebuilders, storage types, ``OrderedDict``, ``_codecs.encode`` for bytes, ``set``,
``complex``, ``torch.Size``, dtypes): the same kind of allowlist as
``torch.load(weights_only=True)``. Any other global is refused as :class:`UnsafeGlobal`
naming it, before anything is called, so nothing in a file ever runs. A caller that
expects harmless foreign classes (fairseq's config records) passes ``inert``, a function
from a global's dotted name to a stand-in class, or None to refuse it. Sizes are checked
before any allocation: a storage must be held by the file, a tensor must lie inside its
storage (else it is returned as a :class:`BadTensor` carrying the reason, so the caller
can name its key), and contiguous tensors are views of their storage (no copy), so no
tensor costs more memory than the file holds.

:func:`save` writes the zip layout above, record for record as ``torch.save`` does, so
``torch.load`` (with or without ``weights_only``), RVC WebUI and Applio read it. It
takes dicts (``OrderedDict`` stays one), lists, tuples, str, bytes, int, float, bool,
None and numpy arrays.

Errors are :class:`TorchFileError` with a one-line reason that does not name the file:
each loader puts its path in front.
"""

from __future__ import annotations

import collections
import hashlib
import io
import math
import os
import pickle
import struct
import zipfile
from typing import Any, Callable

import numpy as np


class TorchFileError(ValueError):
    """The file is not a readable PyTorch checkpoint (one-line reason, no path)."""


class UnsafeGlobal(TorchFileError):
    """The pickle names a global outside the allowlist: nothing from it was called."""

    def __init__(self, name: str):
        super().__init__(f"the pickle names the global {name}, which safe loading refuses")
        self.name = name


# torch's storage classes (the names a pickle uses) -> numpy dtypes.
_STORAGE_DTYPES = {
    "DoubleStorage": "<f8", "FloatStorage": "<f4", "HalfStorage": "<f2", "BFloat16Storage": "bfloat16",
    "LongStorage": "<i8", "IntStorage": "<i4", "ShortStorage": "<i2", "CharStorage": "i1",
    "ByteStorage": "u1", "BoolStorage": "?", "ComplexFloatStorage": "<c8", "ComplexDoubleStorage": "<c16",
}
_DTYPE_STORAGE = {"float64": "DoubleStorage", "float32": "FloatStorage", "float16": "HalfStorage",
                  "bfloat16": "BFloat16Storage", "int64": "LongStorage", "int32": "IntStorage",
                  "int16": "ShortStorage", "int8": "CharStorage", "uint8": "ByteStorage", "bool": "BoolStorage",
                  "complex64": "ComplexFloatStorage", "complex128": "ComplexDoubleStorage"}
# torch dtype objects a pickle may name (torch.float16, ...): kept as their names.
_TORCH_DTYPES = {"float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8",
                 "bool", "complex64", "complex128", "double", "float", "half", "long", "int", "short"}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch.serialization's MAGIC_NUMBER
_ALIGN = 64                             # torch's record alignment in the zip


def _np_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes  # a dependency of jax

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


class _Frozen:
    """Objects handed to the pickle (allowlisted callables, storage types, storages) refuse
    BUILD: a file cannot set attributes on them (a storage's budget, a function's
    defaults) that would change how the rest of the load, or a later one, behaves."""

    __slots__ = ()

    def __setstate__(self, state):
        raise TorchFileError(f"the pickle tries to set the state of {type(self).__name__}")


class StorageType(_Frozen):
    """What ``torch.FloatStorage`` and its kin stand for in a pickle: a dtype."""

    __slots__ = ("name", "dtype")

    def __init__(self, name: str):
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "dtype", _np_dtype(_STORAGE_DTYPES[name]))

    def __repr__(self):
        return f"torch.{self.name}"


class BadTensor:
    """A tensor that cannot be read (its shape or strides reach past its storage): put in
    the object in its place, nothing allocated, so the caller can name its key."""

    def __init__(self, reason: str):
        self.reason = reason

    def __repr__(self):
        return f"<unreadable tensor: {self.reason}>"


class _Budget:
    """Bytes one load may still read or build beyond the file's own bytes, each capped at
    the file's size: a pickle can call an allowed function many times from its memo at a
    few bytes per call, and zip entries can overlap, so neither may multiply the file."""

    def __init__(self, size: int):
        self.read = self.built = max(int(size), 1 << 16)

    def take_read(self, n: int, what: str) -> None:
        if n > self.read:
            raise TorchFileError(f"{what}: the storages read would exceed the file's size (overlapping or "
                                 f"forged zip entries)")
        self.read -= n

    def take_built(self, n: int) -> bool:
        if n > self.built:
            return False
        self.built -= n
        return True


class _Storage(_Frozen):
    """A storage: its elements as a flat numpy array (a view of the bytes read); None
    until read, in a legacy file."""

    __slots__ = ("data", "budget")

    def __init__(self, data: np.ndarray | None, budget: _Budget):
        object.__setattr__(self, "data", data)
        object.__setattr__(self, "budget", budget)

    def fill(self, data: np.ndarray) -> None:
        object.__setattr__(self, "data", data)


def type_name(v: Any) -> str:
    """What a loaded value is, in the file's own terms (a tensor is a ``Tensor``), for
    messages: users know their files through torch."""
    return "Tensor" if isinstance(v, (np.ndarray, BadTensor)) else type(v).__name__


# --------------------------------------------------------------------------- reading


def _is_index(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _tensor(storage, offset, size, stride):
    """The tensor ``size``/``stride`` at ``offset`` of ``storage``, checked to lie inside it:
    a view when contiguous, else a copy charged to the load's budget; a :class:`BadTensor`
    when it does not fit."""
    if not isinstance(storage, _Storage):
        raise TorchFileError(f"a tensor's storage is a {type(storage).__name__}, not a stored tensor")
    if not (isinstance(size, (tuple, list)) and isinstance(stride, (tuple, list))):
        return BadTensor(f"declares shape {size!r} and strides {stride!r}")
    size, stride = tuple(size), tuple(stride)
    if not (_is_index(offset) and len(size) == len(stride) <= 64 and all(map(_is_index, size + stride))):
        return BadTensor(f"declares offset {offset!r}, shape {list(size)} and strides {list(stride)}")
    if storage.data is None:
        return _Pending((storage, offset, size, stride))
    data = storage.data
    numel = math.prod(size)
    if numel == 0:
        return np.zeros(size, data.dtype)
    extent = offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1
    if extent > data.size:
        return BadTensor(f"declares shape {list(size)} with strides {list(stride)}, more than its stored data "
                         f"holds ({data.nbytes:,} bytes)")
    item = data.itemsize
    view = np.lib.stride_tricks.as_strided(data[offset:], shape=size, strides=[s * item for s in stride])
    if view.flags.c_contiguous:
        return view
    if not storage.budget.take_built(numel * item):  # strided views of one storage must not multiply it
        return BadTensor(f"declares shape {list(size)} with strides {list(stride)}: its copy would exceed "
                         f"the file's size")
    return np.array(view)


class _Pending:
    """A legacy file's tensor, rebuilt before its storage's bytes (which follow the
    pickle) are read."""

    def __init__(self, args):
        self.args = args

    def resolve(self):
        return _tensor(*self.args)


class _Call(_Frozen):
    """An allowlisted global: ``fn(budget, *args)``; frozen (see :class:`_Frozen`)."""

    __slots__ = ("fn", "budget", "name")

    def __init__(self, fn, budget: _Budget, name: str):
        object.__setattr__(self, "fn", fn)
        object.__setattr__(self, "budget", budget)
        object.__setattr__(self, "name", name)

    def __call__(self, *args, **kwargs):
        return self.fn(self.budget, *args, **kwargs)

    def __repr__(self):
        return self.name


def _charge(budget: _Budget, n: int, what: str) -> None:
    if not budget.take_built(n):
        raise TorchFileError(f"{what}: the objects the pickle builds would exceed the file's size")


def _rebuild_tensor_v2(budget, storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    return _tensor(storage, storage_offset, size, stride)


def _rebuild_tensor(budget, storage, storage_offset, size, stride):
    return _tensor(storage, storage_offset, size, stride)


def _rebuild_parameter(budget, data, requires_grad=False, backward_hooks=None, state=None):
    return data


def _rebuild_from_type_v2(budget, func, new_type, args, state):
    if not (isinstance(func, _Call) and func.fn in (_rebuild_tensor_v2, _rebuild_tensor, _rebuild_parameter)):
        raise TorchFileError(f"a tensor subclass is rebuilt by {func!r}")
    if not isinstance(args, tuple):
        raise TorchFileError("_rebuild_from_type_v2 called with unexpected arguments")
    return func(*args)


def _codecs_encode(budget, obj, encoding="utf-8"):
    # protocol-2 pickles spell bytes as _codecs.encode(latin-1 text, "latin1")
    if not isinstance(obj, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8"):
        raise TorchFileError("_codecs.encode is only allowed on text with latin1/utf-8")
    _charge(budget, len(obj) * (1 if encoding.startswith("latin") else 4), "_codecs.encode")
    return obj.encode(encoding)


def _items(budget, args, what):
    if len(args) > 1 or (args and not isinstance(args[0], (list, tuple, set, frozenset, dict))):
        raise TorchFileError(f"{what} called with unexpected arguments")
    items = args[0] if args else ()
    _charge(budget, 64 * len(items), what)
    return items


def _ordered_dict(budget, *args):
    return collections.OrderedDict(_items(budget, args, "collections.OrderedDict"))


def _set(budget, *args):
    return set(_items(budget, args, "set"))


def _frozenset(budget, *args):
    return frozenset(_items(budget, args, "frozenset"))


def _size(budget, *args):
    items = _items(budget, args, "torch.Size")
    if len(items) > 64 or not all(_is_index(n) for n in items):
        raise TorchFileError("torch.Size holds something other than a few sizes")
    return tuple(items)


def _complex(budget, real=0.0, imag=0.0):
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (real, imag)):
        raise TorchFileError("complex called with unexpected arguments")
    return complex(real, imag)


def _device(budget, *args):
    if not (1 <= len(args) <= 2 and isinstance(args[0], str) and len(args[0]) < 64):
        raise TorchFileError("torch.device called with unexpected arguments")
    return args[0] if len(args) == 1 else f"{args[0]}:{args[1]}"


class _TensorMarker(_Frozen):
    """``torch.Tensor`` / ``torch.nn.Parameter`` as named by ``_rebuild_from_type_v2``."""


_ALLOWED: dict[str, Any] = {
    "collections.OrderedDict": _ordered_dict,
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor_v2,
    "torch._utils._rebuild_tensor": _rebuild_tensor,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
    "torch._tensor._rebuild_from_type_v2": _rebuild_from_type_v2,
    "torch.Size": _size,
    "torch.device": _device,
    "_codecs.encode": _codecs_encode,
    "builtins.set": _set,
    "builtins.frozenset": _frozenset,
    "builtins.complex": _complex,
}
_MARKERS = {"torch.Tensor", "torch.nn.parameter.Parameter"}


class _Unpickler(pickle._Unpickler):  # noqa: SLF001 - the Python unpickler: its opcodes can be restricted
    """Resolves only :data:`_ALLOWED` (bound to this load's :class:`_Budget`), the storage
    types and dtypes (and ``inert``'s stand-ins); storages come from
    ``storage(key, dtype, numel, view)``. BUILD (setting an object's state) is allowed on
    ``inert``'s stand-ins and as plain attributes of an ``OrderedDict`` (a state dict's
    ``_metadata``) only. Python's own unpickler is used, not the C one, because
    only its opcode table can be restricted; ``data.pkl`` is a few hundred KB at most."""

    dispatch = dict(pickle._Unpickler.dispatch)  # noqa: SLF001

    def __init__(self, fh, storage: Callable | None, inert: Callable[[str], type | None] | None,
                 budget: _Budget):
        super().__init__(fh)
        self._storage, self._inert, self._budget = storage, inert, budget
        self._stand_ins: set[type] = set()

    def find_class(self, module, name):
        if self.proto < 3:  # protocol 2 (torch.save) spells Python 3's builtins as Python 2's
            import _compat_pickle

            if (module, name) in _compat_pickle.NAME_MAPPING:
                module, name = _compat_pickle.NAME_MAPPING[(module, name)]
            elif module in _compat_pickle.IMPORT_MAPPING:
                module = _compat_pickle.IMPORT_MAPPING[module]
        full = f"{module}.{name}"
        if full in _ALLOWED:
            return _Call(_ALLOWED[full], self._budget, full)
        if full in _MARKERS:
            return _TensorMarker()
        if module in ("torch", "torch.cuda") and name in _STORAGE_DTYPES:
            return StorageType(name)
        if module == "torch" and name in _TORCH_DTYPES:
            return f"torch.{name}"
        stand_in = self._inert(full) if self._inert else None
        if stand_in is None:
            raise UnsafeGlobal(full)
        self._stand_ins.add(stand_in)
        return stand_in

    def persistent_load(self, pid):
        if self._storage is None or not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise TorchFileError(f"unexpected persistent id {str(pid)[:60]}")
        stype, key, _location, numel = pid[1:5]
        if not isinstance(stype, StorageType):
            raise TorchFileError(f"storage of unknown type {stype!r}")
        if not _is_index(numel):
            raise TorchFileError(f"storage {key!r} declares {numel!r} elements")
        return self._storage(str(key), stype.dtype, numel, pid[5] if len(pid) > 5 else None)

    def load_build(self):
        inst, state = self.stack[-2], self.stack[-1]
        # a module's state dict carries its version table as OrderedDict._metadata
        plain_attrs = (type(inst) is collections.OrderedDict and isinstance(state, dict)
                       and all(isinstance(k, str) and not k.startswith("__") for k in state))
        if not (plain_attrs or type(inst) in self._stand_ins):
            raise TorchFileError(f"the pickle tries to set the state of a {type(inst).__name__}")
        super().load_build()

    dispatch[pickle.BUILD[0]] = load_build


def load(path: str | os.PathLike, *, inert: Callable[[str], type | None] | None = None) -> Any:
    """The object in the PyTorch file at ``path`` (zip or legacy format), tensors as
    numpy arrays. Raises :class:`TorchFileError` (:class:`UnsafeGlobal` for a refused
    global) with a one-line reason."""
    path = os.fspath(path)
    with open(path, "rb") as fh:
        head = fh.read(4)
    budget = _Budget(os.path.getsize(path))
    if head == b"PK\x03\x04":  # torch's own test: a zip archive's first local header
        return _load_zip(path, inert, budget)
    return _load_legacy(path, inert, budget)


def _zip_error(e: BaseException) -> TorchFileError:
    return TorchFileError(f"truncated or corrupted PyTorch checkpoint (its zip archive is incomplete: "
                          f"{' '.join(str(e).split())[:100]})")


def _load_zip(path: str, inert, budget: _Budget) -> Any:
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise _zip_error(e) from None
    with zf:
        pkls = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkls) != 1:
            raise TorchFileError("a zip archive, but not a PyTorch checkpoint (no <name>/data.pkl record)")
        prefix = pkls[0][: -len("data.pkl")]

        def record(name: str, limit: int) -> bytes:
            info = zf.getinfo(name)
            if info.compress_type != zipfile.ZIP_STORED:
                raise TorchFileError(f"record {name} is compressed; torch stores its records uncompressed")
            if info.file_size > limit:
                raise TorchFileError(f"record {name} holds {info.file_size:,} bytes, more than expected")
            budget.take_read(info.file_size, name)
            try:
                return zf.read(info)
            except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
                raise _zip_error(e) from None

        order = "little"
        if prefix + "byteorder" in zf.namelist():
            order = record(prefix + "byteorder", 16).decode("ascii", "replace")
        if order not in ("little", "big"):
            raise TorchFileError(f"unknown byte order {order[:20]!r}")
        cache: dict[str, _Storage] = {}

        def storage(key: str, dtype: np.dtype, numel: int, view) -> _Storage:
            if key not in cache:
                name = f"{prefix}data/{key}"
                try:
                    info = zf.getinfo(name)
                except KeyError:
                    raise TorchFileError(f"storage record {name} is missing (truncated file?)") from None
                need = numel * dtype.itemsize
                if info.file_size < need:
                    raise TorchFileError(f"storage {key} declares {numel:,} elements ({need:,} bytes) but its "
                                         f"record holds {info.file_size:,} bytes")
                if info.compress_type != zipfile.ZIP_STORED:
                    raise TorchFileError(f"storage record {name} is compressed; torch stores tensors uncompressed")
                budget.take_read(need, name)
                buf = bytearray(need)
                try:
                    with zf.open(info) as src:
                        got = src.readinto(buf)
                except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
                    raise _zip_error(e) from None
                if got != need:
                    raise TorchFileError(f"truncated file: storage {key} holds {got:,} of {need:,} bytes")
                arr = np.frombuffer(buf, dtype.newbyteorder(">") if order == "big" else dtype)
                cache[key] = _Storage(arr.astype(dtype) if order == "big" else arr, budget)
            return cache[key]

        data = record(pkls[0], os.path.getsize(path))
        return _unpickle(io.BytesIO(data), storage, inert, budget)


def _unpickle(fh, storage, inert, budget: _Budget) -> Any:
    try:
        return _Unpickler(fh, storage, inert, budget).load()
    except TorchFileError:
        raise
    except EOFError:
        raise TorchFileError("truncated or empty file (unexpected end of file while unpickling)") from None
    except MemoryError:
        raise TorchFileError("declares more data than the memory available") from None
    except RecursionError:
        raise TorchFileError("nested too deeply") from None
    except Exception as e:  # noqa: BLE001 - garbage gives UnpicklingError/KeyError/ValueError/...
        text = " ".join(str(e).split())[:120]
        raise TorchFileError(f"not a PyTorch checkpoint ({type(e).__name__}: {text})") from None


def _load_legacy(path: str, inert, budget: _Budget) -> Any:
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        if _unpickle(fh, None, None, budget) != _LEGACY_MAGIC:
            raise TorchFileError("not a PyTorch checkpoint (neither a zip archive nor torch's legacy format)")
        if _unpickle(fh, None, None, budget) != 1001:
            raise TorchFileError("legacy-format PyTorch file of an unknown protocol version")
        _unpickle(fh, None, None, budget)  # system info: torch itself reads the storages little-endian
        roots: dict[str, tuple[np.dtype, int]] = {}
        views: list[tuple[_Storage, str, int, int]] = []
        declared = [0]

        def storage(key, dtype, numel, view):
            if key in roots:
                if roots[key] != (dtype, numel):
                    raise TorchFileError(f"storage {key} is declared twice with different sizes")
            else:
                roots[key] = (dtype, numel)
                declared[0] += dtype.itemsize * numel
                if declared[0] > size:
                    raise TorchFileError(f"legacy-format PyTorch file whose tensors declare {declared[0]:,} bytes, "
                                         f"more than the file holds ({size:,} bytes): truncated or forged; nothing "
                                         f"was allocated")
            s = _Storage(None, budget)   # filled once the storage list has been read
            if view is not None:
                if not (isinstance(view, tuple) and len(view) == 3 and _is_index(view[1]) and _is_index(view[2])):
                    raise TorchFileError(f"storage {key} has an unreadable view {str(view)[:40]}")
                views.append((s, key, view[1], view[2]))
            else:
                views.append((s, key, 0, -1))
            return s

        obj = _unpickle(fh, storage, inert, budget)
        keys = _unpickle(fh, None, None, budget)
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise TorchFileError("legacy-format PyTorch file with an unreadable storage list")
        data: dict[str, np.ndarray] = {}
        for key in keys:
            if key not in roots:
                raise TorchFileError(f"legacy-format storage list names {key}, which no tensor uses")
            dtype, numel = roots[key]
            head = fh.read(8)
            if len(head) != 8:
                raise TorchFileError("truncated file: the storages end early")
            if struct.unpack("<q", head)[0] != numel:
                raise TorchFileError(f"storage {key}: its stored element count differs from the declared {numel:,}")
            raw = bytearray(numel * dtype.itemsize)
            if fh.readinto(raw) != len(raw):
                raise TorchFileError("truncated file: the storages end early")
            data[key] = np.frombuffer(raw, dtype)
    for s, key, start, n in views:
        if key not in data:
            raise TorchFileError(f"storage {key} is used but not stored")
        whole = data[key]
        if n >= 0 and start + n > whole.size:
            raise TorchFileError(f"storage view {key}[{start}:{start + n}] lies outside its storage")
        s.fill(whole if n < 0 else whole[start:start + n])
    return _materialise(obj, {})


def _materialise(obj: Any, seen: dict[int, Any], depth: int = 0) -> Any:
    """Legacy files rebuild tensors before their storages are read: resolve the
    :class:`_Pending` placeholders now. Each container is visited once (a pickle's memo
    can share one sub-object many times)."""
    if depth > 200:
        raise TorchFileError("nested too deeply")
    if isinstance(obj, _Pending):
        return obj.resolve()
    if not isinstance(obj, (dict, list, tuple)):
        return obj
    if id(obj) in seen:
        return seen[id(obj)]
    if isinstance(obj, dict):
        seen[id(obj)] = obj
        for k, v in obj.items():
            obj[k] = _materialise(v, seen, depth + 1)
        return obj
    if isinstance(obj, list):
        seen[id(obj)] = obj
        obj[:] = [_materialise(v, seen, depth + 1) for v in obj]
        return obj
    out = tuple(_materialise(v, seen, depth + 1) for v in obj)
    seen[id(obj)] = out
    return out


# --------------------------------------------------------------------------- writing


class _Pickle:
    """A protocol-2 pickle of plain data with tensors as torch spells them (no memo)."""

    def __init__(self):
        self.out = bytearray(b"\x80\x02")
        self.storages: list[np.ndarray] = []

    def global_(self, module: str, name: str):
        self.out += b"c" + module.encode() + b"\n" + name.encode() + b"\n"

    def str_(self, s: str):
        b = s.encode("utf-8", "surrogatepass")
        self.out += b"X" + struct.pack("<I", len(b)) + b

    def int_(self, v: int):
        if 0 <= v < 256:
            self.out += b"K" + bytes([v])
        elif 0 <= v < 65536:
            self.out += b"M" + struct.pack("<H", v)
        elif -2**31 <= v < 2**31:
            self.out += b"J" + struct.pack("<i", v)
        else:
            b = v.to_bytes((v.bit_length() + 8) // 8, "little", signed=True)
            self.out += (b"\x8a" + bytes([len(b)]) if len(b) < 256 else b"\x8b" + struct.pack("<i", len(b))) + b

    def tuple_(self, items, depth: int = 0):
        if not items:
            self.out += b")"
            return
        if len(items) <= 3:
            for x in items:
                self.dump(x, depth + 1)
            self.out += (b"\x85", b"\x86", b"\x87")[len(items) - 1]
            return
        self.out += b"("
        for x in items:
            self.dump(x, depth + 1)
        self.out += b"t"

    def tensor(self, a: np.ndarray):
        name = _DTYPE_STORAGE.get(a.dtype.name)
        if name is None:
            raise TypeError(f"cannot write a {a.dtype} array as a torch tensor")
        key = str(len(self.storages))
        self.storages.append(a)
        self.global_("torch._utils", "_rebuild_tensor_v2")
        self.out += b"("
        self.out += b"("
        self.str_("storage")
        self.global_("torch", name)
        self.str_(key)
        self.str_("cpu")
        self.int_(int(a.size))
        self.out += b"tQ"                                   # TUPLE, BINPERSID
        self.int_(0)
        self.tuple_([int(n) for n in a.shape])
        # C-order strides from the shape (numpy's own may be anything on a dimension of
        # size 1, even negative); tobytes() writes C order
        self.tuple_([int(math.prod(a.shape[i + 1:])) for i in range(a.ndim)])
        self.out += b"\x89"                                 # requires_grad False
        self.global_("collections", "OrderedDict")
        self.out += b")R"                                   # backward hooks: OrderedDict()
        self.out += b"tR"

    def dump(self, obj: Any, depth: int = 0):
        if depth > 100:
            raise ValueError("nesting too deep to write")
        if obj is None:
            self.out += b"N"
        elif obj is True or obj is False:
            self.out += b"\x88" if obj else b"\x89"
        elif isinstance(obj, np.ndarray):
            self.tensor(obj)
        elif isinstance(obj, np.generic):
            self.dump(obj.item(), depth)
        elif isinstance(obj, int):
            self.int_(obj)
        elif isinstance(obj, float):
            self.out += b"G" + struct.pack(">d", obj)
        elif isinstance(obj, str):
            self.str_(obj)
        elif isinstance(obj, (bytes, bytearray)):
            self.global_("_codecs", "encode")
            self.str_(bytes(obj).decode("latin1"))
            self.str_("latin1")
            self.out += b"\x86R"
        elif isinstance(obj, dict):
            if isinstance(obj, collections.OrderedDict):
                self.global_("collections", "OrderedDict")
                self.out += b")R"
            else:
                self.out += b"}"
            if obj:
                self.out += b"("
                for k, v in obj.items():
                    if not isinstance(k, (str, int)) or isinstance(k, bool):
                        raise TypeError(f"cannot write a dict key of type {type(k).__name__}")
                    self.dump(k, depth + 1)
                    self.dump(v, depth + 1)
                self.out += b"u"
        elif isinstance(obj, list):
            self.out += b"]"
            if obj:
                self.out += b"("
                for v in obj:
                    self.dump(v, depth + 1)
                self.out += b"e"
        elif isinstance(obj, tuple):
            self.tuple_(list(obj), depth)
        else:
            raise TypeError(f"cannot write a {type(obj).__name__} in a torch file")


def _aligned(zf: zipfile.ZipFile, name: str, data: bytes) -> None:
    """One stored record whose bytes start at a multiple of 64, padded with an extra
    field as torch pads it (id ``FB``)."""
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    info.external_attr = 0o600 << 16
    start = zf.fp.tell() + 30 + len(name.encode()) + 4
    pad = -start % _ALIGN
    info.extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
    zf.writestr(info, data)


def save(obj: Any, path: str | os.PathLike, *, archive: str = "archive") -> None:
    """Write ``obj`` to ``path`` in torch's zip format (see the module docstring).
    Writes exactly ``path``: callers that need an atomic write pass a temporary path."""
    p = _Pickle()
    p.dump(obj)
    p.out += b"."
    pkl = bytes(p.out)
    # torch writes a random serialization id; a digest of the content keeps files reproducible
    sid = str(int.from_bytes(hashlib.sha256(pkl).digest()[:16], "little")).rjust(40, "0")[:40]
    with zipfile.ZipFile(os.fspath(path), "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        _aligned(zf, f"{archive}/data.pkl", pkl)
        _aligned(zf, f"{archive}/.format_version", b"1")
        _aligned(zf, f"{archive}/.storage_alignment", str(_ALIGN).encode())
        _aligned(zf, f"{archive}/byteorder", b"little")
        for i, a in enumerate(p.storages):
            _aligned(zf, f"{archive}/data/{i}", a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes())
        _aligned(zf, f"{archive}/version", b"3\n")
        _aligned(zf, f"{archive}/.data/serialization_id", sid.encode())


__all__ = ["load", "save", "type_name", "TorchFileError", "UnsafeGlobal", "BadTensor", "StorageType"]
