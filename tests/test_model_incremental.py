"""Incremental decoding equals the full forward at every position, plus the
cache storage contract (allocator, nbytes, free, cache_layout) and request validation."""

from __future__ import annotations

import pytest
import torch

from parity.errors import RequestError

TOL = 1e-4
S = 50


@pytest.fixture(scope="module")
def seqs_and_ref(parity_small):
    ids = torch.randint(0, 64, (3, S), generator=torch.Generator().manual_seed(11))
    return ids, parity_small.forward_logits(ids)


def _run_chunks(model, ids_row, cuts):
    st = model.new_state()
    outs = []
    for a, b in zip(cuts[:-1], cuts[1:], strict=False):
        outs += model.forward_incremental([ids_row[a:b]], [st], all_logits=True)[0]
    assert st.num_tokens == cuts[-1]
    return torch.stack(outs)


def test_token_by_token(parity_small, seqs_and_ref, one_thread):
    ids, ref = seqs_and_ref
    st = parity_small.new_state()
    for t in range(S):
        out = parity_small.forward_incremental([[int(ids[0, t])]], [st])
        assert out.shape == (1, 64)
        assert (out[0] - ref[0, t]).abs().max().item() <= TOL, t
    assert st.num_tokens == S


def test_prefill_then_decode_and_chunks(parity_small, seqs_and_ref, one_thread):
    ids, ref = seqs_and_ref
    # prefill crossing the window and compression boundaries, then single tokens, then chunks of odd sizes
    cuts = [0, 21, 22, 23, 24, 33, 34, 37, 50]
    out = _run_chunks(parity_small, ids[1], cuts)
    assert (out - ref[1]).abs().max().item() <= TOL


def test_batched_mixed_lengths(parity_small, seqs_and_ref, one_thread):
    ids, ref = seqs_and_ref
    states = [parity_small.new_state() for _ in range(3)]
    pos = [0, 0, 0]
    plan = [[9, 1, 20], [1, 3, 1], [1, 1, 1], [17, 1, 2], [1, 11, 1], [1, 1, 8], [1, 1, 1]]
    for step in plan:
        toks = [ids[i, pos[i] : pos[i] + n] for i, n in enumerate(step)]
        outs = parity_small.forward_incremental(toks, states, all_logits=True)
        for i, n in enumerate(step):
            assert (outs[i] - ref[i, pos[i] : pos[i] + n]).abs().max().item() <= TOL, (step, i)
            pos[i] += n
    assert [s.num_tokens for s in states] == pos
    # last-token logits form
    out = parity_small.forward_incremental([ids[i, pos[i] : pos[i] + 1] for i in range(3)], states)
    assert out.shape == (3, 64)
    for i in range(3):
        assert (out[i] - ref[i, pos[i]]).abs().max().item() <= TOL


class CountingAllocator:
    def __init__(self):
        self.live: dict[int, tuple] = {}
        self.components: set[str] = set()

    def alloc(self, layer, component, shape, dtype):
        t = torch.empty(shape, dtype=dtype)
        self.live[id(t)] = (layer, component, t)
        self.components.add(component)
        return t

    def release(self, tensor):
        del self.live[id(tensor)]

    def nbytes(self):
        return sum(t.numel() * t.element_size() for _, _, t in self.live.values())


def test_allocator_nbytes_free_and_layout(parity_small, seqs_and_ref, one_thread):
    ids, _ = seqs_and_ref
    alloc = CountingAllocator()
    st = parity_small.new_state(allocator=alloc)
    layout = parity_small.cache_layout("bf16")
    fixed = sum(e["bytes"] for e in layout if e["kind"] == "fixed")
    assert st.nbytes() == alloc.nbytes() == fixed
    parity_small.forward_incremental([ids[0]], [st])
    assert alloc.components == {"window_kv", "compressor_state", "compressed_kv", "index_keys"}
    # growing blocks: one block per CSA/HCA layer component (50 tokens < 64 entries)
    growing = sum(e["bytes"] for e in layout if e["kind"] == "growing")
    assert st.nbytes() == alloc.nbytes() == fixed + growing
    by = {(e["layer"], e["component"]): e for e in layout}
    assert by[(1, "compressed_kv")]["tokens_per_entry"] == 4 and by[(2, "compressed_kv")]["tokens_per_entry"] == 16
    assert (0, "compressed_kv") not in by and (2, "index_keys") not in by
    st.free()
    assert alloc.live == {} and st.nbytes() == 0
    with pytest.raises(RequestError, match="after free"):
        parity_small.forward_incremental([[1]], [st])


def test_growing_blocks_span(parity_small, seqs_and_ref, one_thread):
    """Small blocks (2 entries) force many growing blocks; results are unchanged."""
    ids, ref = seqs_and_ref
    old = parity_small.cache_block_entries
    parity_small.cache_block_entries = 2
    try:
        out = _run_chunks(parity_small, ids[2], [0, 13, 14, 30, 31, 50])
    finally:
        parity_small.cache_block_entries = old
    assert (out - ref[2]).abs().max().item() <= TOL


def test_bad_requests(parity_small):
    m = parity_small
    with pytest.raises(RequestError, match="tokens has 2 sequences but states has 1"):
        m.forward_incremental([[1], [2]], [m.new_state()])
    with pytest.raises(RequestError, match=r"tokens\[0\] is empty"):
        m.forward_incremental([[]], [m.new_state()])
    with pytest.raises(RequestError, match=r"token ids must be in \[0, 64\)"):
        m.forward_incremental([[64]], [m.new_state()])
    with pytest.raises(RequestError, match="input_ids must be a LongTensor"):
        m.forward_logits(torch.tensor([1, 2]))
    with pytest.raises(RequestError, match="kv_cache_dtype is 'fp16'"):
        m.new_state(kv_cache_dtype="fp16")
    st = m.new_state()
    with pytest.raises(RequestError, match="same SequenceState twice"):
        m.forward_incremental([[1], [2]], [st, st])
    with pytest.raises(RequestError, match="max_position_embeddings is 128"):
        m.forward_incremental([list(range(60)) * 3], [st])
    with pytest.raises(RequestError, match="max_position_embeddings is 128"):
        m.forward_logits(torch.zeros(1, 129, dtype=torch.long))
    from parity.model import build_model

    with pytest.raises(RequestError, match="dtype is 'float8'"):
        build_model(m.config, dtype="float8")


@pytest.mark.parametrize("block", [3, 8, 13])
def test_query_blocks(parity_small, seqs_and_ref, block, one_thread):
    """The chunk path splits long chunks into query blocks (memory bound); any block size gives the same
    logits, prefill from 0 and chunks continuing a cache alike."""
    ids, ref = seqs_and_ref
    attns = [layer.self_attn for layer in parity_small.model.layers]
    old = [a.backend.query_block for a in attns]
    try:
        for a in attns:
            a.backend.query_block = block
        assert (parity_small.forward_logits(ids[:1]) - ref[:1]).abs().max().item() <= TOL
        out = _run_chunks(parity_small, ids[1], [0, 20, 21, 45, 50])
        assert (out - ref[1]).abs().max().item() <= TOL
    finally:
        for a, q in zip(attns, old, strict=False):
            a.backend.query_block = q
