"""Read a torch zip-pickle (`torch.save` since torch 1.6) without torch: tensors come back as numpy arrays.

The archive holds `<name>/data.pkl` (a pickle whose tensors are `torch._utils._rebuild_tensor_v2` calls over
persistent storage ids) and `<name>/data/<key>` (raw little-endian storage bytes). Only plain containers,
`collections.OrderedDict` and CPU tensors are accepted; any other global in the pickle is refused, so loading
an untrusted file cannot execute code.
"""

from __future__ import annotations

import collections
import io
import pickle
import zipfile
from pathlib import Path

import numpy as np

from traces.errors import TraceError

# torch storage class name -> numpy dtype (bfloat16 is widened to float32 below)
_STORAGE_DTYPES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "BFloat16Storage": np.uint16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class _StorageType:
    def __init__(self, name: str):
        self.name = name
        self.dtype = np.dtype(_STORAGE_DTYPES[name])


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored):
    """Rebuild one tensor view of `storage` (a flat numpy array) as an independent numpy array."""
    arr, is_bf16 = storage
    size = tuple(int(s) for s in size)
    stride = tuple(int(s) for s in stride)
    if len(size) == 0:
        out = arr[storage_offset:storage_offset + 1].reshape(())
    else:
        needed = storage_offset + sum((s - 1) * st for s, st in zip(size, stride)) + 1 if all(size) else 0
        if needed > len(arr):
            raise ValueError(f"tensor of size {size} needs {needed} elements, storage has {len(arr)}")
        out = np.lib.stride_tricks.as_strided(arr[storage_offset:], shape=size,
                                              strides=[st * arr.itemsize for st in stride]).copy()
    if is_bf16:
        out = (out.astype(np.uint32) << 16).view(np.float32)
    return out


def load_pt(path: str | Path) -> dict:
    """Load a torch zip-pickle into plain Python objects and numpy arrays; TraceError on anything unexpected."""
    path = Path(path)
    try:
        zf = zipfile.ZipFile(path)
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except Exception:  # BadZipFile, EOFError, NotImplementedError (odd versions), ...
        raise TraceError("not a torch zip-pickle (.pt saved by torch >= 1.6): not a readable zip archive",
                         path=path) from None
    try:
        with zf:
            return _load_zip(zf, path)
    except TraceError:
        raise
    except Exception as exc:  # corrupt archive or pickle: one clear line, never a traceback
        raise TraceError(f"unreadable torch file: {type(exc).__name__}: {exc}"[:300], path=path) from None


def _load_zip(zf: zipfile.ZipFile, path: Path):
    names = zf.namelist()
    pkl = [n for n in names if n.endswith("data.pkl")]
    if len(pkl) != 1:
        raise TraceError(f"not a torch zip-pickle: expected one data.pkl, found {len(pkl)}", path=path)
    prefix = pkl[0][: -len("data.pkl")]
    byteorder = prefix + "byteorder"
    if byteorder in names and zf.read(byteorder).strip() not in (b"little", b""):
        raise TraceError("big-endian torch files are not supported", path=path, where="byteorder")
    storages: dict[str, tuple[np.ndarray, bool]] = {}

    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            if module == "torch._utils" and name == "_rebuild_tensor_v2":
                return _rebuild_tensor
            if module == "torch" and name in _STORAGE_DTYPES:
                return _StorageType(name)
            if module == "collections" and name == "OrderedDict":
                return collections.OrderedDict
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")

        def persistent_load(self, pid):
            if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
                raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
            _, stype, key, _location, numel = pid[:5]
            if not isinstance(stype, _StorageType):
                raise pickle.UnpicklingError(f"unsupported storage type {stype!r}")
            if key not in storages:
                try:
                    raw = zf.read(f"{prefix}data/{key}")
                except KeyError:
                    raise pickle.UnpicklingError(f"storage {key} missing from the archive") from None
                if len(raw) < numel * stype.dtype.itemsize:
                    raise pickle.UnpicklingError(f"storage {key} has {len(raw)} bytes, needs "
                                                 f"{numel * stype.dtype.itemsize}")
                arr = np.frombuffer(raw, dtype=stype.dtype, count=int(numel))
                storages[key] = (arr, stype.name == "BFloat16Storage")
            return storages[key]

    return Unpickler(io.BytesIO(zf.read(pkl[0]))).load()

