"""The published FP8/FP4 layout on disk: exporter, loader (quantized and dequantized), default miniature,
bad input."""

import json
import os
import shutil
import threading
from pathlib import Path

import pytest
import torch

from parity.checkpoint import default_model, layout, writer
from parity.checkpoint.official_reader import load_official
from parity.checkpoint.reader import from_pretrained
from parity.checkpoint.shards import missing_index_cause
from parity.config import load_preset
from parity.errors import CheckpointError
from parity.model import fp_formats as ff


# ---------------------------------------------------------------------------- export + load (tiny)
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from parity.cli import main

    d = tmp_path_factory.mktemp("tiny") / "ckpt"
    assert main(["export-tiny", str(d), "--seed", "3"]) == 0
    return d


def test_export_tiny_layout(tiny_dir):
    files = sorted(p.name for p in tiny_dir.iterdir())
    assert files == [
        "config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        layout.INDEX_FILE,
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    cfg_json = json.loads((tiny_dir / "config.json").read_text())
    assert cfg_json["quantization_config"]["weight_block_size"] == [128, 128]
    assert cfg_json["expert_dtype"] == "fp4" and cfg_json["compress_ratios"] == [0, 4, 128, 4, 0]
    idx = json.loads((tiny_dir / layout.INDEX_FILE).read_text())
    assert set(idx["weight_map"]) == set(layout.official_layout(load_preset("tiny")))
    from safetensors import safe_open

    with safe_open(str(tiny_dir / idx["weight_map"]["layers.1.ffn.experts.3.w2.weight"]), "pt") as f:
        assert f.get_tensor("layers.1.ffn.experts.3.w2.weight").dtype == torch.int8
        assert f.get_tensor("layers.1.ffn.experts.3.w2.scale").dtype == torch.float8_e8m0fnu
        assert f.get_tensor("layers.1.attn.wo_a.weight").dtype == torch.float8_e4m3fn


def test_export_tiny_shards_get_the_mode_of_the_other_files(tiny_dir):
    """safetensors writes a private temp file and renames it; the shards still end up like config.json."""
    modes = {p.name: p.stat().st_mode & 0o777 for p in tiny_dir.iterdir()}
    assert set(modes.values()) == {modes["config.json"]}, modes


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_write_checkpoint_file_modes_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        d = writer.write_checkpoint(
            load_preset("tiny"),
            {"a": torch.zeros(4), "b": torch.ones(4)},
            tmp_path / "ck",
            shard_bytes=16,
            tokenizer=False,
        )
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in d.iterdir()}
    assert len(modes) == 4 and set(modes.values()) == {0o666 & ~umask}, modes


@pytest.fixture(scope="module")
def tiny_ref(tiny_dir):
    """The exported miniature loaded as a plain model with dequantized weights (the reference)."""
    return load_official(tiny_dir, quantized=False, progress=False)


def test_loaded_quantized_model_equals_dequantized_plain_model(tiny_dir, tiny_ref):
    from parity.model.quant import FP4Experts, QuantLinear, quantized_nbytes

    q = from_pretrained(tiny_dir, quantization="fp8")  # detects the published layout; kept as published
    assert isinstance(q.model.layers[0].self_attn.q_a_proj, QuantLinear)
    assert isinstance(q.model.layers[1].mlp.experts, FP4Experts)
    assert q.kv_cache_dtype == "fp8" and q.indexer_dtype == "fp4"  # official numerics by default
    ref = tiny_ref
    assert isinstance(ref.model.layers[0].self_attn.q_a_proj, torch.nn.Linear)
    ids = torch.randint(0, q.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    for mode in ("fp8", "bf16"):  # official numerics, then the pure math
        q.kv_cache_dtype = ref.kv_cache_dtype = mode
        q.indexer_dtype = ref.indexer_dtype = "fp4" if mode == "fp8" else "bf16"
        a, b = q.forward_logits(ids), ref.forward_logits(ids)  # 40 tokens: past the window, 10 CSA entries
        assert a.shape == (2, 40, q.config.vocab_size)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    # weights really are held quantized: FP8 / FP4 bytes far below the fp32 equivalent
    e = q.model.layers[1].mlp.experts
    assert e.gate_up_qweight.dtype == torch.uint8
    assert e.weight_nbytes() < (e.gate_up_proj.numel() + e.down_proj.numel()) * 4 / 6
    assert quantized_nbytes(q) > 0


# ------------------------------------------------------------------------------------- bad input
SMALL = dict(vocab_size=512)


@pytest.fixture(scope="module")
def small_src():
    from parity.model import build_model

    return build_model(load_preset("tiny").replace(**SMALL), seed=1)


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory, small_src):
    """A tiny-architecture checkpoint with a 512-token vocabulary (fast to copy and corrupt)."""
    d = tmp_path_factory.mktemp("small") / "ckpt"
    writer.export_model(small_src, d, seed=1, shard_bytes=200_000, tokenizer=False)
    return d


def test_same_seed_same_bytes(small_dir, tmp_path):
    from parity.model import build_model

    again = writer.export_model(
        build_model(load_preset("tiny").replace(**SMALL), seed=1),
        tmp_path / "again",
        seed=1,
        shard_bytes=200_000,
        tokenizer=False,
    )
    files = sorted(p.name for p in small_dir.iterdir())
    assert files == sorted(p.name for p in again.iterdir()) and len(files) > 4
    for f in files:
        assert (again / f).read_bytes() == (small_dir / f).read_bytes(), f
    other = writer.export_model(
        build_model(load_preset("tiny").replace(**SMALL), seed=2),
        tmp_path / "other",
        seed=2,
        shard_bytes=200_000,
        tokenizer=False,
    )
    shard = [f for f in files if f.endswith(".safetensors")][0]
    assert (other / shard).read_bytes() != (small_dir / shard).read_bytes()


def test_dequantized_weights_follow_the_float_model(small_dir, small_src):
    ref = load_official(small_dir, quantized=False, progress=False)
    w0, w1 = small_src.model.layers[0].self_attn.q_b_proj.weight, ref.model.layers[0].self_attn.q_b_proj.weight
    assert ((w1 - w0).abs() <= w0.abs() * 2**-4 + 2**-22).all()  # FP8 e4m3: 3 mantissa bits
    g0, g1 = small_src.model.layers[0].mlp.experts.gate_up_proj, ref.model.layers[0].mlp.experts.gate_up_proj
    # FP4 e2m1: the widest gap (4 -> 6) is one scale step and the scale is <= amax/3 of its 1x32 block
    amax = g0.abs().unflatten(-1, (-1, 32)).amax(-1, keepdim=True)
    assert ((g1 - g0).abs().unflatten(-1, (-1, 32)) <= amax / 3 + 1e-12).all()
    torch.testing.assert_close(ref.model.embed_tokens.weight, small_src.model.embed_tokens.weight.bfloat16().float())
    torch.testing.assert_close(
        ref.model.mtp[0].e_proj.weight, small_src.model.mtp[0].e_proj.weight, rtol=2**-4, atol=1e-6
    )


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _shard_of(d: Path, tensor: str) -> Path:
    return d / json.loads((d / layout.INDEX_FILE).read_text())["weight_map"][tensor]


def test_small_checkpoint_loads(small_dir):
    m = load_official(small_dir, progress=False)
    assert m.config.vocab_size == 512
    assert len({f for f in json.loads((small_dir / layout.INDEX_FILE).read_text())["weight_map"].values()}) > 2


def test_truncated_and_corrupted_shards(small_dir, tmp_path):
    d = _copy(small_dir, tmp_path / "trunc")
    shard = _shard_of(d, "layers.1.attn.wq_a.weight")
    data = shard.read_bytes()
    shard.write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match=rf"shard {shard.name}: not a complete safetensors file"):
        load_official(d, progress=False)
    shard.write_bytes(b"\xff" * 16 + data[16:])
    with pytest.raises(CheckpointError, match=shard.name):
        load_official(d, progress=False)


def test_index_naming_missing_file(small_dir, tmp_path):
    d = _copy(small_dir, tmp_path / "missing")
    shard = _shard_of(d, "embed.weight")
    shard.unlink()
    with pytest.raises(CheckpointError, match=rf"names shard '{shard.name}' which does not exist"):
        load_official(d, progress=False)
    (d / layout.INDEX_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match="weight_map"):
        load_official(d, progress=False)


def _rewrite(d: Path, tensor: str, value: torch.Tensor | None) -> None:
    from safetensors.torch import load_file, save_file

    shard = _shard_of(d, tensor)
    ts = load_file(str(shard))
    if value is None:
        del ts[tensor]
    else:
        ts[tensor] = value
    save_file(ts, str(shard), metadata={"format": "pt"})


def test_scale_of_wrong_shape(small_dir, tmp_path):
    d = _copy(small_dir, tmp_path / "scale")
    _rewrite(d, "layers.1.attn.wq_b.scale", torch.full((3, 1), 127, dtype=torch.uint8).view(ff.SCALE_DTYPE))
    with pytest.raises(
        CheckpointError,
        match=r"scale tensor 'layers.1.attn.wq_b.scale' has shape \[3, 1\]; "
        r"expected \[2, 1\]",
    ):
        load_official(d, progress=False)
    d2 = _copy(small_dir, tmp_path / "scale4")
    _rewrite(d2, "layers.0.ffn.experts.2.w2.scale", torch.full((128, 3), 127, dtype=torch.uint8).view(ff.SCALE_DTYPE))
    with pytest.raises(CheckpointError, match=r"experts.2.w2.scale' has shape \[128, 3\]; expected \[128, 2\]"):
        load_official(d2, progress=False)


def test_missing_tensor_wrong_dtype_and_nan_scale(small_dir, tmp_path):
    d = _copy(small_dir, tmp_path / "nan")
    _rewrite(d, "layers.2.attn.wkv.scale", torch.full((1, 1), 255, dtype=torch.uint8).view(ff.SCALE_DTYPE))
    with pytest.raises(CheckpointError, match="wkv.scale' holds NaN"):
        load_official(d, progress=False)
    _rewrite(d, "layers.2.attn.wkv.weight", torch.zeros(64, 128, dtype=torch.bfloat16))
    with pytest.raises(CheckpointError, match=r"'layers.2.attn.wkv.weight' has dtype BF16; expected F8_E4M3"):
        load_official(d, progress=False)
    _rewrite(d, "layers.2.attn.wkv.weight", None)
    with pytest.raises(CheckpointError, match="wkv.weight' listed in model.safetensors.index.json is not in the file"):
        load_official(d, progress=False)


def test_unknown_quantization_method(small_dir, tmp_path):
    d = _copy(small_dir, tmp_path / "quant")
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"]["quant_method"] = "awq"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"quantization_config.quant_method is 'awq': expected 'fp8'"):
        load_official(d, progress=False)
    cfg["quantization_config"]["quant_method"] = "fp8"
    cfg["expert_dtype"] = "int4"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"'expert_dtype' is 'int4'"):
        load_official(d, progress=False)


# ----------------------------------------------------------------------------- default miniature
def test_ensure_default_model_concurrent_first_use(tmp_path, monkeypatch):
    monkeypatch.setenv("PARITY_CACHE_DIR", str(tmp_path / "cache"))
    calls = []

    def fake_export(out, seed=0):  # the real export is tested above; here: the race logic
        calls.append(seed)
        out = Path(out)
        (out / "config.json").write_text("{}")
        (out / layout.INDEX_FILE).write_text(json.dumps({"weight_map": {}, "n": len(calls)}))
        return out

    monkeypatch.setattr(writer, "export_tiny", fake_export)
    results, errors = [], []

    def worker():
        try:
            results.append(default_model.ensure_default_model())
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    target = tmp_path / "cache" / "models" / f"tiny-seed0-v{default_model.EXPORT_VERSION}"
    assert set(results) == {target} and (target / layout.INDEX_FILE).is_file()
    assert sorted(os.listdir(target.parent)) == [target.name]  # no temp dirs left behind
    n = len(calls)
    assert default_model.ensure_default_model() == target and len(calls) == n  # cached: no second export


def test_export_tiny_cli_rejects_file_target(tmp_path):
    from parity.cli import main

    f = tmp_path / "afile"
    f.write_text("x")
    assert main(["export-tiny", str(f)]) == 2


def test_incremental_decoding_on_quantized_weights(small_dir):
    """The quantized modules are drop-ins on the engine's path too: chunked incremental forward of a
    quantized model equals the full forward of the dequantized plain model."""
    q = load_official(small_dir, progress=False, kv_cache_dtype="bf16", indexer_dtype="bf16")
    ref = load_official(small_dir, quantized=False, progress=False, kv_cache_dtype="bf16", indexer_dtype="bf16")
    ids = torch.randint(0, 512, (1, 37), generator=torch.Generator().manual_seed(1))
    full = ref.forward_logits(ids)[0]
    st = q.new_state()
    got = []
    for a, b in ((0, 20), (20, 21), (21, 37)):
        got.append(q.forward_incremental([ids[0, a:b].tolist()], [st], all_logits=True)[0])
    torch.testing.assert_close(torch.cat(got), full, rtol=0, atol=1e-4)
    st.free()


def test_ensure_default_model_unwritable_cache(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setenv("PARITY_CACHE_DIR", str(blocker / "cache"))  # a path under a regular file
    with pytest.raises(CheckpointError, match="PARITY_CACHE_DIR"):
        default_model.ensure_default_model()


def test_export_tiny_into_uncreatable_directory_names_it(tmp_path):
    """`parity export-tiny /proc/nope`: a CheckpointError naming the directory."""
    from parity.cli import main

    blocker = tmp_path / "file"
    blocker.write_text("x")
    for bad in (Path("/proc/nope"), blocker / "sub"):
        with pytest.raises(CheckpointError, match=rf"cannot create the output directory '{bad}'"):
            writer.export_tiny(bad)
        assert main(["export-tiny", str(bad)]) == 2


def test_missing_index_is_named_as_the_cause(small_dir, tmp_path):
    """Published-layout shards without model.safetensors.index.json: the error names the lost index, not
    "unexpected tensors"."""
    d = _copy(small_dir, tmp_path / "noindex")
    (d / layout.INDEX_FILE).unlink()
    with pytest.raises(
        CheckpointError,
        match=rf"has no {layout.INDEX_FILE}: its shards .* published FP8/FP4 layout "
        r"\(block scales such as '.*\.scale'\).*restore",
    ) as e:
        from_pretrained(d)
    assert ":;" not in str(e.value)
    assert missing_index_cause(small_dir) is None


def test_plain_loader_mismatch_message_format(tmp_path):
    """The plain loader's mismatch message: 'config.json: N unexpected tensors: ...' (no ':;')."""
    from safetensors.torch import save_file

    d = tmp_path / "plain"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(load_preset("tiny").replace(**SMALL).to_legacy_dict()))
    save_file({"bogus.weight": torch.zeros(2)}, str(d / "model-1.safetensors"))
    with pytest.raises(
        CheckpointError,
        match=r"does not match its config.json: \d+ missing tensors: .*; "
        r"1 unexpected tensors: bogus.weight$",
    ):
        from_pretrained(d)


def test_load_official_checks_memory_first(small_dir, monkeypatch):
    from parity import devices
    from parity.errors import DeviceError

    monkeypatch.delenv("PARITY_SKIP_MEMORY_CHECK", raising=False)
    monkeypatch.setattr(devices.core, "memory_info", lambda d: (1000, 10**12))
    with pytest.raises(DeviceError, match=r"needs ~.* \(FP8/FP4 weights kept quantized\) on cpu for loading"):
        load_official(small_dir, progress=False, quantization="fp8")
    with pytest.raises(DeviceError, match=r"needs ~.* \(bf16 weights\) on cpu for loading"):
        load_official(small_dir, progress=False)  # the CPU default: bf16-stored matrices
    with pytest.raises(DeviceError, match="this device has 0.0 GiB free"):
        from_pretrained(small_dir)


def test_export_tiny_seed_out_of_range_names_the_range(tmp_path, capsys):
    from parity.cli import main
    from parity.seeds import SEED_MAX, SEED_MIN

    with pytest.raises(SystemExit) as e:
        main(["export-tiny", str(tmp_path / "x"), "--seed", "99999999999999999999999"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"[{SEED_MIN}, {SEED_MAX}]" in err and "--seed" in err, err
    assert not (tmp_path / "x").exists()


def test_export_tiny_refuses_empty_path_and_non_empty_directory(tmp_path, monkeypatch, capsys):
    from parity.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["export-tiny", ""]) == 2
    assert "output directory is empty ('')" in capsys.readouterr().err and not os.listdir(tmp_path)
    d = tmp_path / "mine"
    d.mkdir()
    (d / "notes.txt").write_text("keep me")
    assert main(["export-tiny", str(d)]) == 2
    assert "exists and is not empty; pass --overwrite" in capsys.readouterr().err
    assert os.listdir(d) == ["notes.txt"]
    calls = []
    monkeypatch.setattr(writer, "export_tiny", lambda out, seed, preset: calls.append(out) or Path(out))
    assert main(["export-tiny", str(d), "--overwrite"]) == 0 and calls == [d]
