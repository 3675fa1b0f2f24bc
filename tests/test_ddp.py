"""Two processes under torchrun (gloo, CPU) train exactly like one process with the same global
batch: same loss at every step, same prompts, same evaluation (uneven shards counted once)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import subprocess_env
from vprompt.cli import app
from vprompt.engine.rundir import read_jsonl

pytestmark = [pytest.mark.multiproc, pytest.mark.usefixtures("single_thread")]


def _args(backbone: str, data: str, out: Path, method: str) -> list[str]:
    # batch 9 over 2 ranks: local batches of 5 and 4 (uneven); val 7 / test 11: uneven shards
    return [
        "train",
        "--backbone",
        backbone,
        "--data",
        data,
        "--out",
        str(out),
        "--method",
        method,
        "--epochs",
        "2",
        "--batch-size",
        "9",
        "--val-size",
        "7",
        "--test-size",
        "11",
        "--device",
        "cpu",
        "--deterministic",
        "--quiet",
    ]


def _torchrun(args: list[str]) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "vprompt",
        *args,
    ]
    return subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)


def _compare(one: Path, two: Path, prompt_key: str | None) -> None:
    s1, s2 = read_jsonl(one / "steps.jsonl"), read_jsonl(two / "steps.jsonl")
    assert [s["step"] for s in s2] == [s["step"] for s in s1]  # rank 0 alone wrote the files
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(s1, s2, strict=True)) < 1e-4
    t1 = load_file(str(one / "task" / "task.safetensors"))
    t2 = load_file(str(two / "task" / "task.safetensors"))
    assert t1.keys() == t2.keys()
    if prompt_key is not None:
        assert torch.allclose(t1[prompt_key], t2[prompt_key], atol=1e-5)
    for k in t1:
        assert torch.allclose(t1[k].double(), t2[k].double(), atol=1e-4), k
    sum1 = json.loads((one / "summary.json").read_text())
    sum2 = json.loads((two / "summary.json").read_text())
    assert sum2["world_size"] == 2 and (sum2["val"]["n"], sum2["test"]["n"]) == (7, 11)
    for split in ("val", "test"):
        assert sum1[split]["n"] == sum2[split]["n"]
        assert sum1[split]["top1"] == pytest.approx(sum2[split]["top1"])
        assert sum1[split]["loss"] == pytest.approx(sum2[split]["loss"], abs=1e-4)


def test_two_processes_match_one_vpt_deep(
    tiny_vit_spec: str, tiny_data_spec: str, tmp_path: Path
) -> None:
    r = CliRunner().invoke(app, _args(tiny_vit_spec, tiny_data_spec, tmp_path / "one", "vpt-deep"))
    assert r.exit_code == 0, r.output
    p = _torchrun(_args(tiny_vit_spec, tiny_data_spec, tmp_path / "two", "vpt-deep"))
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("done:") == 1  # only rank 0 prints
    _compare(tmp_path / "one", tmp_path / "two", "method.prompts")


@pytest.mark.slow
def test_two_processes_match_one_linear_probe(
    tiny_vit_spec: str, tiny_data_spec: str, tmp_path: Path
) -> None:

    r = CliRunner().invoke(app, _args(tiny_vit_spec, tiny_data_spec, tmp_path / "one", "linear"))
    assert r.exit_code == 0, r.output
    p = _torchrun(_args(tiny_vit_spec, tiny_data_spec, tmp_path / "two", "linear"))
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["feature_cache"] is True
    _compare(tmp_path / "one", tmp_path / "two", None)


@pytest.mark.slow
def test_two_processes_match_one_pro_tuning_cnn(tiny_data_spec: str, tmp_path: Path) -> None:
    """Pro-tuning's BatchNorm2d blocks on a CNN take their statistics over the global batch:
    two processes compute what one does, running statistics included."""
    cnn = "timm:resnet10t?pretrained=false"
    # SGD: AdamW turns the rounding noise of gradients near 0 (channels a ReLU closes) into
    # full-size steps of either sign, so it cannot be compared tightly across process counts
    args = ["--img-size", "48", "--seed", "3", "--optimizer", "sgd", "--lr", "0.5"]
    r = CliRunner().invoke(app, _args(cnn, tiny_data_spec, tmp_path / "one", "pro-tuning") + args)
    assert r.exit_code == 0, r.output
    p = _torchrun(_args(cnn, tiny_data_spec, tmp_path / "two", "pro-tuning") + args)
    assert p.returncode == 0, p.stderr[-3000:]
    task = load_file(str(tmp_path / "two" / "task" / "task.safetensors"))
    assert any(k.endswith("norm.running_var") for k in task)  # the BN under test is saved
    _compare(tmp_path / "one", tmp_path / "two", None)


_STOP_AND_RESUME = """
import sys
from vprompt.engine import resume_run, train_run

mode, out, backbone, data = sys.argv[1:5]
values = {
    "backbone": backbone, "data": data, "method": "vpt-deep", "epochs": 3, "batch_size": 9,
    "val_size": 7, "test_size": 11, "device": "cpu", "deterministic": True,
    "method_options": {"prompt_len": 2, "head_dropout": 0.5},
}
if mode == "whole":
    train_run(values, out, quiet=True)
elif mode == "stop":
    train_run(values, out, quiet=True, on_epoch_end=lambda epoch, record: epoch < 1)
else:
    resume_run(out, quiet=True)
"""


def test_two_processes_stop_and_resume_with_dropout_as_uninterrupted(
    tiny_vit_spec: str, tiny_data_spec: str, tmp_path: Path
) -> None:
    """Head dropout on uneven shares (batch 9: 5 + 4 images) draws different amounts of random
    numbers on the two ranks; the checkpoint held rank 0's RNG state only, so a resumed rank 1
    drew other masks than an uninterrupted run (task tensors 3e-3 apart). Masks now come from
    (seed, step, rank)."""
    script = tmp_path / "run.py"
    script.write_text(_STOP_AND_RESUME)

    def torchrun(*args: str) -> None:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        cmd += ["--nproc-per-node", "2", str(script), *args, tiny_vit_spec, tiny_data_spec]
        p = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]

    torchrun("whole", str(tmp_path / "whole"))
    torchrun("stop", str(tmp_path / "stopped"))
    assert json.loads((tmp_path / "stopped" / "summary.json").read_text())["stopped_at_epoch"] == 1
    torchrun("resume", str(tmp_path / "stopped"))
    whole = load_file(str(tmp_path / "whole" / "task" / "task.safetensors"))
    resumed = load_file(str(tmp_path / "stopped" / "task" / "task.safetensors"))
    assert whole.keys() == resumed.keys()
    for k in whole:
        assert torch.equal(whole[k], resumed[k]), k
    losses = [s["loss"] for s in read_jsonl(tmp_path / "whole" / "steps.jsonl")]
    assert losses == [s["loss"] for s in read_jsonl(tmp_path / "stopped" / "steps.jsonl")]
