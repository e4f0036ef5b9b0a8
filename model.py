"""A compact Llama-family decoder that loads and saves Hugging Face checkpoints.

Everything the paper computes starts from the model's next-token distribution

    p_t = π_θ(· | x, y_<t) = softmax(W_out · h_t)                    (docs/math.md)

where h_t is the final hidden state at position t and W_out the output matrix. This file
builds h_t (`Transformer.hidden_states`), exposes W_out (`Transformer.output_weight`) so the
memory-lean loss in idft.py can form the logits chunk by chunk, and decodes with a static
KV cache (`KVCache`, `generate`) that hinted_decode.py reuses for its two streams.

One architecture covers the families the project supports:

    LlamaForCausalLM    Llama 2/3/3.1/3.2 (RoPE scaling "llama3"), SmolLM2 (tied embeddings)
    MistralForCausalLM  the Llama block; the sliding window never binds at our lengths
    Qwen2ForCausalLM    bias on the q/k/v projections, often tied embeddings
    Qwen3ForCausalLM    RMSNorm on q and k per head, no q/k/v bias

Block:  x = x + Attn(RMSNorm(x));  x = x + MLP(RMSNorm(x)),  MLP(x) = W_down(silu(W_gate x) ⊙ W_up x).
RoPE is written in the rotate-half form that HF checkpoints expect, so weights load without
any permutation. Module names follow the HF checkpoint names (`layers.N.self_attn.q_proj`,
...), so loading is a prefix change, not a translation table.

Decoding keeps every row of a batch at the same cache slot. Prompts of different lengths
are left-padded: row b starts at slot `pad[b]`, its token at slot s has position s − pad[b],
and it attends to slots pad[b]..s only. Shapes never change between decode steps, which is
what lets torch.compile capture the step once on a GPU.

Attention runs on a fused kernel in every mode, and never passes a mask together with
`enable_gqa`: in the pinned torch, CUDA's flash kernel takes no mask and its memory-efficient
kernel no grouped-query heads, so that pair falls to the math kernel (float32 scores of
[queries × keys] per head, K/V copied per query head). The modes (`Attention.forward`):

    plain rows     causal, SDPA is_causal + GQA                 flash on CUDA and CPU
    packed rows    causal within each document (`docs`)         `document_attention`
    prefill        one prompt, causal among its own tokens      flash; K/V stored in the cache
    decode step    one token against the cache, masked          `decode_attention`
"""

import argparse
import json
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.utils.checkpoint import checkpoint

from plumbing.cli import UserError
from plumbing.files import read_json

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")


class CheckpointError(UserError):
    """A checkpoint that cannot be loaded as asked: the message names the file or tensors.
    A user's mistake: command-line tools print it in one line, exit 2."""


@dataclass
class ModelConfig:
    architecture: str = "LlamaForCausalLM"
    vocab_size: int = 32000
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32
    head_dim: int = 128
    ffn_dim: int = 11008
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3", "factor", "low_freq_factor", ...}
    max_seq_len: int = 4096
    tie_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2, or Llama/Qwen3 with attention_bias
    o_bias: bool = False  # Llama/Qwen3 with attention_bias
    qk_norm: bool = False  # Qwen3
    hf_config: dict = field(default_factory=dict, repr=False)  # written back by save_pretrained

    @classmethod
    def from_hf(cls, cfg: dict) -> "ModelConfig":
        arch = (cfg.get("architectures") or ["?"])[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise CheckpointError(
                f"unsupported architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if cfg.get("hidden_act", "silu") != "silu" or cfg.get("mlp_bias", False):
            raise CheckpointError("only the SwiGLU MLP (hidden_act 'silu', no mlp_bias) is supported")
        # transformers >= 5 folds rope_theta and rope_scaling into rope_parameters; hub
        # checkpoints mostly still carry the older keys. Accept both.
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        rope_theta = rope.pop("rope_theta", None) or cfg.get("rope_theta", 10000.0)
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise CheckpointError(f"unsupported rope_scaling type {rope_type!r}; supported: default, llama3")
        n_heads = cfg["num_attention_heads"]
        attention_bias = cfg.get("attention_bias", False)
        is_qwen2 = arch == "Qwen2ForCausalLM"
        return cls(
            architecture=arch,
            vocab_size=cfg["vocab_size"],
            dim=cfg["hidden_size"],
            n_layers=cfg["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // n_heads,
            ffn_dim=cfg["intermediate_size"],
            norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            rope_scaling=rope if rope_type == "llama3" else None,
            max_seq_len=cfg.get("max_position_embeddings", 4096),
            tie_embeddings=cfg.get("tie_word_embeddings", False),
            qkv_bias=is_qwen2 or attention_bias,
            o_bias=attention_bias and not is_qwen2,
            qk_norm=arch == "Qwen3ForCausalLM",
            hf_config=dict(cfg),
        )


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # x / sqrt(mean(x²) + eps) in float32 like the reference implementation (one op),
        # then scale in the input dtype.
        return self.weight * F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Rotation frequencies θ_i = rope_theta^(−2i/d), with Llama 3.1's long-context rescaling."""
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32, device="cpu") / cfg.head_dim))
    if cfg.rope_scaling is None:
        return inv_freq
    s = cfg.rope_scaling
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are slowed down by `factor`, short ones kept, the band between blended.
    smooth = ((old_len / wavelen) - low) / (high - low)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    in_band = (wavelen <= old_len / low) & (wavelen >= old_len / high)
    return torch.where(in_band, blended, scaled)


def apply_rope(x, cos, sin):
    """RoPE in HF's rotate-half form, x·cos + (−x₂ ‖ x₁)·sin for x = (x₁ ‖ x₂), written with the
    sign folded into sin (`Transformer.rope` gives (−sin ‖ sin)): x·cos + roll(x, d/2)·sin, the
    same numbers in two fewer operations per tensor."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin


def document_attention(q, k, v, docs, cu_seqlens=None):
    """Causal attention within documents, for packed rows: q [R, T, H, d], k and v [R, T, Hkv, d],
    docs [R, T] (token t of row r belongs to document docs[r, t]; documents are contiguous).
    Returns [R, T, H, d]: each token attends to the earlier tokens of its own document only.

    CUDA, bfloat16/float16 (`cu_seqlens`: `document_offsets`): FlashAttention's variable-length
    kernel, the one transformers' padding-free training uses: one call for every document, no
    mask, no work across documents, KV heads shared natively.
    CPU: one causal SDPA per document (the CPU flash kernel), so no work across documents
    either. Under torch.compile, and on CUDA in float32: one SDPA over the rows with the mask
    "same document and not later" (shapes that do not change with the documents); CUDA's
    memory-efficient kernel takes a mask once K/V have one head per query head.
    """
    R, T, H, d = q.shape
    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else q.dtype
    if cu_seqlens is not None and dtype in (torch.bfloat16, torch.float16):
        from torch.nn.attention.varlen import varlen_attn

        q, k, v = (t.to(dtype) for t in (q, k, v))  # no autocast op: cast as autocast casts SDPA's inputs
        y = varlen_attn(q.reshape(R * T, H, d), k.reshape(R * T, -1, d), v.reshape(R * T, -1, d), cu_seqlens,
                        cu_seqlens, T, T, window_size=(-1, 0), enable_gqa=True)  # (-1, 0): causal
        return y.view(R, T, H, d)
    if not (q.is_cuda or torch.compiler.is_compiling()):
        starts = document_offsets(docs).tolist()
        q, k, v = (t.reshape(R * T, -1, d).transpose(0, 1)[None] for t in (q, k, v))  # [1, heads, R·T, d]
        y = torch.cat([F.scaled_dot_product_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], is_causal=True,
                                                      enable_gqa=True) for a, b in zip(starts, starts[1:])], dim=2)
        return y[0].transpose(0, 1).reshape(R, T, H, d)
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    mask = (docs[:, :, None] == docs[:, None, :]) & causal  # [R, T (query), T (key)]
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [R, heads, T, d]
    if q.is_cuda:
        k, v = (t.repeat_interleave(H // k.shape[1], dim=1) for t in (k, v))
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], enable_gqa=not q.is_cuda)
    return y.transpose(1, 2)


def document_offsets(docs):
    """Where each document of packed rows [R, T] starts in the R·T flattened tokens, then R·T
    (int32): FlashAttention's `cu_seqlens`. A row's start is a document's start."""
    starts = torch.ones_like(docs, dtype=torch.bool)
    starts[:, 1:] = docs[:, 1:] != docs[:, :-1]
    return F.pad(starts.flatten().nonzero().flatten(), (0, 1), value=docs.numel()).int()


def decode_attention(q, k_cache, v_cache, mask):
    """One new token per row against the whole cache: q [B, H, 1, d], the cache [B, Hkv, S, d],
    mask [B, 1, 1, S] (KVCache.attention_mask: which slots each row sees). Returns [B, H, 1, d].

    Grouped-query attention without `enable_gqa`: the G = H / Hkv query heads that share a KV
    head become G queries of that head, [B, Hkv, G, d] (query head h = j·G + g reads KV head j,
    as enable_gqa does), and the mask broadcasts over them. SDPA then sees plain multi-head
    attention with a mask, which CUDA's memory-efficient kernel and the CPU flash kernel take:
    each KV head is read once, nothing is copied per query head.
    """
    B, H, _, d = q.shape
    y = F.scaled_dot_product_attention(q.reshape(B, k_cache.shape[1], -1, d), k_cache, v_cache, attn_mask=mask)
    return y.reshape(B, H, 1, d)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        self.qk_norm = cfg.qk_norm

    def qkv(self, x, cos, sin):
        """Queries, keys and values of x [B, T, dim], each [B, T, heads, head_dim], rotated."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v  # cos, sin: [B, T, 1, head_dim]

    def forward(self, x, cos, sin, layer_cache=None, slots=None, mask=None, docs=None, cu_seqlens=None):
        B, T, _ = x.shape
        q, k, v = self.qkv(x, cos, sin)
        if docs is not None:  # packed rows
            return self.o_proj(document_attention(q, k, v, docs, cu_seqlens).reshape(B, T, -1))
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, heads, T, head_dim]
        if layer_cache is None:  # plain rows (training, scoring): right padding comes after every token used
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            k_cache, v_cache = layer_cache
            k_cache.index_copy_(2, slots, k)
            v_cache.index_copy_(2, slots, v)
            if T == 1:  # a decode step
                y = decode_attention(q, k_cache, v_cache, mask)
            else:  # a prefill (`prefill`): these tokens are the row's whole context, nothing is padding
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, layer_cache=None, slots=None, mask=None, docs=None, cu_seqlens=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, layer_cache, slots, mask, docs, cu_seqlens)
        return x + self.mlp(self.post_attention_layernorm(x))


@dataclass
class KVCache:
    """Preallocated keys and values for every layer: [layers, batch, kv_heads, max_len, head_dim].

    `pad[b]` is the number of left-padding slots of row b: its real tokens start there.
    """

    k: torch.Tensor
    v: torch.Tensor
    pad: torch.Tensor  # [batch] long

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def mark_static(self):
        """Tell torch.compile the buffers stay put, so CUDA graphs read and write them in place."""
        torch._dynamo.mark_static_address(self.k)
        torch._dynamo.mark_static_address(self.v)

    def select(self, rows: torch.Tensor, static: bool = False) -> "KVCache":
        """A cache of the given rows only (finished rows leave the batch)."""
        cache = KVCache(self.k[:, rows], self.v[:, rows], self.pad[rows])
        if static:
            cache.mark_static()
        return cache

    def attention_mask(self, slot: torch.Tensor, dtype) -> torch.Tensor:
        """[batch, 1, 1, max_len] for a decode step at `slot` ([1]): 0 where row b sees the key
        (slots pad[b]..slot), −inf elsewhere. Additive rather than boolean: made once per step
        in the dtype SDPA adds it in, not converted again in every layer."""
        key = torch.arange(self.max_len, device=slot.device)
        seen = (key >= self.pad[:, None]) & (key <= slot)  # [B, S]
        return torch.zeros(seen.shape, dtype=dtype, device=seen.device).masked_fill(~seen, -math.inf)[:, None, None]


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.activation_checkpointing = False  # train.py --activation-checkpointing (`hidden_states`)
        self.init_rope()

    def init_rope(self):
        """(Re)compute the RoPE frequencies: needed again after building on the meta device."""
        device = self.embed_tokens.weight.device
        self.register_buffer("inv_freq", rope_inv_freq(self.config).to(device), persistent=False)

    @property
    def output_weight(self) -> torch.Tensor:
        """W_out, [vocab, dim]: the embedding matrix itself when the two are tied."""
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def rope(self, positions: torch.Tensor, dtype):
        """(cos ‖ cos) and (−sin ‖ sin) of θ_i · position for positions [B, T] (`apply_rope`),
        shaped [B, T, 1, head_dim] to broadcast over heads."""
        freqs = positions[..., None, None].float() * self.inv_freq  # [B, T, 1, head_dim/2]
        cos, sin = freqs.cos(), freqs.sin()
        return torch.cat((cos, cos), dim=-1).to(dtype), torch.cat((-sin, sin), dim=-1).to(dtype)

    def hidden_states(self, tokens, slots=None, cache: KVCache | None = None, *, positions=None, docs=None):
        """Final normalized hidden states h_t, [B, T, dim].

        Without a cache: causal attention over each row, positions 0..T−1 (training, scoring;
        right padding is harmless there). Packed rows: `positions` [B, T] restart at 0 for each
        document and `docs` [B, T] say which document each token belongs to; a token attends to
        the earlier tokens of its own document (`document_attention`). With a cache: `slots`
        [T] are the cache slots these tokens occupy, the same for every row; several tokens are
        a prefill, one token a decode step.

        With `activation_checkpointing` (and gradients on, no cache) each block keeps only its
        input x for backward, which reruns the block to get the rest (torch.utils.checkpoint):
        the saved activations shrink from every intermediate of every block to one [B, T, dim]
        tensor per block, for one more forward of the blocks. The gradients are the same.
        """
        B, T = tokens.shape
        x = self.embed_tokens(tokens)
        mask = cu_seqlens = None
        if cache is not None:
            positions = (slots[None, :] - cache.pad[:, None]).clamp(min=0)
            mask = cache.attention_mask(slots, x.dtype) if T == 1 else None
        elif positions is None:
            positions = torch.arange(T, device=tokens.device).expand(B, T)
        if docs is not None and tokens.is_cuda:
            cu_seqlens = document_offsets(docs)
        cos, sin = self.rope(positions, x.dtype)
        recompute = self.activation_checkpointing and cache is None and torch.is_grad_enabled()
        for i, layer in enumerate(self.layers):
            if recompute:
                x = checkpoint(layer, x, cos, sin, docs=docs, cu_seqlens=cu_seqlens, use_reentrant=False)
            else:
                layer_cache = None if cache is None else (cache.k[i], cache.v[i])
                x = layer(x, cos, sin, layer_cache, slots, mask, docs, cu_seqlens)
        return self.norm(x)

    def forward(self, tokens, slots=None, cache: KVCache | None = None):
        return F.linear(self.hidden_states(tokens, slots, cache), self.output_weight)

    def new_cache(self, pad: torch.Tensor, max_len: int) -> KVCache:
        c, w = self.config, self.embed_tokens.weight
        shape = (c.n_layers, len(pad), c.n_kv_heads, max_len, c.head_dim)
        return KVCache(torch.zeros(shape, dtype=w.dtype, device=w.device),
                       torch.zeros(shape, dtype=w.dtype, device=w.device), pad.to(w.device))

    # ---- Hugging Face checkpoints -------------------------------------------------------------

    @staticmethod
    def hf_name(name: str) -> str:
        """Our parameter name -> the name in an HF checkpoint."""
        return name if name.startswith("lm_head") else "model." + name

    @classmethod
    def from_pretrained(cls, name_or_path, dtype=torch.float32, device="cpu") -> "Transformer":
        """Load an HF directory, a hub id, or the bundled model name (see hub.py).

        The model is built on the meta device (no memory), then each tensor is read from
        safetensors straight into its final dtype and device and assigned in place.
        """
        from hub import resolve_model_dir

        path = resolve_model_dir(str(name_or_path))
        cfg = read_config(path)
        with torch.device("meta"):
            model = cls(cfg)
        expected = {cls.hf_name(n): p for n, p in model.state_dict().items()}
        state = {}
        for file in checkpoint_files(path):
            try:
                with safe_open(file, framework="pt", device=str(device)) as f:
                    for key in f.keys():
                        if key not in expected:
                            if key == "lm_head.weight" and cfg.tie_embeddings or key.endswith("rotary_emb.inv_freq"):
                                continue  # a redundant copy of the tied matrix, or a derived buffer
                            raise CheckpointError(f"{file}: unexpected tensor {key!r} for {cfg.architecture}")
                        state[key] = f.get_tensor(key).to(dtype)
            except SafetensorError as e:
                raise CheckpointError(f"{file}: corrupt or truncated safetensors file ({e})") from None
        # NaN or inf weights would run and mislead (NaN scores, argmax-0 tokens, exit code 0): one
        # float32 sum per tensor finds them cheaply; a sum that overflows is confirmed exactly
        sums = torch.stack([t.sum(dtype=torch.float32) for t in state.values()]) if state else torch.zeros(0)
        if not sums.isfinite().all():
            bad = [key for key, t in state.items() if not t.isfinite().all()]
            if bad:
                raise CheckpointError(f"{path}: tensor {bad[0]!r} holds NaN or infinite values"
                                      + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""))
        missing = sorted(set(expected) - set(state))
        if missing:
            raise CheckpointError(f"{path}: missing tensors {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
        for key, tensor in state.items():
            if tensor.shape != expected[key].shape:
                raise CheckpointError(
                    f"{path}: tensor {key!r} has shape {tuple(tensor.shape)}, config says {tuple(expected[key].shape)}"
                )
        model.load_state_dict({k.removeprefix("model."): v for k, v in state.items()}, assign=True)
        model.init_rope()
        return model.eval()

    def save_pretrained(self, out_dir, state_dict=None, max_shard_size: int = 5 * 10**9, dtype=None):
        """Write config.json + safetensors that transformers loads as the same model.

        `state_dict` (our names; anything indexable by name) replaces this module's own, e.g.
        the float32 weights read back from a sharded training state (plumbing/checkpoints.py);
        `dtype` (default: the module's own) is the dtype written. Tensors are packed in order
        into shards of at most `max_shard_size` bytes (default 5e9, transformers 4's "5GB"; a
        bigger tensor gets a shard of its own), planned from this module's shapes; each shard's
        tensors are fetched, cast and written before the next shard's are fetched, so a
        `state_dict` that reads its tensors when indexed keeps at most one shard in memory. One
        shard is model.safetensors, several are model-0000k-of-0000n.safetensors listed by
        model.safetensors.index.json, transformers' layout. Each file is written to a temp file
        and renamed; the old index and any safetensors not part of this save are deleted first
        and the new index is written last, so no index ever lists a missing or stale shard.
        """
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        own = self.state_dict()  # the names and shapes
        state_dict = own if state_dict is None else state_dict
        dtype = dtype or own["embed_tokens.weight"].dtype
        cfg = dict(self.config.hf_config, torch_dtype=str(dtype).removeprefix("torch."))
        shards, shard_bytes = [[]], 0
        for n, p in own.items():
            size = p.numel() * dtype.itemsize
            if shards[-1] and shard_bytes + size > max_shard_size:
                shards, shard_bytes = shards + [[]], 0
            shards[-1].append(n)
            shard_bytes += size
        names = (["model.safetensors"] if len(shards) == 1 else
                 [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))])
        index = out_dir / "model.safetensors.index.json"
        index.unlink(missing_ok=True)
        for stale in out_dir.glob("*.safetensors"):
            if stale.name not in names:
                stale.unlink()
        weight_map, total = {}, 0
        for name, shard in zip(names, shards):
            tensors = {self.hf_name(n): state_dict[n].detach().to(dtype).contiguous().cpu() for n in shard}
            _write_atomically(out_dir / name, lambda tmp, t=tensors: save_file(t, tmp, metadata={"format": "pt"}))
            weight_map.update(dict.fromkeys(tensors, name))
            total += sum(t.numel() * t.element_size() for t in tensors.values())
            del tensors  # freed before the next shard is fetched
        _write_atomically(out_dir / "config.json", lambda tmp: Path(tmp).write_text(json.dumps(cfg, indent=2) + "\n"))
        if len(shards) > 1:
            _write_atomically(index, lambda tmp: Path(tmp).write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n"))


def read_config(path: Path) -> ModelConfig:
    """The ModelConfig of a model directory's config.json, or a one-line CheckpointError."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{config_file}: missing (every HF checkpoint has a config.json)")
    try:
        return ModelConfig.from_hf(read_json(config_file))
    except (KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{config_file}: cannot read the model config ({type(e).__name__}: {e})") from None


def check_vocabulary(tokenizer, vocab_size: int, where) -> None:
    """Refuse, before any compute, a tokenizer with ids that the model has no embedding row for:
    they would fail in the middle of a run. ids 0 .. n_ids − 1 need n_ids ≤ |V| = config.json's
    vocab_size; more rows than ids (padding rows) are fine."""
    if tokenizer.n_ids > vocab_size:
        raise CheckpointError(f"{where}: the tokenizer has token ids up to {tokenizer.n_ids - 1}, but the model has "
                              f"{vocab_size} rows in its vocabulary (config.json vocab_size): not its tokenizer")


def _write_atomically(path: Path, write) -> None:
    """write(temporary path), then rename it to `path`: readers see the old file or the new one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # same directory: os.replace is atomic
    try:
        write(str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def checkpoint_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint: one file, or the shards its index lists."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(read_json(index)["weight_map"].values()))
        files = [path / s for s in shards]
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors files")
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"{f}: listed in {index.name} but missing")
    return files


# ---- Decoding ---------------------------------------------------------------------------------


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, generators=None) -> torch.Tensor:
    """Next token per row from logits [B, |V|]: argmax at temperature 0; otherwise the nucleus
    (smallest set with probability ≥ top_p, chosen on the untempered distribution), then
    temperature inside it — the order the authors' hinted-decoding demo uses. generators: one
    torch.Generator per row (`row_generators`), or None for torch's global generator."""
    if temperature == 0.0:
        return logits.argmax(-1)
    logits = logits.float()
    if top_p < 1.0:
        probs, order = torch.sort(logits.softmax(-1), dim=-1, descending=True)
        outside = probs.cumsum(-1) - probs >= top_p  # mass before this token already reached top_p
        logits = logits.scatter(-1, order, torch.where(outside, -math.inf, logits.gather(-1, order)))
    probs = (logits / temperature).softmax(-1)
    if generators is None:
        return torch.multinomial(probs, 1).squeeze(-1)
    # each row draws from its own generator, so its sample does not depend on the rows beside it
    return torch.cat([torch.multinomial(row, 1, generator=g) for row, g in zip(probs, generators)])


def row_generators(seed, n_rows: int, device) -> list[torch.Generator] | None:
    """One random generator per row: seed None -> None (torch's global generator); an int s ->
    rows seeded s, s + 1, ...; a list -> its seeds, one per row. With a seed per example
    (data.example_seed) an example samples the same tokens whatever batch or rank it lands in."""
    if seed is None:
        return None
    seeds = [seed + b for b in range(n_rows)] if isinstance(seed, int) else list(seed)
    if len(seeds) != n_rows:
        raise ValueError(f"got {len(seeds)} seeds for {n_rows} rows")
    return [torch.Generator(device=device).manual_seed(s) for s in seeds]


# The stop rule of every decoding loop (docs/math.md, "Hinted decoding"): a stop id, the token limit, or some 30-token
# window seen 5 times, checked every 100 tokens.
REPETITION_WINDOW, REPETITION_COUNT, REPETITION_EVERY = 30, 5, 100
COMPACT_FRACTION = 0.25  # drop finished rows from the batch once this share of it has finished


def repeats(tokens: list[int], window: int = REPETITION_WINDOW, count: int = REPETITION_COUNT) -> bool:
    """Has some run of `window` consecutive tokens occurred at least `count` times?"""
    seen = Counter(tuple(tokens[i:i + window]) for i in range(len(tokens) - window + 1))
    return bool(seen) and max(seen.values()) >= count


def finish_reason(out: list[int], stop_ids, max_new_tokens: int, repetition_stop: bool = True) -> str | None:
    """Why a row stops after its newest token: "eos" (a stop id), "length", "repetition"; None: go on.

    A stop id or the limit on the same step wins over the repetition check.
    """
    if out[-1] in stop_ids:
        return "eos"
    if len(out) == max_new_tokens:
        return "length"
    if repetition_stop and len(out) % REPETITION_EVERY == 0 and repeats(out):
        return "repetition"
    return None


def worth_compacting(n_active: int, n_keep: int) -> bool:
    """Drop finished rows from the batch (a copy of the cache) once COMPACT_FRACTION of it has finished."""
    return n_active - n_keep >= COMPACT_FRACTION * n_active


def last_logits(model: Transformer, tokens, slots, cache: KVCache) -> torch.Tensor:
    """Logits of each row's last position only (a prefill never needs [rows, T, |V|])."""
    return F.linear(model.hidden_states(tokens, slots, cache)[:, -1], model.output_weight)


def prefill(model: Transformer, prompts: list[list[int]], max_new_tokens: int) -> tuple[torch.Tensor, KVCache]:
    """A cache with room for every prompt and max_new_tokens more, the prompts run into it, and
    the logits of each prompt's last token, [rows, |V|]. Prompts are left-padded: row b's fills
    slots pad[b]..W−1 (W: the longest prompt), so every row decodes its next token at slot W.

    One prompt at a time: with no padding nothing needs a mask, so attention is plain causal
    attention among the prompt's own tokens (the flash kernel, grouped-query heads included).
    No prompt token is scored against the slots of the tokens still to come, and only one
    prompt's activations exist at once: the memory beyond the cache does not grow with
    max_new_tokens or with the number of prompts.
    """
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    device = model.embed_tokens.weight.device
    width = max(len(p) for p in prompts)
    cache = model.new_cache(torch.tensor([width - len(p) for p in prompts]), width + max_new_tokens)
    logits = []
    for b, p in enumerate(prompts):
        row = KVCache(cache.k[:, b:b + 1], cache.v[:, b:b + 1], cache.pad[b:b + 1])  # views: writes land in the cache
        slots = torch.arange(width - len(p), width, device=device)
        logits.append(last_logits(model, torch.tensor([p], device=device), slots, row))
    return torch.cat(logits), cache


_compiled_last_logits = None


def decode_step(compiled: bool):
    """The one-token forward of the decoding loops. Compiled, it is captured once per process
    in mode "reduce-overhead": on CUDA that records CUDA graphs (static shapes, so a new batch
    size after a compaction is captured once more, and the cache must stay where it is:
    KVCache.mark_static); on CPU inductor compiles the same graph without them, which is how
    the tests check the compiled path against eager."""
    global _compiled_last_logits
    if not compiled:
        return last_logits
    if _compiled_last_logits is None:
        _compiled_last_logits = torch.compile(last_logits, mode="reduce-overhead", fullgraph=True)
    return _compiled_last_logits


@torch.no_grad()
def generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int, stop_ids=(),
             temperature: float = 0.0, top_p: float = 1.0, seed: int | list[int] | None = None,
             repetition_stop: bool = True,
             compile: bool | None = None) -> tuple[list[list[int]], list[str]]:
    """Batched decoding with the static KV cache.

    Returns (tokens, finish): each row's new tokens, up to and including the stop id when one
    is produced, and why it stopped ("eos", "length" or "repetition": `finish_reason`). Rows
    that finish leave the batch (once COMPACT_FRACTION of it has), so a looping row costs no
    compute past its stop. seed: None, an int, or one seed per prompt (`row_generators`).
    compile: compile the decode step (default: on CUDA only).
    """
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be at least 1")
    device = model.embed_tokens.weight.device
    compile = device.type == "cuda" if compile is None else compile
    forward = decode_step(compile)
    stop_ids = frozenset(stop_ids)
    logits, cache = prefill(model, prompts, max_new_tokens)
    width = cache.max_len - max_new_tokens
    if compile:
        cache.mark_static()
    generators = row_generators(seed, len(prompts), device)
    out, finish = [[] for _ in prompts], [None] * len(prompts)
    active = list(range(len(prompts)))  # the prompt behind each row still in the batch
    for step in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_p, generators)
        for b, t in zip(active, nxt.tolist()):
            if finish[b] is None:  # a finished row still in the batch: ignore it
                out[b].append(t)
                finish[b] = finish_reason(out[b], stop_ids, max_new_tokens, repetition_stop)
        keep = [i for i, b in enumerate(active) if finish[b] is None]
        if not keep:
            break
        if worth_compacting(len(active), len(keep)):
            idx = torch.tensor(keep, device=device)
            cache, nxt, active = cache.select(idx, compile), nxt[idx], [active[i] for i in keep]
            generators = generators and [generators[i] for i in keep]
        logits = forward(model, nxt[:, None], torch.tensor([width + step], device=device), cache)
    return out, finish


def main():
    from hub import BUNDLED_NAME, bundled_model_dir
    from tokenizer import Tokenizer

    ap = argparse.ArgumentParser(description="Convert the bundled model, or chat with a model once.")
    ap.add_argument("--convert", action="store_true", help="convert the bundled GGUF to an HF directory and print it")
    ap.add_argument("--model", default=BUNDLED_NAME, help="HF directory, hub id, or the bundled model name")
    ap.add_argument("--prompt", default="What is the capital of France?", help="a user message")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    args = ap.parse_args()
    if args.convert:
        print(bundled_model_dir())
        return
    model, tok = Transformer.from_pretrained(args.model), Tokenizer.from_pretrained(args.model)
    prompt = tok.encode_chat([{"role": "user", "content": args.prompt}], add_generation_prompt=True)
    [reply], _ = generate(model, [prompt], args.max_new_tokens, stop_ids=tok.stop_ids)
    print(tok.decode([t for t in reply if t != tok.eos_id]))


if __name__ == "__main__":
    main()
