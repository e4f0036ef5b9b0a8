"""train.py's run directory: checkpoints, resume, and the settings that make a run one run.

    RUN/args.json                      the run-defining settings (a resume must keep them)
    RUN/metrics.jsonl                  one line per logged step (plumbing/metrics.py)
    RUN/checkpoints/step-NNNNNNN/      a Hugging Face model directory + trainer_state.pt
    RUN/latest                         the name of the newest checkpoint

A checkpoint is written to a temporary directory and renamed into place whole, so every
step-N directory is complete; `latest` is written after the rename, and a missing or stale
pointer falls back to the newest complete checkpoint. trainer_state.pt holds the optimizer
state, the step and the RNG states, so a resumed run on CPU continues bit for bit.
"""

import json
import os
import random
import shutil
import sys
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from plumbing.cli import UserError
from plumbing.files import atomic_write, changed_settings, file_sha256
from plumbing.metrics import keep_metrics_until
from plumbing.ranks import unwrap

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json",
                   "generation_config.json", "tokenizer.model")

# A resume continues the same run: these may change (how long, how often it logs, saves and
# evaluates, and how the same arithmetic is laid out on the hardware); every other setting
# defines the run and must stay as it was (run_settings).
RESUMABLE = ("max_steps", "epochs", "micro_batch_size", "eval_every", "save_every", "keep_checkpoints", "log_every",
             "compile", "fsdp", "pack")


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


# ---- One run per directory ------------------------------------------------------------------


def run_settings(args) -> dict:
    """The settings that define a run, as saved in RUN/args.json: every flag not in RESUMABLE,
    with the data files' sha256 (moving a file is fine, changing it is not) and the dtype
    actually used."""
    settings = {k: v for k, v in vars(args).items() if k not in (*RESUMABLE, "resume", "plot", "out")}
    settings["data"] = "sha256:" + file_sha256(args.data)
    settings["eval_data"] = "sha256:" + file_sha256(args.eval_data) if args.eval_data else None
    settings["dtype"] = args.dtype or ("bfloat16" if torch.cuda.is_available() else "float32")
    return settings


def write_run_settings(out: Path, args):
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "args.json", json.dumps({"settings": run_settings(args), "args": vars(args)}, indent=2) + "\n")


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


def find_resume(out: Path, args, log) -> Path | None:
    """The checkpoint a run starts from: None for a new run. A --out that holds a run needs
    --resume, and a resume must keep the run's settings."""
    if not args.resume:
        if (out / "latest").exists() or (out / "metrics.jsonl").exists():
            raise UserError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
        return None
    resume_dir = latest_checkpoint(out)
    if resume_dir is None:
        log(f"no checkpoint in {out}: starting a new run")
    else:
        check_same_run(out, args)
    return resume_dir


def start_step(out: Path, args, resume_dir: Path | None, loss_head, optimizer, cuda: bool, main: bool, log) -> int:
    """The step a run starts at: a checkpoint's (its optimizer state and RNG restored, the
    metrics of later steps dropped), or 0 with the RNG seeded from --seed."""
    if resume_dir is not None:
        step = restore(resume_dir, loss_head, optimizer, cuda)
        if main:
            keep_metrics_until(out, step)
        log(f"resumed from {resume_dir} at step {step}")
        return step
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    if main and args.resume:  # a run that crashed before its first checkpoint: restart its log
        keep_metrics_until(out, 0)
    return 0
