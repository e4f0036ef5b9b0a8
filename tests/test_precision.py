"""--dtype on every command line: bfloat16 by default on CUDA with TF32 on, float32 on CPU;
the model is loaded (or autocast) in the dtype asked for, the statistics stay float32."""

import json

import pytest
import torch

import ddt
import eval as evaluate
import hinted_decode
import model
import train
from plumbing import precision
from plumbing.precision import compute_dtype

torch.set_num_threads(1)
ROWS = [("What is 7 times 6?", "7 * 6 = 42\n#### 42"), ("What is 9 plus 16?", "9 + 16 = 25\n#### 25")]


@pytest.fixture
def tf32_off():
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


def test_default_dtype_per_device_and_tf32_on_cuda(tf32_off):
    assert compute_dtype(None, "cpu") == "float32" and compute_dtype("bfloat16", "cpu") == "bfloat16"
    assert not torch.backends.cuda.matmul.allow_tf32  # the CPU leaves CUDA's flags alone
    assert compute_dtype(None, "cuda:1") == "bfloat16" and compute_dtype("float32", "cuda") == "float32"
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32


def run_cli(name, model_dir, data, out, *extra):
    common = ["--model", str(model_dir), "--data", str(data), *extra]
    if name == "train":
        return train.main(common + ["--out", str(out), "--max-steps", "1", "--batch-size", "2"])
    if name == "hinted_decode":
        return hinted_decode.main(common + ["--out", str(out / "hd.jsonl"), "--max-new-tokens", "4", "--quiet"])
    if name == "eval":
        return evaluate.main(common + ["--out", str(out / "r.json"), "--max-new-tokens", "4", "--ddt"])
    return ddt.main(common + ["--out", str(out / "s.jsonl")])


@pytest.mark.parametrize("cli", ["train", "hinted_decode", "eval", "ddt"])
def test_every_cli_takes_dtype_through_the_shared_helper(cli, tiny_model_dir, tmp_path, monkeypatch):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in ROWS))
    asked, loaded, real_loader = [], [], model.Transformer.from_pretrained.__func__

    def spy(name, device):
        asked.append((name, str(device)))
        return compute_dtype(name, device)

    def load(cls, *a, **k):
        loaded.append(k.get("dtype", torch.float32))
        return real_loader(cls, *a, **k)

    for module in (train, hinted_decode, evaluate, precision):  # ddt.py imports it when it runs
        monkeypatch.setattr(module, "compute_dtype", spy)
    monkeypatch.setattr(model.Transformer, "from_pretrained", classmethod(load))
    outputs = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / dtype
        out.mkdir()
        assert run_cli(cli, tiny_model_dir, data, out, "--dtype", dtype) == 0
        outputs[dtype] = out
    assert asked == [("float32", "cpu"), ("bfloat16", "cpu")]
    if cli == "train":  # autocast over float32 weights: the loss moves by bfloat16 rounding only
        assert loaded == [torch.float32] * 2
        loss = {d: json.loads((o / "metrics.jsonl").read_text().splitlines()[0])["loss"] for d, o in outputs.items()}
        assert loss["bfloat16"] != loss["float32"] and loss["bfloat16"] == pytest.approx(loss["float32"], rel=0.05)
    else:
        assert set(loaded[:len(loaded) // 2]) == {torch.float32} and set(loaded[len(loaded) // 2:]) == {torch.bfloat16}
    if cli == "ddt":  # φ of bfloat16 weights, computed in float32: close to float32 weights' φ
        phi = {d: [json.loads(line)["phi_mean"] for line in (o / "s.jsonl").read_text().splitlines()]
               for d, o in outputs.items()}
        assert phi["bfloat16"] == pytest.approx(phi["float32"], abs=0.05)
    if cli == "hinted_decode":  # the dtype shapes the records: an --out is only extended with the same
        settings = json.loads((outputs["bfloat16"] / "hd.settings.json").read_text())["settings"]
        assert settings["dtype"] == "bfloat16"
        assert run_cli(cli, tiny_model_dir, data, outputs["bfloat16"], "--dtype", "float32") == 2
    if cli == "eval":
        assert json.loads((outputs["bfloat16"] / "r.json").read_text())["settings"]["dtype"] == "bfloat16"
