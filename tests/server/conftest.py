"""Server fixtures. One default-model server is shared by the whole session (it loads in ~20 s on
2 cores); SIGTERM stops it at the end, which must exit 0 and leave no engine-core process behind."""

from __future__ import annotations

import signal

import pytest

from tests.server.harness import (
    API_KEY,
    MAX_BODY_BYTES,
    MAX_MODEL_LEN,
    MODEL,
    SECRET,
    Server,
    pid_alive,
    start_server,
)


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Server:
    """The default model, with small limits so that limit tests are cheap. Checked at teardown: SIGTERM
    makes it exit 0 and leaves no engine-core process behind."""
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    srv = start_server([MODEL, "--device", "cpu", "--max-model-len", str(MAX_MODEL_LEN),
                        "--kv-cache-memory", "0.5", "--max-num-batched-tokens", "256",
                        "--max-body-bytes", str(MAX_BODY_BYTES), "--prefill-progress-s", "0.5"],
                       log_path, api_key=API_KEY)
    core_pid = srv.core_pid()
    yield srv
    code = srv.stop(signal.SIGTERM)
    assert code == 0, srv.log()
    assert not pid_alive(core_pid), "the engine core outlived the server"
    assert SECRET not in srv.log(), "prompt text leaked into the log"
