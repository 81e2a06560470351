"""Which host-side idioms make the host wait for the kernels already queued (#8: no host sync in a
step). Each idiom runs behind a kernel that keeps the device busy for about 100 ms
(`torch.cuda._sleep`); the table gives its host time and whether that kernel had finished when it
returned, i.e. whether the host waited for the device. Needs a CUDA device.

    python benchmarks/host_sync.py
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from mnemosyne.bench.floors import behind_busy_device, busy_cycles

BUSY_MS = 100.0


def main() -> None:
    device = torch.device("cuda")
    cycles = busy_cycles(BUSY_MS)
    rows = [[i, 7 * i, 3, 4, 5, 6] for i in range(8)]  # a short-chunk table's size
    big = list(range(40_000))  # larger than a staging page
    x = torch.randn(512, 64, device=device)
    pick = [3, 9, 511]
    pick_cpu = torch.tensor(pick)
    pick_cuda = torch.tensor(pick, device=device)
    sizes = iter(range(1, 10_000))
    cases: list[tuple[str, Callable[[], object]]] = [
        ("torch.tensor(list, device=cuda)", lambda: torch.tensor(pick, device=device)),
        ("torch.tensor(rows).to(cuda, non_blocking=True), pageable", lambda: torch.tensor(
            rows, dtype=torch.int32).to(device, non_blocking=True)),
        ("the same, 160 KB pageable", lambda: torch.tensor(big, dtype=torch.int32).to(device, non_blocking=True)),
        ("torch.tensor(rows).pin_memory().to(cuda, non_blocking=True)", lambda: torch.tensor(
            rows, dtype=torch.int32).pin_memory().to(device, non_blocking=True)),
        ("the same, 160 KB pinned", lambda: torch.tensor(big, dtype=torch.int32).pin_memory().to(
            device, non_blocking=True)),
        ("x[python list] on a CUDA x", lambda: x[pick]),
        ("x[CPU int64 tensor] on a CUDA x", lambda: x[pick_cpu]),
        ("x.index_select(0, CUDA int64 tensor)", lambda: x.index_select(0, pick_cuda)),
        ("torch.empty(new size, pin_memory=True)", lambda: torch.empty(4096 * next(sizes), pin_memory=True)),
        ("torch.Generator(cuda).manual_seed", lambda: torch.Generator(device=device).manual_seed(1)),
        ("torch.rand((), generator=cuda generator)", lambda: torch.rand(
            (), generator=torch.Generator(device=device), device=device)),
        ("x.sum().item()", lambda: x.sum().item()),
    ]
    print(f"busy kernel: {BUSY_MS:.0f} ms ({cycles} cycles); 'waited': it had finished when the idiom returned")
    print(f"{'idiom':<64} {'host ms':>8}  waited")
    for name, fn in cases:
        behind_busy_device(fn, cycles)  # first call: lazy initialisation, not counted
        _, host_ms, waited = behind_busy_device(fn, cycles)
        print(f"{name:<64} {host_ms:8.2f}  {'yes' if waited else 'no'}")


if __name__ == "__main__":
    main()
