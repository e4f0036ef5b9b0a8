"""scripts/gpu_check.sh: one command for every GPU check; without a GPU it stops at once."""

import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = (ROOT / "scripts" / "gpu_check.sh").read_text()
STEPS = re.findall(r'^step "([^"]+)" (\d+) ', SCRIPT, flags=re.M)  # (name, budget in seconds)


@pytest.mark.skipif(torch.cuda.is_available() or shutil.which("nvidia-smi") is not None,
                    reason="a GPU is here: the script would run the whole check")
def test_without_a_gpu_it_exits_nonzero_at_once_with_one_line():
    start = time.perf_counter()
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], capture_output=True, text=True,
                          timeout=60)
    assert time.perf_counter() - start < 10
    assert proc.returncode != 0 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "no NVIDIA GPU" in proc.stderr


def test_budgets_fit_in_nine_minutes_and_the_docs_list_each_step():
    assert len(STEPS) == 9 and sum(int(b) for _, b in STEPS) <= 9 * 60
    section = (ROOT / "docs" / "scale-out.md").read_text().split("**The GPU check.**", 1)[1]
    for name, budget in STEPS:
        command = name.split(" ")[0]  # "bench/decode.py", "CUDA", ...
        assert re.search(rf"{re.escape(command)}.*\| {budget} s \|", section), (name, budget)
