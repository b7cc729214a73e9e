"""Low-precision number formats of DeepSeek-V4, as pure-torch codecs (CPU, CUDA, NPU alike).

Three formats appear in the published checkpoints and in the official inference code:

- **FP8 e4m3** (OCP "E4M3FN": 1 sign, 4 exponent, 3 mantissa bits, bias 7, no infinities, max +-448):
  the dense linear weights of deepseek-ai/DeepSeek-V4-Flash / -Pro (safetensors dtype ``F8_E4M3``,
  `torch.float8_e4m3fn`), and the run-time rounding of the non-RoPE part of every KV vector
  (DeepSeek's ``inference/model.py``: ``act_quant(kv[..., :-rd], 64, scale_fmt, ...)``).
- **FP4 e2m1** (OCP MX "E2M1": 1 sign, 2 exponent, 1 mantissa bit; magnitudes 0, 0.5, 1, 1.5, 2, 3, 4,
  6; no NaN/inf): the routed experts' weights, two values per byte, stored as safetensors ``I8`` with
  shape ``[out, in // 2]``; the **low nibble holds the even element** ``2j`` and the high nibble the odd
  element ``2j + 1`` (DeepSeek's ``inference/convert.py`` / ``kernel.py`` FP4 table and unpacking, the
  same order as PyTorch's ``float4_e2m1fn_x2`` and the OCP MX spec). Codes 0-7 are +0, 0.5, ..., 6 and
  codes 8-15 the same magnitudes with the sign bit (3) set; code 8 is negative zero.
- **UE8M0** (OCP MX "E8M0": an unsigned 8-bit exponent, value ``2 ** (byte - 127)``, byte 255 = NaN):
  every block scale of the release (safetensors ``F8_E8M0``, `torch.float8_e8m0fnu`). Representable
  scales are exactly the powers of two ``2**-127 .. 2**127``.

Block layouts (``config.json`` ``quantization_config.weight_block_size = [128, 128]``; release tensor
listing, e.g. ``layers.0.attn.wq_a.weight`` F8_E4M3 [1024, 4096] with ``layers.0.attn.wq_a.scale``
F8_E8M0 [8, 32], and ``layers.0.ffn.experts.0.w1.weight`` I8 [2048, 2048] with ``.scale`` F8_E8M0
[2048, 128] for V4-Flash):

- FP8 weights: one scale per 128 x 128 tile, scale shape ``[ceil(out / 128), ceil(in / 128)]``;
- FP4 experts: one scale per 1 x 32 run along the input dimension, scale shape ``[out, in / 32]``;
- FP8 activation / KV rounding: 1 x 64 blocks along the last dimension (official `act_quant(x, 64, "ue8m0")`);
- FP4 indexer rounding: 1 x 32 blocks along the last dimension (official `fp4_act_quant(x, 32)`).

Scale choice (DeepSeek's ``kernel.py`` ``act_quant`` with ``scale_fmt="ue8m0"`` and ``fp4_act_quant``):
``s = 2 ** ceil(log2(amax / fmt_max))`` with ``amax`` clamped below (1e-4 for FP8, ``6 * 2**-126`` for
FP4) so an all-zero block gets a finite scale and decodes to exact zeros; values are then divided by
``s``, clamped to ``+-fmt_max`` and rounded to nearest, ties to even. We compute the power of two
exactly with `torch.frexp` (no floating-point ``log2``), so a block whose ``amax / fmt_max`` is
already a power of two keeps that scale.

All functions accept tensors on any device and return tensors on the same device.

Devices without FP8 (Ascend 910B/910C, or any device under ``PARITY_DEVICE_NO_FP8=1``): when
`float8_tensors` is False, no float8 tensor is ever created here: FP8 e4m3 codes and UE8M0 scales are
returned as their raw bytes (uint8), encoded with float32 exponent/mantissa arithmetic and decoded with a
256-entry table, bit-identical to torch's float8 casts (round to nearest even, saturating after the
clamp to +-448).
"""

from __future__ import annotations

import torch

from parity.devices.capability_table import no_fp8_requested

#: Largest finite FP8 e4m3fn magnitude (OCP 8-bit floating point spec, E4M3: S.1111.110 = 448).
FP8_E4M3_MAX = 448.0
#: Largest FP4 e2m1 magnitude (OCP MX spec v1.0, E2M1: S.11.1 = 6).
FP4_E2M1_MAX = 6.0
#: Magnitudes of the eight FP4 e2m1 codes 0..7 (codes 8..15 are their negatives).
FP4_E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
#: Decoded value of each of the 16 FP4 e2m1 codes (code 8 is -0.0).
FP4_E2M1_VALUES = FP4_E2M1_MAGNITUDES + tuple(-v for v in FP4_E2M1_MAGNITUDES)
#: UE8M0: value = 2 ** (byte - UE8M0_BIAS); byte 255 is NaN (OCP MX spec v1.0, E8M0).
UE8M0_BIAS = 127
UE8M0_NAN = 255
UE8M0_MIN_EXP = -127
UE8M0_MAX_EXP = 127
#: amax floor of FP8 block scales (DeepSeek kernel.py act_quant: ``amax = max(|x|, 1e-4)``).
FP8_AMAX_FLOOR = 1e-4
#: amax floor of FP4 block scales (DeepSeek kernel.py fp4_act_quant: ``max(|x|, 6 * 2**-126)``).
FP4_AMAX_FLOOR = 6.0 * 2.0**-126

#: Block shape of the release's FP8 weights (config.json quantization_config.weight_block_size).
FP8_WEIGHT_BLOCK = (128, 128)
#: Block size of the release's FP4 expert weights along the input dimension (1 x 32).
FP4_WEIGHT_BLOCK = 32
#: Block size of the run-time FP8 KV rounding (DeepSeek inference/model.py: act_quant(..., 64, ...)).
FP8_KV_BLOCK = 64
#: Block size of the run-time FP4 indexer rounding (DeepSeek inference/model.py: fp4_block_size = 32).
FP4_ACT_BLOCK = 32

FP8_DTYPE = torch.float8_e4m3fn
SCALE_DTYPE = getattr(torch, "float8_e8m0fnu", torch.uint8)

_FLOAT8_OFF = [False]


def set_float8_tensors(enabled: bool) -> None:
    """Allow (True) or forbid (False) float8 tensors in this process; the checkpoint loaders forbid them
    when the target device has none (`parity.devices.float8_tensors`). ``PARITY_DEVICE_NO_FP8=1``
    forbids them regardless."""
    _FLOAT8_OFF[0] = not enabled


def float8_tensors() -> bool:
    """Whether the codecs may create float8 tensors (else FP8 / UE8M0 data is returned as uint8 bytes)."""
    return not (_FLOAT8_OFF[0] or no_fp8_requested())


def fp8_storage_dtype() -> torch.dtype:
    """dtype FP8 e4m3 codes are stored in: float8_e4m3fn, or uint8 where float8 tensors are forbidden."""
    return FP8_DTYPE if float8_tensors() else torch.uint8


def scale_dtype() -> torch.dtype:
    """dtype UE8M0 scales are stored in: float8_e8m0fnu, or uint8 where float8 tensors are forbidden."""
    return SCALE_DTYPE if float8_tensors() else torch.uint8


def _scale_bytes(b: torch.Tensor) -> torch.Tensor:
    """UE8M0 bytes (uint8) as the scale storage dtype."""
    return b.view(SCALE_DTYPE) if float8_tensors() else b


_FP4_MAG_CACHE: dict[tuple[str, torch.dtype], torch.Tensor] = {}


def _fp4_table(device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    key = (str(device), dtype)
    t = _FP4_MAG_CACHE.get(key)
    if t is None:
        t = torch.tensor(FP4_E2M1_VALUES, dtype=dtype, device=device)
        _FP4_MAG_CACHE[key] = t
    return t


# ----------------------------------------------------------------------------------------- FP8 e4m3
def fp8_e4m3_encode(x: torch.Tensor) -> torch.Tensor:
    """Round to FP8 e4m3fn, nearest-even, saturating at +-448 (NaN stays NaN).

    Args:
        x: any shape, any float dtype (values already divided by their scale).
    Returns:
        Same shape, dtype `torch.float8_e4m3fn`; raw bytes (uint8, `fp8_e4m3_encode_bytes`) where
        float8 tensors are forbidden (`float8_tensors`).
    """
    if not float8_tensors():
        return fp8_e4m3_encode_bytes(x)
    return x.float().clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(FP8_DTYPE)


#: Smallest normal FP8 e4m3 exponent (OCP E4M3: bias 7, exponent field 1 -> 2**-6) and mantissa bits.
_E4M3_MIN_EXP, _E4M3_MANT = -6, 3


def fp8_e4m3_encode_bytes(x: torch.Tensor) -> torch.Tensor:
    """FP8 e4m3fn bytes (uint8) of x, without float8 dtypes; bit-identical to
    ``x.float().clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8)``.

    With |x| = m * 2**E (1 <= m < 2) and E' = max(E, -6), the magnitude code is
    ``8 * (E' + 6) + round_half_even(|x| * 2**(3 - E'))``: the rounded significand (8..16) carries into
    the exponent field by itself, and below 2**-6 the same formula gives the subnormal codes.
    NaN -> 0x7F (0xFF with the sign bit), as torch's cast.
    """
    xf = x.float().clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX)
    mag = xf.abs()
    _, k = torch.frexp(mag)  # mag = f * 2**k, 0.5 <= f < 1 -> E = k - 1
    e = torch.where(mag < 2.0**_E4M3_MIN_EXP, torch.full_like(k, _E4M3_MIN_EXP), k - 1)  # zero, subnormals
    sig = torch.round(torch.ldexp(mag, _E4M3_MANT - e))  # exact scaling by a power of two, ties to even
    code = ((e - _E4M3_MIN_EXP) * 8 + sig.to(torch.int32)).to(torch.int32)
    code = torch.where(torch.isnan(xf), torch.full_like(code, 0x7F), code)
    return (code | (torch.signbit(xf).to(torch.int32) << 7)).to(torch.uint8)


_E4M3_TABLE: dict[tuple[str, torch.dtype], torch.Tensor] = {}


def _e4m3_table(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Decoded value of each of the 256 FP8 e4m3fn bytes (0x7F / 0xFF = NaN), built with integer math."""
    key = (str(device), dtype)
    t = _E4M3_TABLE.get(key)
    if t is None:
        b = torch.arange(256, dtype=torch.int32)
        ef, mf = (b >> 3) & 0xF, b & 7
        sub = torch.ldexp(mf.float(), torch.full_like(b, _E4M3_MIN_EXP - _E4M3_MANT))  # m * 2**-9
        norm = torch.ldexp((mf + 8).float(), ef - 7 - _E4M3_MANT)  # (8+m) * 2**(e-10)
        v = torch.where(ef == 0, sub, norm)
        v = torch.where((b & 0x7F) == 0x7F, torch.full_like(v, float("nan")), v)
        v = torch.where(b >= 128, -v, v)
        t = v.to(device=device, dtype=dtype)
        _E4M3_TABLE[key] = t
    return t


def fp8_e4m3_decode(q: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """FP8 e4m3fn (dtype float8_e4m3fn, or its raw bytes as uint8/int8) -> `dtype`, exact.

    Raw bytes are decoded with a 256-entry table where float8 tensors are forbidden."""
    if q.dtype in (torch.uint8, torch.int8):
        if not float8_tensors():
            return _e4m3_table(q.device, torch.float32)[q.view(torch.uint8).long()].to(dtype)
        q = q.view(torch.uint8).view(FP8_DTYPE)
    return q.to(dtype)


# ------------------------------------------------------------------------------------------- UE8M0
def pow2_ceil_exponent(x: torch.Tensor) -> torch.Tensor:
    """Smallest integer e with ``2**e >= x`` for positive finite x, computed exactly (int32).

    Uses `torch.frexp` (x = m * 2**k, 0.5 <= m < 1): e = k - 1 when m == 0.5, else k.
    """
    m, k = torch.frexp(x.float())
    return torch.where(m == 0.5, k - 1, k).to(torch.int32)


def ue8m0_encode(scale: torch.Tensor, rounding: str = "ceil") -> torch.Tensor:
    """Encode positive scales as UE8M0 (byte = exponent + 127).

    Args:
        scale: positive floats, any shape.
        rounding: "ceil" (round up to the next power of two, as DeepSeek's kernels do) or "exact"
            (every value must already be a power of two).
    Returns:
        Same shape, dtype `torch.float8_e8m0fnu` (uint8 on torch without it).
    Raises:
        ValueError: rounding unknown; a scale <= 0, NaN or inf; with "exact", a value that is not a
            power of two; an exponent outside [-127, 127] (UE8M0 range).
    """
    if rounding not in ("ceil", "exact"):
        raise ValueError(f"rounding must be 'ceil' or 'exact', got {rounding!r}")
    s = scale.float()
    if s.numel() and not bool(torch.isfinite(s).all() and (s > 0).all()):
        raise ValueError("UE8M0 scales must be positive and finite")
    e = pow2_ceil_exponent(s)
    if rounding == "exact" and s.numel():
        if not bool((torch.ldexp(torch.ones_like(s), e) == s).all()):
            raise ValueError("UE8M0 'exact' encoding needs powers of two; got a value that is not")
    if s.numel() and bool(((e < UE8M0_MIN_EXP) | (e > UE8M0_MAX_EXP)).any()):
        raise ValueError(f"UE8M0 exponent out of range [{UE8M0_MIN_EXP}, {UE8M0_MAX_EXP}]")
    return _scale_bytes((e + UE8M0_BIAS).to(torch.uint8))


def ue8m0_decode(code: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """UE8M0 (float8_e8m0fnu or raw uint8 bytes) -> `dtype`: ``2 ** (byte - 127)``, byte 255 -> NaN.

    Exact for every byte in float32 (2**-127 is a float32 subnormal); in bf16/fp16 small exponents
    may flush, so decode to float32 before multiplying if in doubt.
    """
    b = code.view(torch.uint8).to(torch.int32) if code.dtype != torch.uint8 else code.to(torch.int32)
    v = torch.ldexp(torch.ones(b.shape, dtype=torch.float32, device=b.device), b - UE8M0_BIAS)
    v = torch.where(b == UE8M0_NAN, torch.full_like(v, float("nan")), v)
    return v.to(dtype)


def block_scale_exponent(amax: torch.Tensor, fmt_max: float, amax_floor: float) -> torch.Tensor:
    """Exponent e (int32) of the power-of-two block scale ``2**e = 2**ceil(log2(max(amax, floor)/fmt_max))``.

    Clamped to the UE8M0 range [-127, 127]. Source: DeepSeek kernel.py ``act_quant`` (ue8m0 scale_fmt)
    and ``fp4_act_quant``.
    """
    a = amax.float().clamp_min(amax_floor) / fmt_max
    return pow2_ceil_exponent(a).clamp(UE8M0_MIN_EXP, UE8M0_MAX_EXP)


# ------------------------------------------------------------------------------------------ FP4 e2m1
def fp4_e2m1_encode(x: torch.Tensor) -> torch.Tensor:
    """Round to FP4 e2m1 codes (uint8 in 0..15), nearest with ties to even, saturating at +-6.

    Ties go to the code with an even mantissa (OCP MX spec: roundTiesToEven), e.g. 0.25 -> 0,
    0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4. The sign bit (bit 3) is copied from
    x, so -0.0 and tiny negatives encode as code 8 (negative zero). NaN encodes as +-6 (FP4 has no
    NaN; callers never feed NaN).

    Args:
        x: any shape, any float dtype (values already divided by their scale).
    Returns:
        uint8 codes, same shape.
    """
    xf = x.float()
    mag = torch.nan_to_num(xf.abs(), nan=FP4_E2M1_MAX).clamp_max(FP4_E2M1_MAX)
    grid = _fp4_table(x.device)[:8]
    hi = torch.searchsorted(grid, mag.contiguous(), right=False).clamp(0, 7)  # first grid >= mag
    lo = (hi - 1).clamp_min(0)
    d_hi = grid[hi] - mag
    d_lo = mag - grid[lo]
    take_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (hi % 2 == 0))
    code = torch.where(take_hi, hi, lo).to(torch.uint8)
    sign = torch.signbit(xf).to(torch.uint8) << 3
    return code | sign


def fp4_e2m1_decode(codes: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """FP4 codes (uint8 0..15) -> values in `dtype` (code 8 -> -0.0)."""
    return _fp4_table(codes.device, dtype)[codes.long() & 0xF]


def fp4_pack(codes: torch.Tensor) -> torch.Tensor:
    """Pack FP4 codes two per byte along the last dimension: byte j = code[2j] | code[2j+1] << 4.

    Args:
        codes: uint8 [..., K] with K even.
    Returns:
        uint8 [..., K // 2] (write it as int8 ``.view(torch.int8)`` for the release's I8 dtype).
    Raises:
        ValueError: K odd.
    """
    if codes.shape[-1] % 2:
        raise ValueError(f"FP4 packing needs an even last dimension, got {codes.shape[-1]}")
    c = codes.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def fp4_unpack(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `fp4_pack`: uint8/int8 [..., K/2] -> uint8 codes [..., K] (low nibble first)."""
    b = packed.view(torch.uint8) if packed.dtype != torch.uint8 else packed
    return torch.stack((b & 0xF, b >> 4), dim=-1).flatten(-2)


# ------------------------------------------------------------------------------- block quantization
def _check_block(name: str, size: int, block: int) -> None:
    if size % block:
        raise ValueError(f"{name} ({size}) must be a multiple of the block size {block}")


def quantize_fp8_weight(
    w: torch.Tensor, block: tuple[int, int] = FP8_WEIGHT_BLOCK
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a weight to FP8 e4m3 with one UE8M0 scale per ``block`` tile (release layout).

    Args:
        w: [out, in] float (partial edge tiles allowed, as in the release).
        block: tile shape (rows, cols); the release uses (128, 128).
    Returns:
        (q, scale): q float8_e4m3fn [out, in]; scale float8_e8m0fnu [ceil(out/br), ceil(in/bc)].
    """
    if w.dim() != 2:
        raise ValueError(f"FP8 weight must be 2-D [out, in], got shape {tuple(w.shape)}")
    br, bc = block
    n, k = w.shape
    nb, kb = -(-n // br), -(-k // bc)
    wf = torch.nn.functional.pad(w.float(), (0, kb * bc - k, 0, nb * br - n))
    tiles = wf.view(nb, br, kb, bc)
    amax = tiles.abs().amax(dim=(1, 3))
    e = block_scale_exponent(amax, FP8_E4M3_MAX, FP8_AMAX_FLOOR)
    s = torch.ldexp(torch.ones_like(amax), e)
    q = fp8_e4m3_encode(tiles / s[:, None, :, None]).view(nb * br, kb * bc)[:n, :k].contiguous()
    return q, _scale_bytes((e + UE8M0_BIAS).to(torch.uint8))


def dequantize_fp8_weight(
    q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] = FP8_WEIGHT_BLOCK, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """FP8 weight [out, in] + UE8M0 tile scales [ceil(out/br), ceil(in/bc)] -> `dtype` [out, in].

    Raises:
        ValueError: scale shape does not match the weight and block.
    """
    br, bc = block
    n, k = q.shape[-2], q.shape[-1]
    want = (-(-n // br), -(-k // bc))
    if tuple(scale.shape[-2:]) != want:
        raise ValueError(
            f"FP8 scale shape {tuple(scale.shape)} does not match weight {tuple(q.shape)} "
            f"with block {block}: expected {want}"
        )
    s = ue8m0_decode(scale).repeat_interleave(br, dim=-2).repeat_interleave(bc, dim=-1)[..., :n, :k]
    return (fp8_e4m3_decode(q) * s).to(dtype)


def quantize_fp4_weight(w: torch.Tensor, block: int = FP4_WEIGHT_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize weights to packed FP4 e2m1 with one UE8M0 scale per 1 x ``block`` run (release layout).

    Args:
        w: [..., out, in] float, ``in`` a multiple of ``block``.
    Returns:
        (packed, scale): packed uint8 [..., out, in // 2] (low nibble = even column);
        scale float8_e8m0fnu [..., out, in // block].
    Raises:
        ValueError: ``in`` not a multiple of ``block``.
    """
    k = w.shape[-1]
    _check_block("FP4 weight input dimension", k, block)
    runs = w.float().unflatten(-1, (k // block, block))
    amax = runs.abs().amax(dim=-1)
    e = block_scale_exponent(amax, FP4_E2M1_MAX, FP4_AMAX_FLOOR)
    s = torch.ldexp(torch.ones_like(amax), e)
    codes = fp4_e2m1_encode(runs / s[..., None]).flatten(-2)
    return fp4_pack(codes), _scale_bytes((e + UE8M0_BIAS).to(torch.uint8))


def dequantize_fp4_weight(
    packed: torch.Tensor, scale: torch.Tensor, block: int = FP4_WEIGHT_BLOCK, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Packed FP4 [..., out, in/2] + UE8M0 scales [..., out, in/block] -> `dtype` [..., out, in].

    Raises:
        ValueError: scale shape does not match.
    """
    k = packed.shape[-1] * 2
    want = tuple(packed.shape[:-1]) + (k // block,)
    if k % block or tuple(scale.shape) != want:
        raise ValueError(
            f"FP4 scale shape {tuple(scale.shape)} does not match packed weight "
            f"{tuple(packed.shape)} with 1x{block} blocks: expected {want}"
        )
    vals = fp4_e2m1_decode(fp4_unpack(packed)).unflatten(-1, (k // block, block))
    return (vals * ue8m0_decode(scale)[..., None]).flatten(-2).to(dtype)


# ------------------------------------------------------------------- activation / KV block rounding
def quantize_fp8_lastdim(x: torch.Tensor, block: int = FP8_KV_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 e4m3 quantization in 1 x ``block`` runs along the last dim with UE8M0 power-of-two scales.

    Args:
        x: [..., D], D a multiple of ``block``.
    Returns:
        (q float8_e4m3fn [..., D], scale float8_e8m0fnu [..., D // block]).
    Raises:
        ValueError: D not a multiple of ``block``.
    """
    d = x.shape[-1]
    _check_block("last dimension", d, block)
    runs = x.float().unflatten(-1, (d // block, block))
    e = block_scale_exponent(runs.abs().amax(dim=-1), FP8_E4M3_MAX, FP8_AMAX_FLOOR)
    s = torch.ldexp(torch.ones(e.shape, dtype=torch.float32, device=x.device), e)
    q = fp8_e4m3_encode(runs / s[..., None]).flatten(-2)
    return q, _scale_bytes((e + UE8M0_BIAS).to(torch.uint8))


def dequantize_fp8_lastdim(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of `quantize_fp8_lastdim`: [..., D] fp8 + [..., D/block] UE8M0 -> `dtype` [..., D]."""
    d, nb = q.shape[-1], scale.shape[-1]
    vals = fp8_e4m3_decode(q).unflatten(-1, (nb, d // nb))
    return (vals * ue8m0_decode(scale)[..., None]).flatten(-2).to(dtype)


def fp8_round_lastdim(x: torch.Tensor, block: int = FP8_KV_BLOCK) -> torch.Tensor:
    """Round x through FP8 e4m3 in 1 x ``block`` runs (UE8M0 scales) and back, keeping x's dtype.

    The run-time KV rounding of DeepSeek's ``inference/model.py`` (``act_quant(kv[..., :-rd], 64,
    "ue8m0", ..., inplace=True)``), applied to the non-RoPE part by the caller.
    """
    q, s = quantize_fp8_lastdim(x, block)
    return dequantize_fp8_lastdim(q, s, x.dtype)


def quantize_fp4_lastdim(x: torch.Tensor, block: int = FP4_ACT_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """FP4 e2m1 codes (uint8, unpacked) in 1 x ``block`` runs along the last dim, UE8M0 scales.

    Returns:
        (codes uint8 [..., D], scale float8_e8m0fnu [..., D // block]).
    """
    d = x.shape[-1]
    _check_block("last dimension", d, block)
    runs = x.float().unflatten(-1, (d // block, block))
    e = block_scale_exponent(runs.abs().amax(dim=-1), FP4_E2M1_MAX, FP4_AMAX_FLOOR)
    s = torch.ldexp(torch.ones(e.shape, dtype=torch.float32, device=x.device), e)
    codes = fp4_e2m1_encode(runs / s[..., None]).flatten(-2)
    return codes, _scale_bytes((e + UE8M0_BIAS).to(torch.uint8))


def fp4_round_lastdim(x: torch.Tensor, block: int = FP4_ACT_BLOCK) -> torch.Tensor:
    """Round x through FP4 e2m1 in 1 x ``block`` runs (UE8M0 scales) and back, keeping x's dtype.

    The indexer's FP4 simulation of DeepSeek's ``inference/model.py`` (``fp4_act_quant(x, 32, True)``).
    """
    d = x.shape[-1]
    codes, s = quantize_fp4_lastdim(x, block)
    vals = fp4_e2m1_decode(codes).unflatten(-1, (d // block, block))
    return (vals * ue8m0_decode(s)[..., None]).flatten(-2).to(x.dtype)
