"""Nothing lost, second round (issue 20), each finding tried as a careless or hostile user would:
outputs never overwrite inputs, one writer per real file, a resume knows its model by content,
checkpoints keep their tokenizer when the source goes, input that would crash after the compute
is refused first, and system errors are one line that leaves everything as it was."""

import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import ddt
import eval as ev
import hinted_decode
import train
from conftest import write_tiny_model, write_tiny_tokenizer
from model import Transformer
from plumbing.files import OutputLock, read_log
from plumbing.metrics import read_metrics
from test_reliability import nothing_loads  # noqa: F401  (a fixture)
from test_reliability import ENV, ROOT, hd_args, one_error_line, start_gated, train_args, weights, write_data
from tokenizer import Tokenizer

torch.set_num_threads(1)


def the_error(err: str) -> str:
    """The one `error: ...` line of a command's stderr (progress lines aside), and no traceback."""
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err[-3000:]
    return errors[0]


def files_under(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def eval_args(model, data, out, *extra):
    return ["--model", str(model), "--data", str(data), "--out", str(out), "--max-new-tokens", "2",
            "--batch-size", "2", *map(str, extra)]


def ddt_args(model, data, out, *extra):
    return ["--model", str(model), "--data", str(data), "--out", str(out), *map(str, extra)]


CLIS = {"train": lambda m, d, o, *x: train.main(train_args(m, d, o) + list(map(str, x))),
        "hd": lambda m, d, o, *x: hinted_decode.main(hd_args(m, d, o, *map(str, x))),
        "eval": lambda m, d, o, *x: ev.main(eval_args(m, d, o, *x)),
        "ddt": lambda m, d, o, *x: ddt.main(ddt_args(m, d, o, *x))}
OUT_NAME = {"train": "run", "hd": "o.jsonl", "eval": "e.json", "ddt": "s.jsonl"}


# ---- 1. An output never overwrites an input ------------------------------------------------------


@pytest.mark.parametrize("cli, case", [("eval", "out=data"), ("ddt", "out=data"), ("hd", "out=data"),
                                       ("train", "data in the run"), ("eval", "out in the model"),
                                       ("ddt", "out=data via symlink")])
@pytest.mark.usefixtures("nothing_loads")
def test_an_output_that_is_an_input_is_refused_and_the_input_kept(cli, case, tiny_model_dir, tmp_path, capsys):
    model = tmp_path / "m"
    shutil.copytree(tiny_model_dir, model)
    data = write_data(tmp_path / "d.jsonl")
    extra = []
    if case.startswith("out=data"):
        out = data
        if "symlink" in case:
            out = tmp_path / "alias.jsonl"
            out.symlink_to(data)
    elif case == "data in the run":  # the resume would rewrite its metrics log, which is --data
        out, extra = tmp_path / "run", ["--resume"]
        out.mkdir()
        data = write_data(out / "metrics.jsonl")
    else:
        out = model / "results.json"
    before = files_under(tmp_path)
    assert CLIS[cli](model, data, out, *extra) == 2
    line = one_error_line(capsys.readouterr().err)
    assert ("lies inside --model" if case == "out in the model" else "would overwrite --data itself") in line, line
    assert files_under(tmp_path) == before  # the data byte for byte, and nothing else written


def test_eval_replaces_only_files_it_wrote(tiny_model_dir, tmp_path, monkeypatch, capsys):
    data = write_data(tmp_path / "d.jsonl")
    out = tmp_path / "r.json"
    two = ["--model", str(tiny_model_dir), "--limit", "1"]  # two models: r.md and r.png are written too
    for name in ("r.md", "r.png", "r.json"):  # each a user's file at a path eval.py derives from --out
        (tmp_path / name).write_text(f"my own {name}\n")
        monkeypatch.setattr(Transformer, "from_pretrained", None)  # refused before any model loads
        assert ev.main(eval_args(tiny_model_dir, data, out, *two)) == 2
        assert f"{tmp_path / name} exists and was not written by eval.py" in one_error_line(capsys.readouterr().err)
        assert (tmp_path / name).read_text() == f"my own {name}\n"
        (tmp_path / name).unlink()
        monkeypatch.undo()
    assert ev.main(eval_args(tiny_model_dir, data, out, *two)) == 0
    first = files_under(tmp_path)
    assert {"r.json", "r.md", "r.png"} <= set(first)
    assert ev.main(eval_args(tiny_model_dir, data, out, *two)) == 0  # its own outputs: replaced on a rerun
    assert set(files_under(tmp_path)) == set(first)


# ---- 2. One writer per real file -----------------------------------------------------------------


def test_one_training_per_real_run_directory(tiny_model_dir, tmp_path, capsys):
    data = write_data(tmp_path / "d.jsonl")
    real = tmp_path / "A"
    real.mkdir()
    (tmp_path / "L").symlink_to(real)
    first = start_gated(tmp_path, "train", "learning_rate", train_args(tiny_model_dir, data, real, max_steps=3))
    try:
        for spelling in (tmp_path / "L", tmp_path / "A" / "." / ".." / "A"):  # no checkpoint yet: it would start over
            assert train.main(train_args(tiny_model_dir, data, spelling, max_steps=3) + ["--resume"]) == 2
            assert f"{real} is in use by another run (pid {first.pid})" in one_error_line(capsys.readouterr().err)
        # the lock file deleted by hand: a second training gets in, and the first stops before its next write
        (real / ".run.lock").unlink()
        assert train.main(train_args(tiny_model_dir, data, tmp_path / "L", max_steps=3) + ["--resume"]) == 0
    finally:
        (tmp_path / "go").touch()
        _, err = first.communicate(timeout=120)
    assert first.returncode == 1 and "was deleted or replaced while this run held it" in the_error(err)
    assert [r["step"] for r in read_metrics(real)] == [1, 2, 3]  # one training's log, nothing interleaved
    assert train.main(train_args(tiny_model_dir, data, tmp_path / "alone", max_steps=3)) == 0
    alone = weights(tmp_path / "alone")
    assert all(torch.equal(alone[k], v) for k, v in weights(real).items())


# An existing output of each tool (its marker keys), which a second run may extend or replace
OWN_OUTPUT = {"hd": "",
              "eval": json.dumps({"command": "python eval.py", "versions": {}, "data": {}, "models": []}),
              "ddt": json.dumps({"id": "q0", "line": 1, "n_tokens": 3, "phi_mean": 0.1, "z": 0, "p_value": 0.5}) + "\n"}


@pytest.mark.parametrize("cli", ["hd", "eval", "ddt"])
@pytest.mark.usefixtures("nothing_loads")
def test_a_second_writer_through_a_symlink_is_refused(cli, tiny_model_dir, tmp_path, capsys):
    data = write_data(tmp_path / "d.jsonl")
    real = tmp_path / OUT_NAME[cli]
    real.write_text(OWN_OUTPUT[cli])
    link = tmp_path / f"link{real.suffix}"
    link.symlink_to(real)
    with OutputLock(real):
        assert CLIS[cli](tiny_model_dir, data, link) == 2
    assert f"{real} is in use by another run (pid {os.getpid()})" in one_error_line(capsys.readouterr().err)


# ---- 3. A run knows its model by content ---------------------------------------------------------


def test_resume_knows_its_model_by_content(tiny_model_dir, tmp_path, capsys):
    data = write_data(tmp_path / "d.jsonl")
    source = tmp_path / "models" / "m"
    shutil.copytree(tiny_model_dir, source)
    (tmp_path / "alias").symlink_to(tmp_path / "models")
    out = tmp_path / "run"
    assert train.main(train_args(tiny_model_dir, data, tmp_path / "straight", max_steps=3)) == 0
    assert train.main(train_args(source, data, out, max_steps=3, save_every=2, keep_checkpoints=0)) == 0
    shutil.rmtree(out / "checkpoints" / "step-0000003")  # as if it had stopped after step 2
    (out / "latest").write_text("checkpoints/step-0000002\n")
    # the same directory under another spelling continues the run, to the weights of a straight one
    assert train.main(train_args(tmp_path / "alias" / ".." / "alias" / "m", data, out, max_steps=3)
                      + ["--resume"]) == 0
    straight = weights(tmp_path / "straight")
    assert all(torch.equal(straight[k], v) for k, v in weights(out).items())
    # another model behind the same spelling (same config and tokenizer, other weights) is refused
    before = files_under(out)
    write_tiny_model(source, Tokenizer.from_pretrained(source).vocab_size, seed=1)
    capsys.readouterr()
    assert train.main(train_args(source, data, out, max_steps=4) + ["--resume"]) == 2
    assert "--model: was 'sha256:" in one_error_line(capsys.readouterr().err)
    assert files_under(out) == before


def test_checkpoints_keep_their_tokenizer_when_the_source_model_disappears(tiny_model_dir, tmp_path, monkeypatch):
    data = write_data(tmp_path / "d.jsonl")
    source, out = tmp_path / "source", tmp_path / "run"
    shutil.copytree(tiny_model_dir, source)
    real = train.learning_rate

    def rotated_away(*a, **k):  # as another run's --keep-checkpoints deletes the checkpoint we train from
        shutil.rmtree(source, ignore_errors=True)
        return real(*a, **k)

    monkeypatch.setattr(train, "learning_rate", rotated_away)
    assert train.main(train_args(source, data, out, max_steps=2, save_every=1, keep_checkpoints=0)) == 0
    assert not source.exists()
    text = "What is 7 times 6? <|im_end|> 42"
    expected = Tokenizer.from_pretrained(tiny_model_dir)
    for step in ("step-0000001", "step-0000002"):
        checkpoint = out / "checkpoints" / step
        tok = Tokenizer.from_pretrained(checkpoint)
        assert tok.encode_chat([{"role": "user", "content": text}], add_generation_prompt=True) == \
            expected.encode_chat([{"role": "user", "content": text}], add_generation_prompt=True)
        assert Transformer.from_pretrained(checkpoint).config.vocab_size == tok.vocab_size


# ---- 4. Input that would crash after the compute is refused first ---------------------------------

BAD_LINES = {"surrogate": '{"question": "What is 7 times 6?\\ud800", "answer": "#### 42"}',
             "bigint": '{"question": "q", "answer": "#### 42", "id": ' + "7" * 5000 + "}",
             "deep": '{"question": "q", "answer": "#### 42", "x": ' + "[" * 100_000 + "]" * 100_000 + "}"}
BAD_NEEDLES = {"surrogate": ":5: field 'question': a lone surrogate (\\ud800)", "bigint": ":5: not valid JSON (Exceeds",
               "deep": ":5: not valid JSON (nested too deeply)", "vocab": "the tokenizer has token ids up to",
               "nan": "holds NaN or infinite values", "tokenizer_json": "tokenizer.json: not valid JSON"}


@pytest.fixture(scope="module")
def bad_models(tmp_path_factory, tiny_model_dir):
    """Model directories that load but would fail, or mislead, after the compute."""
    root = tmp_path_factory.mktemp("bad_models")
    vocab = root / "vocab"  # a tokenizer with more ids than the model has embedding rows
    vocab.mkdir()
    write_tiny_model(vocab, write_tiny_tokenizer(vocab) - 40)
    nan = root / "nan"
    shutil.copytree(tiny_model_dir, nan)
    tensors = load_file(nan / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(tensors, nan / "model.safetensors", metadata={"format": "pt"})
    tokenizer_json = root / "tokenizer_json"
    shutil.copytree(tiny_model_dir, tokenizer_json)
    (tokenizer_json / "tokenizer.json").write_text('{"model": {"type": "BPE", ')
    return root


@pytest.mark.parametrize("case", [*BAD_LINES, "vocab", "nan", "tokenizer_json"])
@pytest.mark.parametrize("cli", ["train", "hd", "eval", "ddt"])
def test_input_that_would_fail_later_is_refused_before_any_compute(cli, case, tiny_model_dir, bad_models, tmp_path,
                                                                   monkeypatch, capsys):
    def no_compute(*a, **k):
        raise AssertionError("compute started before the input was checked")
    for module, name in ((train, "train_step"), (hinted_decode, "rewrite_batch"), (ev, "generate_all"),
                         (ddt, "score_examples")):
        monkeypatch.setattr(module, name, no_compute)
    data = write_data(tmp_path / "d.jsonl")
    if case in BAD_LINES:  # the bad line last: the lines before it are fine
        data.write_text(data.read_text() + BAD_LINES[case] + "\n")
        monkeypatch.setattr(Transformer, "from_pretrained", no_compute)
    model = bad_models / case if case not in BAD_LINES else tiny_model_dir
    before = files_under(tmp_path)
    assert CLIS[cli](model, data, tmp_path / OUT_NAME[cli]) == 2
    assert BAD_NEEDLES[case] in the_error(capsys.readouterr().err)
    assert files_under(tmp_path) == before and not (tmp_path / "run").exists()  # no settings, no part, no run


@pytest.mark.parametrize("cli, flag, value", [
    ("train", "--beta", "1e300"), ("train", "--gamma-max", "1e300"), ("train", "--gamma-min", "1e-300"),
    ("train", "--seed", str(2**70)), ("train", "--max-steps", "9" * 5000), ("hd", "--temperature", "1e-300"),
    ("hd", "--seed", str(2**70)), ("hd", "--beta", "1e300")])
@pytest.mark.usefixtures("nothing_loads")
def test_flags_that_would_overflow_later_are_refused_at_once(cli, flag, value, tiny_model_dir, tmp_path, capsys):
    data = write_data(tmp_path / "d.jsonl")
    assert CLIS[cli](tiny_model_dir, data, tmp_path / OUT_NAME[cli], flag, value) == 2
    assert f"argument {flag}: expected" in one_error_line(capsys.readouterr().err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl"]


def test_eaft_top_k_beyond_the_vocabulary_is_refused_before_any_compute(tiny_model_dir, tmp_path, monkeypatch,
                                                                        capsys):
    monkeypatch.setattr(train, "train_step", None)
    data = write_data(tmp_path / "d.jsonl")
    argv = train_args(tiny_model_dir, data, tmp_path / "run") + ["--loss", "eaft", "--eaft-top-k", "100000"]
    assert train.main(argv) == 2
    assert "--eaft-top-k 100000 exceeds the model's vocabulary" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "run").exists()


def test_a_stale_settings_file_without_records_does_not_block_hinted_decoding(tiny_model_dir, tmp_path):
    """A run stopped before its first record (say, a crash at the first batch) left its settings."""
    data = write_data(tmp_path / "d.jsonl")
    settings = dict(hinted_decode.decoding_settings(hinted_decode.parse_args(hd_args(tiny_model_dir, data, "o.jsonl"))),
                    temperature=0.5)
    (tmp_path / "o.settings.json").write_text(json.dumps({"settings": settings}))
    assert hinted_decode.main(hd_args(tiny_model_dir, data, tmp_path / "o.jsonl", "--limit", "1")) == 0
    assert json.loads((tmp_path / "o.settings.json").read_text())["settings"]["temperature"] == 0.0


@pytest.mark.parametrize("cli", ["train", "hd", "eval", "ddt"])
@pytest.mark.usefixtures("nothing_loads")
def test_a_dangling_symlink_as_out_is_refused_before_loading(cli, tiny_model_dir, tmp_path, capsys):
    data = write_data(tmp_path / "d.jsonl")
    link = tmp_path / OUT_NAME[cli]
    link.symlink_to(tmp_path / "gone" / "away")
    assert CLIS[cli](tiny_model_dir, data, link) == 2
    assert "a symbolic link to" in one_error_line(capsys.readouterr().err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl", link.name]


def test_train_into_the_current_directory(tiny_model_dir, tmp_path, monkeypatch):
    data = write_data(tmp_path / "d.jsonl")
    (tmp_path / "run").mkdir()
    monkeypatch.chdir(tmp_path / "run")
    assert train.main(train_args(tiny_model_dir, data, ".")) == 0
    assert (tmp_path / "run" / "latest").is_file() and not (tmp_path / "run" / ".run.lock").exists()


# ---- −inf logits: p log p = 0 where p = 0 ----------------------------------------------------------


def test_masked_vocabulary_entries_give_finite_entropy_and_varentropy():
    torch.manual_seed(0)
    logits = torch.randn(6, 1000, dtype=torch.float64) * 3
    masked = torch.rand(6, 1000) < 0.3
    masked[:, 0] = False
    log_p = ddt.log_probs(logits.masked_fill(masked, float("-inf")))
    H = ddt.entropy(log_p)
    V = ddt.varentropy(log_p, H)
    for row in range(6):  # float64 over the entries that are left: the distribution itself
        lp = torch.log_softmax(logits[row][~masked[row]], -1)
        h = -(lp.exp() * lp).sum()
        assert abs(H[row].item() - h.item()) <= 1e-5
        assert abs(V[row].item() - (lp.exp() * (lp + h) ** 2).sum().item()) <= 1e-5 * V[row].item() + 1e-6


def test_a_masked_entry_does_not_derail_hinted_decoding(tiny_model_dir, monkeypatch):
    """A −inf log-probability (a masked entry) decodes as a tiny finite one does: the entropy, λ_mix
    and the mixture stay finite, also once the plain stream decodes alone (λ_mix = 1)."""
    model, tok = Transformer.from_pretrained(tiny_model_dir), Tokenizer.from_pretrained(tiny_model_dir)
    hint = [tok.encode_chat([{"role": "user", "content": "Solve: 7 times 6 is 42. What is 7 times 6?"}],
                            add_generation_prompt=True)]
    plain = [tok.encode_chat([{"role": "user", "content": "What is 7 times 6?"}], add_generation_prompt=True)]
    real = hinted_decode.log_probs
    first = {}

    def masked(fill):
        def log_probs(logits):
            lp = real(logits)
            column = first.setdefault("column", int(lp[0].argmax()))  # the token the hint stream wants first
            return lp.index_fill(-1, torch.tensor([column]), fill)
        return log_probs

    runs = {}
    for fill in (float("-inf"), -1e9):
        monkeypatch.setattr(hinted_decode, "log_probs", masked(fill))
        runs[fill] = hinted_decode.hinted_generate(model, hint, plain, beta=3.0, max_new_tokens=12, tokenizer=tok,
                                                   stop_ids=tok.stop_ids, splitter=tok.decode(hint[0][-3:-1]))
    assert runs[float("-inf")] == runs[-1e9]
    assert first["column"] not in runs[-1e9][0][0]
    lam = torch.tensor([0.0, 0.4, 1.0])
    log_p = torch.tensor([[float("-inf"), -1.0]] * 3)
    log_q = torch.tensor([[-2.0, float("-inf")]] * 3)
    z = hinted_decode.log_mixture(log_p, log_q, lam)  # p^(1−λ) q^λ: a stream of weight 0 drops out
    assert torch.equal(z[0], log_p[0]) and torch.equal(z[2], log_q[2]) and torch.isneginf(z[1]).all()


# ---- 5. System errors: one line, exit 1, nothing half-written, the rerun resumes ---------------------


def file_size_limit(limit: int):
    """RLIMIT_FSIZE for this process (CPython ignores SIGXFSZ, so a write past it fails with EFBIG)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def test_a_file_size_limit_during_a_save_keeps_the_last_checkpoint(tiny_model_dir, tmp_path, monkeypatch, capsys):
    data = write_data(tmp_path / "d.jsonl")
    out = tmp_path / "run"
    assert train.main(train_args(tiny_model_dir, data, tmp_path / "straight", max_steps=4)) == 0
    real, restore, saved = train.save_checkpoint, [], {}

    def save_under_a_limit(out, step, *a):
        if step == 4 and not restore:  # under the limit model.safetensors (400 kB) fits, trainer_state.pt (800 kB) not
            saved.update(files_under(out / "checkpoints"))
            restore.append(file_size_limit(600_000))
        return real(out, step, *a)

    monkeypatch.setattr(train, "save_checkpoint", save_under_a_limit)
    capsys.readouterr()
    try:
        code = train.main(train_args(tiny_model_dir, data, out, max_steps=4, save_every=2, keep_checkpoints=0))
    finally:
        restore and restore[0]()
    assert code == 1
    line = the_error(capsys.readouterr().err)
    assert "could not write" in line and "checkpoints/step-0000002 is intact" in line, line
    assert files_under(out / "checkpoints") == saved  # no half-written temporary, step 2 untouched
    assert (out / "latest").read_text() == "checkpoints/step-0000002\n"
    assert train.main(train_args(tiny_model_dir, data, out, max_steps=4, save_every=2, keep_checkpoints=0)
                      + ["--resume"]) == 0
    straight = weights(tmp_path / "straight")
    assert all(torch.equal(straight[k], v) for k, v in weights(out).items())


def test_a_file_size_limit_while_appending_records_is_one_line_and_the_rerun_completes(tiny_model_dir, tmp_path,
                                                                                       capsys):
    data = write_data(tmp_path / "d.jsonl")
    out = tmp_path / "o.jsonl"
    assert hinted_decode.main(hd_args(tiny_model_dir, data, tmp_path / "alone.jsonl")) == 0
    assert hinted_decode.main(hd_args(tiny_model_dir, data, out, "--limit", "1")) == 0
    capsys.readouterr()
    restore = file_size_limit(max(p.stat().st_size for p in tmp_path.glob("o*.jsonl")) + 100)
    try:
        assert hinted_decode.main(hd_args(tiny_model_dir, data, out)) == 1
    finally:
        restore()
    assert "File too large" in the_error(capsys.readouterr().err)
    assert hinted_decode.main(hd_args(tiny_model_dir, data, out)) == 0

    def records(name):
        return [{k: v for k, v in r.items() if k != "_line"} for side in ("", ".failed")
                for r in read_log(tmp_path / f"{name}{side}.jsonl", "test")[0]]
    assert records("o") == records("alone")


def run_in_small_tmpfs(script: str, size: str) -> subprocess.CompletedProcess:
    """`script` (sh) with $FS a fresh tmpfs of `size` (a user namespace: no root needed); skip where
    user namespaces are not allowed."""
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("no user namespaces here: cannot mount a small file system")
    wrapped = f'FS=$(mktemp -d) && mount -t tmpfs -o size={size} none "$FS" && export FS && {script}'
    return subprocess.run(["unshare", "-rm", "sh", "-c", wrapped], env=ENV, cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_a_full_disk_during_a_save_is_one_line_and_the_run_resumes_elsewhere(tiny_model_dir, tmp_path):
    """A real ENOSPC (torch.save's 'unexpected pos'): step 1's checkpoint fits, step 2's does not."""
    data = write_data(tmp_path / "d.jsonl")
    argv = " ".join(train_args(tiny_model_dir, data, "$FS/run", max_steps=2, save_every=1, keep_checkpoints=0))
    proc = run_in_small_tmpfs(f'{sys.executable} train.py {argv} 2>"$FS/../err.txt"; echo "rc=$?";'
                              f' cat "$FS/../err.txt" >&2; ls -A "$FS/run/checkpoints"; cp -a "$FS/run" {tmp_path}/run',
                              size="2700k")
    assert "rc=1" in proc.stdout, proc.stdout + proc.stderr[-3000:]
    line = the_error(proc.stderr)
    assert "No space left on device" in line or "unexpected pos" in line, line
    left = proc.stdout.split("rc=1", 1)[1].split()
    assert left == ["step-0000001"], proc.stdout + proc.stderr  # step 1 kept, nothing half-written
    out = tmp_path / "run"
    assert train.main(train_args(tiny_model_dir, data, tmp_path / "straight", max_steps=2)) == 0
    assert train.main(train_args(tiny_model_dir, data, out, max_steps=2, save_every=1) + ["--resume"]) == 0
    straight = weights(tmp_path / "straight")
    assert all(torch.equal(straight[k], v) for k, v in weights(out).items())
