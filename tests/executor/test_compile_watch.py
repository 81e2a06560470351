"""The worker's watch on Triton compiles after warm-up, against a stand-in for `triton.knobs` (Triton is
not installed on CPU machines; on the GPU machine the serving benchmarks read its warnings)."""

from __future__ import annotations

import logging
import sys
import types

import pytest

from mnemosyne.executor.compile_watch import CompileWatch


@pytest.fixture
def knobs(monkeypatch):
    runtime = types.SimpleNamespace(jit_cache_hook=None, jit_post_compile_hook=None)
    module = types.ModuleType("triton")
    module.knobs = types.SimpleNamespace(runtime=runtime)
    monkeypatch.setitem(sys.modules, "triton", module)
    return runtime


def _compile(runtime, name: str) -> bool | None:
    """What Triton's JITFunction._do_compile does around a compile."""
    info = {"key": name, "repr": f"{name}[num_warps=4](x: *bf16, n: i32)",
            "fn": types.SimpleNamespace(name=name), "compile": {}, "is_manual_warmup": False,
            "already_compiled": False}
    if runtime.jit_cache_hook(**info):
        return True
    runtime.jit_post_compile_hook(**info)
    return None


def test_compiles_after_arming_are_warnings_and_counted(knobs, caplog):
    watch = CompileWatch().install()
    with caplog.at_level(logging.WARNING, logger="mnemosyne.executor.compile_watch"):
        _compile(knobs, "_warm_kernel")
        assert watch.compiles == 0 and not caplog.records  # start-up compiles are expected
        watch.arm()
        _compile(knobs, "_late_kernel")
        _compile(knobs, "_later_kernel")
    assert watch.compiles == 2 and watch.seconds >= 0
    assert [r.getMessage().split(" after")[0] for r in caplog.records] == [
        "Triton compiled _late_kernel", "Triton compiled _later_kernel"]
    assert "(x: *bf16, n: i32)" in caplog.records[0].getMessage()  # the specialization that was new


def test_hooks_installed_before_keep_being_called(knobs):
    seen = []
    vetoed = {"k"}  # an earlier hook that skips this kernel's compile
    knobs.jit_cache_hook = lambda **kw: seen.append(("before", kw["key"])) or kw["key"] in vetoed
    knobs.jit_post_compile_hook = lambda **kw: seen.append(("after", kw["key"]))
    watch = CompileWatch().install()
    watch.arm()
    assert _compile(knobs, "k") is True  # the veto is passed on: no compile, nothing counted
    assert _compile(knobs, "j") is None
    assert seen == [("before", "k"), ("before", "j"), ("after", "j")]
    assert watch.compiles == 1
