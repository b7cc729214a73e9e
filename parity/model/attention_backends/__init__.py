"""Attention backends: the interface and registry (`base`) and the torch reference (`torch_reference`)."""

from parity.model.attention_backends import torch_reference
from parity.model.attention_backends.base import (
    AttentionBackend,
    AttentionBatch,
    ChunkKeys,
    DecodeKeys,
    create_backend,
    register_backend,
)
from parity.model.attention_backends.torch_reference import TorchBackend, sink_softmax, sparse_sink_attention

__all__ = [
    "AttentionBackend",
    "AttentionBatch",
    "ChunkKeys",
    "DecodeKeys",
    "TorchBackend",
    "create_backend",
    "register_backend",
    "sink_softmax",
    "sparse_sink_attention",
    "torch_reference",
]
