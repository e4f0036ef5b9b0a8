"""Fine-tune a model with IDFT (or SFT / DFT / EAFT): `python train.py --data gsm8k.jsonl`.

    example    tokens = chat(prompt) ++ response ++ <end of turn>; the loss counts the response
               and its end-of-turn token. Longer than --max-len: skipped (and counted).
    packing    a step's examples are laid end to end in rows of --max-len tokens (`pack`), each
               with its own positions (RoPE restarts) and attending only within itself, so no
               compute goes to padding (--no-pack: one example per row, padded).
    step       λ = lambda_schedule(step, total steps)                         idft.py
               L = Σ_{valid tokens t of the whole step} loss_t / N_valid        idft.token_loss
               N_valid counts every micro-batch on every rank, so gradient accumulation and
               data parallelism weigh every token alike (the authors average per micro-batch).
    optimizer  AdamW (betas 0.9 / 0.95, weight decay on matrices only), learning rate: linear
               warmup, then cosine decay to 0; gradient clipping.

`--online` makes the data at every step with the current weights (`online_batch`): the model's
own verified answers, else its verified hinted rewrites (hinted_decode.rewrite_batch).

Below this file (plumbing/): checkpoints and `--resume`, which continues bit for bit on CPU,
λ and learning rate included (checkpoints.py); metrics.jsonl and `--plot RUN` (metrics.py,
report.py); DDP and FSDP2 under `torchrun --nproc_per_node N train.py ...` (ranks.py).
"""

import argparse
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

import idft
from data import Example, encode_example, load_examples
from ddt import next_token_targets
from hinted_decode import add_decoding_flags, check_decoding_flags, decoding_knobs, rewrite_batch
from hub import BUNDLED_NAME, resolve_model_dir
from model import Transformer, check_vocabulary
from plumbing.checkpoints import (RUN_OUTPUTS, find_resume, latest_checkpoint, save_checkpoint, snapshot_tokenizer,
                                  start_step, tokenizer_source, write_run_settings)
from plumbing.cli import (ArgumentParser, RunError, UserError, fraction, nonnegative_float, nonnegative_int,
                          positive_float, positive_int, run_cli)
from plumbing.files import check_disjoint, check_input, check_output, lock_output
from plumbing.metrics import append_metrics, append_records
from plumbing.precision import DTYPES, compute_dtype
from plumbing.report import plot_run
from plumbing.ranks import (Ranks, compiled_graphs, gather_in_order, gather_tokens, parallelize, setup_training, shard,
                            unwrap)
from tokenizer import Tokenizer

LENGTH_BUCKET = 64  # unpacked micro-batches are padded to a multiple of this: few distinct shapes to compile
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "4090": 165e12}


# ---- Data -> batches ----------------------------------------------------------------------------


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


def step_items(items: list, step: int, batch_size: int, seed: int) -> list:
    """The items (sequences, or problems with --online) of optimizer step `step`: a pure function
    of (seed, epoch, step), so a resumed run sees exactly the batches an uninterrupted run would."""
    epoch, index = divmod(step, len(items) // batch_size)
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    return [items[i] for i in order[index * batch_size:(index + 1) * batch_size]]


def deal(batch: list[Sequence], rank: int, world: int, micro_batch_size: int,
         pack_len: int | None = None) -> list[list[list[Sequence]]]:
    """This rank's micro-batches of a step's sequences: each a list of rows, each row a list of
    sequences. The layout changes only the rounding, never the loss: its tokens are summed.

    Unpacked, the sequences are sorted by length (less padding), dealt to the ranks and cut into
    micro-batches of micro_batch_size rows, one sequence per row. Packed (pack_len: the row
    length), all of them are packed into rows (`pack`) and the rows dealt out as micro-batches of
    at most micro_batch_size rows. Either way every rank runs the same number of micro-batches,
    an empty row where it has too few: DDP and FSDP communicate in every forward.
    """
    batch = sorted(batch, key=lambda s: len(s.ids))
    if pack_len is None:
        mine = [[s] for s in batch[rank::world]]
        n_micro = max(1, -(-len(batch[::world]) // micro_batch_size))  # rank 0 has the most
        return [mine[i * micro_batch_size:(i + 1) * micro_batch_size] or [[]] for i in range(n_micro)]
    rows = pack(batch, pack_len)
    n_micro = world * max(1, -(-len(rows) // (world * micro_batch_size)))  # micro-batches of all ranks together
    return [rows[j::n_micro] or [[]] for j in range(rank, n_micro, world)]


def step_batches(seqs: list[Sequence], step: int, batch_size: int, seed: int, rank: int, world: int,
                 micro_batch_size: int, pack_len: int | None = None) -> list[list[list[Sequence]]]:
    """This rank's micro-batches for optimizer step `step` of offline training (`deal`)."""
    return deal(step_items(seqs, step, batch_size, seed), rank, world, micro_batch_size, pack_len)


def pack(seqs: list[Sequence], width: int) -> list[list[Sequence]]:
    """Best-fit decreasing: longest first, each sequence goes into the fullest row it still fits
    in, else into a new row. A row holds `width` input tokens: sequences of lengths L_i fit when
    Σ L_i ≤ width + 1 (each sequence's last token is a target only; `collate`)."""
    rows, free = [], []
    for s in sorted(seqs, key=lambda s: -len(s.ids)):  # stable: ties keep their order
        fits = [r for r in range(len(rows)) if free[r] >= len(s.ids)]
        if fits:
            r = min(fits, key=lambda r: free[r])
            rows[r].append(s)
            free[r] -= len(s.ids)
        else:
            rows.append([s])
            free.append(width + 1 - len(s.ids))
    return rows


class Batch(NamedTuple):
    """One micro-batch, [rows, T] tensors: inputs, targets and loss mask (ddt.next_token_targets),
    and for packed rows each token's position and document (None with one sequence per row)."""
    inputs: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor
    positions: torch.Tensor | None
    docs: torch.Tensor | None


def collate(rows: list[list[Sequence]], pad_id: int, device, pack_len: int | None = None) -> Batch:
    """Each row's sequences end to end, right-padded, then the one shift of ddt.next_token_targets.

    Packed (pack_len): rows of exactly pack_len inputs; a sequence keeps its own positions
    0..L−1 and a document id of its own, the padding of a row is a document too, and the
    prediction from a sequence's last token is never in the loss (the next token is another
    sequence's, or padding). Unpacked: one sequence per row, rows as long as the longest rounded
    up to a multiple of LENGTH_BUCKET, positions and documents None: plain causal attention is
    exact, since padding comes after every token used.
    """
    width = pack_len or -(-max(1, *(sum(len(s.ids) for s in row) - 1 for row in rows)) // LENGTH_BUCKET) * LENGTH_BUCKET
    tokens = torch.full((len(rows), width + 1), pad_id, dtype=torch.long)
    response = torch.zeros((len(rows), width + 1), dtype=torch.bool)
    positions = torch.zeros((len(rows), width + 1), dtype=torch.long)
    docs = torch.zeros((len(rows), width + 1), dtype=torch.long)
    doc = 0
    for r, row in enumerate(rows):
        start = 0
        for s in row + [None]:  # None: the row's padding
            end = width + 1 if s is None else start + len(s.ids)
            if s is not None:
                tokens[r, start:end] = torch.tensor(s.ids)
                response[r, start + max(s.n_prompt, 1):end] = True  # a first token is never predicted
            positions[r, start:end] = torch.arange(end - start)
            docs[r, start:end] = doc
            start, doc = end, doc + 1
    targets, mask = next_token_targets(tokens, response)
    return Batch(tokens[:, :-1].to(device), targets.to(device), mask.to(device),
                 positions[:, :-1].to(device) if pack_len else None, docs[:, :-1].to(device) if pack_len else None)


# ---- Model, loss, optimizer ---------------------------------------------------------------------


class LossHead(nn.Module):
    """The model and the loss as one module, so DDP and FSDP see all of it: hidden states h_t,
    then idft.chunked_loss_sum over the valid tokens. With --compile only the decoder blocks
    are compiled (plumbing/ranks.py, compile_blocks): the selection of the valid tokens and the
    chunked loss follow the data's shapes and stay eager."""

    def __init__(self, model: Transformer, method: str, knobs: dict):
        super().__init__()
        self.model, self.method, self.knobs = model, method, knobs

    def forward(self, inputs, targets, mask, lam, positions=None, docs=None):
        hidden = self.model.hidden_states(inputs, positions=positions, docs=docs)
        return idft.chunked_loss_sum(hidden, self.model.output_weight, targets, mask, self.method, lam=lam,
                                     **self.knobs)


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, fused: bool) -> torch.optim.AdamW:
    matrices = [p for p in model.parameters() if p.ndim >= 2]  # weight decay: matrices only
    others = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": matrices, "weight_decay": weight_decay}, {"params": others, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=fused)


def learning_rate(step: int, total_steps: int, peak: float, warmup_ratio: float) -> float:
    """Linear warmup to `peak`, then cosine decay to 0 at the last step."""
    warmup = round(warmup_ratio * total_steps)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


# ---- One optimizer step -------------------------------------------------------------------------


@dataclass
class StepResult:
    loss: float  # Σ loss_t / N_valid over the whole optimizer step (every micro-batch, every rank)
    grad_norm: float  # before clipping
    n_tokens: int  # tokens of the step's sequences, all ranks (each sequence of L tokens: L − 1 inputs)
    padding_share: float  # share of the input slots of all ranks' micro-batches that are not n_tokens
    phi: torch.Tensor  # φ_t of every valid token of the step, all ranks
    gamma: torch.Tensor | None  # γ_t of the same tokens (IDFT methods only)
    entropy: torch.Tensor  # H_t of the same tokens


def train_step(loss_head, optimizer, micro_batches: list[list[list[Sequence]]], lam: float, pad_id: int,
               device, autocast, grad_clip: float, world: int, pack_len: int | None = None) -> StepResult:
    """One optimizer step with one loss denominator:

        L = Σ_{valid tokens t of every micro-batch on every rank} loss_t  /  N_valid

    Each micro-batch's backward adds its share Σ loss_t / N_valid, so the accumulated gradient is
    ∇L whatever the lengths and however the tokens are split into rows, micro-batches and ranks.
    """
    batches = [collate(mb, pad_id, device, pack_len) for mb in micro_batches]
    counts = torch.tensor([sum(int(b.mask.sum()) for b in batches),  # N_valid
                           sum(len(s.ids) - 1 for mb in micro_batches for row in mb for s in row),  # tokens
                           sum(b.inputs.numel() for b in batches)], device=device)  # input slots
    if world > 1:
        dist.all_reduce(counts)  # the whole step, all ranks
    n_valid, n_tokens, n_slots = counts
    loss_sum, phis, gammas, entropies = torch.zeros((), device=device), [], [], []
    lam_t = torch.tensor(lam, device=device)
    is_ddp = isinstance(loss_head, nn.parallel.DistributedDataParallel)
    for i, b in enumerate(batches):
        sync = loss_head.no_sync() if is_ddp and i < len(batches) - 1 else nullcontext()  # sync once, at the end
        with sync, autocast:
            mb_loss_sum, _, (phi, gamma, entropy) = loss_head(b.inputs, b.targets, b.mask, lam_t, b.positions, b.docs)
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
    return StepResult(loss, grad_norm, int(n_tokens), 1 - int(n_tokens) / int(n_slots),
                      gather_tokens(torch.cat(phis), world), gather_tokens(torch.cat(gammas), world) if gammas else None,
                      gather_tokens(torch.cat(entropies), world))


def evaluate(loss_head, seqs, pad_id, device, micro_batch_size, autocast, pack_len=None) -> dict:
    """Held-out response NLL (mean −log p over response tokens) and mean φ of the held-out data,
    in rows laid out as in training."""
    from torch.distributed.fsdp import FSDPModule

    head = unwrap(loss_head)
    # FSDP2 gathers the root's own parameters (embedding, final norm, output matrix) in its
    # forward hook; this calls the model's parts directly, so gather them here
    sharded = isinstance(head, FSDPModule)
    if sharded:
        head.unshard()
    total, count, phi_sum = 0.0, 0, 0.0
    with torch.no_grad(), autocast:
        rows = pack(seqs, pack_len) if pack_len else [[s] for s in seqs]
        for i in range(0, len(rows), micro_batch_size):
            b = collate(rows[i:i + micro_batch_size], pad_id, device, pack_len)
            hidden = head.model.hidden_states(b.inputs, positions=b.positions, docs=b.docs)
            loss_sum, n, (phi, _, _) = idft.chunked_loss_sum(hidden, head.model.output_weight, b.targets, b.mask, "sft")
            total, count, phi_sum = total + loss_sum.item(), count + n, phi_sum + phi.sum().item()
    if sharded:
        head.reshard()
    return {"eval_loss": total / max(count, 1), "eval_phi_mean": phi_sum / max(count, 1)}


# ---- Online: the model rewrites each step's problems with its current weights -------------------


def load_problems(path) -> list[Example]:
    """--online's data: problems with a question and a gold answer (any format that carries one)."""
    problems = load_examples(path)
    for ex in problems:
        if ex.answer is None:
            raise UserError(f"{ex.source}:{ex.line}: no gold answer ('#### N' or \\boxed{{...}} in the solution, or a "
                            "'final_answer' field): --online trains on answers it can verify")
        if not any(m["role"] == "user" for m in ex.prompt):
            raise UserError(f"{ex.source}:{ex.line}: no user message: --online needs a question to answer")
    return problems


def online_batch(model, tokenizer, problems: list[Example], step: int, args, rank: int, world: int):
    """The sequences one online step trains on, made with the current weights: each rank runs the
    pipeline's rule (hinted_decode.rewrite_batch: own answer if verified, else the hinted rewrite
    if verified, else dropped, or with --online-fallback reference the reference) on its share of
    the step's problems. Returns (the step's sequences, its records, its yield), the same on every
    rank; records carry the step, the source (own / hinted / reference / dropped), the finish
    reason and φ under the generating model."""
    ranks, knobs = Ranks(rank, world), decoding_knobs(args, "online-")

    def rewrite(batch):  # one record per problem, in problem order
        by_id = {r["id"]: r for r in rewrite_batch(model, tokenizer, batch, knobs, step=step + 1)}
        return [by_id[ex.id] for ex in batch]

    model.eval()
    mine = shard(problems, ranks, args.online_batch_size)
    with torch.no_grad():
        made = [r for i in range(0, len(mine), args.online_batch_size)
                for r in rewrite(mine[i:i + args.online_batch_size])]
    model.train()
    seqs, records, phis = [], [], []
    for ex, made_record in zip(problems, gather_in_order(made, ranks, args.online_batch_size)):
        source = {"on_policy": "own", "hinted": "hinted"}.get(made_record["source"], "dropped")
        text, phi = made_record["response"], made_record["phi"]
        if source == "dropped" and args.online_fallback == "reference":
            source, text, phi = "reference", ex.response, made_record["phi_reference"]
        trained = False
        if source != "dropped":
            ids, n_prompt = encode_example(tokenizer, Example(ex.id, ex.prompt, text, ex.answer, ex.line, ex.source))
            trained = len(ids) <= args.max_len  # never truncated: a longer one is left out, as offline
            if trained:
                seqs.append(Sequence(ids, n_prompt))
                phis.append(phi["phi_mean"])
        records.append({"step": step + 1, "id": ex.id, "source": source, "trained": trained,
                        **{k: made_record[k] for k in ("finish_reason", "predicted_answer", "response", "phi",
                                                       "phi_reference")}})
    counts = {f"online_{s}": sum(r["source"] == s for r in records) for s in ("own", "hinted", "reference", "dropped")}
    return seqs, records, {**counts, "online_trained": len(seqs),
                           "online_phi_mean": sum(phis) / len(phis) if phis else None}


# ---- The loop -----------------------------------------------------------------------------------


def train(args) -> int:
    distributed, rank, world, device = setup_training()
    cuda, main_process, out = device.type == "cuda", rank == 0, Path(args.out)
    log = tqdm.write if main_process else (lambda *a, **k: None)

    source_dir = resolve_model_dir(args.model)
    resume_dir = find_resume(out, args, source_dir, log)  # None: a new run
    tokenizer_dir = tokenizer_source(out, source_dir, resume_dir)
    tokenizer = Tokenizer.from_pretrained(tokenizer_dir)
    if args.online:  # problems, answered and rewritten at every step; else the sequences themselves
        items, skipped = load_problems(args.data), 0
    else:
        items, skipped = tokenize_dataset(args.data, tokenizer, args.max_len)
    eval_seqs = tokenize_dataset(args.eval_data, tokenizer, args.max_len)[0] if args.eval_data else []
    if len(items) < args.batch_size:
        raise UserError(f"{args.data}: {len(items)} usable examples ({skipped} longer than --max-len "
                        f"{args.max_len}), fewer than --batch-size {args.batch_size}")
    if args.batch_size % world:
        raise UserError(f"--batch-size {args.batch_size} must be a multiple of the number of ranks ({world})")
    total_steps = args.max_steps or max(1, round(args.epochs * (len(items) // args.batch_size)))

    model = Transformer.from_pretrained(resume_dir or source_dir, dtype=torch.float32, device=device).train()
    check_vocabulary(tokenizer, model.config.vocab_size, resume_dir or source_dir)
    if args.eaft_top_k is not None and args.eaft_top_k > model.config.vocab_size:
        raise UserError(f"--eaft-top-k {args.eaft_top_k} exceeds the model's vocabulary ({model.config.vocab_size})")
    knobs = dict(beta=args.beta, gamma_min=args.gamma_min, gamma_max=args.gamma_max, b=args.threshold,
                 top_k=args.eaft_top_k)
    model.activation_checkpointing = cuda if args.activation_checkpointing is None else args.activation_checkpointing
    compile_step = args.compile if args.compile is not None else cuda
    dtype = compute_dtype(args.dtype, device)
    # Numerics (docs/gpu.md): float32 weights, gradients and AdamW state; bfloat16 compute comes from
    # FSDP2's bfloat16 all-gathers with --fsdp, from autocast otherwise (cache_enabled=False: each
    # weight is cast where it is used, and no copy is kept beyond what backward saves)
    sharded_bf16 = distributed and args.fsdp and dtype == "bfloat16"
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False)
                if dtype == "bfloat16" and not sharded_bf16 else nullcontext())
    loss_head = parallelize(LossHead(model, args.loss, knobs), model.layers, distributed, args.fsdp, device,
                            param_dtype=torch.bfloat16 if sharded_bf16 else None,
                            compile_backend="inductor" if compile_step else None)
    optimizer = build_optimizer(loss_head, args.lr, args.weight_decay, fused=cuda)
    save_dtype = getattr(torch, args.save_dtype or dtype)  # the exported weights; the state/ beside them is float32
    step = first = start_step(out, args, resume_dir, loss_head, optimizer, cuda, main_process, log)
    pack_len = args.max_len if args.pack else None
    if main_process:  # the arguments, data and model have passed: the run's first writes
        snapshot_tokenizer(out, tokenizer_dir)
        write_run_settings(out, args, source_dir)
        log(f"{len(items)} {'problems, rewritten online' if args.online else 'training sequences'} "
            f"({skipped} skipped: longer than --max-len {args.max_len}); {total_steps} steps of {args.batch_size}; "
            f"loss {args.loss}; world {world}; compile {compile_step}; {dtype}; "
            f"activation checkpointing {'on' if model.activation_checkpointing else 'off'}; "
            + (f"packed in rows of {pack_len}" if pack_len else "not packed"))
    n_params = sum(p.numel() for p in model.parameters())
    peak_flops = next((f for k, f in PEAK_BF16_FLOPS.items() if cuda and k in torch.cuda.get_device_name()), None)

    def save():
        save_checkpoint(out, step, loss_head, optimizer, source_dir, rank, args.keep_checkpoints, save_dtype)

    bar = tqdm(total=total_steps, initial=step, disable=not main_process, desc="train", dynamic_ncols=True)
    try:
        while step < total_steps:
            t0 = time.perf_counter()
            lam = idft.lambda_schedule(step, total_steps, args.warmup_ratio, args.transition_ratio)
            lr = learning_rate(step, total_steps, args.lr, args.lr_warmup_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch, online = step_items(items, step, args.batch_size, args.seed), {}
            if args.online:  # generate with the current weights: the step's sequences and their records
                batch, records, online = online_batch(model, tokenizer, batch, step, args, rank, world)
                online["gen_seconds"] = time.perf_counter() - t0
                if main_process:  # before the update: a resume drops the records of an unfinished step
                    append_records(out / "online.jsonl", records)
            result = None
            if batch:  # online: empty when nothing verified; the step is then logged and skipped
                t_train = time.perf_counter()
                micro_batches = deal(batch, rank, world, args.micro_batch_size, pack_len)
                result = train_step(loss_head, optimizer, micro_batches, lam, tokenizer.pad_id, device, autocast,
                                    args.grad_clip, world, pack_len)
                if args.online:
                    online["train_seconds"] = time.perf_counter() - t_train
            step += 1
            bar.update(1)
            seconds = time.perf_counter() - t0

            if main_process and (step % args.log_every == 0 or step == total_steps or result is None):
                record = {"step": step, "lr": lr, "lambda": lam, "skipped_examples": skipped, **online}
                if result is None:
                    record["skipped"] = "nothing kept: no update"
                    log(f"step {step}: nothing verified, nothing kept: no update")
                else:
                    stats = idft.loss_stats(result.phi, result.gamma, args.beta, args.gamma_min, args.gamma_max,
                                            entropy=result.entropy)
                    record.update(loss=result.loss, grad_norm=result.grad_norm, tokens_per_s=result.n_tokens / seconds,
                                  padding_share=result.padding_share, **stats)
                    if peak_flops:
                        record["mfu"] = 6 * n_params * result.n_tokens / seconds / (peak_flops * world)
                    if compile_step:  # graphs captured so far: flat after the first steps (ranks.compile_blocks)
                        record["compiled_graphs"] = compiled_graphs()
                    bar.set_postfix(loss=f"{result.loss:.4f}", lr=f"{lr:.2e}", phi=f"{stats['phi_mean']:+.3f}")
                append_metrics(out, record)
            if eval_seqs and (step % args.eval_every == 0 or step == total_steps):
                metrics = evaluate(loss_head, eval_seqs, tokenizer.pad_id, device, args.micro_batch_size, autocast,
                                   pack_len)
                if main_process:
                    append_metrics(out, {"step": step, **metrics})
                    log(f"step {step}: eval loss {metrics['eval_loss']:.4f}, eval φ {metrics['eval_phi_mean']:+.4f}")
            if step % args.save_every == 0 or step == total_steps:
                save()
    except KeyboardInterrupt:
        bar.close()
        if step == first:  # nothing learned since the start: no copy of what is already on disk
            log(f"interrupted before step {step + 1} finished: nothing saved")
            return 130
        last = latest_checkpoint(out)
        if last is None or last.name != f"step-{step:07d}":
            save()
        log(f"interrupted: saved step {step} in {out}; continue with --resume")
        return 130
    except (RunError, OSError):  # a full disk, a lost lock: run_cli prints it on a line of its own
        bar.close()
        raise
    except FloatingPointError as e:
        bar.close()
        print(f"error: {e} at step {step + 1}; stopping without saving. Last good checkpoint: "
              f"{latest_checkpoint(out) or 'none'}", file=sys.stderr)
        return 1
    bar.close()
    log(f"done: {latest_checkpoint(out)}")
    if distributed:
        dist.destroy_process_group()
    return 0


# ---- Command line -------------------------------------------------------------------------------


def parse_args(argv=None):
    ap = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--data", help="training JSONL: {question, answer}, {prompt, response} or {messages}")
    ap.add_argument("--model", default=BUNDLED_NAME, help="HF directory, hub id, or the bundled model name")
    ap.add_argument("--out", default="runs/train", help="run directory: checkpoints, metrics.jsonl, curves")
    ap.add_argument("--loss", default="idft", choices=idft.METHODS, help="training objective (docs/math.md)")
    ap.add_argument("--beta", type=positive_float, default=1.0, help="IDFT temperature β in γ = exp(−φ/β)")
    ap.add_argument("--gamma-min", type=nonnegative_float, default=0.1, help="lower clamp of γ")
    ap.add_argument("--gamma-max", type=positive_float, default=2.0, help="upper clamp of γ")
    ap.add_argument("--warmup-ratio", type=fraction, default=0.0,
                    help="share of steps with λ = 0 (plain DFT) before IDFT's γ takes over; the authors' "
                         "published launch script uses 0, their code's default is 0.2")
    ap.add_argument("--transition-ratio", type=fraction, default=0.0, help="share of steps over which λ ramps 0 → 1")
    ap.add_argument("--eaft-top-k", type=positive_int, default=None,
                    help="EAFT: entropy of the top-k logits (paper: 20); default full vocabulary")
    ap.add_argument("--threshold", type=positive_float, default=None,
                    help="IDFT ablation: train only tokens with −b < φ < b")
    ap.add_argument("--epochs", type=positive_float, default=1.0, help="passes over the data (ignored with --max-steps)")
    ap.add_argument("--max-steps", type=positive_int, default=None, help="optimizer steps to run")
    ap.add_argument("--batch-size", type=positive_int, default=16, help="sequences per optimizer step (all ranks together)")
    ap.add_argument("--micro-batch-size", type=positive_int, default=4,
                    help="rows per forward/backward on one rank: packed rows of --max-len tokens, or sequences")
    ap.add_argument("--max-len", type=positive_int, default=1024,
                    help="longest sequence (prompt + response) kept, and the length of a packed row")
    ap.add_argument("--pack", action=argparse.BooleanOptionalAction, default=True,
                    help="lay each step's sequences end to end in rows of --max-len tokens, each attending only "
                         "within itself: no compute on padding (--no-pack: one sequence per row, padded)")
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
                         "--micro-batch-size, --compile, --fsdp, --activation-checkpointing, --save-dtype and the log/eval/save "
                         "cadences may change")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="torch.compile the decoder blocks; the loss stays eager (default: on for CUDA, off for CPU)")
    ap.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                    help="keep only each decoder block's input for backward and rerun the block there: the same "
                         "gradients, far less memory, one more forward (default: on for CUDA, off for CPU)")
    ap.add_argument("--dtype", choices=DTYPES, default=None,
                    help="compute dtype (bfloat16: FSDP2's bfloat16 all-gathers with --fsdp, autocast otherwise; "
                         "weights, gradients and optimizer state stay float32). Default: bfloat16 on CUDA")
    ap.add_argument("--save-dtype", choices=DTYPES, default=None,
                    help="dtype of each checkpoint's exported model (the float32 training state is kept beside it "
                         "for --resume). Default: --dtype's, so bfloat16 on CUDA")
    ap.add_argument("--fsdp", action="store_true", help="shard parameters across ranks with FSDP2 (under torchrun)")
    ap.add_argument("--plot", metavar="RUN_DIR", default=None, help="draw RUN_DIR/metrics.jsonl to RUN_DIR/curves.png and exit")
    online = ap.add_argument_group("online on-policy SFT (docs/math.md): the model rewrites each step's problems "
                                   "with its current weights, then trains on what verified")
    online.add_argument("--online", action="store_true",
                        help="each step: the model's own answers that verify, else its hinted rewrites that verify; "
                             "records in RUN/online.jsonl (needs problems with gold answers)")
    online.add_argument("--online-fallback", choices=("drop", "reference"), default="drop",
                        help="a problem with neither: dropped from the step (default: only on-policy data is "
                             "trained), or its reference trained instead")
    online.add_argument("--online-batch-size", type=positive_int, default=8, help="problems decoded together")
    add_decoding_flags(online, prefix="online-", max_new_tokens=512)
    args = ap.parse_args(argv)
    if args.plot is None and args.data is None:
        ap.error("--data is required (or --plot RUN_DIR)")
    if not args.online and (changed := [k for k in vars(args) if k.startswith("online_")
                                        and getattr(args, k) != ap.get_default(k)]):
        ap.error(f"--{changed[0].replace('_', '-')} needs --online")
    return args


def check_args(args):
    """What the argparse types cannot see: relations between flags, and the files named."""
    if not args.gamma_min <= args.gamma_max:
        raise UserError(f"--gamma-min {args.gamma_min} must not exceed --gamma-max {args.gamma_max}")
    if args.online and args.fsdp:
        raise UserError("--online decodes with the whole model on every rank, which --fsdp shards; use data "
                        "parallel without --fsdp (DDP)")
    check_decoding_flags(args, "online-")
    check_input(args.data, "--data")
    if args.eval_data:
        check_input(args.eval_data, "--eval-data")
    args.out = str(check_output(args.out, "--out", kind="dir"))  # its real path: one run directory, one lock
    check_disjoint([("--out", Path(args.out) / name) for name in RUN_OUTPUTS],
                   [("--data", args.data), ("--eval-data", args.eval_data), ("--model", args.model)])


def main(argv=None):
    def run(argv):
        args = parse_args(argv)
        if args.plot is not None:
            print(plot_run(Path(args.plot)))
            return 0
        check_args(args)
        with lock_output(args.out, kind="dir"):  # RUN/.run.lock; under torchrun, rank 0's lock covers the run
            return train(args)

    # Ctrl-C once training runs is handled by train(), which saves first
    return run_cli(run, argv, interrupted="interrupted before training started: nothing saved")


if __name__ == "__main__":
    sys.exit(main())
