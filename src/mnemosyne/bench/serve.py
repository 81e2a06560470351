"""`mnemosyne bench serve`: replays a request trace against an OpenAI-compatible server, streaming
/v1/completions with token-id prompts of the trace's exact lengths, and reports what the client saw.
It can launch the server itself, once per configuration compared, and reads GPU energy from NVML.

Imported when the CLI builds its parser: httpx, numpy and the report load only when it runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import importlib.util
import json
import math
import os
import random
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mnemosyne.sim.cli import add_trace_arguments

TOKEN_ID_RANGE = (20, 500)
"""Prompt token ids are drawn from here: inside every vocabulary served (dummy:tiny has 512), and clear
of the special tokens at the start of small vocabularies. Each request of each run draws its own, so
no two prompts share a prefix and the prefix cache never hits."""
NUM_WARMUP = 2
"""Short requests sent first and not measured."""
SOLO_OUTPUT_TOKENS = 2


def add_arguments(p: argparse.ArgumentParser) -> None:
    srv = p.add_argument_group("server")
    srv.add_argument("--url", default="http://127.0.0.1:8000", help="server to replay against")
    srv.add_argument("--api-key", default=os.environ.get("MNEMOSYNE_API_KEY"),
                     help="bearer key (default: env MNEMOSYNE_API_KEY); passed on to a launched server")
    srv.add_argument("--launch", metavar="SERVE_ARGS",
                     help="start `mnemosyne serve SERVE_ARGS` on a free port for the run, and stop it after")
    srv.add_argument("--compare", nargs="+", metavar="ARGS",
                     help="with --launch: one run per ARGS, each appended to SERVE_ARGS (e.g. "
                          "'--scheduler lars --chunking adaptive' '--scheduler fcfs --chunking fixed:2048')")
    srv.add_argument("--launch-timeout-s", type=float, default=900.0,
                     help="how long a launched server may take to load (default: 900)")
    srv.add_argument("--trace-timeout-s", type=float, default=None,
                     help="stop replaying this long after the trace's start; requests not finished by then are "
                          "reported as errors (default: no limit)")
    add_trace_arguments(p, num_requests=200, rate=2.0)
    slo = p.add_argument_group("SLOs and report")
    slo.add_argument("--long-threshold", type=int, default=32768,
                     help="prompts of at least this many tokens are long (default: 32768)")
    slo.add_argument("--ttft-slo-ms", type=float, default=2000.0, help="short requests' TTFT SLO (default: 2000)")
    slo.add_argument("--long-ttft-slo-ms-per-ktok", type=float, default=250.0,
                     help="long requests' TTFT SLO per 1024 prompt tokens (default: 250, so 32 s at 128K)")
    slo.add_argument("--tbt-slo-ms", type=float, default=50.0,
                     help="SLO of every request's p99 time between tokens (default: 50)")
    slo.add_argument("--solo-requests", type=int, default=16,
                     help="short requests of the trace first sent one at a time, for the solo TTFT, spread over "
                          "the short prompts' lengths up to the longest (default: 16)")
    slo.add_argument("-o", "--output", help="folder for serve.json, serve.txt, serve.png and server logs")
    p.set_defaults(func=run)


# -- the run ---------------------------------------------------------------------------------------
@dataclass
class RunResult:
    """What one replay measured."""

    model: str
    max_model_len: int
    timings: list
    """serve_report.Timing of each trace request, in trace order."""
    solo: list
    duration_s: float
    energy_j: float | None
    """GPU energy over the replay; None without NVML."""
    server: dict[str, dict[float, float]] | None = None
    """The server's own step-time and TBT histograms over the replay (`server_histograms`); None if it
    exposes none."""


def run(args: argparse.Namespace) -> int:
    from mnemosyne.bench.serve_report import Slos, format_table, summarize
    from mnemosyne.sim.cli import trace_from_args

    _check_args(args)
    if importlib.util.find_spec("httpx") is None:
        raise ValueError("bench serve needs httpx: pip install httpx")
    trace = trace_from_args(args)
    slos = Slos(args.ttft_slo_ms / 1e3, args.long_ttft_slo_ms_per_ktok / 1e3 / 1024, args.tbt_slo_ms / 1e3,
                args.long_threshold)
    out = Path(args.output) if args.output else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    runs = run_configs(args.launch, args.compare)
    results: dict[str, RunResult] = {}
    summaries: dict[str, dict] = {}
    for i, (label, serve_args) in enumerate(runs):
        try:
            result = _measure_run(args, trace, label, serve_args, i, out)
        except RuntimeError as e:  # a server that would not start or serve: keep the runs already done
            print(f"mnemosyne: error: {label}: {e}", file=sys.stderr)
            return 1
        results[label] = result
        summaries[label] = summarize(result.timings, result.solo, slos, result.duration_s, result.energy_j,
                                     result.server)
        if out is not None:  # after every run, so a later failure loses nothing
            _write(out, args, runs, results, summaries, slos, format_table(summaries))
    print(format_table(summaries))
    return 0


def _measure_run(args: argparse.Namespace, trace: Sequence, label: str, serve_args: list[str] | None, index: int,
                 out: Path | None) -> RunResult:
    """One replay: against --url, or against a server launched with `serve_args` for it."""
    if serve_args is None:
        return asyncio.run(measure(args.url, args.api_key, trace, args.solo_requests, label, args.long_threshold,
                                   args.trace_timeout_s))
    log_path = out / f"server-{index}.log" if out else Path(tempfile.gettempdir()) / f"mnemosyne-bench-server-{index}.log"
    with launched_server(serve_args, log_path, args.api_key, args.launch_timeout_s) as url:
        return asyncio.run(measure(url, args.api_key, trace, args.solo_requests, label, args.long_threshold,
                                   args.trace_timeout_s))


def _check_args(args: argparse.Namespace) -> None:
    if args.compare and not args.launch:
        raise ValueError("--compare needs --launch: the server arguments the compared ones are added to")
    for name in ("ttft_slo_ms", "long_ttft_slo_ms_per_ktok", "tbt_slo_ms", "long_threshold"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.trace_timeout_s is not None and args.trace_timeout_s <= 0:
        raise ValueError(f"--trace-timeout-s must be positive, got {args.trace_timeout_s}")
    if args.solo_requests < 0:
        raise ValueError(f"--solo-requests must be >= 0, got {args.solo_requests}")


def run_configs(launch: str | None, compare: Sequence[str] | None) -> list[tuple[str, list[str] | None]]:
    """(label, serve arguments) per run; None: the server at --url. Labels are scheduler+chunking, or
    the compared arguments themselves when those would not tell runs apart."""
    if launch is None:
        return [("server", None)]
    base = shlex.split(launch)
    extras = [shlex.split(c) for c in compare] if compare else [[]]
    runs = [base + extra for extra in extras]
    labels = [f"{_flag(r, '--scheduler', 'lars')}+{_flag(r, '--chunking', 'adaptive')}" for r in runs]
    if len(set(labels)) < len(labels):
        labels = list(compare)  # type: ignore[arg-type]
    return list(zip(labels, runs, strict=True))


def _flag(args: list[str], name: str, default: str) -> str:
    value = default
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
    return value


def _write(out: Path, args: argparse.Namespace, runs: list, results: dict[str, RunResult],
           summaries: dict[str, dict], slos: Any, table: str) -> None:
    from mnemosyne.bench.serve_report import plot

    setup = {"url": args.url if args.launch is None else None, "slos": asdict(slos),
             "num_requests": len(next(iter(results.values())).timings), "solo_requests": args.solo_requests,
             "serve_args": {label: serve_args for label, serve_args in runs}}
    doc = {"setup": setup, "runs": {label: {"model": r.model, "max_model_len": r.max_model_len,
                                            "summary": summaries[label],
                                            "timings": [asdict(t) for t in r.timings],
                                            "solo": [asdict(t) for t in r.solo]} for label, r in results.items()}}
    (out / "serve.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out / "serve.txt").write_text(table + "\n")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("mnemosyne: plots skipped: matplotlib is not installed", file=sys.stderr)
        return
    model = next(iter(results.values())).model
    plot({label: (r.timings, r.solo) for label, r in results.items()}, slos, out / "serve.png",
         f"{model}: {len(next(iter(results.values())).timings)} requests, long >= {slos.long_threshold} tokens")


# -- replay ----------------------------------------------------------------------------------------
async def measure(url: str, api_key: str | None, trace: Sequence, num_solo: int, label: str,
                  long_threshold: int, timeout_s: float | None = None) -> RunResult:
    """Warm up, send `num_solo` short requests one at a time, then replay the trace at its arrival times."""
    import httpx

    from mnemosyne.sim.trace import TraceRequest

    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    timeout = httpx.Timeout(30.0, read=120.0, write=300.0, pool=None)  # the server streams keepalives every 2 s
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=timeout, limits=limits) as client:
        model, max_model_len = await _served_model(client)
        longest = max(t.num_prompt_tokens + t.num_output_tokens for t in trace)
        if longest > max_model_len:
            raise ValueError(f"the trace's longest request needs {longest} tokens, but the server's max_model_len "
                             f"is {max_model_len}; start it with --max-model-len {longest} or more")
        short = [t for t in trace if t.num_prompt_tokens < long_threshold] or [TraceRequest(0.0, 64, 8)]
        # Fresh prompts for every run, so that the server's prefix cache never serves one run from another's.
        nonce = random.SystemRandom().randrange(2**32)
        for i in range(NUM_WARMUP):
            spec = short[i % len(short)]
            warmup = await _stream(client, _body(model, spec, (nonce, 2, i), SOLO_OUTPUT_TOKENS), time.monotonic(),
                                   _timing_sent_now(spec, SOLO_OUTPUT_TOKENS))
            if warmup.error is not None:
                raise RuntimeError(f"a warm-up request to {url} failed: {warmup.error}")
        solo = []
        for i, spec in enumerate(solo_specs(short, num_solo)):  # each on a clock of its own, from 0 when sent
            solo.append(await _stream(client, _body(model, spec, (nonce, 1, i), SOLO_OUTPUT_TOKENS), time.monotonic(),
                                      _timing_sent_now(spec, SOLO_OUTPUT_TOKENS)))
        bodies = [_body(model, spec, (nonce, 0, i)) for i, spec in enumerate(trace)]
        meter = GpuEnergy.open()
        before_j = meter.joules() if meter is not None else None
        histograms_before = await server_histograms(client)
        timings, duration_s = await _replay(client, trace, bodies, label, long_threshold, timeout_s)
        after_j = meter.joules() if meter is not None else None
        histograms_after = await server_histograms(client)
    energy_j = after_j - before_j if before_j is not None and after_j is not None else None
    server = None
    if histograms_before is not None and histograms_after is not None:
        server = {name: {le: n - histograms_before.get(name, {}).get(le, 0.0) for le, n in buckets.items()}
                  for name, buckets in histograms_after.items()}
    return RunResult(model, max_model_len, timings, solo, duration_s, energy_j, server)


def solo_specs(short: Sequence, n: int) -> list:
    """The n short requests sent alone: at the quantiles 1/n, 2/n, …, 1 of the short prompts' lengths,
    so that the solo p99 covers the same range of prompts as the p99 it is compared with (`short*`'s,
    whose tail is the longest chat prompts). The first n of the trace, as before the twenty-second
    session, left that to chance: in the 1gpu trace of `benchmarks/serve_mixed.sh` the longest of its
    first 16 had 1,853 tokens, while its short prompts reach 2,046."""
    ordered = sorted(short, key=lambda t: t.num_prompt_tokens)
    return [ordered[math.ceil(k * len(ordered) / n) - 1] for k in range(1, n + 1)]


SERVER_HISTOGRAMS = {"step": "mnemosyne_step_duration_seconds", "tbt": "mnemosyne_time_between_tokens_seconds"}
"""The server's histograms read around a replay: how long its engine steps took, and the gaps between
tokens as its API process handed them to the streams. Set beside the client's gaps, they tell where a
TBT over the SLO was spent: in the step, or between the engine and the client."""

_BUCKET_LINE = re.compile(r'^(\w+)_bucket\{(?:[^}]*,)?le="([^"]+)"[^}]*\}\s+(\S+)$')


async def server_histograms(client: Any) -> dict[str, dict[float, float]] | None:
    """Cumulative bucket counts {le: count} of SERVER_HISTOGRAMS from the server's /metrics; None if
    it has no such endpoint (another server than mnemosyne)."""
    import httpx

    try:
        r = await client.get("/metrics")
    except httpx.HTTPError:
        return None
    if r.status_code != 200:
        return None
    return parse_histograms(r.text)


def parse_histograms(text: str) -> dict[str, dict[float, float]] | None:
    wanted = {metric: name for name, metric in SERVER_HISTOGRAMS.items()}
    found: dict[str, dict[float, float]] = {}
    for line in text.splitlines():
        m = _BUCKET_LINE.match(line)
        if m and m.group(1) in wanted:
            found.setdefault(wanted[m.group(1)], {})[float(m.group(2))] = float(m.group(3))
    return found or None


async def _served_model(client: Any) -> tuple[str, int]:
    r = await client.get("/v1/models")
    if r.status_code != 200:
        raise ValueError(f"GET {client.base_url}/v1/models answered {r.status_code}: {r.text[:300]}")
    card = r.json()["data"][0]
    return card["id"], int(card["max_model_len"])


def _body(model: str, spec: Any, seed: tuple[int, ...], max_tokens: int | None = None) -> bytes:
    """A streaming completion of a random token-id prompt of the spec's exact length; with ignore_eos it
    generates exactly max_tokens tokens. The trace's deadline and priority go along as API hints."""
    import numpy as np

    low, high = TOKEN_ID_RANGE
    prompt = np.random.default_rng(list(seed)).integers(low, high, spec.num_prompt_tokens).tolist()
    body: dict[str, Any] = {"model": model, "prompt": prompt,
                            "max_tokens": spec.num_output_tokens if max_tokens is None else max_tokens,
                            "ignore_eos": True, "temperature": 0, "stream": True,
                            "stream_options": {"include_usage": True}}
    if spec.deadline_s is not None:
        body["deadline"] = spec.deadline_s
    if spec.priority:
        body["priority"] = spec.priority
    return json.dumps(body, separators=(",", ":")).encode()


async def _replay(client: Any, trace: Sequence, bodies: list[bytes], label: str, long_threshold: int,
                  timeout_s: float | None) -> tuple[list, float]:
    """Send each request at its arrival time; returns the timings in trace order and the time from the
    trace's start to its last response. After `timeout_s`, requests still streaming are closed (the
    server aborts them) and, like those never sent, reported as errors."""
    from tqdm import tqdm

    from mnemosyne.bench.serve_report import Timing

    timings = [Timing(spec.num_prompt_tokens, spec.num_output_tokens, spec.arrival_s, spec.arrival_s,
                      error=f"not sent within --trace-timeout-s {timeout_s}") for spec in trace]
    bar = tqdm(total=len(trace), desc=label, unit="req", file=sys.stderr, mininterval=1.0, dynamic_ncols=True)
    progress: dict[int, str] = {}

    def on_progress(index: int, text: str) -> None:
        progress[index] = text
        bar.set_postfix_str("long prefill " + ", ".join(progress.values()), refresh=False)

    async def one(index: int, spec: Any, body: bytes) -> None:
        timing = timings[index] = Timing(spec.num_prompt_tokens, spec.num_output_tokens, spec.arrival_s,
                                         time.monotonic() - clock0)
        is_long = spec.num_prompt_tokens >= long_threshold
        await _stream(client, body, clock0, timing, (lambda text: on_progress(index, text)) if is_long else None)
        progress.pop(index, None)
        bar.update(1)

    async def send_all() -> None:
        for index, (spec, body) in enumerate(zip(trace, bodies, strict=True)):
            delay_s = clock0 + spec.arrival_s - time.monotonic()
            if delay_s > 0:
                await asyncio.sleep(delay_s)
            tasks.append(asyncio.create_task(one(index, spec, body)))
        await asyncio.gather(*tasks)

    clock0 = time.monotonic()
    tasks: list[asyncio.Task] = []
    sender = asyncio.ensure_future(send_all())
    try:
        await asyncio.wait({sender}, timeout=timeout_s)
    finally:
        for task in [sender, *tasks]:
            task.cancel()
        await asyncio.gather(sender, *tasks, return_exceptions=True)
        bar.close()
    if not sender.cancelled() and sender.exception() is not None:
        raise sender.exception()  # type: ignore[misc]  # a bug, not a slow server: do not hide it
    ends = [t.end_s for t in timings if t.end_s is not None]
    return timings, max(ends, default=time.monotonic() - clock0)


async def _stream(client: Any, body: bytes, clock0: float, timing: Any, on_progress: Any = None) -> Any:
    """POST one streaming completion into `timing` (a serve_report.Timing whose start_s is now); the time
    of every chunk that carries a choice is a token's time. Returns `timing`."""
    import httpx

    try:
        async with client.stream("POST", "/v1/completions", content=body) as r:
            if r.status_code != 200:
                timing.error = f"HTTP {r.status_code}: {(await r.aread())[:300].decode(errors='replace')}"
            else:
                async for line in r.aiter_lines():
                    now_s = time.monotonic() - clock0
                    if line.startswith(": prefill") and on_progress is not None:
                        on_progress(line.removeprefix(": prefill ").strip())
                    if not line.startswith("data: {"):
                        continue
                    chunk = json.loads(line.removeprefix("data: "))
                    if "error" in chunk:
                        timing.error = f"stream error: {chunk['error'].get('message')}"
                    elif chunk["choices"]:
                        timing.token_s.append(now_s)
                    elif chunk.get("usage"):
                        timing.num_tokens = chunk["usage"]["completion_tokens"]
                        timing.num_cached_tokens = (chunk["usage"].get("prompt_tokens_details") or {}).get(
                            "cached_tokens")
    except httpx.HTTPError as e:
        timing.error = f"{type(e).__name__}: {e}"
    except asyncio.CancelledError:
        timing.error = "unfinished when the run was stopped (--trace-timeout-s)"
        raise
    finally:
        timing.end_s = time.monotonic() - clock0
    return timing


def _timing_sent_now(spec: Any, max_tokens: int) -> Any:
    """A Timing on a clock of its own, whose 0 is now."""
    from mnemosyne.bench.serve_report import Timing

    return Timing(spec.num_prompt_tokens, max_tokens, 0.0, 0.0)


# -- a launched server -----------------------------------------------------------------------------
@contextlib.contextmanager
def launched_server(serve_args: list[str], log_path: Path, api_key: str | None, timeout_s: float) -> Iterator[str]:
    """`python -m mnemosyne serve SERVE_ARGS` on a free loopback port, its output in `log_path`. Yields
    its URL once /health answers 200; stops it with SIGTERM (SIGKILL to its process group if it hangs)."""
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "mnemosyne", "serve", *serve_args, "--port", str(port)]
    if api_key:
        cmd += ["--api-key", api_key]
    url = f"http://127.0.0.1:{port}"
    print(f"mnemosyne: launching {shlex.join(cmd[2:])}; log in {log_path}", file=sys.stderr)
    with log_path.open("wb") as log:
        # A session of its own, so that a hung server can be killed with its engine core and workers.
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline_s = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with {proc.returncode} while loading; see {log_path}:\n"
                                   + _tail(log_path))
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline_s:
                raise RuntimeError(f"the server was not healthy after {timeout_s:.0f} s; see {log_path}")
            time.sleep(0.5)
        yield url
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def _tail(path: Path, num_lines: int = 20) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-num_lines:])


# -- GPU energy ------------------------------------------------------------------------------------
class GpuEnergy:
    """Energy drawn by every GPU on the host since the driver loaded, from NVML's counters (Volta and
    later), read through the driver's libnvidia-ml so that no Python binding is needed."""

    def __init__(self, lib: Any, handles: list[ctypes.c_void_p]):
        self.lib = lib
        self.handles = handles

    @classmethod
    def open(cls) -> GpuEnergy | None:
        """None without an NVIDIA driver, GPUs, or energy counters."""
        try:
            lib = ctypes.CDLL("libnvidia-ml.so.1")
        except OSError:
            return None
        lib.nvmlDeviceGetHandleByIndex_v2.argtypes = [ctypes.c_uint, ctypes.POINTER(ctypes.c_void_p)]
        lib.nvmlDeviceGetTotalEnergyConsumption.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_ulonglong)]
        count = ctypes.c_uint()
        if lib.nvmlInit_v2() != 0 or lib.nvmlDeviceGetCount_v2(ctypes.byref(count)) != 0:
            return None
        handles = []
        for index in range(count.value):
            handle = ctypes.c_void_p()
            if lib.nvmlDeviceGetHandleByIndex_v2(index, ctypes.byref(handle)) != 0:
                return None
            handles.append(handle)
        meter = cls(lib, handles)
        return meter if handles and meter.joules() is not None else None

    def joules(self) -> float | None:
        total_mj = 0
        for handle in self.handles:
            value = ctypes.c_ulonglong()
            if self.lib.nvmlDeviceGetTotalEnergyConsumption(handle, ctypes.byref(value)) != 0:
                return None
            total_mj += value.value
        return total_mj / 1e3
