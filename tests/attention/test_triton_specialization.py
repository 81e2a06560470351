"""Triton compiles a kernel again for every new pattern of its integer arguments (== 1, divisible by
16, neither) unless told not to specialise on them. A serving step must never meet a new pattern after
warm-up: eager decode steps pick any split count, and lse's strides follow it. Each kernel launch is
recorded here (nothing runs) over shapes a server meets, and the pattern must not change with them."""

from __future__ import annotations

import inspect

import pytest
import torch

pytestmark = pytest.mark.triton
triton = pytest.importorskip("triton")

HEADS, KV_HEADS, HEAD_DIM, PAGE = 32, 8, 128, 16


class Recorder:
    """Stands in for a kernel: `kernel[grid](*args, **kwargs)` records the call and runs nothing."""

    def __init__(self, kernel):
        self.kernel, self.calls = kernel, []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((args, kwargs))


def specialization(kernel, args: tuple) -> tuple:
    """Triton's specialisation of the integer arguments the kernel does not exempt, as its launcher
    computes it."""
    from triton.backends.compiler import BaseBackend
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import native_specialize_impl

    jit = kernel.fn if isinstance(kernel, Autotuner) else kernel  # JITFunction, or InterpretedFunction
    exempt = getattr(jit, "do_not_specialize", None)
    exempt = set(exempt if exempt is not None else jit.kwargs.get("do_not_specialize") or ())
    names = list(inspect.signature(jit.fn).parameters)
    assert exempt <= set(names), exempt - set(names)  # a misspelt name would exempt nothing
    return tuple((name, native_specialize_impl(BaseBackend, value, False, True, True))
                 for name, value in zip(names, args, strict=False)
                 if isinstance(value, int) and not isinstance(value, bool) and name not in exempt)


def recorded(monkeypatch, module, *names: str) -> dict[str, Recorder]:
    recorders = {}
    for name in names:
        recorders[name] = Recorder(getattr(module, name))
        monkeypatch.setattr(module, name, recorders[name])
    return recorders


def patterns(recorder: Recorder) -> set[tuple]:
    return {specialization(recorder.kernel, args) for args, _ in recorder.calls}


def test_decode_and_its_merge_compile_once_whatever_the_split_count(monkeypatch):
    from mnemosyne.attention import triton_decode

    rec = recorded(monkeypatch, triton_decode, "_tuned_decode_kernel", "_paged_decode_kernel", "_merge_splits_kernel")
    k_cache = torch.empty(64 * PAGE, KV_HEADS, HEAD_DIM, dtype=torch.float16)
    tables = torch.zeros(9, 64, dtype=torch.int32)
    for batch in (1, 3, 8):
        for splits in (2, 7, 16, 20, 33, 64, 66, 128, 200, 256):
            q = torch.empty(batch, HEADS, HEAD_DIM, dtype=torch.float16)
            rows = torch.arange(batch, dtype=torch.int32)
            triton_decode.paged_decode(q, k_cache, k_cache, tables, rows, rows, PAGE, 0.1, splits, 128)
    launched = [r for r in rec.values() if r.calls]
    assert len(launched) == 2  # the decode kernel (tuned or interpreted) and the merge
    for recorder in launched:
        assert len(recorder.calls) == 30 and len(patterns(recorder)) == 1


def test_chunk_kernel_compiles_once_whatever_the_split_count(monkeypatch):
    from mnemosyne.attention import triton_chunk

    rec = recorded(monkeypatch, triton_chunk, "_tuned_chunks_kernel", "_paged_chunks_kernel")
    monkeypatch.setattr(triton_chunk, "merge_splits", lambda o, lse, dtype: (o[:, :, 0], lse[:, :, 0]))
    k_cache = torch.empty(64 * PAGE, KV_HEADS, HEAD_DIM, dtype=torch.float16)
    tables = torch.zeros(9, 64, dtype=torch.int32)
    for num_new in (1, 5, 33, 128, 512, 2048):
        for splits in (2, 7, 16, 20, 33, 64, 128):
            q = torch.empty(num_new, HEADS, HEAD_DIM, dtype=torch.float16)
            table = torch.tensor([[0, 1000, 1000 - num_new, 0, num_new, 0]], dtype=torch.int32)
            chunks = triton_chunk.ShortChunks((0,), table, num_new, num_new, 1000)
            triton_chunk.paged_chunks(q, k_cache, k_cache, tables, chunks, PAGE, 0.1, splits)
    (recorder,) = [r for r in rec.values() if r.calls]
    assert len(recorder.calls) == 42 and len(patterns(recorder)) == 1


def test_parts_merge_compiles_once_whatever_the_chunk_and_part_count(monkeypatch):
    """A 1M-token prefill's chunks merge 2 to 12 parts, each chunk length with its own lse strides."""
    from mnemosyne.attention import triton_merge

    rec = recorded(monkeypatch, triton_merge, "_merge_parts_kernel")
    for tokens in (1, 3, 16, 100, 1024):
        for num_parts in (2, 5, 12, 16):
            outs = [torch.empty(HEADS, tokens, HEAD_DIM, dtype=torch.float16).transpose(0, 1)] * num_parts
            lses = [torch.empty(1, HEADS, tokens)[0].transpose(0, 1)] * num_parts  # as cuDNN's [1, H, C]
            triton_merge.merge_parts(outs, lses, torch.float16)
    assert len(rec["_merge_parts_kernel"].calls) == 20 and len(patterns(rec["_merge_parts_kernel"])) == 1
