"""`ParallelContext`: one rank's place in a `ParallelConfig` and its torch.distributed process groups.

Rank layout: ``rank = dp_rank * tp + tp_rank`` (a replica's TP ranks are consecutive, so one node's
devices form whole TP groups, as in vLLM). Groups: ``tp_group`` (the ranks of this replica),
``dp_group`` (ranks with the same ``tp_rank``), ``world`` (every rank; the EP group with expert
parallelism on) and ``control`` (a gloo group over every rank for CPU control messages, whatever the
device backend). The backend per device type comes from `parity.devices.dist_backend`.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from parity import devices
from parity.distributed.config import DEFAULT_TIMEOUT_S, ParallelConfig
from parity.errors import ParallelError


@dataclass
class ParallelContext:
    """A rank's coordinates and groups. ``ParallelContext.single()`` is the single-process context
    (every collective a no-op); `init_parallel` builds a real one.

    Attributes:
        config: the `ParallelConfig`. rank / world_size: global rank and size.
        tp_rank, dp_rank, ep_rank: coordinates (ep_rank = rank with expert parallelism, else 0).
        tp_group, dp_group, world_group, control_group: torch.distributed groups (None when single).
        device: this rank's torch.device.
    """

    config: ParallelConfig
    rank: int = 0
    world_size: int = 1
    tp_group: object = None
    dp_group: object = None
    world_group: object = None
    control_group: object = None
    device: torch.device | None = None

    @classmethod
    def single(cls, device=None) -> ParallelContext:
        """One process, no groups."""
        return cls(ParallelConfig(), device=torch.device(device) if device is not None else None)

    @property
    def tp(self) -> int:
        return self.config.tp

    @property
    def dp(self) -> int:
        return self.config.dp

    @property
    def ep(self) -> int:
        return self.config.ep

    @property
    def tp_rank(self) -> int:
        return self.rank % self.config.tp

    @property
    def dp_rank(self) -> int:
        return self.rank // self.config.tp

    @property
    def ep_rank(self) -> int:
        return self.rank if self.config.enable_expert_parallel else 0

    @property
    def is_single(self) -> bool:
        return self.world_size == 1

    @property
    def is_driver(self) -> bool:
        """Rank 0: runs the scheduler (and the HTTP server)."""
        return self.rank == 0


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now (for the rendezvous of locally spawned ranks)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def rank_device(device_type: str, local_rank: int) -> torch.device:
    """The device of a local rank: ``cpu`` for every CPU rank, else ``<type>:<local_rank>``.

    Raises:
        DeviceError: the device does not exist (`parity.devices.resolve`).
    """
    if device_type == "cpu":
        return devices.resolve("cpu")
    return devices.resolve(f"{device_type}:{local_rank}")


def init_parallel(
    config: ParallelConfig, rank: int, device, init_method: str, timeout_s: float = DEFAULT_TIMEOUT_S
) -> ParallelContext:
    """Join the process group of ``config.world_size`` ranks and create the TP / DP / control groups.

    Args:
        config: the layout. rank: this process's global rank. device: its torch.device.
        init_method: rendezvous URL ("tcp://127.0.0.1:29500", "env://" under torchrun).
        timeout_s: start-up and collective timeout in seconds.
    Returns:
        The `ParallelContext` of this rank.
    Raises:
        ParallelError: the rendezvous did not complete within ``timeout_s`` (a rank that never came up).
    """
    device = torch.device(device)
    backend = devices.dist_backend(device)
    timeout = datetime.timedelta(seconds=timeout_s)
    world = config.world_size
    try:
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world, timeout=timeout)
    except (RuntimeError, dist.DistError) as e:
        raise ParallelError(
            f"rank {rank} of {world}: process group ({backend}, {init_method}) did not form within "
            f"{timeout_s:.0f} s: {e}"
        ) from None
    ctx = ParallelContext(config, rank=rank, world_size=world, world_group=dist.group.WORLD, device=device)
    tp = config.tp
    for d in range(config.dp):  # every rank creates every group, in the same order
        g = dist.new_group(list(range(d * tp, (d + 1) * tp)), timeout=timeout)
        if ctx.dp_rank == d:
            ctx.tp_group = g
    for t in range(tp):
        g = dist.new_group(list(range(t, world, tp)), timeout=timeout)
        if ctx.tp_rank == t:
            ctx.dp_group = g
    ctx.control_group = (
        dist.new_group(list(range(world)), backend="gloo", timeout=timeout) if backend != "gloo" else dist.group.WORLD
    )
    return ctx


def env_rank() -> tuple[int, int, int] | None:
    """(RANK, LOCAL_RANK, WORLD_SIZE) from the environment torchrun sets, or None outside torchrun."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    rank = int(os.environ["RANK"])
    return rank, int(os.environ.get("LOCAL_RANK", rank)), int(os.environ["WORLD_SIZE"])


def shutdown_parallel() -> None:
    """Leave the process group (no-op when none was joined)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
