"""`parity serve` vs llama.cpp's `llama-server`, end to end over HTTP, on the same V4 miniature weights.

Writes the vs_llamacpp miniature (benchmarks/vs_llamacpp.py: the seeded release layout, llama.cpp's own
conversion requantized to F32) and the same values as a float32 checkpoint for parity, then starts the
two OpenAI-compatible servers one at a time on 127.0.0.1 (same threads, same number of slots /
``--max-num-seqs``) and runs the same ``parity bench`` workload against each, interleaved A B, B A, ...
(``--rounds`` rounds). Printed: output tokens/s, TPOT p50, TTFT p50, ITL p50 of every run, the medians,
the ratios (tokens/s: parity / llama-server; latencies: llama-server / parity; >= 1 means parity is at
least as good), the server process's CPU seconds during the run (`/proc/PID/stat`), the load average and
every command run. Provenance of every figure: measured.

Parity variants (``--parity-threads``): one arm per intra-op thread count given (``OMP_NUM_THREADS`` of
the ``parity serve`` process; "auto" = parity's own choice) and step path given (``--parity-paths``:
eager = ``--enforce-eager``, compiled = ``--no-enforce-eager``, the default; a compiled arm's bench starts
once /metrics reports every compiled decode bucket warm). llama-server variants (``--llama-variants``),
all with ``--threads`` threads: "F32" (its defaults: f16 KV cache, flash attention auto, worker threads
polling for work), "poll0" (``--poll 0``: worker threads sleep instead of spinning for work),
"strict" (f32 KV cache, no flash attention).

Usage:
    .venv/bin/python benchmarks/vs_llama_server.py --llama-cpp DIR [--bin DIR/build/bin] [--threads 2]
        [--slots 4] [--rounds 2] [--parity-threads auto] [--parity-paths compiled,eager]
        [--llama-variants F32,poll0,strict]
        [--workload random:in=128,out=32,ratio=0.5] [--num-prompts 16] [--request-rate 4] [--work DIR]

DIR is a llama.cpp source tree (e.g. vendor/llama.cpp of the PyPI sdist llama-cpp-python 0.3.36) built
with cmake (Release, GGML_NATIVE=ON) including the ``llama-server`` target.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import torch
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from vs_llamacpp import convert, dequantized, write_release  # noqa: E402

from parity.checkpoint.writer import copy_tokenizer_files  # noqa: E402

#: Seconds a server may take to answer GET /v1/models after its start.
READY_TIMEOUT_S = 300.0
#: Seconds a compiled parity arm may take to warm its decode buckets up (cold inductor cache: ~1-2 min each).
COMPILE_TIMEOUT_S = 1200.0
#: Clock ticks per second of /proc/PID/stat's utime / stime.
CLK_TCK = os.sysconf("SC_CLK_TCK")
#: (summary key, label, lower is better) of the figures compared.
METRICS = (
    ("output_throughput_tok_s", "output tok/s", False),
    ("tpot_ms", "TPOT p50 (ms)", True),
    ("ttft_ms", "TTFT p50 (ms)", True),
    ("itl_ms", "ITL p50 (ms)", True),
)


#: llama-server variants: extra arguments over its defaults.
LLAMA_VARIANTS = {"F32": [], "poll0": ["--poll", "0"], "strict": ["-ctk", "f32", "-ctv", "f32", "-fa", "off"]}


def write_fp32(release: Path, out: Path) -> Path:
    """The release miniature's exact values as a float32 checkpoint (parity's own tensor names,
    config.json, tokenizer files): what llama.cpp's F32 GGUF of the release holds."""
    if (out / "model.safetensors").exists():
        return out
    from safetensors.torch import save_file

    from parity.checkpoint.reader import from_pretrained

    model = dequantized(from_pretrained(str(release), dtype=torch.float32))
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    model.config.save(out)
    copy_tokenizer_files(out)
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def wait_ready(proc: subprocess.Popen, base: str, log: Path) -> None:
    """Poll ``base``/health and then ``base``/v1/models until both answer 200 (llama-server answers 503 on
    /health while it loads). Raises RuntimeError if the server exits or takes longer than
    READY_TIMEOUT_S (its log named)."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    paths = ["/health", "/v1/models"]
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode} before it was ready; see {log}")
        try:
            with urllib.request.urlopen(f"{base}{paths[0]}", timeout=2) as r:
                if r.status == 200:
                    paths.pop(0)
                    if not paths:
                        return
                    continue
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"server not ready after {READY_TIMEOUT_S:.0f} s; see {log}")


def _gauges(text: str) -> dict[str, float]:
    """{name: value} of the unlabelled samples in a Prometheus exposition (prometheus_client's parser)."""
    return {
        smp.name: smp.value for fam in text_string_to_metric_families(text) for smp in fam.samples if not smp.labels
    }


def wait_compiled(proc: subprocess.Popen, base: str, log: Path) -> float:
    """For a compiled parity arm: poll ``base``/metrics until every compiled decode bucket is warm
    (``parity_compiled_decode_buckets_ready == _total``), so the bench measures the compiled step, not the
    start-up compile (a parity server answers at once and compiles in the background). Returns the seconds
    waited. Raises RuntimeError as `wait_ready`."""
    t0 = time.monotonic()
    deadline = t0 + COMPILE_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode} while compiling; see {log}")
        try:
            with urllib.request.urlopen(f"{base}/metrics", timeout=2) as r:
                text = r.read().decode()
            g = _gauges(text)
            ready = g.get("parity_compiled_decode_buckets_ready")
            total = g.get("parity_compiled_decode_buckets_total")
            if ready is None or (total is not None and ready >= total):
                return time.monotonic() - t0
        except OSError:
            pass
        time.sleep(1.0)
    raise RuntimeError(f"compiled buckets not warm after {COMPILE_TIMEOUT_S:.0f} s; see {log}")


def bench_command(a, base: str, out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "parity",
        "bench",
        "--base-url",
        base,
        "--model",
        "mini",
        "--endpoint",
        "completions",
        "--workload",
        a.workload,
        "--num-prompts",
        str(a.num_prompts),
        "--request-rate",
        str(a.request_rate),
        "--seed",
        str(a.seed),
        "--warmup",
        str(a.warmup),
        "--ignore-eos",
        "--energy",
        "none",
        "--no-progress",
        "--output",
        str(out),
        "--overwrite",
    ]


def server_command(a, arm: str, gguf: Path, ckpt: Path, port: int) -> tuple[list[str], dict]:
    """(argv, environment) of one arm's server."""
    env = dict(os.environ)
    if arm.startswith("parity"):
        _, threads, path = arm.split(":")
        if threads != "auto":
            env["OMP_NUM_THREADS"] = threads
        cmd = [sys.executable, "-m", "parity", "serve", str(ckpt), "--host", "127.0.0.1", "--port", str(port)]
        cmd += ["--max-num-seqs", str(a.slots), "--served-model-name", "mini", "--log-level", "warning"]
        return cmd + [f"--{'no-' if path == 'compiled' else ''}enforce-eager"] + shlex.split(a.parity_args), env
    t = str(a.threads)
    cmd = [str(a.bin / "llama-server"), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["-t", t, "-tb", t, "-np", str(a.slots), "-c", str(a.slots * a.slot_ctx), "-a", "mini", "--no-webui"]
    return cmd + LLAMA_VARIANTS[arm.partition(":")[2]], env


class ArmFailed(RuntimeError):
    """A bench run had failed requests."""


def run_arm_retrying(a, arm: str, gguf: Path, ckpt: Path, port: int, index: int) -> dict:
    """`run_arm`, run once more (and noted on stderr) when a request failed the first time."""
    try:
        return run_arm(a, arm, gguf, ckpt, port, index)
    except ArmFailed as e:
        print(f"# {e}; running it again", file=sys.stderr, flush=True)
        a.retries.append(str(e))
        return run_arm(a, arm, gguf, ckpt, port, index)


def run_arm(a, arm: str, gguf: Path, ckpt: Path, port: int, index: int) -> dict:
    """Start one server, run the bench against it, stop it. Returns the bench summary + cpu_s + load."""
    cmd, env = server_command(a, arm, gguf, ckpt, port)
    log = a.work / f"server-{index:02d}-{arm.replace(':', '-')}.log"
    out = a.work / f"bench-{index:02d}-{arm.replace(':', '-')}.json"
    base = f"http://127.0.0.1:{port}"
    bench = bench_command(a, base, out)
    omp = env.get("OMP_NUM_THREADS") if env.get("OMP_NUM_THREADS") != os.environ.get("OMP_NUM_THREADS") else None
    a.commands.setdefault(arm, (f"OMP_NUM_THREADS={omp} " if omp else "") + shlex.join(cmd))
    a.commands.setdefault("bench", shlex.join(bench))
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT)
    try:
        wait_ready(proc, base, log)
        if arm.endswith(":compiled"):
            waited = wait_compiled(proc, base, log)
            print(f"# {arm}: compiled buckets warm after {waited:.0f} s more", file=sys.stderr, flush=True)
        c0 = cpu_seconds(proc.pid)
        subprocess.run(bench, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        cpu = cpu_seconds(proc.pid) - c0
    finally:
        proc.send_signal(signal.SIGINT if arm.startswith("parity") else signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    s = json.loads(out.read_text())["summary"]
    if s["failed"] or s["completed"] != a.num_prompts:
        raise ArmFailed(f"{arm}: {s['failed']} failed, {s['completed']} completed; see {out}")
    row = {k: (s[k] if k == "output_throughput_tok_s" else s[k]["median"]) for k, _, _ in METRICS}
    row.update(cpu_s=cpu, load=os.getloadavg()[0], duration_s=s["duration_s"], output_tokens=s["total_output_tokens"])
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-cpp", required=True, type=Path, help="llama.cpp source dir (convert_hf_to_gguf.py)")
    ap.add_argument("--bin", type=Path, default=None, help="dir with llama-server and llama-quantize")
    ap.add_argument("--threads", type=int, default=2, help="llama-server --threads (default 2)")
    ap.add_argument("--parity-threads", default="auto", help="comma list of parity arms' OMP_NUM_THREADS or auto")
    ap.add_argument("--parity-paths", default="compiled", help="comma list of eager, compiled (parity's step path)")
    ap.add_argument("--parity-args", default="", help="extra `parity serve` arguments, e.g. --no-enforce-eager")
    ap.add_argument("--slots", type=int, default=4, help="llama-server -np = parity --max-num-seqs (default 4)")
    ap.add_argument("--slot-ctx", type=int, default=1024, help="llama-server context tokens per slot")
    ap.add_argument("--llama-variants", default="F32,poll0", help="comma list of F32, poll0, strict")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--workload", default="random:in=128,out=32,ratio=0.5")
    ap.add_argument("--num-prompts", type=int, default=16)
    ap.add_argument("--request-rate", default="4")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--port", type=int, default=18230)
    ap.add_argument("--work", type=Path, default=Path("/tmp/vs_llama_server"))
    a = ap.parse_args()
    a.bin = a.bin or a.llama_cpp / "build" / "bin"
    if not (a.bin / "llama-server").exists():
        raise SystemExit(f"no llama-server in {a.bin}: build it with `cmake --build . --target llama-server`")
    unknown = [v for v in a.llama_variants.split(",") if v not in LLAMA_VARIANTS]
    if unknown:
        raise SystemExit(f"--llama-variants: unknown {', '.join(unknown)}: expected {', '.join(LLAMA_VARIANTS)}")
    a.work.mkdir(parents=True, exist_ok=True)
    release = write_release(a.work / "mini-release")
    ckpt = write_fp32(release, a.work / "mini-fp32")
    gguf = convert(a.llama_cpp, a.bin, release)["F32"]
    llama_arms = [f"llama-server:{v}" for v in a.llama_variants.split(",")]
    paths = a.parity_paths.split(",")
    if not set(paths) <= {"eager", "compiled"}:
        raise SystemExit(f"--parity-paths: expected eager and/or compiled, got {a.parity_paths!r}")
    a.arms = [f"parity:{t}:{p}" for t in a.parity_threads.split(",") for p in paths] + llama_arms
    a.commands = {}
    a.retries = []
    res: dict[str, list[dict]] = {arm: [] for arm in a.arms}
    index = 0
    for r in range(a.rounds):
        for arm in a.arms if r % 2 == 0 else a.arms[::-1]:
            res[arm].append(run_arm_retrying(a, arm, gguf, ckpt, a.port + index % 8, index))
            index += 1
            x = res[arm][-1]
            print(
                f"# round {r + 1} {arm}: {x['output_throughput_tok_s']:.1f} tok/s, TPOT p50 {x['tpot_ms']:.1f} ms, "
                f"TTFT p50 {x['ttft_ms']:.1f} ms, CPU {x['cpu_s']:.1f} s, load {x['load']:.1f}",
                file=sys.stderr,
                flush=True,
            )
    commit = subprocess.run(
        ["git", "-C", str(a.llama_cpp), "rev-parse", "--short=9", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    loads = [x["load"] for rows in res.values() for x in rows]
    print(
        f"# vs_llama_server: llama.cpp {commit or 'unknown'} ({a.bin}); torch {torch.__version__}; "
        f"{a.rounds} interleaved rounds; load average {min(loads):.1f}-{max(loads):.1f}; workload {a.workload}, "
        f"{a.num_prompts} prompts at {a.request_rate} req/s, seed {a.seed}, warm-up {a.warmup}"
    )
    for arm, cmd in a.commands.items():
        print(f"# {arm}: {cmd}")
    for msg in a.retries:
        print(f"# run again after failed requests: {msg}")
    print("| server | " + " | ".join(label for _, label, _ in METRICS) + " | server CPU s | runs |")
    print("|---|" + "---|" * (len(METRICS) + 2))
    for arm in a.arms:
        cells = []
        for k, _, _ in METRICS:
            vals = [x[k] for x in res[arm]]
            cells.append(f"{statistics.median(vals):,.1f} ({' / '.join(f'{v:,.1f}' for v in vals)})")
        cpu = statistics.median(x["cpu_s"] for x in res[arm])
        print(f"| {arm} | " + " | ".join(cells) + f" | {cpu:.1f} | {len(res[arm])} |")
    print("ratios (median over rounds; >= 1 = parity at least as good):")
    for p in (x for x in a.arms if x.startswith("parity")):
        for lla in llama_arms:
            parts = []
            for k, label, lower in METRICS:
                rs = [(y[k] / x[k]) if lower else (x[k] / y[k]) for x, y in zip(res[p], res[lla], strict=True) if x[k]]
                parts.append(f"{label.split(' (')[0]} {statistics.median(rs):.2f}")
            tp = statistics.median(x["tpot_ms"] for x in res[p]) <= statistics.median(x["tpot_ms"] for x in res[lla])
            tk = statistics.median(x["output_throughput_tok_s"] for x in res[p]) >= statistics.median(
                x["output_throughput_tok_s"] for x in res[lla]
            )
            verdict = "met" if tp and tk else "not met"
            print(f"  {p} vs {lla}: " + ", ".join(parts) + f"; TPOT p50 and tok/s target: {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
