"""`mnemosyne serve`: server flags and the process that runs uvicorn next to an engine-core process.

Imported when the CLI builds its parser, so nothing heavy (fastapi, torch) is imported at module level.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class ServerConfig:
    """Settings of the HTTP front end, separate from the engine's."""

    host: str = "127.0.0.1"
    """Address to bind; loopback unless the operator opts in."""
    port: int = 8000
    """TCP port to bind; 0 picks a free one."""
    api_key: str | None = None
    """When set, every /v1 route requires `Authorization: Bearer <key>`."""
    served_model_name: str | None = None
    """Model id shown in /v1/models and accepted in requests; defaults to the engine's model name."""
    max_waiting_requests: int = 1024
    """Requests admitted but not yet finished prefill past which new ones get 429."""
    max_queued_prompt_tokens: int = 4_000_000
    """Prompt tokens admitted but not yet prefilled past which new requests get 429."""
    max_body_bytes: int = 64 * 1024 * 1024
    """Largest request body accepted; bigger ones get 413."""
    prefill_progress_s: float = 1.0
    """Interval of the core's prefill-progress reports (streamed as SSE comments)."""
    drain_timeout_s: float = 30.0
    """On SIGINT/SIGTERM, how long in-flight requests may run before they are aborted."""
    log_requests: bool = False
    """Log one line per request (ids, lengths and timings, never prompt text)."""

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port must be in [0, 65535], got {self.port}")
        for name in ("max_waiting_requests", "max_queued_prompt_tokens", "max_body_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.prefill_progress_s <= 0 or self.drain_timeout_s < 0:
            raise ValueError("--prefill-progress-s must be positive and --drain-timeout-s non-negative")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the server's flags (the engine's are added by the CLI)."""
    d = ServerConfig()
    parser.add_argument("--host", default=d.host, help=f"address to bind (default: {d.host})")
    parser.add_argument("--port", type=int, default=d.port, help=f"port to bind (default: {d.port})")
    parser.add_argument("--api-key", default=None,
                        help="require 'Authorization: Bearer KEY' on /v1 routes (default: env MNEMOSYNE_API_KEY)")
    parser.add_argument("--served-model-name", default=None, help="model id clients use (default: the model's name)")
    parser.add_argument("--max-waiting-requests", type=int, default=d.max_waiting_requests,
                        help=f"queued requests past which new ones get 429 (default: {d.max_waiting_requests})")
    parser.add_argument("--max-queued-prompt-tokens", type=int, default=d.max_queued_prompt_tokens,
                        help=f"queued prompt tokens past which new requests get 429 "
                             f"(default: {d.max_queued_prompt_tokens})")
    parser.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes,
                        help=f"largest request body, else 413 (default: {d.max_body_bytes})")
    parser.add_argument("--prefill-progress-s", type=float, default=d.prefill_progress_s,
                        help=f"seconds between prefill progress reports (default: {d.prefill_progress_s})")
    parser.add_argument("--drain-timeout-s", type=float, default=d.drain_timeout_s,
                        help=f"on shutdown, seconds to let in-flight requests finish (default: {d.drain_timeout_s})")
    parser.add_argument("--log-requests", action="store_true", help="log one line per request (never its text)")


def server_config(args: argparse.Namespace) -> ServerConfig:
    """A ServerConfig from parsed flags; the API key falls back to env MNEMOSYNE_API_KEY."""
    return ServerConfig(
        host=args.host, port=args.port, api_key=args.api_key or os.environ.get("MNEMOSYNE_API_KEY") or None,
        served_model_name=args.served_model_name, max_waiting_requests=args.max_waiting_requests,
        max_queued_prompt_tokens=args.max_queued_prompt_tokens, max_body_bytes=args.max_body_bytes,
        prefill_progress_s=args.prefill_progress_s, drain_timeout_s=args.drain_timeout_s,
        log_requests=args.log_requests)


def run(args: argparse.Namespace) -> int:
    """Start the engine core and serve HTTP until SIGINT/SIGTERM; non-zero if the core died."""
    from mnemosyne.cli import engine_config
    from mnemosyne.server.api_server import serve

    return serve(engine_config(args), server_config(args))
