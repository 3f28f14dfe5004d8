"""--precision: the fused ops get the autocast dtype; bf16 and fp16 training steps on the CPU."""
from __future__ import annotations

import json

import pytest
import torch

import mvcl_fast.intent.model as model_lib
import mvcl_fast.losses as losses_lib
from mvcl_fast.intent import train as train_lib
from mvcl_fast.intent.loading import autocast_dtype
from mvcl_fast.intent.model import MVCLLoss
from test_model import batch, build, prompter, tiny_bert  # noqa: F401 (fixtures)
from test_train import argv, last_state, tiny_setup  # noqa: F401 (fixture)


def recording(monkeypatch, name: str, calls: list):
    """Replace the fused op `name` where the model (daf_attention) or its loss (the drop-in losses
    of mvcl_fast.losses) calls it by one that records its tensor inputs' dtypes."""
    module = model_lib if name == "daf_attention" else losses_lib
    real = getattr(module, name)

    def spy(*args, **kwargs):
        calls.append((name, {a.dtype for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()}))
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)


def test_fused_ops_receive_bf16_inside_an_autocast_region(tiny_bert, prompter, monkeypatch):
    model = build(tiny_bert, prompter).train()
    inputs, anchor_ids, labels = batch(prompter)
    calls = []
    for name in ("daf_attention", "prototype_infonce", "multiview_infonce"):
        recording(monkeypatch, name, calls)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**inputs, anchor_ids=anchor_ids)
        loss, _ = MVCLLoss(model.cfg.num_labels)(out, labels)
    assert [name for name, _ in calls] == ["daf_attention"] * 2 + ["prototype_infonce", "multiview_infonce"]
    assert all(dtypes == {torch.bfloat16} for _, dtypes in calls), calls
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


def test_outside_autocast_the_ops_keep_fp32(tiny_bert, prompter, monkeypatch):
    model = build(tiny_bert, prompter).eval()
    inputs, _, _ = batch(prompter)
    calls = []
    recording(monkeypatch, "daf_attention", calls)
    with torch.no_grad():
        model(**inputs)
    assert calls and all(dtypes == {torch.float32} for _, dtypes in calls)


def test_auto_precision_is_fp32_on_the_cpu():
    assert autocast_dtype("auto", torch.device("cpu")) is None
    assert autocast_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    assert autocast_dtype("fp32", torch.device("cpu")) is None


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_a_mixed_precision_training_step_on_the_cpu(tiny_setup, tmp_path, precision):
    out_dir = tmp_path / precision
    assert train_lib.main(argv(tiny_setup, out_dir, "--precision", precision, "--epochs", "1",
                               "--max-steps", "1")) == 0
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["environment"]["precision"] == precision
    state = last_state(out_dir)
    # the weights and the checkpoint stay fp32; fp16 keeps its loss scale for --resume
    assert all(v.dtype == torch.float32 for v in state["model"].values() if v.is_floating_point())
    assert ("scale" in state["grad_scaler"]) == (precision == "fp16")
