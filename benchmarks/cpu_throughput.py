"""CPU throughput of the default model, mnemosyne against HF transformers in the same run:
decode tokens/s at batch 1 and prefill tokens/s for a 2K-token prompt (float32, same weights).

    python benchmarks/cpu_throughput.py [--decode-tokens 64] [--prefill-tokens 2048]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import transformers

from mnemosyne import LLM, SamplingParams


def ours(llm: LLM, prompt_ids: list[int], num_decode: int, num_prefill: int) -> tuple[float, float]:
    [out] = llm.generate([prompt_ids[:16]], SamplingParams(max_tokens=num_decode, ignore_eos=True), use_tqdm=False)
    decode_tps = 1.0 / statistics.median(out.metrics.inter_token_s)
    start = time.perf_counter()
    llm.generate([prompt_ids[:num_prefill]], SamplingParams(max_tokens=1), use_tqdm=False)
    return decode_tps, num_prefill / (time.perf_counter() - start)


@torch.inference_mode()
def hf(model, prompt_ids: list[int], num_decode: int, num_prefill: int) -> tuple[float, float]:
    out = model(torch.tensor([prompt_ids[:16]]), use_cache=True)
    cache, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    gaps = []
    for _ in range(num_decode - 1):
        start = time.perf_counter()
        out = model(token, past_key_values=cache, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        gaps.append(time.perf_counter() - start)
    start = time.perf_counter()
    model(torch.tensor([prompt_ids[:num_prefill]]), use_cache=True)
    return 1.0 / statistics.median(gaps), num_prefill / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--prefill-tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("MNEMOSYNE_QUIET", "1")
    llm = LLM(device="cpu", dtype="float32", max_num_batched_tokens=args.prefill_tokens)
    gguf = llm.engine.config.model
    from mnemosyne.models.loaders import resolve_model

    loader = resolve_model(gguf)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        loader.path.parent, gguf_file=loader.path.name, dtype=torch.float32).eval()
    text = " ".join(f"The number {i} comes after {i - 1}." for i in range(1, 400))
    prompt_ids = llm.tokenizer.encode(text, add_special_tokens=False)[: args.prefill_tokens]
    assert len(prompt_ids) == args.prefill_tokens
    rows = {"mnemosyne": [], "hf transformers": []}
    for _ in range(args.repeats):  # alternate, so a busy machine slows both alike
        rows["mnemosyne"].append(ours(llm, prompt_ids, args.decode_tokens, args.prefill_tokens))
        rows["hf transformers"].append(hf(model, prompt_ids, args.decode_tokens, args.prefill_tokens))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, SmolLM2-135M (Q4_1 dequantised)")
    print(f"{'engine':<16} {'decode tok/s (batch 1)':>24} {f'prefill tok/s ({args.prefill_tokens})':>22}")
    for name, results in rows.items():
        best_decode = max(r[0] for r in results)
        best_prefill = max(r[1] for r in results)
        print(f"{name:<16} {best_decode:>24.1f} {best_prefill:>22.1f}")


if __name__ == "__main__":
    main()
