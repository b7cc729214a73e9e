"""DeepSeek-V4's quantization-aware inference steps, as used by `parity.model`.

1. FP8 KV: the non-RoPE part of every KV vector (sliding-window KV and compressed KV) goes through
   FP8 e4m3 in blocks of 64 values with a power-of-two (UE8M0) scale per block; the RoPE part stays in
   the compute dtype. Source: DeepSeek ``inference/model.py`` ``Attention.forward`` /
   ``Compressor.forward``: ``act_quant(kv[..., :-rd], 64, scale_fmt, scale_dtype, True)``.
2. FP4 indexer: the lightning indexer's queries (after RoPE) and compressed keys (after norm + RoPE)
   are rotated by the normalised Walsh-Hadamard transform (``rotate_activation``, scale d^-1/2) and
   rounded through FP4 e2m1 in blocks of 32 with UE8M0 scales (``fp4_act_quant(x, 32, True)``).

The rounding primitives are the codecs of `parity.model.fp_formats` (hand-value tested there). Here:
how the model applies them, plus the packed cache row formats: FP8 KV rows (``kv_cache_dtype="fp8"``,
`KVCodec`) and FP4 indexer-key rows (``indexer_dtype="fp4"``, `IndexCodec`).
Where the head's non-RoPE width is not a multiple of 64 (small test models), the last block is
shorter (zero padding does not change a block's amax), the official code asserts it never happens.
The official code runs these steps on bf16 tensors; in a float32 model parity runs them in float32.
"""

from __future__ import annotations

import torch

from parity.errors import ConfigError
from parity.model import fp_formats as ff

FP8_BLOCK = ff.FP8_KV_BLOCK  # 64 (official act_quant block for KV)
FP4_BLOCK = ff.FP4_ACT_BLOCK  # 32 (official fp4_act_quant block)


def _padded(x: torch.Tensor, block: int) -> tuple[torch.Tensor, int]:
    d = x.shape[-1]
    pad = (-d) % block
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x, d


def fp8_round(x: torch.Tensor, block: int = FP8_BLOCK) -> torch.Tensor:
    """Round x [..., d] through FP8 e4m3 in blocks of ``block`` along the last dim (UE8M0 scales, values
    clamped to +-448, nearest-even), back to x's dtype. A ragged last block is allowed."""
    xp, d = _padded(x, block)
    return ff.fp8_round_lastdim(xp, block)[..., :d]


def fp4_round(x: torch.Tensor, block: int = FP4_BLOCK) -> torch.Tensor:
    """Round x [..., d] through FP4 e2m1 in blocks of ``block`` (UE8M0 scales, clamp +-6, ties to even)."""
    xp, d = _padded(x, block)
    return ff.fp4_round_lastdim(xp, block)[..., :d]


def fp8_round_kv(kv: torch.Tensor, rope_dim: int) -> torch.Tensor:
    """The official KV rounding: FP8 on kv[..., :-rope_dim] (blocks of 64), RoPE part untouched.
    kv: [..., head_dim] -> same shape and dtype."""
    nope = kv.shape[-1] - rope_dim
    return torch.cat([fp8_round(kv[..., :nope]), kv[..., nope:]], dim=-1)


_HADAMARD: dict[tuple, torch.Tensor] = {}


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """Normalised Walsh-Hadamard transform along the last dim (size a power of two): y = x H / sqrt(d),
    H the Sylvester Hadamard matrix (official ``rotate_activation``: ``hadamard_transform(x, d**-0.5)``).

    Raises:
        ConfigError: the last dim is not a power of two (``index_head_dim`` must be one).
    """
    d = x.shape[-1]
    if d & (d - 1):
        raise ConfigError(
            f"config field 'index_head_dim' ({d}) must be a power of two for the FP4 indexer (Hadamard rotation)"
        )
    key = (d, x.device, torch.float32)
    h = _HADAMARD.get(key)
    if h is None:
        h = torch.ones(1, 1, dtype=torch.float32, device=x.device)
        while h.shape[0] < d:
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        h = h * d**-0.5
        _HADAMARD[key] = h
    return (x.float() @ h).to(x.dtype)


def fp4_round_index(x: torch.Tensor) -> torch.Tensor:
    """The official indexer simulation: Hadamard rotation, then FP4 rounding in blocks of 32.
    x: [..., index_head_dim] (queries after RoPE or compressed keys after norm + RoPE)."""
    return fp4_round(hadamard(x))


class KVCodec:
    """How KV rows (window and compressed entries, [n, head_dim]) are stored in the cache.

    ``fp8=False``: stored as is, in the compute dtype (row = head_dim values).
    ``fp8=True``: one uint8 row per vector: ``[rope part (rope_dim values of the compute dtype, raw
    bytes) | non-RoPE part as FP8 e4m3 (1 byte each) | one UE8M0 scale byte per block of 64 | padding
    to a multiple of the compute dtype's size]`` - e.g. V4-Flash bf16: 128 + 448 + 7 (+1) = 584 bytes
    instead of 1024. Decoding gives exactly `fp8_round_kv` of the original vector.
    """

    def __init__(self, head_dim: int, rope_dim: int, dtype: torch.dtype, fp8: bool):
        self.head_dim, self.rope_dim, self.dtype, self.fp8 = head_dim, rope_dim, dtype, fp8
        self.esize = torch.empty(0, dtype=dtype).element_size()
        self.nope = head_dim - rope_dim
        self.nblocks = -(-self.nope // FP8_BLOCK)
        raw = rope_dim * self.esize + self.nope + self.nblocks
        self.row_bytes = -(-raw // self.esize) * self.esize

    @property
    def storage(self) -> tuple[int, torch.dtype]:
        """(row width, storage dtype) of one stored vector."""
        return (self.row_bytes, torch.uint8) if self.fp8 else (self.head_dim, self.dtype)

    def encode(self, kv: torch.Tensor) -> torch.Tensor:
        """kv [n, head_dim] -> stored rows [n, width]."""
        if not self.fp8:
            return kv.to(self.dtype)
        n = kv.shape[0]
        rb = self.rope_dim * self.esize
        out = torch.zeros((n, self.row_bytes), dtype=torch.uint8, device=kv.device)
        out[:, :rb] = kv[:, self.nope :].to(self.dtype).contiguous().view(torch.uint8)
        nope, _ = _padded(kv[:, : self.nope], FP8_BLOCK)
        q, s = ff.quantize_fp8_lastdim(nope, FP8_BLOCK)
        out[:, rb : rb + self.nope] = q[:, : self.nope].view(torch.uint8)
        out[:, rb + self.nope : rb + self.nope + self.nblocks] = s.view(torch.uint8)
        return out

    def decode(self, rows: torch.Tensor) -> torch.Tensor:
        """Stored rows [n, width] -> kv [n, head_dim] in the compute dtype."""
        if not self.fp8:
            return rows
        n = rows.shape[0]
        rb = self.rope_dim * self.esize
        rope = rows[:, :rb].contiguous().view(self.dtype)
        q = torch.zeros((n, self.nblocks * FP8_BLOCK), dtype=torch.uint8, device=rows.device)
        q[:, : self.nope] = rows[:, rb : rb + self.nope]
        s = rows[:, rb + self.nope : rb + self.nope + self.nblocks].contiguous().view(ff.scale_dtype())
        nope = ff.dequantize_fp8_lastdim(q.view(ff.fp8_storage_dtype()), s, self.dtype)[:, : self.nope]
        return torch.cat([nope, rope], dim=-1)


class IndexCodec:
    """How the lightning indexer's compressed keys ([n, index_head_dim]) are stored in the cache.

    ``fp4=False``: stored as is, in the compute dtype (row = index_head_dim values).
    ``fp4=True``: one uint8 row per key: ``[FP4 e2m1 codes, two per byte (low nibble first, `fp_formats.
    fp4_pack`) | one UE8M0 scale byte per block of 32]`` - e.g. V4-Flash (index_head_dim 128):
    64 + 4 = 68 bytes instead of 256 in bf16. ``encode`` takes the Hadamard-rotated keys (official
    ``rotate_activation``) and does the FP4 rounding itself (``fp4_act_quant(x, 32, True)``);
    ``decode`` returns exactly `fp4_round` of them (same operations, bit for bit), so the stored keys
    are the official rounded keys, losslessly packed. Keys that are already rounded encode to the same
    values (re-rounding an FP4-rounded block is exact in float32/bf16).
    A last block shorter than 32 (index_head_dim < 32, test models only) is zero padded, as in `fp4_round`.
    """

    def __init__(self, index_head_dim: int, dtype: torch.dtype, fp4: bool):
        self.dim, self.dtype, self.fp4 = index_head_dim, dtype, fp4
        self.nblocks = -(-index_head_dim // FP4_BLOCK)
        self.code_bytes = -(-index_head_dim // 2)
        self.row_bytes = self.code_bytes + self.nblocks

    @property
    def storage(self) -> tuple[int, torch.dtype]:
        """(row width, storage dtype) of one stored key."""
        return (self.row_bytes, torch.uint8) if self.fp4 else (self.dim, self.dtype)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Keys [n, index_head_dim] (rotated, when fp4) -> stored rows [n, width]."""
        if not self.fp4:
            return x.to(self.dtype)
        xp, _ = _padded(x, FP4_BLOCK)
        codes, s = ff.quantize_fp4_lastdim(xp, FP4_BLOCK)
        return torch.cat([ff.fp4_pack(codes)[:, : self.code_bytes], s.view(torch.uint8)], dim=-1)

    def decode(self, rows: torch.Tensor) -> torch.Tensor:
        """Stored rows [n, width] -> keys [n, index_head_dim] in the compute dtype."""
        if not self.fp4:
            return rows
        n = rows.shape[0]
        packed = rows[:, : self.code_bytes]
        full = self.nblocks * FP4_BLOCK // 2
        if full > self.code_bytes:
            packed = torch.nn.functional.pad(packed, (0, full - self.code_bytes))
        vals = ff.fp4_e2m1_decode(ff.fp4_unpack(packed)).view(n, self.nblocks, FP4_BLOCK)
        s = ff.ue8m0_decode(rows[:, self.code_bytes :].contiguous())
        return (vals * s[..., None]).flatten(-2).to(self.dtype)[:, : self.dim]
