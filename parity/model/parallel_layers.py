"""Tensor / expert / data parallel form of `V4ForCausalLM` (`parallelize_`) and the shard of every tensor.

Layout (DeepSeek's official ``inference/model.py`` ``world_size`` split; vLLM's TP / EP / DP flags):

- attention: query heads (``q_b_proj`` rows, ``sinks``) and output groups (``o_a_proj`` rows) split over
  TP, ``o_b_proj`` row-parallel (input columns split) with one all-reduce of its output over the TP group;
  the single shared KV head (``kv_proj``), ``q_a_proj``, the compressors and the lightning indexer are
  replicated (the official code also splits the indexer heads and all-reduces their scores; parity keeps
  the indexer whole so the top-k selection is computed exactly as in one process);
- MoE: the shared expert column- (``gate_proj``/``up_proj``) and row-parallel (``down_proj``) over TP; routed
  experts split by their intermediate dimension over TP, or, with expert parallelism, partitioned whole
  over all TP x DP ranks. With DP and EP, each MoE layer gathers the tokens of every replica, runs the
  router (replicated; hash layers included) and the local experts on all of them, sums over all ranks and
  keeps its replica's rows; routed and shared partial sums share one all-reduce;
- embedding and LM head vocabulary-parallel over TP (masked lookup + all-reduce; logits all-gathered);
- everything else (norms, mHC, router, MTP projections) replicated.

Quantized modules (`parity.model.quant`) split the same way: an FP8 linear's ``qweight`` like its float
weight and its 128x128 UE8M0 ``scale`` along the same dim on block boundaries; FP4 experts' packed
weights and 1x32 scales by expert (EP) or by the intermediate dimension on 32-value scale blocks (TP).

Caches are therefore identical on every TP rank (one KV head), as in the official code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from parity.distributed.collectives import all_gather_cat, all_gather_rows, all_reduce
from parity.distributed.context import ParallelContext
from parity.errors import ParallelError
from parity.model.attention import Attention
from parity.model.layers import MoE
from parity.model.quant import FP4Experts, _FP8WeightMixin

#: A tensor's shard: (dim, [(start, stop), ...]); the local tensor is the parts concatenated along dim.
Shard = tuple[int, list[tuple[int, int]]]


def _even(n: int, size: int, rank: int) -> tuple[int, int]:
    k = n // size
    return rank * k, (rank + 1) * k


def shard_spec(name: str, shape: tuple[int, ...], cfg, ctx: ParallelContext) -> Shard | None:
    """Which part of the full tensor ``name`` (parity/transformers name, full ``shape``) rank ``ctx`` holds;
    None = replicated. See the module docstring for the layout."""
    tp, r = ctx.tp, ctx.tp_rank
    leaf = name.rsplit(".", 2)
    tail = ".".join(leaf[-2:])
    if name.endswith(".mlp.experts.gate_up_proj") or name.endswith(".mlp.experts.down_proj"):
        if ctx.config.enable_expert_parallel:
            return (0, [_even(shape[0], ctx.ep, ctx.ep_rank)]) if ctx.ep > 1 else None
        if tp == 1:
            return None
        if name.endswith("gate_up_proj"):
            inter = shape[1] // 2
            a, b = _even(inter, tp, r)
            return 1, [(a, b), (inter + a, inter + b)]
        return 2, [_even(shape[2], tp, r)]
    if tp == 1:
        return None
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        return 0, [_even(shape[0], tp, r)]
    if ".self_attn." in name and ".compressor." not in name:
        if tail in ("q_b_proj.weight", "o_a_proj.weight") or name.endswith("self_attn.sinks"):
            return 0, [_even(shape[0], tp, r)]
        if tail == "o_b_proj.weight":
            return 1, [_even(shape[1], tp, r)]
    if ".mlp.shared_experts." in name:
        if tail in ("gate_proj.weight", "up_proj.weight"):
            return 0, [_even(shape[0], tp, r)]
        if tail == "down_proj.weight":
            return 1, [_even(shape[1], tp, r)]
    return None


def take_shard(full: torch.Tensor, spec: Shard | None) -> torch.Tensor:
    """The local part of ``full`` under ``spec`` (a view when it is one range, else a new tensor)."""
    if spec is None:
        return full
    dim, parts = spec
    pieces = [full.narrow(dim, a, b - a) for a, b in parts]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=dim)


def shard_shape(shape: tuple[int, ...], spec: Shard | None) -> tuple[int, ...]:
    """Shape of the local part of a tensor of ``shape``."""
    if spec is None:
        return tuple(shape)
    dim, parts = spec
    out = list(shape)
    out[dim] = sum(b - a for a, b in parts)
    return tuple(out)


def scaled_shard(spec: Shard | None, per: int, full: int, what: str, ctx: ParallelContext) -> Shard | None:
    """The shard of a tensor holding one entry per ``per`` elements of the sharded dim of ``spec`` (a block
    scale: ``per`` = the block size; packed FP4: 2 values per byte), for a dim of ``full`` elements.

    Raises:
        ParallelError: a split point that is not a multiple of ``per`` (the end of the dim excepted),
            naming ``what`` (the tensor) and the layout.
    """
    if spec is None:
        return None
    dim, parts = spec
    out = []
    for a, b in parts:
        bad = [x for x in (a, b) if x % per and x != full]
        if bad:
            raise ParallelError(
                f"{what}: {ctx.config.describe()} splits dim {dim} ({full} values) at {bad[0]}, "
                f"not on a {per}-value boundary of its quantized storage; choose a tensor-parallel size "
                f"that splits it on {per}-value blocks, or export a checkpoint whose dims are multiples of "
                f"{per} x the tensor-parallel size (for the default miniature: serve its float preset, "
                f"`parity serve tiny -tp {ctx.config.tp}`)"
            )
        out.append((a // per, -(-b // per)))
    return dim, out


def fp8_shards(
    name: str, out_f: int, in_f: int, block: tuple[int, int], cfg, ctx: ParallelContext
) -> tuple[Shard | None, Shard | None]:
    """(shard of the FP8 weight [out_f, in_f], shard of its UE8M0 block scale [ceil(out/br), ceil(in/bc)])
    of the linear ``name`` (parity module name) on this rank; (None, None) = replicated.

    Raises:
        ParallelError: the split does not fall on ``block`` boundaries (`scaled_shard`).
    """
    spec = shard_spec(name + ".weight", (out_f, in_f), cfg, ctx)
    if spec is None:
        return None, None
    dim = spec[0]
    return spec, scaled_shard(spec, block[dim], (out_f, in_f)[dim], name + ".weight", ctx)


def expert_part(e: int, part: str, cfg, ctx: ParallelContext) -> tuple[int, slice] | None:
    """Where routed expert ``e``'s checkpoint matrix ``part`` ("w1" gate [I, H], "w3" up [I, H], "w2" down
    [H, I]) goes on this rank: (local expert index, slice of the matrix's intermediate dimension), or
    None when another rank holds that expert."""
    inter = cfg.moe_intermediate_size
    if ctx.config.enable_expert_parallel and ctx.ep > 1:
        a, b = _even(cfg.n_routed_experts, ctx.ep, ctx.ep_rank)
        return (e - a, slice(0, inter)) if a <= e < b else None
    if ctx.config.enable_expert_parallel or ctx.tp == 1:
        return e, slice(0, inter)
    a, b = _even(inter, ctx.tp, ctx.tp_rank)
    return e, slice(a, b)


class VocabParallelEmbedding(nn.Embedding):
    """``nn.Embedding`` holding vocabulary rows [vocab_start, vocab_start + rows) of this TP rank:
    ids elsewhere look up zeros, then one all-reduce over the TP group. forward(ids[T]) -> [T, H]."""

    vocab_start: int
    tp_group: object

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out.masked_fill_(outside.unsqueeze(-1), 0)
        return all_reduce(out, self.tp_group)


class VocabParallelHead(nn.Linear):
    """LM head holding this TP rank's vocabulary rows; logits are all-gathered over the TP group.
    forward(x[T, H]) -> [T, vocab]."""

    tp_group: object

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return all_gather_cat(F.linear(x, self.weight), self.tp_group, dim=-1)


class ParallelMoE(MoE):
    """`MoE` over TP / EP ranks (see the module docstring). forward(x[T, H], token_ids[T]) -> [T, H]."""

    parallel: ParallelContext
    expert_start: int

    def _local_routed(self, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Sum over the token-expert pairs whose expert lives on this rank: fp32 [T, H]."""
        local = ids - self.expert_start
        mine = (local >= 0) & (local < self.experts.n_experts)
        tok, slot = mine.nonzero(as_tuple=True)
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        if tok.numel():
            y = self.experts(x.index_select(0, tok), local[tok, slot].unsqueeze(1), w[tok, slot].unsqueeze(1))
            out.index_add_(0, tok, y)
        return out

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        ctx = self.parallel
        if not ctx.config.enable_expert_parallel:
            w, ids = self.gate(x, token_ids)
            y = self.experts(x, ids, w) + self.shared_experts(x).float()
            return all_reduce(y, ctx.tp_group).to(x.dtype)
        x_all, counts = all_gather_rows(x, ctx.dp_group)
        ids_all, _ = all_gather_rows(token_ids, ctx.dp_group)
        w, ids = self.gate(x_all, ids_all)
        y = self._local_routed(x_all, ids, w)
        start = sum(counts[: ctx.dp_rank])
        rows = y[start : start + x.shape[0]]
        rows += self.shared_experts(x).float()
        all_reduce(y, ctx.world_group)
        return y[start : start + x.shape[0]].to(x.dtype)


class ParallelAttention(Attention):
    """`Attention` holding this TP rank's heads and output groups: the row-parallel ``o_b_proj`` output is
    all-reduced over the TP group (whatever module ``o_b_proj`` is: float, FP8 or int8)."""

    tp_group: object

    def _output(self, out: torch.Tensor, rope) -> torch.Tensor:
        return all_reduce(super()._output(out, rope), self.tp_group)


def _replace_buffer(mod: nn.Module, leaf: str, spec: Shard | None) -> None:
    if spec is None:
        return
    t = mod._buffers[leaf]
    if t.device.type == "meta":
        new = torch.empty(shard_shape(tuple(t.shape), spec), dtype=t.dtype, device="meta")
    else:
        new = take_shard(t, spec).clone()
    mod._buffers[leaf] = new


def _shard_quantized_(name: str, mod: nn.Module, cfg, ctx: ParallelContext) -> None:
    """Slice the buffers of an FP8 linear or FP4 experts module ``name`` to this rank's part."""
    if isinstance(mod, _FP8WeightMixin):
        out_f, in_f = mod.qweight.shape
        w, s = fp8_shards(name, out_f, in_f, mod.block, cfg, ctx)
        if w is not None:
            _replace_buffer(mod, "qweight", w)
            _replace_buffer(mod, "scale", s)
            mod.out_features, mod.in_features = mod.qweight.shape
        return
    e, two_i, h = mod.gate_up_qweight.shape[0], mod.gate_up_qweight.shape[1], mod.hidden
    inter = two_i // 2
    gu = shard_spec(name + ".gate_up_proj", (e, two_i, h), cfg, ctx)
    dn = shard_spec(name + ".down_proj", (e, h, inter), cfg, ctx)
    _replace_buffer(mod, "gate_up_qweight", gu)
    _replace_buffer(mod, "gate_up_scale", gu)
    if dn is not None and dn[0] == 2:  # intermediate dim split: 2 FP4 values per byte, one scale per block
        _replace_buffer(mod, "down_qweight", scaled_shard(dn, 2, inter, name + ".down_qweight", ctx))
        _replace_buffer(mod, "down_scale", scaled_shard(dn, mod.block, inter, name + ".down_scale", ctx))
    else:
        _replace_buffer(mod, "down_qweight", dn)
        _replace_buffer(mod, "down_scale", dn)


def parallelize_(model, ctx: ParallelContext):
    """Turn a full `V4ForCausalLM` into rank ``ctx``'s part, in place, and return it.

    Real tensors are sliced (`shard_spec`; the full tensors are dropped; quantized modules' buffers with
    their scales, `fp8_shards` / `scaled_shard`); on the meta device only the shapes change (a loader then
    reads each rank's slices, `parity.checkpoint.reader`). A single-process context returns the model
    unchanged.

    Raises:
        ParallelError: the layout does not divide the model (`ParallelConfig.validate`), or splits a quantized
            tensor off its scale blocks (the tensor named).
    """
    model.parallel = ctx
    if ctx.is_single:
        return model
    cfg = model.config
    ctx.config.validate(cfg)
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    with torch.no_grad():
        for name, p in list(model.named_parameters()):
            spec = shard_spec(name, tuple(p.shape), cfg, ctx)
            if spec is None:
                continue
            mod_name, leaf = name.rsplit(".", 1)
            mod = model.get_submodule(mod_name)
            if p.device.type == "meta":
                new = torch.empty(shard_shape(tuple(p.shape), spec), dtype=p.dtype, device="meta")
            else:
                new = take_shard(p.data, spec).clone()
            setattr(mod, leaf, nn.Parameter(new, requires_grad=p.requires_grad))
        for name, mod in list(model.named_modules()):
            if isinstance(mod, (_FP8WeightMixin, FP4Experts)):
                _shard_quantized_(name, mod, cfg, ctx)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    tp = ctx.tp
    emb = model.model.embed_tokens
    emb.__class__ = VocabParallelEmbedding
    emb.vocab_start, emb.tp_group = ctx.tp_rank * (cfg.vocab_size // tp), ctx.tp_group
    model.lm_head.__class__ = VocabParallelHead
    model.lm_head.tp_group = ctx.tp_group
    for mod in model.modules():
        if isinstance(mod, Attention) and tp > 1:
            mod.__class__ = ParallelAttention
            mod.tp_group = ctx.tp_group
            mod.n_heads //= tp
            mod.groups //= tp
        elif isinstance(mod, MoE):
            mod.__class__ = ParallelMoE
            mod.parallel = ctx
            ex = mod.experts
            if ctx.config.enable_expert_parallel:
                ex.n_experts = cfg.n_routed_experts // ctx.ep
                mod.expert_start = ctx.ep_rank * ex.n_experts
            else:
                ex.inter = cfg.moe_intermediate_size // tp
                mod.expert_start = 0
    return model
