"""The exactness check every parallel layout's test makes against the single-process run."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mnemosyne.engine.outputs import CompletionOutput


def assert_same_outputs(reference: Sequence[CompletionOutput], parallel: Sequence[CompletionOutput],
                        num_new: int, compared: Sequence[bool] | None = None) -> None:
    """Every output has num_new tokens; those marked in `compared` (all, by default) have the
    reference's tokens exactly and its top logprobs within 1e-4."""
    compared = compared if compared is not None else [True] * len(reference)
    for ref, out, is_compared in zip(reference, parallel, compared, strict=True):
        assert len(out.token_ids) == num_new
        if not is_compared:
            continue
        assert out.token_ids == ref.token_ids
        for ref_lp, lp in zip(ref.logprobs or (), out.logprobs or (), strict=True):
            assert lp.top_token_ids == ref_lp.top_token_ids
            torch.testing.assert_close(torch.tensor(lp.top_logprobs), torch.tensor(ref_lp.top_logprobs),
                                       rtol=1e-4, atol=1e-4)
