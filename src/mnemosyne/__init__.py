"""mnemosyne: exact long-context LLM inference. The public API is `LLM` and `SamplingParams`."""

from mnemosyne.request import SamplingParams

__all__ = ["LLM", "SamplingParams"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # LLM pulls in torch and the model stack; keep `import mnemosyne` cheap for the CLI and server.
    if name == "LLM":
        from mnemosyne.engine.llm import LLM

        return LLM
    raise AttributeError(f"module 'mnemosyne' has no attribute {name!r}")
