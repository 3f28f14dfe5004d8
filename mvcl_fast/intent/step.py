"""What a training step keeps on the device so that it never waits for it.

``TrainingStep`` is a step's device work (forward, losses, backward, AdamW).
``LossMeter`` sums the step's losses on the device and remembers the first
step whose loss was NaN/Inf, with its losses; the trainer reads it (one host
sync) every --log-every steps, at an epoch's end and before a checkpoint.
``WeightCast`` casts the linear layers' weights for autocast once per step.
``CapturedStep`` replays the whole step as one CUDA graph (--compile step).
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor, nn

from mvcl_fast.intent.loading import autocast
from mvcl_fast.intent.open_intent import OOS_PREFIX, outlier_exposure_loss


class LossReading(NamedTuple):
    steps: int                          # steps added since the previous reading
    sums: dict[str, float]              # their losses' sums, by name
    first_bad: Optional[int]            # the first of them whose losses were NaN/Inf (0-based)
    bad_losses: dict[str, float]        # that step's losses


class LossMeter:
    """Losses summed on the device across steps, read now and then.

    The sums are float64, so that they do not depend on how the steps are grouped into readings
    (an fp32 loss has 24 significant bits): a resumed run reports the same means. Every update is
    in place, so a captured step (a CUDA graph) updates the same buffers on each replay.
    """

    def __init__(self, names: tuple[str, ...], device: torch.device):
        self.names = names
        self.sums = torch.zeros(len(names), dtype=torch.float64, device=device)
        self.bad_losses = torch.zeros_like(self.sums)
        self.steps = torch.zeros((), dtype=torch.int64, device=device)
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=device)

    def add(self, losses: dict[str, Tensor]) -> None:
        """One step's scalar losses (keys: names, in order); no host sync."""
        values = torch.stack([losses[name].detach() for name in self.names]).double()
        first = (self.first_bad < 0) & ~values.isfinite().all()
        self.first_bad.copy_(torch.where(first, self.steps, self.first_bad))
        self.bad_losses.copy_(torch.where(first, values, self.bad_losses))
        self.sums.add_(values)
        self.steps.add_(1)

    def read(self) -> LossReading:
        """What was added since the last reading (one host sync), and start over."""
        values = torch.cat([self.sums, self.bad_losses, self.steps[None].double(),
                            self.first_bad[None].double()]).tolist()
        n = len(self.names)
        steps, first_bad = int(values[2 * n]), int(values[2 * n + 1])
        self.sums.zero_()
        self.steps.zero_()
        self.first_bad.fill_(-1)
        return LossReading(steps, dict(zip(self.names, values[:n])),
                           None if first_bad < 0 else first_bad,
                           dict(zip(self.names, values[n:2 * n])))


class WeightCast:
    """The weights of a model's linear layers, cast to autocast's dtype once per step in one
    launch, their gradients cast back in one: autocast casts each weight where it is used, and
    its gradient back, two launches per tensor (~800 a step with two BERT-base encoders).

    Only the tensors autocast would cast itself (the weights and biases of nn.Linear and the
    input projections of nn.MultiheadAttention, which its matrix multiplies read), rounded as
    it rounds them: the step computes the same numbers. Call it inside the autocast region; pass
    its tensors to ``torch.func.functional_call``.
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        self.dtype = dtype
        named = []
        for prefix, module in model.named_modules():
            if isinstance(module, nn.Linear):
                names = ("weight", "bias")
            elif isinstance(module, nn.MultiheadAttention):
                names = ("in_proj_weight", "in_proj_bias")
            else:
                continue
            for name in names:
                param = getattr(module, name, None)
                if isinstance(param, nn.Parameter) and param.requires_grad:
                    named.append((f"{prefix}.{name}" if prefix else name, param))
        self.names = tuple(name for name, _ in named)
        self.params = tuple(param for _, param in named)

    def __call__(self) -> dict[str, Tensor]:
        return dict(zip(self.names, _CastTogether.apply(self.dtype, *self.params)))


class _CastTogether(torch.autograd.Function):
    """tensors -> views of one flat copy in dtype; backward: the gradients into one flat fp32
    tensor, whose views become the parameters' .grad (no copy per tensor either way)."""

    @staticmethod
    def forward(ctx, dtype: torch.dtype, *tensors: Tensor):
        ctx.set_materialize_grads(False)
        ctx.shapes = [t.shape for t in tensors]
        ctx.grad_dtype = tensors[0].dtype     # the parameters': fp32
        flat = torch.empty(sum(t.numel() for t in tensors), dtype=dtype, device=tensors[0].device)
        torch.cat([t.reshape(-1) for t in tensors], out=flat)
        return tuple(chunk.view(shape) for chunk, shape in
                     zip(flat.split([t.numel() for t in tensors]), ctx.shapes))

    @staticmethod
    def backward(ctx, *grads: Optional[Tensor]):
        present = [g for g in grads if g is not None]   # unused weights keep no gradient
        if not present:
            return (None, *grads)
        flat = torch.empty(sum(g.numel() for g in present), dtype=ctx.grad_dtype,
                           device=present[0].device)
        torch.cat([g.reshape(-1) for g in present], out=flat)
        chunks = iter(flat.split([g.numel() for g in present]))
        return (None, *(None if g is None else next(chunks).view(shape)
                        for g, shape in zip(grads, ctx.shapes)))


class TrainingStep:
    """One optimisation step's device work on a batch already on the device: the forward and
    the losses under autocast, backward, clipping, the optimiser, the loss meter. No host sync,
    the same kernels for every batch: what ``CapturedStep`` captures. The trainer runs it (the
    learning-rate schedule and the ema bank's check are the trainer's, between steps); so do
    the benchmarks.

    inputs: the model's keyword arguments and "labels"; with ood_weight (--open-intent) also
    the out-of-scope rows' model arguments, prefixed "oos_", whose outlier-exposure loss (the
    part "oe") is added with that weight. train_model: what the forward runs
    through (a DDP wrapper; default the model). cast_weights: cast the weights once per step
    (``WeightCast``; not through a wrapper, whose forward calls the model itself). cache:
    autocast's cast cache (off for a capture).
    """

    def __init__(self, model: nn.Module, criterion: nn.Module, optimizer: torch.optim.Optimizer,
                 *, amp_dtype: Optional[torch.dtype], grad_clip: float = 0.0,
                 scaler: Optional[torch.amp.GradScaler] = None,
                 train_model: Optional[nn.Module] = None, cast_weights: bool = True,
                 cache: bool = True, ood_weight: float = 0.0):
        self.model, self.criterion, self.optimizer = model, criterion, optimizer
        self.train_model = model if train_model is None else train_model
        self.amp_dtype, self.grad_clip, self.cache = amp_dtype, grad_clip, cache
        self.ood_weight = ood_weight
        device = next(model.parameters()).device
        self.scaler = scaler or torch.amp.GradScaler(device.type, enabled=False)
        self.weight_cast = (WeightCast(model, amp_dtype) if cast_weights and amp_dtype is not None
                            and self.train_model is model else None)
        self.device = device
        self.meter: Optional[LossMeter] = None    # made by the first step, from its loss terms

    def __call__(self, inputs: dict[str, Tensor]) -> None:
        self.model.train()
        labels = inputs["labels"]
        model_args = {k: v for k, v in inputs.items() if k != "labels" and not k.startswith(OOS_PREFIX)}
        with autocast(self.device, self.amp_dtype, cache=self.cache):
            if self.weight_cast is None:
                forward = self.train_model
            else:
                weights = self.weight_cast()     # once for both forwards

                def forward(**kwargs):
                    return torch.func.functional_call(self.model, weights, (), kwargs, strict=False)
            out = forward(**model_args)
            loss, parts = self.criterion(out, labels)
            if self.ood_weight:
                oos = {k[len(OOS_PREFIX):]: v for k, v in inputs.items() if k.startswith(OOS_PREFIX)}
                parts["oe"] = outlier_exposure_loss(forward(**oos).logits)
                loss = loss + self.ood_weight * parts["oe"]
        self.optimizer.zero_grad(set_to_none=True)
        # The scaler is a pass-through unless fp16 (whose small gradients need it).
        self.scaler.scale(loss).backward()
        if self.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)   # clip the true gradients
            nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        # after backward: the loss read the bank as it was before this step
        self.criterion.update_prototype_bank(out, labels)
        if self.meter is None:
            self.meter = LossMeter(("loss", *parts), self.device)
        self.meter.add({"loss": loss, **parts})


class CapturedStep:
    """A training step's device work captured once as a CUDA graph and replayed for every batch
    (``--compile step``): one launch a step instead of thousands.

    step(inputs) must be capturable: the same kernels on the same shapes for every batch and no
    host sync (what the step structure test checks on the CPU), an optimiser with tensor
    learning rates and capturable=True, autocast without its weight cache. The first
    WARMUP_STEPS calls run eagerly on a side stream (real steps, which also let torch.compile
    compile and the Triton kernels autotune); the next one is captured (capture runs nothing)
    and replayed; from then on each call copies its inputs into the graph's and replays it.
    """

    WARMUP_STEPS = 3

    def __init__(self, step: Callable[[dict[str, Tensor]], None], device: torch.device):
        self.step = step
        self.device = device
        self.calls = 0
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.inputs: dict[str, Tensor] = {}     # the graph's inputs

    def __call__(self, inputs: dict[str, Tensor]) -> None:
        if self.graph is None and self.calls < self.WARMUP_STEPS:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                self.step(inputs)
            torch.cuda.current_stream(self.device).wait_stream(side)
        elif self.graph is None:
            self.inputs = {name: tensor.clone() for name, tensor in inputs.items()}
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.step(self.inputs)
            self.graph = graph
            graph.replay()
        else:
            for name, tensor in inputs.items():
                self.inputs[name].copy_(tensor, non_blocking=True)
            self.graph.replay()
        self.calls += 1
