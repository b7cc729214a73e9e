"""The attention-backend seam: the reference `sparse_sink_attention`, the torch backend's fast paths
against it, and the per-device backend choice."""

import pytest
import torch

from parity import devices
from parity.errors import ConfigError
from parity.model.attention_backends import (
    AttentionBatch,
    ChunkKeys,
    DecodeKeys,
    TorchBackend,
    create_backend,
    register_backend,
    sparse_sink_attention,
)
from parity.model.compressor import Indexer

H, D = 4, 8


def _naive(q, keys, sink, scale):
    """One query [H, D] over its key rows [K, D]: softmax with the sink logit appended."""
    lg = torch.cat([(keys @ q.T).T * scale, sink[:, None]], dim=1).softmax(dim=1)
    return lg[:, :-1] @ keys


def test_reference_matches_naive_and_sink_takes_mass():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, H, D, generator=g)
    kv = torch.randn(2, 5, D, generator=g)
    sink = torch.randn(H, generator=g)
    idx = torch.tensor([[[0, 2, -1], [4, -1, -1], [-1, -1, -1]], [[1, 1, 3], [0, 1, 2], [4, 3, -1]]])
    out = sparse_sink_attention(q, kv, sink, idx, 0.5)
    assert out.shape == (2, 3, H, D)
    for b in range(2):
        for s in range(3):
            rows = [int(i) for i in idx[b, s] if i >= 0]
            want = _naive(q[b, s], kv[b, rows], sink, 0.5) if rows else torch.zeros(H, D)
            torch.testing.assert_close(out[b, s], want)


def _chunk_index_lists(ch: ChunkKeys, W: int):
    """Official-style (kv rows, topk_idxs) of one chunk: rows [old | new | entries], -1 = none."""
    o = ch.old.shape[0]
    kv = torch.cat([ch.old, ch.new] + ([ch.entries] if ch.entries is not None else []))
    lists = []
    for i in range(ch.n):
        t = ch.pos + i
        rows = [pos - (ch.pos - o) for pos in range(max(0, t - W + 1), t + 1)]
        n_vis = (t + 1) // ch.ratio if ch.entries is not None else 0
        ents = range(n_vis) if ch.topk is None else [int(e) for e in ch.topk[i] if e < n_vis]
        lists.append(rows + [o + ch.n + e for e in ents])
    K = max(len(r) for r in lists)
    return kv, torch.tensor([r + [-1] * (K - len(r)) for r in lists])


@pytest.mark.parametrize("ratio,topk", [(0, 0), (4, 0), (4, 3)])
@pytest.mark.parametrize("pos,n", [(0, 13), (9, 21)])
def test_banded_chunk_path_equals_reference(ratio, topk, pos, n):
    g = torch.Generator().manual_seed(1)
    W = 8
    be = TorchBackend(W)
    be.query_block, be.pass_elements = 3, 500  # several blocks and passes
    o = min(pos, W - 1)
    E = (pos + n) // ratio if ratio else 0
    ch = ChunkKeys(0, n, pos, torch.randn(o, D, generator=g), torch.randn(n, D, generator=g), ratio=ratio)
    if E:
        ch.entries = torch.randn(E, D, generator=g)
        if topk:
            vis = torch.arange(E)[None, :] < ((torch.arange(pos, pos + n) + 1) // ratio)[:, None]
            ch.topk = Indexer.select_topk(
                torch.randn(n, 2, 4, generator=g),
                torch.rand(n, 2, generator=g),
                torch.randn(E, 4, generator=g),
                vis,
                min(topk, E),
            )
    q = torch.randn(n, H, D, generator=g)
    sink = torch.randn(H, generator=g)
    out = be.forward(q, AttentionBatch(chunks=[ch]), sink, 0.3)
    kv, idx = _chunk_index_lists(ch, W)
    ref = sparse_sink_attention(q[None], kv[None], sink, idx[None], 0.3)[0]
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("topk", [False, True])
def test_decode_path_equals_reference(topk):
    g = torch.Generator().manual_seed(2)
    k, W, E = 3, 6, 5
    dec = DecodeKeys(
        None,
        torch.randn(k, W, D, generator=g),
        torch.rand(k, W, generator=g) > 0.3,
        torch.randn(k, E, D, generator=g),
        torch.rand(k, E, generator=g) > 0.4,
    )
    if topk:
        dec.topk = torch.stack([torch.randperm(E, generator=g)[:3] for _ in range(k)])
    q = torch.randn(k, H, D, generator=g)
    sink = torch.randn(H, generator=g)
    out = TorchBackend(W).forward(q, AttentionBatch(decode=dec), sink, 0.3)
    kv = torch.cat([dec.window, dec.entries], dim=1)
    lists = []
    for i in range(k):
        ents = range(E) if dec.topk is None else [int(e) for e in dec.topk[i]]
        lists.append([j for j in range(W) if dec.window_valid[i, j]] + [W + e for e in ents if dec.entry_valid[i, e]])
    K = max(len(r) for r in lists)
    idx = torch.tensor([r + [-1] * (K - len(r)) for r in lists])
    ref = sparse_sink_attention(q[:, None], kv, sink, idx[:, None], 0.3)[:, 0]
    torch.testing.assert_close(out, ref)


def test_backend_named_per_device():
    assert devices.attention_backend("cpu") == "torch"
    assert devices.attention_backend(torch.device("cpu")) == "torch"
    assert devices.attention_backend("cuda:1") == devices.ATTENTION_BACKEND["cuda"]
    assert devices.attention_backend("unknown") == "torch"
    with pytest.raises(ConfigError, match="attention backend is 'nope'"):
        create_backend("nope", 8)


def test_layer_uses_the_backend_its_device_names(monkeypatch):
    """A backend registered under the name `parity.devices` gives for the device is what the layers call."""
    from parity.config import load_preset
    from parity.model import build_model

    calls = []

    @register_backend
    class Counting(TorchBackend):
        name = "counting-test"

        def forward(self, q, batch, sink, scale):
            calls.append(len(batch.chunks))
            return super().forward(q, batch, sink, scale)

    cfg = load_preset("tiny")
    m = build_model(cfg, seed=0)
    ids = torch.randint(0, cfg.vocab_size, (1, 9), generator=torch.Generator().manual_seed(0))
    ref = m.forward_logits(ids)
    monkeypatch.setitem(devices.ATTENTION_BACKEND, "cpu", "counting-test")
    assert torch.equal(m.forward_logits(ids), ref)
    assert calls == [1] * cfg.num_hidden_layers
