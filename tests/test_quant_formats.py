"""FP8 e4m3 / FP4 e2m1 / UE8M0 codecs against hand-computed values."""

import math

import pytest
import torch

from parity.model import fp_formats as ff


# ------------------------------------------------------------------------------------------- FP8
def test_fp8_e4m3_hand_values():
    # e4m3fn: 1.0 = 0x38, 448 = 0x7E (S.1111.110), smallest subnormal 2**-9 = 0x01, -2 = 0xC0
    x = torch.tensor([1.0, 448.0, 2.0**-9, -2.0, 0.0, -0.0])
    q = ff.fp8_e4m3_encode(x)
    assert q.dtype == torch.float8_e4m3fn
    assert q.view(torch.uint8).tolist() == [0x38, 0x7E, 0x01, 0xC0, 0x00, 0x80]
    assert ff.fp8_e4m3_decode(q).tolist() == [1.0, 448.0, 2.0**-9, -2.0, 0.0, -0.0]


def test_fp8_e4m3_saturates_and_rounds_to_nearest_even():
    x = torch.tensor([449.0, 1e6, -500.0, float("inf"), -float("inf")])
    assert ff.fp8_e4m3_decode(ff.fp8_e4m3_encode(x)).tolist() == [448.0, 448.0, -448.0, 448.0, -448.0]
    # between 1 and 2 the step is 1/8: 1.0625 ties -> 1.0 (even), 1.1875 ties -> 1.25 (even mantissa 2)
    x = torch.tensor([1.0625, 1.1875, 1.07])
    assert ff.fp8_e4m3_decode(ff.fp8_e4m3_encode(x)).tolist() == [1.0, 1.25, 1.125]
    # raw bytes decode too
    assert ff.fp8_e4m3_decode(torch.tensor([0x38], dtype=torch.uint8)).item() == 1.0


# ----------------------------------------------------------------------------------------- UE8M0
def test_ue8m0_encode_decode_hand_values():
    s = torch.tensor([1.0, 2.0, 0.25, 2.0**-127, 2.0**127])
    code = ff.ue8m0_encode(s, rounding="exact")
    assert code.view(torch.uint8).tolist() == [127, 128, 125, 0, 254]
    assert ff.ue8m0_decode(code).tolist() == s.tolist()
    # byte 255 is NaN
    assert math.isnan(ff.ue8m0_decode(torch.tensor([255], dtype=torch.uint8)).item())


def test_ue8m0_ceil_rounding_and_errors():
    s = torch.tensor([3.0, 0.3, 1.0, 1.0000001])
    assert ff.ue8m0_decode(ff.ue8m0_encode(s)).tolist() == [4.0, 0.5, 1.0, 2.0]
    with pytest.raises(ValueError, match="powers of two"):
        ff.ue8m0_encode(torch.tensor([3.0]), rounding="exact")
    with pytest.raises(ValueError, match="positive"):
        ff.ue8m0_encode(torch.tensor([0.0]))
    with pytest.raises(ValueError, match="out of range"):
        ff.ue8m0_encode(torch.tensor([2.0**-130]))
    with pytest.raises(ValueError, match="rounding"):
        ff.ue8m0_encode(torch.tensor([1.0]), rounding="nearest")


def test_pow2_ceil_exponent_exact():
    x = torch.tensor([1.0, 1.5, 2.0, 0.5, 0.75, 2.0**-130, 448.0])
    assert ff.pow2_ceil_exponent(x).tolist() == [0, 1, 1, -1, 0, -130, 9]


def test_block_scale_selection():
    # amax 448 -> scale 1; amax 449 -> 2; amax 1 -> 2**ceil(log2(1/448)) = 2**-8; floor 1e-4 -> 2**-22
    amax = torch.tensor([448.0, 449.0, 1.0, 0.0, 224.0])
    e = ff.block_scale_exponent(amax, ff.FP8_E4M3_MAX, ff.FP8_AMAX_FLOOR)
    assert e.tolist() == [0, 1, -8, -22, -1]
    # FP4: amax 6 -> 1, 3 -> 0.5, 7 -> 2, 0 -> floor 6*2**-126 -> 2**-126
    e = ff.block_scale_exponent(torch.tensor([6.0, 3.0, 7.0, 0.0]), ff.FP4_E2M1_MAX, ff.FP4_AMAX_FLOOR)
    assert e.tolist() == [0, -1, 1, -126]


# ------------------------------------------------------------------------------------------- FP4
def test_fp4_all_16_codes():
    codes = torch.arange(16, dtype=torch.uint8)
    vals = ff.fp4_e2m1_decode(codes)
    assert vals.tolist() == [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]
    assert torch.signbit(vals[8]).item()  # code 8 is negative zero
    assert ff.fp4_e2m1_encode(vals).tolist() == list(range(16))


def test_fp4_round_half_to_even_and_saturation():
    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, 7.0, 100.0, 0.3, 0.8, 4.9, 5.1])
    got = ff.fp4_e2m1_decode(ff.fp4_e2m1_encode(x)).tolist()
    assert got == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, 6.0, 6.0, 0.5, 1.0, 4.0, 6.0]
    neg = ff.fp4_e2m1_decode(ff.fp4_e2m1_encode(-x)).tolist()
    assert neg == [-v for v in got]
    # negative zero: -0.0 and a tiny negative both give code 8
    assert ff.fp4_e2m1_encode(torch.tensor([-0.0, -0.1, 0.0])).tolist() == [8, 8, 0]


def test_fp4_pack_nibble_order():
    # element 2j in the low nibble, 2j+1 in the high nibble (release / float4_e2m1fn_x2 order)
    codes = torch.tensor([[1, 2, 15, 8]], dtype=torch.uint8)
    packed = ff.fp4_pack(codes)
    assert packed.tolist() == [[0x21, 0x8F]]
    assert ff.fp4_unpack(packed).tolist() == codes.tolist()
    assert ff.fp4_unpack(packed.view(torch.int8)).tolist() == codes.tolist()
    with pytest.raises(ValueError, match="even"):
        ff.fp4_pack(torch.zeros(3, dtype=torch.uint8))


# ------------------------------------------------------------------------------------ block quant
def test_fp8_weight_blocks_hand_values():
    w = torch.zeros(130, 200)
    w[0, 0] = 3.0  # tile (0,0): amax 3 -> scale 2**ceil(log2(3/448)) = 2**-7
    w[129, 199] = -448.0  # tile (1,1): scale 1
    # tile (0,1) and (1,0) all zero -> floor scale 2**-22, decode exact zeros
    q, s = ff.quantize_fp8_weight(w)
    assert q.shape == (130, 200) and q.dtype == torch.float8_e4m3fn
    assert s.shape == (2, 2) and s.dtype == ff.SCALE_DTYPE
    assert s.view(torch.uint8).tolist() == [[127 - 7, 127 - 22], [127 - 22, 127]]
    assert ff.fp8_e4m3_decode(q)[0, 0].item() == 3.0 * 2**7 == 384.0
    deq = ff.dequantize_fp8_weight(q, s)
    assert torch.equal(deq, w)
    with pytest.raises(ValueError, match=r"expected \(2, 2\)"):
        ff.dequantize_fp8_weight(q, s[:1])


def test_fp8_weight_roundtrip_error_bound():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(256, 384, generator=g)
    q, s = ff.quantize_fp8_weight(w)
    deq = ff.dequantize_fp8_weight(q, s)
    # e4m3 has 3 mantissa bits: relative error <= 2**-4 for normal values
    rel = ((deq - w).abs() / w.abs().clamp_min(1e-3)).max().item()
    assert rel <= 2**-4 + 1e-6
    # re-quantizing the dequantized weight is lossless (idempotent)
    q2, s2 = ff.quantize_fp8_weight(deq)
    assert torch.equal(q2.view(torch.uint8), q.view(torch.uint8))
    assert torch.equal(s2.view(torch.uint8), s.view(torch.uint8))


def test_fp4_weight_blocks_hand_values():
    w = torch.zeros(2, 64)
    w[0, :4] = torch.tensor([6.0, -3.0, 1.25, 0.25])  # amax 6 -> scale 1
    w[0, 32] = 12.0  # amax 12 -> scale 2: 12/2 = 6
    w[1, 32:34] = torch.tensor([0.75, -0.375])  # amax .75 -> scale 2**ceil(log2(.125)) = 1/8
    packed, s = ff.quantize_fp4_weight(w)
    assert packed.shape == (2, 32) and packed.dtype == torch.uint8
    assert s.view(torch.uint8).tolist() == [[127, 128], [127 - 126, 124]]  # row 1 block 0 all zero
    assert packed[0, 0].item() == 0x7 | (0xD << 4)  # 6 -> code 7, -3 -> code 13
    assert packed[0, 1].item() == 0x2 | (0x0 << 4)  # 1.25 -> 1 (code 2), 0.25 -> 0 (code 0)
    deq = ff.dequantize_fp4_weight(packed, s)
    expect = w.clone()
    expect[0, 2], expect[0, 3] = 1.0, 0.0
    assert torch.equal(deq, expect)
    # batched experts [E, out, in]
    pe, se = ff.quantize_fp4_weight(torch.stack([w, -w]))
    assert pe.shape == (2, 2, 32) and se.shape == (2, 2, 2)
    assert torch.equal(ff.dequantize_fp4_weight(pe, se)[1], -expect)
    with pytest.raises(ValueError, match="multiple of the block size 32"):
        ff.quantize_fp4_weight(torch.zeros(2, 48))
    with pytest.raises(ValueError, match="expected"):
        ff.dequantize_fp4_weight(packed, s[:, :1])


def test_activation_rounding_fp8_64_and_fp4_32():
    x = torch.zeros(2, 128)
    x[0, 0], x[0, 1] = 1.0, 1.0 + 2**-5  # amax 1.03 -> scale 2**-8; 1.03 * 256 = 264 -> 256
    x[0, 64] = 1000.0  # second block scale 2**ceil(log2(1000/448)) = 4
    y = ff.fp8_round_lastdim(x, 64)
    assert y[0, 0].item() == 1.0 and y[0, 1].item() == 1.0  # 1.03125 -> 1.0 (mantissa step 1/8)
    assert y[0, 64].item() == 1024.0  # 1000/4 = 250 -> 256 (step 16 in [128, 256))
    assert torch.equal(y[1], torch.zeros(128))  # all-zero block stays zero
    z = ff.fp4_round_lastdim(torch.tensor([[6.0, 5.0, 0.74] + [0.0] * 29]), 32)
    assert z[0, :3].tolist() == [6.0, 4.0, 0.5]
    with pytest.raises(ValueError, match="multiple"):
        ff.fp8_round_lastdim(torch.zeros(3, 65), 64)
    q, s = ff.quantize_fp8_lastdim(x, 64)
    assert s.shape == (2, 2) and s.view(torch.uint8)[0].tolist() == [127 - 8, 127 + 2]
