"""The fixed-shape decode step: one function of tensors that adds one token to each of B sequences, every
layer, the cache writes and the LM head, with no host syncs (what `parity.model.decode_graph.DecodeGraph`
compiles per batch bucket; its docstring says how positions, window rings, compressed entries and experts
become fixed-shape tensor work).

Equal to the eager `V4ForCausalLM.forward_incremental` up to fp32 summation order (tests/test_decode_graph.py).
"""

from __future__ import annotations

import torch

from parity.devices.core import materialized
from parity.model.attention_backends import DecodeKeys
from parity.model.compressor import compress_step_masked
from parity.model.fast_linear import decode_linear
from parity.model.int8_quant import Int8Experts, Int8Linear, w8a8_linear
from parity.model.layers import (
    Experts,
    HyperConnection,
    Rotary,
    project,
    rms_unweighted,
    rope_cos_sin,
    swiglu,
)


class _Modes:
    """The numerics flags the attention hooks read (``kv_fp8``, ``index_fp4``), as `StepContext` has them."""

    def __init__(self, kv_fp8: bool, index_fp4: bool):
        self.kv_fp8, self.index_fp4 = kv_fp8, index_fp4


def moe_step(mlp, x: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """`MoE.forward` for few tokens without host syncs: each (token, picked expert) pair multiplies the
    gathered weights of its expert (``sum(W[e].to(x.dtype)[:, None] * x)``, which inductor emits as one
    reduction reading the picked experts' rows in place and widening bf16-stored stacks in registers;
    INT8 / packed INT4 experts: `Int8Experts.gathered_forward`, exact integer sums). x [T, H] -> [T, H] in
    x's dtype."""
    w, ids = mlp.gate(x, token_ids)
    ex: Experts = mlp.experts
    if isinstance(ex, Int8Experts):
        y = ex.gathered_forward(x, ids, w)
    else:
        T, k = ids.shape
        flat = ids.reshape(-1)
        xs = materialized(x)[:, None, :].expand(T, k, x.shape[-1]).reshape(T * k, -1)
        gu = (ex.gate_up_proj[flat].to(x.dtype) * xs[:, None, :]).sum(-1)  # [T*k, 2I]
        inter = ex.inter
        h = materialized((swiglu(gu[:, :inter], gu[:, inter:], ex.limit) * w.reshape(-1)[:, None]).to(x.dtype))
        y = (ex.down_proj[flat].to(x.dtype) * h[:, None, :]).sum(-1).float()  # [T*k, H]
        y = y.view(T, k, -1).sum(1)
    y = y + mlp.shared_experts(x).float()
    return y.to(x.dtype)


def _insert(rows: torch.Tensor, new: torch.Tensor, at: torch.Tensor, emit: torch.Tensor) -> torch.Tensor:
    """rows [B, E, D] with row ``at[b]`` replaced by new [B, D] where emit [B] (functional)."""
    hit = (torch.arange(rows.shape[1], device=rows.device)[None, :] == at[:, None]) & emit[:, None]
    # the new rows stored once: inlined, their encoding would be recomputed for every stored row
    return torch.where(hit[:, :, None], materialized(new.to(rows.dtype))[:, None, :], rows)


def attention_step(attn, x, rope: Rotary, pos, modes: _Modes, codecs, windows, states, entries, index_keys):
    """`Attention.forward` for B sequences adding one token each, fixed shapes.

    Args:
        x: [B, H]; pos: LongTensor[B]; codecs: the (`KVCodec`, `IndexCodec`) of the caches.
        windows / states: per sequence the window ring [W, width] and the compressor state (updated in place).
        entries / index_keys: stored rows [B, E, width] (None on sliding / non-CSA layers).
    Returns:
        (out [B, H], new entry [B, head_dim] or None, new index key or None): the entries a sequence
        completes this step (meaningful where ``(pos + 1) % ratio == 0``), as `LayerCache.append_entries`
        takes them.
    """
    B = x.shape[0]
    W = attn.window
    qr = attn.q_a_norm(project(attn.q_a_proj, x))
    q = project(attn.q_b_proj, qr).view(B, attn.n_heads, attn.head_dim)
    q = rope.rotate(rms_unweighted(q, attn.eps), inplace=True)
    kv = attn._round_kv(rope.rotate(attn.kv_norm(project(attn.kv_proj, x)), inplace=True), modes)
    codec, icodec = codecs
    enc = codec.encode(kv)
    slot = pos % W
    for b in range(B):
        windows[b].index_copy_(0, slot[b : b + 1], enc[b : b + 1])
    win = codec.decode(torch.stack(windows).flatten(0, 1)).view(B, W, -1)
    P = pos[:, None]
    allowed = (P - (P - torch.arange(W, device=x.device)[None, :]) % W) >= 0
    keys = DecodeKeys(None, win, allowed)
    new_ent = new_ikey = None
    comp = attn.compressor
    if comp is not None:
        ratio, d = comp.ratio, comp.d
        cw = comp.coff * d
        ckv, csc = comp.project(x, pos)
        st = torch.stack(states)
        emit, ent = compress_step_masked(st[:, 0, :, :cw], st[:, 1, :, :cw], ckv, csc, pos, ratio, comp.overlap, d)
        wid = ((pos + 1) // ratio - 1).clamp(min=0)
        new_ent = attn._round_kv(comp.finish(ent, wid, attn.inv_freq, kv.dtype), modes)
        n_vis = (pos + 1) // ratio
        E = entries.shape[1]
        vis = torch.arange(E, device=x.device)[None, :] < n_vis[:, None]
        stored = _insert(entries, codec.encode(new_ent), wid, emit)
        ents = codec.decode(stored.flatten(0, 1)).view(B, E, -1).masked_fill(~vis[:, :, None], 0)
        keys.entries, keys.entry_valid = ents, vis
        idx = comp.indexer
        if idx is not None:
            _, ient = compress_step_masked(
                st[:, 0, :, cw:], st[:, 1, :, cw:], *idx.project(x, pos), pos, idx.ratio, True, idx.d
            )
            new_ikey = attn._rotate_index_keys(idx.finish(ient, wid, attn.inv_freq, kv.dtype), modes)
            istored = _insert(index_keys, icodec.encode(new_ikey), wid, emit)
            ik = icodec.decode(istored.flatten(0, 1)).view(B, E, -1).masked_fill(~vis[:, :, None], 0)
            iq = project(idx.q_b_proj, qr).view(B, idx.n_heads, idx.d)
            iq = attn._round_index(rope.rotate(iq, inplace=True), modes)
            iw = project(idx.scorer.weights_proj, x).float() * (idx.n_heads**-0.5 * idx.d**-0.5)
            keys.topk = idx.select_topk(iq, iw, ik, vis, min(idx.topk, E))
        for b in range(B):
            states[b].copy_(st[b])
    out = attn.backend._decode(q, keys, attn.sinks, attn.scale).to(q.dtype)
    return attn._output(out, rope), new_ent, new_ikey


def decode_step(
    model, ids, pos, windows, states, entries, index_keys, kv_fp8: bool, index_fp4: bool, head: bool, live=None
):
    """One decode step of B sequences (the function `DecodeGraph` compiles).

    Args:
        model: a `V4ForCausalLM` with unsharded layers, weights in the compute dtype, bf16-stored
            (`parity.model.weight_storage`) or W8A8 / W4A8 (`parity.model.int8_quant`).
        ids / pos: LongTensor[B] the new tokens and their positions.
        windows / states: per layer, per sequence the window ring and compressor state (None on sliding
            layers); updated in place.
        entries / index_keys: per layer the stacked stored entry rows [B, E, width] (None where absent).
        kv_fp8 / index_fp4: the numerics modes.
        head: also run the LM head (one graph for the whole step; `DecodeGraph` does so for one row off the
            CPU or uncompiled, and on the CPU for an fp32 model's head on one of parity's C++ ops: an int8
            head, or a float head `fast_linear.native_linear` takes; `DecodeGraph._head_in_step`).
        live: an int64 tensor of one value, the batch's real rows (the rest pad a bucket): a float head on
            the C++ op computes only those (`lm_head_rows`); None: every row.
    Returns:
        (fp32 logits [B, vocab] with ``head``, else the LM head's input [B, H] (final collapse and norm);
        per layer the new entries [B, head_dim] or None; per layer the new index keys or None).
    """
    m = model.model
    modes = _Modes(kv_fp8, index_fp4)
    codecs = (model._codec(kv_fp8), model._index_codec(index_fp4))
    rot = {
        "main": Rotary(*rope_cos_sin(pos, m.inv_freq_main)),
        "compress": Rotary(*rope_cos_sin(pos, m.inv_freq_compress)),
    }
    h = m.embed_tokens(ids)
    h = h.unsqueeze(1).expand(-1, model.config.hc_mult, -1).contiguous()
    new_ents, new_ikeys = [], []
    for i, layer in enumerate(m.layers):
        attn = layer.self_attn
        x, post, comb = HyperConnection.pre(layer.attn_hc, h)
        x = type(layer.input_layernorm).forward(layer.input_layernorm, x)
        x, ne, ni = attention_step(
            attn, x, rot[attn.rope_key], pos, modes, codecs, windows[i], states[i], entries[i], index_keys[i]
        )
        new_ents.append(ne)
        new_ikeys.append(ni)
        h = HyperConnection.post(x, h, post, comb)
        x, post, comb = HyperConnection.pre(layer.ffn_hc, h)
        x = moe_step(layer.mlp, type(layer.post_attention_layernorm).forward(layer.post_attention_layernorm, x), ids)
        h = HyperConnection.post(x, h, post, comb)
    x = m.norm(m.hc_head(h))
    return (lm_head_rows(x, *head_operands(model), live=live) if head else x), new_ents, new_ikeys


def head_operands(model) -> tuple[torch.Tensor, ...]:
    """The LM head's tensors as `lm_head_rows` takes them: (weight [vocab, H],) of a plain head (detached:
    a plain tensor, whose shape dynamo may keep symbolic), (int8 weight, fp32 scale [vocab]) of an
    `Int8Linear` head."""
    head = model.lm_head
    if isinstance(head, Int8Linear):
        return head.weight, head.weight_scale
    return (head.weight.detach(),)


def lm_head_rows(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None, live: torch.Tensor | None = None
) -> torch.Tensor:
    """The LM head: x [B, H] -> fp32 logits [B, vocab]. Plain (``scale`` None): `fast_linear.decode_linear`
    in the wider of x's and the weight's dtypes (fp32 activations stay fp32 on a bf16-stored head, as
    ``V4ForCausalLM._head``; ``live``, an int64 tensor of one value r: on parity's C++ op rows from r on are
    not computed and come out zero); int8 weight [vocab, H] with per-row ``scale`` [vocab]: the `Int8Linear`
    head (`int8_quant.w8a8_linear`, per-token int8 activations), as its eager forward (every row)."""
    if scale is not None:
        return w8a8_linear(x, weight, scale).float()
    return decode_linear(x.to(torch.promote_types(x.dtype, weight.dtype)), weight, live).float()
