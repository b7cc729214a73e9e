"""`BenchConfig`: every setting of one benchmark run, validated, as recorded in the result."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass

from parity.bench.client import endpoint_url
from parity.bench.metrics import parse_slo
from parity.bench.workloads import parse_workload
from parity.errors import BenchError, PlanError
from parity.plan.hardware import Hardware, get_hardware


def declared_hardware(name: str) -> Hardware:
    """The catalog entry of ``--hardware`` (id or alias).

    Raises:
        BenchError: unknown name (the message lists the known ids and the closest matches).
    """
    try:
        return get_hardware(name)
    except PlanError as e:
        raise BenchError(f"--hardware: {e}") from None


@dataclass
class BenchConfig:
    """Everything that defines a run (recorded verbatim in the result's `config`).

    Attributes:
        base_url: server root, e.g. http://127.0.0.1:8000 (a trailing /v1 is accepted).
        model: model name sent in each request (None/"": `run_bench` asks the server, the first entry of
            GET /v1/models).
        endpoint: "chat" | "completions".
        workload: ``--workload`` spec (see parity.bench.workloads).
        num_prompts: requests to send (None: workload default).
        request_rate: requests/s, math.inf = all at once.
        burstiness: gamma shape of inter-arrival gaps (1 = Poisson).
        max_concurrency: cap on requests in flight (None = no cap).
        warmup: requests sent (and discarded) before the measured run.
        slo: ``--slo`` string, e.g. "ttft_ms=200,tpot_ms=50".
        ignore_eos: ask the server to ignore EOS (vLLM/SGLang extension) so outputs reach max_tokens.
        seed: seeds prompts, lengths and arrival gaps.
        energy: "auto" | "none" | comma list of "nvml", "npu-smi", "rapl" (auto: accelerator meter + RAPL when
            readable, see parity.devices.energy.open_meters).
        energy_devices: accelerator indices to meter (None = all).
        tokenizer: tokenizer.json path (None = parity's V4 tokenizer).
        api_key: sent as ``Authorization: Bearer`` (None: $OPENAI_API_KEY if set).
        timeout_s: total time in s one request may take, from sending it to the end of its stream (a slower
            one fails with a timeout); also the limit of the model-list and server probes.
        temperature: sent with each request (None = not sent).
        continuous_usage: ask for usage in every chunk (stream_options.continuous_usage_stats).
        output: JSON result path (None = not written).
        progress: show a progress bar.
        client_workers: client processes sharing the requests (round robin) and the concurrency cap, so that
            the client is not CPU-bound on fast servers; 1 = this process only.
        hardware: the server's accelerator as declared by the user, a catalog id or alias of
            `parity.plan.hardware` (None = not declared; per-device figures then assume 1 device).
        num_devices: accelerators serving the endpoint (per-device figures divide by it; None = 1).
        idle_baseline_s: seconds of idle power measured before the run and subtracted from the steady-state
            energy (0 = no baseline).
        plan_model: the planner's model preset for the served model (e.g. v4-flash) for modeled-vs-measured
            figures (None: guessed from the model name).
        command_line: the command that started the run (recorded in the metadata; None = not known).
    """

    base_url: str
    model: str | None = None
    endpoint: str = "chat"
    workload: str = "random:in=1024,out=128"
    num_prompts: int | None = None
    request_rate: float = math.inf
    burstiness: float = 1.0
    max_concurrency: int | None = None
    warmup: int = 0
    slo: str | None = None
    ignore_eos: bool = False
    seed: int = 0
    energy: str = "auto"
    energy_devices: list[int] | None = None
    tokenizer: str | None = None
    api_key: str | None = None
    timeout_s: float = 600.0
    temperature: float | None = 0.0
    continuous_usage: bool = True
    output: str | None = None
    progress: bool = True
    client_workers: int = 1
    hardware: str | None = None
    num_devices: int | None = None
    idle_baseline_s: float = 0.0
    plan_model: str | None = None
    command_line: list[str] | None = None

    def validate(self, need_model: bool = True) -> None:
        """Check every field; NaN is refused everywhere, infinity everywhere but `request_rate`.

        Raises:
            BenchError: naming the flag, for an out-of-range or non-finite value (a missing model only when
                `need_model`).
        """
        endpoint_url(self.base_url, self.endpoint)
        if need_model and not self.model:
            raise BenchError("--model is required (the model name the server serves)")
        # NaN fails every comparison, so each check below is written to reject it (`not x > 0`, math.isfinite)
        if not (self.request_rate > 0):
            raise BenchError(f"--request-rate must be > 0 (requests/s) or inf, got {self.request_rate}")
        if not (self.burstiness > 0) or not math.isfinite(self.burstiness):
            raise BenchError(f"--burstiness must be a finite number > 0, got {self.burstiness}")
        if self.num_prompts is not None and self.num_prompts < 1:
            raise BenchError(f"--num-prompts must be >= 1, got {self.num_prompts}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise BenchError(f"--max-concurrency must be >= 1, got {self.max_concurrency}")
        if self.warmup < 0:
            raise BenchError(f"--warmup must be >= 0, got {self.warmup}")
        if not 1 <= self.client_workers <= 256:
            raise BenchError(f"--client-workers must be in [1, 256], got {self.client_workers}")
        if self.api_key is not None and not self.api_key.strip():
            raise BenchError("--api-key is empty; to send no key, pass no --api-key (and leave $OPENAI_API_KEY unset)")
        if not self.timeout_s > 0 or not math.isfinite(self.timeout_s):
            raise BenchError(f"--timeout must be a finite number of seconds > 0, got {self.timeout_s}")
        if self.temperature is not None and (not math.isfinite(self.temperature) or self.temperature < 0):
            raise BenchError(f"--temperature must be a finite number >= 0, got {self.temperature}")
        if self.num_devices is not None and self.num_devices < 1:
            raise BenchError(f"--num-devices must be >= 1, got {self.num_devices}")
        if not self.idle_baseline_s >= 0 or not math.isfinite(self.idle_baseline_s):
            raise BenchError(f"--idle-baseline must be a finite number of seconds >= 0, got {self.idle_baseline_s}")
        if self.hardware is not None:
            declared_hardware(self.hardware)
        parse_slo(self.slo)
        parse_workload(self.workload)

    def auth_headers(self) -> dict:
        """``Authorization: Bearer`` from `api_key`, else from $OPENAI_API_KEY; {} when neither is set."""
        key = self.api_key if self.api_key is not None else os.environ.get("OPENAI_API_KEY")
        return {"Authorization": f"Bearer {key}"} if key else {}

    def to_dict(self) -> dict:
        d = asdict(self)
        d["request_rate"] = "inf" if math.isinf(self.request_rate) else self.request_rate
        d["api_key"] = "***" if self.api_key else None
        return d
