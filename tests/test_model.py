"""model.py against Hugging Face transformers, the independent reference for every family."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
import transformers

from model import (CheckpointError, Transformer, decode_attention, document_attention, document_offsets, finish_reason,
                   generate, repeats)

torch.set_num_threads(1)

COMMON = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, max_position_embeddings=256)

# One tiny random model per feature the loader must get right.
CASES = {
    "llama_gqa_untied": (transformers.LlamaConfig, dict(num_key_value_heads=2, tie_word_embeddings=False)),
    "llama_tied_mha": (transformers.LlamaConfig, dict(num_key_value_heads=4, tie_word_embeddings=True)),
    "llama3_rope_scaling": (transformers.LlamaConfig, dict(
        num_key_value_heads=2, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    "mistral": (transformers.MistralConfig, dict(num_key_value_heads=2, sliding_window=None)),
    "qwen2_bias_tied": (transformers.Qwen2Config, dict(num_key_value_heads=2, tie_word_embeddings=True,
                                                       rope_theta=1e6)),
    "qwen3_qk_norm": (transformers.Qwen3Config, dict(num_key_value_heads=2, head_dim=24, tie_word_embeddings=False)),
}


def make_hf(case, path):
    config_cls, extra = CASES[case]
    torch.manual_seed(0)
    hf = config_cls(**COMMON, **extra)
    model = transformers.AutoModelForCausalLM.from_config(hf).eval()
    with torch.no_grad():  # random biases and norm weights, so a forgotten one shows up in the logits
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.normal_(0.0, 0.5 if name.endswith("bias") else 0.2).add_(1.0 if "norm" in name else 0.0)
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf = make_hf(request.param, path)
    return hf, Transformer.from_pretrained(path), path


def test_logits_match_transformers(pair):
    hf, ours, _ = pair
    tokens = torch.randint(0, COMMON["vocab_size"], (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(tokens).logits
        got = ours(tokens)
    assert (ref - got).abs().max().item() < 1e-4


def test_save_pretrained_roundtrip_through_transformers(pair, tmp_path):
    _, ours, _ = pair
    ours.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    tokens = torch.randint(0, COMMON["vocab_size"], (2, 17), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (reloaded(tokens).logits - ours(tokens)).abs().max().item() < 1e-5


def test_cached_decoding_equals_full_forward(pair):
    _, ours, _ = pair
    tokens = torch.randint(0, COMMON["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = ours(tokens)
        cache = ours.new_cache(torch.zeros(2, dtype=torch.long), 32)
        steps = [ours(tokens[:, :10], torch.arange(10), cache)]
        for t in range(10, 24):
            steps.append(ours(tokens[:, t:t + 1], torch.tensor([t]), cache))
    assert (torch.cat(steps, 1) - full).abs().max().item() < 1e-4


def test_packed_rows_equal_each_sequence_alone_in_transformers(pair):
    """Sequences laid end to end in rows (positions restarting at 0, attention within each
    document) give the logits transformers gives each sequence alone."""
    hf, ours, _ = pair
    g = torch.Generator().manual_seed(5)
    rows = [[9, 14, 5], [27], [3, 1, 2, 20]]  # sequence lengths per row; rows of 30, padding after
    tokens, positions, docs = (torch.zeros(3, 30, dtype=torch.long) for _ in range(3))
    alone, doc = [], 0
    for r, lengths in enumerate(rows):
        start = 0
        for n in lengths + [30 - sum(lengths)]:  # the last one: the row's padding
            ids = torch.randint(0, COMMON["vocab_size"], (n,), generator=g)
            tokens[r, start:start + n], positions[r, start:start + n], docs[r, start:start + n] = ids, torch.arange(n), doc
            alone.append((r, start, ids))
            start, doc = start + n, doc + 1
        alone.pop()  # padding is not compared
    with torch.no_grad():
        packed = F.linear(ours.hidden_states(tokens, positions=positions, docs=docs), ours.output_weight)
        for r, start, ids in alone:
            ref = hf(ids[None]).logits[0]
            assert (packed[r, start:start + len(ids)] - ref).abs().max().item() < 1e-4


def test_document_attention_paths_agree_with_attention_per_document(monkeypatch):
    """The CPU path (one causal SDPA per document) and the masked path (under torch.compile, and
    on CUDA in float32) both equal plain attention computed for each document on its own."""
    g = torch.Generator().manual_seed(8)
    docs = torch.tensor([[0] * 7 + [1] * 12 + [2] * 5, [3] * 20 + [4] * 4])
    q, k, v = (torch.randn(2, 24, h, 16, generator=g) for h in (6, 2, 2))
    expected = torch.zeros_like(q)
    for r in range(2):
        for doc in docs[r].unique():
            t = docs[r] == doc
            scores = torch.einsum("qhd,khd->hqk", q[r, t], k[r, t].repeat_interleave(3, dim=1)) / 4
            scores = scores.masked_fill(~torch.ones(int(t.sum()), int(t.sum()), dtype=torch.bool).tril(), -math.inf)
            expected[r, t] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v[r, t].repeat_interleave(3, dim=1))
    assert torch.allclose(document_attention(q, k, v, docs), expected, atol=1e-5)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert torch.allclose(document_attention(q, k, v, docs), expected, atol=1e-5)


def test_document_offsets_mark_every_start_of_a_document_or_row():
    docs = torch.tensor([[0, 0, 0, 1, 1, 2], [3, 3, 3, 3, 3, 3], [4, 5, 5, 5, 6, 6], [6, 6, 6, 6, 7, 7]])
    assert document_offsets(docs).tolist() == [0, 3, 5, 6, 12, 13, 16, 18, 22, 24]  # row 3 starts a new one
    assert document_offsets(docs).dtype == torch.int32


def test_decode_attention_equals_the_masked_grouped_query_call():
    """decode_attention (G query heads folded into queries of their KV head, no enable_gqa)
    equals SDPA with the mask and enable_gqa, the call decoding made before."""
    g = torch.Generator().manual_seed(6)
    for heads, kv_heads in ((8, 2), (6, 3), (4, 4), (4, 1)):
        q, k, v = (torch.randn(3, h, n, 16, generator=g) for h, n in ((heads, 1), (kv_heads, 40), (kv_heads, 40)))
        mask = torch.rand(3, 1, 1, 40, generator=g) < 0.7
        mask[..., 0] = True
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        assert torch.allclose(decode_attention(q, k, v, mask), expected, atol=1e-6)


def test_left_padded_batch_equals_each_prompt_alone(pair):
    _, ours, _ = pair
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(1, 97, (n,), generator=g).tolist() for n in (3, 11, 7, 1)]
    batched, _ = generate(ours, prompts, max_new_tokens=12)
    alone = [generate(ours, [p], max_new_tokens=12)[0][0] for p in prompts]
    assert batched == alone


def test_greedy_generate_matches_transformers(pair):
    hf, ours, _ = pair
    prompt = [5, 17, 42, 8, 9, 60]
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=20, do_sample=False, pad_token_id=0)
    assert generate(ours, [prompt], max_new_tokens=20) == ([ref[0, len(prompt):].tolist()], ["length"])


def test_generate_stops_at_eos_and_keeps_it(pair):
    _, ours, _ = pair
    prompt = [3, 4, 5]
    [free], _ = generate(ours, [prompt], max_new_tokens=8)
    eos = free[2]  # pretend the third generated token is the end of turn
    out, finish = generate(ours, [prompt, [7, 7]], max_new_tokens=8, stop_ids={eos})
    assert out[0] == free[:free.index(eos) + 1] and finish[0] == "eos"
    # every id of stop_ids stops (generation configs list several end-of-turn ids)
    out, finish = generate(ours, [prompt], max_new_tokens=8, stop_ids={12345, free[1]})
    assert out == [free[:free.index(free[1]) + 1]] and finish == ["eos"]


def test_repetition_stop_and_rows_leaving_the_batch(pair, monkeypatch):
    """A looping row stops at the first check (every 100 tokens) that sees a 30-token window 5
    times; finished rows leave the batch without changing anyone's output."""
    _, ours, _ = pair
    import model

    prompts = [[3, 4, 5], [9] * 7, [1, 2], [60, 61, 62, 63]]
    free, _ = generate(ours, prompts, max_new_tokens=300, repetition_stop=False)
    want = []
    for ids in free:
        stop = next((n for n in range(100, 300, 100) if model.repeats(ids[:n])), None)
        want.append((ids[:stop], "repetition") if stop else (ids, "length"))
    out, finish = generate(ours, prompts, max_new_tokens=300)
    assert list(zip(out, finish)) == want
    assert "repetition" in finish  # the tiny random model loops: the rule was exercised
    monkeypatch.setattr(model, "COMPACT_FRACTION", 2.0)  # never drop finished rows
    assert generate(ours, prompts, max_new_tokens=300) == (out, finish)


def stop_of(tokens, eos, limit):
    """Apply the stop rule token by token, as a decoding loop does: (kept tokens, reason)."""
    for n in range(1, len(tokens) + 1):
        if reason := finish_reason(tokens[:n], {eos}, limit):
            return tokens[:n], reason
    return tokens, None


def test_repetition_rule():
    """Some 30-token window seen 5 times (overlaps count)."""
    block, seps = list(range(100, 130)), [[200 + i] for i in range(6)]
    four = sum((block + s for s in seps[:4]), [])
    assert not repeats(four) and repeats(four + block)
    assert not repeats([7] * 33) and repeats([7] * 34)


def test_finish_reason_fires_at_the_first_check():
    eos = 2
    assert stop_of([5, 6, eos], eos, 300) == ([5, 6, eos], "eos")
    assert stop_of(list(range(3, 303)), eos, 300) == (list(range(3, 303)), "length")
    # a loop from token 150 on: the check at 100 sees nothing, the one at 200 fires
    looping = list(range(3, 153)) + [7] * 250
    assert stop_of(looping, eos, 400) == (looping[:200], "repetition")
    # a loop that ends in EOS before the next check is an EOS stop
    assert stop_of(list(range(3, 103)) + [7] * 50 + [eos], eos, 400)[1] == "eos"
    # EOS or the token limit on a check step win
    assert stop_of(list(range(3, 153)) + [7] * 49 + [eos], eos, 400)[1] == "eos"
    at_limit = list(range(3, 153)) + [7] * 50  # would repeat at the check on token 200, the limit
    assert stop_of(at_limit, eos, 200) == (at_limit, "length")


def test_sampling_is_seeded(pair):
    _, ours, _ = pair
    a, _ = generate(ours, [[1, 2, 3]], 10, temperature=1.0, top_p=0.9, seed=7)
    b, _ = generate(ours, [[1, 2, 3]], 10, temperature=1.0, top_p=0.9, seed=7)
    assert a == b


def test_sampling_seed_is_per_prompt_not_per_batch(pair):
    """A prompt's own seed decides its sample: alone, or beside other prompts, it draws the same."""
    _, ours, _ = pair
    knobs = dict(max_new_tokens=10, temperature=1.0, top_p=0.9)
    prompts, seeds = [[1, 2, 3], [4, 5], [6, 7, 8, 9]], [11, 22, 33]
    together, _ = generate(ours, prompts, seed=seeds, **knobs)
    alone = [generate(ours, [p], seed=[s], **knobs)[0][0] for p, s in zip(prompts, seeds)]
    assert together == alone
    assert generate(ours, prompts[::-1], seed=seeds[::-1], **knobs)[0] == together[::-1]
    assert generate(ours, prompts, seed=[11, 23, 33], **knobs)[0][1] != together[1]


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, CUDA])])
def test_compiled_generate_equals_eager(device, tmp_path):
    """The compiled decode step (model.decode_step: CUDA graphs on CUDA, inductor on CPU) gives
    the eager tokens, also while rows finish at different steps and leave the batch."""
    make_hf("llama_gqa_untied", tmp_path)
    ours = Transformer.from_pretrained(tmp_path, device=device)
    prompts = [[3, 4, 5], [9] * 7, [1, 2], [60, 61, 62, 63], [10, 11], [20] * 3, [5], [40, 41, 42]]
    free, _ = generate(ours, prompts, 24, compile=False)
    stops = {free[0][3], free[1][9], free[2][15]}
    eager = generate(ours, prompts, 24, stop_ids=stops, compile=False)
    lengths = {len(out) for out, reason in zip(*eager) if reason == "eos"}
    assert len(lengths) >= 3 and "length" in eager[1]  # rows left at several steps, some went on
    assert generate(ours, prompts, 24, stop_ids=stops, compile=True) == eager


@pytest.mark.cuda
@CUDA
def test_bfloat16_attention_never_runs_the_math_kernel_on_cuda(tmp_path):
    """With SDPA's math kernel switched off, bfloat16 on CUDA still runs every attention mode:
    plain rows, packed rows (FlashAttention's variable-length kernel, forward and backward), and
    prefill and decode steps of `generate`. Packed rows equal each sequence alone, and the varlen
    kernel equals the masked float32 path, within bfloat16 rounding."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    make_hf("llama_gqa_untied", tmp_path)
    ours = Transformer.from_pretrained(tmp_path, dtype=torch.bfloat16, device="cuda")
    g = torch.Generator().manual_seed(7)
    lengths = [9, 14, 5]
    ids = [torch.randint(0, COMMON["vocab_size"], (n,), generator=g).cuda() for n in lengths]
    tokens = torch.cat(ids + [torch.zeros(4, dtype=torch.long, device="cuda")])[None]  # one row of 32
    positions = torch.cat([torch.arange(n) for n in lengths + [4]]).cuda()[None]
    docs = torch.cat([torch.full((n,), d) for d, n in enumerate(lengths + [4])]).cuda()[None]
    fused = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
    with sdpa_kernel(fused), torch.no_grad():
        packed = ours.hidden_states(tokens, positions=positions, docs=docs)[0].float()
        start = 0
        for seq in ids:
            alone = ours.hidden_states(seq[None])[0].float()
            assert (packed[start:start + len(seq)] - alone).abs().max() <= 0.05 * alone.abs().max()
            start += len(seq)
        out, _ = generate(ours, [seq.tolist() for seq in ids], 12)
        assert [len(o) for o in out] == [12] * 3
    q, k, v = (torch.randn(1, 32, h, 16, generator=g).cuda().requires_grad_() for h in (4, 2, 2))
    cu_seqlens = torch.tensor([0, 9, 23, 28, 32], dtype=torch.int32, device="cuda")
    with sdpa_kernel(fused):
        varlen = document_attention(*(t.bfloat16() for t in (q, k, v)), docs, cu_seqlens)
        masked = document_attention(q, k, v, docs)  # float32: the masked path (K/V given every head)
    assert (varlen.float() - masked).abs().max() < 2e-2
    grads = [torch.autograd.grad((y.float() * torch.linspace(-1, 1, 16, device="cuda")).sum(), (q, k, v))
             for y in (varlen, masked)]
    for a, b in zip(*grads):
        assert (a - b).abs().max() <= 2e-2 * b.abs().max()


def test_sharded_checkpoint_loads(tmp_path):
    hf = make_hf("llama_gqa_untied", tmp_path / "src")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    ours = Transformer.from_pretrained(tmp_path / "sharded")
    tokens = torch.arange(12)[None]
    with torch.no_grad():
        assert (hf(tokens).logits - ours(tokens)).abs().max().item() < 1e-4


def test_sharded_save_roundtrips_through_transformers_and_replaces_stale_files(tmp_path, monkeypatch):
    import model

    make_hf("qwen2_bias_tied", tmp_path / "src")
    ours = Transformer.from_pretrained(tmp_path / "src")
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"stale")  # a previous unsharded save
    (out / "model-00009-of-00009.safetensors").write_bytes(b"stale")
    written = []
    replace = model.os.replace
    monkeypatch.setattr(model.os, "replace", lambda src, dst: (written.append(dst.name), replace(src, dst)))
    ours.save_pretrained(out, max_shard_size=20_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and sorted(p.name for p in out.glob("*.safetensors")) == shards
    assert written[-1] == "model.safetensors.index.json"  # the index last: it never lists a missing shard
    tokens = torch.randint(0, COMMON["vocab_size"], (2, 17), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = ours(tokens)
        hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
        assert (hf(tokens).logits - expected).abs().max().item() < 1e-5
        assert torch.equal(Transformer.from_pretrained(out)(tokens), expected)
    ours.save_pretrained(out)  # one shard again: the index and the old shards go
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    with torch.no_grad():
        assert (transformers.AutoModelForCausalLM.from_pretrained(out)(tokens).logits - expected).abs().max() < 1e-5


# ---- bad checkpoints: one clear error each --------------------------------------------------


@pytest.fixture
def good_dir(tmp_path):
    make_hf("llama_gqa_untied", tmp_path)
    return tmp_path


def test_unsupported_architecture(good_dir):
    cfg = json.loads((good_dir / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (good_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="unsupported architecture 'GPT2LMHeadModel'.*LlamaForCausalLM"):
        Transformer.from_pretrained(good_dir)


def test_missing_tensor(good_dir):
    from safetensors.torch import load_file, save_file
    file = good_dir / "model.safetensors"
    state = load_file(file)
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, file)
    with pytest.raises(CheckpointError, match="missing tensors model.layers.1.mlp.up_proj.weight"):
        Transformer.from_pretrained(good_dir)


def test_unexpected_tensor_and_bad_shape(good_dir):
    from safetensors.torch import load_file, save_file
    file = good_dir / "model.safetensors"
    state = load_file(file)
    state["model.layers.0.extra.weight"] = torch.zeros(2)
    save_file(state, file)
    with pytest.raises(CheckpointError, match="unexpected tensor 'model.layers.0.extra.weight'"):
        Transformer.from_pretrained(good_dir)
    del state["model.layers.0.extra.weight"]
    state["model.norm.weight"] = torch.ones(5)
    save_file(state, file)
    with pytest.raises(CheckpointError, match=r"'model.norm.weight' has shape \(5,\), config says \(64,\)"):
        Transformer.from_pretrained(good_dir)


def test_truncated_safetensors(good_dir):
    file = good_dir / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors: corrupt or truncated"):
        Transformer.from_pretrained(good_dir)


def test_missing_config(good_dir):
    (good_dir / "config.json").unlink()
    with pytest.raises(Exception, match="config.json"):
        Transformer.from_pretrained(good_dir)


# ---- the bundled real model ---------------------------------------------------------------------


@pytest.mark.bundled
def test_bundled_model_answers_paris_and_matches_transformers_gguf_loader():
    import hub
    from tokenizer import Tokenizer

    ours = Transformer.from_pretrained(hub.BUNDLED_NAME)
    tok = Tokenizer.from_pretrained(hub.BUNDLED_NAME)
    prompt = tok.encode_chat([{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True)
    [reply], _ = generate(ours, [prompt], max_new_tokens=24, stop_ids={tok.eos_id})
    assert "Paris" in tok.decode(reply)
    assert reply[-1] == tok.eos_id  # a complete answer, not an immediate or missing end of turn

    gguf = hub.bundled_gguf_path()  # transformers dequantizes the GGUF itself: an independent conversion
    ref = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokens = torch.tensor([prompt + reply])
    with torch.no_grad():
        assert (ref.eval()(tokens).logits - ours(tokens)).abs().max().item() < 1e-4
