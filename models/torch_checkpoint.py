"""Read PyTorch checkpoints into numpy arrays without importing torch.

MammoLab trains in Keras but starts some backbones from ImageNet weights published as PyTorch
``.pth`` files. Installing torch only to read a few megabytes of floats is out of proportion, so
this module parses the two on-disk formats ``torch.save`` has used:

* the legacy (pre-1.6) format: a sequence of pickles -- magic number, protocol version, system
  info, the saved object (its tensors referring to storages by persistent id), the list of storage
  keys -- followed, for each key in that list, by an 8-byte little-endian element count and the
  storage's raw bytes;
* the zip format (torch >= 1.6): ``<root>/data.pkl`` holds the object, ``<root>/data/<key>`` the
  raw bytes of each storage.

Unpickling runs with a whitelist: only ``collections.OrderedDict`` and torch's tensor-rebuilding
functions and storage types resolve; any other global raises ``ValueError``. A checkpoint can
therefore not execute code on load, unlike ``torch.load(weights_only=False)``.
"""

from __future__ import annotations

import collections
import io
import logging
import pickle
import struct
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

__all__ = ["load_state_dict", "read_checkpoint"]

log = logging.getLogger(__name__)

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch.serialization.MAGIC_NUMBER
LEGACY_PROTOCOL = 1001  # torch.serialization.PROTOCOL_VERSION
_PICKLE_PROTO_OPCODE = 0x80

# torch storage class name -> numpy dtype of one element (little-endian, as torch writes it).
# bfloat16 has no numpy dtype; it is read as uint16 and widened to float32 in _to_numpy.
_STORAGE_DTYPES: dict[str, np.dtype] = {
    "FloatStorage": np.dtype("<f4"),
    "DoubleStorage": np.dtype("<f8"),
    "HalfStorage": np.dtype("<f2"),
    "BFloat16Storage": np.dtype("<u2"),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}

# Keys under which training scripts commonly nest the state dict inside a larger checkpoint.
_NESTED_STATE_KEYS = ("state_dict", "model_state_dict", "model", "net", "weights")


@dataclass
class _Storage:
    """A storage named in the pickle; its bytes are attached after the pickle has been read."""

    key: str
    kind: str
    numel: int
    data: np.ndarray | None = None


@dataclass
class _LazyTensor:
    """A tensor whose storage bytes may not have been read yet (legacy format)."""

    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


class _StorageType:
    """Stand-in for ``torch.FloatStorage`` etc.: only its name is needed."""

    def __init__(self, name: str) -> None:
        self.name = name


def _rebuild_tensor(storage: _Storage, offset: int, shape: tuple, stride: tuple, *_: Any) -> Any:
    return _LazyTensor(storage, int(offset), tuple(int(s) for s in shape), tuple(stride))


def _rebuild_parameter(data: Any, *_: Any) -> Any:
    # nn.Parameter wraps a tensor; the weights are all that is wanted.
    return data


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    **{("torch", name): _StorageType(name) for name in _STORAGE_DTYPES},
}


class _CheckpointUnpickler(pickle.Unpickler):
    """Unpickler that resolves only whitelisted globals and records storages by key."""

    def __init__(self, file: BinaryIO, storages: dict[str, _Storage]) -> None:
        super().__init__(file)
        self._storages = storages

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise ValueError(
                f"checkpoint refers to {module}.{name}, which is not a tensor or container "
                "this reader accepts (only plain state dicts can be read)"
            ) from None

    def persistent_load(self, pid: Any) -> _Storage:
        # Legacy: ('storage', type, key, location, numel, view_metadata);
        # zip: ('storage', type, key, location, numel).
        if not isinstance(pid, tuple) or len(pid) < 5 or pid[0] != "storage":
            raise ValueError(f"unsupported persistent id in checkpoint: {pid!r:.80}")
        storage_type, key, _location, numel = pid[1:5]
        if len(pid) > 5 and pid[5] is not None:
            raise ValueError("storage views (pre-1.0 torch checkpoints) are not supported")
        if not isinstance(storage_type, _StorageType):
            raise ValueError(f"unsupported storage type in checkpoint: {storage_type!r:.80}")
        key = str(key)
        if key not in self._storages:
            self._storages[key] = _Storage(key, storage_type.name, int(numel))
        return self._storages[key]


def _to_numpy(tensor: _LazyTensor) -> np.ndarray:
    storage = tensor.storage
    if storage.data is None:
        raise ValueError(f"checkpoint is truncated: no data for storage {storage.key}")
    flat = storage.data
    itemsize = flat.dtype.itemsize
    needed = (
        tensor.offset
        + sum((n - 1) * s for n, s in zip(tensor.shape, tensor.stride, strict=True))
        + 1
    )
    if any(n == 0 for n in tensor.shape):
        array = np.zeros(tensor.shape, flat.dtype)
    elif needed > flat.size:
        raise ValueError(f"tensor reaches past the end of storage {storage.key}")
    else:
        array = np.lib.stride_tricks.as_strided(
            flat[tensor.offset :],
            shape=tensor.shape,
            strides=tuple(s * itemsize for s in tensor.stride),
            writeable=False,
        ).copy()
    if storage.kind == "BFloat16Storage":
        array = (array.astype(np.uint32) << 16).view(np.float32)
    return array


def _materialise(obj: Any) -> Any:
    """Replace every lazy tensor in a nest of dicts, lists and tuples by a numpy array."""
    if isinstance(obj, _LazyTensor):
        return _to_numpy(obj)
    if isinstance(obj, collections.OrderedDict):
        return collections.OrderedDict((k, _materialise(v)) for k, v in obj.items())
    if isinstance(obj, dict):
        return {k: _materialise(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_materialise(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_materialise(v) for v in obj)
    return obj


def _plain_load(file: BinaryIO, what: str) -> Any:
    """Load one of the legacy header pickles, which hold only numbers, strings and dicts."""

    class _NoGlobals(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            raise ValueError(f"unexpected {module}.{name} in checkpoint {what}")

    try:
        return _NoGlobals(file).load()
    except (pickle.UnpicklingError, EOFError) as exc:
        raise ValueError(f"not a PyTorch checkpoint: cannot read its {what} ({exc})") from exc


def _read_legacy(file: BinaryIO) -> Any:
    magic = _plain_load(file, "magic number")
    if magic != LEGACY_MAGIC:
        raise ValueError("not a PyTorch checkpoint: wrong magic number")
    protocol = _plain_load(file, "protocol version")
    if protocol != LEGACY_PROTOCOL:
        raise ValueError(f"unsupported PyTorch checkpoint protocol {protocol!r}")
    sys_info = _plain_load(file, "system info")
    if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
        raise ValueError("big-endian PyTorch checkpoints are not supported")

    storages: dict[str, _Storage] = {}
    try:
        obj = _CheckpointUnpickler(file, storages).load()
    except (pickle.UnpicklingError, EOFError) as exc:
        raise ValueError(f"corrupt PyTorch checkpoint: {exc}") from exc
    keys = _plain_load(file, "storage key list")
    if not isinstance(keys, list):
        raise ValueError("corrupt PyTorch checkpoint: storage key list is not a list")
    for key in keys:
        storage = storages.get(str(key))
        if storage is None:
            raise ValueError(f"corrupt PyTorch checkpoint: unknown storage {key!r}")
        dtype = _STORAGE_DTYPES[storage.kind]
        header = file.read(8)
        if len(header) != 8:
            raise ValueError("PyTorch checkpoint is truncated")
        (numel,) = struct.unpack("<q", header)
        if numel != storage.numel:
            raise ValueError(f"corrupt PyTorch checkpoint: storage {key} size mismatch")
        raw = file.read(numel * dtype.itemsize)
        if len(raw) != numel * dtype.itemsize:
            raise ValueError("PyTorch checkpoint is truncated")
        storage.data = np.frombuffer(raw, dtype=dtype)
    return _materialise(obj)


def _read_zip(archive: zipfile.ZipFile) -> Any:
    names = archive.namelist()
    pickles = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
        raise ValueError("not a PyTorch checkpoint: zip archive has no <root>/data.pkl")
    root = pickles[0][: -len("data.pkl")]
    byteorder = root + "byteorder"
    if byteorder in names and archive.read(byteorder).strip() != b"little":
        raise ValueError("big-endian PyTorch checkpoints are not supported")

    storages: dict[str, _Storage] = {}
    try:
        obj = _CheckpointUnpickler(io.BytesIO(archive.read(pickles[0])), storages).load()
    except (pickle.UnpicklingError, EOFError) as exc:
        raise ValueError(f"corrupt PyTorch checkpoint: {exc}") from exc
    for storage in storages.values():
        try:
            raw = archive.read(f"{root}data/{storage.key}")
        except KeyError:
            raise ValueError(f"PyTorch checkpoint lacks data for storage {storage.key}") from None
        dtype = _STORAGE_DTYPES[storage.kind]
        if len(raw) < storage.numel * dtype.itemsize:
            raise ValueError(f"PyTorch checkpoint storage {storage.key} is truncated")
        storage.data = np.frombuffer(raw, dtype=dtype, count=storage.numel)
    return _materialise(obj)


def read_checkpoint(path: str | Path) -> Any:
    """Read a ``torch.save`` file, turning every tensor into a numpy array.

    Parameters
    ----------
    path
        A ``.pth``/``.pt`` file in torch's legacy or zip format.

    Returns
    -------
    object
        The saved object (usually an ``OrderedDict`` state dict) with each tensor replaced by a
        C-contiguous ``np.ndarray`` of the tensor's shape and dtype (bfloat16 becomes float32).

    Raises
    ------
    ValueError
        If the file is not a PyTorch checkpoint, is truncated, or refers to Python objects other
        than tensors and plain containers.
    """
    path = Path(path)
    with path.open("rb") as file:
        head = file.read(4)
        file.seek(0)
        if head.startswith(b"PK"):
            try:
                with zipfile.ZipFile(file) as archive:
                    return _read_zip(archive)
            except zipfile.BadZipFile as exc:
                raise ValueError(f"{path.name} is not a PyTorch checkpoint: {exc}") from exc
        if not head or head[0] != _PICKLE_PROTO_OPCODE:
            raise ValueError(f"{path.name} is not a PyTorch checkpoint (neither zip nor pickle)")
        try:
            return _read_legacy(file)
        except ValueError as exc:
            raise ValueError(f"{path.name}: {exc}") from exc


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, np.ndarray) for k, v in obj.items())
    )


def load_state_dict(
    path: str | Path, *, key_filter: Callable[[str], bool] | None = None
) -> dict[str, np.ndarray]:
    """Read the state dict (parameter name -> array) out of a PyTorch checkpoint.

    Parameters
    ----------
    path
        A ``.pth``/``.pt`` file in torch's legacy or zip format.
    key_filter
        Optional predicate on parameter names; names it rejects are dropped (for instance
        ``lambda k: not k.endswith("num_batches_tracked")``).

    Returns
    -------
    dict[str, np.ndarray]
        Parameters in file order. A state dict nested under ``"state_dict"``, ``"model"`` etc. is
        found, and a ``"module."`` prefix left by ``DataParallel`` is stripped.

    Raises
    ------
    ValueError
        If the file is not a PyTorch checkpoint or holds no state dict of tensors.
    """
    obj = read_checkpoint(path)
    if not _is_state_dict(obj) and isinstance(obj, Mapping):
        for key in _NESTED_STATE_KEYS:
            if _is_state_dict(obj.get(key)):
                obj = obj[key]
                break
    if not _is_state_dict(obj):
        raise ValueError(f"{Path(path).name} holds no state dict of tensors")
    state = {k.removeprefix("module."): v for k, v in obj.items()}
    if key_filter is not None:
        state = {k: v for k, v in state.items() if key_filter(k)}
    log.debug("read %d tensors from %s", len(state), path)
    return state
