"""DeepSeek-V4 attention (paper §2.3): one shared K = V head (MQA) over a sliding window plus compressed entries.

- sliding layers: window only;
- CSA layers (§2.3.1): overlapping compressor (ratio 4) and a lightning indexer that keeps the
  ``index_topk`` best compressed entries per query;
- HCA layers (§2.3.2): non-overlapping compressor (ratio 128), every visible entry attended.

As in the official ``inference/model.py`` ``Attention``: project and RoPE the queries and the key,
gather each query's window keys and compressed entries (top-k on CSA), make one call to the attention
backend (learned per-head sink, `parity.model.attention_backends`), inverse-RoPE the output's RoPE
slice (K = V) and apply the grouped low-rank output projection (``o_a_proj`` per group, ``o_b_proj``).

Visibility (official ``get_window_topk_idxs`` / ``get_compress_topk_idxs``): the query at position t
sees window keys at positions (t - sliding_window, t] and compressed entry w iff ``w < (t + 1) // ratio``;
entry w carries RoPE at position ``w * ratio``. Parameter names equal transformers 5.23
(``self_attn.q_a_proj`` ...); the official names are in the loader's rename table.
"""

from __future__ import annotations

import torch
from torch import nn

from parity import devices
from parity.config import CSA, HCA, SLIDING
from parity.model.attention_backends import AttentionBackend, AttentionBatch, ChunkKeys, DecodeKeys, create_backend
from parity.model.compressor import Compressor, compress_step, compress_windows
from parity.model.layers import RMSNorm, Rotary, project, rms_unweighted
from parity.model.prefix_state import capture_chunk
from parity.model.step_metadata import DecodeBatch, StepContext


def _pad_stack(rows: list[torch.Tensor], n: int) -> torch.Tensor:
    """Stack [e_i, w] tensors into [k, n, w], zero padded (n >= max e_i)."""
    out = rows[0].new_zeros((len(rows), n, rows[0].shape[-1]))
    for i, r in enumerate(rows):
        if r.shape[0]:
            out[i, : r.shape[0]] = r
    return out


def grouped_out_proj(o: torch.Tensor, proj: nn.Module, groups: int) -> torch.Tensor:
    """First stage of the grouped output projection: o [T, groups, in_g] -> [T, groups * r].

    ``proj`` is ``o_a_proj`` with weight [groups * r, in_g]; group g uses rows [g*r, (g+1)*r).
    A quantized replacement may provide ``grouped_forward(o) -> [T, groups, r]`` instead of a
    dense ``weight``.
    """
    if hasattr(proj, "grouped_forward"):
        return proj.grouped_forward(o).flatten(1)
    w = proj.weight.view(groups, -1, o.shape[-1]).to(o.dtype)
    return torch.einsum("tgi,gri->tgr", o, w).flatten(1)


class Attention(nn.Module):
    """V4 attention of one layer. forward(x[T, H], ctx, caches) -> [T, H].

    ``caches`` holds one `LayerCache` per sequence of ``ctx.segments``; they are read (window and
    compressed entries of earlier steps) and updated in place (new window KV, compressor state, new
    compressed entries). Projections run once over all T tokens; the sequences that add one token are
    batched together, each longer chunk is described on its own.
    """

    def __init__(self, cfg, layer_type: str, inv_freq_main: torch.Tensor, inv_freq_compress: torch.Tensor):
        super().__init__()
        self.cfg = cfg
        self.layer_type = layer_type
        self.rope_key = "main" if layer_type == SLIDING else "compress"
        self.n_heads, self.head_dim, self.rd = cfg.num_attention_heads, cfg.head_dim, cfg.qk_rope_head_dim
        self.window, self.groups, self.eps = cfg.sliding_window, cfg.o_groups, cfg.rms_norm_eps
        self.ratio = 0 if layer_type == SLIDING else cfg.compress_rates[layer_type]
        self.scale = cfg.head_dim**-0.5
        self.q_a_proj = nn.Linear(cfg.hidden_size, cfg.q_lora_rank, bias=False)
        self.q_a_norm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
        self.q_b_proj = nn.Linear(cfg.q_lora_rank, cfg.num_attention_heads * cfg.head_dim, bias=False)
        self.kv_proj = nn.Linear(cfg.hidden_size, cfg.head_dim, bias=False)
        self.kv_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.o_a_proj = nn.Linear(
            cfg.num_attention_heads * cfg.head_dim // cfg.o_groups, cfg.o_groups * cfg.o_lora_rank, bias=False
        )
        self.o_b_proj = nn.Linear(cfg.o_groups * cfg.o_lora_rank, cfg.hidden_size, bias=False)
        self.sinks = nn.Parameter(torch.empty(cfg.num_attention_heads, dtype=torch.float32))
        self.compressor = Compressor(cfg, layer_type) if layer_type in (CSA, HCA) else None
        # RoPE inverse frequencies of this layer's setting (not in the state dict).
        self.register_buffer(
            "inv_freq", (inv_freq_main if layer_type == SLIDING else inv_freq_compress).clone(), persistent=False
        )

        self._backend: AttentionBackend | None = None

    @property
    def backend(self) -> AttentionBackend:
        """The attention backend `parity.devices.attention_backend` names for this layer's device
        (created on first use, and again if the layer moves to a device with another backend)."""
        name = devices.attention_backend(self.sinks.device)
        if self._backend is None or self._backend.name != name:
            self._backend = create_backend(name, self.window)
        return self._backend

    # ------------------------------------------------------------------ numerics hooks
    def _round_kv(self, kv: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """Official FP8 simulation of the non-RoPE part of a KV vector (identity unless kv_fp8)."""
        if not ctx.kv_fp8:
            return kv
        from parity.model.numerics import fp8_round_kv

        return fp8_round_kv(kv, self.rd)

    @staticmethod
    def _round_index(x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """Official Hadamard rotation + FP4 rounding of indexer queries/keys (identity unless index_fp4)."""
        if not ctx.index_fp4:
            return x
        from parity.model.numerics import fp4_round_index

        return fp4_round_index(x)

    @staticmethod
    def _rotate_index_keys(x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """New compressed indexer keys as the cache takes them: Hadamard-rotated with the FP4 indexer
        (identity otherwise). The FP4 rounding itself happens as the cache packs them
        (`numerics.IndexCodec.encode`); read back, they are exactly `fp4_round_index` of x."""
        if not ctx.index_fp4:
            return x
        from parity.model.numerics import hadamard

        return hadamard(x)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, ctx: StepContext, caches: list) -> torch.Tensor:
        T = x.shape[0]
        rope = ctx.rotary[self.rope_key]
        qr = self.q_a_norm(self.q_a_proj(x))
        q = self.q_b_proj(qr).view(T, self.n_heads, self.head_dim)
        q = rope.rotate(rms_unweighted(q, self.eps), inplace=True)  # fresh tensors: rotate in place
        kv = self._round_kv(rope.rotate(self.kv_norm(self.kv_proj(x)), inplace=True), ctx)

        comp_in = index_in = None
        comp = self.compressor
        if comp is not None:
            comp_in = comp.project(x, ctx.positions)
            idx = comp.indexer
            if idx is not None:
                ikv, isc = idx.project(x, ctx.positions)
                iq = idx.q_b_proj(qr).view(T, idx.n_heads, idx.d)
                iq = self._round_index(rope.rotate(iq, inplace=True), ctx)
                iw = idx.scorer.weights_proj(x).float() * (idx.n_heads**-0.5 * idx.d**-0.5)
                index_in = (ikv, isc, iq, iw)

        batch = AttentionBatch()
        db = ctx.decode_batch(self.window)
        if db is not None:
            batch.decode = self._decode_keys(db, ctx, caches, kv, comp_in, index_in)
        for (s, n, p), cache in zip(ctx.segments, caches, strict=True):
            if n > 1:
                batch.chunks.append(self._chunk_keys(s, n, p, cache, ctx, kv, comp_in, index_in))
        out = self.backend.forward(q, batch, self.sinks, self.scale)
        return self._output(out, rope)

    def _decode_keys(self, db: DecodeBatch, ctx: StepContext, caches: list, kv, comp_in, index_in) -> DecodeKeys:
        """Cache update and keys of the sequences that add exactly one token, batched over them.

        Writes each new key into its ring slot, advances the compressors (official ``Compressor.forward``
        decode branch) and appends the entries of completed windows, then returns the ring buffers, the
        entries (zero padded to the longest) and, on CSA, the indexer's top-k. The step metadata comes
        from ``db`` (host positions, built once per step); with one sequence its cache tensors are used
        as views (no stacking or copy-back).
        """
        cs = [caches[i] for i in db.single]
        k, W = db.k, self.window
        codec = cs[0].codec
        enc = codec.encode(db.take(kv))
        for c, slot, i in zip(cs, db.slots, range(k), strict=True):
            c.window[slot] = enc[i]
        win = cs[0].window.unsqueeze(0) if k == 1 else torch.stack([c.window for c in cs])
        keys = DecodeKeys(db.rows, codec.decode(win.reshape(k * W, -1)).view(k, W, -1), db.allowed)
        comp = self.compressor
        if comp is None:
            return keys
        ckv, csc = comp_in
        d, cw, ratio = comp.d, comp.coff * comp.d, comp.ratio
        st = cs[0].comp_state.unsqueeze(0) if k == 1 else torch.stack([c.comp_state for c in cs])
        emit_list, emit = db.emit(ratio)
        _, ent = compress_step(
            st[:, 0, :, :cw], st[:, 1, :, :cw], db.take(ckv), db.take(csc), db.P, ratio, comp.overlap, d, emit
        )
        idx = comp.indexer
        if idx is not None:
            ikv, isc, iq, iw = index_in
            _, ient = compress_step(
                st[:, 0, :, cw:],
                st[:, 1, :, cw:],
                db.take(ikv),
                db.take(isc),
                db.P,
                idx.ratio,
                True,
                idx.d,
                db.emit(idx.ratio)[1],
            )
        if k > 1:
            for c, i in zip(cs, range(k), strict=True):
                c.comp_state.copy_(st[i])
        if emit_list:
            wid = db.P[emit] // ratio
            ent = self._round_kv(comp.finish(ent, wid, self.inv_freq, kv.dtype), ctx)
            ient = (
                self._rotate_index_keys(idx.finish(ient, wid, self.inv_freq, kv.dtype), ctx)
                if idx is not None
                else None
            )
            for j, i in enumerate(emit_list):
                cs[i].append_entries(ent[j : j + 1], ient[j : j + 1] if ient is not None else None)
        n_max = max(c.n_entries for c in cs)
        if n_max:
            keys.entries = cs[0].entries().unsqueeze(0) if k == 1 else _pad_stack([c.entries() for c in cs], n_max)
            keys.entry_valid = vis = db.visible(ratio, n_max)
            if idx is not None:
                ik = cs[0].index_keys().unsqueeze(0) if k == 1 else _pad_stack([c.index_keys() for c in cs], n_max)
                keys.topk = idx.select_topk(db.take(iq), db.take(iw), ik, vis, min(idx.topk, n_max))
        return keys

    def _chunk_keys(self, s: int, n: int, p: int, cache, ctx: StepContext, kv, comp_in, index_in) -> ChunkKeys:
        """Cache update and keys of one sequence adding the n > 1 tokens of rows [s, s + n) at positions
        p .. p + n - 1: window keys before p (read before the chunk's keys are written), the compressed
        entries after the chunk's completed windows are appended and, on CSA, the indexer's top-k."""
        e = s + n
        o = min(p, self.window - 1)
        keys = ChunkKeys(s, n, p, cache.window_read(p - o, p), kv[s:e], ratio=self.ratio)  # positions [p - o, p)
        if cache.capture_at:  # prefix caching: keep the rows of block ends inside this chunk
            capture_chunk(
                cache,
                p,
                kv[s:e],
                comp_in and tuple(t[s:e] for t in comp_in),
                index_in and tuple(t[s:e] for t in index_in[:2]),
            )
        cache.window_write(p, kv[s:e])
        comp = self.compressor
        if comp is None:
            return keys
        ckv, csc = comp_in
        d = comp.d
        cw = comp.coff * d
        st = cache.comp_state
        new = compress_windows(st[0, :, :cw], st[1, :, :cw], ckv[s:e], csc[s:e], p, comp.ratio, comp.overlap, d)
        w0 = p // comp.ratio
        new = self._round_kv(comp.finish(new, w0, self.inv_freq, kv.dtype), ctx)
        new_idx = None
        idx = comp.indexer
        if idx is not None:
            ikv, isc, iq, iw = index_in
            ni = compress_windows(st[0, :, cw:], st[1, :, cw:], ikv[s:e], isc[s:e], p, idx.ratio, True, idx.d)
            new_idx = self._rotate_index_keys(idx.finish(ni, w0, self.inv_freq, kv.dtype), ctx)
        cache.append_entries(new, new_idx)
        E = cache.n_entries
        if E:
            keys.entries = cache.entries()
            if idx is not None:
                vis = torch.arange(E, device=kv.device)[None, :] < ((ctx.positions[s:e] + 1) // self.ratio)[:, None]
                keys.topk = idx.select_topk(iq[s:e], iw[s:e], cache.index_keys().float(), vis, min(idx.topk, E))
        return keys

    def _output(self, out: torch.Tensor, rope: Rotary) -> torch.Tensor:
        """Inverse RoPE on the attention output [T, H, D] (in place), then the grouped output projection."""
        out = rope.rotate(out, inverse=True, inplace=True)
        o = grouped_out_proj(out.reshape(out.shape[0], self.groups, -1), self.o_a_proj, self.groups)
        return project(self.o_b_proj, o)
