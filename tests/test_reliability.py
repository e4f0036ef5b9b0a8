"""Nothing silently wrong, nothing lost (issue 13): every bad flag is refused before any model is
loaded; a resume or an extension must keep the settings of the run; one writer per output; an
output of the wrong kind fails at once; a torn metrics line is repaired; Ctrl-C is one line and
exit 130 everywhere; `latest` falls back to the newest complete checkpoint."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import ddt
import eval as ev
import hinted_decode
import train
from model import Transformer
from plumbing.files import OutputLock, read_log
from plumbing.metrics import curves, read_metrics
from plumbing.report import plot_run
from tokenizer import Tokenizer

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("reproduce", ROOT / "scripts" / "reproduce.py")
reproduce = importlib.util.module_from_spec(spec)
spec.loader.exec_module(reproduce)
make_gsm8k = reproduce.make_gsm8k
ENV = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")

QUESTIONS = [("What is 7 times 6?", "7 * 6 = 42\n#### 42"), ("What is 9 plus 16?", "9 + 16 = 25\n#### 25"),
             ("A box has 3 red and 5 blue balls. How many balls?", "3 + 5 = 8\n#### 8"),
             ("What is 100 divided by 4?", "100 / 4 = 25\n#### 25")]


def write_data(path, rows=QUESTIONS):
    path.write_text("".join(json.dumps({"id": f"q{i}", "question": q, "answer": a}) + "\n"
                            for i, (q, a) in enumerate(rows)))
    return path


def train_args(model, data, out, **kw):
    args = {"model": model, "data": data, "out": out, "lr": "3e-3", "lr_warmup_ratio": "0", "batch_size": "2",
            "micro_batch_size": "2", "max_len": "256", "max_steps": "2", **kw}
    return [x for k, v in args.items() for x in (f"--{k.replace('_', '-')}", str(v))]


def hd_args(model, data, out, *extra):
    return ["--data", str(data), "--out", str(out), "--model", str(model), "--max-new-tokens", "6",
            "--batch-size", "1", "--quiet", *extra]


def weights(out):
    return load_file(out / (out / "latest").read_text().strip() / "model.safetensors")


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def nothing_loads(monkeypatch):
    """Any model or tokenizer load fails the test: the refusals must come before them."""
    def refuse(*a, **k):
        raise AssertionError("a model or tokenizer was loaded before the flags were checked")
    monkeypatch.setattr(Transformer, "from_pretrained", refuse)
    monkeypatch.setattr(Tokenizer, "from_pretrained", refuse)
    monkeypatch.setattr(make_gsm8k, "load_generators", refuse)


# ---- 1. bad flags -----------------------------------------------------------------------------

TRAIN_BAD = [("--grad-clip", "-1"), ("--lr", "0"), ("--lr", "-1e-4"), ("--lr", "nan"), ("--lr", "inf"),
             ("--epochs", "0"), ("--epochs", "-1"), ("--beta", "-1"), ("--beta", "0"), ("--gamma-min", "-1"),
             ("--warmup-ratio", "2"), ("--transition-ratio", "-0.1"), ("--lr-warmup-ratio", "5"),
             ("--max-steps", "0"), ("--batch-size", "x"), ("--weight-decay", "-0.1"), ("--threshold", "0"),
             ("--eaft-top-k", "0"), ("--keep-checkpoints", "-1"), ("--seed", "-3")]


@pytest.mark.parametrize("flag, value", TRAIN_BAD)
def test_train_refuses_bad_flag_before_loading(flag, value, tiny_model_dir, tmp_path, nothing_loads, capsys):
    data = write_data(tmp_path / "d.jsonl")
    assert train.main(train_args(tiny_model_dir, data, tmp_path / "run") + [f"{flag}={value}"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"argument {flag}:" in line and value in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("main, argv, needle", [
    ("train", ["--gamma-min", "3", "--gamma-max", "2"], "--gamma-min 3.0 must not exceed --gamma-max 2.0"),
    ("hd", ["--top-p", "0"], "argument --top-p"), ("hd", ["--temperature", "-1"], "argument --temperature"),
    ("hd", ["--beta", "nan"], "argument --beta"), ("hd", ["--max-new-tokens", "0"], "argument --max-new-tokens"),
    ("hd", ["--sigmoid-center", "2"], "argument --sigmoid-center"), ("hd", ["--limit", "-1"], "argument --limit"),
    ("eval", ["--max-new-tokens", "0"], "argument --max-new-tokens"),
    ("ddt", ["--alpha", "1"], "--alpha"), ("ddt", ["--batch-size", "0"], "argument --batch-size"),
    ("gsm8k", ["--n-train", "0"], "argument --n-train"), ("reproduce", ["--scale", "huge"], "argument --scale"),
    ("train", ["--data", "DIR"], "is a directory; expected a JSONL file"),
])
def test_every_cli_refuses_bad_flags_before_loading(main, argv, needle, tiny_model_dir, tmp_path, nothing_loads,
                                                    capsys):
    data = write_data(tmp_path / "d.jsonl")
    argv = [str(tmp_path) if a == "DIR" else a for a in argv]
    full = {"train": lambda: train.main(train_args(tiny_model_dir, data, tmp_path / "run") + argv),
            "hd": lambda: hinted_decode.main(hd_args(tiny_model_dir, data, tmp_path / "o.jsonl") + argv),
            "eval": lambda: ev.main(["--model", str(tiny_model_dir), "--data", str(data), "--out",
                                     str(tmp_path / "e.json"), *argv]),
            "ddt": lambda: ddt.main(["--model", str(tiny_model_dir), "--data", str(data), *argv]),
            "gsm8k": lambda: make_gsm8k.main(["--out-dir", str(tmp_path / "g"), *argv]),
            "reproduce": lambda: reproduce.main(["--out", str(tmp_path / "r"), *argv])}[main]
    assert full() == 2
    assert needle in one_error_line(capsys.readouterr().err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl"]  # nothing written


# ---- 4. outputs of the wrong kind fail at once ------------------------------------------------


@pytest.mark.parametrize("main, where, needle", [
    ("train", "FILE", "is a file; expected a directory"), ("train", "FILE/run", "is a file, not a directory"),
    ("hd", "DIR", "is a directory; expected a file"), ("eval", "DIR", "is a directory; expected a file"),
    ("eval", "FILE/e.json", "is a file, not a directory"), ("ddt", "DIR", "is a directory; expected a file"),
    ("gsm8k", "FILE", "is a file; expected a directory"), ("reproduce", "FILE", "is a file; expected a directory"),
])
def test_output_of_the_wrong_kind_is_refused_before_loading(main, where, needle, tiny_model_dir, tmp_path,
                                                            nothing_loads, capsys):
    data = write_data(tmp_path / "d.jsonl")
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("x")
    out = str(tmp_path / where.replace("FILE", "file").replace("DIR", "dir"))
    call = {"train": lambda: train.main(train_args(tiny_model_dir, data, out)),
            "hd": lambda: hinted_decode.main(hd_args(tiny_model_dir, data, out)),
            "eval": lambda: ev.main(["--model", str(tiny_model_dir), "--data", str(data), "--out", out]),
            "ddt": lambda: ddt.main(["--model", str(tiny_model_dir), "--data", str(data), "--out", out]),
            "gsm8k": lambda: make_gsm8k.main(["--out-dir", out]),
            "reproduce": lambda: reproduce.main(["--scale", "smoke", "--out", out])}[main]
    assert call() == 2
    assert needle in one_error_line(capsys.readouterr().err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl", "dir", "file"]


def test_eval_out_directory_is_refused_as_a_command_before_the_model_is_read(tiny_model_dir, tmp_path):
    data = write_data(tmp_path / "d.jsonl")
    model = tmp_path / "model"  # weights that would fail to load: the --out error must come first
    shutil.copytree(tiny_model_dir, model)
    (model / "model.safetensors").write_bytes(b"not safetensors")
    proc = subprocess.run([sys.executable, str(ROOT / "eval.py"), "--model", str(model), "--data", str(data),
                           "--out", str(tmp_path)], env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "is a directory" in one_error_line(proc.stderr)


# ---- 2. resume is for the same run ------------------------------------------------------------


@pytest.mark.parametrize("flag, value, shown", [
    ("--data", "OTHER", "--data: was 'sha256:"), ("--loss", "sft", "--loss: was 'idft', now 'sft'"),
    ("--batch-size", "4", "--batch-size: was 2, now 4"), ("--lr", "1e-3", "--lr: was 0.003, now 0.001"),
])
def test_resume_with_a_changed_setting_is_refused(flag, value, shown, tiny_model_dir, tmp_path, capsys):
    data = write_data(tmp_path / "d.jsonl")
    other = write_data(tmp_path / "other.jsonl", QUESTIONS[::-1])
    out = tmp_path / "run"
    assert train.main(train_args(tiny_model_dir, data, out)) == 0
    before = {f: (out / f).read_bytes() for f in ("args.json", "metrics.jsonl", "latest")}
    capsys.readouterr()
    value = str(other) if value == "OTHER" else value
    assert train.main(train_args(tiny_model_dir, data, out, max_steps=3) + [flag, value, "--resume"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert shown in line and "--max-steps" in line  # names the flag, both values, and what may change
    assert {f: (out / f).read_bytes() for f in before} == before


def test_resume_with_allowed_changes_continues_the_run(tiny_model_dir, tmp_path):
    data = write_data(tmp_path / "d.jsonl")
    straight, out = tmp_path / "straight", tmp_path / "run"
    assert train.main(train_args(tiny_model_dir, data, straight, max_steps=4, lr_warmup_ratio=0.5)) == 0
    # the schedule depends on the run's length: the first part must know it, then it is extended
    assert train.main(train_args(tiny_model_dir, data, out, max_steps=4, lr_warmup_ratio=0.5, save_every=2)) == 0
    (out / "latest").write_text("checkpoints/step-0000002\n")  # as if it had stopped after step 2
    assert train.main(train_args(tiny_model_dir, data, out, max_steps=5, lr_warmup_ratio=0.5, save_every=1,
                                 micro_batch_size=1, log_every=1, keep_checkpoints=3) + ["--resume"]) == 0
    rows = [r for r in read_metrics(out) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    straight_rows = [r for r in read_metrics(straight) if "loss" in r]
    assert [r["loss"] for r in rows[:2]] == [r["loss"] for r in straight_rows[:2]]
    assert json.loads((out / "args.json").read_text())["args"]["max_steps"] == 5


# ---- 3. one writer per output -----------------------------------------------------------------

GATED = """
import pathlib, sys, time
import {module} as m
gate = pathlib.Path(sys.argv[1])
real, calls = m.{function}, [0]
def gated(*a, **k):
    calls[0] += 1
    if calls[0] == 2:  # the first unit of work is done: say so, wait for the test to let go
        (gate.parent / "waiting").touch()
        while not gate.exists():
            time.sleep(0.02)
    return real(*a, **k)
m.{function} = gated
sys.exit(m.main(sys.argv[2:]))
"""


def start_gated(tmp_path, module, function, argv):
    proc = subprocess.Popen([sys.executable, "-c", GATED.format(module=module, function=function),
                             str(tmp_path / "go"), *map(str, argv)], env=ENV, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (tmp_path / "waiting").exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.05)
    return proc


def finish_gated(tmp_path, proc):
    (tmp_path / "go").touch()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]


def test_second_training_on_the_same_out_is_refused(tiny_model_dir, tmp_path, capsys):
    data = write_data(tmp_path / "d.jsonl")
    out = tmp_path / "run"
    first = start_gated(tmp_path, "train", "learning_rate", train_args(tiny_model_dir, data, out, max_steps=3))
    assert train.main(train_args(tiny_model_dir, data, out, max_steps=3)) == 2
    assert f"{out} is in use by another run (pid {first.pid})" in one_error_line(capsys.readouterr().err)
    assert train.main(train_args(tiny_model_dir, data, out, max_steps=3) + ["--resume"]) == 2
    finish_gated(tmp_path, first)
    assert train.main(train_args(tiny_model_dir, data, tmp_path / "alone", max_steps=3)) == 0
    rows, alone = read_metrics(out), read_metrics(tmp_path / "alone")
    assert [r["step"] for r in rows] == [1, 2, 3]  # the first run's log is whole, nothing interleaved
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in alone], rel=1e-5)
    assert not (out / ".run.lock").exists()  # released and removed


def test_second_hinted_decoding_on_the_same_out_is_refused(tiny_model_dir, tmp_path, capsys):
    data = write_data(tmp_path / "d.jsonl")
    out = tmp_path / "o.jsonl"
    first = start_gated(tmp_path, "hinted_decode", "rewrite_batch", hd_args(tiny_model_dir, data, out))
    assert hinted_decode.main(hd_args(tiny_model_dir, data, out)) == 2
    assert f"{out} is in use by another run (pid {first.pid})" in one_error_line(capsys.readouterr().err)
    finish_gated(tmp_path, first)
    assert hinted_decode.main(hd_args(tiny_model_dir, data, tmp_path / "alone.jsonl")) == 0

    def everything(path):
        return sorted((r for p in (path, path.with_name(path.stem + ".failed.jsonl"))
                       for r in read_log(p, "test")[0]), key=lambda r: r["id"])
    strip = lambda rows: [{k: v for k, v in r.items() if k != "_line"} for r in rows]
    assert [r["id"] for r in everything(out)] == ["q0", "q1", "q2", "q3"]  # each once, none torn
    assert strip(everything(out)) == strip(everything(tmp_path / "alone.jsonl"))


def test_lock_held_by_this_process_refuses_eval_and_ddt(tiny_model_dir, tmp_path, nothing_loads, capsys):
    data = write_data(tmp_path / "d.jsonl")
    with OutputLock(tmp_path / "e.json"), OutputLock(tmp_path / "s.jsonl"):
        assert ev.main(["--model", str(tiny_model_dir), "--data", str(data), "--out", str(tmp_path / "e.json")]) == 2
        assert f"(pid {os.getpid()})" in one_error_line(capsys.readouterr().err)
        assert ddt.main(["--model", str(tiny_model_dir), "--data", str(data), "--out", str(tmp_path / "s.jsonl")]) == 2
        assert "is in use by another run" in one_error_line(capsys.readouterr().err)
    with OutputLock(tmp_path / "e.json"):  # released on exit: it can be taken again
        pass


# ---- 2. hinted decoding keeps its settings ----------------------------------------------------


def test_extending_hinted_output_with_other_settings_is_refused(tiny_model_dir, tmp_path, capsys):
    data = write_data(tmp_path / "d.jsonl")
    out = tmp_path / "o.jsonl"
    assert hinted_decode.main(hd_args(tiny_model_dir, data, out, "--limit", "2")) == 0
    saved = json.loads((tmp_path / "o.settings.json").read_text())["settings"]
    assert saved["beta"] == 3.0 and saved["max_new_tokens"] == 6
    written = {p: p.read_bytes() for p in tmp_path.glob("o*")}
    capsys.readouterr()
    for extra, shown in [(["--beta", "1"], "--beta: was 3.0, now 1.0"),
                         (["--max-new-tokens", "7"], "--max-new-tokens: was 6, now 7")]:
        assert hinted_decode.main(hd_args(tiny_model_dir, data, out, "--limit", "3") + extra) == 2
        assert shown in one_error_line(capsys.readouterr().err)
    assert {p: p.read_bytes() for p in tmp_path.glob("o*")} == written
    # --limit and --batch-size may change: the output is extended
    assert hinted_decode.main(hd_args(tiny_model_dir, data, out, "--limit", "3", "--batch-size", "2")) == 0
    assert sum(len(read_log(p, "test")[0]) for p in (out, tmp_path / "o.failed.jsonl")) == 3
    # records without their settings file: the settings they were made with are unknown
    (tmp_path / "o.settings.json").unlink()
    capsys.readouterr()
    assert hinted_decode.main(hd_args(tiny_model_dir, data, out)) == 2
    assert "settings they were made with are unknown" in one_error_line(capsys.readouterr().err)
    # a settings file of another program (an older reproduce.py wrote an argv list there)
    (tmp_path / "o.settings.json").write_text(json.dumps({"settings": ["--scale", "cpu"]}))
    assert hinted_decode.main(hd_args(tiny_model_dir, data, out)) == 2
    assert "not written by hinted_decode.py" in one_error_line(capsys.readouterr().err)


# ---- 5. torn metrics line; 6. eval loss drawn --------------------------------------------------


def straight_and_saved_runs(tiny_model_dir, tmp_path, save_every):
    """Two 3-step runs on the same data: tmp_path/straight, and tmp_path/run with every
    checkpoint kept (to damage, then resume). Returns (data, run directory)."""
    data = write_data(tmp_path / "d.jsonl")
    out = tmp_path / "run"
    assert train.main(train_args(tiny_model_dir, data, tmp_path / "straight", max_steps=3)) == 0
    assert train.main(train_args(tiny_model_dir, data, out, max_steps=3, save_every=save_every,
                                 keep_checkpoints=0)) == 0
    return data, out


def test_torn_metrics_line_is_dropped_on_resume_and_plot_tolerates_it(tiny_model_dir, tmp_path, capsys):
    data, out = straight_and_saved_runs(tiny_model_dir, tmp_path, save_every=2)
    # as if killed while appending step 3's line: its checkpoint never written, its line torn
    shutil.rmtree(out / "checkpoints" / "step-0000003")
    (out / "latest").write_text("checkpoints/step-0000002\n")
    lines = (out / "metrics.jsonl").read_text().splitlines(keepends=True)
    (out / "metrics.jsonl").write_text("".join(lines[:2]) + lines[2][:20])
    assert train.main(["--plot", str(out)]) == 0
    assert train.main(train_args(tiny_model_dir, data, out, max_steps=3) + ["--resume"]) == 0
    assert "dropping an incomplete last line" in capsys.readouterr().err
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]  # all complete now
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r["loss"] for r in rows] == [r["loss"] for r in read_metrics(tmp_path / "straight")]


def test_plot_draws_eval_loss(tiny_model_dir, tmp_path):
    data = write_data(tmp_path / "d.jsonl")
    out = tmp_path / "run"
    assert train.main(train_args(tiny_model_dir, data, out, max_steps=3, eval_every=1, eval_data=data)) == 0
    series = curves(read_metrics(out))
    assert [step for step, _ in series["eval_loss"]] == [1, 2, 3] and [s for s, _ in series["loss"]] == [1, 2, 3]
    assert plot_run(out).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- Ctrl-C; 7. no checkpoint before the first step; `latest` falls back -------------------------


def interrupt(*a, **k):
    raise KeyboardInterrupt


@pytest.mark.parametrize("cli", ["train_before_step_1", "train_loading", "hd", "eval", "ddt", "gsm8k", "reproduce"])
def test_ctrl_c_is_one_line_and_exit_130(cli, tiny_model_dir, tmp_path, monkeypatch, capsys):
    data = write_data(tmp_path / "d.jsonl")
    out = tmp_path / "out"
    patch, call = {
        "train_before_step_1": ((train, "learning_rate"), lambda: train.main(train_args(tiny_model_dir, data, out))),
        "train_loading": ((train, "tokenize_dataset"), lambda: train.main(train_args(tiny_model_dir, data, out))),
        "hd": ((hinted_decode, "rewrite_batch"),
               lambda: hinted_decode.main(hd_args(tiny_model_dir, data, out.with_suffix(".jsonl")))),
        "eval": ((ev, "evaluate_model"),
                 lambda: ev.main(["--model", str(tiny_model_dir), "--data", str(data), "--out", str(out)])),
        "ddt": ((ddt, "score_examples"),
                lambda: ddt.main(["--model", str(tiny_model_dir), "--data", str(data), "--out", str(out)])),
        "gsm8k": ((make_gsm8k, "build"), lambda: make_gsm8k.main(["--out-dir", str(out)])),
        "reproduce": ((reproduce, "make_data"),
                      lambda: reproduce.main(["--scale", "smoke", "--model", str(tiny_model_dir), "--out", str(out)])),
    }[cli]
    monkeypatch.setattr(*patch, interrupt)
    assert call() == 130
    out_err = capsys.readouterr()
    text = out_err.out + out_err.err
    said = [line for line in text.splitlines() if "interrupted" in line]
    assert len(said) == 1 and "Traceback" not in text, text  # one line, besides the usual progress lines
    if cli.startswith("train"):
        assert not (out / "checkpoints").exists() and not (out / "latest").exists()  # no copy of the base model


def test_latest_pointing_at_a_deleted_checkpoint_falls_back(tiny_model_dir, tmp_path, capsys):

    data, out = straight_and_saved_runs(tiny_model_dir, tmp_path, save_every=1)
    shutil.rmtree(out / "checkpoints" / "step-0000003")
    (out / "checkpoints" / "step-0000002" / "trainer_state.pt").unlink()  # an incomplete one is skipped too
    (out / "latest").write_text("checkpoints/step-0000003\n")
    assert train.main(train_args(tiny_model_dir, data, out, max_steps=3, keep_checkpoints=0) + ["--resume"]) == 0
    err = capsys.readouterr().err
    assert "step-0000003, which is missing or incomplete; using" in err and "step-0000001" in err
    straight, resumed = weights(tmp_path / "straight"), weights(out)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_a_missing_latest_pointer_falls_back_to_the_newest_checkpoint(tiny_model_dir, tmp_path, capsys):
    """A kill between renaming the first checkpoint into place and writing `latest`."""
    data = write_data(tmp_path / "d.jsonl")
    out = tmp_path / "run"
    assert train.main(train_args(tiny_model_dir, data, tmp_path / "straight", max_steps=3)) == 0
    assert train.main(train_args(tiny_model_dir, data, out, max_steps=3, save_every=2)) == 0
    (out / "latest").unlink()

    shutil.rmtree(out / "checkpoints" / "step-0000003")  # the run got as far as step 2's checkpoint
    assert train.main(train_args(tiny_model_dir, data, out, max_steps=3, save_every=2) + ["--resume"]) == 0
    assert "latest is missing; using" in capsys.readouterr().err
    straight, resumed = weights(tmp_path / "straight"), weights(out)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_resume_of_a_run_from_before_settings_were_recorded(tiny_model_dir, tmp_path, capsys):
    data = write_data(tmp_path / "d.jsonl")
    out = tmp_path / "run"
    assert train.main(train_args(tiny_model_dir, data, out, max_steps=2, save_every=1)) == 0
    args_file = out / "args.json"
    args_file.write_text(json.dumps(json.loads(args_file.read_text())["args"]))  # the older, flat args.json
    assert train.main(train_args(tiny_model_dir, data, out, max_steps=3, save_every=1) + ["--resume"]) == 0
    assert "the resume is not checked" in capsys.readouterr().err
    args_file.write_text(json.dumps({"settings": ["--lr", "1"]}))  # not ours: refused in one line
    assert train.main(train_args(tiny_model_dir, data, out, max_steps=4) + ["--resume"]) == 2
    assert "not written by train.py" in capsys.readouterr().err
