"""Logits of a llama.cpp GGUF for given token ids, through llama-cpp-python's ctypes bindings.

The bindings (``llama_cpp.llama_cpp``) come from an installed llama-cpp-python, or from its source tree
(the PyPI sdist, whose ``vendor/llama.cpp`` is the llama.cpp build used) without running the package's
``__init__`` (which needs the high-level API's extra dependencies); the shared libraries from the
llama.cpp build directory (``LLAMA_CPP_LIB_PATH``). Used by benchmarks/vs_llamacpp.py to measure
llama.cpp's own logit error of Q8_0 against F32 weights.
"""

from __future__ import annotations

import importlib
import os
import sys
import types
from pathlib import Path

import numpy as np


def load_bindings(llama_cpp_dir: Path, lib_dir: Path):
    """The ``llama_cpp.llama_cpp`` ctypes module, with its shared libraries taken from `lib_dir`.

    Args:
        llama_cpp_dir: the llama.cpp source tree; when it is ``<sdist>/vendor/llama.cpp`` the bindings of
            ``<sdist>/llama_cpp`` are used if no llama-cpp-python is installed.
        lib_dir: directory holding libllama.so (the build's bin/).
    Raises:
        ImportError: neither an installed llama-cpp-python nor the sdist's bindings were found.
    """
    os.environ["LLAMA_CPP_LIB_PATH"] = str(lib_dir)
    try:
        return importlib.import_module("llama_cpp.llama_cpp")
    except ImportError:
        pass
    pkg = Path(llama_cpp_dir).resolve().parents[1] / "llama_cpp"
    if not (pkg / "llama_cpp.py").is_file():
        raise ImportError(f"no llama-cpp-python installed and no bindings at {pkg}")
    stub = types.ModuleType("llama_cpp")
    stub.__path__ = [str(pkg)]
    sys.modules["llama_cpp"] = stub
    return importlib.import_module("llama_cpp.llama_cpp")


def llama_logits(lib, gguf: Path, ids: list[int], threads: int, strict: bool = False) -> np.ndarray:
    """Logits [len(ids), vocab] (fp32) of one sequence evaluated in one batch, every position output.

    Args:
        lib: `load_bindings`'s module. gguf: model file. ids: token ids (no BOS added).
        strict: f32 KV cache and no flash attention (else llama.cpp's defaults: f16 KV, flash attention).
    Raises:
        RuntimeError: the model or context cannot be created, or ``llama_decode`` fails.
    """
    lib.llama_backend_init()
    model = lib.llama_model_load_from_file(str(gguf).encode(), lib.llama_model_default_params())
    if not model:
        raise RuntimeError(f"llama.cpp cannot load {gguf}")
    n = len(ids)
    cp = lib.llama_context_default_params()
    cp.n_ctx = cp.n_batch = cp.n_ubatch = max(64, n)
    cp.n_threads = cp.n_threads_batch = threads
    if strict:
        cp.type_k = cp.type_v = 0  # GGML_TYPE_F32
        cp.flash_attn_type = 0  # LLAMA_FLASH_ATTN_TYPE_DISABLED
    ctx = lib.llama_init_from_model(model, cp)
    if not ctx:
        lib.llama_model_free(model)
        raise RuntimeError(f"llama.cpp cannot create a context for {gguf}")
    batch = lib.llama_batch_init(n, 0, 1)
    try:
        for i, t in enumerate(ids):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = int(t), i, 1, 1
            batch.seq_id[i][0] = 0
        batch.n_tokens = n
        rc = lib.llama_decode(ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(model))
        return np.ctypeslib.as_array(lib.llama_get_logits(ctx), shape=(n, vocab)).copy()
    finally:
        lib.llama_batch_free(batch)
        lib.llama_free(ctx)
        lib.llama_model_free(model)
