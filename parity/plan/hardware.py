"""Hardware catalog: one TOML file per accelerator in `parity/data/hardware/`, plus the calibration
constants of each hardware family in `parity/data/hardware/families.toml`.

Every number in an entry is an inline table `{ value = ..., source = "..." [, status = "estimate"] }`;
`value = "null"` means the chip lacks the feature (e.g. FP8 on Ascend 910B/910C) or no public figure
exists. Peak TFLOPS are dense (no 2:4 sparsity); link bandwidths are GB/s per device per direction.
The loader refuses an entry where a number has no `source` or the entry has no `status`.
"""

from __future__ import annotations

import difflib
import tomllib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from parity.errors import PlanError

HARDWARE_DIR = Path(__file__).resolve().parent.parent / "data" / "hardware"
FAMILIES_FILE = "families.toml"
STACKS_FILE = "stacks.toml"
STATUSES = ("shipping", "announced")
DTYPES = ("bf16", "fp8", "int8", "fp4")

_REQUIRED = {
    "peak_tflops": DTYPES,
    "memory": ("hbm_gb", "hbm_tb_s"),
    "links": ("scaleup_domain", "scaleup_gb_s", "scaleout_gb_s"),
    "power": ("tdp_w",),
    "price": ("usd_per_hour",),
}


@dataclass(frozen=True)
class Hardware:
    """One accelerator (per device as `unit` says). Units: TFLOPS, GB, TB/s, GB/s, W, USD/h."""

    id: str
    name: str
    vendor: str
    family: str
    status: str
    unit: str
    source: str
    peak_tflops: dict  # dtype -> float | None
    hbm_gb: float
    hbm_tb_s: float
    scaleup_domain: int
    scaleup_gb_s: float
    scaleout_gb_s: float
    tdp_w: float | None
    usd_per_hour: float | None
    dies: int = 1
    host_cpu: str = ""  # the host CPU family of the node ('x86', 'grace', ...; '' = not recorded)
    aliases: tuple = ()
    sources: dict = field(default_factory=dict)  # "section.key" -> source text
    estimates: tuple = ()  # "section.key" whose status is estimate

    def peak(self, dtype: str) -> float | None:
        """Dense peak in FLOP/s for `dtype` (None when the chip lacks it)."""
        v = self.peak_tflops.get(dtype)
        return None if v is None else v * 1e12

    def best_dtype(self, wanted: str) -> str:
        """The compute dtype actually used for a format: `wanted` if supported, else the next wider one
        the chip has (fp4 -> fp8 -> int8 -> bf16)."""
        order = ["fp4", "fp8", "int8", "bf16"]
        for dt in order[order.index(wanted) :]:
            if self.peak_tflops.get(dt):
                return dt
        return "bf16"

    def weight_compute_dtype(self, fmt: str) -> str:
        """The dtype a GEMM with weights stored in `fmt` computes in on this chip.

        4-bit weights on a chip without FP4 math are dequantized in the kernel and multiplied in BF16
        (W4A16: vLLM's Marlin MoE, `--moe-backend marlin` in ai-dynamo/dynamo's V4-Pro H200 recipe and
        SGLang's H200 V4-Flash low-latency cell, sgl-project/sglang#33109); INT4 weights with INT8
        activations (W4A8) compute in INT8; other formats as `best_dtype`."""
        if fmt == "fp4":
            return "fp4" if self.peak_tflops.get("fp4") else "bf16"
        if fmt == "int4":
            return self.best_dtype("int8")
        return self.best_dtype(fmt)


def _value(entry: dict, section: str, key: str, path: Path):
    sec = entry.get(section)
    if not isinstance(sec, dict) or key not in sec:
        raise PlanError(
            f'hardware file {path.name}: missing field [{section}] {key} (expected {{ value = ..., source = "..." }})'
        )
    item = sec[key]
    if not isinstance(item, dict) or "value" not in item or not str(item.get("source", "")).strip():
        raise PlanError(
            f"hardware file {path.name}: field [{section}] {key} must be "
            f'{{ value = ..., source = "..." }} with a non-empty source, got {item!r}'
        )
    v = item["value"]
    if v == "null":
        return None, item
    if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0:
        raise PlanError(
            f"hardware file {path.name}: field [{section}] {key} value must be a non-negative "
            f'number or "null", got {v!r}'
        )
    return float(v), item


def _host_cpu(d: dict, path: Path) -> str:
    """The optional `host_cpu` field (with its `host_cpu_source`)."""
    cpu = d.get("host_cpu", "")
    if not isinstance(cpu, str):
        raise PlanError(f"hardware file {path.name}: field 'host_cpu' must be a string, got {cpu!r}")
    if cpu and not str(d.get("host_cpu_source", "")).strip():
        raise PlanError(f"hardware file {path.name}: field 'host_cpu' needs a 'host_cpu_source'")
    return cpu


def load_hardware_file(path: Path) -> Hardware:
    """Parse and validate one hardware TOML file.

    Raises:
        PlanError: unreadable TOML, missing/ill-typed field or source, bad status (names file and field).
    """
    try:
        d = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise PlanError(f"hardware file {path.name} is not valid TOML: {e}") from None
    for key in ("id", "name", "vendor", "family", "status", "source"):
        if not isinstance(d.get(key), str) or not d[key].strip():
            raise PlanError(f"hardware file {path.name}: field {key!r} must be a non-empty string")
    if d["status"] not in STATUSES:
        raise PlanError(f"hardware file {path.name}: field 'status' is {d['status']!r}: expected one of {STATUSES}")
    vals, sources, estimates = {}, {}, []
    for section, keys in _REQUIRED.items():
        for key in keys:
            v, item = _value(d, section, key, path)
            vals[f"{section}.{key}"] = v
            sources[f"{section}.{key}"] = item["source"]
            if item.get("status") == "estimate":
                estimates.append(f"{section}.{key}")
    for key in (
        "memory.hbm_gb",
        "memory.hbm_tb_s",
        "links.scaleup_domain",
        "links.scaleup_gb_s",
        "links.scaleout_gb_s",
        "peak_tflops.bf16",
    ):
        if not vals[key]:
            raise PlanError(f"hardware file {path.name}: field {key} must be a positive number")
    return Hardware(
        id=d["id"],
        name=d["name"],
        vendor=d["vendor"],
        family=d["family"],
        status=d["status"],
        unit=d.get("unit", "per device"),
        source=d["source"],
        peak_tflops={dt: vals[f"peak_tflops.{dt}"] for dt in DTYPES},
        hbm_gb=vals["memory.hbm_gb"],
        hbm_tb_s=vals["memory.hbm_tb_s"],
        scaleup_domain=int(vals["links.scaleup_domain"]),
        scaleup_gb_s=vals["links.scaleup_gb_s"],
        scaleout_gb_s=vals["links.scaleout_gb_s"],
        tdp_w=vals["power.tdp_w"],
        usd_per_hour=vals["price.usd_per_hour"],
        dies=int(d.get("dies", 1)),
        host_cpu=_host_cpu(d, path),
        aliases=tuple(d.get("aliases", ())),
        sources=sources,
        estimates=tuple(estimates),
    )


@lru_cache(maxsize=8)
def _catalog(directory: str) -> dict[str, Hardware]:
    out = {}
    for p in sorted(Path(directory).glob("*.toml")):
        if p.name in (FAMILIES_FILE, STACKS_FILE):
            continue
        hw = load_hardware_file(p)
        if hw.id in out:
            raise PlanError(f"hardware file {p.name}: duplicate id {hw.id!r}")
        out[hw.id] = hw
    return out


def catalog(directory: str | Path | None = None) -> dict[str, Hardware]:
    """All hardware entries by id (cached). Raises PlanError on a malformed file."""
    return _catalog(str(directory or HARDWARE_DIR))


def get_hardware(name: str, directory: str | Path | None = None) -> Hardware:
    """Look up by id or alias (case-insensitive).

    Raises:
        PlanError: unknown name; the message suggests the closest ids.
    """
    cat = catalog(directory)
    key = name.strip().lower()
    for hw in cat.values():
        if key == hw.id or key in hw.aliases:
            return hw
    names = sorted(cat) + sorted(a for hw in cat.values() for a in hw.aliases)
    close = difflib.get_close_matches(key, names, n=3, cutoff=0.4)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    known = ", ".join(f"{i} ({', '.join(cat[i].aliases)})" if cat[i].aliases else i for i in sorted(cat))
    raise PlanError(f"unknown hardware {name!r}: known are {known}{hint}")


@dataclass(frozen=True)
class Family:
    """Calibration constants of a hardware family (fractions of peak, 0 < x <= 1), shared by all its
    entries: `gemm_eff` of dense peak in GEMMs, `attn_eff` of peak in attention kernels, `hbm_eff` of HBM
    bandwidth, `link_eff` of link bandwidth in all-to-all / all-reduce."""

    id: str
    gemm_eff: float
    attn_eff: float
    hbm_eff: float
    link_eff: float
    source: str

    def as_dict(self) -> dict:
        return {
            "gemm_eff": self.gemm_eff,
            "attn_eff": self.attn_eff,
            "hbm_eff": self.hbm_eff,
            "link_eff": self.link_eff,
        }


CONSTANT_NAMES = ("gemm_eff", "attn_eff", "hbm_eff", "link_eff")


@lru_cache(maxsize=8)
def _families(directory: str) -> dict[str, Family]:
    path = Path(directory) / FAMILIES_FILE
    try:
        d = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise PlanError(f"calibration file {path.name} is not readable TOML: {e}") from None
    out = {}
    for fid, sec in d.items():
        if not isinstance(sec, dict):
            continue
        vals = {}
        for k in CONSTANT_NAMES:
            v = sec.get(k)
            if not isinstance(v, (int, float)) or not 0 < v <= 1:
                raise PlanError(f"calibration file {path.name}: [{fid}] {k} must be a number in (0, 1], got {v!r}")
            vals[k] = float(v)
        if not str(sec.get("source", "")).strip():
            raise PlanError(f"calibration file {path.name}: [{fid}] needs a 'source'")
        out[fid] = Family(id=fid, source=sec["source"], **vals)
    return out


def families(directory: str | Path | None = None) -> dict[str, Family]:
    """Calibration constants per family id. Raises PlanError on a malformed file."""
    return _families(str(directory or HARDWARE_DIR))


def family_of(hw: Hardware, directory: str | Path | None = None) -> Family:
    """Calibration constants for `hw`. Raises PlanError if its family has none."""
    fams = families(directory)
    if hw.family not in fams:
        raise PlanError(f"hardware {hw.id!r}: family {hw.family!r} has no calibration constants in {FAMILIES_FILE}")
    return fams[hw.family]


@dataclass(frozen=True)
class Stack:
    """A software stack's latency floor per decoder layer per step (s; `layer_latency_s` for a DeepSeek-V3/R1
    MLA layer, `v4_layer_latency_s` for a DeepSeek-V4 layer, whose mHC, compressor and indexer add
    kernels), the latency of one small-message tensor-parallel all-reduce per TP size (s,
    `allreduce_latency_s`), the host time per decoder layer of a step it does not capture in a graph (s,
    `eager_layer_host_s`: prefill and mixed steps), its default token budget per step
    (`max_num_batched_tokens`: a longer prompt is prefilled in chunks), with sources."""

    id: str
    layer_latency_s: float
    source: str
    eager_layer_host_s: float = 0.0
    eager_source: str = ""
    max_num_batched_tokens: int = 8192
    chunk_source: str = ""
    v4_layer_latency_s: float = 0.0
    v4_source: str = ""
    eager_host_by_cpu: tuple = ()  # ((host cpu, seconds per layer), ...) overriding eager_layer_host_s
    allreduce_latency_s: tuple = ()  # ((tp size, seconds), ...) ascending
    allreduce_source: str = ""

    def layer_latency(self, arch_kind: str) -> float:
        """Latency floor (s) of one decoder layer of an architecture ('v4' or 'mla') per step."""
        return self.v4_layer_latency_s if arch_kind == "v4" and self.v4_layer_latency_s else self.layer_latency_s

    def eager_host(self, host_cpu: str) -> float:
        """Host time (s) to launch one decoder layer of an eager step on a node with `host_cpu`."""
        return dict(self.eager_host_by_cpu).get(host_cpu, self.eager_layer_host_s)

    def allreduce_latency(self, tp: int) -> float:
        """Latency (s) of one small-message all-reduce over `tp` devices: the entry of the smallest listed
        TP size >= tp (the largest listed beyond it); 0 for tp = 1 or when the stack lists none."""
        if tp <= 1 or not self.allreduce_latency_s:
            return 0.0
        for size, sec in self.allreduce_latency_s:
            if size >= tp:
                return sec
        return self.allreduce_latency_s[-1][1]


@lru_cache(maxsize=8)
def _stacks(directory: str) -> dict[str, Stack]:
    path = Path(directory) / STACKS_FILE
    try:
        d = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise PlanError(f"stack file {path.name} is not readable TOML: {e}") from None
    out = {}
    for sid, sec in d.items():
        v = sec.get("layer_latency_us") if isinstance(sec, dict) else None
        if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0:
            raise PlanError(f"stack file {path.name}: [{sid}] layer_latency_us must be a number >= 0, got {v!r}")
        if not str(sec.get("source", "")).strip():
            raise PlanError(f"stack file {path.name}: [{sid}] needs a 'source'")
        host = sec.get("eager_layer_host_us", 0.0)
        if not isinstance(host, (int, float)) or isinstance(host, bool) or host < 0:
            raise PlanError(f"stack file {path.name}: [{sid}] eager_layer_host_us must be a number >= 0, got {host!r}")
        if host and not str(sec.get("eager_source", "")).strip():
            raise PlanError(f"stack file {path.name}: [{sid}] eager_layer_host_us needs an 'eager_source'")
        chunk = sec.get("max_num_batched_tokens", 8192)
        if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
            raise PlanError(
                f"stack file {path.name}: [{sid}] max_num_batched_tokens must be a positive integer, got {chunk!r}"
            )
        v4 = sec.get("v4_layer_latency_us", 0.0)
        if not isinstance(v4, (int, float)) or isinstance(v4, bool) or v4 < 0:
            raise PlanError(f"stack file {path.name}: [{sid}] v4_layer_latency_us must be a number >= 0, got {v4!r}")
        if v4 and not str(sec.get("v4_source", "")).strip():
            raise PlanError(f"stack file {path.name}: [{sid}] v4_layer_latency_us needs a 'v4_source'")
        by_cpu = sec.get("eager_layer_host_us_by_cpu", {})
        if not isinstance(by_cpu, dict) or not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and x >= 0 for x in by_cpu.values()
        ):
            raise PlanError(
                f"stack file {path.name}: [{sid}] eager_layer_host_us_by_cpu must map host CPUs to microseconds >= 0"
            )
        ar = sec.get("allreduce_latency_us", {})
        if not isinstance(ar, dict) or not all(
            k.isdigit() and isinstance(x, (int, float)) and not isinstance(x, bool) and x >= 0 for k, x in ar.items()
        ):
            raise PlanError(
                f"stack file {path.name}: [{sid}] allreduce_latency_us must map TP sizes to microseconds >= 0"
            )
        if ar and not str(sec.get("allreduce_source", "")).strip():
            raise PlanError(f"stack file {path.name}: [{sid}] allreduce_latency_us needs an 'allreduce_source'")
        out[sid] = Stack(
            id=sid,
            layer_latency_s=float(v) * 1e-6,
            v4_layer_latency_s=float(v4) * 1e-6,
            v4_source=sec.get("v4_source", ""),
            allreduce_latency_s=tuple(sorted((int(k), float(x) * 1e-6) for k, x in ar.items())),
            allreduce_source=sec.get("allreduce_source", ""),
            source=sec["source"],
            eager_layer_host_s=float(host) * 1e-6,
            eager_host_by_cpu=tuple(sorted((k, float(x) * 1e-6) for k, x in by_cpu.items())),
            eager_source=sec.get("eager_source", ""),
            max_num_batched_tokens=chunk,
            chunk_source=sec.get("chunk_source", ""),
        )
    return out


def stacks(directory: str | Path | None = None) -> dict[str, Stack]:
    """Latency floor per software stack id (`stacks.toml`). Raises PlanError on a malformed file."""
    return _stacks(str(directory or HARDWARE_DIR))
