"""HF checkpoint loader: a folder with config.json and safetensors (one file, or shards with an index)."""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from mnemosyne.config import ModelConfig
from mnemosyne.models.loaders import ModelLoadError, check_weight_shapes

MODEL_TYPES = ("llama", "mistral", "qwen2")
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


@dataclasses.dataclass(frozen=True)
class _TensorEntry:
    shard: Path
    shape: tuple[int, ...]


class HFLoader:
    """An HF model folder; the config, the tensor manifest and the tokenizer are read once and cached."""

    def __init__(self, folder: Path, name: str | None = None) -> None:
        self.folder = folder
        self.name = name or str(folder)

    def __reduce__(self) -> tuple[type, tuple[Path, str]]:
        # Cross processes as the path only; each process re-reads the (small) headers.
        return HFLoader, (self.folder, self.name)

    def load_config(self) -> ModelConfig:
        return self._config

    def iter_weights(
        self, device: torch.device, dtype: torch.dtype, names: Collection[str] | None = None,
        lazy: bool = False,
    ) -> Iterator[tuple[str, torch.Tensor | _Slices]]:
        config = self.load_config()  # validates the manifest against the config before anything is yielded
        by_shard: dict[Path, list[str]] = {}
        for name, entry in self._manifest.items():
            if config.tie_word_embeddings and name == "lm_head.weight":
                continue
            if names is None or name in names:
                by_shard.setdefault(entry.shard, []).append(name)
        for shard, shard_names in by_shard.items():  # each shard opened once
            with _open_safetensors(shard) as f:
                for name in shard_names:
                    if lazy:
                        yield name, _Slices(f, shard, name, device, dtype)
                        continue
                    try:
                        tensor = f.get_tensor(name)
                    except Exception as e:
                        raise ModelLoadError(f"{shard}: cannot read tensor {name}: {e}") from e
                    yield name, tensor.to(device=device, dtype=dtype)

    def load_tokenizer(self) -> Any:
        return self._tokenizer

    @functools.cached_property
    def _config(self) -> ModelConfig:
        path = self.folder / "config.json"
        try:
            hf_config = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"{path}: not a readable JSON config: {e}") from e
        model_type = hf_config.get("model_type")
        if model_type not in MODEL_TYPES:
            raise ModelLoadError(f"{path}: model_type {model_type!r} is not supported (supported: {MODEL_TYPES})")
        try:
            config = ModelConfig.from_hf(hf_config)
        except KeyError as e:
            raise ModelLoadError(f"{path}: required field {e} is missing") from e
        except (TypeError, ValueError) as e:
            raise ModelLoadError(f"{path}: inconsistent config: {e}") from e
        window = _sliding_window(hf_config)
        if window is not None and window < config.max_position_embeddings:
            # We attend to the full context; within the window that is exactly what sliding attention computes,
            # so cap the usable length there instead of silently diverging beyond it.
            config = dataclasses.replace(config, max_position_embeddings=window)
        shapes = {name: entry.shape for name, entry in self._manifest.items()}
        if config.tie_word_embeddings:
            shapes.pop("lm_head.weight", None)  # some tied checkpoints still store a copy of the embeddings
        check_weight_shapes(str(self.folder), config, shapes)
        return config

    @functools.cached_property
    def _manifest(self) -> dict[str, _TensorEntry]:
        """HF name -> where the tensor lives and its shape, from the safetensors headers only."""
        index = self.folder / INDEX_FILE
        if index.is_file():
            try:
                weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise ModelLoadError(f"{index}: not a readable safetensors index: {e}") from e
            shards = sorted({self.folder / shard for shard in weight_map.values()})
        else:
            weight_map = {}
            shards = sorted(self.folder.glob("*.safetensors"))
        if not shards:
            others = sorted(p.name for p in self.folder.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
            hint = f" (found {others[:3]}; only safetensors is supported)" if others else ""
            raise ModelLoadError(f"{self.folder}: no *.safetensors weights{hint}")
        manifest: dict[str, _TensorEntry] = {}
        for shard in shards:
            with _open_safetensors(shard) as f:
                for key in f.keys():  # noqa: SIM118 (safe_open handles are not iterable)
                    if key.endswith("rotary_emb.inv_freq"):  # a buffer older checkpoints saved; recomputed
                        continue
                    manifest[key] = _TensorEntry(shard, tuple(f.get_slice(key).get_shape()))
        for key, shard_name in weight_map.items():
            if key in manifest and manifest[key].shard.name != shard_name:
                raise ModelLoadError(f"{index}: says {key} is in {shard_name}, found in {manifest[key].shard.name}")
            if key not in manifest and not key.endswith("rotary_emb.inv_freq"):
                raise ModelLoadError(f"{index}: lists {key} in {shard_name}, which does not contain it")
        return manifest

    @functools.cached_property
    def _tokenizer(self) -> Any:
        if not any((self.folder / f).is_file() for f in TOKENIZER_FILES):
            return None
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(str(self.folder))
        except Exception as e:
            raise ModelLoadError(f"{self.folder}: cannot load its tokenizer: {e}") from e


class _Slices:
    """One safetensors tensor, read a slice at a time (`TensorSlices`): a tensor-parallel rank reads
    its rows or columns only, and only those reach its device."""

    def __init__(self, handle: Any, shard: Path, name: str, device: torch.device, dtype: torch.dtype):
        self._part = handle.get_slice(name)
        self._where = f"{shard}: cannot read tensor {name}"
        self._device, self._dtype = device, dtype
        self.shape = torch.Size(self._part.get_shape())

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        return self[(slice(None),) * dim + (slice(start, start + length),)]

    def __getitem__(self, index: Any) -> torch.Tensor:
        try:
            return self._part[index].to(device=self._device, dtype=self._dtype)
        except Exception as e:
            raise ModelLoadError(f"{self._where}: {e}") from e


def _sliding_window(hf_config: dict[str, Any]) -> int | None:
    """The attention window this checkpoint was trained with, or None for full attention."""
    window = hf_config.get("sliding_window")
    if hf_config.get("model_type") == "qwen2" and not hf_config.get("use_sliding_window", False):
        return None
    return int(window) if window else None


def _open_safetensors(path: Path) -> Any:
    if not path.is_file():
        raise ModelLoadError(f"safetensors file {path} does not exist")
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as e:  # SafetensorError: truncated file, bad header
        raise ModelLoadError(f"{path}: not a readable safetensors file (truncated or corrupt): {e}") from e
