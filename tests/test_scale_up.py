"""What a 7B run on GPUs needs, checked on the CPU: activation checkpointing, FSDP2 mixed
precision, compiled blocks that do not recompile, and the sharded trainer state (docs/gpu.md)."""

from contextlib import nullcontext

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import model as model_module
import train
from model import Transformer
from test_model import CASES, make_hf
from test_train import QUESTIONS, GradientRecorder, base_args, final_weights, random_sequences, write_data

torch.set_num_threads(1)
KNOBS = dict(beta=1.0, gamma_min=0.1, gamma_max=2.0, b=None, top_k=None)


def saved_bytes(fn):
    """Bytes of the distinct tensors autograd saves for backward while fn() runs forward."""
    seen = {}

    def pack(t):
        seen[(t.untyped_storage().data_ptr(), t.dtype)] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


# ---- 1. Activation checkpointing ----------------------------------------------------------------


@pytest.mark.parametrize("case", ["qwen2_bias_tied", "qwen3_qk_norm"])
@pytest.mark.parametrize("pack_len", [None, 64], ids=["unpacked", "packed"])
def test_checkpointed_gradients_equal_plain_ones(case, pack_len, tmp_path):
    """Recomputing each block in backward gives bit-identical gradients, φ and loss, and keeps
    far less for backward: each block's input instead of all its intermediates."""
    make_hf(case, tmp_path)
    model = Transformer.from_pretrained(tmp_path).train()
    head = train.LossHead(model, "idft", KNOBS)
    micro_batches = train.step_batches(random_sequences([5, 37, 12, 64, 9, 23], vocab=97), 0, 6, 0, 0, 1, 2, pack_len)
    runs = {}
    for checkpointing in (False, True):
        model.activation_checkpointing = checkpointing
        recorder = GradientRecorder(head.parameters())
        b = train.collate(micro_batches[0], 0, "cpu", pack_len)
        _, saved = saved_bytes(lambda: head(b.inputs, b.targets, b.mask, torch.tensor(0.7), b.positions, b.docs))
        result = train.train_step(head, head, recorder, micro_batches, 0.7, 0, "cpu", nullcontext(), 0, 1, pack_len)
        runs[checkpointing] = result, recorder.grads, saved
    (plain, plain_grads, plain_saved), (ckpt, ckpt_grads, ckpt_saved) = runs[False], runs[True]
    assert ckpt.loss == plain.loss and torch.equal(ckpt.phi, plain.phi)
    assert all(torch.equal(g, ref) for g, ref in zip(ckpt_grads, plain_grads))
    assert ckpt_saved < 0.5 * plain_saved, (ckpt_saved, plain_saved)


def test_train_with_activation_checkpointing_writes_the_same_model(tiny_model_dir, tmp_path, monkeypatch):
    data = write_data(tmp_path / "d.jsonl", QUESTIONS)
    calls = []
    monkeypatch.setattr(model_module, "checkpoint", lambda *a, **k: calls.append(1) or checkpoint(*a, **k))
    for name, flag in (("plain", "--no-activation-checkpointing"), ("ckpt", "--activation-checkpointing")):
        assert train.main(base_args(tiny_model_dir, data, tmp_path / name, max_steps=2) + [flag]) == 0
        assert bool(calls) == (name == "ckpt")  # 2 steps × 2 micro-batches × 2 blocks
    plain, ckpt = final_weights(tmp_path / "plain"), final_weights(tmp_path / "ckpt")
    assert all(torch.equal(plain[k], ckpt[k]) for k in plain)
