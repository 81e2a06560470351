"""Bytes on the control plane: StepPlan encoded as msgpack with every per-chunk number packed in
fixed-width arrays (so a decode step's size depends on the batch, never on positions or block
ids), and the typed messages workers send back. msgspec decodes into fixed types: never pickle."""

from __future__ import annotations

from array import array
from dataclasses import dataclass

import msgspec

from mnemosyne.executor.worker import RuntimeInfo
from mnemosyne.plan import NewRequest, ScheduledChunk, StageDone, StepPlan, StepResult
from mnemosyne.request import SamplingParams

_CHUNK_FIELDS = 4
"""Per chunk in `_PlanWire.numbers`: start, num_new_tokens, len(new_block_ids), len(new_token_ids)."""


class _NewRequestWire(msgspec.Struct, array_like=True, frozen=True):
    request_id: str
    token_ids: bytes
    """array('i') bytes: a prompt crosses as one buffer, not a list of ints."""
    params: SamplingParams
    seed: int


class _PlanWire(msgspec.Struct, array_like=True, frozen=True):
    numbers: bytes
    """int64 array: step_id, then _CHUNK_FIELDS per chunk."""
    request_ids: list[str]
    """Of the chunks, in batch order."""
    block_ids: bytes
    """int32 array: every chunk's new block ids, concatenated."""
    token_ids: bytes
    """int32 array: every chunk's newly sampled token ids, concatenated."""
    new_requests: list[_NewRequestWire]
    freed_ids: list[str]


_plan_encoder = msgspec.msgpack.Encoder()
_plan_decoder = msgspec.msgpack.Decoder(_PlanWire)


def encode_plan(plan: StepPlan) -> bytes:
    numbers = array("q", [plan.step_id])
    block_ids, token_ids = array("i"), array("i")
    for chunk in plan.chunks:
        numbers.extend((chunk.start, chunk.num_new_tokens, len(chunk.new_block_ids), len(chunk.new_token_ids)))
        block_ids.extend(chunk.new_block_ids)
        token_ids.extend(chunk.new_token_ids)
    new = [_NewRequestWire(r.request_id, _int32(r.token_ids).tobytes(), r.params, r.seed)
           for r in plan.new_requests]
    wire = _PlanWire(numbers.tobytes(), [c.request_id for c in plan.chunks], block_ids.tobytes(),
                     token_ids.tobytes(), new, list(plan.freed_ids))
    return _plan_encoder.encode(wire)


def decode_plan(data: bytes) -> StepPlan:
    wire = _plan_decoder.decode(data)
    numbers, block_ids, token_ids = array("q"), array("i"), array("i")
    numbers.frombytes(wire.numbers)
    block_ids.frombytes(wire.block_ids)
    token_ids.frombytes(wire.token_ids)
    chunks, next_block, next_token = [], 0, 0
    for i, request_id in enumerate(wire.request_ids):
        start, num_new, num_blocks, num_tokens = numbers[1 + i * _CHUNK_FIELDS: 1 + (i + 1) * _CHUNK_FIELDS]
        chunks.append(ScheduledChunk(request_id, start, num_new,
                                     tuple(block_ids[next_block:next_block + num_blocks]),
                                     tuple(token_ids[next_token:next_token + num_tokens])))
        next_block += num_blocks
        next_token += num_tokens
    new = []
    for r in wire.new_requests:
        prompt = array("i")
        prompt.frombytes(r.token_ids)
        new.append(NewRequest(r.request_id, prompt, r.params, r.seed))
    return StepPlan(numbers[0], tuple(new), tuple(chunks), tuple(wire.freed_ids))


def _int32(token_ids: array) -> array:
    return token_ids if token_ids.typecode == "i" else array("i", token_ids)


# -- worker -> engine --------------------------------------------------------------------------
@dataclass(frozen=True)
class WorkerReady:
    rank: int
    info: RuntimeInfo


@dataclass(frozen=True)
class WorkerError:
    rank: int
    summary: str
    """The exception's last line, e.g. "KeyError: 'req-3'"."""
    traceback: str


KIND_READY, KIND_RESULT, KIND_ERROR, KIND_HEARTBEAT = b"ready", b"result", b"error", b"beat"
KIND_STAGE_DONE = b"stage"
"""First frame of every worker -> engine message; the second is the msgpack body."""

TOPIC_PLAN, TOPIC_STOP = b"plan", b"stop"
"""First frame of every engine -> worker message."""

_encoder = msgspec.msgpack.Encoder()
DECODERS = {
    KIND_READY: msgspec.msgpack.Decoder(WorkerReady),
    KIND_RESULT: msgspec.msgpack.Decoder(StepResult),
    KIND_STAGE_DONE: msgspec.msgpack.Decoder(StageDone),
    KIND_ERROR: msgspec.msgpack.Decoder(WorkerError),
    KIND_HEARTBEAT: msgspec.msgpack.Decoder(int),
}


def encode(message: object) -> bytes:
    return _encoder.encode(message)
