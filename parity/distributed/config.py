"""`ParallelConfig`: how a V4 model is split over ranks (torch-free; the planner and `parity info` use it).

Flags and their meaning follow vLLM (``--tensor-parallel-size``, ``--data-parallel-size``,
``--enable-expert-parallel``): world size = TP x DP; with expert parallelism on, the routed experts are
partitioned over all TP x DP ranks (EP size = TP x DP), otherwise every rank keeps every expert and
TP splits each expert's intermediate dimension.
"""

from __future__ import annotations

from dataclasses import dataclass

from parity.errors import ParallelError

#: Default seconds a rank waits for the others at start-up and in any collective (gloo / nccl / hccl
#: timeout) before it fails; bounds how long a hung rank can stall the server.
DEFAULT_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class ParallelConfig:
    """Parallel layout.

    Attributes:
        tensor_parallel_size: TP ranks per model replica (query heads, output groups, shared expert,
            vocabulary split; the single KV head, compressors and indexer replicated).
        data_parallel_size: attention replicas (each runs its own sequences); with expert parallelism the
            MoE layers span all replicas.
        enable_expert_parallel: partition routed experts over all TP x DP ranks.
    """

    tensor_parallel_size: int = 1
    data_parallel_size: int = 1
    enable_expert_parallel: bool = False

    def __post_init__(self):
        for name in ("tensor_parallel_size", "data_parallel_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ParallelError(f"{name} must be a positive integer, got {v!r}")

    @property
    def tp(self) -> int:
        return self.tensor_parallel_size

    @property
    def dp(self) -> int:
        return self.data_parallel_size

    @property
    def world_size(self) -> int:
        """Ranks (devices) in all: TP x DP."""
        return self.tp * self.dp

    @property
    def ep(self) -> int:
        """Expert-parallel size: TP x DP with expert parallelism on, else 1."""
        return self.world_size if self.enable_expert_parallel else 1

    def describe(self) -> str:
        """ "TP=2 x DP=2, EP=4" style label."""
        s = f"TP={self.tp}"
        if self.dp > 1:
            s += f" x DP={self.dp}"
        if self.enable_expert_parallel:
            s += f", EP={self.ep}"
        return s

    def validate(self, cfg) -> None:
        """Check the layout against a `parity.config.ModelConfig`.

        Raises:
            ParallelError: naming the field that is not divisible (attention heads, output groups,
                vocabulary, expert or shared-expert intermediate size by TP; routed experts by EP).
        """
        tp, ep = self.tp, self.ep
        checks = [
            ("num_attention_heads", cfg.num_attention_heads, tp, "tensor_parallel_size"),
            ("o_groups", cfg.o_groups, tp, "tensor_parallel_size"),
            ("vocab_size", cfg.vocab_size, tp, "tensor_parallel_size"),
            (
                "moe_intermediate_size * n_shared_experts",
                cfg.moe_intermediate_size * max(cfg.n_shared_experts, 1),
                tp,
                "tensor_parallel_size",
            ),
            ("n_routed_experts", cfg.n_routed_experts, ep, "expert-parallel size (TP x DP)"),
        ]
        if not self.enable_expert_parallel:
            checks.append(("moe_intermediate_size", cfg.moe_intermediate_size, tp, "tensor_parallel_size"))
        for field, value, size, what in checks:
            if size > 1 and value % size:
                raise ParallelError(
                    f"model field {field!r} is {value}, not divisible by the {what} {size} "
                    f"({self.describe()}); choose a size that divides it"
                )
