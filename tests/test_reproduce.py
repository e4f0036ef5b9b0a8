"""scripts/reproduce.py end to end at the smoke scale on the tiny random model: every stage
runs, the report is built from the stage outputs, and a rerun reuses what is there."""

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


def test_every_stage_leaves_its_outputs(study):
    scale = reproduce.SCALES["smoke"]
    summary = json.loads((study / "results.json").read_text())
    assert set(summary["models"]) == {"base", *reproduce.RUNS}
    hd_records = sum(summary["hd_sources"].values())
    assert hd_records == scale.n_train  # every train example has its hinted_decode.py record
    for name, (loss, data) in reproduce.RUNS.items():
        m = summary["models"][name]
        if "skipped" in m:  # a random model verifies no rewrite: nothing to train the hd runs on
            assert data == "hd" and summary["hd_sources"]["on_policy"] + summary["hd_sources"]["hinted"] < scale.batch_size
            continue
        metrics = [json.loads(line) for line in (study / "runs" / name / "metrics.jsonl").read_text().splitlines()]
        assert max(r["step"] for r in metrics if "step" in r) == scale.steps
        assert m["loss"] == loss and m["test"]["n"] == scale.n_test and m["heldout"]["n"] == scale.n_heldout
        assert 0 < m["kl_from_base"] and m["test"]["reference"]["nll_token_mean"] > 0
    assert summary["models"]["base"]["kl_from_base"] == 0.0
    ddt = summary["ddt"]
    assert list(ddt) == list(reproduce.DDT_SOURCES) and all(d["n"] == scale.n_ddt for d in ddt.values())
    assert ddt["reference"]["answer_correct"] == 1.0  # the reference solutions verify against themselves
    for png in ("ddt.png", "accuracy_test.png", "accuracy_heldout.png"):
        assert (study / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (study / "results.md").read_text()
    assert "**Claim 1 (DDT)**" in md and "**Claim 2 (IDFT)**" in md and "**Reading**" in md
    assert all(f"| {name} |" in md for name in summary["models"])


def test_rerun_reuses_finished_stages_and_redoes_missing_ones(study, tiny_model_dir, capsys):
    before = json.loads((study / "results.json").read_text())["models"]
    kept = {p: p.stat().st_mtime_ns for p in (study / "ddt.json", study / "eval" / "sft.json",
                                              study / "runs" / "sft" / "metrics.jsonl")}
    (study / "eval" / "idft.json").unlink()
    assert reproduce.main(["--scale", "smoke", "--model", tiny_model_dir, "--out", study]) == 0
    log = capsys.readouterr().err
    assert "ddt: reusing" in log and "eval sft: reusing" in log and "eval idft: reusing" not in log
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
    after = json.loads((study / "results.json").read_text())["models"]
    for key in ("correct", "n", "avg_output_tokens", "reference"):  # redone deterministically
        assert after["idft"]["test"][key] == before["idft"]["test"][key], key


def test_outputs_made_with_other_settings_are_not_overwritten(study, tiny_model_dir, capsys):
    path = study / "ddt.json"
    saved = json.loads(path.read_text())
    saved["settings"]["n"] += 1
    path.write_text(json.dumps(saved))
    assert reproduce.main(["--scale", "smoke", "--model", tiny_model_dir, "--out", study]) == 2
    assert "ddt.json was made with other settings" in capsys.readouterr().err
    assert json.loads(path.read_text()) == saved
