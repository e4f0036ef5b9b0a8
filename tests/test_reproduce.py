"""scripts/reproduce.py end to end at the smoke scale on the tiny random model: every stage
runs, the learning rate is chosen on validation, the paired tests and plots are built from the
stage outputs, and a rerun reuses what is there."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("reproduce", ROOT / "scripts" / "reproduce.py")
reproduce = importlib.util.module_from_spec(spec)
spec.loader.exec_module(reproduce)


@pytest.fixture(scope="module")
def study(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    readme = (ROOT / "README.md").read_bytes()
    assert reproduce.main(["--scale", "smoke", "--model", tiny_model_dir, "--out", out]) == 0
    assert (ROOT / "README.md").read_bytes() == readme  # only the default --out writes the README
    return out


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_every_stage_leaves_its_outputs(study):
    scale = reproduce.SCALES["smoke"]
    summary = json.loads((study / "results.json").read_text())
    grid = [reproduce.run_name(loss, lr) for loss in reproduce.GRID_LOSSES for lr in scale.learning_rates]
    assert set(summary["validation"]) >= {"base", *grid}
    for name in grid:
        metrics = read_jsonl(study / "runs" / name / "metrics.jsonl")
        assert [r["step"] for r in metrics] == list(range(1, scale.steps + 1))
        assert all(r["entropy_mean"] > 0 for r in metrics)  # logged for the dynamics plot
        v = summary["validation"][name]
        assert v["validation"]["n"] == scale.n_validation and v["kl_from_base"] > 0
    assert summary["validation"]["base"]["kl_from_base"] == 0.0
    assert set(summary["final"]) >= {"base", *reproduce.GRID_LOSSES}
    for name, m in summary["final"].items():
        if "skipped" in m:  # a random model verifies no rewrite: nothing to train the hd runs on
            assert name.startswith("hd_") and summary["hd"]["on_policy"] + summary["hd"]["hinted"] < scale.batch_size
            continue
        assert m["test"]["n"] == scale.n_test and m["heldout"]["n"] == scale.n_heldout
        assert m["test"]["reference"]["nll_token_mean"] > 0
        rows = read_jsonl(study / "eval" / f"{m.get('run', name)}.test.jsonl")
        assert [r["correct"] for r in rows] == m["test"]["verdicts"]  # the paired tests' input, per question
    hd = summary["hd"]
    assert hd["tried"] == scale.n_hd == hd["on_policy"] + hd["hinted"] + hd["failed"]
    ddt = summary["ddt"]
    assert list(ddt) == list(reproduce.DDT_SOURCES) and all(d["n"] == scale.n_ddt for d in ddt.values())
    assert ddt["reference"]["answer_correct"] == 1.0  # the reference solutions verify against themselves
    for png in ("ddt.png", "frontier.png", "dynamics.png", "accuracy_test.png", "accuracy_heldout.png"):
        assert (study / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (study / "results.md").read_text()
    assert "**Claim 1 (DDT)**" in md and "**Claim 2 (IDFT)**" in md and "**Reading**" in md
    assert "exact McNemar" in md and "Minutes per stage" in md
    assert all(f"| {name} |" in md for name in grid)
    assert set(json.loads((study / "timings.json").read_text())) >= {"data", "ddt", "hd", "grid", "select", "online",
                                                                     "final"}
    # the online arms: train.py --online at each loss's chosen rate, its steps all logged, in the report
    for loss in reproduce.ONLINE_LOSSES:
        name = f"online_{loss}"
        assert summary["final"][name]["lr"] == summary["validation"][summary["chosen"][loss]]["lr"]
        records = read_jsonl(study / "runs" / name / "online.jsonl")
        assert len(records) == scale.steps * scale.batch_size and {r["step"] for r in records} == {1, 2}
        assert summary["online"][name]["steps"] == scale.steps and f"| {name} |" in md
    assert "Online runs (train.py --online)" in md


def test_each_loss_keeps_the_rate_best_on_validation(study):
    """The choice is remade here from the validation answers on disk, not from the summary."""
    summary = json.loads((study / "results.json").read_text())
    scale = reproduce.SCALES["smoke"]
    for loss in reproduce.GRID_LOSSES:
        runs = [reproduce.run_name(loss, lr) for lr in scale.learning_rates]
        correct = {name: sum(r["correct"] for r in read_jsonl(study / "eval" / f"{name}.validation.jsonl"))
                   for name in runs}
        best = max(correct.values())
        assert correct[summary["chosen"][loss]] == best
        assert summary["final"][loss]["run"] == summary["chosen"][loss]
        # nothing of the test split went into the choice: the chosen run's test answers come after
        assert (study / "eval" / f"{summary['chosen'][loss]}.test.jsonl").exists()
        assert all(not (study / "eval" / f"{name}.test.jsonl").exists() for name in runs
                   if name != summary["chosen"][loss])


def test_choose_rates_breaks_ties_by_drift_then_rate():
    def run(loss, lr, accuracy, kl):
        return {"loss": loss, "lr": lr, "validation": {"accuracy": accuracy}, "kl_from_base": kl}

    grid = {"sft_a": run("sft", 1e-5, 0.30, 0.01), "sft_b": run("sft", 3e-5, 0.40, 0.05),
            "sft_c": run("sft", 1e-4, 0.40, 0.02),  # ties with sft_b on accuracy, drifts less
            "dft_a": run("dft", 1e-5, 0.20, 0.01), "dft_b": run("dft", 3e-5, 0.20, 0.01),  # full tie: smaller rate
            "idft_a": run("idft", 1e-4, 0.10, 0.3)}
    assert reproduce.choose_rates(grid) == {"sft": "sft_c", "dft": "dft_a", "idft": "idft_a"}


def test_paired_tests_count_the_discordant_questions():
    final = {"base": {s: {"verdicts": [False] * 6} for s in ("test", "heldout")},
             "sft": {s: {"verdicts": [True, True, True, False, False, True]} for s in ("test", "heldout")}}
    tests = reproduce.paired_tests(final)
    assert [(t["a"], t["b"], t["split"]) for t in tests] == [("sft", "base", "test"), ("sft", "base", "heldout")]
    t = tests[0]
    assert (t["n"], t["only_a"], t["only_b"]) == (6, 4, 0)
    assert t["p_value"] == pytest.approx(2 / 16)  # 2 · P[Bin(4, 1/2) = 0]
    assert "| sft vs base | test (trained templates), 6 | +66.7 pts | 4 | 0 | 0.125 |" in "\n".join(
        reproduce.paired_table(tests))


def test_rerun_reuses_finished_stages_and_redoes_missing_ones(study, tiny_model_dir, capsys):
    before = json.loads((study / "results.json").read_text())["final"]
    chosen = json.loads((study / "results.json").read_text())["chosen"]["idft"]
    kept = {p: p.stat().st_mtime_ns for p in (study / "ddt.json", study / "eval" / "base.final.json",
                                              study / "runs" / "sft_lr5e-05" / "metrics.jsonl")}
    (study / "eval" / f"{chosen}.final.json").unlink()
    timings = json.loads((study / "timings.json").read_text())
    assert reproduce.main(["--scale", "smoke", "--model", tiny_model_dir, "--out", study]) == 0
    log = capsys.readouterr().err
    assert "ddt: reusing" in log and "eval base (final): reusing" in log and f"eval {chosen} (final): reusing" not in log
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
    after = json.loads((study / "results.json").read_text())["final"]
    for key in ("correct", "n", "avg_output_tokens", "reference", "verdicts"):  # redone deterministically
        assert after["idft"]["test"][key] == before["idft"]["test"][key], key
    assert json.loads((study / "timings.json").read_text())["final"] > timings["final"]  # added up over reruns


def test_outputs_made_with_other_settings_are_not_overwritten(study, tiny_model_dir, capsys):
    path = study / "ddt.json"
    saved = json.loads(path.read_text())
    saved["settings"]["n"] += 1
    path.write_text(json.dumps(saved))
    assert reproduce.main(["--scale", "smoke", "--model", tiny_model_dir, "--out", study]) == 2
    assert "ddt.json was made with other settings" in capsys.readouterr().err
    assert json.loads(path.read_text()) == saved
