"""W8A8 (int8 weights, per-token int8 activations, INT8 GEMM) vs bf16 weights: decode speed on this machine.

Exports a seeded miniature in the published FP8/FP4 layout (default preset ``tiny``), loads it twice --
``quantization="bf16"`` (dequantized bf16 weights) and ``quantization="w8a8"`` (converted at load) -- and
times batched decode steps (`V4ForCausalLM.forward_incremental`, one token per sequence per
step) side by side, best of `--repeats`. Prints tokens/s per format, the ratio, the weight bytes and the
logit error of the FP8 -> W8A8 / W4A8 conversion against the published weights.

    .venv/bin/python benchmarks/w8a8_decode.py [--preset tiny] [--batch 8] [--steps 16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch


def decode_tokens_per_s(model, batch: int, prompt: int, steps: int, repeats: int) -> float:
    """Best tokens/s over `repeats` runs of `steps` decode steps for `batch` sequences after a `prompt` prefill."""
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    best = 0.0
    for _ in range(repeats):
        states = [model.new_state() for _ in range(batch)]
        model.forward_incremental([torch.randint(0, vocab, (prompt,), generator=g).tolist() for _ in states], states)
        t0 = time.perf_counter()
        for _ in range(steps):
            model.forward_incremental([[int(torch.randint(0, vocab, (1,), generator=g))] for _ in states], states)
        dt = time.perf_counter() - t0
        for s in states:
            s.free()
        best = max(best, batch * steps / dt)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    from parity.checkpoint.official_reader import load_official
    from parity.checkpoint.writer import export_tiny

    with tempfile.TemporaryDirectory() as d:
        export_tiny(d, seed=0, preset=a.preset)
        res = {}
        for fmt in ("bf16", "w8a8"):
            m = load_official(
                d, dtype=torch.bfloat16, quantization=fmt, progress=False, kv_cache_dtype="bf16", indexer_dtype="bf16"
            )
            wbytes = sum(t.numel() * t.element_size() for t in m.state_dict().values())
            res[fmt] = (decode_tokens_per_s(m, a.batch, a.prompt, a.steps, a.repeats), wbytes)
            del m
        err = conversion_error(d, a.prompt)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, preset {a.preset}, batch {a.batch}, "
        f"prompt {a.prompt}, {a.steps} decode steps, best of {a.repeats}"
    )
    for fmt, (tps, wb) in res.items():
        print(f"{fmt:5s} decode {tps:8.1f} tokens/s   all weights {wb / 2**20:7.1f} MiB")
    print(f"w8a8 / bf16 decode speed: {res['w8a8'][0] / res['bf16'][0]:.2f}x")
    for fmt, (mx, rel, top1) in err.items():
        print(
            f"published FP8/FP4 -> {fmt}: logits max |diff| {mx:.4f}, relative RMS {rel:.4f}, "
            f"top-1 agreement {top1:.1%} ({a.prompt} positions, fp32 compute)"
        )


def conversion_error(d: str, n: int) -> dict:
    """{format: (max |logit diff|, RMS diff / RMS logits, top-1 agreement)} of the published model converted
    to w8a8 / w4a8 at load vs as published (fp32 compute, FP8 KV / FP4 indexer), over `n` random tokens."""
    from parity.checkpoint.official_reader import load_official

    ids = torch.randint(0, 1000, (1, n), generator=torch.Generator().manual_seed(1))
    ref = load_official(d, quantization="fp8", progress=False).forward_logits(ids, "fp8", "fp4")[0]
    out = {}
    for fmt in ("w8a8", "w4a8"):
        got = load_official(d, quantization=fmt, progress=False).forward_logits(ids, "fp8", "fp4")[0]
        diff = got - ref
        out[fmt] = (
            diff.abs().max().item(),
            (diff.pow(2).mean() / ref.pow(2).mean()).sqrt().item(),
            (got.argmax(-1) == ref.argmax(-1)).float().mean().item(),
        )
    return out


if __name__ == "__main__":
    main()
