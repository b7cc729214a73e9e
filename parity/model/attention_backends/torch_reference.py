"""The torch attention backend: the reference `sparse_sink_attention` and the CPU-friendly paths that
compute the same math without materialising index lists (batched decode, banded chunk attention).

All math runs in fp32. The paths are equal to `sparse_sink_attention` over the layer's index lists up to
float summation order (tests/test_attention_backends.py).
"""

from __future__ import annotations

import torch

from parity.model.attention_backends.base import (
    AttentionBackend,
    AttentionBatch,
    ChunkKeys,
    DecodeKeys,
    register_backend,
)


def sink_softmax(logits: list[torch.Tensor], sink: torch.Tensor) -> list[torch.Tensor]:
    """Softmax over the concatenated logit groups [..., H, L_i] plus one learned sink logit per head.

    The sink (fp32 [H]) joins the softmax with a zero value, so it only takes probability mass away
    (official ``sparse_attn``; paper §2.3.3). Returns the probabilities of each group, sink dropped.
    """
    s = sink.float().view(-1, 1).expand(*logits[0].shape[:-1], 1)
    probs = torch.cat([*logits, s], dim=-1).softmax(dim=-1)
    out, a = [], 0
    for lg in logits:
        out.append(probs[..., a : a + lg.shape[-1]])
        a += lg.shape[-1]
    return out


def sparse_sink_attention(
    q: torch.Tensor, kv: torch.Tensor, sink: torch.Tensor, topk_idxs: torch.Tensor, scale: float
) -> torch.Tensor:
    """Sink attention over gathered keys, K = V (the math of the official ``sparse_attn``).

    Args:
        q: [B, S, H, D] queries.
        kv: [B, N, D] the key/value rows of each batch element (window and compressed entries).
        sink: fp32 [H] learned sink logits.
        topk_idxs: LongTensor[B, S, K] rows of ``kv`` each query attends to; -1 = no key (its logit is
            -inf). A query with no valid key returns zeros (all mass on the sink).
        scale: logit scale (``head_dim^-0.5``).
    Returns:
        [B, S, H, D] in q's dtype: ``sum_k softmax_k([q.kv_k * scale, sink]) kv_k`` per head.
    """
    B, S, K = topk_idxs.shape
    valid = topk_idxs >= 0
    rows = torch.arange(B, device=kv.device)[:, None, None]
    g = kv[rows, topk_idxs.clamp(min=0)].float()  # [B, S, K, D]
    logits = torch.einsum("bshd,bskd->bshk", q.float(), g) * scale
    logits = logits.masked_fill(~valid[:, :, None, :], float("-inf"))
    (probs,) = sink_softmax([logits], sink)
    return torch.einsum("bshk,bskd->bshd", probs, g).to(q.dtype)


@register_backend
class TorchBackend(AttentionBackend):
    """Reference backend in plain torch, any device.

    Attributes:
        query_block: queries per band block of the chunk path (a quarter of the window, at least 8):
            a block attends to the ``query_block + window - 1`` window keys covering it, not to every
            key of the chunk (~80% of the computed logits are inside the window).
        pass_elements: bound on the logits/gathered keys of one batched pass of the chunk path, in
            elements (consecutive band blocks are processed together up to this size).
    """

    name = "torch"

    def __init__(self, window: int):
        super().__init__(window)
        self.query_block = max(8, window // 4)
        self.pass_elements = 1 << 24

    def forward(self, q: torch.Tensor, batch: AttentionBatch, sink: torch.Tensor, scale: float) -> torch.Tensor:
        dec = batch.decode
        out = None if dec is not None and dec.rows is None else torch.empty_like(q)
        if dec is not None:
            o = self._decode(q if dec.rows is None else q.index_select(0, dec.rows), dec, sink, scale).to(q.dtype)
            if out is None:
                return o
            out[dec.rows] = o
        for ch in batch.chunks:
            self._chunk(q[ch.start : ch.start + ch.n], ch, sink, scale, out[ch.start : ch.start + ch.n])
        return out

    def _decode(self, q: torch.Tensor, dec: DecodeKeys, sink: torch.Tensor, scale: float) -> torch.Tensor:
        """One query per sequence, q [k, H, D] -> fp32 [k, H, D]: dense logits over the window ring
        and (HCA) all entries, masked; on CSA the top-k entries gathered per query."""
        keys, allowed = dec.window, dec.window_valid
        sel_k = sel_ok = None
        if dec.entries is not None:
            if dec.topk is not None:
                sel_ok = torch.gather(dec.entry_valid, 1, dec.topk)
                ents = dec.entries
                sel_k = torch.gather(ents, 1, dec.topk[:, :, None].expand(-1, -1, ents.shape[-1]))
            else:
                keys = torch.cat([keys, dec.entries], dim=1)
                allowed = torch.cat([allowed, dec.entry_valid], dim=1)
        qf, kf = q.float(), keys.float()
        logits = [(torch.einsum("nhd,nld->nhl", qf, kf) * scale).masked_fill(~allowed[:, None, :], float("-inf"))]
        if sel_k is not None:
            sf = sel_k.float()
            ls = torch.einsum("nhd,nkd->nhk", qf, sf) * scale
            logits.append(ls.masked_fill(~sel_ok[:, None, :], float("-inf")))
        probs = sink_softmax(logits, sink)
        o = torch.einsum("nhl,nld->nhd", probs[0], kf)
        if sel_k is not None:
            o = o + torch.einsum("nhk,nkd->nhd", probs[1], sf)
        return o

    def _chunk(self, q: torch.Tensor, ch: ChunkKeys, sink: torch.Tensor, scale: float, out: torch.Tensor) -> None:
        """One sequence's chunk of n queries, q [n, H, D] (writes ``out`` [n, H, D]).

        Banded: the queries are cut into blocks of ``query_block``; block j only sees the
        ``query_block + window - 1`` keys ``Kp[j * Bq : j * Bq + L]`` of the key sequence
        ``Kp = [zero pad | old | new]`` (aligned so that Kp row W - 1 + i is query i's own key), taken
        as strided views (``unfold``) and multiplied in one batched GEMM per pass. Masks are the window
        rule on absolute positions, so results equal attention over all keys with the window mask.
        """
        n, H, D = q.shape
        p, ratio, ent = ch.pos, ch.ratio, ch.entries
        W, Bq = self.window, self.query_block
        L = Bq + W - 1
        nb = -(-n // Bq)
        Np = nb * Bq
        dev = q.device
        kf = ch.new.float()
        pad_front = W - 1 - ch.old.shape[0]
        Kp = torch.cat([kf.new_zeros(pad_front, D), ch.old.float(), kf, kf.new_zeros(Np - n, D)])
        blocks_t = Kp.unfold(0, L, Bq)  # [nb, D, L] (view): block j = Kp rows [j*Bq, j*Bq + L)
        qf = q.float()
        n_ent = 0 if ent is None else ent.shape[0]
        n_top = 0 if ch.topk is None else ch.topk.shape[1]
        per_query = H * (L + n_ent + 1) + n_top * (D + H + 1)
        bpp = max(1, self.pass_elements // max(1, per_query * Bq))  # blocks per pass
        r_ar = torch.arange(Bq, device=dev)
        k_ar = torch.arange(L, device=dev)
        for j0 in range(0, nb, bpp):
            j1 = min(nb, j0 + bpp)
            a, b = j0 * Bq, min(n, j1 * Bq)  # real queries of this pass: [a, b)
            g, m = j1 - j0, b - a
            jj = torch.arange(j0, j1, device=dev)[:, None]
            qpos = p + jj * Bq + r_ar[None, :]  # [g, Bq]
            kpos = p - (W - 1) + jj * Bq + k_ar[None, :]  # [g, L]
            dk = kpos[:, None, :] - qpos[:, :, None]  # [g, Bq, L]: key pos - query pos
            allowed = (dk <= 0) & (dk > -W) & (kpos >= 0)[:, None, :]
            qb = qf[a:b]
            if m < g * Bq:
                qb = torch.cat([qb, qb.new_zeros(g * Bq - m, H, D)])
            logits = torch.bmm(qb.view(g, Bq * H, D), blocks_t[j0:j1]).view(g, Bq, H, L)
            logits = logits.mul_(scale).masked_fill_(~allowed[:, :, None, :], float("-inf"))
            parts = [logits.view(g * Bq, H, L)[:m]]
            sel_k = shared = None
            n_vis = (p + b) // ratio if ent is not None else 0  # entries visible to the pass's last query
            if n_vis:
                vis = torch.arange(n_vis, device=dev)[None, :] < ((qpos.flatten()[:m] + 1) // ratio)[:, None]
                if ch.topk is not None:
                    # the chunk's selection cut to the entries this pass can see (ties went to the earlier
                    # entry, so the first min(K, n_vis) indices are all < n_vis)
                    top = ch.topk[a:b, : min(n_top, n_vis)]
                    sel_k = ent.index_select(0, top.flatten()).view(*top.shape, D).float()
                    ls = torch.einsum("nhd,nkd->nhk", qb[:m], sel_k) * scale
                    parts.append(ls.masked_fill(~torch.gather(vis, 1, top)[:, None, :], float("-inf")))
                else:
                    shared = ent[:n_vis].float()
                    le = torch.einsum("nhd,ed->nhe", qb[:m], shared) * scale
                    parts.append(le.masked_fill(~vis[:, None, :], float("-inf")))
            probs = sink_softmax(parts, sink)
            pw = probs[0]
            if m < g * Bq:
                pw = torch.cat([pw, pw.new_zeros(g * Bq - m, H, L)])
            o = torch.bmm(pw.reshape(g, Bq * H, L), blocks_t[j0:j1].transpose(1, 2)).view(g * Bq, H, D)[:m]
            if sel_k is not None:
                o = o + torch.einsum("nhk,nkd->nhd", probs[1], sel_k)
            elif shared is not None:
                o = o + torch.einsum("nhe,ed->nhd", probs[1], shared)
            out[a:b] = o.to(out.dtype)
