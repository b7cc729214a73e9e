"""KV compressor and lightning indexer of the compressed attention layers (paper §2.3.1-§2.3.2).

Mirrors the official ``inference/model.py`` classes ``Compressor`` and ``Indexer``: a compressor turns
each window of ``ratio`` tokens into one entry (a softmax-gated sum of projected tokens; CSA windows
overlap by half, HCA windows do not); the indexer of a CSA layer has its own compressor at
``index_head_dim`` and scores compressed entries per query to keep the ``index_topk`` best.
The incremental algorithm (any chunk length at any position) is parity's own.
"""

from __future__ import annotations

import torch
from torch import nn

from parity.config import CSA
from parity.model.layers import RMSNorm, apply_rope, linear, rope_cos_sin


def compress_windows(
    state_kv: torch.Tensor,
    state_sc: torch.Tensor,
    kv: torch.Tensor,
    sc: torch.Tensor,
    pos: int,
    ratio: int,
    overlap: bool,
    d: int,
) -> torch.Tensor:
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
    buf_kv = torch.cat([state_kv[cur : cur + r0], kv], dim=0)
    buf_sc = torch.cat([state_sc[cur : cur + r0], sc], dim=0)
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
        state_kv[cur : cur + rest] = buf_kv[used:]
        state_sc[cur : cur + rest] = buf_sc[used:]
    return entries


def compress_step(
    st_kv: torch.Tensor,
    st_sc: torch.Tensor,
    kv: torch.Tensor,
    sc: torch.Tensor,
    pos: torch.Tensor,
    ratio: int,
    overlap: bool,
    d: int,
    emit: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
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


def compress_step_masked(
    st_kv: torch.Tensor,
    st_sc: torch.Tensor,
    kv: torch.Tensor,
    sc: torch.Tensor,
    pos: torch.Tensor,
    ratio: int,
    overlap: bool,
    d: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`compress_step` with fixed shapes (the compiled decode step): every sequence's window is summed,
    whether or not its token completes it, and the CSA state shift is masked, so nothing depends on
    the data's values.

    Same arguments as `compress_step`. Returns (emit BoolTensor[k]: the token completes a window,
    entries fp32 [k, d]: meaningful where emit).
    """
    k = kv.shape[0]
    ar = torch.arange(k, device=kv.device)
    row = (ratio if overlap else 0) + pos % ratio
    st_kv[ar, row] = kv
    st_sc[ar, row] = sc
    emit = (pos + 1) % ratio == 0
    if overlap:
        cat_kv = torch.cat([st_kv[:, :ratio, :d], st_kv[:, ratio:, d:]], dim=1)
        cat_sc = torch.cat([st_sc[:, :ratio, :d], st_sc[:, ratio:, d:]], dim=1)
        e = emit[:, None, None]
        st_kv[:, :ratio] = torch.where(e, st_kv[:, ratio:], st_kv[:, :ratio])
        st_sc[:, :ratio] = torch.where(e, st_sc[:, ratio:], st_sc[:, :ratio])
    else:
        cat_kv, cat_sc = st_kv, st_sc
    return emit, (cat_kv * cat_sc.softmax(dim=1)).sum(dim=1)


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
        kv = linear(xf, self.kv_proj.weight.float())
        sc = linear(xf, self.gate_proj.weight.float()) + self.position_bias.float()[positions % self.ratio]
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

    @staticmethod
    def select_topk(
        q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, visible: torch.Tensor, k: int
    ) -> torch.Tensor:
        """Indices of the ``k`` best-scoring compressed entries per query (official ``Indexer.forward``).

        q [n, h, ID] indexer queries (RoPE'd, FP4-rounded when simulated); weights fp32 [n, h] (already
        scaled by ``h^-0.5 * ID^-0.5``); keys [E, ID] shared by the n queries or [n, E, ID] per query;
        visible BoolTensor[n, E]. Score ``sum_h w_h relu(q_h . k_e)``, invisible entries -inf.
        Returns LongTensor[n, k] (k <= E). Ties go to the earlier entry (stable sort), so the selection
        does not depend on how a sequence is chunked (relu makes exact-zero scores common and
        ``torch.topk`` leaves the order of ties unspecified). Positions where fewer than k entries are
        visible hold invisible entries: callers mask them with ``visible``.
        """
        spec = "nhd,ed->nhe" if keys.dim() == 2 else "nhd,ned->nhe"
        sc = torch.einsum(spec, q.float(), keys.float()).relu()
        sc = (sc * weights[:, :, None]).sum(dim=1).masked_fill(~visible, float("-inf"))
        return torch.sort(sc, dim=-1, descending=True, stable=True).indices[:, :k]


class Compressor(_Compressing):
    """KV compressor of a CSA (overlapping, ratio ``compress_rates[CSA]``, with ``indexer``) or HCA
    (non-overlapping, ratio ``compress_rates[HCA]``) layer."""

    def __init__(self, cfg, layer_type: str):
        csa = layer_type == CSA
        super().__init__(cfg.hidden_size, cfg.head_dim, cfg.compress_rates[layer_type], csa, cfg.rms_norm_eps)
        self.indexer = Indexer(cfg) if csa else None
