"""What a 7B run on GPUs needs, checked on the CPU: activation checkpointing, FSDP2 mixed
precision, compiled blocks that do not recompile, and the sharded trainer state (docs/gpu.md)."""

import json
import os
import shutil
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
import transformers
from torch.utils.checkpoint import checkpoint

import model as model_module
import train
from model import Transformer
from plumbing.checkpoints import SavedWeights
from test_model import make_hf
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
        result = train.train_step(head, recorder, micro_batches, 0.7, 0, "cpu", nullcontext(), 0, 1, pack_len)
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


# ---- 2 and 3. Compiled blocks, FSDP2 mixed precision ---------------------------------------------

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("scale_up_worker.py")
ENV = dict(os.environ, OMP_NUM_THREADS="1")
ONE_PROCESS_GRAPHS = 3  # compile_blocks: the first shape, any other, a single row
FSDP_GRAPHS = 4  # under FSDP2 one more: Dynamo reports a guard on a value that has become None


def worker(*args, nproc=1):
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] if nproc > 1 else []
    proc = subprocess.run([sys.executable, *launcher, str(WORKER), *args], env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][0])


@pytest.fixture(scope="module")
def one_process():
    return worker("--layouts", "packed", "unpacked")


def assert_compiles_stop(steps, bound):
    graphs = [s["graphs"] for s in steps]
    assert len({tuple(s["rows"]) for s in steps}) >= 3 and len({s["valid"] for s in steps}) >= 8  # they do vary
    assert 0 < graphs[-1] <= bound, graphs  # bounded: no graph per new row count, length or valid-token count
    assert sum(b > a for a, b in zip(graphs, graphs[1:])) <= 2, graphs


@pytest.mark.parametrize("layout", ["packed", "unpacked"])
def test_compiled_blocks_stop_compiling_after_the_first_shapes(layout, one_process):
    """10 steps whose row counts, lengths and valid-token counts all change: the compiled
    blocks (checkpointed, Dynamo's aot_eager backend) capture at most ONE_PROCESS_GRAPHS
    graphs, then none; the loss stays eager, so the valid-token count never recompiles."""
    assert_compiles_stop(one_process[layout], ONE_PROCESS_GRAPHS)


def test_two_process_fsdp_bf16_compiled_step_is_bounded_and_mixed_precision(one_process):
    """2-process FSDP2 (gloo) with compiled, checkpointed blocks and --dtype bfloat16: the
    blocks compute with bfloat16 weights (gathered so by MixedPrecisionPolicy), parameters and
    AdamW state stay float32, the graphs stay bounded, and the losses follow the one-process
    float32 run within bfloat16 rounding."""
    run = worker("--fsdp", "--dtype", "bfloat16", nproc=2)
    assert run["compute_dtypes"] == ["torch.bfloat16"]
    assert run["param_dtypes"] == run["optimizer_dtypes"] == ["torch.float32"]
    assert one_process["compute_dtypes"] == ["torch.float32"]
    assert_compiles_stop(run["packed"], FSDP_GRAPHS)
    for two, one in zip(run["packed"], one_process["packed"]):
        assert two["loss"] == pytest.approx(one["loss"], rel=1e-2)


# ---- 4. Sharded trainer state, bfloat16 export -----------------------------------------------------


def test_bf16_export_loads_in_transformers_and_resume_stays_exact(tiny_model_dir, tmp_path):
    """--save-dtype bfloat16 exports the float32 state's weights rounded to bfloat16, which
    transformers loads, with logits equal to the float32 model's within bfloat16 rounding; a
    resume reads the float32 state/, not the export, so it continues bit for bit: its final
    export equals the uninterrupted run's."""
    data = write_data(tmp_path / "d.jsonl", QUESTIONS)
    out = tmp_path / "bf16"
    args = base_args(tiny_model_dir, data, out, save_dtype="bfloat16", max_steps=3, save_every=2)
    assert train.main(args) == 0
    uninterrupted = final_weights(out)
    shutil.rmtree(out / "checkpoints" / "step-0000003")  # as if stopped after step 2's save
    (out / "latest").write_text("checkpoints/step-0000002\n")
    step2 = out / "checkpoints" / "step-0000002"
    assert sorted(p.name for p in (step2 / "state").iterdir()) == [".metadata", "__0_0.distcp"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(step2)
    assert {p.dtype for p in hf.parameters()} == {torch.bfloat16}
    reference = Transformer.from_pretrained(step2)  # float32 architecture, then the float32 state
    saved = SavedWeights(step2 / "state", reference)
    reference.load_state_dict({name: saved[name] for name in reference.state_dict()})
    exported = final_weights(out)
    assert all(torch.equal(saved[name].to(torch.bfloat16), exported[Transformer.hf_name(name)])
               for name in reference.state_dict())
    tokens = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = reference(tokens), hf(tokens).logits.float()
    assert 0 < (got - want).abs().max() <= 0.02 * want.abs().max()  # bfloat16's 8-bit mantissas, 2 blocks
    assert train.main(args + ["--resume"]) == 0
    resumed = final_weights(out)
    assert all(torch.equal(uninterrupted[k], resumed[k]) for k in uninterrupted)


def test_two_fsdp_processes_save_shards_that_one_process_resumes(tiny_model_dir, tmp_path):
    """Each FSDP2 rank writes its own part of the state (no gather on rank 0); one process
    resumes from it (DCP reshards on load) and lands where a one-process run lands."""
    data = write_data(tmp_path / "d.jsonl", QUESTIONS)
    args = base_args(tiny_model_dir, data, tmp_path / "fsdp", micro_batch_size=1, max_steps=3, save_every=2)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "train.py"), *args, "--fsdp"]
    proc = subprocess.run(cmd, env=dict(ENV, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = tmp_path / "fsdp" / "checkpoints" / "step-0000002" / "state"
    assert sorted(p.name for p in state.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    shutil.rmtree(tmp_path / "fsdp" / "checkpoints" / "step-0000003")  # as if stopped after step 2's save
    (tmp_path / "fsdp" / "latest").write_text("checkpoints/step-0000002\n")
    assert train.main(args + ["--resume"]) == 0
    assert train.main(base_args(tiny_model_dir, data, tmp_path / "one", micro_batch_size=1, max_steps=3,
                                save_every=2)) == 0
    one, resumed = final_weights(tmp_path / "one"), final_weights(tmp_path / "fsdp")
    for name in one:
        assert torch.allclose(one[name], resumed[name], atol=2e-6, rtol=0), name
