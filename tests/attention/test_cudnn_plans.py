"""Which cuDNN calls the serving warm-up makes: every chunk that `GpuBackend` sends to cuDNN, over
every prefix run it can have, must fall in a (chunk, run) class of power-of-two lengths that the
warm-up built, so that no plan is built mid-serving. (Imports the GPU backend, hence Triton.)"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.triton


def _class(n: int) -> int:
    return 1 << (n - 1).bit_length()


@pytest.mark.parametrize("small_chunk_rows", [128, 8192])
def test_the_warm_up_covers_every_class_cudnn_can_meet(small_chunk_rows):
    from mnemosyne.attention.gpu import GpuBackend, cudnn_plan_classes

    group, max_chunk, max_keys = 4, 16384, 200_000
    chunks, runs = cudnn_plan_classes(group, small_chunk_rows, max_chunk, max_keys)
    assert runs[0] == 1 and runs[-1] == max_keys and max(chunks) == max_chunk
    backend = GpuBackend(num_sms=132, small_chunk_rows=small_chunk_rows)
    chunk_classes, run_classes = {_class(c) for c in chunks}, {_class(r) for r in runs}
    for num_new in [*range(2, 2200, 7), 4095, 4096, 4097, 9000, 16383, 16384]:
        for prefix in (0, 100, 4096, 70_000, 199_000):
            if backend._routes_to_triton(num_new, group, prefix):
                continue
            assert _class(num_new) in chunk_classes  # the causal part, and group x num_new for the prefix
            for run in (1, 17, prefix):
                if 0 < run <= max_keys:
                    assert _class(run) in run_classes
