"""Which kernel a prefill chunk goes to on the GPU, and what cuDNN's tiling makes it cost: pure
arithmetic, without triton, so that the step-time model (on any machine) predicts what the GPU
backend runs.

Measured on an H200 with serving's paths (`benchmarks/gpu_kernels.py --only routing`, call73: cuDNN
on its ragged path; 32 q heads, 8 kv heads, d=128), one chunk over a prefix, ms per layer:

- cuDNN runs one program per 128-row query tile per q head, so a chunk of 128 to 512 tokens costs the
  same (1.01-1.05 ms over 64K: 32-128 programs on 132 SMs, one wave); 640 and 768 tokens cost two
  waves (1.87), 1024 two (2.03), 1536 three (2.88). Over short prefixes it has a floor of about
  0.43 ms (its causal part, the prefix part and their merge: some dozen launches).
- The Triton chunk kernel splits the context across the SMs instead, and its time grows with chunk ×
  prefix: faster than cuDNN below about 6M token pairs (cuDNN was faster from 1536 tokens over 4K,
  1024 over 8K, 384 over 16K and 256 from 24K on; 224 tokens over 128K are a tie).

The rule below takes the faster path at every point of that grid but one: 768 tokens over 8K go to
cuDNN, 10% slower there than the Triton kernel.
"""

from __future__ import annotations

CUDNN_MIN_ROWS = 1024
"""Query rows per kv head (GQA group × chunk tokens: 256 tokens at group 4) below which a chunk within
the Triton split never goes to cuDNN: cuDNN's one wave of tiles costs the same from 128 to 512
tokens, and the Triton kernel was faster below 256 tokens at every prefix measured up to 128K."""
CUDNN_MIN_ROW_KEYS = 24 << 20
"""Query rows per kv head × prefix tokens from which a chunk within the Triton split goes to cuDNN
(about 6M token pairs at group 4): the measured crossover (call73). The rule before (256 tokens over
a prefix of 4K or more) sent chunks of 256-1024 tokens over 4-16K to cuDNN at up to 4.5x the
Triton kernel's time; in call71's serving step logs, steps with a chunk of 256-384 tokens over a
16-32K prefix ran at 1.5-2x their prediction."""
CUDNN_TILE_ROWS = 128
"""Query tokens per cuDNN program (one q head each)."""


def routes_to_triton(num_new: int, group: int, num_prefix: int, small_chunk_rows: int) -> bool:
    """Whether a chunk of num_new tokens over num_prefix cached ones goes to the Triton chunk kernel
    (under a split of small_chunk_rows query rows per kv head), rather than to cuDNN."""
    rows = group * num_new
    return rows <= small_chunk_rows and (rows < CUDNN_MIN_ROWS or rows * num_prefix < CUDNN_MIN_ROW_KEYS)


def cudnn_wave_tokens(num_q_heads: int, num_sms: int) -> int:
    """Chunk tokens whose tiles fill one wave of cuDNN programs on the device (512 for 32 q heads on
    132 SMs): a chunk pays for whole waves, so it costs what the next multiple of this costs."""
    return CUDNN_TILE_ROWS * max(1, num_sms // max(1, num_q_heads))


def cudnn_cost_tokens(num_new: int, num_q_heads: int, num_sms: int) -> int:
    """The chunk length, rounded up to whole waves of cuDNN tiles, whose time a cuDNN chunk of num_new
    tokens takes: 600 tokens cost what 1024 do on an H200 (call73: 1.87 ms against 1.05 for 512 over
    64K, 2.03 for 1024)."""
    wave = cudnn_wave_tokens(num_q_heads, num_sms)
    return -(-num_new // wave) * wave
