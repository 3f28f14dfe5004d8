"""The training step's device-side pieces: the loss meter and the full batches."""
import math

import pytest
import torch

from mvcl_fast.intent.data import FullBatches
from mvcl_fast.intent.step import LossMeter


def test_loss_meter_sums_on_the_device_and_names_the_first_bad_step():
    meter = LossMeter(("loss", "ce"), torch.device("cpu"))
    for loss, ce in ((1.5, 1.0), (float("nan"), 2.0), (float("inf"), 3.0), (0.5, 0.25)):
        meter.add({"loss": torch.tensor(loss), "ce": torch.tensor(ce), "unread": torch.tensor(9.0)})
    reading = meter.read()
    assert reading.steps == 4 and reading.first_bad == 1
    assert math.isnan(reading.bad_losses["loss"]) and reading.bad_losses["ce"] == 2.0
    assert reading.sums["ce"] == 6.25 and math.isnan(reading.sums["loss"])
    meter.add({"loss": torch.tensor(2.0), "ce": torch.tensor(1.0)})
    reading = meter.read()      # a reading starts over: the next holds only what came after
    assert reading.steps == 1 and reading.first_bad is None and reading.sums == {"loss": 2.0, "ce": 1.0}


def test_loss_meter_sums_do_not_depend_on_the_grouping_of_steps():
    """float64 sums of fp32 losses: read every step or once, the epoch's sum is the same (what
    keeps a resumed run's reported means equal to an uninterrupted one's)."""
    losses = torch.rand(200, generator=torch.Generator().manual_seed(0)) * 10
    once, often = LossMeter(("loss",), torch.device("cpu")), LossMeter(("loss",), torch.device("cpu"))
    total = 0.0
    for i, value in enumerate(losses):
        once.add({"loss": value})
        often.add({"loss": value})
        if i % 7 == 0:
            total += often.read().sums["loss"]
    total += often.read().sums["loss"]
    assert once.read().sums["loss"] == total


@pytest.mark.parametrize("items, batch_size", [(10, 4), (8, 4), (3, 5), (1, 1)])
def test_full_batches_keep_the_order_and_complete_the_last_batch(items, batch_size):
    order = torch.randperm(items, generator=torch.Generator().manual_seed(items)).tolist()
    batches = list(FullBatches(order, batch_size))
    assert len(batches) == len(FullBatches(order, batch_size)) == -(-items // batch_size)
    assert all(len(b) == batch_size for b in batches)
    flat = [i for b in batches for i in b]
    assert flat[:items] == order                      # every item, in the sampler's order
    assert flat[items:] == [order[i % items] for i in range(len(flat) - items)]   # then its first


class FakeGraph:
    """torch.cuda.CUDAGraph on the CPU: capture records the step, replay runs it again on the
    tensors it was captured with (what a real graph's kernels read)."""
    capturing = None

    def __init__(self):
        self.step = None

    def replay(self):
        self.step()


class FakeCapture:
    def __init__(self, graph):
        self.graph = graph

    def __enter__(self):
        FakeGraph.capturing = self.graph

    def __exit__(self, *exc):
        FakeGraph.capturing = None


def test_a_captured_step_warms_up_then_replays_its_inputs(monkeypatch):
    """The first WARMUP_STEPS calls run eagerly, the next is captured (not run) and replayed, the
    later ones copy their inputs into the captured tensors: each batch is stepped exactly once
    and on its own values."""
    from mvcl_fast.intent import step as step_lib

    class Stream:
        def __init__(self, *a):
            pass

        def wait_stream(self, other):
            pass

    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: FakeCapture(None))
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", FakeCapture)
    seen, total = [], torch.zeros(())

    def step(inputs):
        if FakeGraph.capturing is not None:          # capture runs nothing: it records
            FakeGraph.capturing.step = lambda: step(inputs)
            return
        seen.append(inputs["x"].item())
        total.add_(inputs["x"])

    captured = step_lib.CapturedStep(step, torch.device("cpu"))
    for value in range(6):
        captured({"x": torch.tensor(float(value))})
    assert seen == [0, 1, 2, 3, 4, 5] and total.item() == 15
    assert captured.graph is not None and captured.calls == 6
