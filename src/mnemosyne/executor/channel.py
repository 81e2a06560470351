"""The ZeroMQ control plane. The engine binds an XPUB (plans, to every rank) and a PULL (results,
errors, heartbeats); each worker connects a SUB and a PUSH, plus a watchdog thread that sends
heartbeats and ends the worker if the engine's connection drops."""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass

import zmq

from mnemosyne.executor import wire

logger = logging.getLogger(__name__)

HEARTBEAT_INTERVAL_S = 0.5
ENGINE_GONE_GRACE_S = 3.0
"""After the plan socket disconnects, how long a worker waits for a stop before exiting on its own."""
_LINGER_MS = 2000
"""Unsent messages (a stop, an error traceback) get this long to leave when a socket closes."""


@dataclass(frozen=True)
class ChannelAddresses:
    plan: str
    """XPUB endpoint the workers subscribe to."""
    result: str
    """PULL endpoint the workers push to."""


class EngineChannel:
    """Engine side. `num_subscribers` counts SUB sockets that joined, so the first plan is only
    published once every worker will receive it (PUB/SUB drops messages to late joiners)."""

    def __init__(self, host: str):
        self.context = zmq.Context()
        self.plans = self.context.socket(zmq.XPUB)
        self.plans.setsockopt(zmq.XPUB_VERBOSE, 1)  # report every subscriber, not just the first per topic
        self.plans.setsockopt(zmq.SNDHWM, 0)
        self.plans.setsockopt(zmq.LINGER, _LINGER_MS)
        plan_port = self.plans.bind_to_random_port(f"tcp://{host}")
        self.results = self.context.socket(zmq.PULL)
        self.results.setsockopt(zmq.LINGER, 0)
        result_port = self.results.bind_to_random_port(f"tcp://{host}")
        self.addresses = ChannelAddresses(f"tcp://{host}:{plan_port}", f"tcp://{host}:{result_port}")
        self.num_subscribers = 0
        self._poller = zmq.Poller()
        self._poller.register(self.plans, zmq.POLLIN)
        self._poller.register(self.results, zmq.POLLIN)

    def publish(self, topic: bytes, payload: bytes = b"") -> None:
        self.plans.send_multipart((topic, payload), copy=False)

    def poll(self, timeout_s: float) -> list[tuple[bytes, bytes]]:
        """Messages from workers that arrive within timeout_s, as (kind, body); counts subscriptions."""
        messages = []
        events = dict(self._poller.poll(timeout_s * 1000))
        if self.plans in events:
            while self.plans.poll(0):
                if self.plans.recv()[:1] == b"\x01":
                    self.num_subscribers += 1
        if self.results in events:
            while self.results.poll(0):
                kind, body = self.results.recv_multipart()
                messages.append((kind, body))
        return messages

    def close(self) -> None:
        self.plans.close()
        self.results.close()
        self.context.term()


class WorkerChannel:
    """Worker side. The main thread owns `plans` and `results`; the watchdog thread owns its own
    sockets, since ZeroMQ sockets must not be shared between threads."""

    def __init__(self, addresses: ChannelAddresses, rank: int):
        self.rank = rank
        self.context = zmq.Context()
        self.plans = self.context.socket(zmq.SUB)
        self.plans.setsockopt(zmq.RCVHWM, 0)  # a plan must never be dropped
        self.plans.setsockopt(zmq.SUBSCRIBE, b"")
        monitor_address = f"inproc://plan-monitor-{id(self)}"
        self.plans.monitor(monitor_address, zmq.EVENT_DISCONNECTED)
        self.plans.connect(addresses.plan)
        self.results = self.context.socket(zmq.PUSH)
        self.results.setsockopt(zmq.LINGER, _LINGER_MS)
        self.results.connect(addresses.result)
        self._result_address = addresses.result
        self.stopping = threading.Event()
        """Set by the main thread on an orderly stop, so the watchdog lets the process exit."""
        self._watchdog = threading.Thread(target=self._watch, args=(addresses, monitor_address),
                                          name="mnemosyne-watchdog", daemon=True)
        self._watchdog.start()

    def recv(self) -> tuple[bytes, bytes]:
        topic, payload = self.plans.recv_multipart()
        return topic, payload

    def poll(self, timeout_s: float) -> bool:
        """Whether a plan (or the stop) is waiting, after up to timeout_s."""
        return bool(self.plans.poll(timeout_s * 1000))

    def wait_for_stop(self, timeout_s: float) -> bool:
        """Drop plans until the engine's stop arrives (True) or timeout_s passes (False)."""
        deadline = time.monotonic() + timeout_s
        while (left_s := deadline - time.monotonic()) > 0:
            if self.plans.poll(left_s * 1000) and self.recv()[0] == wire.TOPIC_STOP:
                self.stopping.set()
                return True
        return False

    def send(self, kind: bytes, body: bytes) -> None:
        self.results.send_multipart((kind, body))

    def connect_results(self) -> zmq.Socket:
        """Another socket to the engine's results, for a thread other than the main one to own."""
        socket = self.context.socket(zmq.PUSH)
        socket.setsockopt(zmq.LINGER, _LINGER_MS)
        socket.connect(self._result_address)
        return socket

    def _watch(self, addresses: ChannelAddresses, monitor_address: str) -> None:
        beats = self.context.socket(zmq.PUSH)
        beats.setsockopt(zmq.LINGER, 0)
        beats.connect(addresses.result)
        monitor = self.context.socket(zmq.PAIR)
        monitor.connect(monitor_address)
        body = wire.encode(self.rank)
        while not self.stopping.is_set():
            beats.send_multipart((wire.KIND_HEARTBEAT, body))
            engine_gone = monitor.poll(HEARTBEAT_INTERVAL_S * 1000) and _is_disconnect(monitor.recv_multipart())
            if engine_gone and not self.stopping.wait(ENGINE_GONE_GRACE_S):
                logger.error("the engine went away; worker rank %d exits", self.rank)
                os._exit(1)  # the main thread may be blocked in a collective that never returns
        beats.close()
        monitor.close()

    def close(self) -> None:
        self.stopping.set()
        self._watchdog.join(timeout=2 * HEARTBEAT_INTERVAL_S)
        self.plans.disable_monitor()
        self.plans.close()
        self.results.close()
        if not self._watchdog.is_alive():  # term() would wait for the watchdog's sockets forever
            self.context.term()


def _is_disconnect(frames: list[bytes]) -> bool:
    event = int.from_bytes(frames[0][:2], "little")
    return event == zmq.EVENT_DISCONNECTED
