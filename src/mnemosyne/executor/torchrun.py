"""Multi-node runs under `torchrun`: every launched process is a worker; global rank 0 also runs
the engine core, which binds the control plane and hands its address to the others through the
c10d process group. No launcher of our own: torchrun's env and rendezvous are used as they are."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

from mnemosyne.config import EngineConfig, ModelConfig
from mnemosyne.executor.channel import ChannelAddresses, EngineChannel
from mnemosyne.executor.multiproc import (
    DIST_TIMEOUT_S,
    MultiprocExecutor,
    check_layout,
    engine_log_level,
    start_processes,
)
from mnemosyne.executor.worker_process import WorkerSpec, run_worker

_ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class TorchrunEnv:
    """This process's place in a torchrun launch, from the standard env variables."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str


def torchrun_env() -> TorchrunEnv | None:
    """The launch this process belongs to, or None when it was not started by torchrun."""
    if not all(key in os.environ for key in _ENV_KEYS):
        return None
    world_size = int(os.environ["WORLD_SIZE"])
    return TorchrunEnv(int(os.environ["RANK"]), world_size, int(os.environ["LOCAL_RANK"]),
                       int(os.environ.get("LOCAL_WORLD_SIZE", world_size)), os.environ["MASTER_ADDR"])


def torchrun_executor(config: EngineConfig, model_config: ModelConfig, env: TorchrunEnv) -> MultiprocExecutor:
    """On global rank 0: the engine's executor, with rank 0's worker in a child process. On every
    other rank: serve as a worker until the engine says stop, then exit the process (SystemExit),
    so any entry point that builds an engine (LLM, `mnemosyne generate`) runs unchanged on all nodes."""
    if env.world_size != config.world_size:
        raise ValueError(f"torchrun started {env.world_size} processes, but kvp × pp × tp = {config.world_size}: "
                         "make --nnodes × --nproc-per-node equal the layout's world size")
    layout = check_layout(config, model_config)
    if env.rank != 0:
        raise SystemExit(run_worker(_spec(config, env, None)))
    channel = EngineChannel(advertised_host(env.master_addr))
    # Rank 0's worker runs in a child so the engine core and the device loop never share a GIL; the
    # child inherits torchrun's env (RANK=0, MASTER_ADDR, ...) and joins the group as rank 0.
    return MultiprocExecutor(layout, channel, start_processes([_spec(config, env, channel.addresses)]))


def _spec(config: EngineConfig, env: TorchrunEnv, addresses: ChannelAddresses | None) -> WorkerSpec:
    return WorkerSpec(config, env.rank, env.world_size, env.local_rank, env.local_world_size, "env://",
                      addresses, share_addresses=True, dist_timeout_s=DIST_TIMEOUT_S, log_level=engine_log_level())


def advertised_host(master_addr: str) -> str:
    """The address other nodes reach this one at: MNEMOSYNE_HOST_IP if set, else the local address
    of the interface that routes to the master (a UDP connect sends nothing)."""
    if os.environ.get("MNEMOSYNE_HOST_IP"):
        return os.environ["MNEMOSYNE_HOST_IP"]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((master_addr, 1))
        return s.getsockname()[0]
