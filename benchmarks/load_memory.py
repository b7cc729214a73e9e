"""Peak resident memory of loading + one forward of a ~1B-parameter checkpoint in DeepSeek-V4's published
FP8/FP4 layout, next to its on-disk size.

    .venv/bin/python benchmarks/load_memory.py [--dtype bf16] [--tokens 64] [--keep DIR]

1. writes a synthetic checkpoint (V4-Flash's pattern scaled down: hidden 1024, 8 layers, 48 experts of
   512, real 129,280-token vocabulary, MTP block; ~1.08B parameters) with `parity.checkpoint.writer`:
   FP8 e4m3 linears + 128x128 UE8M0 scales, FP4 e2m1 experts + 1x32 UE8M0 scales, BF16/F32 rest;
2. in a fresh subprocess, imports parity + torch (baseline RSS), `load_official(dir, dtype)`, runs one
   `forward_logits` over `--tokens` tokens and reports peak RSS (``ru_maxrss``) after each step;
3. deletes the checkpoint (unless --keep).

Figures are `measured` on the machine it runs on; results go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MEASURE = r"""
import json, resource, sys, time
def _status(key):
    for line in open('/proc/self/status'):
        if line.startswith(key + ':'):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
def peak_mib():  # VmHWM: peak RSS of this process image (ru_maxrss would carry the parent's over exec)
    return _status('VmHWM')
def rss_mib():
    return _status('VmRSS')
import torch
from parity.checkpoint.official_reader import load_official
from parity.model.quant import quantized_nbytes
torch.set_num_threads(2)
out = {"baseline_peak_mib": peak_mib()}
dtype = getattr(torch, sys.argv[2])
t = time.perf_counter()
m = load_official(sys.argv[1], dtype=dtype, progress=False, kv_cache_dtype="bf16", indexer_dtype="bf16")
out["load_s"] = time.perf_counter() - t
out["after_load_peak_mib"] = peak_mib()
out["after_load_rss_mib"] = rss_mib()
q = quantized_nbytes(m)
plain = sum(p.numel() * p.element_size() for p in m.parameters())
bufs = sum(b.numel() * b.element_size() for b in m.buffers())
out["quantized_weight_mib"] = q / 2**20
out["other_tensors_mib"] = (plain + bufs - q) / 2**20
ids = torch.randint(0, m.config.vocab_size, (1, int(sys.argv[3])), generator=torch.Generator().manual_seed(0))
t = time.perf_counter()
with torch.no_grad():
    logits = m.forward_logits(ids)
out["forward_s"] = time.perf_counter() - t
out["after_forward_peak_mib"] = peak_mib()
out["finite"] = bool(torch.isfinite(logits).all())
print(json.dumps(out))
"""


def synthetic_config():
    """V4-Flash's layer pattern scaled to ~1.08B parameters (incl. MTP)."""
    from parity.config import CSA, HASH_MOE, HCA, MOE, SLIDING, load_preset

    n = 8
    layer_types = [SLIDING, SLIDING] + [CSA if i % 2 == 0 else HCA for i in range(n - 3)] + [SLIDING]
    return load_preset("v4-flash").replace(
        hidden_size=1024,
        num_hidden_layers=n,
        layer_types=layer_types,
        mlp_layer_types=[HASH_MOE] + [MOE] * (n - 1),
        num_attention_heads=16,
        head_dim=512,
        q_lora_rank=512,
        o_groups=4,
        o_lora_rank=512,
        n_routed_experts=48,
        moe_intermediate_size=512,
        index_n_heads=16,
        mtp_compress_ratios=[0],
        source="benchmark:load_memory",
    )


def write_synthetic(cfg, out: Path, seed: int = 0) -> dict:
    """Random tensors for every entry of the published layout in the release's dtypes (random FP8 / FP4
    codes with fixed power-of-two scales; a memory benchmark needs the bytes, not trained values),
    written in 256 MiB shards. Returns counts."""
    import torch

    from parity.checkpoint import layout as o
    from parity.checkpoint import writer
    from parity.model import fp_formats as ff

    g = torch.Generator().manual_seed(seed)
    lay = o.official_layout(cfg)
    tensors, pending = {}, {}
    std = cfg.initializer_range
    for name, s in lay.items():
        if s.role == o.PLAIN:
            if s.dtype == "I64":
                t = torch.randint(0, cfg.n_routed_experts, s.shape, generator=g)
            else:
                t = torch.randn(s.shape, generator=g) * std
                if name.endswith("norm.weight") or name.endswith("_scale"):
                    t = t + 1.0
            tensors[name] = t.to({"BF16": torch.bfloat16, "F32": torch.float32, "I64": torch.int64}[s.dtype])
        elif s.role == o.FP8:  # e4m3 codes of N(0, 16) with scale 2**-9: weights ~ N(0, 0.008)
            q = (torch.randn(s.shape, generator=g) * 4).to(ff.FP8_DTYPE)
            tensors[name] = q
            sc_shape = lay[name[:-7] + ".scale"].shape
            pending[name[:-7] + ".scale"] = torch.full(sc_shape, 127 - 9, dtype=torch.uint8).view(ff.SCALE_DTYPE)
        elif s.role == o.FP4:  # uniformly random e2m1 codes (every byte is valid) with scale 2**-8
            tensors[name] = torch.randint(-128, 128, s.shape, generator=g, dtype=torch.int8)
            sc_shape = lay[name[:-7] + ".scale"].shape
            pending[name[:-7] + ".scale"] = torch.full(sc_shape, 127 - 8, dtype=torch.uint8).view(ff.SCALE_DTYPE)
        else:
            tensors[name] = pending.pop(name)
    writer.write_checkpoint(cfg, tensors, out, shard_bytes=256 * 2**20, tokenizer=False)
    params = sum(
        math.prod(s.shape) * (2 if s.role == o.FP4 else 1)
        for s in lay.values()
        if s.role not in (o.FP8_SCALE, o.FP4_SCALE)
    )
    return {"tensors": len(lay), "params": params}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--keep", default=None, help="write the checkpoint here and keep it")
    args = ap.parse_args()
    cfg = synthetic_config()
    tmp = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="parity-load-memory-"))
    try:
        t = time.perf_counter()
        info = write_synthetic(cfg, tmp)
        gen_s = time.perf_counter() - t
        disk = sum(f.stat().st_size for f in tmp.glob("*.safetensors"))
        root = Path(__file__).resolve().parents[1]
        r = subprocess.run(
            [sys.executable, "-c", MEASURE, str(tmp), args.dtype, str(args.tokens)],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=900,
        )
        if r.returncode:
            print(r.stderr, file=sys.stderr)
            return 1
        m = json.loads(r.stdout.strip().splitlines()[-1])
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    res = {
        "params_b": info["params"] / 1e9,
        "tensors": info["tensors"],
        "disk_mib": disk / 2**20,
        "generate_s": gen_s,
        "dtype": args.dtype,
        "tokens": args.tokens,
        **m,
        "load_plus_forward_over_baseline_mib": m["after_forward_peak_mib"] - m["baseline_peak_mib"],
        "bf16_equivalent_mib": info["params"] * 2 / 2**20,
    }
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
