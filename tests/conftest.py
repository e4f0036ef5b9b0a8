"""Shared fixtures: a tiny random chat model with a real (small) byte-level BPE tokenizer.

`tiny_model_dir` is a complete HF-style directory — config.json, model.safetensors,
tokenizer.json, tokenizer_config.json with a ChatML template — so every command-line entry
point (train.py, hinted_decode.py, eval.py, ddt.py) can run end to end in seconds.
"""

import json

import pytest
import torch

CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a tiny test model.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

CORPUS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "How many clips did Natalia sell altogether in April and May? Give the result as your final answer.",
    "She sold 48 / 2 = 24 clips in May. Altogether she sold 48 + 24 = 72 clips.\n#### 72",
    "The answer is 42. Let's think step by step: first, add the numbers; then multiply.",
    "What is the capital of France? The capital of France is Paris.",
]


def write_tiny_tokenizer(out_dir, vocab_size=384):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 20, trainer)
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": CHATML, "eos_token": "<|im_end|>", "bos_token": "<|im_start|>",
        "pad_token": "<|endoftext|>", "model_max_length": 2048}))
    return tok.get_vocab_size()


def write_tiny_model(out_dir, vocab_size, seed=0, **overrides):
    from model import ModelConfig, Transformer

    hf = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=vocab_size, hidden_size=64,
              intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=1024,
              tie_word_embeddings=True, hidden_act="silu", bos_token_id=1, eos_token_id=2)
    hf.update(overrides)
    torch.manual_seed(seed)
    model = Transformer(ModelConfig.from_hf(hf))
    with torch.no_grad():  # moderate logits: neither one-hot nor uniform next-token distributions
        model.embed_tokens.weight.normal_(0.0, 0.15)
    model.save_pretrained(out_dir)
    return model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_model")
    write_tiny_model(out, write_tiny_tokenizer(out))
    return out
