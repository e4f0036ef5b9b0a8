"""What the bench scripts share: the model pair, interleaved timing, peak memory, result files.

Every benchmark runs ours and a peer in one process on the same weights, data, dtype and
device. `interleaved` alternates them call by call (ours, peer, peer, ours, ...), so a change
in machine load (this CPU is shared) hits both sides alike, and reports every timing and the
median after untimed warm-up calls. Peak memory is measured in a fresh worker process per
side (`run_worker`), so one side's allocations never count against the other.

Result files: bench/results/<name>-<device>[-quick].json, each with the machine, versions,
the command, the date, the load average at start and end, the settings, "results" and
"ratios"; bench/report.py turns them into BENCHMARKS.md.

Threads: one per process on CPU unless --threads says otherwise. The 2 cores here are
shared; with 2 threads, a neighbour's busy process stalls every OpenMP barrier (greedy
decoding of the bundled model measured 2 tok/s with 2 threads vs 17 with 1, same minute).

Models: `--quick` uses a tiny random Llama written by our save_pretrained (TINY_CONFIG); the
default is the bundled SmolLM2-135M-Instruct (hub.bundled_model_dir()). transformers loads
the very same directory as LlamaForCausalLM.
"""

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the bench scripts run from any directory

from plumbing.files import atomic_write  # after the path setup
from model import ModelConfig, Transformer

RESULTS_DIR = ROOT / "bench" / "results"
GiB = 2**30
TINY_CONFIG = dict(  # HF config of the --quick model: small, but every part of the real architecture
    architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=2048, hidden_size=128,
    intermediate_size=384, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
    rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=8192, tie_word_embeddings=True,
    hidden_act="silu", bos_token_id=1, eos_token_id=2)
TINY_NAME = "tiny random Llama (vocab 2048, dim 128, 4 layers, GQA 4/2, tied)"


# ---- Command line -----------------------------------------------------------------------------


def add_common_args(ap, reps: int):
    cuda = torch.cuda.is_available()
    ap.add_argument("--quick", action="store_true", help="tiny random model instead of the bundled one")
    ap.add_argument("--reps", type=int, default=reps, help="timed calls per side after the warm-up")
    ap.add_argument("--device", default="cuda" if cuda else "cpu")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads (default 1 on CPU: the cores are shared, see bench/common.py)")


def setup(args) -> torch.device:
    device = torch.device(args.device)
    if device.type == "cpu" or args.threads:
        torch.set_num_threads(args.threads or 1)
    return device


# ---- Models -----------------------------------------------------------------------------------


def model_dir(quick: bool, scratch: Path) -> tuple[Path, str]:
    """The HF directory both sides load, and its name for the report.

    quick: a tiny random model written into `scratch` (seeded, so every process gets the same
    weights); otherwise the bundled SmolLM2-135M-Instruct.
    """
    if not quick:
        from hub import BUNDLED_NAME, bundled_model_dir

        return bundled_model_dir(), f"{BUNDLED_NAME} (bundled GGUF, dequantized)"
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_hf(TINY_CONFIG))
    with torch.no_grad():  # moderate logits: neither one-hot nor uniform next-token distributions
        model.embed_tokens.weight.normal_(0.0, 0.15)
    model.save_pretrained(scratch)
    return Path(scratch), TINY_NAME


def load_ours(path, device, dtype=torch.float32) -> Transformer:
    return Transformer.from_pretrained(path, dtype=dtype, device=device)


def load_hf(path, device, dtype=torch.float32):
    """The peer: transformers' LlamaForCausalLM on the same directory (default sdpa attention)."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers.LlamaForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()


def gsm_examples(n: int) -> list:
    """n gsm_symbolic problems (questions of varied lengths, with reference solutions) as data.Examples."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import make_gsm8k

    from data import Example

    generators = make_gsm8k.load_generators()
    rows = make_gsm8k.make_split("bench", sorted(generators), n, 0, generators, set(),
                                 {"duplicate": 0, "inconsistent": 0})
    return [Example(r["id"], [{"role": "user", "content": r["question"]}], r["answer"], r["final_answer"], 0,
                    "gsm_symbolic") for r in rows]


def gsm_prompts(n: int) -> list[list[int]]:
    """n chat prompts (gsm_symbolic questions, varied lengths) for the bundled model."""
    from hub import BUNDLED_NAME
    from tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(BUNDLED_NAME)
    return [tok.encode_chat(ex.prompt, add_generation_prompt=True) for ex in gsm_examples(n)]


def random_prompts(n: int, vocab: int, lo: int, hi: int, seed: int = 0) -> list[list[int]]:
    """n random prompts with lengths in [lo, hi): the --quick stand-in for real prompts."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi, (n,), generator=g).tolist()
    return [torch.randint(3, vocab, (k,), generator=g).tolist() for k in lengths]


# ---- Timing -----------------------------------------------------------------------------------


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def interleaved(runs: dict, reps: int, warmup: int, device) -> tuple[dict, dict]:
    """Seconds per call of each zero-argument function in `runs`, and each one's last result.

    `warmup` untimed rounds first (allocator, caches, torch.compile), then `reps` timed rounds;
    every round calls each function once, the order reversed every other round (ours, peer,
    peer, ours, ...) so that neither side always runs first after the other.
    """
    names = list(runs)
    last = {}
    for _ in range(warmup):
        for name in names:
            last[name] = runs[name]()
    seconds = {name: [] for name in names}
    for r in range(reps):
        for name in names if r % 2 == 0 else names[::-1]:
            sync(device)
            start = time.perf_counter()
            last[name] = runs[name]()
            sync(device)
            seconds[name].append(time.perf_counter() - start)
    return seconds, last


def timing(seconds: list[float]) -> dict:
    return {"seconds_median": statistics.median(seconds), "seconds_all": [round(s, 5) for s in seconds]}


# ---- Peak memory (inside a worker process) ----------------------------------------------------


def _vm_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak(device) -> int:
    """Start a new peak window; returns the bytes held now (CUDA: allocated; CPU: resident)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # Linux: resets VmHWM (peak RSS) to the current RSS
    return _vm_kib("VmRSS") * 1024


def peak(device) -> int:
    """Peak bytes since the last reset_peak, or since the process started (CUDA: max allocated;
    CPU: VmHWM, which unlike getrusage's ru_maxrss does not inherit the parent's peak)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return _vm_kib("VmHWM") * 1024


def run_worker(script: str, args: list[str]) -> dict:
    """Run `script --worker ...` in a fresh Python process; returns the JSON of its last stdout line."""
    # big blocks straight from mmap, so freed memory leaves the RSS and peaks reflect live memory
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    cmd = [sys.executable, script, *args]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode:
        sys.stderr.write(out.stderr)
        raise SystemExit(f"worker failed: {' '.join(cmd)}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---- Machine and result files -----------------------------------------------------------------


def device_name(device) -> str:
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def machine(device) -> dict:
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "device": device_name(device), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "ram_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB, 1)}
    if torch.device(device).type == "cuda":
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory / GiB, 1)
    return info


def versions() -> dict:
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}


def new_report(device, settings: dict) -> dict:
    """The header every result file starts with; write_report adds the end-of-run load."""
    return {"machine": machine(device), "versions": versions(),
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), "loadavg_start": list(os.getloadavg()),
            "settings": settings}


def write_report(name: str, device, quick: bool, report: dict) -> Path:
    report["loadavg_end"] = list(os.getloadavg())
    slug = "".join(c if c.isalnum() else "-" for c in device_name(device).lower()).strip("-")
    path = RESULTS_DIR / f"{name}-{slug}{'-quick' if quick else ''}.json"
    atomic_write(path, json.dumps(report, indent=2) + "\n")
    print(f"wrote {path.relative_to(ROOT)}")
    return path
