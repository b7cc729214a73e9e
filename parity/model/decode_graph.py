"""The whole decode step as one compiled graph: every layer, the cache updates and the head, fixed shapes.

A decode step of a small batch is bound by per-op dispatch (~5,000 aten ops per step of the 6-layer
benchmark miniature), so the step that adds exactly one token to each of B sequences runs as one
``torch.compile``d function (`parity.model.fixed_step.decode_step`) per batch bucket (`DecodeGraph`):
inductor fuses it into a few hundred kernels. Everything in it is a function of tensors of fixed shape:

- positions come in as a tensor (not host ints), so ring slots, window masks, which sequences complete a
  compression window and the entry visibility are computed in the graph;
- each sequence's window ring and compressor state are written in place inside the graph (graph-input
  mutation);
- the compressed entries (and indexer keys) of each compressed layer come in stacked ``[B, E, width]``,
  E = the sequences' blocks of `LayerCache.block_entries` rows, zero padded (``E`` is a symbolic size:
  one graph for every E); the entry a sequence completes this step is inserted in the graph (it is
  visible to its own token) and returned, and the host appends it to the cache afterwards
  (`LayerCache.append_entries`: the same storage and accounting as eager);
- the routed experts run as gathered batched GEMVs over the picked experts' weights (no expert counts on
  the host; `parity.model.fixed_step.moe_step`);
- bf16-stored weights (`parity.model.weight_storage`) are widened as loaded inside the fused reductions
  (`parity.model.layers.project`, `moe_step`, `lm_head_rows`): activations and sums stay fp32;
- W8A8 / W4A8 layers (`parity.model.int8_quant`) keep their eager math: per-token int8 activations,
  exact integer sums, the float64 rescale.

Equal to the eager `V4ForCausalLM.forward_incremental` up to fp32 summation order (tests/test_decode_graph.py).
"""

from __future__ import annotations

import logging
import threading
import time

import torch

from parity import devices
from parity.devices import int8_gemm
from parity.model import fast_linear, head_layout
from parity.model.fixed_step import decode_step, head_operands, lm_head_rows
from parity.model.layers import PLAIN_LINEARS

log = logging.getLogger("parity.model")


#: Where the classes of a model the graph runs come from: torch's own modules, the plain V4 layers and the
#: W8A8 / W4A8 modules (FP8 / FP4 and tensor-parallel replacements live elsewhere and keep the eager step).
_KNOWN_MODULES = frozenset(
    {
        "torch.nn.modules.linear",
        "torch.nn.modules.sparse",
        "torch.nn.modules.container",
        "parity.model.layers",
        "parity.model.attention",
        "parity.model.compressor",
        "parity.model.deepseek_v4",
        "parity.model.fast_linear",  # WideningLinear: bf16-stored weights, widened in the graph's reductions
        "parity.model.weight_storage",  # WideningExperts: gathered and widened by `moe_step`
        "parity.model.int8_quant",  # Int8Linear (its own forward, `int8_gemm.int8_linear`), Int8Experts (`moe_step`)
    }
)


def unsupported_reason(model) -> str | None:
    """None when `DecodeGraph` can run ``model``'s decode steps, else a one-line reason (not a local
    `V4ForCausalLM`, e.g. the stand-in of a tensor-parallel engine; FP8 / FP4 or sharded layers)."""
    from torch import nn

    if not isinstance(model, nn.Module) or not hasattr(model, "decode_graph"):
        return f"{type(model).__name__} is not a local V4ForCausalLM"
    for name, mod in model.named_modules():
        kind = type(mod)
        if kind.__module__ not in _KNOWN_MODULES or (isinstance(mod, nn.Linear) and kind not in PLAIN_LINEARS):
            return (
                f"{name or 'the model'} is {kind.__name__} "
                "(the graph knows the plain fp32/bf16 and the W8A8/W4A8 layers only)"
            )
    return None


def _stacked_blocks(blocks_per_seq: list[list[torch.Tensor]], zero: torch.Tensor, nb: int) -> torch.Tensor:
    """[B, nb * rows, width]: each sequence's blocks, padded with ``zero`` blocks to nb blocks."""
    flat = [blk for blocks in blocks_per_seq for blk in (blocks + [zero] * (nb - len(blocks)))]
    st = torch.stack(flat)
    return st.view(len(blocks_per_seq), nb * zero.shape[0], zero.shape[1])


#: Batch buckets of the compiled step: a decode batch of B sequences runs the graph of the smallest bucket
#: >= B, padded with scratch sequences (each bucket is one compile, ~60-130 s cold on 2 cores, ~10 s from
#: the inductor cache). Larger batches run eager.
BATCH_BUCKETS = (1, 2, 4, 8, 16)


class DecodeGraph:
    """The model's decode steps through the compiled `decode_step` (one graph per batch bucket, symbolic in
    the entry count). Above one row the LM head GEMV is a second graph symbolic in the batch
    (`lm_head_rows`): inductor's reduction streams the weight ~2x faster with symbolic rows than with a
    static 8, and with its input computed in the other graph it cannot inline the norm into the weight
    loop (docs/benchmarks.md, "Decode on the CPU"). On the CPU the head of one row is a static graph of its
    own and each bucket's head layout is chosen by timing at warm-up (`parity.model.head_layout`), except
    where the head runs on one of parity's C++ ops inside the step's graph (`_head_in_step`: an int8 head,
    or a float head of an fp32 model that `fast_linear.native_linear` takes: it computes the batch's real
    rows only, a padded bucket's scratch rows come out zero); on more than one CPU thread the step's kernels
    run serially (`_compiled`).

    Args:
        model: a `V4ForCausalLM` (`unsupported_reason` must be None); the graph is bound to its modules
            (weights may change in place, modules must not be replaced).
        device: where it runs (picks the compile backend, `parity.devices.compiler`).
        buckets: the batch buckets (default `BATCH_BUCKETS`).
        compile: False runs the same fixed-shape step uncompiled (tests of its logic without compile time).
    """

    def __init__(self, model, device, buckets: tuple[int, ...] = BATCH_BUCKETS, compile: bool = True):
        self.model, self.buckets, self.device, self.compile = model, tuple(sorted(buckets)), device, compile
        self._graphs: dict[int, tuple] = {}
        self._zero: dict = {}
        self._scratch: dict = {}
        self.steps = 0
        #: buckets served steps may take: None = all (compiled on first use); a set = only those warmed up so
        #: far (`warm_up` adds each; an engine warming up in the background runs the others eager meanwhile)
        self.ready: set[int] | None = None
        self._warming = threading.local()  # set in the thread running `warm_up`: its steps pass the gate
        #: (torch threads, bucket) whose LM head runs through the [hidden, vocab] copy (`head_layout`), chosen
        #: by timing both layouts at warm-up; the copy and the head weight's version and storage it was made from
        self.head_columns: set[tuple[int, int]] = set()
        self._head_t: tuple[torch.Tensor, int, int] | None = None
        #: (torch threads, bucket) -> whether that bucket's LM head runs inside the step (`_head_in_step`)
        self._in_step: dict[tuple[int, int], bool] = {}
        #: (batch size, device) -> the int64 [1] tensor of it the step takes (`decode_step`'s ``live``), made once
        self._live: dict[tuple[int, str], torch.Tensor] = {}

    def _compiled(self) -> tuple:
        """(step, head of one row, head of several rows) for the current torch thread count: inductor's CPU
        kernels are specialised for the thread count at compile time (OpenMP team size), so each thread count
        has compiled functions of its own (dynamo also guards on the thread count: torch 2.13 recompiles a
        function first called under another count). On the CPU the head is a graph of its own (static for one
        row, symbolic in the rows above), so that `_choose_head_layout` can time it against the [hidden, vocab]
        copy; on more than one thread the step's own kernels run serially (`parity.devices.compiler`
        ``serial_kernels``) and the head is the one large parallel loop (a head on one of the C++ ops runs
        inside the step's graph instead, `_head_in_step`). Elsewhere the one-row head is inside the step's
        graph (None here)."""
        if not self.compile:
            return decode_step, None, lm_head_rows
        n = torch.get_num_threads()
        if n not in self._graphs:
            cpu = torch.device(self.device).type == "cpu"
            if cpu:  # the INT8 kernel the graphs trace in is this CPU's timed pick: made before tracing
                int8_gemm.cpu_gemm_kernel()
            serial = n > 1 and cpu
            self._graphs[n] = (
                # static but the marked entry counts
                devices.compiler(self.device, whole_model=True, serial_kernels=serial)(decode_step),
                # on the CPU the one-row head is apart on every thread count, so that its layout can be timed
                devices.compiler(self.device, whole_model=True)(lm_head_rows) if cpu else None,
                devices.compiler(self.device)(lm_head_rows),
            )
        return self._graphs[n]

    def _head_copy(self) -> torch.Tensor | None:
        """The [hidden, vocab] copy of the head while it matches the head weight (None: no copy, or the weight
        changed in place or was replaced since: the copy is dropped and its buckets go back to the stored layout)."""
        held = self._head_t
        if held is None:
            return None
        w = self.model.lm_head.weight
        if (w._version, w.data_ptr()) != held[1:]:
            self._head_t = None
            self.head_columns.clear()
            return None
        return held[0]

    def _choose_head_layout(self, bucket: int) -> None:
        """Time the warm ``bucket``'s LM head in the stored layout (its compiled head graph) and through the
        [hidden, vocab] copy (`head_layout.choose`) and let the bucket's steps take the faster; no-op where
        the head has no choice (`head_layout.has_choice`: fp32 CPU heads only) or the head is in the step."""
        ops = head_operands(self.model)
        _, head_one, head_rows = self._compiled()
        if not self.compile or head_one is None or len(ops) != 1 or not head_layout.has_choice(ops[0]):
            return
        if self._head_in_step(bucket):
            return  # on the C++ op inside the step: the stored layout
        fn = head_one if bucket == 1 else head_rows
        copy = self._head_copy()
        fresh = copy is None
        if fresh:
            copy = head_layout.columns_copy(ops[0])
        columns, t_rows, t_cols = head_layout.choose(lambda x: fn(x, *ops), copy, bucket)
        if columns:
            if fresh:
                w = self.model.lm_head.weight
                self._head_t = (copy, w._version, w.data_ptr())
            self.head_columns.add((torch.get_num_threads(), bucket))
        log.info(
            "compiled decode step: LM head of batch bucket %d on %d thread(s): stored [vocab, hidden] layout %.2f ms, "
            "[hidden, vocab] copy %.2f ms -> %s",
            bucket,
            torch.get_num_threads(),
            t_rows * 1e3,
            t_cols * 1e3,
            "the copy" if columns else "the stored layout",
        )

    def _head_in_step(self, bucket: int) -> bool:
        """Whether the ``bucket``'s LM head runs inside the step's graph on the CPU, on one of parity's C++ ops
        (opaque to inductor, each threads itself over torch's intra-op pool, so nothing of the head is left to
        the step's serial kernels): an `Int8Linear` head whose kernel at that row count is the C++ op
        (`parity.devices.int8_gemm.cpu_gemm_kernel` ``"native"``, which rescales each sum as it stores it;
        fp32 activations only: the fused rescale gives fp32, another dtype's separate rescale pass would run
        among the serial kernels), or a float head the fp32 model's `fast_linear.native_linear` takes at
        that row count (`native_kernels.float_linear`, given the batch's real rows: a padded bucket's scratch
        rows are not computed; its layout is not timed: the op streams the stored one). One compiled region
        per step instead of two saves the second region's guard evaluation and prologue (~0.4 ms a step
        here). Otherwise the head is a graph of its own (a float head's layout
        timed, `_choose_head_layout`)."""
        key = (torch.get_num_threads(), bucket)
        if key not in self._in_step:  # decided once: the step's graph is specialised on it (no mid-run recompile)
            self._in_step[key] = self._head_fits_step(bucket)
        return self._in_step[key]

    def _head_fits_step(self, bucket: int) -> bool:
        ops = head_operands(self.model)
        if torch.device(self.device).type != "cpu" or self.model.dtype != torch.float32:
            return False
        if len(ops) == 1:
            return fast_linear.native_linear_applies(bucket, torch.float32, torch.device("cpu"), ops[0])
        if ops[1].dtype != torch.float32:
            return False  # the fused rescale is fp32 only: other dtypes rescale in a pass of their own
        return int8_gemm.cpu_gemm_kernel(bucket) == "native"

    def bucket(self, batch: int) -> int | None:
        """The bucket a decode batch of ``batch`` sequences runs in (None: too large, eager)."""
        return next((b for b in self.buckets if b >= batch), None)

    def accepts(self, segments, kv_fp8: bool, index_fp4: bool) -> bool:
        """Whether the step (``forward_incremental``'s segments) is a plain decode step the graph runs: every
        sequence adds one token and the batch fits a warm bucket; in every cache mode (bf16 / FP8 KV, bf16 /
        FP4 indexer keys: the graph of each mode is compiled on its first step, the model's own modes at
        warm-up)."""
        b = self.bucket(len(segments))
        if b is None or not (self.ready is None or b in self.ready or getattr(self._warming, "on", False)):
            return False
        return all(n == 1 for (_, n, _) in segments)

    def _zero_block(self, like: torch.Tensor) -> torch.Tensor:
        key = (tuple(like.shape), like.dtype, like.device)
        z = self._zero.get(key)
        if z is None:
            z = self._zero[key] = torch.zeros_like(like)
        return z

    def _padding(self, n: int, kv_fp8: bool, index_fp4: bool) -> list:
        """n scratch states (position 0, never advanced) that fill a batch up to its bucket."""
        key = (kv_fp8, index_fp4)
        have = self._scratch.setdefault(key, [])
        m = self.model
        while len(have) < n:
            have.append(
                m.new_state(kv_cache_dtype="fp8" if kv_fp8 else "bf16", indexer_dtype="fp4" if index_fp4 else "bf16")
            )
        return have[:n]

    def _stacked(self, caches, attr: str, width: int, dtype) -> torch.Tensor:
        blocks = [getattr(c, attr) or [] for c in caches]
        c0 = caches[0]
        like = next((b[0] for b in blocks if b), None)
        if like is None:
            like = torch.empty((c0.block_entries, width), dtype=dtype, device=c0.window.device)
        # room for the entry this step may complete: nb blocks hold n_entries + 1 rows of every sequence
        nb = max(max(len(b) for b in blocks), max(c.n_entries // c0.block_entries + 1 for c in caches))
        return _stacked_blocks(blocks, self._zero_block(like), nb)

    def run(self, ids: torch.Tensor, states, kv_fp8: bool, index_fp4: bool) -> torch.Tensor:
        """Run one decode step; ids LongTensor[B] (validated by the caller), states advanced by the caller.
        Returns fp32 logits [B, vocab]."""
        dev = ids.device
        B = len(states)
        pad = self.bucket(B) - B
        if pad:
            states = list(states) + self._padding(pad, kv_fp8, index_fp4)
            ids = torch.cat([ids, ids.new_zeros(pad)])
        pos_list = [st.num_tokens for st in states]
        pos = torch.tensor(pos_list, dtype=torch.long, device=dev)
        windows, comp_states, entries, index_keys = [], [], [], []
        for i in range(len(self.model.model.layers)):
            caches = [st.layers[i] for st in states]
            c0 = caches[0]
            windows.append([c.window for c in caches])
            if c0.ratio:
                comp_states.append([c.comp_state for c in caches])
                w, dt = c0.codec.storage
                entries.append(self._stacked(caches, "comp_blocks", w, dt))
                if c0.idx_blocks is not None:
                    iw, idt = c0.icodec.storage
                    index_keys.append(self._stacked(caches, "idx_blocks", iw, idt))
                else:
                    index_keys.append(None)
            else:
                comp_states.append(None)
                entries.append(None)
                index_keys.append(None)
        for e in (*entries, *index_keys):
            if e is not None:
                torch._dynamo.mark_dynamic(e, 1)
        one = len(states) == 1
        step, head_one, head_rows = self._compiled()
        in_step = (one and head_one is None) or self._head_in_step(B + pad)
        live = self._live.get((B, str(dev)))
        if live is None:
            live = self._live[(B, str(dev))] = torch.tensor([B], dtype=torch.long, device=dev)
        out, new_ents, new_ikeys = step(
            self.model, ids, pos, windows, comp_states, entries, index_keys, kv_fp8, index_fp4, in_step, live
        )
        # the bucket's timed layout: the [hidden, vocab] copy, or the stored one -- for one row the static head
        # (in the step's graph off the CPU); for several a graph given a plain tensor, not the Parameter (whose
        # shape dynamo keeps static), as the fully symbolic reduction reads the 129,280 x 256 head ~1.8x faster
        # at 8 rows (the static one ~1.7x faster at 1 row; docs/benchmarks.md)
        copy = self._head_copy() if (torch.get_num_threads(), B + pad) in self.head_columns else None
        if in_step:
            logits = out[:B]  # a padded bucket's scratch rows (zero, or computed: an int8 head) dropped
        elif copy is not None:
            logits = head_layout.columns_logits(out[:B], copy)
        elif one or (head_one is not None and len(head_operands(self.model)) == 2):
            # an int8 head takes the static graph at every bucket: one opaque widened-GEMM call
            # (`parity.devices.int8_gemm`), so its rows need no symbolic shape and nothing re-traces per bucket
            logits = head_one(out[:B] if not one else out, *head_operands(self.model))
        else:
            logits = head_rows(out[:B], *head_operands(self.model))
        for i, ne in enumerate(new_ents):
            if ne is None:
                continue
            ni = new_ikeys[i]
            for b, st in enumerate(states[:B]):
                c = st.layers[i]
                if (pos_list[b] + 1) % c.ratio == 0:
                    c.append_entries(ne[b : b + 1], ni[b : b + 1] if ni is not None else None)
        if not getattr(self._warming, "on", False):
            self.steps += 1  # served steps only
        return logits

    @torch.no_grad()
    def warm_up(self, buckets: tuple[int, ...] | None = None) -> dict[int, float]:
        """Compile (or load from the inductor cache) the graphs of ``buckets`` (default: all), for the current
        torch thread count, by running a two-token prefill and one decode step per bucket on throwaway states.

        Each bucket is added to `ready` once warm (when `ready` is a set), so a warm-up in a background thread
        hands buckets to served steps one by one.

        Returns:
            {bucket: wall seconds}.
        Raises:
            whatever the compile backend raises (e.g. inductor without a C++ compiler); the bucket stays out
            of `ready`.
        """
        out = {}
        m = self.model
        self._warming.on = True
        try:
            for b in buckets or self.buckets:
                t0 = time.perf_counter()
                states = [m.new_state() for _ in range(b)]
                try:
                    m.forward_incremental([[1, 2]] * b, states)
                    m.forward_incremental([[3]] * b, states)
                finally:
                    for st in states:
                        st.free()
                self._choose_head_layout(b)
                out[b] = time.perf_counter() - t0
                if self.ready is not None:
                    self.ready.add(b)
        finally:
            self._warming.on = False
        return out
