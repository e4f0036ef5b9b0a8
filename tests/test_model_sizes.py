"""Every supported family at its real size, without weights: our Transformer and transformers'
AutoModelForCausalLM are built on the meta device from the same published config.json values
(copied here), and must hold the same tensors under the same checkpoint names and shapes."""

import pytest
import torch
import transformers

from model import ModelConfig, Transformer

LLAMA31_ROPE = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192, "rope_type": "llama3"}
CONFIGS = {  # the architecture fields of each model's config.json
    "Qwen2.5-7B": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=3584,
                       intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                       vocab_size=152064, max_position_embeddings=131072, rope_theta=1000000.0, rms_norm_eps=1e-06,
                       tie_word_embeddings=False, sliding_window=131072, use_sliding_window=False,
                       max_window_layers=28, hidden_act="silu"),
    "Qwen3-8B": dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", hidden_size=4096, intermediate_size=12288,
                     num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                     vocab_size=151936, max_position_embeddings=40960, rope_theta=1000000, rms_norm_eps=1e-06,
                     tie_word_embeddings=False, attention_bias=False, hidden_act="silu"),
    "Llama-3.1-8B": dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=4096,
                         intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                         head_dim=128, vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0,
                         rope_scaling=LLAMA31_ROPE, rms_norm_eps=1e-05, tie_word_embeddings=False,
                         attention_bias=False, mlp_bias=False, hidden_act="silu"),
    "Llama-3.2-1B": dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=2048,
                         intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                         head_dim=64, vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0,
                         rope_scaling=dict(LLAMA31_ROPE, factor=32.0), rms_norm_eps=1e-05, tie_word_embeddings=True,
                         attention_bias=False, mlp_bias=False, hidden_act="silu"),
    "Mistral-7B-v0.1": dict(architectures=["MistralForCausalLM"], model_type="mistral", hidden_size=4096,
                            intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                            num_key_value_heads=8, vocab_size=32000, max_position_embeddings=32768,
                            rope_theta=10000.0, sliding_window=4096, rms_norm_eps=1e-05, tie_word_embeddings=False,
                            hidden_act="silu"),
    "SmolLM2-135M": dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=576,
                         intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         head_dim=64, vocab_size=49152, max_position_embeddings=8192, rope_theta=100000,
                         rms_norm_eps=1e-05, tie_word_embeddings=True, hidden_act="silu"),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_real_size_tensors_match_transformers(name):
    cfg = CONFIGS[name]
    hf_config = transformers.AutoConfig.for_model(**{k: v for k, v in cfg.items() if k != "architectures"})
    with torch.device("meta"):
        ours = Transformer(ModelConfig.from_hf(cfg))
        hf = transformers.AutoModelForCausalLM.from_config(hf_config)
    assert type(hf).__name__ == cfg["architectures"][0]
    ours_shapes = {Transformer.hf_name(n): tuple(p.shape) for n, p in ours.named_parameters()}
    hf_shapes = {n: tuple(p.shape) for n, p in hf.named_parameters()}  # a tied lm_head is listed once
    assert ours_shapes == hf_shapes
