"""train.py's run directory: checkpoints, resume, and the settings that make a run one run.

    RUN/args.json                      the run-defining settings (a resume must keep them)
    RUN/tokenizer/                     the model's tokenizer and template files, taken at the start
    RUN/metrics.jsonl                  one line per logged step (plumbing/metrics.py)
    RUN/checkpoints/step-NNNNNNN/      a Hugging Face model directory (--save-dtype), state/ (the
                                       float32 weights and AdamW state, sharded) + trainer_state.pt
    RUN/latest                         the name of the newest checkpoint

A checkpoint is written to a temporary directory and renamed into place whole, so every
step-N directory is complete; `latest` is written after the rename, and a missing or stale
pointer falls back to the newest complete checkpoint; a save that fails (a full disk) leaves
no temporary and every earlier checkpoint as it was. state/ (torch.distributed.checkpoint: each
rank writes its part) and trainer_state.pt (the step and the RNG states) make a resumed run on
CPU continue bit for bit, whatever dtype the model was exported in. A run knows
its model by content (`model_identity`), and every checkpoint gets the tokenizer the run
started with (RUN/tokenizer), even if the source model directory is gone by then.
"""

import hashlib
import json
import os
import random
import shutil
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from safetensors import SafetensorError
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from plumbing.cli import RunError, UserError
from plumbing.files import atomic_write, changed_settings, check_locks, file_sha256
from plumbing.metrics import keep_until
from plumbing.ranks import unwrap

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json",
                   "generation_config.json", "tokenizer.model")

# Everything train.py writes or deletes in RUN (the inputs may not be among them: files.check_disjoint)
RUN_OUTPUTS = ("args.json", "metrics.jsonl", "online.jsonl", "latest", "checkpoints", "tokenizer", ".tmp-tokenizer",
               "curves.png", ".run.lock")

# A resume continues the same run: these may change (how long, how often it logs, saves and
# evaluates, and how the same arithmetic is laid out on the hardware); every other setting
# defines the run and must stay as it was (run_settings).
RESUMABLE = ("max_steps", "epochs", "micro_batch_size", "eval_every", "save_every", "keep_checkpoints", "log_every",
             "compile", "fsdp", "pack", "activation_checkpointing", "save_dtype")


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


# how torch.save, safetensors and DCP's writers report a full disk or a file-size limit
SAVE_ERRORS = (OSError, RuntimeError, SafetensorError, CheckpointException)


def save_checkpoint(out: Path, step: int, loss_head, optimizer, source_dir: Path, rank: int, keep: int,
                    save_dtype: torch.dtype):
    """Write checkpoints/step-N, atomically: the training state sharded (state/: every rank
    writes its own part of the float32 weights and AdamW state, `save_state`), then rank 0
    exports a Hugging Face model directory in `save_dtype` from it, one safetensors shard at a
    time (`SavedWeights`), and trainer_state.pt (step, RNG) last. No rank ever holds the whole
    state; every rank must see RUN (one node, or a shared file system)."""
    name = f"checkpoints/step-{step:07d}"
    final, tmp = out / name, out / "checkpoints" / f".tmp-step-{step:07d}"
    error = None
    if rank == 0:
        check_locks()
        shutil.rmtree(tmp, ignore_errors=True)
    try:
        barrier()  # the temporary directory is fresh before any rank writes into it
        save_state(tmp / STATE_DIR, loss_head, optimizer)
    except SAVE_ERRORS as e:
        error = e
    if rank != 0:
        if error is not None:
            raise error
        return
    try:
        if error is not None:
            raise error
        model = unwrap(loss_head).model
        model.save_pretrained(tmp, state_dict=SavedWeights(tmp / STATE_DIR, model), dtype=save_dtype)
        for f in TOKENIZER_FILES:  # the run's own copy (snapshot_tokenizer): the source may be gone
            if (out / "tokenizer" / f).is_file():
                shutil.copy2(out / "tokenizer" / f, tmp / f)
        state = {"step": step, "source_model": str(source_dir),
                 "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                         "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}}
        torch.save(state, tmp / "trainer_state.pt")
    except SAVE_ERRORS as e:
        raise failed_save(out, tmp, name, e) from None
    shutil.rmtree(final, ignore_errors=True)  # a leftover from a run that crashed after this step
    os.replace(tmp, final)
    atomic_write(out / "latest", name + "\n")
    old = sorted((out / "checkpoints").glob("step-*"))[:-keep] if keep > 0 else []
    for d in old:
        shutil.rmtree(d)


def failed_save(out: Path, tmp: Path, name: str, error: Exception) -> RunError:
    """The error a failed save stops the run with (exit 1), after removing its half-written
    temporary directory; the checkpoints on disk and `latest` are untouched, so a --resume
    (with space freed) continues from the last complete one."""
    shutil.rmtree(tmp, ignore_errors=True)
    if isinstance(error, CheckpointException):  # DCP's wrapper around each rank's own error
        error = next(iter(error.failures.values()))[0]
    pointer = out / "latest"
    last = pointer.read_text().strip() if pointer.is_file() else "no checkpoint"
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return RunError(f"could not write {out / name} (a full disk, a file-size limit? {type(error).__name__}: {reason}); "
                    f"nothing of it is left and {last} is intact: make room, then rerun with --resume")


def restore(resume_dir: Path, loss_head, optimizer, cuda: bool) -> int:
    """Weights, optimizer state and RNG of a checkpoint; its step. The weights come from the
    float32 training state, not from the exported model, which may be bfloat16 (--save-dtype)."""
    state = torch.load(resume_dir / "trainer_state.pt", map_location="cpu", weights_only=False)
    if (resume_dir / STATE_DIR).is_dir():
        load_state(resume_dir / STATE_DIR, loss_head, optimizer)
    else:  # written before the state was sharded: float32 weights in the export, the whole optimizer state here
        set_state_dict(loss_head, optimizer, model_state_dict={}, optim_state_dict=state["optimizer"],
                       options=StateDictOptions(full_state_dict=True, strict=False))
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    if cuda and state["rng"]["cuda"] is not None:
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state["step"]


# ---- The sharded training state (torch.distributed.checkpoint) ------------------------------

STATE_DIR = "state"
# DCP says so each time one process saves or loads without a process group, which is expected here
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


def barrier():
    if dist.is_initialized():
        dist.barrier()


def save_state(directory: Path, loss_head, optimizer):
    """The float32 weights and AdamW state, by parameter name, each rank writing the part it holds
    (DCP: one file per rank and a .metadata index, written last by rank 0)."""
    model_sd, optim_sd = get_state_dict(loss_head, optimizer)  # the names without DDP's or FSDP's wrapping
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=directory, no_dist=not dist.is_initialized())


def load_state(directory: Path, loss_head, optimizer):
    """save_state's inverse, into the current layout: DCP reads each rank's part from the parts
    that were written, so a state saved by any number of processes, with or without FSDP2,
    loads into any other (tests/test_scale_up.py: two FSDP2 processes, then one)."""
    model_sd, optim_sd = get_state_dict(loss_head, optimizer)
    state = {"model": model_sd, "optimizer": optim_sd}
    dcp.load(state, checkpoint_id=directory, no_dist=not dist.is_initialized())
    set_state_dict(loss_head, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


class SavedWeights:
    """The weights in a state directory by the model's own names, each tensor read from the
    ranks' files when asked for (model.save_pretrained asks one shard at a time): an export
    that never holds the whole model."""

    def __init__(self, directory: Path, model):
        self.directory, self.like = directory, model.state_dict()

    def __getitem__(self, name: str) -> torch.Tensor:
        like = self.like[name]
        tensor = torch.empty(like.shape, dtype=torch.float32)
        dcp.load({"model": {f"model.{name}": tensor}}, checkpoint_id=self.directory, no_dist=True)
        return tensor


# ---- The run's model and tokenizer ----------------------------------------------------------

IDENTITY_BLOCKS, IDENTITY_BLOCK_BYTES = 16, 4096


def model_identity(model_dir: Path) -> str:
    """What a run knows its --model by: sha256 over config.json, the tokenizer and template files,
    the weights' index, and for each *.safetensors file its name, size, header (tensor names,
    shapes, offsets) and 16 blocks of 4 KiB spread evenly over it. Cheap at any size (a 15 GB
    model is not read whole), and another checkpoint of the same model differs in those blocks.
    The same directory under another spelling has the same identity; another directory behind
    the same spelling has not."""
    digest = hashlib.sha256()

    def feed(label: str, data: bytes | None):
        digest.update(f"{label}\0{'-' if data is None else len(data)}\0".encode() + (data or b""))

    for name in ("config.json", *TOKENIZER_FILES, "model.safetensors.index.json"):
        feed(name, (model_dir / name).read_bytes() if (model_dir / name).is_file() else None)
    for path in sorted(model_dir.glob("*.safetensors")):
        size = path.stat().st_size
        with open(path, "rb") as f:
            header = f.read(min(size, int.from_bytes(f.read(8), "little")))  # after its 8-byte length
            blocks = []
            for k in range(IDENTITY_BLOCKS):
                f.seek(k * max(0, size - IDENTITY_BLOCK_BYTES) // (IDENTITY_BLOCKS - 1))
                blocks.append(f.read(IDENTITY_BLOCK_BYTES))
        feed(f"{path.name}:{size}", header + b"".join(blocks))
    return "sha256:" + digest.hexdigest()


def tokenizer_source(out: Path, source_dir: Path, resume_dir: Path | None) -> Path:
    """Where a run reads its tokenizer: the source model when it starts (or starts over, having
    saved no checkpoint); when it resumes, its own copy RUN/tokenizer (a run from before runs
    took one: its checkpoint's)."""
    if resume_dir is None:
        return source_dir
    return out / "tokenizer" if (out / "tokenizer").is_dir() else resume_dir


def snapshot_tokenizer(out: Path, tokenizer_dir: Path) -> None:
    """Take the tokenizer and template files of `tokenizer_dir` into RUN/tokenizer, whole (a
    temporary directory renamed into place): every checkpoint copies them from there, so it has
    them even if the source model directory is deleted or replaced during the run."""
    own = out / "tokenizer"
    if own.is_dir() and own.resolve() == tokenizer_dir.resolve():
        return
    tmp = out / ".tmp-tokenizer"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for f in TOKENIZER_FILES:
            if (tokenizer_dir / f).is_file():
                shutil.copy2(tokenizer_dir / f, tmp / f)
        shutil.rmtree(own, ignore_errors=True)  # the copy of a start that saved no checkpoint
        os.replace(tmp, own)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---- One run per directory ------------------------------------------------------------------


def run_settings(args, source_dir: Path) -> dict:
    """The settings that define a run, as saved in RUN/args.json: every flag not in RESUMABLE,
    with the model known by content (`model_identity`) and the data files by sha256 (moving or
    respelling one is fine, changing it is not), and the dtype actually used."""
    settings = {k: v for k, v in vars(args).items() if k not in (*RESUMABLE, "resume", "plot", "out")}
    settings["model"] = model_identity(source_dir)
    settings["data"] = "sha256:" + file_sha256(args.data)
    settings["eval_data"] = "sha256:" + file_sha256(args.eval_data) if args.eval_data else None
    settings["dtype"] = args.dtype or ("bfloat16" if torch.cuda.is_available() else "float32")
    return json.loads(json.dumps(settings))  # as args.json gives it back (tuples become lists)


def write_run_settings(out: Path, args, source_dir: Path):
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "args.json", json.dumps({"settings": run_settings(args, source_dir), "args": vars(args)},
                                               indent=2) + "\n")


def check_same_run(out: Path, args, source_dir: Path):
    """Refuse a --resume whose run-defining settings differ from those in RUN/args.json."""
    path = out / "args.json"
    if not path.is_file():
        return  # a run from before args.json held its settings: nothing to compare with
    try:
        saved = json.loads(path.read_bytes())
    except (ValueError, RecursionError):
        raise UserError(f"{path}: not JSON; cannot check the resume") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("settings", {}), dict):
        raise UserError(f"{path}: not written by train.py; cannot check the resume")
    if "settings" not in saved:  # written by a train.py from before the settings were recorded
        print(f"{path}: an older run's flags, without its settings: the resume is not checked", file=sys.stderr)
        return
    current = run_settings(args, source_dir)
    if not str(saved["settings"].get("model")).startswith("sha256:"):  # a run from before models were known by content
        current["model"] = args.model
    changed = changed_settings(saved["settings"], current)
    if changed:
        raise UserError(f"--resume would join two different trainings in {out}: {'; '.join(changed)} "
                        f"(only --{', --'.join(k.replace('_', '-') for k in RESUMABLE)} may change)")


def find_resume(out: Path, args, source_dir: Path, log) -> Path | None:
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
        check_same_run(out, args, source_dir)
    return resume_dir


def start_step(out: Path, args, resume_dir: Path | None, loss_head, optimizer, cuda: bool, main: bool, log) -> int:
    """The step a run starts at: a checkpoint's (its optimizer state and RNG restored, the
    logged lines of later steps dropped), or 0 with the RNG seeded from --seed."""
    if resume_dir is not None:
        step = restore(resume_dir, loss_head, optimizer, cuda)
        if main:
            for log_file in ("metrics.jsonl", "online.jsonl"):
                keep_until(out / log_file, step)
        log(f"resumed from {resume_dir} at step {step}")
        return step
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    if main and args.resume:  # a run that crashed before its first checkpoint: restart its logs
        for log_file in ("metrics.jsonl", "online.jsonl"):
            keep_until(out / log_file, 0)
    return 0
