"""Reproduce the paper's two claims in miniature, end to end, with one command.

    python scripts/reproduce.py --scale smoke    # minutes on CPU: checks the plumbing, proves nothing
    python scripts/reproduce.py --scale cpu      # about two hours on a 2-core CPU
    python scripts/reproduce.py --scale gpu      # the meaningful scale (bf16, compiled), one GPU

Model: the bundled SmolLM2-135M-Instruct (--model to change). Data: scripts/make_gsm8k.py —
train templates, a test split of the same templates, and a split of held-out templates.
Everything goes to results/<scale>/ (--out to change); the stages, in order:

  data    train.jsonl, test.jsonl, heldout.jsonl                  (scripts/make_gsm8k.py)
  ddt     claim 1 (DDT, SPEC §2, §4): on the first problems of train, the φ statistics
          (average φ, z, shares of φ_t above −1/−3/−5) under the plain prompt of
            (a) the reference solutions, (b) the model's own answers sampled at temperature 1
            (on-policy by construction: E[φ_t] = 0), (c) β = 0 rewrites (the hint stream
            alone), (d) hinted-decoding rewrites (β of --beta) — the paper says (d) sits near
            (b) while (a) and (c) do not                           -> ddt.json, ddt.png
  hd      the hinted_decode.py pipeline on train: the model's verified own answers and its
          verified hinted rewrites                                 -> hd.jsonl
  train   claim 2 (IDFT, SPEC §3): train.py with sft, dft, idft, idft_v1 on the references and
          sft, idft on hd.jsonl ("hd_sft", "hd_idft"); same steps, batch, lr and seed
                                                                   -> runs/<name>/
  eval    per model (the base included): accuracy with 95% CI on test and held-out, answer
          NLL per token on both, drift KL(base ‖ model) on everyday prompts (eval.py), and
          the φ of its own training data before (base) and after training
                                                                   -> eval/<name>.json
  report  the tables, a reading of which claims reproduce, and plots -> results.md, *.png
          (with the default --out, also the "Results" block of README.md)

Restartable: a stage whose outputs are present and were made with the same settings is
reused; hd.jsonl and training runs resume where they stopped (hinted_decode.py and
train.py --resume); outputs made with other settings stop the run with an error instead of
being overwritten. Interrupt at any time and rerun the same command.
"""

import argparse
import json
import math
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
from data import (ArgumentParser, Example, UserError, answers_match, atomic_write, check_output,  # noqa: E402
                  encode_example, extract_answer, load_examples, lock_output, read_log, replace_marked_block)
from ddt import score_examples  # noqa: E402
from hub import BUNDLED_NAME, resolve_model_dir  # noqa: E402
from model import CheckpointError, Transformer, generate  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402


@dataclass(frozen=True)
class Scale:
    n_train: int  # training examples (references); hinted decoding rewrites the same ones
    n_test: int  # test questions (train templates, other seeds)
    n_heldout: int  # questions from templates never seen in training
    n_ddt: int  # train problems scored for claim 1
    steps: int  # optimizer steps of every training run
    batch_size: int  # sequences per optimizer step
    micro_batch_size: int
    max_len: int  # longest training sequence (longer ones are skipped, and counted)
    lr: float  # peak learning rate (linear warmup, cosine decay: train.py)
    max_new_tokens: int  # answers: evaluation, claim 1, hinted decoding
    n_general: int  # everyday prompts for the drift KL (eval.GENERAL_PROMPTS)
    general_max_new_tokens: int
    n_phi_train: int  # training examples scored for "φ of the training data before/after"
    eval_batch_size: int


SCALES = {
    "smoke": Scale(n_train=16, n_test=8, n_heldout=8, n_ddt=4, steps=2, batch_size=4, micro_batch_size=2,
                   max_len=768, lr=5e-5, max_new_tokens=48, n_general=4, general_max_new_tokens=24, n_phi_train=8,
                   eval_batch_size=8),
    "cpu": Scale(n_train=64, n_test=48, n_heldout=48, n_ddt=16, steps=16, batch_size=8, micro_batch_size=4,
                 max_len=640, lr=1e-4, max_new_tokens=256, n_general=12, general_max_new_tokens=96, n_phi_train=32,
                 eval_batch_size=16),
    "gpu": Scale(n_train=2000, n_test=500, n_heldout=500, n_ddt=128, steps=250, batch_size=32, micro_batch_size=8,
                 max_len=768, lr=2e-5, max_new_tokens=512, n_general=50, general_max_new_tokens=256, n_phi_train=256,
                 eval_batch_size=64),
}
SEED = 0
HD_BETA = 3.0  # β of the hinted rewrites (hinted_decode.py's default)
# name: (loss, training data). The first four train on the references, the last two on hd.jsonl.
RUNS = {"sft": ("sft", "train"), "dft": ("dft", "train"), "idft": ("idft", "train"), "idft_v1": ("idft_v1", "train"),
        "hd_sft": ("sft", "hd"), "hd_idft": ("idft", "hd")}


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


def examples_in(path: Path) -> list[Example]:
    """The examples of a data file; none for an empty one (hd.jsonl when no rewrite verified)."""
    return load_examples(path) if path.stat().st_size else []


def mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


# ---- Stage: data --------------------------------------------------------------------------------


def make_data(out: Path, scale: Scale) -> dict[str, Path]:
    """make_gsm8k.py's splits: deterministic, so always made; files with other content are refused."""
    texts, _ = make_gsm8k.build(scale.n_train, scale.n_test, scale.n_heldout, make_gsm8k.HELDOUT_TEMPLATES, SEED)
    written = make_gsm8k.write_splits(out / "data", texts, overwrite=False, remedy="delete them or choose another --out")
    log(f"data: {', '.join(written) or 'nothing'} written in {out / 'data'}")
    return {split: out / "data" / f"{split}.jsonl" for split in ("train", "test", "heldout")}


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
            **{key: mean([s[key] for s in scores]) for key in hinted_decode.PHI_KEYS},
            "share_flagged_p05": mean([s["p_value"] < 0.05 for s in scores if s["p_value"] is not None]),
            "answer_correct": mean([answers_match(extract_answer(text), ex.answer)
                                    for ex, (text, _, _) in zip(examples, rows)]),
            "ended_with_eos": mean([finish in ("eos", "reference") for _, finish, _ in rows]),
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
            "--seed", str(SEED), "--device", device, "--quiet"]
    log(f"hd: hinted_decode.py on {train_file} -> {hd}")
    check(hinted_decode.main(argv), "hinted_decode.py")
    return hd


# ---- Stage: training ----------------------------------------------------------------------------


def finished_checkpoint(run_dir: Path, steps: int) -> Path | None:
    latest = train.latest_checkpoint(run_dir)
    metrics = train.read_metrics(run_dir) if (run_dir / "metrics.jsonl").exists() else []
    steps_logged = [m["step"] for m in metrics if "step" in m]
    return latest if latest is not None and steps_logged and max(steps_logged) >= steps else None


def train_stage(out: Path, model: str, files: dict[str, Path], scale: Scale) -> dict[str, dict]:
    """One train.py run per RUNS entry; a run with too little data is recorded as skipped."""
    runs = {}
    for name, (loss, data) in RUNS.items():
        run_dir = out / "runs" / name
        n_examples = len(examples_in(files[data]))
        if n_examples < scale.batch_size:
            log(f"train {name}: skipped, {files[data].name} has {n_examples} examples (< batch {scale.batch_size})")
            runs[name] = {"loss": loss, "data": data, "skipped": f"{n_examples} training examples"}
            continue
        argv = ["--data", str(files[data]), "--model", model, "--out", str(run_dir), "--loss", loss,
                "--max-steps", str(scale.steps), "--batch-size", str(scale.batch_size),
                "--micro-batch-size", str(scale.micro_batch_size), "--max-len", str(scale.max_len),
                "--lr", str(scale.lr), "--seed", str(SEED), "--save-every", str(scale.steps), "--log-every", "1",
                "--resume"]
        settings_file = run_dir / "reproduce_settings.json"
        if reuse(settings_file, argv) is None:
            if run_dir.exists():
                raise UserError(f"{run_dir} exists without {settings_file.name}: delete it or choose another --out")
            save(settings_file, argv, {})
        if (done := finished_checkpoint(run_dir, scale.steps)) is None:
            log(f"train {name}: {loss} on {files[data].name}, {scale.steps} steps")
            check(train.main(argv), f"train.py {shlex.join(argv)}")
            done = finished_checkpoint(run_dir, scale.steps)
            train.plot_run(run_dir)
        else:
            log(f"train {name}: reusing {done}")
        runs[name] = {"loss": loss, "data": data, "checkpoint": str(done)}
    return runs


# ---- Stage: evaluation --------------------------------------------------------------------------


def fingerprint(model_dir: Path) -> list:
    """Size and mtime of the weights: a retrained checkpoint invalidates its evaluation."""
    return sorted([f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in model_dir.glob("*.safetensors"))


def base_drift_answers(out: Path, base_dir: Path, scale: Scale, load_base) -> list:
    """The base model's greedy answers to the everyday prompts, made once for every model."""
    settings = {"model": str(base_dir), "n_general": scale.n_general,
                "general_max_new_tokens": scale.general_max_new_tokens}
    path = out / "eval" / "base_drift_answers.json"
    if (saved := reuse(path, settings)) is None:
        base, tok = load_base()
        prompts = [tok.encode_chat([{"role": "user", "content": p}], add_generation_prompt=True)
                   for p in evaluation.GENERAL_PROMPTS[:scale.n_general]]
        gens, _ = evaluation.generate_all(base, prompts, tok.stop_ids, scale.general_max_new_tokens,
                                          scale.eval_batch_size, "  base on everyday prompts")
        saved = save(path, settings, {"seqs": [[p + g.tokens, len(p)] for p, g in zip(prompts, gens)]})
    return [tuple(s) for s in saved["seqs"]]


def eval_stage(out: Path, base_dir: Path, models: dict[str, dict], files: dict[str, Path], scale: Scale,
               device: str) -> dict[str, dict]:
    eval_args = SimpleNamespace(max_new_tokens=scale.max_new_tokens, batch_size=scale.eval_batch_size, device=device,
                                dtype="bfloat16" if device.startswith("cuda") else "float32")
    loaded = []  # the base model, loaded on first use (not at all when every stage is reused)

    def load_base():
        if not loaded:
            loaded.append(evaluation.load(base_dir, eval_args))
        return loaded[0]

    drift_seqs = base_drift_answers(out, base_dir, scale, load_base)
    splits = {s: load_examples(files[s]) for s in ("test", "heldout")}
    results = {}
    for name, info in models.items():
        if "skipped" in info:
            results[name] = info
            continue
        model_dir = Path(info["checkpoint"])
        train_data = {d: files[d] for d in ("train", "hd") if name == "base" or d == info["data"]}
        settings = {"model": str(model_dir), "weights": fingerprint(model_dir), **asdict(scale),
                    "train_data": {d: str(f) for d, f in train_data.items()}}
        path = out / "eval" / f"{name}.json"
        if (saved := reuse(path, settings)) is not None:
            log(f"eval {name}: reusing {path}")
            results[name] = {**info, **saved}
            continue
        log(f"eval {name}: {model_dir}")
        base = load_base()[0]
        model, tok = load_base() if model_dir == base_dir else evaluation.load(model_dir, eval_args)
        result, outputs = {}, {}
        for split, examples in splits.items():
            summary, rows = evaluation.evaluate_model(model, tok, examples, eval_args)
            refs = score_examples(model, [encode_example(tok, ex) for ex in examples], tok.pad_id,
                                  scale.eval_batch_size)
            result[split] = {**summary, "reference": evaluation.phi_summary(refs)}
            outputs[split] = rows
        sums, counts = evaluation.kl_from_base(base, model, drift_seqs, tok.pad_id, scale.eval_batch_size)
        result["kl_from_base"] = sum(sums) / sum(counts)
        result["train_data_phi"] = {}
        for d, f in train_data.items():
            examples = examples_in(f)[:scale.n_phi_train]
            if examples:
                scores = score_examples(model, [encode_example(tok, ex) for ex in examples], tok.pad_id,
                                        scale.eval_batch_size)
                result["train_data_phi"][d] = evaluation.phi_summary(scores)
        for split, rows in outputs.items():
            atomic_write(out / "eval" / f"{name}.{split}.jsonl",
                         "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        results[name] = {**info, **save(path, settings, result)}
        log(f"eval {name}: test {result['test']['accuracy']:.3f}, held-out {result['heldout']['accuracy']:.3f}, "
            f"KL {result['kl_from_base']:.4f}")
        del model
    return results


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


def idft_table(results: dict) -> list[str]:
    lines = ["| model | loss | data | test accuracy [95% CI] | held-out accuracy [95% CI] | test NLL | held-out NLL "
             "| KL(base ‖ model) | φ of its training data: base → after | test outputs at length limit |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    base = results["base"]
    for name, r in results.items():
        if "skipped" in r:
            lines.append(f"| {name} | {r['loss']} | {r['data']} | skipped: {r['skipped']} | | | | | | |")
            continue
        phi = "–"
        if name != "base":
            before = base["train_data_phi"].get(r["data"], {}).get("phi_token_mean")
            after = r["train_data_phi"].get(r["data"], {}).get("phi_token_mean")
            phi = f"{f(before, '+.3f')} → {f(after, '+.3f')}"
        lines.append(f"| {name} | {r.get('loss', '–')} | {r.get('data', '–')} | {acc(r['test'])} | {acc(r['heldout'])} "
                     f"| {r['test']['reference']['nll_token_mean']:.3f} | {r['heldout']['reference']['nll_token_mean']:.3f} "
                     f"| {r['kl_from_base']:.4f} | {phi} | {r['test']['length_limit_share']:.2f} |")
    return lines


def overlap(a: dict, b: dict) -> bool:
    return a["ci95"][0] <= b["ci95"][1] and b["ci95"][0] <= a["ci95"][1]


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


def reading(ddt: dict, results: dict, scale: Scale) -> list[str]:
    """Which claims the numbers support, stated by rules on the numbers (not typed by hand)."""
    out = [ddt_reading(ddt["summary"])]
    trained = {k: v for k, v in results.items() if k != "base" and "skipped" not in v}
    if "sft" in trained and "idft" in trained:
        sft, idft = trained["sft"], trained["idft"]
        for split, title in (("test", "test split"), ("heldout", "held-out templates")):
            a, b = idft[split], sft[split]
            verdict = ("the 95% intervals overlap: **no difference can be claimed** at this sample size"
                       if overlap(a, b) else ("IDFT is **better**" if a["accuracy"] > b["accuracy"] else
                                              "IDFT is **worse**"))
            out.append(f"- **IDFT vs SFT, accuracy on the {title}:** {a['accuracy']:.3f} vs {b['accuracy']:.3f}; "
                       f"{verdict}.")
        kl = (idft["kl_from_base"], sft["kl_from_base"])
        out.append(f"- **Forgetting (drift from the base on everyday prompts):** KL {kl[0]:.4f} (IDFT) vs {kl[1]:.4f} "
                   f"(SFT): IDFT drifts {'less' if kl[0] < kl[1] else 'more'}, "
                   + ("as the paper claims." if kl[0] < kl[1] else "against the paper's claim."))
    if trained:
        base_nll = results["base"]["test"]["reference"]["nll_token_mean"]
        nll = {k: v["test"]["reference"]["nll_token_mean"] for k, v in trained.items()}
        lower, higher = [k for k in nll if nll[k] < base_nll], [k for k in nll if nll[k] >= base_nll]
        out.append(f"- **Likelihood of the test answers** (NLL per token, base {base_nll:.3f}): lower after "
                   + (", ".join(f"{k} ({nll[k]:.3f})" for k in lower) or "none") + "; higher after "
                   + (", ".join(f"{k} ({nll[k]:.3f})" for k in higher) or "none") + "."
                   + (" The p^γ-weighted losses train mostly the tokens the model already predicts; the tokens it "
                      "does not predict lose probability, which raises the average NLL — at this learning rate "
                      f"({scale.lr:g}) and budget that effect dominates."
                      if any(RUNS[k][0] != "sft" for k in higher) else "")
                   + (" The hd_ runs learn from the model's own rewrites, not from reference-style answers, so "
                      "their likelihood of the references need not rise." if any(RUNS[k][1] == "hd" for k in higher)
                      else ""))
    if "hd_sft" in trained and "sft" in trained:
        a, b = trained["hd_sft"]["heldout"], trained["sft"]["heldout"]
        out.append(f"- **Hinted-decoding data (HD+SFT vs SFT), held-out accuracy:** {a['accuracy']:.3f} vs "
                   f"{b['accuracy']:.3f}; " + ("intervals overlap, no difference can be claimed." if overlap(a, b)
                                               else "a difference outside the intervals."))
    else:
        out.append("- **Hinted-decoding data:** too few verified rewrites to train on at this scale (see the hd row).")
    base_acc = results["base"]["test"]["accuracy"]
    out.append(f"- **Scale.** The base model answers {base_acc:.3f} of the test questions; with a 135M model, "
               f"{scale.steps} training steps and "
               f"{results['base']['test']['n']} test questions, accuracy differences of a few points are within "
               "noise — the paper's gains were measured with 1.5B–7B models trained on about 100k examples.")
    return out


def report(out: Path, scale_name: str, scale: Scale, ddt: dict, hd: Path, results: dict, argv: list[str],
           device: str) -> str:
    hd_records = read_log(hd, "hinted_decode.py")[0] + read_log(hinted_decode.failed_path(hd), "hinted_decode.py")[0]
    sources = {k: sum(r["source"] == k for r in hd_records) for k in ("on_policy", "hinted", "failed")}
    trained = [r for r in results.values() if "kl_from_base" in r]
    evaluation.bar_chart([{"name": n, **r["test"], "kl_from_base": {"kl_token_mean": r["kl_from_base"]}}
                          for n, r in results.items() if "kl_from_base" in r], out / "accuracy_test.png")
    evaluation.bar_chart([{"name": n, **r["heldout"]} for n, r in results.items() if "kl_from_base" in r],
                         out / "accuracy_heldout.png")
    hardware = (torch.cuda.get_device_name(0) if device.startswith("cuda")
                else f"CPU, {torch.get_num_threads()} threads ({platform.processor() or platform.machine()})")
    lines = [f"### Scale `{scale_name}`", "",
             f"Command: `python scripts/reproduce.py {shlex.join(argv)}` · seed {SEED} · {hardware} · "
             f"torch {torch.__version__} · report written {time.strftime('%Y-%m-%d %H:%M')}  ",
             f"Scale: {scale.n_train} train / {scale.n_test} test / {scale.n_heldout} held-out-template questions, "
             f"{scale.steps} steps × {scale.batch_size} sequences, answers up to {scale.max_new_tokens} tokens, "
             f"drift on {scale.n_general} everyday prompts. Hinted-decoding data: {sources['on_policy']} own "
             f"answers verified, {sources['hinted']} hinted rewrites verified, {sources['failed']} failed.", "",
             f"**Claim 1 (DDT)** — {scale.n_ddt} train problems, φ under the plain prompt:", "",
             *ddt_table(ddt), "", "![φ per source](ddt.png)", "",
             "**Claim 2 (IDFT)** — NLL: mean per-token negative log-likelihood of the reference answers; KL: mean "
             "per-token KL(base ‖ model) on the base's own answers to everyday prompts; φ of the training data "
             "(mean per token) under the base and under the trained model:", "",
             *idft_table(results), "", "![accuracy, test](accuracy_test.png) ![accuracy, held-out]"
             "(accuracy_heldout.png)", "", "**Reading** (generated from the numbers above):", "",
             *reading(ddt, results, scale), ""]
    text = "\n".join(lines)
    atomic_write(out / "results.md", text)
    summary = {"scale": scale_name, "settings": asdict(scale), "ddt": ddt["summary"], "hd_sources": sources,
               "models": {n: {k: v for k, v in r.items() if k != "settings"} for n, r in results.items()},
               "command": argv, "n_trained": len(trained)}
    atomic_write(out / "results.json", json.dumps(summary, indent=1, ensure_ascii=False) + "\n")
    return text


def update_readme(results_root: Path):
    """Rewrite README.md's results block from every results/<scale>/results.md present."""
    parts = []
    for scale in ("gpu", "cpu", "smoke"):
        md = results_root / scale / "results.md"
        if md.exists():  # its image links are relative to results/<scale>/
            parts.append(md.read_text().replace("](", f"](results/{scale}/"))
    replace_marked_block(ROOT / "README.md", "reproduce:results", "\n\n".join(parts))


# ---- Main ---------------------------------------------------------------------------------------


def parse_args(argv=None):
    ap = ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--scale", choices=SCALES, required=True, help="smoke (minutes), cpu (~2 h on 2 cores), gpu")
    ap.add_argument("--model", default=BUNDLED_NAME, help="base model (default: the bundled SmolLM2-135M-Instruct)")
    ap.add_argument("--out", default=None, help="results directory (default: results/<scale>; the README's "
                    "Results block is rewritten only with the default)")
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
    except (UserError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: finished stages are kept; rerun the same command to continue", file=sys.stderr)
        return 130


def run(args, argv: list[str], scale: Scale, out: Path) -> int:
    """Every stage in order (each one reused, resumed or redone), then the report."""
    start = time.time()
    out.mkdir(parents=True, exist_ok=True)
    base_dir = resolve_model_dir(args.model).resolve()
    files = make_data(out, scale)
    ddt = ddt_stage(out, base_dir, files["train"], scale, args.device)
    files["hd"] = hd_stage(out, str(base_dir), files["train"], scale, args.device)
    models = {"base": {"checkpoint": str(base_dir)}, **train_stage(out, str(base_dir), files, scale)}
    results = eval_stage(out, base_dir, models, files, scale, args.device)
    text = report(out, args.scale, scale, ddt, files["hd"], results, argv, args.device)
    if args.out is None:
        update_readme(out.parent)
    print(text)
    log(f"done in {(time.time() - start) / 60:.1f} min: {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
