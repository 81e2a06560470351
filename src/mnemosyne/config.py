"""Frozen configuration: the model's architecture and the engine's user-facing settings.

Values discovered at run time (KV blocks that fit in memory, the resolved device) live in
`RuntimeInfo`, never written back into a config.
"""

from __future__ import annotations

import ast
import functools
import inspect
import itertools
import textwrap
from dataclasses import dataclass, field, fields
from typing import Any

ROPE_SCALING_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")

TBT_SLO_QUANTILE = 0.995
"""--tbt-slo-quantile's default: why, at scheduler/feedback.py's QUANTILE."""


@dataclass(frozen=True)
class RopeScaling:
    """Long-context RoPE extension, as in HF's `rope_scaling` dict."""

    rope_type: str = "default"
    """One of default, linear, dynamic, yarn, llama3."""
    factor: float = 1.0
    """Context extension factor."""
    original_max_position_embeddings: int | None = None
    """Trained context length (dynamic, yarn and llama3 need it)."""
    low_freq_factor: float = 1.0
    """llama3: wavelengths above original_len / low_freq_factor are scaled fully."""
    high_freq_factor: float = 4.0
    """llama3: wavelengths below original_len / high_freq_factor are left alone."""
    beta_fast: float = 32.0
    """yarn: rotations above which a dimension is left alone."""
    beta_slow: float = 1.0
    """yarn: rotations below which a dimension is interpolated fully."""
    mscale: float = 1.0
    """yarn: attention-temperature multiplier."""
    mscale_all_dim: float = 0.0
    """yarn: attention-temperature divisor exponent (DeepSeek style); 0 disables it."""
    attention_factor: float | None = None
    """yarn: explicit attention scaling; derived from factor when None."""

    def __post_init__(self) -> None:
        if self.rope_type not in ROPE_SCALING_TYPES:
            raise ValueError(f"rope_scaling type {self.rope_type!r} is not one of {ROPE_SCALING_TYPES}")
        if self.factor <= 0:
            raise ValueError(f"rope_scaling factor must be positive, got {self.factor}")

    @classmethod
    def from_hf(cls, d: dict[str, Any] | None) -> RopeScaling:
        """Build from an HF config's `rope_scaling` (or transformers 5 `rope_parameters`) dict."""
        if not d:
            return cls()
        rope_type = d.get("rope_type", d.get("type", "default"))
        known = {f.name for f in fields(cls)} - {"rope_type"}
        kwargs = {k: v for k, v in d.items() if k in known and v is not None}
        return cls(rope_type=rope_type, **kwargs)


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a Llama-family decoder (Llama 2/3/3.1, Mistral, Qwen2, SmolLM2)."""

    vocab_size: int
    """Rows of the embedding table."""
    hidden_size: int
    """Residual stream width."""
    intermediate_size: int
    """MLP inner width."""
    num_layers: int
    """Decoder layers."""
    num_heads: int
    """Query heads."""
    num_kv_heads: int
    """Key/value heads (GQA when fewer than num_heads)."""
    head_dim: int
    """Width of one head."""
    rms_norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    """Long-context RoPE extension."""
    max_position_embeddings: int = 4096
    """Trained (or extended) context length."""
    tie_word_embeddings: bool = False
    """Whether the LM head shares the embedding table."""
    attention_bias: bool = False
    """Bias on q/k/v projections (Qwen2)."""
    architecture: str = "llama"
    """Family name, for messages only."""
    bos_token_id: int | None = None
    """Beginning-of-sequence token."""
    eos_token_ids: tuple[int, ...] = ()
    """Tokens that end generation."""

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )

    @property
    def num_params_non_embedding(self) -> int:
        """Parameters outside the embedding and LM head; the P of the FLOP floor."""
        q = self.num_heads * self.head_dim
        kv = self.num_kv_heads * self.head_dim
        attn = self.hidden_size * (q + 2 * kv) + q * self.hidden_size
        mlp = 3 * self.hidden_size * self.intermediate_size
        return self.num_layers * (attn + mlp + 2 * self.hidden_size)

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> ModelConfig:
        """Build from the dict in an HF `config.json`."""
        num_heads = cfg["num_attention_heads"]
        hidden = cfg["hidden_size"]
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        rope = cfg.get("rope_scaling") or cfg.get("rope_parameters")
        theta = cfg.get("rope_theta") or (rope or {}).get("rope_theta") or 10000.0
        model_type = cfg.get("model_type", "llama")
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=hidden,
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
            head_dim=cfg.get("head_dim") or hidden // num_heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-5),
            rope_theta=float(theta),
            rope_scaling=RopeScaling.from_hf(rope),
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            attention_bias=cfg.get("attention_bias", model_type == "qwen2"),
            architecture=model_type,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )


LONE_TRITON_CHUNK_ROWS = 512
"""Query rows per kv head up to which a chunk goes to the Triton chunk kernel when steps carry one
prompt's chunks (no --tbt-slo-ms): 128 tokens at group 4, the measured crossover with cuDNN."""
SERVING_TRITON_CHUNK_ROWS = 8192
"""The same under a --tbt-slo-ms, where steps are bound by launches: 2048 tokens at group 4."""

PIPELINE_MIN_CHUNK = 1024
"""Adaptive chunking under sequence pipelining, without a TBT SLO, cuts a long prompt into chunks of
powers of two from this up to the token cap:
cuDNN needs a plan per chunk length, 40-100 ms each to build on an H200, which the worker builds for
these few lengths at start-up (`EngineConfig.long_prompt_chunks`), not once per chunk mid-prefill."""


def tapers_long_prompts(spp_stages: int, has_tbt_slo: bool) -> bool:
    """Whether adaptive chunking cuts a long prompt into the pipeline's power-of-two taper: under
    sequence pipelining over more than one stage, with no TBT budget to size chunks by. The chunking
    policy and the worker's start-up plans both ask this, so they cannot disagree."""
    return spp_stages > 1 and not has_tbt_slo


def default_pipeline_depth(pp: int) -> int:
    """Micro-batches in flight at most through pp stages, by default: one per stage (the engine and the
    planner both ask this). Two per stage let stage 0 run ahead of the later stages while they finish
    longer chunks, which call58's trace suggested; on the device it made no difference (a 1M prefill at
    pp=4: 131.7 s with 8 in flight, 131.5 s with 4, call68)."""
    return pp


def taper_chunk(num_tokens: int) -> int:
    """The taper's chunk for a chunk of num_tokens fitting the stage target: the largest power of two
    within it, but at least PIPELINE_MIN_CHUNK."""
    return max(PIPELINE_MIN_CHUNK, 1 << (num_tokens.bit_length() - 1))


@dataclass(frozen=True)
class EngineConfig:
    """Everything a user chooses about one engine instance. Validated here, never mutated."""

    model: str = "smollm2-135m"
    """Model: smollm2-135m, an HF folder, a .gguf file, or dummy:<preset>."""
    dtype: str = "auto"
    """Weights and activations: auto (bf16 on GPU, float32 on CPU), float32, bfloat16, float16."""
    device: str = "auto"
    """auto, cpu or cuda."""
    max_model_len: int | None = None
    """Longest prompt plus output, in tokens; defaults to the model's trained length."""
    tensor_parallel_size: int = 1
    """TP ranks per pipeline stage."""
    pipeline_parallel_size: int = 1
    """Pipeline stages (sequence pipeline parallelism)."""
    pp_layer_split: str | None = None
    """Layers per pipeline stage, comma-separated in stage order (e.g. 10,12,10); default: an even split."""
    sequence_pipelining: bool = True
    """Let a prompt's next chunk enter stage 0 as soon as its previous chunk left it (SPP); off: ordinary
    pipeline parallelism, where the next chunk waits for the last stage."""
    pipeline_depth: int | None = None
    """Most micro-batches in flight through the pipeline stages; default: pp, one per stage. More let stage
    0 run ahead while later stages finish a long prompt's longer chunks (at 1M tokens and pp=4, 2 × pp
    made no difference: 131.7 s against 131.5 s on the same four H200s)."""
    tp_reduce_float32: bool = True
    """With tp > 1 in bf16/fp16, sum row-parallel partial sums in float32 and round once, as one device
    does (off: all-reduce in the model dtype: fewer bytes, each partial sum rounded too)."""
    pp_scatter_gather: bool = False
    """With tp > 1, send 1/tp of each stage's activations from each tp rank, all-gathered on arrival."""
    kv_parallel_size: int = 1
    """KV-parallel groups, each a full replica of the model."""
    kvp_group_max_tokens: int | None = None
    """Most tokens of one request held in one KVP group; defaults to a group's KV capacity."""
    block_size: int = 16
    """Tokens per KV-cache block."""
    kv_cache_memory: float | None = None
    """KV-cache size in GiB per device; defaults to a fraction of free memory."""
    kv_cache_memory_fraction: float = 0.9
    """Fraction of the memory left after weights and activations given to the KV cache."""
    enable_prefix_caching: bool = True
    """Reuse the KV of full blocks whose tokens, from position 0, match an earlier request's (exact: the
    same KV, not recomputed); --no-enable-prefix-caching recomputes every prompt."""
    max_num_batched_tokens: int = 2048
    """Token budget of one engine step (prefill chunks plus decodes)."""
    max_num_seqs: int = 256
    """Most requests in one step."""
    seed: int = 0
    """Seed for dummy weights and for requests that bring no seed of their own."""
    trace_file: str | None = None
    """Write a Chrome-trace JSON (Perfetto, chrome://tracing) here: each micro-batch on each (kvp, stage)."""
    step_log: str | None = None
    """Write one JSON line per step here, as the engine core landed it: its chunks and decodes, predicted
    and measured time, and the step budget's correction (engine/step_log.py). Times nothing extra."""
    async_scheduling: bool = True
    """With one pipeline stage, plan each decode-only step while the previous one runs; the workers take
    its tokens from that step's samples on the device, so the GPU never waits for the host between
    decode steps."""
    async_prefill: bool | None = None
    """With --async-scheduling and a step-time model: plan steps with prefill work ahead too, each
    --ahead-lead-ms before the step in flight is expected to end, so that the GPU does not wait for the
    host between them and a request that arrives meanwhile still joins the next step. Off, such steps are
    planned once the previous one lands. By default on with one device and off with several: kvp=4
    serving with it took twice as long over its long prompts as the same server without (call77-78)."""
    ahead_lead_ms: float = 3.0
    """How long before the step in flight is expected to end (its predicted time × the median measured /
    predicted ratio of recent steps) the next one is planned and queued, under --async-prefill: the host's
    time to plan and launch a step, with a margin. A request that arrives within it waits one more step."""
    warm_up: bool = True
    """GPU: before the first request, run one prompt of --max-num-batched-tokens random tokens through the
    engine, its step times kept from the TBT feedback: a process's first prefill steps pay one-time costs
    (kernels loaded, memory claimed), which otherwise land in a served request's steps."""
    enforce_eager: bool = False
    """Run every step eagerly instead of replaying CUDA graphs (GPU only)."""
    layer_graph_tokens: int | None = None
    """Steps with prompt chunks, of up to this many tokens in all (and at most --max-num-batched-tokens),
    replay each layer's work outside attention from CUDA graphs captured per multiple of 128 tokens,
    and launch only attention eagerly: eagerly, such steps are bound by the host's launches (GPU, one
    device per model replica: tp = pp = 1). 0: run them eagerly. Default: 2048 with one device, 0 with
    several: kvp=4 serving with them stalled 150-300 ms at the same points of every long prompt, in
    three runs of three, and not without them (call91-93; cause not found)."""
    attention_backend: str = "auto"
    """auto, reference, sdpa (torch's fused kernels) or gpu (Triton paged decode + cuDNN chunks)."""
    cudnn_ragged: bool | None = None
    """GPU backend: let cuDNN attention key its plans on lengths rounded up to powers of two (PyTorch's
    TORCH_CUDNN_SDPA_AVOID_RECOMPILE) instead of building a plan, about 45 ms of host time on an H200,
    for every new chunk and prefix length. Its kernels run 13-22% slower (benchmarks/cudnn_replan.py).
    Default: on with a --tbt-slo-ms, where a 45 ms stall would break the SLO of every decode batched
    with a long prompt's chunk; off otherwise (a plan per 16K chunk is under 4% of its time)."""
    triton_chunk_rows: int | None = None
    """GPU backend: chunks of at most this many query rows per kv head (GQA group × chunk tokens) go to
    the Triton paged chunk kernel, all of a step's in one launch a layer; longer ones to cuDNN, a call
    per prefix run. Default: 8192 (2048 tokens at group 4) with a --tbt-slo-ms, where steps mix decodes
    with several prefills and are bound by launches: on an H200, LARS TBT p50/p99 of 64/229 ms became
    38/93 ms (benchmarks/RESULTS.md); 512 otherwise, where cuDNN runs a lone prompt's chunks of 256
    tokens or more faster (benchmarks/gpu_kernels.py --only short). Whatever the split, chunks of 256
    tokens or more over a long enough prefix (chunk × prefix of about 6M token pairs at group 4) stay
    on cuDNN, where they measured faster (attention/routing.py)."""
    triton_gemv: bool = True
    """GPU: the linears of one-token steps (batch-1 decode) run layers/triton_gemv.py instead of cuBLAS
    (faster at every Llama-3-8B projection and tp shard on an H200; 128K decode 9.0 -> 8.7 ms)."""
    fused_swiglu: bool = True
    """GPU with TMA (H100, H200): steps of many tokens compute the MLP's gate/up GEMM with SiLU × up in its
    epilogue (layers/triton_swiglu.py), instead of cuBLAS writing both halves for a second kernel to read
    (at 32K tokens on an H100, 11.2 ms against 11.9-12.3 ms a layer); the gate/up weight is then laid out
    for it."""
    scheduler: str = "lars"
    """Scheduling policy: lars (length-aware relative slack), lrs (least slack), edf (earliest deadline) or fcfs."""
    chunking: str = "adaptive"
    """adaptive (largest chunks whose predicted step time fits --tbt-slo-ms; without it, under SPP,
    chunks cut for the pipeline's drain, else the token cap; `pipeline` is the same) or fixed:N (N
    tokens a step)."""
    tbt_slo_ms: float | None = None
    """Time-between-tokens SLO, the step-time budget of adaptive chunking; None: only the token budget."""
    tbt_slo_quantile: float = TBT_SLO_QUANTILE
    """Share of the steps that --tbt-slo-ms limits which are meant to fit it: adaptive chunking divides the
    budget by this quantile of recent steps' measured / predicted time."""
    ttft_slo_ms: float | None = None
    """Time-to-first-token SLO; a request's deadline is the larger of it and --deadline-work-factor × its work."""
    deadline_work_factor: float = 3.0
    """A request's TTFT deadline is at least this many times its predicted prefill time."""
    rho_max: float = 0.9
    """Largest share of a step's budget a prefill with slack yields to shorter work (budget yielding)."""
    live_yield: float = 0.3
    """Under --tbt-slo-ms: share of the budget left that a long prompt's chunk (a prefill of more than 8
    budgets) leaves unused in a step that holds other requests' work, whether or not any wait, so that a
    request arriving while it runs waits less for its first step; 0: such steps fill the budget. On one
    H200 serving chat beside 144-162K-token prompts (benchmarks/RESULTS.md, call105-108), 0.3 kept short
    requests' p99 TTFT at 1.59-1.82x solo and p99 TBT at 43.8-45.7 ms in seven runs, against 1.84x twice
    and 48.7-50.0 ms without it, with the long prompts as fast (43-49 s against 46-48 s)."""
    latency_profile: str | None = None
    """Step-time profile written by `mnemosyne profile`; None: a roofline of --roofline-device."""
    roofline_device: str = "auto"
    """Device of the roofline step-time model without a profile: auto, h100, h200 or cpu."""

    def __post_init__(self) -> None:
        _positive(self, "tensor_parallel_size", "pipeline_parallel_size", "kv_parallel_size",
                  "block_size", "max_num_batched_tokens", "max_num_seqs")
        if self.triton_chunk_rows is not None and self.triton_chunk_rows < 0:
            raise ValueError(f"--triton-chunk-rows must be 0 or more, got {self.triton_chunk_rows}")
        if self.layer_graph_tokens is not None and self.layer_graph_tokens < 0:
            raise ValueError(f"--layer-graph-tokens must be 0 or more, got {self.layer_graph_tokens}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"--dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"--device must be auto, cpu or cuda, got {self.device!r}")
        if self.max_model_len is not None and self.max_model_len <= 0:
            raise ValueError(f"--max-model-len must be positive, got {self.max_model_len}")
        if self.kvp_group_max_tokens is not None and self.kvp_group_max_tokens <= 0:
            raise ValueError(f"--kvp-group-max-tokens must be positive, got {self.kvp_group_max_tokens}")
        if self.kvp_group_max_tokens is not None and self.kvp_group_max_tokens % self.block_size:
            raise ValueError(f"--kvp-group-max-tokens ({self.kvp_group_max_tokens}) must be a multiple of "
                             f"--block-size ({self.block_size})")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ValueError(f"--kv-cache-memory must be positive GiB, got {self.kv_cache_memory}")
        if not 0 < self.kv_cache_memory_fraction <= 1:
            raise ValueError("--kv-cache-memory-fraction must be in (0, 1]")
        if self.attention_backend not in ("auto", "reference", "sdpa", "gpu"):
            raise ValueError(
                f"--attention-backend must be auto, reference, sdpa or gpu, got {self.attention_backend!r}")
        if self.ahead_lead_ms < 0:
            raise ValueError(f"--ahead-lead-ms must be 0 or more, got {self.ahead_lead_ms}")
        if self.pipeline_depth is not None and self.pipeline_depth < self.pipeline_parallel_size:
            raise ValueError(f"--pipeline-depth must be at least the stage count ({self.pipeline_parallel_size}), "
                             f"got {self.pipeline_depth}")
        if self.pipeline_depth not in (None, 1) and self.pipeline_parallel_size == 1:
            raise ValueError("--pipeline-depth needs more than one pipeline stage (one stage plans a step ahead "
                             "with --async-scheduling)")
        _check_scheduling(self)
        _parse_layer_split(self.pp_layer_split, self.pipeline_parallel_size)

    @property
    def uses_cudnn_ragged(self) -> bool:
        return self.tbt_slo_ms is not None if self.cudnn_ragged is None else self.cudnn_ragged

    @property
    def chunk_rows_to_triton(self) -> int:
        if self.triton_chunk_rows is not None:
            return self.triton_chunk_rows
        return SERVING_TRITON_CHUNK_ROWS if self.tbt_slo_ms is not None else LONE_TRITON_CHUNK_ROWS

    @property
    def long_prompt_chunks(self) -> tuple[int, ...]:
        """The chunk lengths a lone long prompt's prefill is cut into, for which the worker builds
        cuDNN's plans at start-up: the token cap, or under adaptive chunking with sequence pipelining
        and no TBT SLO, its powers of two from PIPELINE_MIN_CHUNK (see chunking.py)."""
        cap = self.max_num_batched_tokens
        if self.chunking in ("adaptive", "pipeline") and tapers_long_prompts(self.spp_stages,
                                                                             self.tbt_slo_ms is not None):
            # every taper_chunk of a chunk within the cap
            return tuple(1 << i for i in range(PIPELINE_MIN_CHUNK.bit_length() - 1, cap.bit_length()))
        return (cap,)

    @property
    def max_micro_batches(self) -> int:
        """--pipeline-depth, or its default (`default_pipeline_depth`)."""
        return self.pipeline_depth or default_pipeline_depth(self.pipeline_parallel_size)

    @property
    def spp_stages(self) -> int:
        """Stages a prompt's chunks pipeline through: pp under sequence pipelining, else 1."""
        return self.pipeline_parallel_size if self.sequence_pipelining else 1

    @property
    def world_size(self) -> int:
        return self.kv_parallel_size * self.pipeline_parallel_size * self.tensor_parallel_size

    @property
    def layer_graph_limit(self) -> int:
        """Most tokens of a step that replays layer graphs (`--layer-graph-tokens` resolved; 0: none)."""
        tokens = self.layer_graph_tokens if self.layer_graph_tokens is not None else (
            2048 if self.world_size == 1 else 0)
        return min(tokens, self.max_num_batched_tokens)

    @property
    def layer_split(self) -> tuple[int, ...] | None:
        """--pp-layer-split as layer counts per stage; None: an even split."""
        return _parse_layer_split(self.pp_layer_split, self.pipeline_parallel_size)


def _parse_layer_split(text: str | None, pp_size: int) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        split = tuple(int(n) for n in text.split(","))
    except ValueError:
        split = ()
    if len(split) != pp_size or min(split) <= 0:
        raise ValueError(f"--pp-layer-split must be {pp_size} positive layer counts separated by commas "
                         f"(one per stage), got {text!r}")
    return split


def _check_scheduling(cfg: EngineConfig) -> None:
    from mnemosyne.scheduler.chunking import parse_chunking
    from mnemosyne.scheduler.latency_model import DEVICES
    from mnemosyne.scheduler.policy import check_policy

    check_policy(cfg.scheduler)
    parse_chunking(cfg.chunking)
    for name in ("tbt_slo_ms", "ttft_slo_ms"):
        value = getattr(cfg, name)
        if value is not None and value <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if cfg.deadline_work_factor < 1:
        raise ValueError(f"--deadline-work-factor must be at least 1, got {cfg.deadline_work_factor}")
    if not 0.5 <= cfg.tbt_slo_quantile < 1:
        raise ValueError(f"--tbt-slo-quantile must be in [0.5, 1), got {cfg.tbt_slo_quantile}")
    if not 0 <= cfg.rho_max < 1:
        raise ValueError(f"--rho-max must be in [0, 1), got {cfg.rho_max}")
    if not 0 <= cfg.live_yield < 1:
        raise ValueError(f"--live-yield must be in [0, 1), got {cfg.live_yield}")
    if cfg.roofline_device != "auto" and cfg.roofline_device not in DEVICES:
        raise ValueError(f"--roofline-device must be auto or one of {sorted(DEVICES)}, got {cfg.roofline_device!r}")


def _positive(cfg: Any, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each dataclass field, for generated CLI help."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in itertools.pairwise(body):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)):
            docs[node.target.id] = str(nxt.value.value).strip()
    return docs
