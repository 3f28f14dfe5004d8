"""What a training step keeps on the device so that it never waits for it.

``LossMeter`` sums the step's losses on the device and remembers the first
step whose loss was NaN/Inf, with its losses; the trainer reads it (one host
sync) every --log-every steps, at an epoch's end and before a checkpoint.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor


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
