"""Test harness: `mnemosyne serve` in a subprocess on a free 127.0.0.1 port, and process helpers."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.ports import free_port

API_KEY = "sk-test-key"
MODEL = "smollm2-135m"
MAX_MODEL_LEN = 2048
MAX_BODY_BYTES = 1_000_000
SECRET = "Xyzzy-plugh"
"""Tests put this in prompts; it must never reach the server's log at default verbosity."""
_SRC = Path(__file__).resolve().parents[2] / "src"
_METRIC_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*(?:\{[^}]*\})?) (\S+)$")



@dataclass
class Server:
    proc: subprocess.Popen
    port: int
    log_path: Path
    api_key: str | None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metrics(self) -> dict[str, float]:
        """Every sample of /metrics, keyed by name plus labels."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        return {m[1]: float(m[2]) for line in text.splitlines() if (m := _METRIC_LINE.match(line))}

    def core_pid(self) -> int:
        return httpx.get(f"{self.url}/health", timeout=10).json()["engine_core_pid"]

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        return self.proc.returncode


def start_server(args: list[str], log_path: Path, api_key: str | None = None, timeout_s: float = 240) -> Server:
    """Start `python -m mnemosyne serve ARGS` and wait until /health says ok."""
    port = free_port()
    cmd = [sys.executable, "-m", "mnemosyne", "serve", *args, "--port", str(port)]
    if api_key:
        cmd += ["--api-key", api_key]
    env = {**os.environ, "PYTHONPATH": f"{_SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "TOKENIZERS_PARALLELISM": "false"}
    env.pop("MNEMOSYNE_API_KEY", None)
    log = log_path.open("wb")
    # A session of its own: the teardown can kill the whole group if the server misbehaves.
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    server = Server(proc, port, log_path, api_key)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{server.log()}")
        try:
            if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    server.stop(signal.SIGKILL)
    raise RuntimeError(f"server did not become healthy in {timeout_s} s:\n{server.log()}")


def children_of(pid: int) -> list[int]:
    """Live processes whose parent is `pid` (from /proc, so no psutil is needed)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(entry.name))
    return found


def pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
