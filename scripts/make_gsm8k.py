"""Write GSM8K-style JSONL splits from reasoning-gym's gsm_symbolic templates (no hub access needed).

gsm_symbolic turns GSM8K problems into templates: each generator draws fresh names and numbers
from a random.Random and returns the question, a step-by-step solution ending in '#### N'
(GSM8K's format, without the <<a*b=c>> calculator notes) and the answer. reasoning-gym marks 15
of its 100 generators as broken (`tasks_need_fix`); we use only the 85 in `tasks_ok`.

  train.jsonl       the training templates: every template not held out, or --templates
  validation.jsonl  the same templates, fresh draws (with --n-validation; for choosing settings)
  test.jsonl        the same templates, fresh draws, no question also in train or validation
  heldout.jsonl     --heldout-templates templates never seen in train (generalization)

Each line is {"id", "question", "answer", "final_answer", "template"}: "answer" is the solution,
"final_answer" the generator's own answer (the gold answer data.py reads). Example i of a split
uses template i mod (number of templates) and a generator seed derived from (--seed, split, i),
so output is deterministic and a smaller --n-train gives a prefix of a larger train.jsonl.
Questions already written (in any split) are skipped, and so are solutions whose '#### N'
disagrees with the generator's answer numerically ('#### 21.0' for "21", about 4%, is kept).

    python scripts/make_gsm8k.py --out-dir data
"""

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from any directory
from data import answers_match, find_answer  # noqa: E402
from plumbing.cli import ArgumentParser, RunError, UserError, nonnegative_int, positive_int  # noqa: E402
from plumbing.files import atomic_write, check_output  # noqa: E402

HELDOUT_TEMPLATES = 15  # of the 85 usable templates, kept out of train and test
SPLITS = ("train", "validation", "test", "heldout")  # made in this order: a question goes to the first
QUESTION_SUFFIX = " Give the result as your final answer. Do not include units."  # as reasoning-gym adds


def load_generators() -> dict:
    """The usable gsm_symbolic generators by template number (imported lazily: reasoning-gym is heavy)."""
    from reasoning_gym.arithmetic.gsm_symbolic import generators_00_49, generators_50_99
    from reasoning_gym.arithmetic.gsm_symbolic.gsm_symbolic import tasks_ok

    modules = (generators_00_49, generators_50_99)
    return {t: getattr(modules[t // 50], f"generate_{t}") for t in sorted(tasks_ok)}


def make_split(name, templates, n, seed, generators, seen, dropped) -> list[dict]:
    """n examples cycling over templates; `seen` (questions) and `dropped` (counts) are updated."""
    records, max_tries = [], 20 * n + 1000
    for i in range(max_tries):
        if len(records) == n:
            return records
        template = templates[i % len(templates)]
        # A string seed is hashed with SHA-512 by random.seed, so it is stable across runs/processes.
        ex = generators[template](random.Random(f"gsm_symbolic/{seed}/{name}/{i}"), 1.0)
        question = ex["question"] + QUESTION_SUFFIX
        solution = ex["metadata"]["answer_cot"]
        final, rule = find_answer(solution)
        if question in seen:
            dropped["duplicate"] += 1
        elif rule != "####" or not answers_match(final, ex["answer"]):
            dropped["inconsistent"] += 1
        else:
            seen.add(question)
            records.append({"id": f"{name}-{len(records):05d}", "question": question, "answer": solution,
                            "final_answer": ex["answer"], "template": template})
    if len(records) < n:
        raise UserError(f"--n-{name} {n}: only {len(records)} distinct questions after {max_tries} draws "
                        f"from {len(templates)} templates; ask for fewer")
    return records


def build(counts: dict[str, int], heldout_templates: int | list[int], seed: int, train_templates=None):
    """Returns ({file name: JSONL text}, {split: (templates, dropped counts)}).

    counts: examples per split of SPLITS (a split with 0 is not made). heldout_templates: how
    many templates to hold out, drawn at random, or which. train_templates: the templates of
    train, validation and test (default: every usable template not held out).
    """
    generators = load_generators()
    all_templates = sorted(generators)
    if isinstance(heldout_templates, int):
        if not 1 <= heldout_templates < len(all_templates):
            raise UserError(f"--heldout-templates must be between 1 and {len(all_templates) - 1}, "
                            f"got {heldout_templates}")
        heldout = sorted(random.Random(f"gsm_symbolic/{seed}/heldout").sample(all_templates, heldout_templates))
    else:
        heldout = sorted(heldout_templates)
    train = [t for t in all_templates if t not in heldout] if train_templates is None else list(train_templates)
    for flag, chosen in (("--heldout-templates", heldout), ("--templates", train)):
        if unusable := [t for t in chosen if t not in generators]:
            raise UserError(f"{flag}: {unusable} are not usable gsm_symbolic templates (usable: {all_templates})")
    if shared := set(train) & set(heldout):
        raise UserError(f"templates {sorted(shared)} are both trained on and held out")

    seen, texts, info = set(), {}, {}
    for name in SPLITS:
        templates, n = (heldout if name == "heldout" else train), counts.get(name, 0)
        if n == 0:
            continue
        dropped = {"duplicate": 0, "inconsistent": 0}
        records = make_split(name, templates, n, seed, generators, seen, dropped)
        texts[f"{name}.jsonl"] = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        info[name] = (templates, dropped)
    return texts, info


def template_list(text: str) -> list[int]:
    try:
        templates = [int(t) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected template numbers like 26,43,58, got {text!r}") from None
    if len(set(templates)) != len(templates):
        raise argparse.ArgumentTypeError(f"a template is listed twice in {text!r}")
    return templates


def templates_or_count(text: str) -> int | list[int]:
    return template_list(text) if "," in text else positive_int(text)


def write_splits(out: Path, texts: dict[str, str], overwrite: bool, remedy: str) -> list[str]:
    """Write the files whose content changed; the names written. Every file is checked before
    any is written, so a refusal (a file with other content, `remedy` says what to do) leaves
    the directory untouched."""
    changed = [f for f, text in texts.items() if not (out / f).exists() or (out / f).read_bytes() != text.encode()]
    clash = [str(out / f) for f in changed if (out / f).exists()]
    if clash and not overwrite:
        raise UserError(f"{', '.join(clash)} already exist(s) with different content; {remedy}")
    for f in changed:
        atomic_write(out / f, texts[f])
    return changed


def main(argv=None) -> int:
    ap = ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out-dir", default="data", help="output directory (default: data)")
    ap.add_argument("--n-train", type=positive_int, default=7000)
    ap.add_argument("--n-validation", type=nonnegative_int, default=0, help="validation questions (0: no file)")
    ap.add_argument("--n-test", type=positive_int, default=500)
    ap.add_argument("--n-heldout", type=positive_int, default=500)
    ap.add_argument("--heldout-templates", type=templates_or_count, default=HELDOUT_TEMPLATES,
                    help="templates kept out of train/test: how many (of 85, drawn at random) or a list like 75,39")
    ap.add_argument("--templates", type=template_list, default=None,
                    help="train/validation/test templates, e.g. 26,43,58 (default: all not held out)")
    ap.add_argument("--seed", type=nonnegative_int, default=0)
    ap.add_argument("--force", action="store_true", help="overwrite existing files with different content")
    try:
        args = ap.parse_args(argv)
        t0 = time.time()
        out = check_output(args.out_dir, "--out-dir", kind="dir")
        counts = {"train": args.n_train, "validation": args.n_validation, "test": args.n_test,
                  "heldout": args.n_heldout}
        texts, info = build(counts, args.heldout_templates, args.seed, args.templates)
        changed = write_splits(out, texts, args.force, "use --force to overwrite")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (RunError, OSError) as e:  # a full disk, a file-size limit, a lost lock: what was written stays
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted: each file is complete or untouched (written atomically)", file=sys.stderr)
        return 130
    for name, (templates, dropped) in info.items():
        f = out / f"{name}.jsonl"
        n = texts[f.name].count("\n")
        state = "written" if f.name in changed else "unchanged"
        print(f"{f}: {n} examples, {len(templates)} templates, {f.stat().st_size / 1e6:.2f} MB, {state}; "
              f"dropped {dropped['duplicate']} duplicate, {dropped['inconsistent']} inconsistent")
    print(f"held-out templates: {info['heldout'][0]}  ({time.time() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
