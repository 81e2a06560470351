"""RoPE against transformers' own implementation: inverse frequencies and attention factor from
`ROPE_INIT_FUNCTIONS` (relative 1e-7, i.e. float32-exact up to one rounding), and the rotation
against `apply_rotary_pos_emb` with cos/sin from `LlamaRotaryEmbedding` (1e-6 in float32)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from mnemosyne.config import RopeScaling
from mnemosyne.layers.rotary import RotaryEmbedding, rope_inv_freq


def _hf_config(head_dim: int, max_position: int, rope_parameters: dict[str, Any]) -> LlamaConfig:
    """transformers 5 takes rope settings (theta included) as one `rope_parameters` dict."""
    return LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=head_dim, max_position_embeddings=max_position,
                       rope_parameters=dict(rope_parameters))


# (head_dim, max_position_embeddings, rope_parameters)
CASES: dict[str, tuple[int, int, dict[str, Any]]] = {
    "default": (64, 4096, {"rope_type": "default", "rope_theta": 10000.0}),
    "default-llama3-theta": (128, 8192, {"rope_type": "default", "rope_theta": 500000.0}),
    "linear": (64, 8192, {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}),
    "linear-fractional": (32, 4096, {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.5}),
    "llama3.1": (128, 131072, {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 8192}),
    "llama3.2-small": (64, 131072, {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 8192}),
    "llama3-short-context": (32, 8192, {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0,
                                        "low_freq_factor": 2.0, "high_freq_factor": 8.0,
                                        "original_max_position_embeddings": 1024}),
    "yarn": (64, 131072, {"rope_type": "yarn", "rope_theta": 1000000.0, "factor": 4.0,
                          "original_max_position_embeddings": 32768}),
    "yarn-betas": (32, 16384, {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                               "original_max_position_embeddings": 4096, "beta_fast": 16.0,
                               "beta_slow": 2.0}),
    "yarn-attention-factor": (64, 8192, {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0,
                                         "original_max_position_embeddings": 4096,
                                         "attention_factor": 1.25}),
    "yarn-deepseek-mscale": (64, 163840, {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0,
                                          "original_max_position_embeddings": 4096, "mscale": 1.0,
                                          "mscale_all_dim": 0.5, "beta_fast": 32.0, "beta_slow": 1.0}),
    "yarn-mscale-alone": (64, 16384, {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                      "original_max_position_embeddings": 4096, "mscale": 0.707}),
    "yarn-factor-one": (64, 4096, {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 1.0,
                                   "original_max_position_embeddings": 4096}),
}


def _hf_inv_freq(head_dim: int, max_position: int, params: dict[str, Any]) -> tuple[torch.Tensor, float]:
    config = _hf_config(head_dim, max_position, params)
    if params["rope_type"] == "default":
        return LlamaRotaryEmbedding.compute_default_rope_parameters(config)
    return ROPE_INIT_FUNCTIONS[params["rope_type"]](config)


def _ours(head_dim: int, max_position: int, params: dict[str, Any]) -> RotaryEmbedding:
    return RotaryEmbedding(head_dim, params["rope_theta"], RopeScaling.from_hf(params), max_position)


@pytest.mark.parametrize("name", list(CASES))
def test_inv_freq_and_attention_factor_match_transformers(name: str) -> None:
    head_dim, max_position, params = CASES[name]
    want_inv_freq, want_factor = _hf_inv_freq(head_dim, max_position, params)
    inv_freq, factor = rope_inv_freq(head_dim, params["rope_theta"], RopeScaling.from_hf(params), max_position)
    assert inv_freq.shape == (head_dim // 2,) and inv_freq.dtype == torch.float32
    torch.testing.assert_close(inv_freq, want_inv_freq.float(), rtol=1e-7, atol=0)
    assert factor == pytest.approx(want_factor, rel=1e-12)


def test_the_cases_exercise_what_they_claim() -> None:
    # Guard the table above: llama3 must cover all three bands and yarn a real attention factor.
    head_dim, max_position, params = CASES["llama3.1"]
    inv_freq, _ = rope_inv_freq(head_dim, params["rope_theta"], RopeScaling.from_hf(params), max_position)
    base = 1.0 / params["rope_theta"] ** (torch.arange(0, head_dim, 2).float() / head_dim)
    ratio = base / inv_freq
    assert (ratio == 1).any() and (ratio == 8).any() and ((ratio > 1.01) & (ratio < 7.99)).any()
    for name in ("yarn", "yarn-deepseek-mscale"):
        head_dim, max_position, params = CASES[name]
        _, factor = rope_inv_freq(head_dim, params["rope_theta"], RopeScaling.from_hf(params), max_position)
        assert factor != 1.0


@pytest.mark.parametrize(("factor", "original"), [(2.0, 2048), (4.0, 4096), (1.5, 1000)])
def test_dynamic_ntk_is_transformers_dynamic_at_the_extended_length(factor: float, original: int) -> None:
    # The engine fixes the NTK base for original × factor positions (documented in rotary.py);
    # transformers recomputes it as the sequence grows, and agrees at that length.
    head_dim, theta = 64, 10000.0
    params = {"rope_type": "dynamic", "rope_theta": theta, "factor": factor}
    config = _hf_config(head_dim, original, params)  # transformers reads the trained length here
    want, want_factor = ROPE_INIT_FUNCTIONS["dynamic"](config, seq_len=int(original * factor))
    ours = rope_inv_freq(head_dim, theta, RopeScaling.from_hf(params), max_position=original)
    explicit = rope_inv_freq(head_dim, theta, RopeScaling.from_hf(
        {**params, "original_max_position_embeddings": original}), max_position=int(original * factor))
    for inv_freq, attention_factor in (ours, explicit):
        torch.testing.assert_close(inv_freq, want.float(), rtol=1e-7, atol=0)
        assert attention_factor == want_factor == 1.0
    at_trained_length, _ = ROPE_INIT_FUNCTIONS["dynamic"](config, seq_len=original)
    assert not torch.allclose(ours[0], at_trained_length)  # the static choice really is the extended one


def _rotate_like_hf(name: str, positions: torch.Tensor, q: torch.Tensor,
                    k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    head_dim, max_position, params = CASES[name]
    hf_rope = LlamaRotaryEmbedding(_hf_config(head_dim, max_position, params))
    cos, sin = hf_rope(q, positions.unsqueeze(0))  # [1, T, D]
    # HF's layout is [batch, heads, tokens, head_dim]; ours is [tokens, heads, head_dim].
    q_hf, k_hf = apply_rotary_pos_emb(q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0), cos, sin)
    return q_hf[0].transpose(0, 1), k_hf[0].transpose(0, 1)


@pytest.mark.parametrize("name", ["default", "linear", "llama3.1", "yarn", "yarn-deepseek-mscale",
                                  "yarn-attention-factor"])
def test_forward_matches_transformers_apply_rotary_pos_emb(name: str) -> None:
    head_dim, max_position, params = CASES[name]
    gen = torch.Generator().manual_seed(0)
    # A flat batch: a prefill at 0..5, a decode far out, and a chunk near the end of the context.
    positions = torch.cat([torch.arange(6), torch.tensor([max_position // 2 + 3]),
                           torch.arange(max_position - 4, max_position)])
    q = torch.randn(len(positions), 8, head_dim, generator=gen)
    k = torch.randn(len(positions), 2, head_dim, generator=gen)
    q_out, k_out = _ours(head_dim, max_position, params)(positions, q, k)
    q_want, k_want = _rotate_like_hf(name, positions, q, k)
    assert q_out.shape == q.shape and k_out.shape == k.shape
    torch.testing.assert_close(q_out, q_want, atol=1e-6, rtol=0)
    torch.testing.assert_close(k_out, k_want, atol=1e-6, rtol=0)


def test_forward_bf16_matches_transformers() -> None:
    head_dim, max_position, _ = CASES["llama3.1"]
    gen = torch.Generator().manual_seed(1)
    positions = torch.tensor([0, 1, 2, 1000, 70000])
    q = torch.randn(5, 4, head_dim, generator=gen).bfloat16()
    k = torch.randn(5, 1, head_dim, generator=gen).bfloat16()
    q_out, k_out = _ours(head_dim, max_position, CASES["llama3.1"][2])(positions, q, k)
    q_want, k_want = _rotate_like_hf("llama3.1", positions, q, k)
    assert q_out.dtype == k_out.dtype == torch.bfloat16
    torch.testing.assert_close(q_out, q_want, atol=0, rtol=0)
    torch.testing.assert_close(k_out, k_want, atol=0, rtol=0)


def test_position_zero_is_identity_and_norms_are_kept() -> None:
    head_dim, max_position, params = CASES["default"]
    rope = _ours(head_dim, max_position, params)
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(3, 4, head_dim, generator=gen)
    k = torch.randn(3, 2, head_dim, generator=gen)
    q_out, k_out = rope(torch.tensor([0, 17, 4000]), q, k)
    assert torch.equal(q_out[0], q[0]) and torch.equal(k_out[0], k[0])
    torch.testing.assert_close(q_out.norm(dim=-1), q.norm(dim=-1), atol=1e-5, rtol=0)


def test_scores_depend_only_on_relative_position() -> None:
    head_dim, max_position, params = CASES["llama3.1"]
    rope = _ours(head_dim, max_position, params)
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, 1, head_dim, generator=gen)
    k = torch.randn(1, 1, head_dim, generator=gen)
    scores = []
    for offset in (0, 37, 5000):
        q_rot, _ = rope(torch.tensor([offset + 9]), q, q)
        _, k_rot = rope(torch.tensor([offset + 2]), k, k)
        scores.append(float((q_rot * k_rot).sum()))
    assert scores == pytest.approx([scores[0]] * 3, abs=1e-4)
