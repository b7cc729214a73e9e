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
from parity.model.layers import RMSNorm, apply_rope, rms_unweighted, rope_cos_sin


class StepContext:
    """What every layer needs about the flat token batch of one step.

    Attributes:
        positions: LongTensor[T] absolute position of each new token.
        token_ids: LongTensor[T].
        segments: list of (start, n, first_position) per sequence, in batch order.
        cos_sin: {"main": (cos, sin), "compress": (cos, sin)} each [T, rope_dim // 2] fp32.
        kv_fp8: apply the official FP8 rounding to KV (issue 8); index_fp4: FP4 indexer simulation.
    """

    def __init__(self, positions, token_ids, segments, cos_sin, kv_fp8=False, index_fp4=False):
        self.positions, self.token_ids, self.segments, self.cos_sin = positions, token_ids, segments, cos_sin
        self.kv_fp8, self.index_fp4 = kv_fp8, index_fp4


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

    def finish(self, entries: torch.Tensor, first_window: int, inv_freq: torch.Tensor, dtype: torch.dtype):
        """Norm + RoPE at positions w * ratio of new entries fp32 [m, d] -> [m, d] in dtype."""
        out = self.kv_norm(entries.to(dtype))
        if out.shape[0]:
            pos = (torch.arange(out.shape[0], device=out.device) + first_window) * self.ratio
            cos, sin = rope_cos_sin(pos, inv_freq)
            out = apply_rope(out, cos, sin)
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

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, ctx: StepContext, caches: list) -> torch.Tensor:
        T = x.shape[0]
        cos, sin = ctx.cos_sin[self.rope_key]
        qr = self.q_a_norm(self.q_a_proj(x))
        q = self.q_b_proj(qr).view(T, self.n_heads, self.head_dim)
        q = apply_rope(rms_unweighted(q, self.eps), cos, sin)
        kv = apply_rope(self.kv_norm(self.kv_proj(x)), cos, sin)
        kv = self._round_kv(kv, ctx)

        comp = self.compressor
        if comp is not None:
            ckv, csc = comp.project(x, ctx.positions)
            idx = comp.indexer
            if idx is not None:
                ikv, isc = idx.project(x, ctx.positions)
                iq = idx.q_b_proj(qr).view(T, idx.n_heads, idx.d)
                iq = self._round_index(apply_rope(iq, cos, sin), ctx)
                iw = idx.scorer.weights_proj(x).float() * (idx.n_heads ** -0.5 * idx.d ** -0.5)

        out = torch.empty_like(q)
        for (s, n, p), cache in zip(ctx.segments, caches):
            e = s + n
            keys = [cache.window_read(max(0, p - self.window + 1), p), kv[s:e]]
            key_pos = torch.arange(p - keys[0].shape[0], p + n, device=x.device)
            qpos = ctx.positions[s:e]
            allowed = (key_pos[None, :] <= qpos[:, None]) & (key_pos[None, :] > qpos[:, None] - self.window)
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
                    new_idx = self._round_index(idx.finish(ni, w0, self.inv_freq, x.dtype), ctx)
                cache.append_entries(new, new_idx)
                n_ent = cache.n_entries
                if n_ent:
                    ent = cache.entries()
                    vis = torch.arange(n_ent, device=x.device)[None, :] < ((qpos + 1) // comp.ratio)[:, None]
                    if idx is not None:
                        keys_i = cache.index_keys().float()
                        sc = torch.einsum("nhd,ed->nhe", iq[s:e].float(), keys_i).relu()
                        sc = (sc * iw[s:e, :, None]).sum(dim=1).masked_fill(~vis, float("-inf"))
                        k = min(idx.topk, n_ent)
                        # top-k with ties broken towards the earlier entry: deterministic whatever the
                        # chunking (relu makes exact-zero scores common; torch.topk leaves ties unspecified).
                        top = torch.sort(sc, dim=-1, descending=True, stable=True).indices[:, :k]
                        sel = torch.zeros_like(vis).scatter_(1, top, True)
                        vis = vis & sel
                    keys.append(ent)
                    allowed = torch.cat([allowed, vis], dim=1)
            kmat = torch.cat(keys, dim=0).float()
            logits = torch.einsum("nhd,ld->nhl", q[s:e].float(), kmat) * self.scale
            logits = logits.masked_fill(~allowed[:, None, :], float("-inf"))
            sink = self.sinks.float().view(1, -1, 1).expand(n, -1, 1)
            probs = torch.cat([logits, sink], dim=-1).softmax(dim=-1)[..., :-1]
            out[s:e] = torch.einsum("nhl,ld->nhd", probs, kmat).to(out.dtype)
            cache.window_write(p, kv[s:e])

        out = apply_rope(out, cos, sin, inverse=True)
        o = grouped_out_proj(out.reshape(T, self.groups, -1), self.o_a_proj, self.groups)
        return self.o_b_proj(o)
