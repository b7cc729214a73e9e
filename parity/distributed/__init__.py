"""Tensor, expert and data parallelism over torch.distributed: layout, process groups, collectives.

`ParallelConfig` (torch-free) says how a model is split; `ParallelContext` is one rank's view of it
(its TP / DP / EP coordinates and process groups); `parity.distributed.collectives` wraps the few
collectives the model needs so a single process runs them as no-ops.
"""

from parity.distributed.config import ParallelConfig

__all__ = ["ParallelConfig"]
