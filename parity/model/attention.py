"""DeepSeek-V4 attention: one shared K=V head (MQA) over a sliding window, plus compressed entries.

- sliding layers: window only;
- CSA layers (paper §2.3.1): overlapping compressor (ratio 4, windows of 2*ratio tokens with stride
  ratio) and a lightning indexer that keeps the ``index_topk`` best compressed entries per query;
- HCA layers (paper §2.3.2): non-overlapping compressor (ratio 128), every visible entry attended.

A learned per-head sink joins every softmax as an extra logit with a zero value. Queries and keys get
interleaved RoPE on their last ``qk_rope_head_dim`` channels; because K = V, the attention output's
RoPE slice is rotated back by the query position (inverse RoPE) before the grouped low-rank output
projection (``o_a_proj`` per group, then ``o_b_proj``).

Visibility (official ``get_window_topk_idxs`` / ``get_compress_topk_idxs``): the query at position t
sees window keys at positions (t - sliding_window, t] and compressed entry w iff
``w < (t + 1) // ratio`` (the entry covers tokens [w*ratio, (w+1)*ratio) and all of them are <= t).
Compressed entry w carries RoPE at position ``w * ratio``.

Parameter names equal transformers 5.23 (``self_attn.q_a_proj`` ...); the official names are in the
loader's rename table. The incremental algorithm (any chunk length at any position) is parity's own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from parity.config import CSA, HCA, SLIDING
from parity.model.layers import RMSNorm, Rotary, apply_rope, rms_unweighted, rope_cos_sin


class StepContext:
    """What every layer needs about the flat token batch of one step (built once, shared by all layers).

    Attributes:
        positions: LongTensor[T] absolute position of each new token.
        token_ids: LongTensor[T].
        segments: list of (start, n, first_position) per sequence, in batch order.
        cos_sin: {"main": (cos, sin), "compress": (cos, sin)} each [T, rope_dim // 2] fp32.
        rotary: {"main": Rotary, "compress": Rotary}: the same angles as rotation tables.
        kv_fp8: apply the official FP8 rounding to KV (issue 8); index_fp4: FP4 indexer simulation.
    """

    def __init__(self, positions, token_ids, segments, cos_sin, kv_fp8=False, index_fp4=False):
        self.positions, self.token_ids, self.segments, self.cos_sin = positions, token_ids, segments, cos_sin
        self.kv_fp8, self.index_fp4 = kv_fp8, index_fp4
        self.rotary = {k: Rotary(c, s) for k, (c, s) in cos_sin.items()}
        self._decode: dict = {}

    def decode_batch(self, window: int) -> "DecodeBatch | None":
        """The step's one-token sequences as a `DecodeBatch` (None if there are none); built on the
        first call and reused by every later layer of the step."""
        if window not in self._decode:
            single = [i for i, seg in enumerate(self.segments) if seg[1] == 1]
            self._decode[window] = DecodeBatch(self, single, window) if single else None
        return self._decode[window]


class DecodeBatch:
    """Per-step metadata of the sequences that add exactly one token, shared by all layers (they
    all see the same positions): row indices, positions, ring-buffer slots, the window mask, and per
    compression ratio the sequences whose token completes a window and the entry-visibility masks.
    Everything is derived from host-side positions, so the layers need no ``.tolist()`` / ``nonzero``.

    Attributes:
        single: indices into ``ctx.segments``; k = len(single).
        rows: LongTensor[k] flat token rows, or None when every token of the step is one (rows = 0..k-1).
        pos: list[int] positions; P: LongTensor[k] the same; slots: list[int] ``pos % window``.
        allowed: BoolTensor[k, window]: ring slot j holds a visible key (position
            ``p - ((p - j) mod window)`` >= 0).
    """

    def __init__(self, ctx: StepContext, single: list[int], window: int):
        dev = ctx.positions.device
        self.single, self.k, self.window = single, len(single), window
        segs = ctx.segments
        self.pos = [segs[i][2] for i in single]
        if self.k == len(ctx.token_ids):
            self.rows = None
            self.P = ctx.positions
        else:
            self.rows = torch.tensor([segs[i][0] for i in single], device=dev)
            self.P = torch.tensor(self.pos, device=dev)
        self.slots = [p % window for p in self.pos]
        P = self.P[:, None]
        self.allowed = (P - (P - torch.arange(window, device=dev)[None, :]) % window) >= 0
        self._emit: dict = {}
        self._vis: dict = {}

    def take(self, x: torch.Tensor) -> torch.Tensor:
        """x's rows of the one-token sequences ([k, ...])."""
        return x if self.rows is None else x.index_select(0, self.rows)

    def emit(self, ratio: int) -> tuple[list[int], torch.Tensor]:
        """Sequences (indices into 0..k-1, list and LongTensor) whose new token completes a window."""
        if ratio not in self._emit:
            e = [i for i, p in enumerate(self.pos) if (p + 1) % ratio == 0]
            self._emit[ratio] = (e, torch.tensor(e, dtype=torch.long, device=self.P.device))
        return self._emit[ratio]

    def visible(self, ratio: int, n: int) -> torch.Tensor:
        """BoolTensor[k, n]: compressed entry w is visible to sequence i (``w < (p_i + 1) // ratio``)."""
        key = (ratio, n)
        if key not in self._vis:
            self._vis[key] = torch.arange(n, device=self.P.device)[None, :] < ((self.P + 1) // ratio)[:, None]
        return self._vis[key]


def compress_windows(state_kv: torch.Tensor, state_sc: torch.Tensor, kv: torch.Tensor, sc: torch.Tensor, pos: int,
                     ratio: int, overlap: bool, d: int) -> torch.Tensor:
    """Advance one compressor by n tokens and return the entries of the windows they complete.

    state_kv/state_sc: the sequence's fp32 state views [coff * ratio, coff * d] (updated in place);
    kv/sc: fp32 [n, coff * d] projected inputs and gate scores (position bias already added) of the
    tokens at positions pos .. pos + n - 1. Each completed window w emits
    ``sum_j softmax_j(score) * kv_j`` over its ratio tokens (HCA) or over the previous window's first
    half-features plus its own second half-features (CSA overlap, official ``overlap_transform``).
    Returns fp32 [m, d], the entries of windows pos // ratio .. pos // ratio + m - 1 (pre-norm, pre-RoPE).
    """
    r0 = pos % ratio
    cur = ratio if overlap else 0
    buf_kv = torch.cat([state_kv[cur:cur + r0], kv], dim=0)
    buf_sc = torch.cat([state_sc[cur:cur + r0], sc], dim=0)
    nwin = buf_kv.shape[0] // ratio
    used = nwin * ratio
    entries = kv.new_empty((0, d))
    if nwin:
        win_kv = buf_kv[:used].view(nwin, ratio, -1)
        win_sc = buf_sc[:used].view(nwin, ratio, -1)
        if overlap:
            prev_kv = torch.cat([state_kv[None, :ratio], win_kv[:-1]], dim=0)
            prev_sc = torch.cat([state_sc[None, :ratio], win_sc[:-1]], dim=0)
            cat_kv = torch.cat([prev_kv[..., :d], win_kv[..., d:]], dim=1)
            cat_sc = torch.cat([prev_sc[..., :d], win_sc[..., d:]], dim=1)
            state_kv[:ratio] = win_kv[-1]
            state_sc[:ratio] = win_sc[-1]
        else:
            cat_kv, cat_sc = win_kv, win_sc
        entries = (cat_kv * cat_sc.softmax(dim=1)).sum(dim=1)
    rest = buf_kv.shape[0] - used
    if rest:
        state_kv[cur:cur + rest] = buf_kv[used:]
        state_sc[cur:cur + rest] = buf_sc[used:]
    return entries


def compress_step(st_kv: torch.Tensor, st_sc: torch.Tensor, kv: torch.Tensor, sc: torch.Tensor, pos: torch.Tensor,
                  ratio: int, overlap: bool, d: int,
                  emit: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`compress_windows` for k sequences that each add one token (the decode step), vectorised.

    st_kv/st_sc: stacked states [k, coff * ratio, coff * d] (updated in place); kv/sc: [k, coff * d];
    pos: LongTensor[k] positions of the new tokens. Returns (emitting sequence indices LongTensor[m],
    their entries fp32 [m, d]) for the sequences whose token completes a window (official
    ``Compressor.forward`` decode branch). ``emit``: those indices when the caller already knows them
    (`DecodeBatch.emit`, from host positions: no device-to-host sync here).
    """
    k = kv.shape[0]
    ar = torch.arange(k, device=kv.device)
    row = (ratio if overlap else 0) + pos % ratio
    st_kv[ar, row] = kv
    st_sc[ar, row] = sc
    if emit is None:
        emit = ((pos + 1) % ratio == 0).nonzero().flatten()
    if emit.numel() == 0:
        return emit, kv.new_empty((0, d))
    sk, ss = st_kv[emit], st_sc[emit]
    if overlap:
        cat_kv = torch.cat([sk[:, :ratio, :d], sk[:, ratio:, d:]], dim=1)
        cat_sc = torch.cat([ss[:, :ratio, :d], ss[:, ratio:, d:]], dim=1)
        st_kv[emit, :ratio] = sk[:, ratio:]
        st_sc[emit, :ratio] = ss[:, ratio:]
    else:
        cat_kv, cat_sc = sk, ss
    return emit, (cat_kv * cat_sc.softmax(dim=1)).sum(dim=1)


def _pad_stack(rows: list[torch.Tensor], n: int) -> torch.Tensor:
    """Stack [e_i, w] tensors into [k, n, w], zero padded (n >= max e_i)."""
    out = rows[0].new_zeros((len(rows), n, rows[0].shape[-1]))
    for i, r in enumerate(rows):
        if r.shape[0]:
            out[i, : r.shape[0]] = r
    return out


class _Compressing(nn.Module):
    """Shared parameters of a compressor: ``kv_proj``/``gate_proj`` [coff*d, H], ``position_bias``
    [ratio, coff*d] (official ``ape``), ``kv_norm`` over d. Projections run in fp32 (official
    ``Compressor``: "compression need fp32")."""

    def __init__(self, hidden: int, d: int, ratio: int, overlap: bool, eps: float):
        super().__init__()
        coff = 2 if overlap else 1
        self.d, self.ratio, self.overlap, self.coff = d, ratio, overlap, coff
        self.kv_proj = nn.Linear(hidden, coff * d, bias=False)
        self.gate_proj = nn.Linear(hidden, coff * d, bias=False)
        self.position_bias = nn.Parameter(torch.empty(ratio, coff * d, dtype=torch.float32))
        self.kv_norm = RMSNorm(d, eps)

    def project(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x[T, H] -> (kv, score) fp32 [T, coff*d]; score includes position_bias[pos % ratio]."""
        xf = x.float()
        kv = F.linear(xf, self.kv_proj.weight.float())
        sc = F.linear(xf, self.gate_proj.weight.float()) + self.position_bias.float()[positions % self.ratio]
        return kv, sc

    def finish(self, entries: torch.Tensor, first_window, inv_freq: torch.Tensor, dtype: torch.dtype):
        """Norm + RoPE at positions w * ratio of new entries fp32 [m, d] -> [m, d] in dtype.
        first_window: int (entries are windows first_window, first_window + 1, ...) or LongTensor[m]."""
        out = self.kv_norm(entries.to(dtype))
        if out.shape[0]:
            if isinstance(first_window, torch.Tensor):
                pos = first_window * self.ratio
            else:
                pos = (torch.arange(out.shape[0], device=out.device) + first_window) * self.ratio
            cos, sin = rope_cos_sin(pos, inv_freq)
            out = apply_rope(out, cos, sin, inplace=True)
        return out


class IndexerScorer(nn.Module):
    """Holds ``weights_proj`` [index_n_heads, H] (per-head query weights of the lightning indexer)."""

    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.weights_proj = nn.Linear(hidden, heads, bias=False)


class Indexer(_Compressing):
    """Lightning indexer of a CSA layer (paper §2.3.1 eqs. 13-17): its own overlapping compressor at
    ``index_head_dim``, ``q_b_proj`` [index_n_heads * index_head_dim, q_lora_rank] and
    ``scorer.weights_proj``. Score of entry s for query t: ``sum_h w_{t,h} relu(q_{t,h} . k_s)`` with
    ``w = weights_proj(x) * index_n_heads^-0.5`` and the dot product scaled by ``index_head_dim^-0.5``.
    """

    def __init__(self, cfg):
        super().__init__(cfg.hidden_size, cfg.index_head_dim, cfg.compress_rates[CSA], True, cfg.rms_norm_eps)
        self.n_heads, self.topk = cfg.index_n_heads, cfg.index_topk
        self.q_b_proj = nn.Linear(cfg.q_lora_rank, cfg.index_n_heads * cfg.index_head_dim, bias=False)
        self.scorer = IndexerScorer(cfg.hidden_size, cfg.index_n_heads)


class Compressor(_Compressing):
    """KV compressor of a CSA (overlapping, ratio ``compress_rates[CSA]``, with ``indexer``) or HCA
    (non-overlapping, ratio ``compress_rates[HCA]``) layer."""

    def __init__(self, cfg, layer_type: str):
        csa = layer_type == CSA
        super().__init__(cfg.hidden_size, cfg.head_dim, cfg.compress_rates[layer_type], csa, cfg.rms_norm_eps)
        self.indexer = Indexer(cfg) if csa else None


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
    compressed entries). Projections run once over all T tokens; attention runs per sequence.
    """

    def __init__(self, cfg, layer_type: str, inv_freq_main: torch.Tensor, inv_freq_compress: torch.Tensor):
        super().__init__()
        self.cfg = cfg
        self.layer_type = layer_type
        self.rope_key = "main" if layer_type == SLIDING else "compress"
        self.n_heads, self.head_dim, self.rd = cfg.num_attention_heads, cfg.head_dim, cfg.qk_rope_head_dim
        self.window, self.groups, self.eps = cfg.sliding_window, cfg.o_groups, cfg.rms_norm_eps
        self.ratio = 0 if layer_type == SLIDING else cfg.compress_rates[layer_type]
        self.scale = cfg.head_dim ** -0.5
        #: queries per band block in the chunk (prefill) path: a block of queries attends to the
        #: ``query_block + window - 1`` window keys that cover it, not to every key of the chunk
        #: (a quarter of the window: ~80% of the computed logits are inside the window).
        self.query_block = max(8, cfg.sliding_window // 4)
        #: bound on the logits/gathered keys of one batched pass of the chunk path, in elements
        #: (consecutive band blocks are processed together up to this size).
        self.pass_elements = 1 << 24
        self.q_a_proj = nn.Linear(cfg.hidden_size, cfg.q_lora_rank, bias=False)
        self.q_a_norm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
        self.q_b_proj = nn.Linear(cfg.q_lora_rank, cfg.num_attention_heads * cfg.head_dim, bias=False)
        self.kv_proj = nn.Linear(cfg.hidden_size, cfg.head_dim, bias=False)
        self.kv_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.o_a_proj = nn.Linear(cfg.num_attention_heads * cfg.head_dim // cfg.o_groups,
                                  cfg.o_groups * cfg.o_lora_rank, bias=False)
        self.o_b_proj = nn.Linear(cfg.o_groups * cfg.o_lora_rank, cfg.hidden_size, bias=False)
        self.sinks = nn.Parameter(torch.empty(cfg.num_attention_heads, dtype=torch.float32))
        self.compressor = Compressor(cfg, layer_type) if layer_type in (CSA, HCA) else None
        # RoPE inverse frequencies of this layer's setting (not in the state dict).
        self.register_buffer("inv_freq", (inv_freq_main if layer_type == SLIDING else inv_freq_compress).clone(),
                             persistent=False)

    # ------------------------------------------------------------------ numerics hooks (issue 8)
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

    # ------------------------------------------------------------------ decode step (n_i = 1), batched
    def _decode_step(self, db: DecodeBatch, ctx: StepContext, caches: list, q, kv, out, comp_in,
                     idx_in) -> torch.Tensor:
        """Attention for the sequences that add exactly one token this step, batched over them: writes
        their rows of ``out`` and returns it, or (``out`` None: every token of the step is such a
        sequence's) returns the output [k, H, D] itself.

        Same math as the chunk path: keys are the sequence's ring-buffer slots (position
        ``p - ((p - slot) mod window)``, valid when >= 0) plus its compressed entries. The step
        metadata (rows, positions, slots, masks, which sequences complete a compression window) comes
        from ``db``, built once per step; per-sequence work is reduced to writing the new window row
        (one indexed copy) and reading the compressed entries; everything else runs once for all k
        sequences. With one sequence its cache tensors are used as views (no stacking or copy-back).
        """
        cs = [caches[i] for i in db.single]
        k, W = db.k, self.window
        kv_new = db.take(kv)
        codec = cs[0].codec
        enc = codec.encode(kv_new)
        for c, slot, i in zip(cs, db.slots, range(k)):
            c.window[slot] = enc[i]
        win = cs[0].window.unsqueeze(0) if k == 1 else torch.stack([c.window for c in cs])
        win = codec.decode(win.reshape(k * W, -1)).view(k, W, -1)
        allowed = db.allowed
        keys = [win]
        sel_k = sel_ok = None
        comp = self.compressor
        if comp is not None:
            ckv, csc = comp_in
            d, cw, ratio = comp.d, comp.coff * comp.d, comp.ratio
            st = cs[0].comp_state.unsqueeze(0) if k == 1 else torch.stack([c.comp_state for c in cs])
            emit_list, emit = db.emit(ratio)
            _, ent = compress_step(st[:, 0, :, :cw], st[:, 1, :, :cw], db.take(ckv), db.take(csc), db.P, ratio,
                                   comp.overlap, d, emit)
            idx = comp.indexer
            if idx is not None:
                ikv, isc, iq, iw = idx_in
                _, ient = compress_step(st[:, 0, :, cw:], st[:, 1, :, cw:], db.take(ikv), db.take(isc), db.P,
                                        idx.ratio, True, idx.d, db.emit(idx.ratio)[1])
            if k > 1:
                for c, i in zip(cs, range(k)):
                    c.comp_state.copy_(st[i])
            if emit_list:
                wid = db.P[emit] // ratio
                ent = self._round_kv(comp.finish(ent, wid, self.inv_freq, kv.dtype), ctx)
                ient = self._rotate_index_keys(idx.finish(ient, wid, self.inv_freq, kv.dtype), ctx) \
                    if idx is not None else None
                for j, i in enumerate(emit_list):
                    cs[i].append_entries(ent[j:j + 1], ient[j:j + 1] if ient is not None else None)
            n_max = max(c.n_entries for c in cs)
            if n_max:
                ents = cs[0].entries().unsqueeze(0) if k == 1 else _pad_stack([c.entries() for c in cs], n_max)
                vis = db.visible(ratio, n_max)
                if idx is not None:
                    ik = cs[0].index_keys().unsqueeze(0) if k == 1 else _pad_stack([c.index_keys() for c in cs], n_max)
                    sc = torch.einsum("khd,ked->khe", db.take(iq).float(), ik.float()).relu()
                    sc = (sc * db.take(iw)[:, :, None]).sum(dim=1).masked_fill(~vis, float("-inf"))
                    top = torch.sort(sc, dim=-1, descending=True, stable=True).indices[:, : min(idx.topk, n_max)]
                    sel_ok = torch.gather(vis, 1, top)
                    sel_k = torch.gather(ents, 1, top[:, :, None].expand(-1, -1, ents.shape[-1]))
                else:
                    keys.append(ents)
                    allowed = torch.cat([allowed, vis], dim=1)
        kmat = keys[0] if len(keys) == 1 else torch.cat(keys, dim=1)
        o = self._sink_attention(db.take(q), kmat, allowed, sel_k, sel_ok).to(q.dtype)
        if out is None:
            return o
        out[db.rows] = o
        return out

    def _sink_attention(self, q: torch.Tensor, kmat: torch.Tensor, allowed: torch.Tensor,
                        sel_k: torch.Tensor | None = None, sel_ok: torch.Tensor | None = None) -> torch.Tensor:
        """Softmax attention with the learned sink, in fp32 (official ``sparse_attn``), K = V.

        q [n, H, D]; kmat [L, D] (shared by the n queries) or [n, L, D]; allowed [n, L] bool;
        optional per-query selected keys sel_k [n, K, D] with validity sel_ok [n, K] (the CSA top-k
        entries: gathered rather than masked, so the cost does not grow with the context).
        Returns [n, H, D] fp32.
        """
        qf = q.float()
        kf = kmat.float()
        spec = "nhd,ld->nhl" if kf.dim() == 2 else "nhd,nld->nhl"
        logits = torch.einsum(spec, qf, kf) * self.scale
        logits = logits.masked_fill(~allowed[:, None, :], float("-inf"))
        parts = [logits]
        if sel_k is not None:
            sf = sel_k.float()
            ls = torch.einsum("nhd,nkd->nhk", qf, sf) * self.scale
            parts.append(ls.masked_fill(~sel_ok[:, None, :], float("-inf")))
        n = q.shape[0]
        parts.append(self.sinks.float().view(1, -1, 1).expand(n, -1, 1))
        probs = torch.cat(parts, dim=-1).softmax(dim=-1)
        L = logits.shape[-1]
        o = torch.einsum("nhl,ld->nhd" if kf.dim() == 2 else "nhl,nld->nhd", probs[..., :L], kf)
        if sel_k is not None:
            o = o + torch.einsum("nhk,nkd->nhd", probs[..., L:L + sel_k.shape[1]], sf)
        return o

    # ------------------------------------------------------------------ chunk path (n_i > 1)
    def _chunk_attention(self, q: torch.Tensor, kv: torch.Tensor, old: torch.Tensor, p: int,
                         ent: torch.Tensor | None, ient: torch.Tensor | None, index_in, out: torch.Tensor) -> None:
        """Attention of one sequence's chunk of n new queries at positions p .. p + n - 1 (writes ``out``).

        q [n, H, D]; kv [n, D] (the chunk's own keys); old [o, D] the window keys of positions
        [p - o, p), o = min(p, window - 1); ent [E, D] / ient [E, ID] the sequence's compressed entries
        and indexer keys (None if none); index_in = (iq [n, h, ID], iw [n, h]) on CSA layers.

        Banded: the queries are cut into blocks of ``query_block``; block j only sees the
        ``query_block + window - 1`` keys ``Kp[j * Bq : j * Bq + L]`` of the key sequence
        ``Kp = [zero pad | old | kv]`` (aligned so that Kp row W - 1 + i is query i's own key), taken
        as strided views (``unfold``) and multiplied in one batched GEMM per pass. Masks are the window
        rule on absolute positions, so results equal attention over all keys with the window mask.
        """
        n, H, D = q.shape
        W, Bq = self.window, self.query_block
        L = Bq + W - 1
        nb = -(-n // Bq)
        Np = nb * Bq
        dev = q.device
        kf = kv.float()
        pad_front = W - 1 - old.shape[0]
        Kp = torch.cat([kf.new_zeros(pad_front, D), old.float(), kf, kf.new_zeros(Np - n, D)])
        blocks_t = Kp.unfold(0, L, Bq)  # [nb, D, L] (view): block j = Kp rows [j*Bq, j*Bq + L)
        qf = q.float()
        comp = self.compressor
        ratio = comp.ratio if comp is not None else 0
        n_ent = 0 if ent is None else ent.shape[0]
        topk = comp.indexer.topk if comp is not None and comp.indexer is not None else 0
        per_query = H * (L + n_ent + 1) + min(topk, n_ent) * (D + H + 1)
        bpp = max(1, self.pass_elements // max(1, per_query * Bq))  # blocks per pass
        r_ar = torch.arange(Bq, device=dev)
        k_ar = torch.arange(L, device=dev)
        for j0 in range(0, nb, bpp):
            j1 = min(nb, j0 + bpp)
            a, b = j0 * Bq, min(n, j1 * Bq)  # real queries of this pass: [a, b)
            g, m = j1 - j0, b - a
            jj = torch.arange(j0, j1, device=dev)[:, None]
            qpos = p + jj * Bq + r_ar[None, :]                   # [g, Bq]
            kpos = p - (W - 1) + jj * Bq + k_ar[None, :]        # [g, L]
            dk = kpos[:, None, :] - qpos[:, :, None]            # [g, Bq, L]: key pos - query pos
            allowed = (dk <= 0) & (dk > -W) & (kpos >= 0)[:, None, :]
            qb = qf[a:b]
            if m < g * Bq:
                qb = torch.cat([qb, qb.new_zeros(g * Bq - m, H, D)])
            logits = torch.bmm(qb.view(g, Bq * H, D), blocks_t[j0:j1]).view(g, Bq, H, L)
            logits = logits.mul_(self.scale).masked_fill_(~allowed[:, :, None, :], float("-inf"))
            parts = [logits.view(g * Bq, H, L)[:m]]
            sel_k = shared = None
            n_vis = (p + b) // ratio if ent is not None else 0  # entries visible to the pass's last query
            if n_vis:
                vis = torch.arange(n_vis, device=dev)[None, :] < ((qpos.flatten()[:m] + 1) // ratio)[:, None]
                if index_in is not None:
                    iq, iw = index_in
                    sc = torch.einsum("nhd,ed->nhe", iq[a:b].float(), ient[:n_vis]).relu()
                    sc = (sc * iw[a:b, :, None]).sum(dim=1).masked_fill(~vis, float("-inf"))
                    # top-k with ties broken towards the earlier entry: deterministic whatever the
                    # chunking (relu makes exact-zero scores common; torch.topk leaves ties unspecified).
                    top = torch.sort(sc, dim=-1, descending=True, stable=True).indices[:, :min(topk, n_vis)]
                    sel_k = ent.index_select(0, top.flatten()).view(*top.shape, D).float()
                    ls = torch.einsum("nhd,nkd->nhk", qb[:m], sel_k) * self.scale
                    parts.append(ls.masked_fill(~torch.gather(vis, 1, top)[:, None, :], float("-inf")))
                else:
                    shared = ent[:n_vis].float()
                    le = torch.einsum("nhd,ed->nhe", qb[:m], shared) * self.scale
                    parts.append(le.masked_fill(~vis[:, None, :], float("-inf")))
            parts.append(self.sinks.float().view(1, -1, 1).expand(m, -1, 1))
            probs = torch.cat(parts, dim=-1).softmax(dim=-1)
            pw = probs[..., :L]
            if m < g * Bq:
                pw = torch.cat([pw, pw.new_zeros(g * Bq - m, H, L)])
            o = torch.bmm(pw.reshape(g, Bq * H, L), blocks_t[j0:j1].transpose(1, 2)).view(g * Bq, H, D)[:m]
            if sel_k is not None:
                o = o + torch.einsum("nhk,nkd->nhd", probs[..., L:L + sel_k.shape[1]], sel_k)
            elif shared is not None:
                o = o + torch.einsum("nhe,ed->nhd", probs[..., L:L + shared.shape[0]], shared)
            out[a:b] = o.to(out.dtype)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, ctx: StepContext, caches: list) -> torch.Tensor:
        T = x.shape[0]
        rope = ctx.rotary[self.rope_key]
        qr = self.q_a_norm(self.q_a_proj(x))
        q = self.q_b_proj(qr).view(T, self.n_heads, self.head_dim)
        q = rope.rotate(rms_unweighted(q, self.eps), inplace=True)  # fresh tensors: rotate in place
        kv = rope.rotate(self.kv_norm(self.kv_proj(x)), inplace=True)
        kv = self._round_kv(kv, ctx)

        comp = self.compressor
        if comp is not None:
            ckv, csc = comp.project(x, ctx.positions)
            idx = comp.indexer
            if idx is not None:
                ikv, isc = idx.project(x, ctx.positions)
                iq = idx.q_b_proj(qr).view(T, idx.n_heads, idx.d)
                iq = self._round_index(rope.rotate(iq, inplace=True), ctx)
                iw = idx.scorer.weights_proj(x).float() * (idx.n_heads ** -0.5 * idx.d ** -0.5)

        db = ctx.decode_batch(self.window)
        out = None if db is not None and db.rows is None else torch.empty_like(q)
        if db is not None:
            o = self._decode_step(db, ctx, caches, q, kv, out,
                                  (ckv, csc) if comp is not None else None,
                                  (ikv, isc, iq, iw) if comp is not None and comp.indexer is not None else None)
            if out is None:  # every sequence of the step added one token: o is the whole output
                return self._output(o, rope)
        for (s, n, p), cache in zip(ctx.segments, caches):
            if n == 1:
                continue
            e = s + n
            ent = ient = None
            if comp is not None:
                d = comp.d
                cw = comp.coff * d
                st = cache.comp_state
                new = compress_windows(st[0, :, :cw], st[1, :, :cw], ckv[s:e], csc[s:e], p, comp.ratio,
                                       comp.overlap, d)
                w0 = p // comp.ratio
                new = self._round_kv(comp.finish(new, w0, self.inv_freq, x.dtype), ctx)
                new_idx = None
                if idx is not None:
                    ni = compress_windows(st[0, :, cw:], st[1, :, cw:], ikv[s:e], isc[s:e], p, idx.ratio, True,
                                          idx.d)
                    new_idx = self._rotate_index_keys(idx.finish(ni, w0, self.inv_freq, x.dtype), ctx)
                cache.append_entries(new, new_idx)
                if cache.n_entries:
                    ent = cache.entries()
                    ient = cache.index_keys().float() if idx is not None else None
            o = min(p, self.window - 1)
            old = cache.window_read(p - o, p)  # positions [p - o, p)
            self._chunk_attention(q[s:e], kv[s:e], old, p, ent, ient,
                                  (iq[s:e], iw[s:e]) if comp is not None and idx is not None else None,
                                  out[s:e])
            cache.window_write(p, kv[s:e])

        return self._output(out, rope)

    def _output(self, out: torch.Tensor, rope: Rotary) -> torch.Tensor:
        """Inverse RoPE on the attention output [T, H, D] (in place), then the grouped output projection."""
        out = rope.rotate(out, inverse=True, inplace=True)
        o = grouped_out_proj(out.reshape(out.shape[0], self.groups, -1), self.o_a_proj, self.groups)
        return self.o_b_proj(o)
