"""Fine-tune a model with IDFT (or SFT / DFT / EAFT): `python train.py --data gsm8k.jsonl`.

The loss is idft.py's (SPEC §3); this file feeds it and keeps the run safe:

    per example   tokens = chat(prompt) ++ response ++ <end of turn>; loss only on the response
                  and the end-of-turn token (mask). Too long for --max-len: skipped, counted.
    per step      λ = lambda_schedule(step, total_steps, warmup_ratio, transition_ratio)
                  L = Σ_{valid tokens of the whole step} loss_t  /  N_valid(step)
                  N_valid counts every micro-batch on every rank, so gradient accumulation and
                  data parallelism weigh each token equally (the authors average per
                  micro-batch, which does not).
    optimizer     AdamW (β 0.9/0.95, weight decay on matrices only), linear warmup then cosine,
                  gradient clipping.

The memory-lean path (idft.chunked_loss) forms the logits chunk by chunk from the final
hidden states, so no [tokens × vocab] tensor is ever held for the whole batch.

Checkpoints are Hugging Face directories (config.json, model.safetensors, tokenizer files)
plus trainer_state.pt (optimizer, step, RNG), written to a temporary directory and renamed
into place. `--resume` continues where the last checkpoint stopped, λ schedule included; on
CPU the continuation is bit-for-bit the same as an uninterrupted run. Ctrl-C saves first (once
a step has finished). A resume must keep the settings that define the run (RUN/args.json,
`check_same_run`); only the flags in RESUMABLE may change. One run per --out at a time
(data.OutputLock).

Data parallel: `torchrun --nproc_per_node N train.py ...` (DDP; `--fsdp` shards parameters
with FSDP2). Plot a run's curves: `python train.py --plot RUN_DIR`.
"""

import argparse
import json
import math
import os
import random
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from tqdm import tqdm

import idft
from data import (ArgumentParser, UserError, append_record, atomic_write, changed_settings, check_input, check_output,
                  drop_torn_tail, encode_example, file_sha256, fraction, load_examples, lock_output, nonnegative_float,
                  nonnegative_int, positive_float, positive_int, read_log)
from ddt import next_token_targets, pad_sequences
from hub import BUNDLED_NAME, resolve_model_dir
from model import CheckpointError, Transformer
from tokenizer import Tokenizer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json",
                   "generation_config.json", "tokenizer.model")
LENGTH_BUCKET = 64  # micro-batches are padded to a multiple of this: few distinct shapes to compile
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "4090": 165e12}


# ---- Data -------------------------------------------------------------------------------------


class Sequence(NamedTuple):
    ids: list[int]  # prompt ++ response ++ end of turn
    n_prompt: int  # the first n_prompt tokens are not trained on


def tokenize_dataset(path, tokenizer, max_len) -> tuple[list[Sequence], int]:
    """All examples of a file as token sequences, and how many were skipped as too long."""
    seqs, skipped = [], 0
    for ex in load_examples(path):
        ids, n_prompt = encode_example(tokenizer, ex)
        if len(ids) > max_len:
            skipped += 1  # never truncate an answer mid-way: a cut answer teaches the wrong end
        else:
            seqs.append(Sequence(ids, n_prompt))
    return seqs, skipped


def collate(seqs: list[Sequence], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded inputs, targets and loss mask (ddt.next_token_targets), [B, T] with T a
    multiple of LENGTH_BUCKET."""
    width = -(-max(len(s.ids) - 1 for s in seqs) // LENGTH_BUCKET) * LENGTH_BUCKET
    tokens, response = pad_sequences(seqs, pad_id, width + 1, device)
    targets, mask = next_token_targets(tokens, response)
    return tokens[:, :-1], targets, mask


def step_batches(seqs: list[Sequence], step: int, batch_size: int, seed: int, rank: int, world: int,
                 micro_batch_size: int) -> list[list[Sequence]]:
    """This rank's micro-batches for optimizer step `step`.

    The order is a pure function of (seed, epoch), so a resumed run sees exactly the batches
    the uninterrupted run would. Within a step the sequences are sorted by length before they
    are dealt to ranks and micro-batches: less padding, same loss (tokens are summed).
    """
    steps_per_epoch = len(seqs) // batch_size
    epoch, index = divmod(step, steps_per_epoch)
    order = torch.randperm(len(seqs), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    batch = sorted((seqs[i] for i in order[index * batch_size:(index + 1) * batch_size]), key=lambda s: len(s.ids))
    mine = batch[rank::world]
    return [mine[i:i + micro_batch_size] for i in range(0, len(mine), micro_batch_size)]


# ---- Schedules --------------------------------------------------------------------------------


def learning_rate(step: int, total_steps: int, peak: float, warmup_ratio: float) -> float:
    """Linear warmup to `peak`, then cosine decay to 0 at the last step."""
    warmup = round(warmup_ratio * total_steps)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


# ---- The model and its loss as one module -----------------------------------------------------


class LossHead(nn.Module):
    """Model + memory-lean loss in one forward, so DDP, FSDP and torch.compile see all of it."""

    def __init__(self, model: Transformer, method: str, knobs: dict):
        super().__init__()
        self.model, self.method, self.knobs = model, method, knobs

    def forward(self, inputs, targets, mask, lam):
        hidden = self.model.hidden_states(inputs)
        return idft.chunked_loss(self.method, hidden, self.model.output_weight, targets, mask, lam=lam,
                                 return_stats=False, return_tokens=True, **self.knobs)


def build_optimizer(model: nn.Module, args, fused: bool) -> torch.optim.AdamW:
    matrices = [p for p in model.parameters() if p.ndim >= 2]  # weight decay: matrices only
    others = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": matrices, "weight_decay": args.weight_decay}, {"params": others, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), fused=fused)


# ---- Checkpoints ------------------------------------------------------------------------------


def latest_checkpoint(out: Path) -> Path | None:
    """The checkpoint `latest` points at; if that one is gone (deleted by hand, say), or the
    pointer is (a kill between renaming a checkpoint into place and writing the pointer), the
    newest complete one: checkpoints are renamed into place whole, so each step-N is complete."""
    pointer = out / "latest"
    named = out / pointer.read_text().strip() if pointer.is_file() else None
    if named is not None and (named / "trainer_state.pt").is_file():
        return named
    complete = [d for d in sorted((out / "checkpoints").glob("step-*")) if (d / "trainer_state.pt").is_file()]
    fallback = complete[-1] if complete else None
    if named is not None or fallback is not None:
        print(f"{pointer} {'points at ' + str(named) + ', which is missing or incomplete' if named else 'is missing'}; "
              f"using {fallback or 'no checkpoint (none is complete)'}", file=sys.stderr)
    return fallback


def save_checkpoint(out: Path, step: int, loss_head, optimizer, source_dir: Path, rank: int, keep: int):
    """Write checkpoints/step-N as a complete HF directory + trainer state, atomically.

    Every rank takes part in gathering the full state (FSDP shards it); rank 0 writes.
    """
    model_sd, optim_sd = get_state_dict(loss_head, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank != 0:
        return
    name = f"checkpoints/step-{step:07d}"
    final, tmp = out / name, out / "checkpoints" / f".tmp-step-{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    model = unwrap(loss_head).model
    model.save_pretrained(tmp, state_dict={k.removeprefix("model."): v for k, v in model_sd.items()})
    for f in TOKENIZER_FILES:
        if (source_dir / f).is_file():
            shutil.copy2(source_dir / f, tmp / f)
    state = {"step": step, "optimizer": optim_sd, "source_model": str(source_dir),
             "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                     "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}}
    torch.save(state, tmp / "trainer_state.pt")
    shutil.rmtree(final, ignore_errors=True)  # a leftover from a run that crashed after this step
    os.replace(tmp, final)
    atomic_write(out / "latest", name + "\n")
    old = sorted((out / "checkpoints").glob("step-*"))[:-keep] if keep > 0 else []
    for d in old:
        shutil.rmtree(d)


def unwrap(module: nn.Module) -> nn.Module:
    """The LossHead inside torch.compile and DDP wrappers."""
    module = getattr(module, "_orig_mod", module)
    return getattr(module, "module", module)


# ---- Metrics ----------------------------------------------------------------------------------


def read_metrics(out: Path) -> list[dict]:
    """The complete lines of RUN/metrics.jsonl (a torn last line, left by a kill, is not one)."""
    records, _ = read_log(out / "metrics.jsonl", "train.py")
    return [{k: v for k, v in r.items() if k != "_line"} for r in records]


def keep_metrics_until(out: Path, step: int):
    """After a resume, drop a torn last line and the lines of steps the restored weights have not seen."""
    path = out / "metrics.jsonl"
    drop_torn_tail(path, read_log(path, "train.py")[1])
    kept = [r for r in read_metrics(out) if r["step"] <= step]
    atomic_write(path, "".join(json.dumps(r) + "\n" for r in kept))


def curves(rows: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """(step, value) series of the logged quantities; eval rows are lines of their own."""
    keys = ("loss", "eval_loss", "lr", "grad_norm", "lambda", "phi_mean", "entropy_mean", "gamma_mean", "tokens_per_s")
    series = {key: [(r["step"], r[key]) for r in rows if key in r] for key in keys}
    return {key: points for key, points in series.items() if points}


def plot_run(run_dir: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = curves(read_metrics(run_dir))
    if "loss" not in panels:
        raise UserError(f"{run_dir / 'metrics.jsonl'}: no training steps logged")
    fig, axes = plt.subplots(math.ceil(len(panels) / 2), 2, figsize=(10, 2.6 * math.ceil(len(panels) / 2)))
    for ax, (key, pts) in zip(axes.flat, panels.items()):
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 50 else None)
        ax.set_title(key)
        ax.set_xlabel("step")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    dest = run_dir / "curves.png"
    atomic_write(dest, lambda p: fig.savefig(p, format="png", dpi=110))
    return dest


# ---- Training ---------------------------------------------------------------------------------


def parse_args(argv=None):
    ap = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--data", help="training JSONL: {question, answer}, {prompt, response} or {messages}")
    ap.add_argument("--model", default=BUNDLED_NAME, help="HF directory, hub id, or the bundled model name")
    ap.add_argument("--out", default="runs/train", help="run directory: checkpoints, metrics.jsonl, curves")
    ap.add_argument("--loss", default="idft", choices=idft.METHODS, help="training objective (SPEC §3)")
    ap.add_argument("--beta", type=positive_float, default=1.0, help="IDFT temperature β in γ = exp(−φ/β)")
    ap.add_argument("--gamma-min", type=nonnegative_float, default=0.1, help="lower clamp of γ")
    ap.add_argument("--gamma-max", type=positive_float, default=2.0, help="upper clamp of γ")
    ap.add_argument("--warmup-ratio", type=fraction, default=0.0,
                    help="share of steps with λ = 0 (plain DFT) before IDFT's γ takes over; the authors' "
                         "published launch script uses 0, their code's default is 0.2")
    ap.add_argument("--transition-ratio", type=fraction, default=0.0, help="share of steps over which λ ramps 0 → 1")
    ap.add_argument("--eaft-top-k", type=positive_int, default=None, help="EAFT: entropy of the top-k logits (paper: 20); default full vocabulary")
    ap.add_argument("--threshold", type=positive_float, default=None, help="IDFT ablation: train only tokens with −b < φ < b")
    ap.add_argument("--epochs", type=positive_float, default=1.0, help="passes over the data (ignored with --max-steps)")
    ap.add_argument("--max-steps", type=positive_int, default=None, help="optimizer steps to run")
    ap.add_argument("--batch-size", type=positive_int, default=16, help="sequences per optimizer step (all ranks together)")
    ap.add_argument("--micro-batch-size", type=positive_int, default=4, help="sequences per forward/backward on one rank")
    ap.add_argument("--max-len", type=positive_int, default=1024, help="longest sequence (prompt + response) kept")
    ap.add_argument("--lr", type=positive_float, default=5e-5, help="peak learning rate")
    ap.add_argument("--lr-warmup-ratio", type=fraction, default=0.05, help="share of steps with linear LR warmup")
    ap.add_argument("--weight-decay", type=nonnegative_float, default=0.01, help="AdamW weight decay (matrices only)")
    ap.add_argument("--grad-clip", type=nonnegative_float, default=1.0, help="clip the global gradient norm (0 = off)")
    ap.add_argument("--seed", type=nonnegative_int, default=0, help="data order and any sampling")
    ap.add_argument("--eval-data", default=None, help="held-out JSONL: mean response NLL every --eval-every steps")
    ap.add_argument("--eval-every", type=positive_int, default=50, help="steps between evaluations")
    ap.add_argument("--save-every", type=positive_int, default=100, help="steps between checkpoints (and always at the end)")
    ap.add_argument("--keep-checkpoints", type=nonnegative_int, default=2, help="most recent checkpoints kept on disk (0 = all)")
    ap.add_argument("--log-every", type=positive_int, default=1, help="steps between log lines")
    ap.add_argument("--resume", action="store_true",
                    help="continue the run in --out from its latest checkpoint; only --max-steps, --epochs, "
                         "--micro-batch-size, --compile, --fsdp and the log/eval/save cadences may change")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="torch.compile the training step (default: on for CUDA, off for CPU)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                    help="compute dtype (autocast; weights and optimizer stay float32). Default: bfloat16 on CUDA")
    ap.add_argument("--fsdp", action="store_true", help="shard parameters across ranks with FSDP2 (under torchrun)")
    ap.add_argument("--plot", metavar="RUN_DIR", default=None, help="draw RUN_DIR/metrics.jsonl to RUN_DIR/curves.png and exit")
    args = ap.parse_args(argv)
    if args.plot is None and args.data is None:
        ap.error("--data is required (or --plot RUN_DIR)")
    return args


def check_args(args):
    """What the argparse types cannot see: relations between flags, and the files named."""
    if not args.gamma_min <= args.gamma_max:
        raise UserError(f"--gamma-min {args.gamma_min} must not exceed --gamma-max {args.gamma_max}")
    check_input(args.data, "--data")
    if args.eval_data:
        check_input(args.eval_data, "--eval-data")
    check_output(args.out, "--out", kind="dir")


# A resume continues the same run: these may change (how long, how often it logs, saves and
# evaluates, and how the same arithmetic is laid out on the hardware); every other setting
# defines the run and must stay as it was (run_settings).
RESUMABLE = ("max_steps", "epochs", "micro_batch_size", "eval_every", "save_every", "keep_checkpoints", "log_every",
             "compile", "fsdp")


def run_settings(args) -> dict:
    """The settings that define a run, as saved in RUN/args.json: every flag not in RESUMABLE,
    with the data files' sha256 (moving a file is fine, changing it is not) and the dtype
    actually used."""
    settings = {k: v for k, v in vars(args).items() if k not in (*RESUMABLE, "resume", "plot", "out")}
    settings["data"] = "sha256:" + file_sha256(args.data)
    settings["eval_data"] = "sha256:" + file_sha256(args.eval_data) if args.eval_data else None
    settings["dtype"] = args.dtype or ("bfloat16" if torch.cuda.is_available() else "float32")
    return settings


def check_same_run(out: Path, args):
    """Refuse a --resume whose run-defining settings differ from those in RUN/args.json."""
    path = out / "args.json"
    if not path.is_file():
        return  # a run from before args.json held its settings: nothing to compare with
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise UserError(f"{path}: not JSON; cannot check the resume") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("settings", {}), dict):
        raise UserError(f"{path}: not written by train.py; cannot check the resume")
    if "settings" not in saved:  # written by a train.py from before the settings were recorded
        print(f"{path}: an older run's flags, without its settings: the resume is not checked", file=sys.stderr)
        return
    changed = changed_settings(saved["settings"], run_settings(args))
    if changed:
        raise UserError(f"--resume would join two different trainings in {out}: {'; '.join(changed)} "
                        f"(only --{', --'.join(k.replace('_', '-') for k in RESUMABLE)} may change)")


def evaluate(loss_head, seqs, pad_id, device, micro_batch_size, autocast) -> dict:
    """Held-out response NLL (mean −log p over response tokens) and mean φ of the held-out data."""
    from torch.distributed.fsdp import FSDPModule

    head = unwrap(loss_head)
    # FSDP2 gathers the root's own parameters (embedding, final norm, output matrix) in its
    # forward hook; this calls the model's parts directly, so gather them here
    sharded = isinstance(head, FSDPModule)
    if sharded:
        head.unshard()
    total, count, phi_sum = 0.0, 0, 0.0
    with torch.no_grad(), autocast:
        for i in range(0, len(seqs), micro_batch_size):
            inputs, targets, mask = collate(seqs[i:i + micro_batch_size], pad_id, device)
            hidden = head.model.hidden_states(inputs)
            loss_sum, n, (phi, _, _) = idft.chunked_loss("sft", hidden, head.model.output_weight, targets, mask,
                                                      return_stats=False, return_tokens=True)
            total, count, phi_sum = total + loss_sum.item(), count + n, phi_sum + phi.sum().item()
    if sharded:
        head.reshard()
    return {"eval_loss": total / max(count, 1), "eval_phi_mean": phi_sum / max(count, 1)}


def main(argv=None):
    try:
        args = parse_args(argv)
        if args.plot is not None:
            print(plot_run(Path(args.plot)))
            return 0
        check_args(args)
        with lock_output(args.out):  # under torchrun, rank 0's lock covers the run
            return train(args)
    except (UserError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before the training loop (which saves and says so itself)
        print("\ninterrupted before training started: nothing saved", file=sys.stderr)
        return 130


@dataclass
class StepResult:
    loss: float  # Σ loss_t / N_valid over the whole optimizer step (every micro-batch, every rank)
    grad_norm: float  # before clipping
    n_tokens: int  # input tokens this rank ran through the model, padding included (for tokens/s)
    phi: torch.Tensor  # φ_t of every valid token of the step, all ranks
    gamma: torch.Tensor | None  # γ_t of the same tokens (IDFT methods only)
    entropy: torch.Tensor  # H_t of the same tokens


def train_step(step_fn, loss_head, optimizer, micro_batches: list[list[Sequence]], lam: float, pad_id: int,
               device, autocast, grad_clip: float, world: int) -> StepResult:
    """One optimizer step with one loss denominator:

        L = Σ_{valid tokens t of every micro-batch on every rank} loss_t  /  N_valid

    Each micro-batch's backward adds its share Σ loss_t / N_valid, so the accumulated gradient is
    ∇L whatever the lengths and however the tokens are split (the authors, like most trainers,
    average per micro-batch and then over micro-batches, which weighs tokens unequally).
    """
    batches = [collate(mb, pad_id, device) for mb in micro_batches]
    n_valid = torch.tensor(sum(int(mask.sum()) for _, _, mask in batches), device=device)
    if world > 1:
        dist.all_reduce(n_valid)  # N_valid of the whole step, all ranks
    loss_sum, phis, gammas, entropies = torch.zeros((), device=device), [], [], []
    lam_t = torch.tensor(lam, device=device)
    is_ddp = isinstance(loss_head, nn.parallel.DistributedDataParallel)
    for i, (inputs, targets, mask) in enumerate(batches):
        sync = loss_head.no_sync() if is_ddp and i < len(batches) - 1 else nullcontext()  # sync once, at the end
        with sync, autocast:
            mb_loss_sum, _, (phi, gamma, entropy) = step_fn(inputs, targets, mask, lam_t)
        # DDP averages gradients over ranks; × world turns that back into the sum over ranks
        (mb_loss_sum * (world / n_valid)).backward()
        loss_sum += mb_loss_sum.detach()
        phis.append(phi)
        entropies.append(entropy)
        if gamma is not None:
            gammas.append(gamma)
    if world > 1:
        dist.all_reduce(loss_sum)
    loss = (loss_sum / n_valid).item()
    if not math.isfinite(loss):
        optimizer.zero_grad(set_to_none=True)
        raise FloatingPointError(f"loss is {loss}")
    grad_norm = nn.utils.clip_grad_norm_(loss_head.parameters(), grad_clip or float("inf")).item()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    phi = gather_tokens(torch.cat(phis), world)
    gamma = gather_tokens(torch.cat(gammas), world) if gammas else None
    entropy = gather_tokens(torch.cat(entropies), world)
    return StepResult(loss, grad_norm, sum(inputs.numel() for inputs, _, _ in batches), phi, gamma, entropy)


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


def setup_process():
    """(distributed, rank, world, device) of this process: torchrun sets RANK and friends."""
    distributed = "RANK" in os.environ
    cuda = torch.cuda.is_available()
    if distributed:
        dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return distributed, rank, world, device


def wrap_for_data_parallel(loss_head: LossHead, args, distributed: bool, device) -> nn.Module:
    """DDP (gradients all-reduced), or FSDP2 (parameters sharded per block) with --fsdp."""
    if distributed and args.fsdp:
        from torch.distributed.fsdp import fully_shard

        for block in loss_head.model.layers:
            fully_shard(block)
        fully_shard(loss_head)
        return loss_head
    if distributed:
        return nn.parallel.DistributedDataParallel(loss_head, device_ids=[device.index] if device.type == "cuda" else None)
    return loss_head


def restore(resume_dir: Path, loss_head, optimizer, cuda: bool) -> int:
    """Optimizer state and RNG of a checkpoint (its weights are already loaded); its step."""
    state = torch.load(resume_dir / "trainer_state.pt", map_location="cpu", weights_only=False)
    set_state_dict(loss_head, optimizer, model_state_dict={}, optim_state_dict=state["optimizer"],
                   options=StateDictOptions(full_state_dict=True, strict=False))
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    if cuda and state["rng"]["cuda"] is not None:
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state["step"]


def train(args) -> int:
    distributed, rank, world, device = setup_process()
    cuda = device.type == "cuda"
    main_process = rank == 0
    out = Path(args.out)
    log = tqdm.write if main_process else (lambda *a, **k: None)

    # Where we start from: a fresh model, or the latest checkpoint of this run.
    resume_dir = latest_checkpoint(out) if args.resume else None
    if not args.resume and ((out / "latest").exists() or (out / "metrics.jsonl").exists()):
        raise UserError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    if args.resume and resume_dir is None:
        log(f"no checkpoint in {out}: starting a new run")
    if resume_dir is not None:
        check_same_run(out, args)
    source_dir = resolve_model_dir(args.model)
    tokenizer = Tokenizer.from_pretrained(source_dir)
    seqs, skipped = tokenize_dataset(args.data, tokenizer, args.max_len)
    eval_seqs = tokenize_dataset(args.eval_data, tokenizer, args.max_len)[0] if args.eval_data else []
    if len(seqs) < args.batch_size:
        raise UserError(f"{args.data}: {len(seqs)} usable examples ({skipped} longer than --max-len "
                        f"{args.max_len}), fewer than --batch-size {args.batch_size}")
    if args.batch_size % world:
        raise UserError(f"--batch-size {args.batch_size} must be a multiple of the number of ranks ({world})")
    steps_per_epoch = len(seqs) // args.batch_size
    total_steps = args.max_steps or max(1, round(args.epochs * steps_per_epoch))

    model = Transformer.from_pretrained(resume_dir or source_dir, dtype=torch.float32, device=device)
    model.train()
    knobs = dict(beta=args.beta, gamma_min=args.gamma_min, gamma_max=args.gamma_max, b=args.threshold,
                 top_k=args.eaft_top_k)
    loss_head = wrap_for_data_parallel(LossHead(model, args.loss, knobs), args, distributed, device)
    optimizer = build_optimizer(loss_head, args, fused=cuda)
    if resume_dir is not None:
        start_step = restore(resume_dir, loss_head, optimizer, cuda)
        if main_process:
            keep_metrics_until(out, start_step)
        log(f"resumed from {resume_dir} at step {start_step}")
    else:
        start_step = 0
        torch.manual_seed(args.seed)
        random.seed(args.seed)
        if main_process and args.resume:  # a run that crashed before its first checkpoint: restart its log
            keep_metrics_until(out, 0)
    compile_step = args.compile if args.compile is not None else cuda
    step_fn = torch.compile(loss_head) if compile_step else loss_head
    dtype = args.dtype or ("bfloat16" if cuda else "float32")
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bfloat16" else nullcontext())

    if main_process:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / "args.json", json.dumps({"settings": run_settings(args), "args": vars(args)}, indent=2) + "\n")
        log(f"{len(seqs)} training sequences ({skipped} skipped: longer than --max-len {args.max_len}); "
            f"{total_steps} steps of {args.batch_size}; loss {args.loss}; world {world}; compile {compile_step}; {dtype}")
    n_params = sum(p.numel() for p in model.parameters())
    peak_flops = next((f for k, f in PEAK_BF16_FLOPS.items() if cuda and k in torch.cuda.get_device_name()), None)

    step = start_step
    bar = tqdm(total=total_steps, initial=start_step, disable=not main_process, desc="train", dynamic_ncols=True)
    try:
        while step < total_steps:
            t0 = time.perf_counter()
            lam = idft.lambda_schedule(step, total_steps, args.warmup_ratio, args.transition_ratio)
            lr = learning_rate(step, total_steps, args.lr, args.lr_warmup_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            micro_batches = step_batches(seqs, step, args.batch_size, args.seed, rank, world, args.micro_batch_size)
            try:
                result = train_step(step_fn, loss_head, optimizer, micro_batches, lam, tokenizer.pad_id, device,
                                    autocast, args.grad_clip, world)
            except FloatingPointError as e:
                raise FloatingPointError(f"{e} at step {step + 1}; stopping without saving. "
                                         f"Last good checkpoint: {latest_checkpoint(out) or 'none'}") from None
            step += 1
            bar.update(1)
            seconds = time.perf_counter() - t0

            if main_process and (step % args.log_every == 0 or step == total_steps):
                stats = idft.loss_stats(result.phi, result.gamma, args.beta, args.gamma_min, args.gamma_max,
                                        entropy=result.entropy)
                record = {"step": step, "loss": result.loss, "lr": lr, "lambda": lam, "grad_norm": result.grad_norm,
                          "tokens_per_s": result.n_tokens * world / seconds, "skipped_examples": skipped, **stats}
                if peak_flops:
                    record["mfu"] = 6 * n_params * result.n_tokens * world / seconds / (peak_flops * world)
                with open(out / "metrics.jsonl", "a") as f:
                    append_record(f, record)
                bar.set_postfix(loss=f"{result.loss:.4f}", lr=f"{lr:.2e}", phi=f"{stats['phi_mean']:+.3f}")
            if eval_seqs and (step % args.eval_every == 0 or step == total_steps):
                metrics = evaluate(loss_head, eval_seqs, tokenizer.pad_id, device, args.micro_batch_size, autocast)
                if main_process:
                    with open(out / "metrics.jsonl", "a") as f:
                        append_record(f, {"step": step, **metrics})
                    log(f"step {step}: eval loss {metrics['eval_loss']:.4f}, eval φ {metrics['eval_phi_mean']:+.4f}")
            if step % args.save_every == 0 or step == total_steps:
                save_checkpoint(out, step, loss_head, optimizer, source_dir, rank, args.keep_checkpoints)
    except KeyboardInterrupt:
        bar.close()
        if step == start_step:  # nothing learned since the start: no copy of what is already on disk
            log(f"interrupted before step {step + 1} finished: nothing saved")
            return 130
        last = latest_checkpoint(out)
        if last is None or last.name != f"step-{step:07d}":
            save_checkpoint(out, step, loss_head, optimizer, source_dir, rank, args.keep_checkpoints)
        log(f"interrupted: saved step {step} in {out}; continue with --resume")
        return 130
    except FloatingPointError as e:
        bar.close()
        print(f"error: {e}", file=sys.stderr)
        return 1
    bar.close()
    log(f"done: {latest_checkpoint(out)}")
    if distributed:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
