"""scripts/memory_plan.py: its figures against memory measured on the CPU, and its speed on real configs."""

import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import memory_plan  # noqa: E402
from model import ModelConfig  # noqa: E402

torch.set_num_threads(1)
# measured / planned, for float32 on the CPU (no workspace there): the state is counted exactly; the
# saved activations follow model.py's ops (within 10%: what the formula leaves out, e.g. small
# temporaries); the peak adds the transients of backward (within 15%)
STATE_TOLERANCE, ACTIVATION_TOLERANCE, PEAK_TOLERANCE = 0.01, 0.10, 0.15


@pytest.mark.parametrize("architecture, checkpointing", [("Qwen2ForCausalLM", False), ("Qwen3ForCausalLM", True)],
                         ids=["qwen2-plain", "qwen3-checkpointed"])
def test_plan_agrees_with_measured_cpu_memory(architecture, checkpointing):
    """train.py's own step (LossHead, train_step, packed rows) on a small random model, two
    steps of two micro-batches: every tensor allocated is counted (memory_plan.LiveBytes)."""
    cfg = ModelConfig.from_hf(dict(architectures=[architecture], hidden_size=256, intermediate_size=640,
                                   num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                                   vocab_size=2048, max_position_embeddings=4096, tie_word_embeddings=False))
    setup = memory_plan.Setup(seq_len=512, micro_batch_size=2, activation_checkpointing=checkpointing,
                              dtype="float32", gpu=False)
    measured, plan = memory_plan.measure(cfg, setup), memory_plan.plan(cfg, setup)
    state = plan.parameters + plan.gradients + plan.optimizer_state
    assert measured["state"] == pytest.approx(state, rel=STATE_TOLERANCE)
    assert measured["forward"] == pytest.approx(plan.saved_activations, rel=ACTIVATION_TOLERANCE)
    assert measured["peak"] == pytest.approx(plan.allocated, rel=PEAK_TOLERANCE)


def test_checkpointing_and_fsdp_shrink_the_plan_of_a_real_7b_config_in_seconds():
    start = time.perf_counter()
    cfg = memory_plan.load_config("qwen2.5-7b")
    peaks = {(ac, gpus): memory_plan.plan(cfg, memory_plan.Setup(4096, 1, gpus, gpus > 1, ac)).peak / memory_plan.GIB
             for ac in (False, True) for gpus in (1, 8)}
    assert peaks[True, 8] < 0.5 * peaks[False, 8] and peaks[True, 8] < 0.5 * peaks[True, 1]
    assert 15 < peaks[True, 8] < 40  # the estimate for this run: 25–28 GB
    assert time.perf_counter() - start < 30


def test_table_in_the_docs_is_the_scripts_output():
    docs = (Path(__file__).resolve().parents[1] / "docs" / "gpu.md").read_text()
    block = docs.split("<!-- memory_plan:table:begin -->\n", 1)[1].split("<!-- memory_plan:table:end -->", 1)[0]
    assert block.strip() == memory_plan.table().strip()
