"""parity vs llama.cpp on the CPU, side by side on the same V4 miniature weights.

Writes the miniature (hidden 256, 6 layers, the real 129,280-token vocabulary, CSA ratio 4, HCA ratio
128, index_head_dim 64; random weights, seed 0) in the published FP8/FP4 layout, converts it with the
given llama.cpp's own ``convert_hf_to_gguf.py`` (which stores FP8 linears as Q8_0 -- a rounding of the
release values -- and experts as MXFP4, exactly) and requantizes that to F32 with ``llama-quantize``;
parity loads the same checkpoint with the release values as fp32 weights (so llama.cpp "F32" differs
from parity's fp32 weights by that Q8_0 rounding of the FP8 linears). Then it runs ``llama-batched-bench``
(batch 1 and 8) and parity's model interleaved (A B A B, ``--rounds`` rounds) at each thread count, and
prints tokens/s with the median of the per-round ratios parity / llama.cpp.

llama.cpp variants: "F32" = F32 weights with its defaults (f16 KV cache, flash attention);
"strict" = F32 weights, f32 KV cache, no flash attention (fp32 math end to end, like parity).

Bandwidth bound (decode): bytes read per token = the bytes of every weight a decode step touches
(attention, compressors and indexers, mHC, router, shared expert, the activated routed experts -- at
batch B the distinct experts of B * k picks, at most all of them, counted as min(E, B * k) -- and the
LM head, in their stored dtype) plus the cache bytes read (window and compressed entries at the
measured context length), divided by B; bound tokens/s = read bandwidth / that, with the read bandwidth
of benchmarks/read_bandwidth.py (best of 10 read-only passes over 4x the LLC, 1 and 2 threads: the fastest
of a numpy and a torch sum over a buffer on 4 KiB and on 2 MiB pages, all printed): parity's CPU weights are
on huge pages (`parity.devices.huge_pages`, as the engine's `load_model` places them; ``--base-pages``
leaves them on 4 KiB pages), so the bound is the bandwidth they could get.

The same run asserts that parity's logits (the path measured) equal the eager fp32 reference
(``F.linear`` everywhere, one forward without cache) to 1e-5, with
``torch.get_float32_matmul_precision() == "highest"``, so no speed comes from lower precision.

Release weights in low precision (second table; ``--no-lowprec`` skips it): parity loads the same checkpoint
with its CPU default (`parity.model.weight_storage`: FP8/FP4/BF16 matrices held in bf16, exact; fp32
activations and accumulation) and runs interleaved against llama.cpp's Q8_0 GGUF (default flags). Both
logit errors against fp32-dequantized weights are printed on the same token ids: parity bf16-stored vs
the eager fp32 reference, and llama.cpp Q8_0 vs llama.cpp F32 (logits read through llama-cpp-python's
bindings, benchmarks/llamacpp_logits.py). A third arm (``--no-w8a8`` skips it), "parity W8A8 + int8 head":
the checkpoint loaded with ``--quantization w8a8 --quantize-lm-head`` (int8 per-channel weights, head
included, per-token int8 activations, like Q8_0's 8-bit weights and activations), its logit error vs the
same reference printed with the other two, its bandwidth bound from its int8 bytes.

``--compiled``: both parity models run their decode steps through the engine's compiled whole-step graph
(`parity.model.decode_graph.DecodeGraph`, one graph per batch bucket, compiled and warmed at each thread
count before timing; prefill stays eager); the bf16-stored model's compiled logits are checked against
its eager ones (1e-5) and the fp32 model's against the eager fp32 reference (1e-5); the W8A8 model's
compiled-vs-eager difference is printed (an fp32 summation-order difference can move an activation
across an int8 rounding step, so it is not held to 1e-5).

Usage:
    .venv/bin/python benchmarks/vs_llamacpp.py --llama-cpp DIR [--bin DIR/build/bin] [--threads 1,2]
        [--rounds 6] [--prompt 256] [--gen 32] [--no-strict] [--no-fp32] [--no-lowprec] [--no-w8a8] [--compiled]
        [--work /tmp/vs_llamacpp]

DIR is a llama.cpp source tree (e.g. vendor/llama.cpp of the PyPI sdist llama-cpp-python 0.3.36) built
with cmake (Release, GGML_NATIVE=ON); ``--bin`` holds llama-batched-bench and llama-quantize. Provenance of
every figure: measured.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from engine_throughput import bench_config  # noqa: E402
from llamacpp_logits import llama_logits, load_bindings  # noqa: E402
from read_bandwidth import best_read_bandwidth, describe  # noqa: E402

from parity.checkpoint.writer import export_model  # noqa: E402
from parity.devices.row_argmax import row_argmax  # noqa: E402
from parity.model import build_model  # noqa: E402


def miniature_config():
    """The benchmark miniature: engine_throughput's, with index_head_dim 64."""
    return bench_config().replace(index_head_dim=64)


def write_release(out: Path) -> Path:
    """The seeded miniature in the published layout (FP8 e4m3 linears with 128x128 UE8M0 scales, FP4 e2m1
    routed experts with 1x32 UE8M0 scales, the rest BF16/F32), as `parity export-tiny` writes it."""
    if not (out / "config.json").exists():
        export_model(build_model(miniature_config(), seed=0), out, seed=0)
    return out


def placed(model, base_pages: bool):
    """``model`` with its weights on 2 MiB huge pages as the engine's `load_model` places CPU weights
    (`parity.devices.huge_pages`), unless ``base_pages``; prints what was placed."""
    from parity.devices.huge_pages import place_on_huge_pages, unavailable_reason

    if base_pages:
        print("# parity's weights on 4 KiB pages (--base-pages)", file=sys.stderr)
        return model
    n = place_on_huge_pages(model)
    why = unavailable_reason() or "the kernel refused the mapping"
    print(f"# parity's weights on huge pages: {n / 1e6:.0f} MB" if n else f"# on 4 KiB pages: {why}", file=sys.stderr)
    return model


def dequantized(model):
    """The model with every FP8 linear / FP4 expert block replaced by fp32 weights of the same values
    (what llama.cpp's F32 GGUF of the release holds), and the unrounded cache / indexer modes."""
    from torch import nn

    from parity.model.layers import Experts
    from parity.model.quant import FP4Experts

    for name, mod in list(model.named_modules()):
        parent, _, leaf = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        if hasattr(mod, "qweight") and not isinstance(mod, FP4Experts):
            w = mod.weight.float()
            lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
            lin.weight = nn.Parameter(w, requires_grad=False)
            setattr(owner, leaf, lin)
        elif isinstance(mod, FP4Experts):
            ex = Experts(mod.n_experts, mod.down_proj.shape[1], mod.inter, mod.limit)
            ex.gate_up_proj = nn.Parameter(mod.gate_up_proj.float(), requires_grad=False)
            ex.down_proj = nn.Parameter(mod.down_proj.float(), requires_grad=False)
            setattr(owner, leaf, ex)
    model.kv_cache_dtype, model.indexer_dtype = "bf16", "bf16"
    return model


def convert(llama_dir: Path, bin_dir: Path, ckpt: Path) -> dict[str, Path]:
    """GGUFs of the release checkpoint: "release" (llama.cpp's own conversion: FP8 linears -> Q8_0,
    experts -> MXFP4, the rest F32), "F32" and "Q8_0" (llama-quantize --allow-requantize of it)."""
    out = {
        "release": ckpt.parent / "mini-release.gguf",
        "F32": ckpt.parent / "mini-f32.gguf",
        "Q8_0": ckpt.parent / "mini-q8_0.gguf",
    }
    if not out["release"].exists():
        subprocess.run(
            [
                sys.executable,
                str(llama_dir / "convert_hf_to_gguf.py"),
                str(ckpt),
                "--outtype",
                "f32",
                "--outfile",
                str(out["release"]),
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    for kind in ("F32", "Q8_0"):
        if not out[kind].exists():
            subprocess.run(
                [str(bin_dir / "llama-quantize"), "--allow-requantize", str(out["release"]), str(out[kind]), kind],
                check=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
    return out


def llama_batched(
    bin_dir: Path, gguf: Path, threads: int, prompt: int, gen: int, batches: list[int], strict: bool
) -> dict[int, dict]:
    """llama-batched-bench prefill and decode tokens/s per batch size (each sequence its own prompt).
    (llama-bench would do batch 1, but it does not accept an f32 KV cache, so both batch sizes use
    llama-batched-bench for every variant.)"""
    kv = ["-ctk", "f32", "-ctv", "f32", "-fa", "off"] if strict else ["-fa", "on"]
    ctx = max(batches) * (prompt + gen) + 64
    r = subprocess.run(
        [
            str(bin_dir / "llama-batched-bench"),
            "-m",
            str(gguf),
            "-t",
            str(threads),
            "-c",
            str(ctx),
            "-npp",
            str(prompt),
            "-ntg",
            str(gen),
            "-npl",
            ",".join(map(str, batches)),
            "--output-format",
            "jsonl",
            *kv,
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    return {row["pl"]: {"prefill": row["speed_pp"], "decode": row["speed_tg"]} for row in rows}


def parity_run(model, threads: int, prompt: int, gen: int, batch: int, seed: int = 0) -> dict:
    """parity's model: one prefill of ``batch`` x ``prompt`` tokens, then ``gen`` greedy decode steps (the
    engine's greedy pick, `parity.devices.row_argmax`)."""
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(seed)
    V = model.config.vocab_size
    states = [model.new_state() for _ in range(batch)]
    try:
        prompts = [torch.randint(0, V, (prompt,), generator=g) for _ in range(batch)]
        t0 = time.perf_counter()
        nxt = row_argmax(model.forward_incremental(prompts, states))
        t_pre = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(gen):
            nxt = row_argmax(model.forward_incremental([[int(t)] for t in nxt], states))
        t_dec = time.perf_counter() - t0
    finally:
        for st in states:
            st.free()
    return {"prefill": batch * prompt / t_pre, "decode": batch * gen / t_dec}


def logit_check_ids(model, prompt: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, model.config.vocab_size, (prompt + 4,), generator=g)


def reference_logits(model, ids: torch.Tensor, prompt: int) -> torch.Tensor:
    """The eager fp32 reference: `forward_logits` over the whole sequence with the ``F.linear`` head
    (call before compiling), logits of positions prompt - 1 .. end. Raises AssertionError unless fp32
    matmuls run at full precision."""
    import parity.model.fast_linear as fl

    assert torch.get_float32_matmul_precision() == "highest", "fp32 matmul precision must be 'highest'"
    saved = fl.ONEDNN_MIN_WEIGHT_BYTES
    fl.ONEDNN_MIN_WEIGHT_BYTES = 1 << 62
    try:
        return model.forward_logits(ids[None])[0, prompt - 1 :]
    finally:
        fl.ONEDNN_MIN_WEIGHT_BYTES = saved


def incremental_logits(model, ids: torch.Tensor, prompt: int) -> torch.Tensor:
    """Logits [5, vocab] of the measured path: an incremental prefill of ``ids[:prompt]``, then 4 decode
    steps of the following ids."""
    st = model.new_state()
    try:
        got = [model.forward_incremental([ids[:prompt]], [st])[0]]
        for i in range(prompt, prompt + 4):
            got.append(model.forward_incremental([ids[i : i + 1]], [st])[0])
    finally:
        st.free()
    return torch.stack(got)


def check_logits(model, ids: torch.Tensor, prompt: int, ref: torch.Tensor, tol: float = 1e-5) -> float:
    """Max |logit difference| between the measured path (`incremental_logits`) and ``ref``
    (`reference_logits`). Raises AssertionError above ``tol``."""
    err = (incremental_logits(model, ids, prompt) - ref).abs().max().item()
    assert err <= tol, f"parity logits differ from the reference by {err:.2e} > {tol:.0e}"
    return err


def attach_decode_graph(model, threads: list[int], batches: tuple[int, ...]) -> str:
    """Give ``model`` the engine's compiled decode step (`parity.model.decode_graph.DecodeGraph`, as
    ``parity.engine.model_runner.prepare_step_path`` attaches it) and compile / warm the buckets of
    ``batches`` at each torch thread count in ``threads`` (inductor specialises per thread count).
    Returns the warm-up wall seconds per thread count and bucket. Raises SystemExit when the graph
    cannot run the model."""
    from parity.model.decode_graph import DecodeGraph, unsupported_reason

    reason = unsupported_reason(model)
    if reason is not None:
        raise SystemExit(f"--compiled: the compiled decode step cannot run this model: {reason}")
    graph = model.decode_graph = DecodeGraph(model, torch.device("cpu"))
    buckets = tuple(sorted({graph.bucket(b) for b in batches} - {None}))
    out = []
    for t in threads:
        torch.set_num_threads(t)
        secs = graph.warm_up(buckets)
        out.append(f"{t} thread(s): " + ", ".join(f"batch {b} {s:.1f} s" for b, s in secs.items()))
    return "; ".join(out)


def llama_logit_error(llama_dir: Path, bin_dir: Path, gguf: dict, ids: torch.Tensor, prompt: int) -> dict:
    """{"q8_0": max |logit difference| of llama.cpp's Q8_0 GGUF against its F32 GGUF, "f32" / "q8_0_logits":
    the two GGUFs' logits} at positions prompt - 1 .. end of `ids`, both with f32 KV cache and no flash attention
    (so only the weights differ); None where the llama-cpp-python bindings are missing."""
    try:
        lib = load_bindings(llama_dir, bin_dir)
    except ImportError as e:
        print(f"# no llama.cpp logits: {e}", file=sys.stderr)
        return {"q8_0": None, "f32": None, "q8_0_logits": None}
    tok = ids.tolist()
    f32 = torch.from_numpy(llama_logits(lib, gguf["F32"], tok, 1, strict=True))[prompt - 1 :]
    q8 = torch.from_numpy(llama_logits(lib, gguf["Q8_0"], tok, 1, strict=True))[prompt - 1 :]
    return {"q8_0": (q8 - f32).abs().max().item(), "f32": f32, "q8_0_logits": q8}


def stored_weights(model):
    """(name, tensor) of every stored weight: the parameters and the int8 / packed int4 weights and scales
    of the W8A8 modules (buffers of `Int8Linear` / `Int8Experts`)."""
    from parity.model.int8_quant import Int8Experts, Int8Linear

    yield from model.named_parameters()
    for mname, mod in model.named_modules():
        if isinstance(mod, (Int8Linear, Int8Experts)):
            for bname, b in mod.named_buffers(recurse=False):
                yield f"{mname}.{bname}", b


#: Stacked routed-expert tensors ([E, ...]: a decode step reads the picked experts' slices only).
EXPERT_SUFFIXES = tuple(
    f"experts.{n}"
    for n in ("gate_up_proj", "down_proj", "gate_up_weight", "down_weight", "gate_up_scale", "down_scale")
)


def decode_bytes_per_token(model, batch: int, context: int) -> float:
    """Bytes read per decode token (module docstring): touched weights (in their stored dtype: int8 weights
    1 byte, packed int4 half a byte, plus their scales) + cache, divided by the batch."""
    cfg = model.config
    total = 0
    for name, p in stored_weights(model):
        if name.startswith("model.embed_tokens"):
            total += batch * p.shape[1] * p.element_size()  # one row per token
        elif name.endswith(EXPERT_SUFFIXES):
            used = min(cfg.n_routed_experts, batch * cfg.num_experts_per_tok)
            total += used * p[0].numel() * p.element_size()
        elif "tid2eid" not in name:
            total += p.numel() * p.element_size()
    esize = model.model.embed_tokens.weight.element_size()
    for layer in model.model.layers:
        r = layer.self_attn.ratio
        entries = min(context, cfg.sliding_window) + (context // r if r else 0)
        total += batch * entries * cfg.head_dim * esize
    return total / batch


def median_ratio(a: list[float], b: list[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


NAMES = {
    "parity": "parity",
    "F32": "llama.cpp F32",
    "strict": "llama.cpp strict",
    "parity-lowp": "parity bf16-stored",
    "parity-w8a8": "parity W8A8 + int8 head",
}


def print_table(res: dict, cells, threads, tt: str, who_list: list[str], model, bw: dict, ctx: int, prompt: int):
    """One markdown table: tokens/s medians of the first of `who_list` (parity) and each llama.cpp variant
    with the median per-round ratio, and the decode bandwidth bound of `model`'s stored weights."""
    head = "| tokens/s | threads | " + NAMES.get(who_list[0], who_list[0]) + " |"
    head += "".join(f" llama.cpp {w} | ratio |" for w in who_list[1:])
    print(head + " decode bound (bandwidth) |")
    print("|---|---|---|" + "---|---|" * (len(who_list) - 1) + "---|")
    p0 = who_list[0]
    for c in cells:
        kind, b = c.split("_")
        row = [f"{kind}{' ' + str(prompt) if kind == 'prefill' else ''}, batch {b}", tt]
        for who in who_list:
            row.append(" / ".join(f"{statistics.median(res[(who, t, c)]):,.0f}" for t in threads))
            if who != p0:
                row.append(" / ".join(f"{median_ratio(res[(p0, t, c)], res[(who, t, c)]):.2f}" for t in threads))
        if kind == "decode":
            bpt = decode_bytes_per_token(model, int(b), ctx)
            row.append(" / ".join(f"{bw[t] / bpt:,.0f}" for t in threads) + f" ({bpt / 1e6:.0f} MB/token)")
        else:
            row.append("-")
        print("| " + " | ".join(row) + " |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-cpp", required=True, type=Path, help="llama.cpp source dir (convert_hf_to_gguf.py)")
    ap.add_argument("--bin", type=Path, default=None, help="dir with llama-batched-bench, llama-quantize")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--no-strict", action="store_true", help="skip llama.cpp's strict fp32 variant")
    ap.add_argument("--no-fp32", action="store_true", help="skip the fp32 table (parity fp32 vs F32 / strict)")
    ap.add_argument("--no-lowprec", action="store_true", help="skip the release-weights table (vs Q8_0)")
    ap.add_argument("--no-w8a8", action="store_true", help="skip its W8A8 + int8 head arm")
    ap.add_argument(
        "--compiled",
        action="store_true",
        help="parity's fp32 and bf16-stored models with the engine's compiled decode step (default: eager)",
    )
    ap.add_argument(
        "--base-pages",
        action="store_true",
        help="leave parity's weights on 4 KiB pages (the engine places CPU weights on 2 MiB huge pages)",
    )
    ap.add_argument("--work", type=Path, default=Path("/tmp/vs_llamacpp"))
    a = ap.parse_args()
    bin_dir = a.bin or a.llama_cpp / "build" / "bin"
    threads = [int(t) for t in a.threads.split(",")]
    a.work.mkdir(parents=True, exist_ok=True)
    ckpt = write_release(a.work / "mini-release")
    from parity.checkpoint.reader import from_pretrained

    # the values of llama.cpp's F32 GGUF, as fp32 weights
    model = placed(dequantized(from_pretrained(str(ckpt), dtype=torch.float32, quantization="fp8")), a.base_pages)
    ggufs = convert(a.llama_cpp, bin_dir, ckpt)
    gguf = ggufs["F32"]
    ids = logit_check_ids(model, a.prompt)
    ref = reference_logits(model, ids, a.prompt)
    lowp = w8 = None
    if not a.no_lowprec:
        from parity.checkpoint.conversion import quantize_lm_head
        from parity.model.weight_storage import describe_storage

        lowp = placed(from_pretrained(str(ckpt), dtype=torch.float32), a.base_pages)  # the CPU default: bf16-stored
        lowp.kv_cache_dtype, lowp.indexer_dtype = "bf16", "bf16"  # unrounded caches, like the reference
        lowp_err = check_logits(lowp, ids, a.prompt, ref, tol=float("inf"))
        w8_note = ""
        if not a.no_w8a8:
            w8 = from_pretrained(str(ckpt), dtype=torch.float32, quantization="w8a8")
            quantize_lm_head(w8)  # --quantize-lm-head
            placed(w8, a.base_pages)
            w8.kv_cache_dtype, w8.indexer_dtype = "bf16", "bf16"
            w8_err = check_logits(w8, ids, a.prompt, ref, tol=float("inf"))
        llama_err = llama_logit_error(a.llama_cpp, bin_dir, ggufs, ids, a.prompt)
        nan = float("nan")
        f32_gap = (llama_err["f32"] - ref).abs().max().item() if llama_err["f32"] is not None else nan
        q8_ref = (llama_err["q8_0_logits"] - ref).abs().max().item() if llama_err["f32"] is not None else nan
        q8_err = llama_err["q8_0"] if llama_err["q8_0"] is not None else nan
        if w8 is not None:
            w8_note = (
                f"parity W8A8 + int8 head vs that reference {w8_err:.1e} "
                f"({'met' if w8_err <= q8_err else 'NOT met'}: W8A8 <= Q8_0); "
            )
        print(
            f"# release weights: parity stores {describe_storage(lowp)} (fp32-dequantized: "
            f"{describe_storage(model)}); max |logit error| on the same {len(ids) - a.prompt + 1} positions: "
            f"parity bf16-stored vs the fp32-dequantized reference {lowp_err:.1e} "
            f"({'met' if lowp_err <= q8_err else 'NOT met'}: parity <= Q8_0); {w8_note}"
            f"llama.cpp Q8_0 vs llama.cpp F32 {q8_err:.1e}, Q8_0 vs the fp32-dequantized reference {q8_ref:.1e}; "
            f"llama.cpp F32 vs that reference {f32_gap:.1e} (its "
            f"converter stores the FP8 linears as Q8_0); llama.cpp runs with f32 KV, no flash attn"
        )
    if a.compiled:
        torch.set_num_threads(threads[0])
        lowp_eager = None if lowp is None else incremental_logits(lowp, ids, a.prompt)
        w8_eager = None if w8 is None else incremental_logits(w8, ids, a.prompt)
        for name, m in (("fp32", None if a.no_fp32 else model), ("bf16-stored", lowp), ("W8A8 + int8 head", w8)):
            if m is not None:  # --no-fp32: the fp32 model is only the logit reference, not compiled
                secs = attach_decode_graph(m, threads, (1, a.batch))
                print(f"# parity {name}: compiled decode step warmed up: {secs}", file=sys.stderr, flush=True)
        torch.set_num_threads(threads[0])
        if lowp is not None:
            graph_err = check_logits(lowp, ids, a.prompt, lowp_eager)
            print(f"# parity bf16-stored compiled decode step vs its eager step: max |logit diff| {graph_err:.1e}")
        if w8 is not None:
            w8_graph = check_logits(w8, ids, a.prompt, w8_eager, tol=float("inf"))
            w8_ref = check_logits(w8, ids, a.prompt, ref, tol=float("inf"))
            print(
                f"# parity W8A8 + int8 head compiled decode step vs its eager step: max |logit diff| {w8_graph:.1e}; "
                f"vs the fp32-dequantized reference {w8_ref:.1e}"
            )
    torch.set_num_threads(threads[0])
    err = check_logits(model, ids, a.prompt, ref)
    commit = (
        subprocess.run(
            ["git", "-C", str(a.llama_cpp), "rev-parse", "--short=9", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        or "unknown"
    )
    print(
        f"# vs_llamacpp: llama.cpp {commit} ({bin_dir}); torch {torch.__version__}; load {os.getloadavg()[0]:.1f}; "
        f"parity {'compiled decode step' if a.compiled else 'eager'}; logits vs eager fp32 reference: "
        f"max |diff| {err:.1e} (<= 1e-5)"
    )
    variants = [] if a.no_fp32 else ["F32"] + ([] if a.no_strict else ["strict"])
    order = ([] if a.no_fp32 else ["parity", *variants]) + ([] if lowp is None else ["parity-lowp", "Q8_0"])
    order += [] if w8 is None else ["parity-w8a8"]
    models = {"parity": model, "parity-lowp": lowp, "parity-w8a8": w8}
    cells = ("prefill_1", "decode_1", f"prefill_{a.batch}", f"decode_{a.batch}")
    res = {(who, t, c): [] for who in order for t in threads for c in cells}
    for m in (m for m in models.values() if m is not None):  # lazily built kernels outside the timing
        for b in (1, a.batch):
            parity_run(m, threads[0], 8, 2, b)
    for r in range(a.rounds):
        for t in threads:
            for who in order if r % 2 == 0 else order[::-1]:  # A B, then B A
                if who.startswith("parity"):
                    m = models[who]
                    one = parity_run(m, t, a.prompt, a.gen, 1)
                    many = parity_run(m, t, a.prompt, a.gen, a.batch)
                else:
                    g = ggufs["Q8_0"] if who == "Q8_0" else gguf
                    both = llama_batched(bin_dir, g, t, a.prompt, a.gen, [1, a.batch], who == "strict")
                    one, many = both[1], both[a.batch]
                for c, v in zip(cells, (one["prefill"], one["decode"], many["prefill"], many["decode"]), strict=True):
                    res[(who, t, c)].append(v)
        print(f"# round {r + 1}/{a.rounds} done", file=sys.stderr, flush=True)
    probes = {t: best_read_bandwidth(t) for t in threads}
    bw = {t: probes[t]["best"] for t in threads}
    ctx = a.prompt + a.gen // 2
    print(
        "# read bandwidth (the fastest probe): "
        + "; ".join(f"{t} thread(s) {describe(probes[t])}" for t in threads)
        + f"; parity's weights on {'4 KiB' if a.base_pages else '2 MiB huge'} pages; "
        f"medians of {a.rounds} interleaved rounds; ratio = median over rounds of parity / llama.cpp"
    )
    tt = " / ".join(str(t) for t in threads)
    if not a.no_fp32:
        print_table(res, cells, threads, tt, ["parity", *variants], model, bw, ctx, a.prompt)
    if lowp is not None:
        print("\nRelease weights: parity bf16-stored (fp32 compute) vs llama.cpp Q8_0 (f16 KV, flash attn)")
        print_table(res, cells, threads, tt, ["parity-lowp", "Q8_0"], lowp, bw, ctx, a.prompt)
    if w8 is not None:
        print("\nRelease weights: parity W8A8 + int8 head (int8 weights and activations) vs llama.cpp Q8_0")
        print_table(res, cells, threads, tt, ["parity-w8a8", "Q8_0"], w8, bw, ctx, a.prompt)
    return 0


if __name__ == "__main__":
    sys.exit(main())
