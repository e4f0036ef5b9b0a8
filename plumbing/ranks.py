"""Several processes under torchrun: who does what, and how the results come back together.

    torchrun --nproc_per_node 8 hinted_decode.py ...            one node, 8 GPUs
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 ...

Example-parallel tools (hinted_decode.py, eval.py, ddt.py): the split is fixed, never a matter
of timing. The examples are cut into batches of --batch-size in input order, and rank r of W
takes batches r, r + W, r + 2W, ... (`shard`). Each rank works on its own device
(cuda:LOCAL_RANK, or the CPU); the results come back in input order (`gather_in_order`). Only
rank 0 talks: the other ranks' stdout and stderr go to /dev/null, except tracebacks.

Training (train.py): `setup_training` joins the process group (NCCL on GPUs, gloo on CPUs) and
`parallelize` wraps the model in DDP, or shards it per block with FSDP2 (--fsdp).
"""

import hashlib
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn


@dataclass
class Ranks:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


# Ranks wait for each other only at the end of the work, which on uneven shares can take long:
# far longer than torch's default 30 minutes, and a crashed rank is caught by torchrun anyway.
RANK_TIMEOUT_HOURS = 24


def start_ranks() -> Ranks:
    """This process's place in the torchrun job (RANK, WORLD_SIZE set), or Ranks(0, 1) without
    torchrun. The ranks only exchange Python objects, once, at the end (gloo, also beside GPUs)."""
    if "RANK" not in os.environ:
        return Ranks()
    import atexit
    import traceback
    from datetime import timedelta

    dist.init_process_group("gloo", timeout=timedelta(hours=RANK_TIMEOUT_HOURS))
    atexit.register(dist.destroy_process_group)
    ranks = Ranks(dist.get_rank(), dist.get_world_size())
    if not ranks.main:  # one voice: rank 0's progress bar, summary and files
        sys.stdout = sys.stderr = open(os.devnull, "w")
        sys.excepthook = lambda *exc: traceback.print_exception(*exc, file=sys.__stderr__)
    return ranks


def rank_device(device: str) -> str:
    """`device` for this rank: a bare "cuda" under torchrun becomes this node's cuda:LOCAL_RANK."""
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(device)  # compiled decoding captures its CUDA graphs on this device
    return device


def shard(items: list, ranks: Ranks, batch_size: int = 1) -> list:
    """This rank's share: cut `items` into batches of `batch_size` in order, and take batches
    rank, rank + world, rank + 2·world, ... So an item meets the same batch neighbours as in a
    one-process run: padding widths and float rounding match too, not only the tokens."""
    starts = range(ranks.rank * batch_size, len(items), ranks.world * batch_size)
    return [item for start in starts for item in items[start:start + batch_size]]


def every_rank(value, ranks: Ranks) -> list:
    """[value of rank 0, value of rank 1, ...] on every rank (any picklable value)."""
    if ranks.world == 1:
        return [value]
    values = [None] * ranks.world
    dist.all_gather_object(values, value)
    return values


def gather_in_order(part: list, ranks: Ranks, batch_size: int = 1) -> list:
    """Every rank's results for its `shard` (same batch_size), back in input order, on every rank."""
    batches = [[p[i:i + batch_size] for i in range(0, len(p), batch_size)] for p in every_rank(part, ranks)]
    return [item for k in range(len(batches[0])) for rank_batches in batches if k < len(rank_batches)
            for item in rank_batches[k]]


def print_shares(n_mine: int, ranks: Ranks) -> int:
    """Say how many examples each process did (rank 0 prints, with several processes); their
    total. Every rank must call it: it waits for all of them."""
    counts = every_rank(n_mine, ranks)
    if ranks.world > 1:
        print(f"data parallel: {ranks.world} processes did {' + '.join(map(str, counts))} examples", file=sys.stderr)
    return sum(counts)


def example_seed(seed: int, example_id: str, stage: str = "") -> int:
    """The sampling seed of one example (and stage of the pipeline), from the run's --seed and the
    example's id alone: the same on any rank, in any batch, after any resume."""
    digest = hashlib.sha256(f"{seed}/{stage}/{example_id}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") >> 1  # 63 bits: torch.Generator.manual_seed takes them


# ---- Training processes -----------------------------------------------------------------------


def setup_training() -> tuple[bool, int, int, torch.device]:
    """(distributed, rank, world, device) of this training process: torchrun sets RANK and friends."""
    distributed = "RANK" in os.environ
    cuda = torch.cuda.is_available()
    if distributed:
        dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    return distributed, rank, world, device


def parallelize(loss_head: nn.Module, blocks, distributed: bool, fsdp: bool, device,
                param_dtype: torch.dtype | None = None, compile_backend: str | None = None) -> nn.Module:
    """DDP (gradients all-reduced), or FSDP2 (parameters sharded per block) with fsdp; the module
    itself in one process. The blocks are compiled first (`compile_blocks`), then sharded.

    param_dtype (FSDP2, e.g. bfloat16; docs/gpu.md): the blocks' and the root's parameters are
    all-gathered in that dtype and computed with as they are, gradients are reduce-scattered in
    float32 onto the float32 shards, so the master weights and AdamW's state stay float32 and
    no cast copy of a weight outlives its block (MixedPrecisionPolicy, no autocast). The root's
    forward inputs are not cast: λ stays float32.
    """
    if compile_backend is not None:
        compile_blocks(blocks, compile_backend)
    if distributed and fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        for block in blocks:
            fully_shard(block, mp_policy=MixedPrecisionPolicy(param_dtype, reduce_dtype=torch.float32))
        fully_shard(loss_head, mp_policy=MixedPrecisionPolicy(param_dtype, reduce_dtype=torch.float32,
                                                              cast_forward_inputs=False))
        return loss_head
    if distributed:
        return nn.parallel.DistributedDataParallel(loss_head, device_ids=[device.index] if device.type == "cuda" else None)
    return loss_head


def compile_blocks(blocks, backend: str = "inductor"):
    """torch.compile each decoder block's forward for training, whole (fullgraph: no graph
    break), leaving everything around it eager: the embedding, RoPE, the selection of the valid
    tokens and the chunked loss, whose shapes follow the data. DDP's and FSDP's hooks run outside
    the compiled code. Without gradients (evaluation, and decoding, which compiles its own step:
    model.decode_step) a block runs eager.

    The blocks share their graphs (same code, same shapes), and Dynamo's automatic dynamic shapes
    make a size symbolic the first time it changes, so training compiles at most 3 forward graphs
    per kind of batch (packed rows or not): the first shape, any other, and a single row (a size
    of 1 is always specialized), each with its backward; no more whatever the lengths and row
    counts that follow (tests/test_scale_up.py)."""
    for block in blocks:
        eager = block.forward
        compiled = torch.compile(eager, backend=backend, fullgraph=True)
        block.forward = lambda *a, compiled=compiled, eager=eager, **k: (
            compiled if torch.is_grad_enabled() else eager)(*a, **k)


def compiled_graphs() -> int:
    """Graphs torch.compile has captured in this process so far (each recompile adds one)."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper."""
    return getattr(module, "module", module)


def gather_tokens(x: torch.Tensor, world: int) -> torch.Tensor:
    """Every rank's 1-D per-token values, concatenated: the logged φ/γ statistics of a
    multi-process step are those of all its tokens, as one process would log them."""
    if world == 1:
        return x
    sizes = [torch.zeros((), dtype=torch.long, device=x.device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor(len(x), device=x.device))
    longest = int(max(sizes))
    parts = [torch.empty(longest, dtype=x.dtype, device=x.device) for _ in range(world)]
    dist.all_gather(parts, torch.cat([x, x.new_zeros(longest - len(x))]))  # all_gather needs equal sizes
    return torch.cat([part[:int(n)] for part, n in zip(parts, sizes)])
