"""The DeepSeek-V4 causal LM (`V4ForCausalLM`): full forward, incremental forward, MTP.

Module tree and parameter names equal transformers 5.23 ``DeepseekV4ForCausalLM`` (``model.embed_tokens``,
``model.layers.N.{self_attn, mlp, input_layernorm, post_attention_layernorm, attn_hc, ffn_hc}``,
``model.norm``, ``model.hc_head``, ``lm_head``). The MTP module (which transformers does not
instantiate) lives at ``model.mtp.N`` with the decoder-layer names plus ``e_proj``, ``h_proj``,
``enorm``, ``hnorm``, ``norm`` and ``hc_head`` (official ``MTPBlock``; see docs/numerics.md).
"""

from __future__ import annotations

import torch
from torch import nn

from parity.config import CSA, HCA, SLIDING, ModelConfig
from parity.errors import ConfigError, RequestError
from parity.model.attention import Attention
from parity.model.cache_state import CacheAllocator, LayerCache, SequenceState, TorchAllocator
from parity.model.fast_linear import decode_linear
from parity.model.layers import HyperConnection, HyperHead, MoE, RMSNorm, rope_cos_sin, rope_inv_freq
from parity.model.numerics import IndexCodec, KVCodec
from parity.model.step_metadata import StepContext

KV_CACHE_DTYPES = ("bf16", "fp8")
INDEXER_DTYPES = ("bf16", "fp4")


class DecoderLayer(nn.Module):
    """One V4 block: mHC pre -> RMSNorm -> attention -> mHC post, then the same around the MoE.

    forward(streams[T, hc, H], ctx, caches) -> [T, hc, H].
    """

    def __init__(self, cfg: ModelConfig, layer_type: str, is_hash: bool, inv_main, inv_comp):
        super().__init__()
        self.layer_type = layer_type
        self.self_attn = Attention(cfg, layer_type, inv_main, inv_comp)
        self.mlp = MoE(cfg, 0, is_hash)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        args = (cfg.hc_mult, cfg.hidden_size, cfg.hc_sinkhorn_iters, cfg.hc_eps, cfg.rms_norm_eps)
        self.attn_hc = HyperConnection(*args)
        self.ffn_hc = HyperConnection(*args)

    def forward(self, h: torch.Tensor, ctx: StepContext, caches: list) -> torch.Tensor:
        x, post, comb = self.attn_hc.pre(h)
        x = self.self_attn(self.input_layernorm(x), ctx, caches)
        h = HyperConnection.post(x, h, post, comb)
        x, post, comb = self.ffn_hc.pre(h)
        x = self.mlp(self.post_attention_layernorm(x), ctx.token_ids)
        return HyperConnection.post(x, h, post, comb)


class MTPLayer(DecoderLayer):
    """Multi-token-prediction block (official ``MTPBlock``): from the main model's last hidden streams
    h_t [T, hc, H] and the embedding of token t+1, predicts token t+2:
    ``x = e_proj(enorm(embed(next_ids)))[:, None] + h_proj(hnorm(h))``, one decoder block, then its own
    ``hc_head`` and ``norm`` and the shared ``lm_head``."""

    def __init__(self, cfg: ModelConfig, layer_type: str, inv_main, inv_comp):
        super().__init__(cfg, layer_type, False, inv_main, inv_comp)
        H = cfg.hidden_size
        self.e_proj = nn.Linear(H, H, bias=False)
        self.h_proj = nn.Linear(H, H, bias=False)
        self.enorm = RMSNorm(H, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(H, cfg.rms_norm_eps)
        self.norm = RMSNorm(H, cfg.rms_norm_eps)
        self.hc_head = HyperHead(cfg.hc_mult, H, cfg.hc_eps, cfg.rms_norm_eps)


class V4Model(nn.Module):
    """``model.*``: embedding, decoder layers, final norm, hc head, MTP layers."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        rd = cfg.qk_rope_head_dim
        inv_main = rope_inv_freq(rd, cfg.rope_params(SLIDING)["theta"], None)
        comp = cfg.rope_params(CSA)
        inv_comp = rope_inv_freq(rd, comp["theta"], comp["scaling"])
        self.register_buffer("inv_freq_main", inv_main, persistent=False)
        self.register_buffer("inv_freq_compress", inv_comp, persistent=False)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(
            [
                DecoderLayer(cfg, cfg.layer_types[i], cfg.is_hash_layer(i), inv_main, inv_comp)
                for i in range(cfg.num_hidden_layers)
            ]
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hc_head = HyperHead(cfg.hc_mult, cfg.hidden_size, cfg.hc_eps, cfg.rms_norm_eps)
        ratio_to_type = {0: SLIDING, cfg.compress_rates[CSA]: CSA, cfg.compress_rates[HCA]: HCA}
        mtp = []
        for i in range(cfg.num_nextn_predict_layers):
            r = cfg.mtp_compress_ratios[i] if i < len(cfg.mtp_compress_ratios) else 0
            if r not in ratio_to_type:
                raise ConfigError(
                    f"config field 'compress_ratios[{cfg.num_hidden_layers + i}]' (MTP layer) is {r!r}: "
                    f"expected one of {sorted(ratio_to_type)}"
                )
            mtp.append(MTPLayer(cfg, ratio_to_type[r], inv_main, inv_comp))
        self.mtp = nn.ModuleList(mtp)


#: Parameters kept in fp32 whatever the model dtype (official code / transformers
#: ``_keep_in_fp32_modules_strict``): mHC, sinks, position biases, router bias, norms.
#: ``lm_head.weight`` too: the official ``ParallelHead`` keeps the head in fp32 and computes fp32 logits.
_FP32_SUFFIXES = (
    "_hc.fn",
    "_hc.base",
    "_hc.scale",
    "hc_head.hc_fn",
    "hc_head.hc_base",
    "hc_head.hc_scale",
    "sinks",
    "position_bias",
    "e_score_correction_bias",
    "norm.weight",
    "lm_head.weight",
)


class V4ForCausalLM(nn.Module):
    """DeepSeek-V4 causal LM. Build with `build_model` or `from_pretrained`.

    Attributes:
        config: the `ModelConfig`.
        cache_block_entries: compressed entries per growing cache block (default 64).
        kv_cache_dtype: default KV cache mode, "bf16" (unrounded, in the model dtype) or "fp8"
            (official FP8 rounding of the non-RoPE part).
        indexer_dtype: default indexer mode, "bf16" or "fp4" (official Hadamard + FP4 simulation).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = V4Model(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.cache_block_entries = 64
        self.kv_cache_dtype = "bf16"
        self.indexer_dtype = "bf16"
        self.decode_graph = None  # a `parity.model.decode_graph.DecodeGraph` runs plain decode steps when set

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """Compute dtype (that of the embedding)."""
        return self.model.embed_tokens.weight.dtype

    def to_dtype(self, dtype: torch.dtype) -> V4ForCausalLM:
        """Cast floating parameters to dtype, keeping the fp32-only ones (see `_FP32_SUFFIXES`) in fp32."""
        with torch.no_grad():
            for name, p in self.named_parameters():
                want = torch.float32 if name.endswith(_FP32_SUFFIXES) else dtype
                if p.is_floating_point() and p.dtype != want:
                    p.data = p.data.to(want)
        return self

    # ------------------------------------------------------------------ options
    def _modes(self, kv_cache_dtype: str | None, indexer_dtype: str | None) -> tuple[bool, bool]:
        kv = kv_cache_dtype or self.kv_cache_dtype
        ix = indexer_dtype or self.indexer_dtype
        if kv not in KV_CACHE_DTYPES:
            raise RequestError(f"kv_cache_dtype is {kv!r}: expected one of {KV_CACHE_DTYPES}")
        if ix not in INDEXER_DTYPES:
            raise RequestError(f"indexer_dtype is {ix!r}: expected one of {INDEXER_DTYPES}")
        return kv == "fp8", ix == "fp4"

    # ------------------------------------------------------------------ cache
    def new_state(
        self,
        allocator: CacheAllocator | None = None,
        kv_cache_dtype: str | None = None,
        indexer_dtype: str | None = None,
    ) -> SequenceState:
        """An empty `SequenceState` (position 0) whose fixed components are allocated now.

        Args:
            allocator: storage for the cache tensors; None = plain ``torch.empty`` on the model device.
            kv_cache_dtype: "bf16" (unrounded, stored in the model dtype) or "fp8" (official FP8 rounding,
                stored packed, see `parity.model.numerics.KVCodec`); default: the model's ``kv_cache_dtype``.
            indexer_dtype: "bf16" or "fp4" (official Hadamard + FP4 rounding; indexer keys stored packed, see
                `parity.model.numerics.IndexCodec`); default: the model's ``indexer_dtype``.
            The state must later be run with the same modes.
        Raises:
            RequestError: unknown kv_cache_dtype / indexer_dtype.
        """
        fp8, fp4 = self._modes(kv_cache_dtype, indexer_dtype)
        alloc = allocator if allocator is not None else TorchAllocator(self.device)
        st = SequenceState(
            [self._layer_cache(i, layer.layer_type, fp8, fp4, alloc) for i, layer in enumerate(self.model.layers)],
            alloc,
        )
        st.kv_fp8, st.index_fp4 = fp8, fp4
        return st

    def _codec(self, fp8: bool) -> KVCodec:
        cfg = self.config
        return KVCodec(cfg.head_dim, cfg.qk_rope_head_dim, self.dtype, fp8)

    def _index_codec(self, fp4: bool) -> IndexCodec:
        return IndexCodec(self.config.index_head_dim, self.dtype, fp4)

    def _layer_cache(self, index: int, layer_type: str, fp8: bool, fp4: bool, alloc) -> LayerCache:
        cfg = self.config
        ratio = 0 if layer_type == SLIDING else cfg.compress_rates[layer_type]
        return LayerCache(
            index,
            ratio,
            cfg.sliding_window,
            cfg.head_dim,
            cfg.index_head_dim,
            layer_type == CSA,
            self.cache_block_entries,
            self._codec(fp8),
            self._index_codec(fp4),
            alloc,
        )

    def cache_layout(self, kv_cache_dtype: str = "bf16", indexer_dtype: str | None = None) -> list[dict]:
        """Per layer and component: what one sequence's cache needs (as `new_state` with the same modes
        allocates it; ``indexer_dtype`` defaults to the model's, like `new_state`: "fp4" stores the
        indexer keys as packed FP4 rows).

        Returns a list of dicts with keys ``layer``, ``component`` ("window_kv", "compressor_state",
        "compressed_kv", "index_keys"), ``kind`` ("fixed": allocated once per sequence; "growing":
        allocated in blocks as the sequence grows), ``shape`` (per slot for fixed, per block for growing),
        ``dtype`` (torch dtype name), ``bytes`` (of one such tensor), ``tokens_per_entry`` (1 for the
        window, the compression ratio for compressed components) and ``entries`` (rows of the tensor).
        A growing block of ``block_entries`` entries covers ``block_entries * tokens_per_entry`` tokens.
        """
        fp8, fp4 = self._modes(kv_cache_dtype, indexer_dtype)
        cfg = self.config
        width, kvd = self._codec(fp8).storage
        esize = torch.empty(0, dtype=kvd).element_size()
        iwidth, idt = self._index_codec(fp4).storage
        isize = torch.empty(0, dtype=idt).element_size()
        out = []
        for i, layer in enumerate(self.model.layers):
            t = layer.layer_type
            W, D, ID, B = cfg.sliding_window, cfg.head_dim, cfg.index_head_dim, self.cache_block_entries

            def add(comp, kind, shape, dtype, size, tpe, layer_index=i):
                n = 1
                for s in shape:
                    n *= s
                out.append(
                    {
                        "layer": layer_index,
                        "component": comp,
                        "kind": kind,
                        "shape": tuple(shape),
                        "dtype": str(dtype).replace("torch.", ""),
                        "bytes": n * size,
                        "tokens_per_entry": tpe,
                        "entries": shape[-2] if len(shape) > 1 else 1,
                    }
                )

            add("window_kv", "fixed", (W, width), kvd, esize, 1)
            if t != SLIDING:
                r = cfg.compress_rates[t]
                coff = 2 if t == CSA else 1
                state_width = coff * (D + (ID if t == CSA else 0))
                add("compressor_state", "fixed", (2, coff * r, state_width), torch.float32, 4, 1)
                add("compressed_kv", "growing", (B, width), kvd, esize, r)
                if t == CSA:
                    add("index_keys", "growing", (B, iwidth), idt, isize, r)
        return out

    # ------------------------------------------------------------------ forward
    def _run(self, ids: torch.Tensor, segments, states, kv_fp8: bool, index_fp4: bool) -> torch.Tensor:
        """Run all layers over flat ids [T]; returns final hidden streams [T, hc, H]."""
        dev = self.device
        positions = torch.cat([torch.arange(p, p + n, device=dev) for (_, n, p) in segments])
        m = self.model
        cos_sin = {
            "main": rope_cos_sin(positions, m.inv_freq_main),
            "compress": rope_cos_sin(positions, m.inv_freq_compress),
        }
        ctx = StepContext(positions, ids, segments, cos_sin, kv_fp8, index_fp4)
        x = m.embed_tokens(ids)
        h = x.unsqueeze(1).expand(-1, self.config.hc_mult, -1).contiguous()
        for i, layer in enumerate(m.layers):
            h = layer(h, ctx, [st.layers[i] for st in states])
        return h

    def _head(self, h: torch.Tensor, hc_head: HyperHead | None = None, norm: RMSNorm | None = None) -> torch.Tensor:
        hc_head = hc_head or self.model.hc_head
        norm = norm or self.model.norm
        x = norm(hc_head(h))
        head = self.lm_head
        dt = torch.promote_types(x.dtype, head.weight.dtype)  # fp32 activations stay fp32 on a bf16-stored head
        if type(head) is nn.Linear:  # a plain head: the bandwidth-bound formulation (quantized heads: their own)
            return decode_linear(x.to(dt), head.weight).float()
        return head(x.to(dt)).float()

    @torch.no_grad()
    def forward_incremental(
        self,
        tokens,
        states: list[SequenceState],
        all_logits: bool = False,
        kv_cache_dtype: str | None = None,
        indexer_dtype: str | None = None,
    ):
        """Extend each sequence by its new tokens (one batched step) and return logits.

        Args:
            tokens: per sequence, the new token ids (list[int] or LongTensor[n_i], n_i >= 1).
            states: one `SequenceState` per sequence (updated in place: caches and ``num_tokens``).
            all_logits: False -> FloatTensor[B, vocab] (logits after each sequence's last new token);
                True -> list of FloatTensor[n_i, vocab].
            kv_cache_dtype / indexer_dtype: numerics modes (defaults: the model's attributes); the
                states must have been created with the same kv_cache_dtype.
        Raises:
            RequestError: mismatched lengths, empty token lists, ids outside the vocabulary, freed states.
        """
        kv_fp8, index_fp4 = self._modes(kv_cache_dtype, indexer_dtype)
        if len(tokens) != len(states):
            raise RequestError(f"tokens has {len(tokens)} sequences but states has {len(states)}: expected equal")
        if not tokens:
            raise RequestError("tokens is empty: expected at least one sequence")
        if len({id(st) for st in states}) != len(states):
            raise RequestError("states lists the same SequenceState twice: expected one state per sequence")
        dev = self.device
        seqs, segments, s = [], [], 0
        limit = self.config.max_position_embeddings
        for i, (t, st) in enumerate(zip(tokens, states, strict=False)):
            st.check_usable()
            if (st.kv_fp8, st.index_fp4) != (kv_fp8, index_fp4):
                raise RequestError(
                    f"states[{i}] was created with other numerics (kv_cache_dtype / indexer_dtype) than this call uses"
                )
            t = torch.as_tensor(t, dtype=torch.long, device=dev).reshape(-1)
            if t.numel() == 0:
                raise RequestError(f"tokens[{i}] is empty: expected at least one new token")
            if st.num_tokens + t.numel() > limit:
                raise RequestError(
                    f"sequence {i} would reach {st.num_tokens + t.numel()} tokens: the model's "
                    f"max_position_embeddings is {limit}"
                )
            seqs.append(t)
            segments.append((s, t.numel(), st.num_tokens))
            s += t.numel()
        ids = torch.cat(seqs)
        V = self.config.vocab_size
        if int(ids.min()) < 0 or int(ids.max()) >= V:
            raise RequestError(f"token ids must be in [0, {V}), got min {int(ids.min())} max {int(ids.max())}")
        graph = self.decode_graph
        if graph is not None and not all_logits and graph.accepts(segments, kv_fp8, index_fp4):
            logits = graph.run(ids, states, kv_fp8, index_fp4)
            for st in states:
                st.num_tokens += 1
            return logits
        h = self._run(ids, segments, states, kv_fp8, index_fp4)
        for (_, n, _), st in zip(segments, states, strict=False):
            st.num_tokens += n
        if all_logits:
            logits = self._head(h)
            return [logits[a : a + n] for (a, n, _) in segments]
        last = torch.tensor([a + n - 1 for (a, n, _) in segments], device=dev)
        return self._head(h[last])

    @torch.no_grad()
    def forward_logits(
        self,
        input_ids: torch.Tensor,
        kv_cache_dtype: str = "bf16",
        indexer_dtype: str = "bf16",
        return_hidden: bool = False,
    ):
        """Full causal forward without a persistent cache.

        Args:
            input_ids: LongTensor[B, S].
            kv_cache_dtype / indexer_dtype: "bf16" (default whatever the model's defaults: the pure math,
                as transformers) or "fp8" / "fp4" (the official quantization-aware steps).
            return_hidden: also return the last hidden streams [B, S, hc, H] (input of the MTP module).
        Returns:
            FloatTensor[B, S, vocab] (fp32), or (logits, hidden) when return_hidden.
        Raises:
            RequestError: input_ids not 2-D / empty / out of vocabulary.
        """
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise RequestError(
                "input_ids must be a LongTensor[B, S] with S >= 1, got "
                f"{getattr(input_ids, 'shape', type(input_ids).__name__)}"
            )
        kv_fp8, index_fp4 = self._modes(kv_cache_dtype, indexer_dtype)
        B, S = input_ids.shape
        if S > self.config.max_position_embeddings:
            raise RequestError(
                f"input_ids has {S} positions: the model's max_position_embeddings is "
                f"{self.config.max_position_embeddings}"
            )
        states = [self.new_state(kv_cache_dtype=kv_cache_dtype, indexer_dtype=indexer_dtype) for _ in range(B)]
        try:
            ids = input_ids.to(self.device, torch.long).reshape(-1)
            V = self.config.vocab_size
            if int(ids.min()) < 0 or int(ids.max()) >= V:
                raise RequestError(f"input_ids must be in [0, {V}), got min {int(ids.min())} max {int(ids.max())}")
            segments = [(b * S, S, 0) for b in range(B)]
            h = self._run(ids, segments, states, kv_fp8, index_fp4)
            logits = self._head(h).view(B, S, -1)
        finally:
            for st in states:
                st.free()
        if return_hidden:
            return logits, h.view(B, S, *h.shape[1:])
        return logits

    @torch.no_grad()
    def mtp_logits(
        self,
        hidden: torch.Tensor,
        next_ids: torch.Tensor,
        depth: int = 0,
        kv_cache_dtype: str | None = None,
        indexer_dtype: str | None = None,
    ) -> torch.Tensor:
        """MTP prediction (official ``MTPBlock.forward``), full causal, no persistent cache.

        Args:
            hidden: FloatTensor[B, S, hc, H], the main model's last hidden streams (``return_hidden``).
            next_ids: LongTensor[B, S], token t+1 for each position t (the input shifted by one).
            depth: which MTP layer (0 .. num_nextn_predict_layers - 1).
        Returns:
            FloatTensor[B, S, vocab]: logits for token t+2.
        Raises:
            RequestError: the model has no MTP layer ``depth`` (e.g. loaded without MTP weights) or bad shapes.
        """
        if depth >= len(self.model.mtp):
            raise RequestError(f"depth is {depth}: the model has {len(self.model.mtp)} MTP layers")
        if next_ids.shape != hidden.shape[:2]:
            raise RequestError(
                f"next_ids shape {tuple(next_ids.shape)} must equal hidden.shape[:2] {tuple(hidden.shape[:2])}"
            )
        kv_fp8, index_fp4 = self._modes(kv_cache_dtype, indexer_dtype)
        mtp = self.model.mtp[depth]
        cfg = self.config
        B, S = next_ids.shape
        dev = self.device
        ids = next_ids.to(dev, torch.long).reshape(-1)
        h = hidden.to(dev, self.dtype).reshape(B * S, cfg.hc_mult, cfg.hidden_size)
        e = mtp.enorm(self.model.embed_tokens(ids))
        x = mtp.e_proj(e).unsqueeze(1) + mtp.h_proj(mtp.hnorm(h))
        t = mtp.layer_type
        alloc = TorchAllocator(dev)
        caches = [self._layer_cache(cfg.num_hidden_layers + depth, t, kv_fp8, index_fp4, alloc) for _ in range(B)]
        positions = torch.arange(S, device=dev).repeat(B)
        m = self.model
        ctx = StepContext(
            positions,
            ids,
            [(b * S, S, 0) for b in range(B)],
            {
                "main": rope_cos_sin(positions, m.inv_freq_main),
                "compress": rope_cos_sin(positions, m.inv_freq_compress),
            },
            kv_fp8,
            index_fp4,
        )
        x = mtp(x, ctx, caches)
        return self._head(x, mtp.hc_head, mtp.norm).view(B, S, -1)
