"""Building blocks of DeepSeek-V4 in plain PyTorch: norms, RoPE, mHC, MoE.

Every module works on *flat token batches*: the engine concatenates the new tokens of all sequences
into one ``[T, ...]`` tensor so projections and experts run once per step for the whole batch.

Sources (facts only, no code copied):
- DeepSeek-V4 technical report (paper) §2.1 (MoE, hash routing), §2.2 (mHC), §2.3 (attention).
- DeepSeek's official ``inference/model.py`` (DeepSeek-V4-Flash release): ``RMSNorm``,
  ``precompute_freqs_cis`` (YaRN), ``apply_rotary_emb`` (interleaved pairs), ``Gate``, ``Expert``,
  ``MoE``, ``Block.hc_pre/hc_post``, ``ParallelHead.hc_head`` and ``kernel.hc_split_sinkhorn``.
- transformers 5.23 ``models/deepseek_v4/modeling_deepseek_v4.py`` for the parameter names.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from parity.model.fast_linear import WideningLinear, decode_linear


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, weight)`` (no bias); while torch.compile traces, `fast_linear.decode_linear` (for few
    rows a broadcast-reduce that inductor fuses into one kernel streaming the weight, instead of one
    extern GEMM call per projection, or parity's C++ op for a large weight; a bf16 weight under fp32 x is
    widened as loaded, fp32 sums).
    x [..., in], weight [out, in] (x's dtype or narrower) -> [..., out] in x's dtype."""
    if torch.compiler.is_compiling():
        return decode_linear(x, weight)
    return F.linear(x, weight)


#: Linear modules whose forward is ``x @ weight^T`` in x's dtype (`project` may reformulate them).
PLAIN_LINEARS = (nn.Linear, WideningLinear)


def project(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``mod(x)``; while torch.compile traces and ``mod`` is a bias-free `PLAIN_LINEARS` module (fp32 or a
    bf16-stored weight under fp32 x), `linear` of its weight: `fast_linear.decode_linear` widens a narrower
    weight as loaded and accumulates in x's dtype. A quantized or sharded replacement keeps its own
    forward; eager is ``mod(x)`` exactly. x [..., in] -> [..., out] in x's dtype."""
    if torch.compiler.is_compiling() and type(mod) in PLAIN_LINEARS and mod.bias is None:
        return decode_linear(x, mod.weight)
    return mod(x)


class RMSNorm(nn.Module):
    """RMSNorm with an fp32 weight (the official code keeps norm weights in fp32).

    forward(x[..., dim]) -> [..., dim] in x's dtype; the normalisation runs in fp32.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt((xf * xf).mean(-1, keepdim=True) + self.eps)  # x*x: = square(), faster kernel
        return (self.weight.float() * xf).to(dtype)


def rms_unweighted(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) over the last dim, no weight (the per-head query norm of V4 attention)."""
    xf = x.float()
    return x * torch.rsqrt((xf * xf).mean(-1, keepdim=True) + eps).to(x.dtype)


# ----------------------------------------------------------------------------------------- RoPE
def rope_inv_freq(rope_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """Inverse frequencies [rope_dim // 2] (fp32) of one RoPE setting.

    Plain RoPE: ``theta ** (-2i / rope_dim)``. With ``scaling = {"rope_type": "yarn", "factor": f,
    "original_max_position_embeddings": L0, "beta_fast": 32, "beta_slow": 1}`` the YaRN blend of the
    official ``precompute_freqs_cis``: frequencies below the ``beta`` correction range are divided by
    ``f``, above it kept, linear ramp in between. No mscale is applied to cos/sin (official code; the
    transformers config forces ``attention_factor = 1``).
    """
    freqs = 1.0 / (theta ** (torch.arange(0, rope_dim, 2, dtype=torch.float32) / rope_dim))
    if scaling and scaling.get("rope_type", "default") == "yarn":
        factor = float(scaling["factor"])
        orig = float(scaling["original_max_position_embeddings"])
        beta_fast = float(scaling.get("beta_fast") or 32)
        beta_slow = float(scaling.get("beta_slow") or 1)

        def corr_dim(n_rot: float) -> float:
            return rope_dim * math.log(orig / (n_rot * 2 * math.pi)) / (2 * math.log(theta))

        low = max(math.floor(corr_dim(beta_fast)), 0)
        high = min(math.ceil(corr_dim(beta_slow)), rope_dim - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(rope_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        keep = 1 - ramp  # 1 -> extrapolate (keep freq), 0 -> interpolate (freq / factor)
        freqs = freqs / factor * (1 - keep) + freqs * keep
    elif scaling and scaling.get("rope_type", "default") not in ("default", "yarn"):
        from parity.errors import ConfigError

        raise ConfigError(
            f"config field 'rope_scaling.rope_type' is {scaling.get('rope_type')!r}: expected 'yarn' or 'default'"
        )
    return freqs


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [N, rope_dim // 2] (fp32) for integer positions [N]."""
    ang = positions.to(torch.float32)[:, None] * inv_freq.to(positions.device)[None, :]
    return ang.cos(), ang.sin()


class Rotary:
    """Interleaved RoPE of one setting at N positions, built once per step and shared by every layer.

    Pair (a, b) = channels (2i, 2i+1) becomes (a c - b s, a s + b c) (``inverse``: s -> -s). The
    tables hold cos on both channels of a pair (``c2``) and (-s, s) (``s2``), so a rotation is
    ``x * c2 + swap(x) * s2``: three elementwise ops instead of a dozen, and bit-identical to the
    textbook form (b * (-s) = -(b * s) exactly, and a * s + b * c = b * c + a * s).

    Attributes: cos, sin [N, rope_dim // 2] fp32 (what `rope_cos_sin` returns).
    """

    def __init__(self, cos: torch.Tensor, sin: torch.Tensor):
        self.cos, self.sin = cos, sin
        self.rd = 2 * cos.shape[-1]
        self.c2 = torch.stack((cos, cos), dim=-1).flatten(-2)
        self.s2 = torch.stack((-sin, sin), dim=-1).flatten(-2)
        self._s2_inv = None
        self._swap = torch.tensor([1, 0], device=cos.device)  # (a, b) -> (b, a) along a pair

    def rotate(self, x: torch.Tensor, inverse: bool = False, inplace: bool = False) -> torch.Tensor:
        """RoPE on the *last* ``rope_dim`` channels of x [N, ..., D] (see `apply_rope`)."""
        rd = self.rd
        if inverse:
            if self._s2_inv is None:
                self._s2_inv = -self.s2
            s2 = self._s2_inv
        else:
            s2 = self.s2
        shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (rd,)
        c2, s2 = self.c2.view(shape), s2.view(shape)
        r = x[..., -rd:]
        # (b, a) * (-s, s): a fresh tensor (index_select: 2-3x faster than flip here)
        swapped = r.float().unflatten(-1, (-1, 2)).index_select(-1, self._swap).flatten(-2).mul_(s2)
        if inplace and x.dtype == torch.float32:
            r.mul_(c2).add_(swapped)  # computed in fp32 already: rotate x's channels in place
            return x
        rot = r.float().mul(c2).add_(swapped).to(x.dtype)
        if inplace:
            r.copy_(rot)
            return x
        if rd == x.shape[-1]:
            return rot
        return torch.cat([x[..., :-rd], rot], dim=-1)


def apply_rope(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False, inplace: bool = False
) -> torch.Tensor:
    """Interleaved RoPE on the *last* ``2 * cos.shape[-1]`` channels of x (V4 lays heads out [nope | rope]).

    x: [N, ..., D] (N tokens first, any middle dims, e.g. heads); cos/sin: [N, rope_dim // 2].
    Pairs are consecutive channels (2i, 2i+1) like the official ``view_as_complex`` form. ``inverse``
    rotates by -angle (the official ``apply_rotary_emb(..., inverse=True)`` on the attention output).
    Returns a new tensor in x's dtype; the rotation is computed in fp32. ``inplace`` writes the rotated
    channels into x itself and returns x (for a fresh x the caller owns: saves a copy of the whole tensor).
    For several tensors at the same positions, build one `Rotary` and call its ``rotate``.
    """
    return Rotary(cos, sin).rotate(x, inverse=inverse, inplace=inplace)


# ----------------------------------------------------------------------------------------- mHC
def sinkhorn_split(
    mixes: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, hc: int, iters: int, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split mHC mixes [T, (2 + hc) * hc] into pre [T, hc], post [T, hc], comb [T, hc, hc] (fp32).

    Official ``kernel.hc_split_sinkhorn``: pre = sigmoid(.) + eps, post = 2 sigmoid(.),
    comb = row-softmax(.) + eps, then a column normalisation and ``iters - 1`` (row, column) rounds
    of Sinkhorn-Knopp, each dividing by (sum + eps) (paper §2.2, doubly-stochastic residual mixing).
    """
    scale = scale.float()
    base = base.float()
    pre = torch.sigmoid(mixes[:, :hc] * scale[0] + base[:hc]) + eps
    post = 2 * torch.sigmoid(mixes[:, hc : 2 * hc] * scale[1] + base[hc : 2 * hc])
    comb = mixes[:, 2 * hc :].view(-1, hc, hc) * scale[2] + base[2 * hc :].view(1, hc, hc)
    # The normalisation rounds run on a [hc(i), hc(j), T] copy: each sum over i or j then adds hc
    # contiguous length-T rows (vectorised) instead of reducing hc-element runs per token; the values
    # are the same, ~3x faster for prefill-sized T. In-place division avoids a temporary per round.
    # eps as a 0-dim fp32 tensor: the same value as the Python float (rounded to fp32 either way), but
    # an in-place add then skips wrapping a scalar into a tensor (~30% of a round's cost at decode sizes).
    eps_t = torch.full((), eps, dtype=torch.float32, device=mixes.device)
    c = torch.softmax(comb, dim=-1).permute(1, 2, 0).contiguous()
    c += eps_t
    c /= c.sum(dim=0, keepdim=True).add_(eps_t)
    for _ in range(iters - 1):
        c /= c.sum(dim=1, keepdim=True).add_(eps_t)
        c /= c.sum(dim=0, keepdim=True).add_(eps_t)
    return pre, post, c.permute(2, 0, 1).contiguous()


class HyperConnection(nn.Module):
    """Manifold-constrained hyper-connection of one sub-block (paper §2.2): parameters ``fn``
    [(2 + hc) * hc, hc * H], ``base`` [(2 + hc) * hc], ``scale`` [3] (transformers names
    ``attn_hc.*`` / ``ffn_hc.*``; official ``hc_attn_fn`` ...).

    ``pre(streams[T, hc, H]) -> (x[T, H], post[T, hc], comb[T, hc, hc])`` collapses the streams into
    the sub-block input; ``post(out[T, H], streams, post, comb) -> [T, hc, H]`` expands the sub-block
    output and adds the Sinkhorn-mixed residual: ``y_j = post_j * out + sum_i comb[i, j] * streams_i``.
    """

    def __init__(self, hc: int, hidden: int, iters: int, hc_eps: float, norm_eps: float):
        super().__init__()
        self.hc, self.iters, self.hc_eps, self.norm_eps = hc, iters, hc_eps, norm_eps
        mix = (2 + hc) * hc
        self.fn = nn.Parameter(torch.empty(mix, hc * hidden, dtype=torch.float32))
        self.base = nn.Parameter(torch.empty(mix, dtype=torch.float32))
        self.scale = nn.Parameter(torch.empty(3, dtype=torch.float32))

    def pre(self, streams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        flat = streams.flatten(1).float()
        rs = torch.rsqrt((flat * flat).mean(-1, keepdim=True) + self.norm_eps)
        mixes = linear(flat, self.fn.float()) * rs
        pre, post, comb = sinkhorn_split(mixes, self.scale, self.base, self.hc, self.iters, self.hc_eps)
        x = torch.bmm(pre.unsqueeze(1), streams.float()).squeeze(1)  # sum_i pre_i * streams_i
        return x.to(streams.dtype), post, comb

    @staticmethod
    def post(out: torch.Tensor, streams: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
        # sum_i comb[i, j] * streams_i as one batched GEMM, then + post_j * out in place
        y = torch.bmm(comb.transpose(1, 2), streams.float())
        y.addcmul_(post.unsqueeze(-1), out.float().unsqueeze(1))
        return y.to(out.dtype)


class HyperHead(nn.Module):
    """Final collapse of the hc streams before the last norm: ``hc_fn`` [hc, hc * H], ``hc_base`` [hc],
    ``hc_scale`` [1] (official ``ParallelHead.hc_head``). forward(streams[T, hc, H]) -> [T, H]."""

    def __init__(self, hc: int, hidden: int, hc_eps: float, norm_eps: float):
        super().__init__()
        self.hc_eps, self.norm_eps = hc_eps, norm_eps
        self.hc_fn = nn.Parameter(torch.empty(hc, hc * hidden, dtype=torch.float32))
        self.hc_base = nn.Parameter(torch.empty(hc, dtype=torch.float32))
        self.hc_scale = nn.Parameter(torch.empty(1, dtype=torch.float32))

    def forward(self, streams: torch.Tensor) -> torch.Tensor:
        flat = streams.flatten(1).float()
        rs = torch.rsqrt((flat * flat).mean(-1, keepdim=True) + self.norm_eps)
        mixes = linear(flat, self.hc_fn.float()) * rs
        pre = torch.sigmoid(mixes * self.hc_scale.float() + self.hc_base.float()) + self.hc_eps
        return torch.bmm(pre.unsqueeze(1), streams.float()).squeeze(1).to(streams.dtype)


# ----------------------------------------------------------------------------------------- MoE
def swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float) -> torch.Tensor:
    """silu(min(gate, limit)) * clamp(up, -limit, limit) in fp32 (official ``Expert.forward``;
    ``limit <= 0`` disables the clamp)."""
    gate, up = gate.float(), up.float()
    if limit > 0:
        gate = gate.clamp(max=limit)
        up = up.clamp(min=-limit, max=limit)
    return F.silu(gate) * up


class SharedExpert(nn.Module):
    """The shared expert: SwiGLU MLP with ``gate_proj``/``up_proj`` [I, H], ``down_proj`` [H, I].

    The current official code clamps it with ``swiglu_limit`` like the routed experts (its SwiGLU
    clamp; the first V4-Flash release did not): ``clamp=False`` reproduces that first release.
    forward(x[T, H]) -> [T, H] in x's dtype.
    """

    def __init__(self, hidden: int, inter: int, limit: float):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)
        self.limit = limit
        self.clamp = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = swiglu(project(self.gate_proj, x), project(self.up_proj, x), self.limit if self.clamp else 0.0)
        return project(self.down_proj, h.to(x.dtype))


#: `Experts.forward`: at most this many token-expert pairs take the vectorised path (decode steps);
#: larger batches run expert by expert, which keeps each expert's intermediates cache-sized.
#: (A module constant, not an attribute: `quant.FP4Experts` borrows `Experts.forward`.)
VECTORIZE_EXPERT_PAIRS = 128


class Experts(nn.Module):
    """Routed experts as stacked tensors (transformers layout): ``gate_up_proj`` [E, 2I, H] (rows
    ``[:I]`` = official ``w1`` gate, ``[I:]`` = ``w3`` up) and ``down_proj`` [E, H, I] (``w2``).

    forward(hidden[T, H], expert_ids[T, k] (long), weights[T, k] (fp32)) -> [T, H] fp32:
    ``sum_j weights[t, j] * down(swiglu(gate_up(hidden[t])))`` over the token's k experts. The routing
    weight multiplies the SwiGLU output before ``down_proj`` (official ``Expert.forward``).
    A quantized replacement (FP4 experts) must keep this signature.
    """

    def __init__(self, n_experts: int, hidden: int, inter: int, limit: float):
        super().__init__()
        self.n_experts, self.inter, self.limit = n_experts, inter, limit
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * inter, hidden))
        self.down_proj = nn.Parameter(torch.empty(n_experts, hidden, inter))

    def expert_weights(self, e: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up [2I, H], down [H, I]) of expert `e` in `dtype`. Quantized subclasses override this
        (dequantizing only the experts a step uses); the dispatch in `forward` is shared."""
        return self.gate_up_proj[e].to(dtype), self.down_proj[e].to(dtype)

    def forward(self, hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        flat_ids = expert_ids.reshape(-1)
        order = torch.argsort(flat_ids, stable=True)  # pairs sorted by expert, token order within one
        counts = torch.bincount(flat_ids, minlength=self.n_experts).tolist()
        tok_sorted = order // expert_ids.shape[1]
        w_sorted = weights.reshape(-1).index_select(0, order)
        out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
        inter = self.inter
        if flat_ids.numel() <= VECTORIZE_EXPERT_PAIRS:
            # Few pairs: gather, SwiGLU, routing weight and scatter-add once over all pairs; only the
            # two GEMMs run per expert, each writing its rows of a shared buffer (same per-row math).
            xs = hidden.index_select(0, tok_sorted)
            gu = hidden.new_empty((xs.shape[0], 2 * inter))
            used, start = [], 0
            for e, c in enumerate(counts):
                if c:
                    gu_w, dn_w = self.expert_weights(e, hidden.dtype)
                    gu[start : start + c] = F.linear(xs[start : start + c], gu_w)
                    used.append((start, c, dn_w))
                start += c
            h = (swiglu(gu[:, :inter], gu[:, inter:], self.limit) * w_sorted[:, None]).to(hidden.dtype)
            y = hidden.new_empty((xs.shape[0], hidden.shape[1]))
            for start, c, dn_w in used:
                y[start : start + c] = F.linear(h[start : start + c], dn_w)
            return out.index_add_(0, tok_sorted, y.float())
        start = 0
        for e, c in enumerate(counts):
            if c == 0:
                continue
            tok = tok_sorted[start : start + c]
            gu_w, dn_w = self.expert_weights(e, hidden.dtype)
            gu = F.linear(hidden[tok], gu_w)
            h = swiglu(gu[:, :inter], gu[:, inter:], self.limit)
            h = h * w_sorted[start : start + c, None]
            out.index_add_(0, tok, F.linear(h.to(hidden.dtype), dn_w).float())
            start += c
        return out


class Router(nn.Module):
    """MoE gate (official ``Gate``): ``weight`` [E, H]; scored layers have ``e_score_correction_bias``
    [E] (official ``gate.bias``), hash layers ``tid2eid`` [vocab, k] (token id -> expert ids).

    forward(x[T, H], token_ids[T]) -> (weights[T, k] fp32, ids[T, k] long):
    scores = sqrt(softplus(x W^T)) (or softmax / sigmoid per ``scoring_func``), computed in fp32;
    ids = top-k of (scores + bias) or ``tid2eid[token]``; weights = scores at ids, normalised to sum 1
    unless scoring is softmax (official; transformers always normalises), times ``routed_scaling_factor``.
    """

    def __init__(
        self, n_experts: int, hidden: int, top_k: int, vocab: int, is_hash: bool, scoring: str, route_scale: float
    ):
        super().__init__()
        self.top_k, self.is_hash, self.scoring, self.route_scale = top_k, is_hash, scoring, route_scale
        self.weight = nn.Parameter(torch.empty(n_experts, hidden))
        if is_hash:
            self.register_buffer("tid2eid", torch.zeros(vocab, top_k, dtype=torch.long))
        else:
            self.register_buffer("e_score_correction_bias", torch.zeros(n_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = linear(x.float(), self.weight.float())
        if self.scoring == "softmax":
            scores = logits.softmax(dim=-1)
        elif self.scoring == "sigmoid":
            scores = logits.sigmoid()
        else:
            scores = F.softplus(logits).sqrt()
        if self.is_hash:
            ids = self.tid2eid[token_ids].long()
        else:
            ids = (scores + self.e_score_correction_bias.float()).topk(self.top_k, dim=-1).indices
        w = scores.gather(1, ids)
        if self.scoring != "softmax":
            w = w / w.sum(dim=-1, keepdim=True)
        return w * self.route_scale, ids


class MoE(nn.Module):
    """DeepSeek-V4 MoE block: ``gate`` (Router), ``experts`` (Experts), ``shared_experts``.

    forward(x[T, H], token_ids[T]) -> [T, H] in x's dtype (routed sum in fp32, plus the shared expert).
    """

    def __init__(self, cfg, layer: int, is_hash: bool):
        super().__init__()
        self.gate = Router(
            cfg.n_routed_experts,
            cfg.hidden_size,
            cfg.num_experts_per_tok,
            cfg.vocab_size,
            is_hash,
            cfg.scoring_func,
            cfg.routed_scaling_factor,
        )
        self.experts = Experts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size, cfg.swiglu_limit)
        self.shared_experts = SharedExpert(
            cfg.hidden_size, cfg.moe_intermediate_size * max(cfg.n_shared_experts, 1), cfg.swiglu_limit
        )

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        w, ids = self.gate(x, token_ids)
        y = self.experts(x, ids, w)
        y = y + self.shared_experts(x).float()
        return y.to(x.dtype)
