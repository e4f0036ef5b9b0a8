"""Reproduce the paper's two claims in miniature, end to end, with one command.

    python scripts/reproduce.py --scale smoke    # minutes on CPU: checks the plumbing, proves nothing
    python scripts/reproduce.py --scale cpu      # about 3.3 hours on a 2-core CPU (estimated below): a powered study
    python scripts/reproduce.py --scale gpu      # the larger plan (bf16, compiled), one GPU

Model: the bundled SmolLM2-135M-Instruct (--model to change). Data: scripts/make_gsm8k.py —
train, validation and test splits of the same gsm_symbolic templates (new numbers), and a split
of templates never trained on. Everything goes to results/<scale>/ (--out to change); stages:

  data      train, validation, test, heldout .jsonl                (scripts/make_gsm8k.py)
  ddt       claim 1 (DDT, docs/math.md): on the first problems of train, the φ statistics
            (average φ, z, shares of φ_t above −1/−3/−5) under the plain prompt of
              (a) the reference solutions, (b) the model's own answers sampled at temperature 1
              (on-policy by construction: E[φ_t] = 0), (c) β = 0 rewrites (the hint stream
              alone), (d) hinted-decoding rewrites (β of HD_BETA) — the paper says (d) sits near
              (b) while (a) and (c) do not                         -> ddt.json, ddt.png
  hd        the hinted_decode.py pipeline on the first n_hd train problems: the model's verified
            own answers and its verified hinted rewrites (yield and φ reported) -> hd.jsonl
  grid      claim 2 (IDFT, docs/math.md): train.py with each loss of GRID_LOSSES at each learning
            rate of the scale's grid, on the references; same steps, batch, data order, seed
                                                                   -> runs/<loss>_lr<rate>/
  select    every grid model (and the base) answers the validation split and is measured for
            drift, KL(base ‖ model) on everyday prompts; each loss keeps the rate with the best
            validation accuracy (ties: the smaller drift)          -> eval/<name>.validation.json
  hd_train  sft and idft on hd.jsonl at the rates chosen for sft and idft -> runs/hd_<loss>/
  final     the base, each loss at its chosen rate, and the hd runs answer the test split
            (same templates) and the held-out templates: accuracy with Wilson intervals, exact
            McNemar tests against SFT on the same questions, NLL and φ of the references, and
            the φ of each model's own training data before and after -> eval/<name>.json
  report    tables, plots (frontier: validation accuracy against drift, one point per loss ×
            rate; dynamics: mean φ and entropy of the training batches per step) and a
            reading generated from the numbers                     -> results.md, *.png
            (with the default --out, also results/README.md and the README's headline)

Restartable: a stage whose outputs are present and were made with the same settings is
reused; hd.jsonl and training runs resume where they stopped (hinted_decode.py and
train.py --resume); outputs made with other settings stop the run with an error instead of
being overwritten. Interrupt at any time and rerun the same command. The seconds each stage
spent are added up across reruns in timings.json and reported.

How the cpu scale was chosen (a pilot, 2026-11-29, on this 2-core machine): on all 70 train
templates at 16 steps × 8 sequences, SFT at 1e-4 left test accuracy where the base was (4%
vs 4%, 48 questions). The templates with the shortest solutions (two or three arithmetic lines,
35–60 tokens) make answers cheap to generate and quick to learn: on the nine chosen here the
base answers 1/96 test questions (2/96 on the six held-out ones), and SFT at 1e-4 after 40
steps × 8 sequences 33/96 (34%): learning shows. Each training run takes about 5 minutes and
each model answers 100–150 questions a minute, which fits the grid (3 losses × 3 rates), the
hd and online runs and 300 + 300 paired questions in a few hours. Measured on the final code
(2026-12-06, one torch thread per process: OMP_NUM_THREADS=1): the stages add up to 224
minutes, 62 of them for the two online arms (47 training with their generation, 3 validation,
12 test and held-out). Generation gains nothing from a second thread on this machine, so the
committed run executed independent stages (training runs, evaluations) two at a time, one
thread each: 112 minutes of wall time. reproduce.py itself runs them one after another, at two
threads: an estimated 3.3 hours (a training run took 7.2 minutes at one thread here, 5.0 at two in
the study before the online arms, so the grid and hd runs shrink from 79 to about 55 minutes).
"""

import argparse
import json
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]  # run from any directory, or imported by the tests

import torch  # noqa: E402  (after the path setup, like the imports below)

import eval as evaluation  # noqa: E402
import hinted_decode  # noqa: E402
import make_gsm8k  # noqa: E402  (scripts/ is on the path: this file lives there)
import train  # noqa: E402
import study_stats  # noqa: E402
from data import Example, answers_match, encode_example, extract_answer, load_examples  # noqa: E402
from plumbing.cli import ArgumentParser, RunError, UserError  # noqa: E402
from plumbing.files import atomic_write, check_output, lock_output, read_log, replace_marked_block  # noqa: E402
from plumbing.checkpoints import latest_checkpoint  # noqa: E402
from plumbing.metrics import curves, read_metrics  # noqa: E402
from plumbing.precision import compute_dtype  # noqa: E402
from plumbing.report import bar_chart, plot_run  # noqa: E402
from ddt import score_examples  # noqa: E402
from hub import BUNDLED_NAME, resolve_model_dir  # noqa: E402
from model import Transformer, generate  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402


@dataclass(frozen=True)
class Scale:
    train_templates: tuple[int, ...] | None  # templates of train/validation/test (None: all not held out)
    heldout_templates: tuple[int, ...] | int  # templates never trained on: which, or how many at random
    n_train: int  # training examples (references)
    n_validation: int  # questions that choose each loss's learning rate
    n_test: int  # test questions (train templates, other draws)
    n_heldout: int  # questions from the held-out templates
    n_ddt: int  # train problems scored for claim 1
    n_hd: int  # train problems hinted decoding rewrites (the first n_hd)
    steps: int  # optimizer steps of every training run
    batch_size: int  # sequences per optimizer step
    micro_batch_size: int
    max_len: int  # longest training sequence (longer ones are skipped, and counted)
    learning_rates: tuple[float, ...]  # the grid every loss of GRID_LOSSES is trained at
    max_new_tokens: int  # answers: evaluation, claim 1, hinted decoding
    n_general: int  # everyday prompts for the drift KL (eval.GENERAL_PROMPTS)
    general_max_new_tokens: int
    n_phi: int  # examples scored for the φ/NLL of references and of each model's training data
    eval_batch_size: int


SHORT_TEMPLATES = (4, 6, 10, 16, 26, 43, 50, 58, 72)  # two-line solutions, 35–50 tokens (see the docstring)
SHORT_HELDOUT = (14, 20, 31, 39, 75, 99)  # two- or three-line solutions, 50–60 tokens
SCALES = {
    "smoke": Scale(train_templates=SHORT_TEMPLATES, heldout_templates=SHORT_HELDOUT, n_train=16, n_validation=8,
                   n_test=8, n_heldout=8, n_ddt=4, n_hd=16, steps=2, batch_size=4, micro_batch_size=2, max_len=320,
                   learning_rates=(5e-5, 1e-4), max_new_tokens=48, n_general=4, general_max_new_tokens=24, n_phi=8,
                   eval_batch_size=8),
    "cpu": Scale(train_templates=SHORT_TEMPLATES, heldout_templates=SHORT_HELDOUT, n_train=320, n_validation=150,
                 n_test=300, n_heldout=300, n_ddt=16, n_hd=320, steps=40, batch_size=8, micro_batch_size=8,
                 max_len=320, learning_rates=(1e-5, 3e-5, 1e-4), max_new_tokens=96, n_general=12,
                 general_max_new_tokens=96, n_phi=48, eval_batch_size=50),
    "gpu": Scale(train_templates=None, heldout_templates=make_gsm8k.HELDOUT_TEMPLATES, n_train=4000, n_validation=300,
                 n_test=500, n_heldout=500, n_ddt=128, n_hd=2000, steps=250, batch_size=32, micro_batch_size=8,
                 max_len=768, learning_rates=(1e-5, 3e-5, 1e-4), max_new_tokens=512, n_general=50,
                 general_max_new_tokens=256, n_phi=256, eval_batch_size=64),
}
SEED = 0
HD_BETA = 3.0  # β of the hinted rewrites (hinted_decode.py's default)
GRID_LOSSES = ("sft", "dft", "idft")  # trained on the references at every rate of the grid
HD_LOSSES = ("sft", "idft")  # trained on hd.jsonl at the rate chosen for the same loss
ONLINE_LOSSES = ("sft", "idft")  # train.py --online on the train problems, at the rate chosen for the same loss
BASELINE = "sft"  # every other model is compared with it; hd_idft also with hd_sft


def log(msg: str):
    print(f"[reproduce {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def check(code: int, what: str):
    """Stop the study when a stage's command failed (its own message is already printed)."""
    if code == 130:
        raise KeyboardInterrupt
    if code != 0:
        raise UserError(f"{what} failed (exit {code}); fix the cause and rerun the same command to continue")


def reuse(path: Path, settings) -> dict | None:
    """A stage's saved result if it was made with these settings; None if absent."""
    if not path.exists():
        return None
    saved = json.loads(path.read_text())
    if saved.get("settings") != settings:
        raise UserError(f"{path} was made with other settings ({saved.get('settings')}); delete it or choose "
                        "another --out")
    return saved


def save(path: Path, settings, result: dict) -> dict:
    record = {"settings": settings, **result}
    atomic_write(path, json.dumps(record, indent=1, ensure_ascii=False) + "\n")
    return record


class Timings:
    """Seconds per stage, added up over every invocation (a resumed study reports its whole cost)."""

    def __init__(self, path: Path):
        self.path = path
        self.seconds = json.loads(path.read_text()) if path.exists() else {}

    def add(self, stage: str, seconds: float):
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds
        atomic_write(self.path, json.dumps(self.seconds, indent=1) + "\n")


def examples_in(path: Path) -> list[Example]:
    """The examples of a data file; none for an empty one (hd.jsonl when no rewrite verified)."""
    return load_examples(path) if path.stat().st_size else []


def scale_settings(scale: Scale) -> dict:
    """The scale as its saved settings read back (tuples become lists in JSON)."""
    return json.loads(json.dumps(asdict(scale)))


def run_name(loss: str, lr: float) -> str:
    return f"{loss}_lr{lr:g}"


# ---- Stage: data --------------------------------------------------------------------------------


def make_data(out: Path, scale: Scale) -> dict[str, Path]:
    """make_gsm8k.py's splits: deterministic, so always made; files with other content are refused."""
    counts = {"train": scale.n_train, "validation": scale.n_validation, "test": scale.n_test,
              "heldout": scale.n_heldout}
    heldout = scale.heldout_templates if isinstance(scale.heldout_templates, int) else list(scale.heldout_templates)
    texts, _ = make_gsm8k.build(counts, heldout, SEED, scale.train_templates)
    written = make_gsm8k.write_splits(out / "data", texts, overwrite=False, remedy="delete them or choose another --out")
    log(f"data: {', '.join(written) or 'nothing'} written in {out / 'data'}")
    return {split: out / "data" / f"{split}.jsonl" for split in counts}


# ---- Stage: ddt (claim 1) -----------------------------------------------------------------------

DDT_SOURCES = {"reference": "(a) reference solutions", "own": "(b) own answers, sampled at temperature 1",
               "beta0": "(c) β = 0 rewrites (hint stream alone), greedy",
               "hinted": f"(d) hinted rewrites, β = {HD_BETA:g}, greedy"}


def ddt_stage(out: Path, model_dir: Path, train_file: Path, scale: Scale, device: str) -> dict:
    settings = {"model": str(model_dir), "n": scale.n_ddt, "max_new_tokens": scale.max_new_tokens, "beta": HD_BETA,
                "seed": SEED}
    path = out / "ddt.json"
    if (saved := reuse(path, settings)) is not None:
        log(f"ddt: reusing {path}")
        return saved
    log(f"ddt: scoring 4 kinds of responses to {scale.n_ddt} train problems")
    tok = Tokenizer.from_pretrained(model_dir)
    model = Transformer.from_pretrained(model_dir, device=device)
    examples = load_examples(train_file)[:scale.n_ddt]
    stops = tok.stop_ids
    plain = [tok.encode_chat(ex.prompt, add_generation_prompt=True) for ex in examples]
    hint = [tok.encode_chat(hinted_decode.hint_messages(ex), add_generation_prompt=True) for ex in examples]
    splitters = [hinted_decode.auto_splitter(ex) for ex in examples]
    # (text, finish, token sequence scored): references as training tokenizes them; the
    # generated responses exactly as they were decoded (EOS included when produced), so that
    # (b) is the model's own distribution with no re-tokenization in between
    responses = {"reference": [(ex.response, "reference", encode_example(tok, ex)) for ex in examples]}
    generated = {"own": generate(model, plain, scale.max_new_tokens, stop_ids=stops, temperature=1.0, top_p=1.0,
                                 seed=SEED)}
    for name, beta in (("beta0", 0.0), ("hinted", HD_BETA)):
        generated[name] = hinted_decode.hinted_generate(model, hint, plain, beta=beta,
                                                        max_new_tokens=scale.max_new_tokens, stop_ids=stops,
                                                        splitter=splitters, tokenizer=tok, seed=SEED)
    for name, (outputs, finishes) in generated.items():
        responses[name] = [(tok.decode(hinted_decode.strip_stop(ids, stops)), finish, (p + ids, len(p)))
                           for ids, finish, p in zip(outputs, finishes, plain)]

    summary, token_phi = {}, {}
    for name, rows in responses.items():
        scores = score_examples(model, [seq for _, _, seq in rows], tok.pad_id, scale.eval_batch_size, token_phi=True)
        token_phi[name] = [phi for s in scores for phi in s.pop("phi_tokens")]
        summary[name] = {
            "label": DDT_SOURCES[name], "n": len(scores),
            **{key: evaluation.mean([s[key] for s in scores]) for key in hinted_decode.PHI_KEYS},
            "share_flagged_p05": evaluation.mean([s["p_value"] < 0.05 for s in scores if s["p_value"] is not None]),
            "answer_correct": evaluation.mean([answers_match(extract_answer(text), ex.answer)
                                               for ex, (text, _, _) in zip(examples, rows)]),
            "ended_with_eos": evaluation.mean([finish in ("eos", "reference") for _, finish, _ in rows]),
        }
    plot_ddt(token_phi, summary, out / "ddt.png")
    example = {name: rows[0][0] for name, rows in responses.items()}
    return save(path, settings, {"summary": summary, "first_problem": {"question": examples[0].prompt[-1]["content"],
                                                                       "responses": example}})


def plot_ddt(token_phi: dict, summary: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_phi, ax_z) = plt.subplots(1, 2, figsize=(11, 4))
    bins = torch.linspace(-8, 4, 49).tolist()
    for name, values in token_phi.items():
        ax_phi.hist([min(max(v, -8.0), 4.0) for v in values], bins=bins, histtype="step", density=True,
                    label=summary[name]["label"], linewidth=1.5)
    ax_phi.set(xlabel="per-token φ_t = log p(y_t) + H_t (clipped to [−8, 4])", ylabel="density",
               title="Where the tokens sit under the model")
    ax_phi.legend(fontsize=8)
    names = list(summary)
    ax_z.bar(range(len(names)), [summary[n]["z"] or 0.0 for n in names], color="tab:purple")
    ax_z.axhline(-1.645, color="gray", linestyle="--", linewidth=1)
    ax_z.set_xticks(range(len(names)), [summary[n]["label"].split(" ", 1)[0] for n in names])
    ax_z.set(ylabel="mean z = Σφ / sqrt(ΣV)", title="Calibrated score (dashed: one-sided 5%)")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
# ---- Stage: hinted-decoding data ----------------------------------------------------------------


def hd_stage(out: Path, model: str, train_file: Path, scale: Scale, device: str) -> Path:
    """hinted_decode.py resumes by itself: it skips the examples already in hd.jsonl and refuses
    to extend it with other settings (hd.settings.json)."""
    hd = out / "hd.jsonl"
    argv = ["--data", str(train_file), "--out", str(hd), "--model", model, "--beta", str(HD_BETA),
            "--max-new-tokens", str(scale.max_new_tokens), "--batch-size", str(max(1, scale.eval_batch_size // 2)),
            "--limit", str(scale.n_hd), "--seed", str(SEED), "--device", device, "--quiet"]
    log(f"hd: hinted_decode.py on the first {scale.n_hd} problems of {train_file} -> {hd}")
    check(hinted_decode.main(argv), "hinted_decode.py")
    return hd


def hd_summary(hd: Path) -> dict:
    """Yield (verified / tried) and the φ of what was kept, against the φ of the same problems'
    references (both scored by the base model under the plain prompt, by hinted_decode.py)."""
    records = read_log(hd, "hinted_decode.py")[0] + read_log(hinted_decode.record_log(hd).side_path(), "hinted_decode.py")[0]
    counts = {k: sum(r["source"] == k for r in records) for k in ("on_policy", "hinted", "failed")}
    kept = {k: [r for r in records if r["source"] == k and r["phi"] and r["phi_reference"]]
            for k in ("on_policy", "hinted")}
    phi = {k: {"response": evaluation.mean([r["phi"]["phi_mean"] for r in rows]),
               "reference": evaluation.mean([r["phi_reference"]["phi_mean"] for r in rows]),
               "z": evaluation.mean([r["phi"]["z"] for r in rows])} for k, rows in kept.items()}
    failed = [r["response"] for r in records if r["source"] == "failed"]
    commonest = max(set(failed), key=failed.count) if failed else None
    tried = len(records)
    return {"tried": tried, **counts, "yield": (counts["on_policy"] + counts["hinted"]) / tried if tried else None,
            "phi": phi, "failed_no_answer": sum(r["source"] == "failed" and r["predicted_answer"] is None
                                                for r in records),
            "commonest_failure": commonest, "commonest_failure_count": failed.count(commonest)}


# ---- Stages: training (the grid, then the hd runs) ----------------------------------------------


def finished_checkpoint(run_dir: Path, steps: int) -> Path | None:
    latest = latest_checkpoint(run_dir)
    metrics = read_metrics(run_dir) if (run_dir / "metrics.jsonl").exists() else []
    steps_logged = [m["step"] for m in metrics if "step" in m]
    return latest if latest is not None and steps_logged and max(steps_logged) >= steps else None


def train_run(out: Path, name: str, model: str, loss: str, lr: float, data: Path, scale: Scale,
              online: list[str] | None = None) -> dict:
    """One train.py run (resumed if it stopped); recorded as skipped with too little data. online:
    train.py --online with these flags (the data label is then "online")."""
    info = {"loss": loss, "lr": lr, "data": "online" if online else data.stem}
    run_dir = out / "runs" / name
    n_examples = len(examples_in(data))
    if n_examples < scale.batch_size:
        log(f"train {name}: skipped, {data.name} has {n_examples} examples (< batch {scale.batch_size})")
        return {**info, "skipped": f"{n_examples} training examples"}
    argv = ["--data", str(data), "--model", model, "--out", str(run_dir), "--loss", loss,
            "--max-steps", str(scale.steps), "--batch-size", str(scale.batch_size),
            "--micro-batch-size", str(scale.micro_batch_size), "--max-len", str(scale.max_len),
            "--lr", str(lr), "--seed", str(SEED), "--save-every", str(scale.steps), "--log-every", "1", "--resume",
            *(online or [])]
    settings_file = run_dir / "reproduce_settings.json"
    if reuse(settings_file, argv) is None:
        if run_dir.exists():
            raise UserError(f"{run_dir} exists without {settings_file.name}: delete it or choose another --out")
        save(settings_file, argv, {})
    if (done := finished_checkpoint(run_dir, scale.steps)) is None:
        log(f"train {name}: {loss} at lr {lr:g} on {data.name}, {scale.steps} steps")
        check(train.main(argv), f"train.py {shlex.join(argv)}")
        done = finished_checkpoint(run_dir, scale.steps)
        plot_run(run_dir)
    else:
        log(f"train {name}: reusing {done}")
    return {**info, "checkpoint": str(done), "run_dir": str(run_dir)}


def grid_stage(out: Path, model: str, train_file: Path, scale: Scale) -> dict[str, dict]:
    return {run_name(loss, lr): train_run(out, run_name(loss, lr), model, loss, lr, train_file, scale)
            for loss in GRID_LOSSES for lr in scale.learning_rates}


def choose_rates(grid: dict[str, dict]) -> dict[str, str]:
    """Each loss's run with the best validation accuracy; a tie goes to the smaller drift (the
    paper's claim is about both), then to the smaller rate. {loss: run name}."""
    chosen = {}
    for loss in GRID_LOSSES:
        runs = [(name, r) for name, r in grid.items() if r.get("loss") == loss and "validation" in r]
        if runs:
            chosen[loss] = min(runs, key=lambda nr: (-nr[1]["validation"]["accuracy"], nr[1]["kl_from_base"],
                                                     nr[1]["lr"]))[0]
    return chosen


def hd_train_stage(out: Path, model: str, hd: Path, grid: dict, chosen: dict[str, str], scale: Scale) -> dict:
    return {f"hd_{loss}": train_run(out, f"hd_{loss}", model, loss, grid[chosen[loss]]["lr"], hd, scale)
            for loss in HD_LOSSES if loss in chosen}


def online_stage(out: Path, model: str, train_file: Path, grid: dict, chosen: dict[str, str], scale: Scale) -> dict:
    """train.py --online at each loss's chosen rate: the same steps, batch and problems as the other
    runs, the hinted rewrites made as the hd stage makes them, but with the current weights."""
    flags = ["--online", "--online-beta", str(HD_BETA), "--online-max-new-tokens", str(scale.max_new_tokens),
             "--online-batch-size", str(scale.batch_size)]
    return {f"online_{loss}": train_run(out, f"online_{loss}", model, loss, grid[chosen[loss]]["lr"], train_file,
                                        scale, online=flags)
            for loss in ONLINE_LOSSES if loss in chosen}


# ---- Stages: evaluation (validation for every model, then test and held-out) ---------------------


def fingerprint(model_dir: Path) -> list:
    """Size and mtime of the weights: a retrained checkpoint invalidates its evaluation."""
    return sorted([f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in model_dir.glob("*.safetensors"))


class Evaluator:
    """Evaluations of one study, with the base model and its answers to the everyday prompts
    loaded once, on first use (not at all when every evaluation is reused)."""

    def __init__(self, out: Path, base_dir: Path, files: dict[str, Path], scale: Scale, device: str):
        self.out, self.base_dir, self.files, self.scale = out, base_dir, files, scale
        self.args = SimpleNamespace(max_new_tokens=scale.max_new_tokens, batch_size=scale.eval_batch_size,
                                    device=device, dtype=compute_dtype(None, device))
        self._base, self._drift = None, None

    def base(self):
        if self._base is None:
            self._base = evaluation.load(self.base_dir, self.args)
        return self._base

    def drift_answers(self) -> list:
        """The base model's greedy answers to the everyday prompts, made once for every model."""
        if self._drift is None:
            scale = self.scale
            settings = {"model": str(self.base_dir), "n_general": scale.n_general,
                        "general_max_new_tokens": scale.general_max_new_tokens}
            path = self.out / "eval" / "base_drift_answers.json"
            if (saved := reuse(path, settings)) is None:
                base, tok = self.base()
                prompts = [tok.encode_chat([{"role": "user", "content": p}], add_generation_prompt=True)
                           for p in evaluation.GENERAL_PROMPTS[:scale.n_general]]
                gens, _ = evaluation.generate_all(base, prompts, tok.stop_ids, scale.general_max_new_tokens,
                                                  scale.eval_batch_size, "  base on everyday prompts")
                saved = save(path, settings, {"seqs": [[p + g.tokens, len(p)] for p, g in zip(prompts, gens)]})
            self._drift = [tuple(s) for s in saved["seqs"]]
        return self._drift

    def run(self, name: str, info: dict, part: str) -> dict:
        """part "validation": accuracy on the validation split and the drift KL; part "final":
        accuracy on test and held-out, the φ/NLL of their references and of the model's own
        training data. Saved to eval/<name>.<part>.json (and the answers to .jsonl files)."""
        if "skipped" in info:
            return info
        model_dir, scale = Path(info["checkpoint"]), self.scale
        data_names = ("train", "hd") if name == "base" else (info["data"],)
        train_data = {d: self.files[d] for d in data_names if d in self.files}
        splits = ("validation",) if part == "validation" else ("test", "heldout")
        settings = {"model": str(model_dir), "weights": fingerprint(model_dir), **scale_settings(scale),
                    "train_data": {d: str(f) for d, f in train_data.items()}}
        path = self.out / "eval" / f"{name}.{part}.json"
        if (saved := reuse(path, settings)) is not None:
            log(f"eval {name} ({part}): reusing {path}")
            return {**info, **saved}
        log(f"eval {name} ({part}): {model_dir}")
        model, tok = self.base() if model_dir == self.base_dir else evaluation.load(model_dir, self.args)
        result = {}
        for split in splits:
            examples = load_examples(self.files[split])
            summary, rows = evaluation.evaluate_model(model, tok, examples, self.args)
            result[split] = {**summary, "verdicts": [r["correct"] for r in rows]}
            if part == "final":
                refs = score_examples(model, [encode_example(tok, ex) for ex in examples[:scale.n_phi]], tok.pad_id,
                                      scale.eval_batch_size)
                result[split]["reference"] = evaluation.phi_summary(refs)
            atomic_write(self.out / "eval" / f"{name}.{split}.jsonl",
                         "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        if part == "validation":
            sums, counts = evaluation.kl_from_base(self.base()[0], model, self.drift_answers(), tok.pad_id,
                                                   scale.eval_batch_size)
            result["kl_from_base"] = sum(sums) / sum(counts)
        else:
            result["train_data_phi"] = {}
            for d, f in train_data.items():
                if examples := examples_in(f)[:scale.n_phi]:
                    scores = score_examples(model, [encode_example(tok, ex) for ex in examples], tok.pad_id,
                                            scale.eval_batch_size)
                    result["train_data_phi"][d] = evaluation.phi_summary(scores)
        log(f"eval {name} ({part}): " + ", ".join(f"{s} {result[s]['accuracy']:.3f}" for s in splits)
            + (f", KL {result['kl_from_base']:.4f}" if part == "validation" else ""))
        return {**info, **save(path, settings, result)}


# ---- Stage: report ------------------------------------------------------------------------------


def f(x, spec=".3f"):
    return "–" if x is None else format(x, spec)


def acc(r: dict) -> str:
    return f"{r['accuracy']:.3f} ({r['correct']}/{r['n']}) [{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}]"


def ddt_table(ddt: dict) -> list[str]:
    lines = ["| responses | n | average φ | z | φ_t > −1 | φ_t > −3 | φ_t > −5 | flagged (p < 0.05) | answer correct |",
             "|---|---|---|---|---|---|---|---|---|"]
    for s in ddt["summary"].values():
        lines.append(f"| {s['label']} | {s['n']} | {f(s['phi_mean'], '+.3f')} | {f(s['z'], '+.2f')} | "
                     f"{f(s['share_phi_gt_-1'])} | {f(s['share_phi_gt_-3'])} | {f(s['share_phi_gt_-5'])} | "
                     f"{f(s['share_flagged_p05'], '.2f')} | {f(s['answer_correct'], '.2f')} |")
    return lines


def ddt_reading(s: dict) -> str:
    """DDT's test is one-sided: it flags text the model finds less likely than its own (z below
    the 5% quantile). Greedy rewrites are *more* likely than samples (φ > 0): not flagged."""
    if any(s[k]["phi_mean"] is None for k in DDT_SOURCES):
        return "- **DDT.** Not measurable: some kind of response was empty for every problem."
    flagged = {k: s[k]["share_flagged_p05"] for k in DDT_SOURCES}
    shares = ", ".join(f"{DDT_SOURCES[k].split(' ', 1)[0]} {flagged[k]:.2f}" for k in DDT_SOURCES)
    holds = (flagged["hinted"] < flagged["reference"] and s["hinted"]["phi_mean"] > s["reference"]["phi_mean"]
             and flagged["hinted"] <= flagged["beta0"])
    return (f"- **DDT.** Share of responses the calibrated test flags as off-distribution (p < 0.05): {shares}; "
            f"average φ: reference {s['reference']['phi_mean']:+.3f}, own samples {s['own']['phi_mean']:+.3f} "
            f"(near 0 by construction), β = 0 {s['beta0']['phi_mean']:+.3f}, hinted {s['hinted']['phi_mean']:+.3f}. "
            + ("**Reproduces**: the hinted rewrites are flagged less than the references and no more than the "
               "β = 0 rewrites." if holds else
               "**Does not reproduce** here: the hinted rewrites are not flagged less than both the references "
               "and the β = 0 rewrites."))


# (model, compared with): McNemar on the same questions. The first shows whether the task
# teaches anything at all; the rest are the paper's claim 2.
COMPARISONS = (("sft", "base"), ("dft", "sft"), ("idft", "sft"), ("hd_sft", "sft"), ("hd_idft", "sft"),
               ("hd_idft", "hd_sft"), ("online_sft", "sft"), ("online_idft", "sft"), ("online_sft", "hd_sft"),
               ("online_idft", "hd_idft"))
SPLIT_TITLES = {"test": "test (trained templates)", "heldout": "held-out templates"}
LEARNING_SHOWS = 0.10  # SFT must beat the base by this much on test for the comparisons to mean something


def paired_tests(final: dict) -> list[dict]:
    tests = []
    for a, b in COMPARISONS:
        if not all(name in final and "test" in final[name] for name in (a, b)):
            continue
        for split in ("test", "heldout"):
            tests.append({"a": a, "b": b, "split": split,
                          **study_stats.paired_comparison(final[a][split]["verdicts"], final[b][split]["verdicts"])})
    return tests


def paired_table(tests: list[dict]) -> list[str]:
    lines = ["| A vs B | questions | A − B | only A right | only B right | exact McNemar p | detectable (80% power) |",
             "|---|---|---|---|---|---|---|"]
    for t in tests:
        lines.append(f"| {t['a']} vs {t['b']} | {SPLIT_TITLES[t['split']]}, {t['n']} | {100 * t['difference']:+.1f} "
                     f"pts | {t['only_a']} | {t['only_b']} | {t['p_value']:.3g} | "
                     f"{f(t['detectable_difference'] and 100 * t['detectable_difference'], '.1f')} pts |")
    return lines


def grid_table(validation: dict, chosen: dict[str, str], dynamics: dict) -> list[str]:
    lines = ["| run | loss | data | lr | validation accuracy [95% CI] | KL(base ‖ model) | training φ: first → last "
             "step | training entropy: first → last step | chosen |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in validation.items():
        if name == "base":
            continue
        if "skipped" in r:
            lines.append(f"| {name} | {r['loss']} | {r['data']} | {r['lr']:g} | skipped: {r['skipped']} | | | | |")
            continue
        d = dynamics.get(name, {})
        phi, ent = d.get("phi_mean", [(0, None)]), d.get("entropy_mean", [(0, None)])
        lines.append(f"| {name} | {r['loss']} | {r['data']} | {r['lr']:g} | {acc(r['validation'])} | "
                     f"{r['kl_from_base']:.4f} | {f(phi[0][1], '+.3f')} → {f(phi[-1][1], '+.3f')} | "
                     f"{f(ent[0][1], '.3f')} → {f(ent[-1][1], '.3f')} | "
                     f"{'✓' if name in chosen.values() else ''} |")
    return lines


def final_table(final: dict, validation: dict, online: dict) -> list[str]:
    lines = ["| model | lr | test accuracy [95% CI] | held-out accuracy [95% CI] | test NLL | held-out NLL "
             "| KL(base ‖ model) | φ of its training data: base → after | test answers at length limit |",
             "|---|---|---|---|---|---|---|---|---|"]
    base = final["base"]
    for name, r in final.items():
        if "skipped" in r:
            lines.append(f"| {name} | | skipped: {r['skipped']} | | | | | | |")
            continue
        phi = "–"
        if name in online:  # no fixed training data: its own, at the first and last step, as made
            phi = f"{f(online[name]['phi_first'], '+.3f')} → {f(online[name]['phi_last'], '+.3f')} (as made)"
        elif name != "base":
            before = base["train_data_phi"].get(r["data"], {}).get("phi_token_mean")
            after = r["train_data_phi"].get(r["data"], {}).get("phi_token_mean")
            phi = f"{f(before, '+.3f')} → {f(after, '+.3f')}"
        lines.append(f"| {name} | {f(r.get('lr'), 'g')} | {acc(r['test'])} | {acc(r['heldout'])} "
                     f"| {r['test']['reference']['nll_token_mean']:.3f} | {r['heldout']['reference']['nll_token_mean']:.3f} "
                     f"| {validation[r.get('run', name)]['kl_from_base']:.4f} | {phi} | "
                     f"{r['test']['length_limit_share']:.2f} |")
    return lines


def training_dynamics(runs: dict) -> dict[str, dict]:
    """{run: {"phi_mean": [(step, value)], "entropy_mean": [...]}} from each run's metrics.jsonl."""
    return {name: curves(read_metrics(Path(r["run_dir"]))) for name, r in runs.items()
            if "run_dir" in r}


LOSS_COLORS = {"sft": "tab:blue", "dft": "tab:orange", "idft": "tab:green"}


def plot_frontier(validation: dict, chosen: dict[str, str], path: Path):
    """Validation accuracy against drift: one point per loss × rate (a line joins a loss's rates)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    base = validation["base"]["validation"]
    ax.errorbar([0.0], [base["accuracy"]], yerr=[[base["accuracy"] - base["ci95"][0]], [base["ci95"][1] - base["accuracy"]]],
                fmt="k*", markersize=12, capsize=3, label="base")
    for loss in GRID_LOSSES:
        pts = sorted((r["lr"], r["kl_from_base"], r["validation"], name) for name, r in validation.items()
                     if name != "base" and r.get("data") == "train" and r["loss"] == loss and "validation" in r)
        if not pts:
            continue
        x, y = [p[1] for p in pts], [p[2]["accuracy"] for p in pts]
        err = [[a - p[2]["ci95"][0] for a, p in zip(y, pts)], [p[2]["ci95"][1] - a for a, p in zip(y, pts)]]
        ax.errorbar(x, y, yerr=err, fmt="o-", color=LOSS_COLORS[loss], capsize=3, alpha=0.85, label=loss)
        for lr, kl, v, name in pts:
            ax.annotate(f"{lr:g}", (kl, v["accuracy"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
            if name in chosen.values():
                ax.plot([kl], [v["accuracy"]], "o", markersize=14, markerfacecolor="none", color=LOSS_COLORS[loss])
    for name, r in validation.items():
        if r.get("data") in ("hd", "online") and "validation" in r:
            ax.plot([r["kl_from_base"]], [r["validation"]["accuracy"]], "D" if r["data"] == "hd" else "s",
                    color=LOSS_COLORS[r["loss"]], markeredgecolor="black", label=f"{name} (lr {r['lr']:g})")
    ax.set(xlabel="drift: mean per-token KL(base ‖ model) on everyday prompts",
           ylabel="validation accuracy (95% Wilson CI)",
           title="In-domain accuracy against drift (labels: learning rate; circled: chosen)")
    ax.set_xscale("symlog", linthresh=1e-3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def plot_dynamics(dynamics: dict, runs: dict, path: Path):
    """Mean φ and mean entropy H of each step's training tokens, one line per run; for the online
    runs also the problems trained per step and the φ of that data under the model that made it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = sorted({r["lr"] for r in runs.values()})
    styles = [":", "--", "-", "-."]
    online = [name for name in dynamics if runs[name]["data"] == "online"]
    fig, axes = plt.subplots(2 if online else 1, 2, figsize=(12, 8.4 if online else 4.2), squeeze=False)
    for name, series in dynamics.items():
        r = runs[name]
        style = dict(color=LOSS_COLORS[r["loss"]], linestyle=styles[rates.index(r["lr"]) % len(styles)],
                     linewidth=2.4 if r["data"] != "train" else 1.4, alpha=0.55 if r["data"] == "hd" else 0.9,
                     marker="." if r["data"] == "online" else None, label=name)
        panels = [("phi_mean", axes[0, 0]), ("entropy_mean", axes[0, 1])]
        if r["data"] == "online":
            panels += [("online_trained", axes[1, 0]), ("online_phi_mean", axes[1, 1])]
        for key, ax in panels:
            if key in series:
                ax.plot([s for s, _ in series[key]], [v for _, v in series[key]], **style)
    axes[0, 0].set(xlabel="step", ylabel="mean φ_t of the step's tokens", title="φ of the training batches")
    axes[0, 1].set(xlabel="step", ylabel="mean H_t (nats)", title="Entropy of the model on the training batches")
    axes[0, 0].axhline(0.0, color="gray", linewidth=0.8)
    axes[0, 1].legend(fontsize=7, ncol=2)
    if online:
        axes[1, 0].set(xlabel="step", ylabel="problems trained (of the step's batch)",
                       title="Online: verified own answers and rewrites per step")
        axes[1, 1].set(xlabel="step", ylabel="mean φ per example", title="Online: φ of the kept data under the "
                       "model that made it")
        axes[1, 1].axhline(0.0, color="gray", linewidth=0.8)
        axes[1, 0].legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def online_summary(run_dir: Path) -> dict:
    """What an online run generated and trained, from its metrics.jsonl."""
    rows = [r for r in read_metrics(run_dir) if "online_trained" in r]
    tenth = max(1, len(rows) // 4)
    phis = [r["online_phi_mean"] for r in rows if r["online_phi_mean"] is not None]
    total = {s: sum(r[f"online_{s}"] for r in rows) for s in ("own", "hinted", "reference", "dropped")}
    return {"steps": len(rows), "skipped_steps": sum("loss" not in r for r in rows), **total,
            "trained": sum(r["online_trained"] for r in rows),
            "trained_per_step_first": sum(r["online_trained"] for r in rows[:tenth]) / tenth,
            "trained_per_step_last": sum(r["online_trained"] for r in rows[-tenth:]) / tenth,
            "phi_first": phis[0] if phis else None, "phi_last": phis[-1] if phis else None,
            "gen_seconds": sum(r["gen_seconds"] for r in rows) / len(rows),
            "train_seconds": sum(r.get("train_seconds", 0.0) for r in rows) / len(rows)}


def online_table(online: dict) -> list[str]:
    lines = ["| run | steps (skipped: nothing verified) | trained: own + hinted (dropped) | trained per step: "
             "first → last quarter | φ of the kept data under the model that made it: first → last step | "
             "seconds per step: generation / training |", "|---|---|---|---|---|---|"]
    for name, o in online.items():
        lines.append(f"| {name} | {o['steps']} ({o['skipped_steps']}) | {o['own']} + {o['hinted']} ({o['dropped']}) | "
                     f"{o['trained_per_step_first']:.1f} → {o['trained_per_step_last']:.1f} | "
                     f"{f(o['phi_first'], '+.3f')} → {f(o['phi_last'], '+.3f')} | "
                     f"{o['gen_seconds']:.1f} / {o['train_seconds']:.1f} |")
    return lines


def verdict(t: dict) -> str:
    if t["p_value"] < 0.05:
        return f"**{t['a']} {'better' if t['difference'] > 0 else 'worse'}** (p = {t['p_value']:.3g})"
    if t["detectable_difference"] is None:
        return ("no difference detected (the two models answer every question alike)" if not t["only_a"] + t["only_b"]
                else f"no difference detectable: the two models disagree on {t['only_a'] + t['only_b']} questions only")
    return (f"no difference detected (p = {t['p_value']:.2f}; this comparison detects about "
            f"{100 * t['detectable_difference']:.0f} points with 80% power)")


def reading(ddt: dict, hd: dict, chosen: dict, validation: dict, final: dict, tests: list[dict], dynamics: dict,
            scale: Scale, online: dict) -> list[str]:
    """Which claims the numbers support, stated by rules on the numbers (not typed by hand)."""
    out = [ddt_reading(ddt["summary"])]
    if hd["tried"]:
        phi = hd["phi"]["hinted"]
        out.append(f"- **Hinted-decoding data.** {hd['on_policy'] + hd['hinted']} of {hd['tried']} problems verified "
                   f"(yield {hd['yield']:.2f}: {hd['on_policy']} own answers, {hd['hinted']} hinted rewrites); the "
                   f"kept rewrites have average φ {f(phi['response'], '+.3f')} under the base, their references "
                   f"{f(phi['reference'], '+.3f')}."
                   + (f" Of the {hd['failed']} failures {hd['failed_no_answer']} give no answer at all; the "
                      f"commonest failed response ({hd['commonest_failure_count']}×) is "
                      f"{json.dumps(hd['commonest_failure'][:80], ensure_ascii=False)}." if hd["failed"] else ""))
    by = {(t["a"], t["b"], t["split"]): t for t in tests}
    if (learned := by.get(("sft", "base", "test"))) is not None:
        shows = learned["difference"] >= LEARNING_SHOWS
        out.append(f"- **Does the task teach?** SFT − base on test: {100 * learned['difference']:+.1f} points "
                   f"(p = {learned['p_value']:.2g}); " + (
                       f"at least {100 * LEARNING_SHOWS:.0f} points: the methods have room to differ." if shows else
                       f"under {100 * LEARNING_SHOWS:.0f} points: the design is too weak to compare methods.")
                   + (f" On the held-out templates: {100 * general['difference']:+.1f} points, {verdict(general)}."
                      if (general := by.get(("sft", "base", "heldout"))) else ""))
    rates = ", ".join(f"{loss} {validation[name]['lr']:g}" for loss, name in chosen.items())
    edge = [loss for loss, name in chosen.items()
            if validation[name]["lr"] in (min(scale.learning_rates), max(scale.learning_rates))]
    out.append(f"- **Learning rates chosen on validation:** {rates}."
               + (f" For {', '.join(edge)} the best rate is at the edge of the grid: a rate outside it might do "
                  "better." if edge else ""))
    for a, b in COMPARISONS[1:]:
        pair = [by[(a, b, s)] for s in ("test", "heldout") if (a, b, s) in by]
        if pair:
            out.append(f"- **{a} vs {b}:** " + "; ".join(
                f"{SPLIT_TITLES[t['split']]} {100 * t['difference']:+.1f} points, {verdict(t)}" for t in pair) + ".")
    for name, o in online.items():
        hd_name = name.replace("online_", "hd_")
        hd_phi = final.get(hd_name, {}).get("train_data_phi", {}).get("hd", {}).get("phi_token_mean")
        out.append(f"- **{name}:** {o['trained']} of {o['steps'] * scale.batch_size} problems trained over "
                   f"{o['steps']} steps ({o['own']} own answers, {o['hinted']} hinted rewrites; "
                   f"{o['skipped_steps']} steps had nothing verified); {o['trained_per_step_first']:.1f} per step in "
                   f"the first quarter, {o['trained_per_step_last']:.1f} in the last. Its data's φ under the model "
                   f"that made it: {f(o['phi_first'], '+.3f')} at the first step, {f(o['phi_last'], '+.3f')} at the "
                   "last" + (f" (the offline {hd_name} data, made once by the base, is at {hd_phi:+.3f} under "
                             f"{hd_name} after training)" if hd_phi is not None else "")
                   + f". Generation takes {o['gen_seconds']:.1f} s of each step's "
                   f"{o['gen_seconds'] + o['train_seconds']:.1f} s.")
    if "sft" in chosen and "idft" in chosen:
        sft, idft = validation[chosen["sft"]], validation[chosen["idft"]]
        dominating = [name for name, r in validation.items() if r.get("loss") == "idft" and r.get("data") == "train"
                      and r["validation"]["accuracy"] >= sft["validation"]["accuracy"]
                      and r["kl_from_base"] < sft["kl_from_base"]]
        out.append(f"- **Forgetting (drift from the base on everyday prompts):** KL {idft['kl_from_base']:.4f} (IDFT "
                   f"at its rate) vs {sft['kl_from_base']:.4f} (SFT at its rate). On the frontier, "
                   + (f"{', '.join(dominating)} reach SFT's validation accuracy with less drift, as the paper claims."
                      if dominating else "no IDFT rate reaches SFT's validation accuracy with less drift: the paper's "
                      "claim of both at once is not seen here."))
    collapsed = [name for name, d in dynamics.items() if "entropy_mean" in d
                 and d["entropy_mean"][-1][1] < 0.5 * d["entropy_mean"][0][1]]
    out.append("- **Dynamics:** " + (f"the entropy of the model on its training batches falls below half its first "
                                     f"value in {', '.join(collapsed)}." if collapsed else
                                     "no run halves the entropy of its training batches.")
               + " Fitting reference answers that leave little choice lowers this entropy whatever the loss; what "
                 "sharpening costs elsewhere is the drift KL on everyday prompts.")
    if tests:
        n = min(t["n"] for t in tests)
        typical = sorted(t["detectable_difference"] for t in tests if t["detectable_difference"])
        if typical:
            out.append(f"- **Power.** {n} paired questions per split; with the disagreement rates seen here the "
                       f"comparisons detect differences of {100 * typical[0]:.0f}–{100 * typical[-1]:.0f} points "
                       "with 80% power at two-sided 5%"
                       + (f" ({len(tests) - len(typical)} comparisons: none, too few disagreements)"
                          if len(typical) < len(tests) else "")
                       + ". Smaller true differences, like most of the paper's, go undetected at this size.")
    return out


def report(out: Path, scale_name: str, scale: Scale, ddt: dict, hd: dict, grid: dict, chosen: dict, more_runs: dict,
           validation: dict, final: dict, timings: dict, argv: list[str], device: str) -> str:
    """results.md, results.json and the plots of one scale. more_runs: the hd and online runs."""
    runs = {**grid, **more_runs}
    dynamics = training_dynamics(runs)
    online = {name: online_summary(Path(r["run_dir"])) for name, r in runs.items()
              if r["data"] == "online" and "run_dir" in r}
    tests = paired_tests(final)
    plot_frontier(validation, chosen, out / "frontier.png")
    plot_dynamics(dynamics, runs, out / "dynamics.png")
    bar_chart([{"name": n, **r["test"],
                           "kl_from_base": {"kl_token_mean": validation[r.get("run", n)]["kl_from_base"]}}
                          for n, r in final.items() if "test" in r], out / "accuracy_test.png")
    bar_chart([{"name": n, **r["heldout"]} for n, r in final.items() if "heldout" in r],
                         out / "accuracy_heldout.png")
    hardware = (torch.cuda.get_device_name(0) if device.startswith("cuda")
                else f"CPU, {torch.get_num_threads()} torch thread(s) ({platform.processor() or platform.machine()})")
    templates = ("all not held out" if scale.train_templates is None else
                 f"{len(scale.train_templates)} ({', '.join(map(str, scale.train_templates))})")
    heldout = (f"{scale.heldout_templates} drawn at random" if isinstance(scale.heldout_templates, int) else
               f"{len(scale.heldout_templates)} ({', '.join(map(str, scale.heldout_templates))})")
    stage_times = " · ".join(f"{stage} {seconds / 60:.1f}" for stage, seconds in timings.items())
    lines = [f"### Scale `{scale_name}`", "",
             f"Command: `python scripts/reproduce.py {shlex.join(argv)}` · seed {SEED} · {hardware} · "
             f"torch {torch.__version__} · report written {time.strftime('%Y-%m-%d %H:%M')}  ",
             f"Data: gsm_symbolic templates {templates} for train ({scale.n_train}), validation "
             f"({scale.n_validation}) and test ({scale.n_test}); held-out templates {heldout} ({scale.n_heldout}). "
             f"Training: {scale.steps} steps × {scale.batch_size} sequences, learning rates "
             f"{', '.join(f'{lr:g}' for lr in scale.learning_rates)} (warmup 5%, cosine decay). Answers up to "
             f"{scale.max_new_tokens} tokens, greedy; drift on {scale.n_general} everyday prompts.  ",
             f"Minutes per stage (all reruns added up): {stage_times}; total {sum(timings.values()) / 60:.0f}.", "",
             f"**Claim 1 (DDT)** — {scale.n_ddt} train problems, φ under the plain prompt:", "",
             *ddt_table(ddt), "", "![φ per source](ddt.png)", "",
             "**Claim 2 (IDFT)** — every run, its validation accuracy and drift (KL: mean per-token KL(base ‖ model) "
             "on the base's own answers to everyday prompts), and the φ and entropy of its training batches "
             "(train.py's metrics, first and last step):", "",
             *grid_table(validation, chosen, dynamics), "",
             "![frontier](frontier.png) ![dynamics](dynamics.png)", "",
             "Each loss at its chosen rate, and the hd runs, on the test split and the held-out templates (NLL: "
             f"mean per-token negative log-likelihood of the first {scale.n_phi} reference answers; φ of the "
             "training data, mean per token, under the base and under the trained model):", "",
             *final_table(final, validation, online), "",
             "Paired comparisons on the same questions (exact McNemar; detectable: the difference this comparison "
             "finds with 80% power at two-sided 5%, given how often the two models disagree):", "",
             *paired_table(tests), "",
             *(["Online runs (train.py --online): what each step generated and trained, and the time it took:", "",
                *online_table(online), ""] if online else []),
             "![accuracy, test](accuracy_test.png) ![accuracy, held-out](accuracy_heldout.png)", "",
             "**Reading** (generated from the numbers above):", "",
             *reading(ddt, hd, chosen, validation, final, tests, dynamics, scale, online), ""]
    text = "\n".join(lines)
    atomic_write(out / "results.md", text)
    strip = lambda r: {k: v for k, v in r.items() if k != "settings"}
    summary = {"scale": scale_name, "settings": scale_settings(scale), "ddt": ddt["summary"], "hd": hd, "chosen": chosen,
               "validation": {n: strip(r) for n, r in validation.items()},
               "final": {n: strip(r) for n, r in final.items()}, "paired_tests": tests, "online": online,
               "minutes_per_stage": {k: v / 60 for k, v in timings.items()}, "command": argv}
    atomic_write(out / "results.json", json.dumps(portable(summary, out), indent=1, ensure_ascii=False) + "\n")
    return text


def portable(value, out: Path):
    """`value` with every absolute path made machine-independent: relative to the results directory
    `out` or to the repository, or under "~" for the user's cache (results are committed)."""
    if isinstance(value, dict):
        return {k: portable(v, out) for k, v in value.items()}
    if isinstance(value, list):
        return [portable(v, out) for v in value]
    if isinstance(value, str) and value.startswith("/"):
        path = Path(value)
        for root, prefix in ((out.resolve(), ""), (ROOT, ""), (Path.home(), "~/")):
            if path.is_relative_to(root):
                return prefix + str(path.relative_to(root))
    return value


def headline(summary: dict) -> list[str]:
    """Five lines on a scale's results.json: what the study is, whether the task teaches, each
    method against SFT on test, and claims 1 and 2."""
    settings, final, tests = summary["settings"], summary["final"], summary["paired_tests"]
    on_test = {(t["a"], t["b"]): t for t in tests if t["split"] == "test"}
    minutes = sum(summary["minutes_per_stage"].values())

    def diff(a, b):
        t = on_test[(a, b)]
        return f"{100 * t['difference']:+.1f} points (p = {t['p_value']:.2g})"

    held = next((t for t in tests if t["split"] == "heldout" and (t["a"], t["b"]) == ("sft", "base")), None)
    others = [a for a, b in on_test if b == BASELINE and a != BASELINE]
    online = [(a, b) for a, b in on_test if a.startswith("online_") and b.startswith("hd_")]
    ddt = summary["ddt"]
    names = {"reference": "references", "own": "own samples", "beta0": "β_mix = 0 rewrites", "hinted": "hinted rewrites"}
    flagged = ", ".join(f"{names.get(k, k)} {ddt[k]['share_flagged_p05']:.2f}" for k in ddt)
    kl = {loss: summary["validation"][run]["kl_from_base"] for loss, run in summary["chosen"].items()}
    return [
        f"- **The `{summary['scale']}` study** (its stages: {minutes:.0f} min): the bundled 135M model, {settings['steps']} steps × "
        f"{settings['batch_size']} sequences per run, each loss at the learning rate chosen on validation, "
        f"{settings['n_test']} + {settings['n_heldout']} paired test questions (exact McNemar).",
        f"- **The task teaches:** SFT vs base on test {diff('sft', 'base')}"
        + (f"; on held-out templates {100 * held['difference']:+.1f} points." if held else "."),
        "- **Against SFT on test:** " + "; ".join(f"{a} {diff(a, BASELINE)}" for a in others) + "."
        + (" Online against offline on test: " + "; ".join(
            f"{a} vs {b} {diff(a, b)}" + (f", detectable with 80% power: {100 * d:.0f} points"
                                          if (d := on_test[(a, b)]["detectable_difference"]) else "")
            for a, b in online) + "." if online else ""),
        f"- **Claim 1 (DDT)**, share flagged off-distribution (p < 0.05): {flagged}.",
        "- **Claim 2 (IDFT)**, drift KL(base ‖ model) at the chosen rates: "
        + ", ".join(f"{loss} {value:.3f}" for loss, value in kl.items())
        + "; accuracy on test: " + ", ".join(f"{loss} {final[loss]['test']['accuracy']:.2f}" for loss in kl) + ".",
    ]


def update_readme(results_root: Path):
    """Rewrite results/README.md from every results/<scale>/results.md present, and README.md's
    headline block from the largest scale that ran."""
    scales = [scale for scale in ("gpu", "cpu", "smoke") if (results_root / scale / "results.md").exists()]
    parts = [(results_root / scale / "results.md").read_text().replace("](", f"]({scale}/") for scale in scales]
    atomic_write(results_root / "README.md", "# Results of `scripts/reproduce.py`\n\nGenerated by "
                 "`python scripts/reproduce.py --scale S` from the measured numbers; `smoke` only shows that every "
                 "stage runs (a few steps prove nothing about the method). How each scale was chosen: the "
                 "docstring of scripts/reproduce.py.\n\n" + "\n\n".join(parts))
    main = next((s for s in scales if s != "smoke"), None)
    lines = headline(json.loads((results_root / main / "results.json").read_text())) if main else ["- none yet"]
    replace_marked_block(ROOT / "README.md", "reproduce:headline", "\n".join(lines))


# ---- Main ---------------------------------------------------------------------------------------


def parse_args(argv=None):
    ap = ArgumentParser(description=__doc__.split("\n\n")[0],
                        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--scale", choices=SCALES, required=True, help="smoke (minutes), cpu (~3.3 h on 2 cores), gpu")
    ap.add_argument("--model", default=BUNDLED_NAME, help="base model (default: the bundled SmolLM2-135M-Instruct)")
    ap.add_argument("--out", default=None, help="results directory (default: results/<scale>; results/README.md and "
                    "the README's headline are rewritten only with the default)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    try:
        args = parse_args(argv)
        scale = SCALES[args.scale]
        out = Path(args.out or ROOT / "results" / args.scale)
        check_output(out, "--out", kind="dir")
        with lock_output(out):
            return run(args, argv, scale, out)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (RunError, OSError) as e:  # a full disk, a file-size limit, a lost lock: what was written stays
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted: finished stages are kept; rerun the same command to continue", file=sys.stderr)
        return 130


def run(args, argv: list[str], scale: Scale, out: Path) -> int:
    """Every stage in order (each one reused, resumed or redone), then the report."""
    start = time.time()
    out.mkdir(parents=True, exist_ok=True)
    timings = Timings(out / "timings.json")
    base_dir = resolve_model_dir(args.model).resolve()
    model = str(base_dir)

    def stage(name, fn, *fn_args):
        t0 = time.time()
        result = fn(*fn_args)
        timings.add(name, time.time() - t0)
        return result

    files = stage("data", make_data, out, scale)
    ddt = stage("ddt", ddt_stage, out, base_dir, files["train"], scale, args.device)
    files["hd"] = stage("hd", hd_stage, out, model, files["train"], scale, args.device)
    grid = stage("grid", grid_stage, out, model, files["train"], scale)
    evaluator = Evaluator(out, base_dir, files, scale, args.device)
    base = {"checkpoint": model}
    validation = stage("select", lambda: {name: evaluator.run(name, info, "validation")
                                          for name, info in {"base": base, **grid}.items()})
    chosen = choose_rates(validation)
    hd_runs = stage("hd_train", hd_train_stage, out, model, files["hd"], grid, chosen, scale)
    validation.update(stage("hd_validation", lambda: {name: evaluator.run(name, info, "validation")
                                                      for name, info in hd_runs.items()}))
    online_runs = stage("online", online_stage, out, model, files["train"], grid, chosen, scale)
    validation.update(stage("online_validation", lambda: {name: evaluator.run(name, info, "validation")
                                                          for name, info in online_runs.items()}))
    finalists = {"base": base, **{loss: {**grid[name], "run": name} for loss, name in chosen.items()}, **hd_runs,
                 **online_runs}
    final = stage("final", lambda: {name: evaluator.run(info.get("run", name), info, "final")
                                    for name, info in finalists.items()})
    text = report(out, args.scale, scale, ddt, hd_summary(files["hd"]), grid, chosen, {**hd_runs, **online_runs},
                  validation, final, timings.seconds, argv, args.device)
    if args.out is None:
        update_readme(out.parent)
    print(text)
    log(f"done in {(time.time() - start) / 60:.1f} min: {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
