"""`ModelConfig`: the one description of a DeepSeek-V4 model.

The engine turns it into tensors, the cost model (`parity.plan`) into FLOPs and bytes. It reads a Hugging Face
`config.json` of a DeepSeek-V4 checkpoint in every form transformers' `DeepseekV4Config` (5.23) understands:

- modern: `layer_types`, `mlp_layer_types`, `compress_rates`, nested `rope_parameters`
  (`{"main": {...}, "compress": {...}}`) and `partial_rotary_factor`;
- legacy, as the published checkpoints ship it (deepseek-ai/DeepSeek-V4-Flash `config.json`): `compress_ratios`
  per layer with 0 (sliding only) / 4 (CSA) / 128 (HCA), `compress_rate_csa`, `compress_rate_hca`,
  `num_hash_layers`, `qk_rope_head_dim`, YaRN in `rope_scaling`, `quantization_config`, `expert_dtype`;

and writes the modern form back (`to_dict`) so that `transformers.DeepseekV4Config(**d)` accepts it. Unknown
keys are kept in `extra` and written back unchanged. Torch-free (`parity.plan` reads it).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from parity.errors import ConfigError

SLIDING = "sliding_attention"
CSA = "compressed_sparse_attention"
HCA = "heavily_compressed_attention"
LAYER_TYPES = (SLIDING, CSA, HCA)
HASH_MOE = "hash_moe"
MOE = "moe"
MLP_LAYER_TYPES = (HASH_MOE, MOE)
SCORING_FUNCS = ("sqrtsoftplus", "softmax", "sigmoid")

#: Default compression rates (paper §2.3.1 / §2.3.2: m = 4 for CSA, m' = 128 for HCA).
DEFAULT_COMPRESS_RATES = {CSA: 4, HCA: 128}

PRESET_DIR = Path(__file__).parent / "data" / "presets"

# Keys that from_dict consumes; everything else goes to `extra`.
_LEGACY_KEYS = (
    "compress_ratios",
    "compress_rate_csa",
    "compress_rate_hca",
    "num_hash_layers",
    "qk_rope_head_dim",
    "rope_scaling",
)


@dataclass
class ModelConfig:
    """A DeepSeek-V4 architecture. Field names follow transformers' `DeepseekV4Config` (5.23).

    Defaults are DeepSeek-V4-Flash (see `parity/data/presets/v4-flash.json` for sources).
    Sizes are counts (elements), not bytes.
    """

    vocab_size: int = 129280
    hidden_size: int = 4096
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 43
    num_attention_heads: int = 64
    num_key_value_heads: int = 1
    head_dim: int = 512
    qk_rope_head_dim: int = 64
    q_lora_rank: int = 1024
    o_groups: int = 8
    o_lora_rank: int = 1024
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 6
    scoring_func: str = "sqrtsoftplus"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.5
    swiglu_limit: float = 10.0
    max_position_embeddings: int = 1048576
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    #: YaRN (or other) scaling of the compressed layers' RoPE, e.g. {"rope_type": "yarn", "factor": 16,
    #: "original_max_position_embeddings": 65536, "beta_fast": 32, "beta_slow": 1}; None = plain RoPE.
    rope_scaling: dict | None = None
    layer_types: list[str] = field(default_factory=list)
    mlp_layer_types: list[str] = field(default_factory=list)
    compress_rates: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_COMPRESS_RATES))
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    sliding_window: int = 128
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    num_nextn_predict_layers: int = 1
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    pad_token_id: int | None = None
    initializer_range: float = 0.02
    #: Quantization of the published checkpoint, e.g. {"quant_method": "fp8", "fmt": "e4m3",
    #: "weight_block_size": [128, 128], "scale_fmt": "ue8m0"}; None for a bf16/fp32 checkpoint.
    quantization_config: dict | None = None
    #: Routed-expert weight format of the published checkpoint ("fp4"), None when like the rest.
    expert_dtype: str | None = None
    torch_dtype: str | None = "bfloat16"
    #: Per-layer compress ratios listed for MTP layers beyond num_hidden_layers (legacy form).
    mtp_compress_ratios: list[int] = field(default_factory=list)
    #: Keys of the source config.json that parity does not interpret, written back unchanged.
    extra: dict[str, Any] = field(default_factory=dict)
    #: Where this config came from ("preset:v4-flash", a path, ...). Not written to config.json.
    source: str = ""

    # ------------------------------------------------------------------ derived
    @property
    def model_type(self) -> str:
        return "deepseek_v4"

    @property
    def partial_rotary_factor(self) -> float:
        return self.qk_rope_head_dim / self.head_dim

    @property
    def nope_head_dim(self) -> int:
        """Non-RoPE part of each head (head_dim - qk_rope_head_dim)."""
        return self.head_dim - self.qk_rope_head_dim

    def compress_ratio(self, layer: int) -> int:
        """Compression ratio of layer `layer`: 0 (sliding only), CSA rate (4) or HCA rate (128)."""
        t = self.layer_types[layer]
        return 0 if t == SLIDING else int(self.compress_rates[t])

    @property
    def compress_ratios(self) -> list[int]:
        """Legacy per-layer form: 0 / csa rate / hca rate for each main layer."""
        return [self.compress_ratio(i) for i in range(self.num_hidden_layers)]

    def is_hash_layer(self, layer: int) -> bool:
        return self.mlp_layer_types[layer] == HASH_MOE

    @property
    def num_hash_layers(self) -> int:
        return sum(t == HASH_MOE for t in self.mlp_layer_types)

    def rope_params(self, layer_type: str) -> dict:
        """RoPE settings for a layer type: {"theta", "scaling"}. Sliding layers use `rope_theta` with no
        scaling; CSA/HCA layers use `compress_rope_theta` with `rope_scaling` (transformers 5.23
        `DeepseekV4Config.__post_init__`; DeepSeek's inference/model.py: YaRN only where compress_ratio>0)."""
        if layer_type == SLIDING:
            return {"theta": float(self.rope_theta), "scaling": None}
        return {"theta": float(self.compress_rope_theta), "scaling": copy.deepcopy(self.rope_scaling)}

    # ------------------------------------------------------------------ parsing
    @classmethod
    def from_dict(cls, d: dict, source: str = "") -> ModelConfig:
        """Parse a DeepSeek-V4 `config.json` dict (modern or legacy form).

        Raises:
            ConfigError: wrong `model_type`, missing/ill-typed fields, inconsistent sizes; the message
                names the field and the expected value.
        """
        if not isinstance(d, dict):
            raise ConfigError(f"config must be a JSON object, got {type(d).__name__}")
        d = copy.deepcopy(d)
        # A multimodal wrapper (text_config) is not V4 text; refuse clearly.
        mt = d.pop("model_type", None)
        if mt is None:
            raise ConfigError("config field 'model_type' is missing: expected 'deepseek_v4'")
        if mt != "deepseek_v4":
            raise ConfigError(f"config field 'model_type' is {mt!r}: expected 'deepseek_v4'")
        d.pop("architectures", None)
        d.pop("transformers_version", None)
        d.pop("_source", None)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        kw: dict[str, Any] = {}
        n = d.get("num_hidden_layers", cls.num_hidden_layers)
        if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
            raise ConfigError(f"config field 'num_hidden_layers' must be a positive integer, got {n!r}")

        # -- compress rates
        rates = d.pop("compress_rates", None)
        rates = dict(DEFAULT_COMPRESS_RATES) if rates is None else dict(rates)
        if not isinstance(rates, dict) or set(rates) - {CSA, HCA}:
            raise ConfigError(f"config field 'compress_rates' must map {CSA!r}/{HCA!r} to integers, got {rates!r}")
        if (v := d.pop("compress_rate_csa", None)) is not None:
            rates[CSA] = v
        if (v := d.pop("compress_rate_hca", None)) is not None:
            rates[HCA] = v
        for k in (CSA, HCA):
            rates.setdefault(k, DEFAULT_COMPRESS_RATES[k])
            if not isinstance(rates[k], int) or isinstance(rates[k], bool) or rates[k] < 2:
                raise ConfigError(f"config field 'compress_rates[{k!r}]' must be an integer >= 2, got {rates[k]!r}")
        kw["compress_rates"] = rates

        # -- layer types (explicit > legacy compress_ratios > V4-Pro style default)
        layer_types = d.pop("layer_types", None)
        legacy_ratios = d.pop("compress_ratios", None)
        mtp_ratios: list[int] = []
        if layer_types is None and legacy_ratios is not None:
            if not isinstance(legacy_ratios, list) or len(legacy_ratios) < n:
                raise ConfigError(
                    f"config field 'compress_ratios' must list one ratio per layer ({n}), got {legacy_ratios!r}"
                )
            ratio_to_type = {0: SLIDING, rates[CSA]: CSA, rates[HCA]: HCA}
            layer_types = []
            for i, r in enumerate(legacy_ratios[:n]):
                if r not in ratio_to_type:
                    raise ConfigError(
                        f"config field 'compress_ratios[{i}]' is {r!r}: expected 0 (sliding), {rates[CSA]} (CSA) "
                        f"or {rates[HCA]} (HCA)"
                    )
                layer_types.append(ratio_to_type[r])
            mtp_ratios = list(legacy_ratios[n:])
        if legacy_ratios is not None and not mtp_ratios and isinstance(legacy_ratios, list):
            mtp_ratios = list(legacy_ratios[n:])
        if layer_types is None:
            layer_types = [HCA] * min(n, 2) + [CSA if i % 2 else HCA for i in range(max(n - 2, 0))]
        if not isinstance(layer_types, list) or len(layer_types) != n:
            raise ConfigError(
                f"config field 'layer_types' must list {n} entries (num_hidden_layers), "
                f"got {len(layer_types) if isinstance(layer_types, list) else layer_types!r}"
            )
        bad = [t for t in layer_types if t not in LAYER_TYPES]
        if bad:
            raise ConfigError(
                f"config field 'layer_types' has unknown entries {bad[:3]}: expected one of {LAYER_TYPES}"
            )
        kw["layer_types"] = list(layer_types)
        kw["mtp_compress_ratios"] = mtp_ratios

        # -- MLP layer types
        mlp_types = d.pop("mlp_layer_types", None)
        n_hash = d.pop("num_hash_layers", None)
        if mlp_types is None:
            n_hash = 3 if n_hash is None else n_hash
            if not isinstance(n_hash, int) or n_hash < 0:
                raise ConfigError(f"config field 'num_hash_layers' must be a non-negative integer, got {n_hash!r}")
            mlp_types = [HASH_MOE] * min(n, n_hash) + [MOE] * max(0, n - n_hash)
        if not isinstance(mlp_types, list) or len(mlp_types) != n:
            raise ConfigError(f"config field 'mlp_layer_types' must list {n} entries (num_hidden_layers)")
        bad = [t for t in mlp_types if t not in MLP_LAYER_TYPES]
        if bad:
            raise ConfigError(
                f"config field 'mlp_layer_types' has unknown entries {bad[:3]}: expected one of {MLP_LAYER_TYPES}"
            )
        kw["mlp_layer_types"] = list(mlp_types)

        # -- RoPE: partial rotary, thetas, scaling
        head_dim = d.get("head_dim", cls.head_dim)
        rope_dim = d.pop("qk_rope_head_dim", None)
        prf = d.pop("partial_rotary_factor", None)
        rp = d.pop("rope_parameters", None)
        legacy_scaling = d.pop("rope_scaling", None)
        scaling = None
        if isinstance(rp, dict) and isinstance(rp.get("main"), dict) and isinstance(rp.get("compress"), dict):
            main, comp = rp["main"], rp["compress"]
            if "rope_theta" in main:
                d["rope_theta"] = main["rope_theta"]
            if "rope_theta" in comp:
                d["compress_rope_theta"] = comp["rope_theta"]
            if prf is None:
                prf = comp.get("partial_rotary_factor", main.get("partial_rotary_factor"))
            s = {k: v for k, v in comp.items() if k not in ("rope_theta", "partial_rotary_factor")}
            if s.get("rope_type", s.get("type", "default")) != "default":
                scaling = s
        elif isinstance(rp, dict) and rp:
            s = {k: v for k, v in rp.items() if k not in ("rope_theta", "partial_rotary_factor")}
            if s.get("rope_type", s.get("type", "default")) != "default":
                scaling = s
        elif rp is not None and not isinstance(rp, dict):
            raise ConfigError(f"config field 'rope_parameters' must be an object, got {rp!r}")
        if scaling is None and legacy_scaling is not None:
            if not isinstance(legacy_scaling, dict):
                raise ConfigError(f"config field 'rope_scaling' must be an object, got {legacy_scaling!r}")
            scaling = dict(legacy_scaling)
        if scaling is not None:
            scaling = dict(scaling)
            if "type" in scaling and "rope_type" not in scaling:
                scaling["rope_type"] = scaling.pop("type")
            scaling.pop("type", None)
            if scaling.get("rope_type") == "yarn":
                for key in ("factor", "original_max_position_embeddings"):
                    if not isinstance(scaling.get(key), (int, float)) or scaling[key] <= 0:
                        raise ConfigError(
                            f"config field 'rope_scaling.{key}' must be a positive number for YaRN, "
                            f"got {scaling.get(key)!r}"
                        )
                scaling.setdefault("beta_fast", 32)
                scaling.setdefault("beta_slow", 1)
                # DeepSeek's reference applies no YaRN mscale to cos/sin; transformers forces 1.0 too.
                scaling.setdefault("attention_factor", 1.0)
        kw["rope_scaling"] = scaling
        if rope_dim is None:
            rope_dim = round(head_dim * prf) if prf is not None else cls.qk_rope_head_dim
        kw["qk_rope_head_dim"] = rope_dim

        # -- remaining plain fields
        for name in fields:
            if name in kw or name in ("extra", "source"):
                continue
            if name in d:
                kw[name] = d.pop(name)
        if "dtype" in d and "torch_dtype" not in kw:
            kw["torch_dtype"] = d.pop("dtype")
        kw["extra"] = d
        kw["source"] = source
        cfg = cls(**kw)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Check types and consistency. Raises ConfigError naming the field."""
        pos_int = [
            "vocab_size",
            "hidden_size",
            "moe_intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "q_lora_rank",
            "o_groups",
            "o_lora_rank",
            "n_routed_experts",
            "num_experts_per_tok",
            "max_position_embeddings",
            "hc_mult",
            "hc_sinkhorn_iters",
            "sliding_window",
            "index_n_heads",
            "index_head_dim",
            "index_topk",
        ]
        for name in pos_int:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"config field {name!r} must be a positive integer, got {v!r}")
        for name in ("n_shared_experts", "num_nextn_predict_layers", "qk_rope_head_dim"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ConfigError(f"config field {name!r} must be a non-negative integer, got {v!r}")
        for name in (
            "routed_scaling_factor",
            "swiglu_limit",
            "rope_theta",
            "compress_rope_theta",
            "rms_norm_eps",
            "hc_eps",
        ):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"config field {name!r} must be a positive number, got {v!r}")
        if self.num_key_value_heads != 1:
            raise ConfigError(
                f"config field 'num_key_value_heads' must be 1 (DeepSeek-V4 shares one K=V head), "
                f"got {self.num_key_value_heads}"
            )
        if self.qk_rope_head_dim % 2 or self.qk_rope_head_dim > self.head_dim:
            raise ConfigError(
                f"config field 'qk_rope_head_dim' must be even and <= head_dim ({self.head_dim}), "
                f"got {self.qk_rope_head_dim}"
            )
        if self.num_attention_heads % self.o_groups:
            raise ConfigError(
                f"config field 'o_groups' ({self.o_groups}) must divide num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if self.num_experts_per_tok > self.n_routed_experts:
            raise ConfigError(
                f"config field 'num_experts_per_tok' ({self.num_experts_per_tok}) must be <= "
                f"n_routed_experts ({self.n_routed_experts})"
            )
        if self.scoring_func not in SCORING_FUNCS:
            raise ConfigError(f"config field 'scoring_func' is {self.scoring_func!r}: expected one of {SCORING_FUNCS}")
        if self.hidden_act != "silu":
            raise ConfigError(f"config field 'hidden_act' is {self.hidden_act!r}: DeepSeek-V4 uses 'silu'")
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(f"config field 'layer_types' must list {self.num_hidden_layers} entries")
        if len(self.mlp_layer_types) != self.num_hidden_layers:
            raise ConfigError(f"config field 'mlp_layer_types' must list {self.num_hidden_layers} entries")
        if self.quantization_config is not None and not isinstance(self.quantization_config, dict):
            raise ConfigError(f"config field 'quantization_config' must be an object, got {self.quantization_config!r}")

    # ------------------------------------------------------------------ writing
    def to_dict(self) -> dict:
        """The modern HF form, accepted by `transformers.DeepseekV4Config(**d)` and by `from_dict`."""
        out: dict[str, Any] = {"architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4"}
        skip = {
            "extra",
            "source",
            "rope_scaling",
            "compress_rates",
            "mtp_compress_ratios",
            "qk_rope_head_dim",
            "quantization_config",
            "expert_dtype",
        }
        for f in dataclasses.fields(self):
            if f.name not in skip:
                out[f.name] = copy.deepcopy(getattr(self, f.name))
        out["compress_rates"] = dict(self.compress_rates)
        out["partial_rotary_factor"] = self.partial_rotary_factor
        main = {
            "rope_type": "default",
            "rope_theta": self.rope_theta,
            "partial_rotary_factor": self.partial_rotary_factor,
        }
        comp = {
            "rope_type": "default",
            **copy.deepcopy(self.rope_scaling or {}),
            "rope_theta": self.compress_rope_theta,
            "partial_rotary_factor": self.partial_rotary_factor,
        }
        out["rope_parameters"] = {"main": main, "compress": comp}
        if self.quantization_config is not None:
            out["quantization_config"] = copy.deepcopy(self.quantization_config)
        if self.expert_dtype is not None:
            out["expert_dtype"] = self.expert_dtype
        if self.mtp_compress_ratios:
            out["compress_ratios"] = self.compress_ratios + list(self.mtp_compress_ratios)
        out.update(copy.deepcopy(self.extra))
        return out

    def to_legacy_dict(self) -> dict:
        """The form DeepSeek's published `config.json` uses (compress_ratios, num_hash_layers,
        qk_rope_head_dim, rope_scaling), for the official-layout exporter."""
        d = self.to_dict()
        for k in ("layer_types", "mlp_layer_types", "rope_parameters", "partial_rotary_factor", "compress_rates"):
            d.pop(k, None)
        if self.mlp_layer_types != [HASH_MOE] * self.num_hash_layers + [MOE] * (
            self.num_hidden_layers - self.num_hash_layers
        ):
            raise ConfigError("config field 'mlp_layer_types': hash layers must come first to write the legacy form")
        d["compress_ratios"] = self.compress_ratios + list(self.mtp_compress_ratios)
        d["compress_rate_csa"] = self.compress_rates[CSA]
        d["compress_rate_hca"] = self.compress_rates[HCA]
        d["num_hash_layers"] = self.num_hash_layers
        d["qk_rope_head_dim"] = self.qk_rope_head_dim
        if self.rope_scaling:
            s = {k: v for k, v in self.rope_scaling.items() if k != "attention_factor"}
            s["type"] = s.pop("rope_type", "yarn")
            d["rope_scaling"] = s
        return d

    def save(self, directory: str | Path, legacy: bool = False) -> Path:
        """Write `config.json` into `directory` (created). Returns the file path."""
        p = Path(directory)
        p.mkdir(parents=True, exist_ok=True)
        f = p / "config.json"
        f.write_text(json.dumps(self.to_legacy_dict() if legacy else self.to_dict(), indent=2) + "\n")
        return f

    def replace(self, **changes) -> ModelConfig:
        """A validated copy with some fields changed."""
        new = dataclasses.replace(copy.deepcopy(self), **changes)
        new.validate()
        return new


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def load_preset(name: str) -> ModelConfig:
    """Load a bundled preset (`v4-flash`, `v4-pro`, `tiny`). Sources are in each file's `_source`.

    Raises:
        ConfigError: unknown preset (the message suggests close names).
    """
    path = PRESET_DIR / f"{name}.json"
    if not path.is_file():
        close = difflib.get_close_matches(name, preset_names(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"unknown model preset {name!r}: known presets are {', '.join(preset_names())}{hint}")
    return ModelConfig.from_dict(json.loads(path.read_text()), source=f"preset:{name}")


def load_config(model: str | Path) -> ModelConfig:
    """A preset name, a checkpoint directory (with config.json) or a path to a config.json.

    Raises:
        ConfigError: nothing found under that name, unreadable JSON, or an invalid config.
    """
    s = str(model)
    p = Path(s).expanduser()
    if p.is_dir():
        p = p / "config.json"
        if not p.is_file():
            raise ConfigError(f"checkpoint directory {s!r} has no config.json")
    if p.is_file():
        try:
            d = json.loads(p.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"cannot read {p}: {e}") from None
        return ModelConfig.from_dict(d, source=str(p))
    if "/" in s or s.endswith(".json"):
        raise ConfigError(f"model {s!r} is neither a preset ({', '.join(preset_names())}) nor an existing path")
    return load_preset(s)
