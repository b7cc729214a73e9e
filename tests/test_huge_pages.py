"""A model's CPU weights moved onto transparent huge pages: values, identity, sharing and the fallbacks."""

from __future__ import annotations

import logging
import mmap

import pytest
import torch
from torch import nn

from parity.devices import huge_pages
from parity.devices.huge_pages import place_on_huge_pages, thp_mode, unavailable_reason

needs_thp = pytest.mark.skipif(unavailable_reason() is not None, reason=f"no huge pages: {unavailable_reason()}")
needs_madvise = pytest.mark.skipif(not hasattr(mmap, "MADV_HUGEPAGE"), reason="no madvise(MADV_HUGEPAGE) here")


class Tied(nn.Module):
    """Tied embedding / head, a transposed parameter, a buffer and a bf16 weight."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.embed = nn.Embedding(300, 16)
        self.head = nn.Linear(16, 300, bias=False)
        self.head.weight = self.embed.weight
        self.proj = nn.Parameter(torch.randn(24, 16, generator=g).t())  # a non-contiguous view
        self.narrow = nn.Parameter(torch.randn(8, 16, generator=g).bfloat16(), requires_grad=False)
        self.register_buffer("table", torch.arange(40, dtype=torch.int64).view(5, 8))


def _snapshot(m: nn.Module) -> dict:
    return {k: (v.clone(), v.shape, v.stride(), v.dtype) for k, v in m.state_dict(keep_vars=True).items()}


@needs_thp
def test_weights_keep_values_identity_and_sharing():
    m = Tied()
    before = _snapshot(m)
    ids = {k: id(v) for k, v in m.state_dict(keep_vars=True).items()}
    old = {k: v.untyped_storage().data_ptr() for k, v in m.state_dict(keep_vars=True).items()}
    placed = place_on_huge_pages(m)
    assert placed > 0
    now = m.state_dict(keep_vars=True)
    for k, (val, shape, stride, dtype) in before.items():
        t = now[k]
        assert id(t) == ids[k]  # the same tensor object: holders of it see the new memory
        assert (t.shape, t.stride(), t.dtype) == (shape, stride, dtype)
        assert torch.equal(t, val)
        assert t.untyped_storage().data_ptr() != old[k]
    assert m.head.weight is m.embed.weight  # still tied
    assert isinstance(m.proj, nn.Parameter) and m.proj.requires_grad
    # no two distinct weights appear to share memory (a state dict saves each tensor's own bytes)
    ptrs = [m.embed.weight, m.proj, m.narrow, m.table]
    assert len({t.untyped_storage().data_ptr() for t in ptrs}) == len(ptrs)
    assert m.proj.untyped_storage().nbytes() == 24 * 16 * 4
    # every storage starts on a cache line (inductor takes a tensor as aligned at 16 bytes)
    assert all(t.untyped_storage().data_ptr() % huge_pages.STORAGE_ALIGN == 0 for t in ptrs)
    # the new memory is writable and the forward still runs
    with torch.no_grad():
        m.embed.weight[0, 0] = 7.0
    assert m.head(torch.ones(1, 16)).shape == (1, 300)


@needs_thp
def test_placed_weights_save_with_safetensors(tmp_path):
    from safetensors.torch import load_file, save_file

    m = nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 8))
    place_on_huge_pages(m)
    save_file(m.state_dict(), tmp_path / "w.safetensors")  # refuses tensors that share memory
    back = load_file(tmp_path / "w.safetensors")
    assert all(torch.equal(back[k], v) for k, v in m.state_dict().items())


def test_switch_off_leaves_the_weights(monkeypatch):
    monkeypatch.setenv(huge_pages.SWITCH_ENV, "off")
    m = Tied()
    ptr = m.proj.untyped_storage().data_ptr()
    assert "PARITY_HUGE_PAGES" in unavailable_reason()
    assert place_on_huge_pages(m) == 0
    assert m.proj.untyped_storage().data_ptr() == ptr


@pytest.mark.parametrize("value", ["0", "false", "OFF", " no "])
def test_switch_values(monkeypatch, value):
    monkeypatch.setenv(huge_pages.SWITCH_ENV, value)
    assert huge_pages.switched_off()


def test_thp_mode_reads_the_bracketed_word(tmp_path):
    f = tmp_path / "enabled"
    f.write_text("always [madvise] never\n")
    assert thp_mode(str(f)) == "madvise"
    f.write_text("always madvise [never]\n")
    assert thp_mode(str(f)) == "never"
    f.write_text("garbage\n")
    assert thp_mode(str(f)) is None
    assert thp_mode(str(tmp_path / "missing")) is None
    page = tmp_path / "hpage_pmd_size"
    page.write_text("not a number")
    assert huge_pages.huge_page_bytes(str(page)) == huge_pages.HUGE_PAGE_BYTES
    page.write_text("1073741824\n")
    assert huge_pages.huge_page_bytes(str(page)) == 1 << 30


@needs_madvise
def test_kernel_without_thp_is_a_reason(monkeypatch):
    monkeypatch.delenv(huge_pages.SWITCH_ENV, raising=False)
    monkeypatch.setattr(huge_pages, "thp_mode", lambda: "never")
    assert "never" in unavailable_reason()
    monkeypatch.setattr(huge_pages, "thp_mode", lambda: None)
    assert "no transparent huge pages" in unavailable_reason()
    m = nn.Linear(4, 4)
    ptr = m.weight.data_ptr()
    assert place_on_huge_pages(m) == 0 and m.weight.data_ptr() == ptr


@needs_thp
def test_refused_mapping_leaves_the_weights_and_warns(monkeypatch, caplog):
    def refuse(*a, **k):
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(huge_pages.mmap, "mmap", refuse)
    m = nn.Linear(4, 4)
    ptr = m.weight.data_ptr()
    with caplog.at_level(logging.WARNING, logger="parity.devices"):
        assert place_on_huge_pages(m) == 0
    assert m.weight.data_ptr() == ptr
    assert "refused" in caplog.text


def test_no_cpu_weights_is_a_no_op():
    assert place_on_huge_pages(nn.ReLU()) == 0
    with torch.device("meta"):
        m = nn.Linear(4, 4)
    assert place_on_huge_pages(m) == 0


@needs_thp
def test_the_mapping_is_released_with_the_weights():
    import gc
    import weakref

    seen = []
    real = mmap.mmap

    class Spy(real):  # a subclass (weak-referenceable) recording the mapping made
        def __new__(cls, *a, **k):
            obj = super().__new__(cls, *a, **k)
            seen.append(weakref.ref(obj))
            return obj

    m = nn.Linear(64, 64)
    try:
        huge_pages.mmap.mmap = Spy
        assert place_on_huge_pages(m) > 0
    finally:
        huge_pages.mmap.mmap = real
    assert seen and seen[0]() is not None
    del m
    gc.collect()
    assert seen[0]() is None


@needs_thp
def test_load_model_places_cpu_weights(tmp_path):
    from parity.engine.model_loading import load_model

    m, _ = load_model("tiny", torch.device("cpu"), torch.float32)
    weights = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in (*m.parameters(), *m.buffers())}
    # every weight lies in one mapping: the storages end to end, each start on a cache line
    start, end = min(weights), max(p + n for p, n in weights.items())
    assert end - start <= sum(n + huge_pages.STORAGE_ALIGN for n in weights.values())


@needs_madvise
def test_status_names_the_pages(monkeypatch):
    monkeypatch.setenv(huge_pages.SWITCH_ENV, "0")
    assert huge_pages.status() == "4 KiB pages (PARITY_HUGE_PAGES turns it off)"
    monkeypatch.delenv(huge_pages.SWITCH_ENV)
    monkeypatch.setattr(huge_pages, "thp_mode", lambda: "always")
    monkeypatch.setattr(huge_pages, "huge_page_bytes", lambda: 2 << 20)
    assert huge_pages.status() == "2 MiB transparent huge pages (THP always)"


@needs_thp
def test_views_of_one_storage_keep_sharing_it():
    """Two Parameters viewing one storage (one through another dtype) still share one storage, with their
    values; storages starting at one address with different lengths are copied whole."""
    m = nn.Module()
    base = torch.arange(16, dtype=torch.float32)
    m.a = nn.Parameter(base[:4], requires_grad=False)
    m.b = nn.Parameter(base[4:].view(torch.int32), requires_grad=False)
    import numpy as np

    arr = np.arange(64, dtype=np.float32)
    m.register_buffer("short", torch.from_numpy(arr[:8]))  # its own storage, same start as "long"
    m.register_buffer("long", torch.from_numpy(arr))
    want = {k: v.clone() for k, v in m.state_dict().items()}
    assert place_on_huge_pages(m) > 0
    assert m.a.untyped_storage().data_ptr() == m.b.untyped_storage().data_ptr()
    assert m.b.storage_offset() == 4 and m.b.dtype == torch.int32
    assert all(torch.equal(m.state_dict()[k], v) for k, v in want.items())
    with torch.no_grad():
        m.a[0] = 5.0
    assert m.b.untyped_storage().nbytes() == 64  # both still on the one 16-float storage


@needs_thp
def test_a_failed_copy_leaves_the_rest_in_place(monkeypatch, caplog):
    m = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    ptrs = [p.data_ptr() for p in m.parameters()]
    want = [p.clone() for p in m.parameters()]
    calls = []
    real = huge_pages._on

    def failing(storage, t):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return real(storage, t)

    monkeypatch.setattr(huge_pages, "_on", failing)
    with caplog.at_level(logging.WARNING, logger="parity.devices"):
        placed = place_on_huge_pages(m)
    assert "moving them failed" in caplog.text and 0 < placed
    now = list(m.parameters())
    assert [p.data_ptr() == q for p, q in zip(now, ptrs, strict=True)] == [False, False, True, True]
    assert all(torch.equal(p, w) for p, w in zip(now, want, strict=True))


def test_subclasses_and_pinned_tensors_stay():
    class Marked(torch.Tensor):
        pass

    m = nn.Module()
    m.register_buffer("odd", torch.zeros(4).as_subclass(Marked))
    assert huge_pages._weights(m) == []


def test_doctor_names_where_cpu_weights_go(capsys):
    from types import SimpleNamespace

    from parity.devices import doctor_cli

    doctor_cli.run(SimpleNamespace(json=False))
    assert "CPU weights on" in capsys.readouterr().out
