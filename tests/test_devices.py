"""Device layer: resolution, backends, and the device-neutrality rule."""

import re
from pathlib import Path

import pytest
import torch

from parity import devices
from parity.errors import DeviceError

ROOT = Path(__file__).resolve().parents[1]


def test_resolve_auto_and_cpu():
    assert devices.resolve("cpu") == torch.device("cpu")
    assert devices.resolve("auto").type in devices.KNOWN_TYPES
    assert devices.resolve(None).type in devices.KNOWN_TYPES


def test_resolve_refuses_an_index_beyond_the_devices_here(monkeypatch):
    from parity.devices import core

    assert core.device_count("cpu") == 1 and core.device_count("no-such-type") is None
    monkeypatch.setattr(core, "is_available", lambda t: t in ("cpu", "cuda"))
    monkeypatch.setattr(core, "device_count", lambda t: 1)
    assert devices.resolve("cuda") == torch.device("cuda", 0) == devices.resolve("cuda:0")
    with pytest.raises(DeviceError, match=r"device 'cuda:7' is not on this machine: it has 1 cuda device \(cuda:0"):
        devices.resolve("cuda:7")
    monkeypatch.setattr(core, "device_count", lambda t: None)  # a backend that cannot count: not checked here
    assert devices.resolve("cuda:7") == torch.device("cuda", 7)


def test_resolve_refuses_cpu_indices_but_zero_and_non_numeric_indices(monkeypatch):
    from parity.devices import core

    assert devices.resolve("cpu:0") == torch.device("cpu")
    for spec in ("cpu:1", "cpu:99"):
        with pytest.raises(DeviceError, match=rf"^device '{spec}' is not on this machine: the CPU is one device"):
            devices.resolve(spec)
    monkeypatch.setattr(core, "is_available", lambda t: t in ("cpu", "cuda"))
    monkeypatch.setattr(core, "device_count", lambda t: None)
    for spec in ("cpu:abc", "cpu:-1", "cuda:abc", "cuda:-1", "cuda:1.5", "cuda:١"):
        with pytest.raises(DeviceError) as e:
            devices.resolve(spec)
        assert str(e.value) == f"device index in {spec!r} must be a non-negative integer"


def test_resolve_errors():
    with pytest.raises(DeviceError, match="unknown device 'tpu'"):
        devices.resolve("tpu")
    if not devices.is_available("npu"):
        with pytest.raises(DeviceError, match="not available"):
            devices.resolve("npu")


def test_dist_backend_mapping():
    assert devices.dist_backend("cpu") == "gloo"
    assert devices.dist_backend("cuda:1") == "nccl"
    assert devices.dist_backend("npu") == "hccl"
    assert devices.dist_backend(torch.device("xpu", 0)) == "xccl"


def test_supported_dtypes_cpu():
    assert torch.float32 in devices.supported_dtypes("cpu")


def test_no_cuda_outside_devices():
    pat = re.compile(r"torch\.cuda|\.cuda\(")
    bad = []
    for path in (ROOT / "parity").rglob("*.py"):
        if "devices" in path.relative_to(ROOT / "parity").parts[:1]:
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if pat.search(line):
                bad.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not bad, "torch.cuda / .cuda( outside parity/devices:\n" + "\n".join(bad)


def test_compiled_region_raises_dynamos_recompile_limit_in_the_thread_that_runs_it(monkeypatch, caplog):
    """dynamo's config overrides are per thread: the server compiles on the main thread and runs the regions
    on its engine thread, where the default limit (8) would make dynamo warn and fall back to eager."""
    import threading

    from parity.devices import core

    monkeypatch.setattr(devices, "compile_backend", lambda d: ("eager", None))  # no code generation: fast
    fn = devices.compiler("cpu")(lambda x, n: x.reshape(n, -1).sum(0))
    seen = []

    def engine_thread():
        for n in range(1, 13):  # one graph per static reshape size at most
            fn(torch.ones(n * 4), n)
        seen.append(torch._dynamo.config.recompile_limit)

    t = threading.Thread(target=engine_thread)
    t.start()
    t.join()
    assert seen == [core.RECOMPILE_LIMIT]
    assert not [r for r in caplog.records if "recompile_limit" in r.getMessage()]


def test_materialized_is_the_tensor_itself_and_a_stored_buffer_when_traced():
    """`materialized` never changes a value: eager it returns the tensor; traced for an inductor device it
    puts inductor's store prim in the graph (so the compiled step computes the value once)."""
    from parity.devices import core

    x = torch.randn(4, 8)
    assert core.materialized(x) is x
    core._load_inductor_store_prim()
    assert core._store_prim is not None, "this torch has no inductor store prim: the compiled step recomputes"
    graphs = []

    def capture(gm, example_inputs):  # no code generation: fast
        graphs.append(gm)
        return gm.forward

    def gemv(x, w):
        return (w[:, None, :] * core.materialized(x.relu() * 2)[None]).sum(-1)

    w = torch.randn(16, 8)
    out = torch.compile(gemv, backend=capture, fullgraph=True)(x, w)
    torch.testing.assert_close(out, gemv(x, w), rtol=0, atol=0)
    assert "inductor_force_stride_order" in graphs[0].code
