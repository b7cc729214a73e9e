"""Reading safetensors tensor bytes straight into model tensors, and safetensors <-> torch dtypes.

Reads go through unbuffered ``readinto`` calls (no memory map), so file pages never count towards the
process's resident memory and each tensor's bytes are copied once into their final place.
"""

from __future__ import annotations

import math

import torch

from parity.errors import CheckpointError
from parity.model import fp_formats as ff

#: Staging chunk when a tensor must be converted or moved to an accelerator (bytes).
READ_CHUNK_BYTES = 32 * 1024 * 1024

_TORCH_DTYPES = {
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E8M0": ff.SCALE_DTYPE,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "I64": torch.int64,
    "I32": torch.int32,
}
_FLOAT8_ST = ("F8_E4M3", "F8_E8M0")


def torch_dtype(st_dtype: str) -> torch.dtype:
    """torch dtype of a safetensors dtype string (F8_E4M3, F8_E8M0, I8, U8, BF16, F16, F32, I64, I32).

    F8 tensors are read as their bytes (uint8) where float8 tensors are forbidden
    (`parity.model.fp_formats.float8_tensors`).

    Raises:
        KeyError: a dtype the published layout does not use.
    """
    if st_dtype in _FLOAT8_ST and not ff.float8_tensors():
        return torch.uint8
    return _TORCH_DTYPES[st_dtype]


def _readinto(fh, offset: int, buf, fname: str, name: str) -> None:
    mv = memoryview(buf).cast("B")
    fh.seek(offset)
    got = 0
    while got < len(mv):
        k = fh.readinto(mv[got:])
        if not k:
            raise CheckpointError(
                f"shard {fname}: tensor {name!r} is cut short ({got} of {len(mv)} bytes); expected an intact shard"
            )
        got += k


def read_into(fh, offset: int, meta: dict, dst: torch.Tensor, fname: str, name: str) -> None:
    """Read one tensor from the open shard `fh` at byte `offset` into `dst`.

    Straight into `dst` when it is a contiguous CPU tensor of the file's dtype (1-byte integer / float8
    destinations are reinterpreted as the file's 1-byte dtype), else through `READ_CHUNK_BYTES` CPU
    staging buffers, converting dtype / copying to the device. `meta` is the tensor's header entry
    (``dtype``, ``shape``); `dst` has ``prod(shape)`` elements.

    Raises:
        CheckpointError: the shard ends before the tensor's bytes (naming shard and tensor).
    """
    file_dt = torch_dtype(meta["dtype"])
    shape = tuple(meta["shape"])
    if dst.dtype != file_dt and dst.element_size() == 1 and file_dt.itemsize == 1 and not dst.dtype.is_floating_point:
        dst = dst.view(file_dt)
    d = dst.detach()
    if d.device.type == "cpu" and d.dtype == file_dt and d.is_contiguous():
        _readinto(fh, offset, d.view(-1).view(torch.uint8).numpy(), fname, name)
        return
    rows = shape[0] if shape else 1
    row_elems = max(1, math.prod(shape[1:]))
    row_bytes = row_elems * file_dt.itemsize
    step = max(1, READ_CHUNK_BYTES // row_bytes)
    d2 = d.reshape(rows, row_elems)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        stage = torch.empty((r1 - r0) * row_elems, dtype=file_dt)
        _readinto(fh, offset + r0 * row_bytes, stage.view(torch.uint8).numpy(), fname, name)
        d2[r0:r1].copy_(stage.view(r1 - r0, row_elems))


def read_shard_into(fh, offset: int, meta: dict, dst: torch.Tensor, shard, fname: str, name: str) -> None:
    """Read part ``shard`` of one tensor from the open shard file `fh` into `dst` (its local shape).

    ``shard`` is a `parity.model.parallel_layers.Shard` ``(dim, [(start, stop), ...])`` (None = the whole
    tensor, `read_into`). Along dim 0 each range is one positioned read of exactly its bytes; along dim 1
    of a 2-D tensor (a row-parallel split) rows are read in `READ_CHUNK_BYTES` bands and their columns
    kept, so at most one band is staged.

    Raises:
        CheckpointError: the file ends before the tensor's bytes, or a split along a dim other than 0, or
            1 of a 2-D tensor (naming shard and tensor).
    """
    if shard is None:
        read_into(fh, offset, meta, dst, fname, name)
        return
    dim, parts = shard
    shape = tuple(meta["shape"])
    file_dt = torch_dtype(meta["dtype"])
    row_elems = max(1, math.prod(shape[1:]))
    row_bytes = row_elems * file_dt.itemsize
    if dim == 0:
        pos = 0
        for a, b in parts:
            sub = {"dtype": meta["dtype"], "shape": [b - a, *shape[1:]]}
            read_into(fh, offset + a * row_bytes, sub, dst.narrow(0, pos, b - a), fname, name)
            pos += b - a
        return
    if dim != 1 or len(shape) != 2:
        raise CheckpointError(
            f"shard {fname}: tensor {name!r} {list(shape)} cannot be read split along dim {dim}; "
            f"expected a split along dim 0, or dim 1 of a 2-D tensor"
        )
    if dst.dtype != file_dt and dst.element_size() == 1 and file_dt.itemsize == 1 and not dst.dtype.is_floating_point:
        dst = dst.view(file_dt)
    rows = shape[0]
    step = max(1, READ_CHUNK_BYTES // row_bytes)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        stage = torch.empty((r1 - r0) * row_elems, dtype=file_dt)
        _readinto(fh, offset + r0 * row_bytes, stage.view(torch.uint8).numpy(), fname, name)
        band = stage.view(r1 - r0, row_elems)
        pieces = [band[:, a:b] for a, b in parts]
        dst[r0:r1].copy_(pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1))
