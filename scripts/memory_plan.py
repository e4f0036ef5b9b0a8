"""Will it fit? The memory one GPU needs to train a model with train.py, before any download:

    python scripts/memory_plan.py --model qwen2.5-7b --seq-len 4096 --gpus 8 --fsdp --activation-checkpointing
    python scripts/memory_plan.py --model Qwen/Qwen2.5-Math-7B ...    # a hub id: only config.json is fetched
    python scripts/memory_plan.py --model path/to/config.json ...     # or a model directory
    python scripts/memory_plan.py --model qwen2.5-1.5b ... --measure  # run it here: measured vs planned
    python scripts/memory_plan.py --table                             # the table of docs/gpu.md

The plan follows train.py's code path, per GPU, for P parameters (P_block per decoder block,
L blocks), G GPUs (G = 1 without --fsdp: DDP keeps a whole copy on each), a micro-batch of
n = B·T tokens, all of them trained (the worst case), D the width, F the MLP width, |V| the
vocabulary, a the compute dtype's bytes (bfloat16: 2) and r the residual stream's (float32 and
autocast: 4; FSDP2's bfloat16 parameters: 2):

    parameters         4P / G     float32 master weights
    gradients          4P / G     float32, alive from the first micro-batch to the optimizer step
    optimizer state    8P / G     AdamW's two moments, float32
    all-gather buffers            FSDP2: the root's parameters (embedding, final norm, W_out) and
                                  their gradients in the compute dtype for the whole step, plus two
                                  blocks (this one, the next one prefetched); autocast without
                                  checkpointing: the bf16 copy of every block weight, saved for backward
    saved activations             per block and token (activation_bytes): the inputs of every
                                  matmul, RMSNorm, RoPE and attention (q, k, v, out, log-sum-exp);
                                  with checkpointing only the block's input, r·D; plus the final
                                  norm, RoPE's cos and sin, and the loss's input h (r·D per token)
    recomputed block              checkpointing: one block's activations again in backward, its
                                  weight copies (autocast) and backward temporaries
    loss chunk                    16 bytes per logit of one chunk (idft.LOSS_CHUNK tokens × |V|):
                                  logits, their float32 copy, exp, log p and its gradient in the
                                  chunk's backward (measured, `--measure`), plus W_out's cast (autocast)
    workspace                     an allowance outside the tensors: CUDA context, NCCL and cuBLAS
                                  buffers, allocator fragmentation (2 GiB + 5% of the rest; GPU only)

The peak is the sum, counting only the larger of the two transients (the recomputed block, or
the loss chunk): the loss runs first in backward, while every block's saved activations are
still held. It fits if the peak is at most the GPU's memory. The activation and state figures
agree with measured CPU peaks of small models within the tolerances of tests/test_memory_plan.py;
on a GPU, `scripts/gpu_check.sh` compares a Qwen2.5-1.5B-shaped step with
torch.cuda.max_memory_allocated.
"""

import json
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from any directory
import torch  # noqa: E402

from ddt import ROW_SUM_ELEMENTS  # noqa: E402
from idft import LOSS_CHUNK  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402
from plumbing.cli import ArgumentParser, UserError, positive_int, run_cli  # noqa: E402
from plumbing.files import replace_marked_block  # noqa: E402

GIB = 2**30
# the architecture fields of each model's published config.json
KNOWN = {
    "qwen2.5-1.5b": dict(architectures=["Qwen2ForCausalLM"], hidden_size=1536, intermediate_size=8960,
                         num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                         max_position_embeddings=131072, rope_theta=1000000.0, rms_norm_eps=1e-06,
                         tie_word_embeddings=True, hidden_act="silu"),
    "qwen2.5-7b": dict(architectures=["Qwen2ForCausalLM"], hidden_size=3584, intermediate_size=18944,
                       num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                       max_position_embeddings=131072, rope_theta=1000000.0, rms_norm_eps=1e-06,
                       tie_word_embeddings=False, hidden_act="silu"),
    "llama-3.1-8b": dict(architectures=["LlamaForCausalLM"], hidden_size=4096, intermediate_size=14336,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                         vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0,
                         rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 8192, "rope_type": "llama3"},
                         rms_norm_eps=1e-05, tie_word_embeddings=False, hidden_act="silu"),
    "qwen3-8b": dict(architectures=["Qwen3ForCausalLM"], hidden_size=4096, intermediate_size=12288,
                     num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                     vocab_size=151936, max_position_embeddings=40960, rope_theta=1000000, rms_norm_eps=1e-06,
                     tie_word_embeddings=False, attention_bias=False, hidden_act="silu"),
}
GPUS = {"80 GB": 81559 * 2**20, "141 GB": 143771 * 2**20}  # usable memory nvidia-smi reports: H100 80GB, H200
LOSS_BYTES_PER_LOGIT = 16
WORKSPACE_GIB, WORKSPACE_SHARE = 2, 0.05
TABLE_LENGTHS = (4096, 8192, 16384, 32768)


@dataclass
class Setup:
    seq_len: int
    micro_batch_size: int = 1
    gpus: int = 1
    fsdp: bool = False
    activation_checkpointing: bool = False
    dtype: str = "bfloat16"  # train.py's --dtype
    gpu: bool = True  # False: a CPU run (no workspace allowance)

    @property
    def precision(self) -> str:
        """float32; autocast (bfloat16 compute over float32 weights); bf16-params (FSDP2's policy)."""
        if self.dtype == "float32":
            return "float32"
        return "bf16-params" if self.fsdp else "autocast"


@dataclass
class Plan:  # bytes per GPU
    parameters: float
    gradients: float
    optimizer_state: float
    all_gather_buffers: float
    saved_activations: float
    recomputed_block: float
    loss_chunk: float
    workspace: float

    @property
    def allocated(self) -> float:
        """What torch.cuda.max_memory_allocated should report: everything but the workspace."""
        return (self.parameters + self.gradients + self.optimizer_state + self.all_gather_buffers
                + self.saved_activations + max(self.recomputed_block, self.loss_chunk))

    @property
    def peak(self) -> float:
        return self.allocated + self.workspace


def load_config(name: str) -> ModelConfig:
    """A known name (KNOWN), a config.json, a model directory, or a hub id (config.json only)."""
    if name.lower() in KNOWN:
        return ModelConfig.from_hf(KNOWN[name.lower()])
    path = Path(name)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        if path.exists() or name.count("/") != 1:
            raise UserError(f"--model {name}: not a config.json, a model directory, a hub id or one of "
                            f"{', '.join(KNOWN)}")
        from huggingface_hub import hf_hub_download

        path = Path(hf_hub_download(name, "config.json"))
    try:
        return ModelConfig.from_hf(json.loads(path.read_text()))
    except (json.JSONDecodeError, KeyError) as e:
        raise UserError(f"{path}: cannot read the model config ({type(e).__name__}: {e})") from None


_COUNTS = {}  # repr(config) -> counts: a config is built once however many plans use it


def parameter_counts(cfg: ModelConfig) -> tuple[int, int, int]:
    """(P, P_block, P_root) of our Transformer, built on the meta device (no memory)."""
    key = repr(cfg)  # every architecture field, not the raw config.json
    if key not in _COUNTS:
        with torch.device("meta"):
            model = Transformer(cfg)
        total = sum(p.numel() for p in model.parameters())
        block = sum(p.numel() for p in model.layers[0].parameters())
        _COUNTS[key] = total, block, total - cfg.n_layers * block
    return _COUNTS[key]


def activation_bytes(cfg: ModelConfig, precision: str) -> float:
    """Bytes one block saves for backward per token, read off model.py's Block in eager mode:

        RMSNorm     x as float32 (4D), 1/rms (4), x/rms in x's dtype, and its output as the next
                    matmuls save it (autocast: one bf16 copy per matmul: 3 for q/k/v, 2 for the MLP)
        attention   q and k after RoPE, v, the output (a each), log-sum-exp (4 per head); the
                    output projection saves the same storage as attention's output
        q/k norm    (Qwen3) the RMSNorm terms per head, the input in the compute dtype
        MLP         gate, up, silu(gate), their product: 4·a·F
    """
    D, F, hd = cfg.dim, cfg.ffn_dim, cfg.head_dim
    q, kv = cfg.n_heads * hd, cfg.n_kv_heads * hd
    a = 4 if precision == "float32" else 2
    r = 2 if precision == "bf16-params" else 4
    copies = (3, 2) if precision == "autocast" else (1, 1)  # saved copies of each norm's output

    def norm(width, rows, in_bytes, consumers):
        return 4 * width + 4 * rows + in_bytes * width + consumers * a * width

    attention = a * (2 * q + 2 * kv) + 4 * cfg.n_heads
    qk_norm = norm(q, cfg.n_heads, a, 0) + norm(kv, cfg.n_kv_heads, a, 0) if cfg.qk_norm else 0
    return norm(D, 1, r, copies[0]) + attention + qk_norm + norm(D, 1, r, copies[1]) + 4 * a * F


def loss_chunk_bytes(cfg: ModelConfig, n: int, a: int, r: int) -> float:
    """The most idft.chunked_loss_sum holds at once beyond its input, for n tokens in chunks of
    C = LOSS_CHUNK: in a chunk's backward 16 bytes per logit (measured); while the chunk is
    recomputed, its logits (a bytes each), exp and log p (4 + 4) and ddt.row_sum's two float32
    blocks for H. With several chunks, W_out's and h's gradients are summed over them."""
    C, V = min(LOSS_CHUNK, n), cfg.vocab_size
    recompute = (a + 8) * C * V + 2 * 4 * min(C, max(1, ROW_SUM_ELEMENTS // V)) * V
    sums = r * (V * cfg.dim + n * cfg.dim) if n > C else 0
    return max(LOSS_BYTES_PER_LOGIT * C * V, recompute) + sums


def plan(cfg: ModelConfig, s: Setup) -> Plan:
    P, P_block, P_root = parameter_counts(cfg)
    precision = s.precision
    a = 4 if precision == "float32" else 2
    r = 2 if precision == "bf16-params" else 4
    n = s.micro_batch_size * s.seq_len
    G = s.gpus if s.fsdp else 1
    L, D, V = cfg.n_layers, cfg.dim, cfg.vocab_size
    per_block = activation_bytes(cfg, precision) * n
    if s.fsdp:  # the root's gathered parameters, and two gathered blocks (this one, the next one)
        buffers = a * (P_root + 2 * P_block)
    elif precision == "autocast" and not s.activation_checkpointing:
        buffers = 2 * L * P_block  # every block's bf16 weight copies, saved for backward
    else:
        buffers = 0
    blocks = L * (r * D * n if s.activation_checkpointing else per_block)
    # the final norm, RoPE's cos and sin, the token ids, positions and documents (packed rows), the loss's input h
    base = n * (4 * D + 4 + r * D + 2 * r * cfg.head_dim + 24 + r * D)
    # checkpointing: a block's activations again, its weight copies (autocast) and the gradients of
    # two of its [n, F] MLP tensors; without, a block's backward frees about as much as it allocates
    recompute = per_block + (2 * P_block if precision == "autocast" else 0) + 2 * a * cfg.ffn_dim * n \
        if s.activation_checkpointing else 0
    loss = loss_chunk_bytes(cfg, n, a, r) + (2 * V * D if precision == "autocast" else 0)  # + W_out's bf16 cast
    p = Plan(parameters=4 * P / G, gradients=4 * P / G, optimizer_state=8 * P / G, all_gather_buffers=buffers,
             saved_activations=blocks + base, recomputed_block=recompute, loss_chunk=loss, workspace=0)
    if s.gpu:
        p.workspace = WORKSPACE_GIB * GIB + WORKSPACE_SHARE * p.allocated
    return p


def largest_fitting(cfg: ModelConfig, s: Setup, memory: float, step: int = 1024) -> int:
    """The longest sequence (a multiple of `step`, up to the model's context) whose plan fits; 0: none."""
    def fits(T):
        return plan(cfg, Setup(**{**vars(s), "seq_len": T})).peak <= memory

    if not fits(step):
        return 0
    lo, hi = step, cfg.max_seq_len // step * step
    if fits(hi):
        return hi
    while hi - lo > step:  # fits(lo), not fits(hi); the peak grows with T
        mid = (lo + hi) // 2 // step * step
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def describe(cfg: ModelConfig, s: Setup) -> str:
    p = plan(cfg, s)
    P, _, _ = parameter_counts(cfg)
    how = (f"{s.gpus} GPU{'s' * (s.gpus > 1)}, {'FSDP2' if s.fsdp else 'DDP' if s.gpus > 1 else 'one process'}, "
           f"{s.precision}, activation checkpointing {'on' if s.activation_checkpointing else 'off'}")
    lines = [f"{cfg.architecture}, {P / 1e9:.2f}B parameters; micro-batch {s.micro_batch_size} × {s.seq_len} tokens; "
             f"{how}", "per GPU:"]
    transient = max(p.recomputed_block, p.loss_chunk)
    for f in fields(Plan):
        value = getattr(p, f.name)
        note = " (the larger transient: counted)" if f.name in ("recomputed_block", "loss_chunk") and value == transient \
            else " (not counted: the other transient is larger)" if f.name in ("recomputed_block", "loss_chunk") else ""
        lines.append(f"  {f.name.replace('_', ' '):<20} {value / GIB:8.2f} GiB{note}")
    lines.append(f"  {'peak':<20} {p.peak / GIB:8.2f} GiB  (allocated {p.allocated / GIB:.2f} GiB)")
    lines += [f"  fits in {name}: {'yes' if p.peak <= memory else 'no'}; longest sequence that fits: "
              f"{largest_fitting(cfg, s, memory) or 'none'}" for name, memory in GPUS.items()]
    return "\n".join(lines)


def table() -> str:
    """docs/gpu.md's table: peak GiB per GPU at micro-batch 1, and the longest sequence that fits."""
    header = ["model", "GPUs", "checkpointing"] + [f"{T // 1024}k" for T in TABLE_LENGTHS] + \
        [f"longest on {name}" for name in GPUS]
    rows = []
    for name in KNOWN:
        cfg = load_config(name)
        for gpus in (1, 8):
            for ac in (False, True):
                s = Setup(seq_len=0, gpus=gpus, fsdp=gpus > 1, activation_checkpointing=ac)
                peaks = [plan(cfg, Setup(**{**vars(s), "seq_len": T})).peak / GIB for T in TABLE_LENGTHS]
                longest = [largest_fitting(cfg, s, memory) for memory in GPUS.values()]
                rows.append([name, f"{gpus} ({'FSDP2' if s.fsdp else 'one process'})", "on" if ac else "off"]
                            + [f"{g:.0f}" for g in peaks] + [f"{t:,}" if t else "none" for t in longest])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


# ---- Measured: one training step here --------------------------------------------------------


def measure(cfg: ModelConfig, s: Setup, steps: int = 2, loss: str = "idft") -> dict:
    """Run `steps` optimizer steps of train.py's own code (train_step, LossHead, parallelize) on
    a randomly initialized model, two micro-batches per step, on this process's device (the
    process group, if any, gives FSDP2 or DDP), and report step 2's memory in bytes:

        state     parameters, gradients and optimizer state this rank holds (at the AdamW step)
        forward   growth over the second micro-batch's forward (saved activations, copies held)
        peak      torch.cuda.max_memory_allocated; on CPU the most bytes of tensors alive at
                  once, counted from before the model was built (LiveBytes)
    and tokens/s over the steps after the second, MFU (CUDA), the graphs compiled.
    """
    import torch.distributed as dist

    import train
    from plumbing.ranks import compiled_graphs, parallelize

    distributed, cuda = dist.is_initialized(), torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    world = dist.get_world_size() if distributed else 1
    torch.manual_seed(0)
    tracker = None if cuda else LiveBytes().__enter__()
    with torch.device(device):
        model = Transformer(cfg).train()
    model.activation_checkpointing = s.activation_checkpointing
    bf16 = s.dtype == "bfloat16"
    graphs_at_start = compiled_graphs()
    head = parallelize(train.LossHead(model, loss, {}), model.layers, distributed, s.fsdp, device,
                       param_dtype=torch.bfloat16 if bf16 and s.fsdp else None,
                       compile_backend="inductor" if cuda else None)
    optimizer = train.build_optimizer(head, 1e-5, 0.0, fused=cuda)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False,
                              enabled=bf16 and not (distributed and s.fsdp))  # as train.py
    g = torch.Generator().manual_seed(1)
    # packed rows, as train.py: each sequence of seq_len + 1 tokens fills a row of seq_len inputs
    rows = [[train.Sequence(torch.randint(0, cfg.vocab_size, (s.seq_len + 1,), generator=g).tolist(), 1)]
            for _ in range(2 * s.micro_batch_size)]
    micro_batches = [rows[:s.micro_batch_size], rows[s.micro_batch_size:]]
    marks, result, seconds = [], {}, []  # marks: memory at each forward's start and end

    def allocated():
        return torch.cuda.memory_allocated() if cuda else tracker.now

    head.register_forward_pre_hook(lambda *_: marks.append(allocated()))
    head.register_forward_hook(lambda *_: marks.append(allocated()))
    optimizer.register_step_pre_hook(lambda *_: result.__setitem__("state", tensor_bytes(
        head.parameters(), [p.grad for p in head.parameters()], optimizer)))
    for i in range(steps):
        if i == 1:  # the second step: AdamW's state exists, the first step's memory is freed
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            else:
                tracker.peak = tracker.now
        t0 = time.perf_counter()
        train.train_step(head, optimizer, micro_batches, 1.0, 0, device, autocast, 1.0, world, s.seq_len)
        if cuda:
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - t0)
        if i == 1:
            result["peak"] = torch.cuda.max_memory_allocated() if cuda else tracker.peak
            result["forward"] = marks[-1] - marks[-2]  # the second micro-batch's forward
    if tracker is not None:
        tracker.__exit__(None, None, None)
    result.update(device=torch.cuda.get_device_name() if cuda else "cpu", world=world,
                  compiled_graphs=compiled_graphs() - graphs_at_start)
    timed = seconds[2:]
    if timed:
        result["tokens_per_s"] = 2 * s.micro_batch_size * s.seq_len * world / (sum(timed) / len(timed))
        peak_flops = next((f for k, f in train.PEAK_BF16_FLOPS.items() if cuda and k in result["device"]), None)
        result["mfu"] = 6 * parameter_counts(cfg)[0] * result["tokens_per_s"] / (peak_flops * world) \
            if peak_flops else None
    return result


def tensor_bytes(parameters, tensors, optimizer) -> int:
    """Bytes of this rank's part of the given parameters and tensors, and of the optimizer's state."""
    def local(t):
        t = getattr(t, "_local_tensor", t)  # an FSDP2 shard (DTensor): this rank's part
        return t.numel() * t.element_size()

    total = sum(local(p) for p in parameters) + sum(local(t) for t in tensors if t is not None)
    if optimizer is not None:
        total += sum(local(v) for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v))
    return total


class LiveBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Bytes of the CPU tensors allocated inside the `with` block that are still alive (`now`),
    and their most (`peak`): each new storage an operator returns is counted until it is freed."""

    def __init__(self):
        super().__init__()
        self.sizes, self.now, self.peak = {}, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        import weakref

        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage()._cdata for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}  # a view or an in-place result allocates nothing
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                key = storage._cdata
                if key not in self.sizes and key not in inputs:
                    self.sizes[key] = storage.nbytes()
                    self.now += storage.nbytes()
                    self.peak = max(self.peak, self.now)
                    weakref.finalize(storage, self._free, key)
        return out

    def _free(self, key):
        self.now -= self.sizes.pop(key)


# ---- Command line -------------------------------------------------------------------------------


def parse_args(argv=None):
    ap = ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help=f"a config.json, a model directory, a hub id, or one of {', '.join(KNOWN)}")
    ap.add_argument("--seq-len", type=positive_int, default=4096, help="tokens per sequence (train.py's --max-len)")
    ap.add_argument("--micro-batch-size", type=positive_int, default=1, help="sequences per forward/backward")
    ap.add_argument("--gpus", type=positive_int, default=1, help="GPUs (train.py's processes)")
    ap.add_argument("--fsdp", action="store_true", help="FSDP2, as train.py --fsdp")
    ap.add_argument("--activation-checkpointing", action="store_true", help="as train.py --activation-checkpointing")
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16", help="train.py's --dtype")
    ap.add_argument("--measure", action="store_true",
                    help="also run training steps of a random model of this shape here (under torchrun with --fsdp) "
                         "and print the measured peak beside the plan")
    ap.add_argument("--steps", type=positive_int, default=2, help="with --measure: optimizer steps (≥ 3 for tokens/s)")
    ap.add_argument("--table", action="store_true", help="print docs/gpu.md's table")
    ap.add_argument("--write-docs", action="store_true", help="write the table into docs/gpu.md")
    args = ap.parse_args(argv)
    if not (args.model or args.table or args.write_docs):
        ap.error("--model is required (or --table)")
    return args


def main(argv=None):
    def run(argv):
        args = parse_args(argv)
        if args.table or args.write_docs:
            text = table()
            if args.write_docs:
                replace_marked_block(Path(__file__).resolve().parents[1] / "docs" / "gpu.md", "memory_plan:table", text)
            print(text)
            return 0
        cfg = load_config(args.model)
        s = Setup(args.seq_len, args.micro_batch_size, args.gpus, args.fsdp, args.activation_checkpointing, args.dtype,
                  gpu=not args.measure or torch.cuda.is_available())
        if not args.measure:
            print(describe(cfg, s))
            return 0
        from plumbing.ranks import setup_training

        distributed, rank, world, _ = setup_training()
        if world != (args.gpus if args.fsdp or distributed else 1):
            raise UserError(f"--gpus {args.gpus} but {world} process(es) run; with --fsdp start one per GPU under torchrun")
        result = measure(cfg, s, args.steps)
        if rank == 0:
            p = plan(cfg, s)
            print(describe(cfg, s))
            print(f"measured on {result['device']}: peak {result['peak'] / GIB:.2f} GiB allocated, planned "
                  f"{p.allocated / GIB:.2f} GiB (measured / planned = {result['peak'] / p.allocated:.2f}); "
                  f"state {result['state'] / GIB:.2f} GiB (planned "
                  f"{(p.parameters + p.gradients + p.optimizer_state) / GIB:.2f}); forward "
                  f"{result['forward'] / GIB:.2f} GiB")
            if "tokens_per_s" in result:
                mfu = f"{result['mfu']:.1%}" if result["mfu"] is not None else "n/a"
                print(f"tokens/s {result['tokens_per_s']:,.0f}; MFU {mfu}; graphs compiled {result['compiled_graphs']}")
        if distributed:
            import torch.distributed as dist

            dist.destroy_process_group()
        return 0

    return run_cli(run, argv)


if __name__ == "__main__":
    sys.exit(main())
