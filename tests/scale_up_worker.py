"""Run by tests/test_scale_up.py, in one process or under torchrun: 10 training steps of a tiny
model per layout (packed rows, and one sequence per row), whose batches change their row counts,
lengths and valid-token counts every step, with
activation checkpointing, compiled blocks (Dynamo, backend aot_eager: graph capture and AOT
autograd without a C++ compiler) and, with --fsdp, FSDP2 (--dtype bfloat16: its mixed-precision
policy). Prints one JSON line: per layout, each step's loss, valid tokens and graphs compiled
so far, and the dtypes the blocks saw and the optimizer holds (rank 0's)."""

import argparse
import json
import sys
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402

import train  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402
from plumbing.ranks import compiled_graphs, parallelize, setup_training  # noqa: E402
from test_train import random_sequences  # noqa: E402  (this script's directory is on the path)

ap = argparse.ArgumentParser()
ap.add_argument("--fsdp", action="store_true")
ap.add_argument("--layouts", nargs="+", choices=("packed", "unpacked"), default=["packed"])
ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
ap.add_argument("--dtype", default="float32")
args = ap.parse_args()

torch.set_num_threads(1)
distributed, rank, world, device = setup_training()
torch.manual_seed(0)
model = Transformer(ModelConfig(vocab_size=97, dim=64, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=96))
model.train().activation_checkpointing = True
head = train.LossHead(model, "idft", dict(beta=1.0, gamma_min=0.1, gamma_max=2.0, b=None, top_k=None))
bf16 = args.dtype == "bfloat16"
head = parallelize(head, model.layers, distributed, args.fsdp, device, param_dtype=torch.bfloat16 if bf16 else None,
                   compile_backend="aot_eager" if args.compile else None)
autocast = torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False) if bf16 and not args.fsdp else nullcontext()
seen = set()  # the dtypes of the weights the blocks compute with
for block in model.layers:
    block.register_forward_pre_hook(lambda m, i: seen.add(str(m.mlp.up_proj.weight.dtype)))  # after FSDP's gather
optimizer = torch.optim.AdamW(head.parameters(), lr=1e-3)
runs = {}
for layout in args.layouts:  # the graphs of packed and unpacked batches differ (documents or none)
    pack_len, start = (64 if layout == "packed" else None), compiled_graphs()
    g = torch.Generator().manual_seed(0)
    runs[layout] = []
    for step in range(10):
        n = int(torch.randint(2, 11, (1,), generator=g))
        seqs = random_sequences(torch.randint(3, 60, (n,), generator=g).tolist(), 97, step)
        micro = train.deal(seqs, rank, world, 3, pack_len)
        result = train.train_step(head, optimizer, micro, 0.5, 0, device, autocast, 1.0, world, pack_len)
        runs[layout].append({"loss": result.loss, "graphs": compiled_graphs() - start,
                             "rows": [len(mb) for mb in micro], "valid": int(result.phi.numel())})
state = [str(t.dtype) for s in optimizer.state.values() for t in s.values() if t.ndim]
if rank == 0:  # one line, not one per rank: two ranks' prints can interleave on the shared stdout
    print(json.dumps({**runs, "compute_dtypes": sorted(seen), "optimizer_dtypes": sorted(set(state)),
                      "param_dtypes": sorted({str(p.dtype) for p in head.parameters()})}))
