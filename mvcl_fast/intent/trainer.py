"""The training loop of one run: claim its folder, build it, train epoch by epoch, report.

Every epoch trains on the shuffled training split, evaluates dev, keeps
``best.pt`` when the dev selection metric improved and replaces ``last.pt``;
the run stops after --epochs or --max-steps, or early after --patience epochs
without improvement. Ctrl-C or SIGTERM finishes the current step, saves
``last.pt`` and stops (a second one aborts, once a checkpoint being written is
complete). A step never waits for the device: its losses are summed there and
read every --log-every steps, at an epoch's end and before a checkpoint; a
NaN/Inf loss found then stops the run naming the step, and so do NaN/Inf weights
before a checkpoint is written, so ``last.pt`` and ``best.pt`` only ever hold
finite weights. Under DDP every rank runs this loop: the ranks decide
stops and divergence together, and rank 0 alone writes.
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import signal
import threading
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from mvcl_fast.intent import build, checkpoints, distributed, open_intent, runs
from mvcl_fast.intent.data import data_loader
from mvcl_fast.intent.distributed import Distributed
from mvcl_fast.intent.errors import ConfigError, MVCLError
from mvcl_fast.intent.evaluation import split_logits
from mvcl_fast.intent.loading import PRECISIONS, autocast_dtype, model_inputs, to_device
from mvcl_fast.intent.step import CapturedStep, TrainingStep

# Ctrl-C (SIGINT) and SIGTERM (what schedulers preempting a job send; torchrun forwards the
# signal it receives to every worker): both finish the step, save last.pt and exit.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingDiverged(MVCLError):
    """The loss or the weights became NaN or Inf."""


class StopSignals:
    """While entered: the first stop signal is counted (the loop stops after its step), a second
    one raises KeyboardInterrupt, or, while a checkpoint is written (:meth:`held`), once it is.
    Handlers are installed in the main thread only."""

    def __init__(self, log, finishing: str = "the current step"):
        self.log = log
        self.finishing = finishing  # what runs before the stop
        self.received = 0           # this process's own count; the ranks decide stops together
        self.pid = os.getpid()      # forked DataLoader workers inherit the handler
        self.previous = {}
        self.holding = False
        self.abort_held = False

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            self.previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    @contextlib.contextmanager
    def held(self):
        """A second stop signal aborts only once the block (a checkpoint write) is done, so the
        file written is whole and the run's newest."""
        self.holding = True
        try:
            yield
        finally:
            self.holding = False
        if self.abort_held:
            raise KeyboardInterrupt

    def _handle(self, signum, frame) -> None:
        if os.getpid() != self.pid:
            return
        self.received += 1
        if self.received > 1:
            if self.holding:
                self.abort_held = True
                return
            raise KeyboardInterrupt
        self.log(f"{signal.Signals(signum).name}: finishing {self.finishing}, then saving last.pt "
                 "(a second one aborts without saving)")


class Trainer:
    """One run of one process: its data, model, optimiser and progress (see the module docstring);
    mvcl_fast.intent.checkpoints saves and restores it, mvcl_fast.intent.evaluation reports it."""

    def __init__(self, args: argparse.Namespace, resume_state: Optional[dict] = None,
                 dist_ctx: Optional[Distributed] = None):
        """args: resolved options (mvcl_fast.intent.train.prepare_args); resume_state: last.pt."""
        self.args = args
        self.dist = dist_ctx or distributed.from_env(args.device)
        self.device = self.dist.device
        self.output_dir = Path(args.output_dir)
        self.last_path = self.output_dir / runs.LAST_CHECKPOINT
        self.folder: Optional[runs.RunFolder] = None    # rank 0's claim; it alone writes
        self.log_file = None
        # Under DDP the ranks agree on a stop with a collective, which waits for the device: at
        # the loss readings only, so that a step never waits.
        self.stops = StopSignals(self.log, "the steps up to the next loss reading (at most "
                                 f"--log-every {args.log_every})" if self.dist.enabled
                                 else "the current step")
        try:
            self.folder = runs.claim_on_every_rank(self.output_dir, self.dist,
                                                   resume=resume_state is not None,
                                                   overwrite=args.overwrite)
            if self.folder is not None:
                self.log_file = self.folder.open_log()
            self._build(resume_state)
            if resume_state is not None:
                checkpoints.restore_last(self, resume_state)
                self.criterion.bank_ready()    # the restored bank's flag, read before the steps
        except BaseException:
            self.close()     # the folder's lock and the process group go with a failed start
            raise

    def _build(self, resume_state: Optional[dict]) -> None:
        args = self.args
        checkpoints.seed_everything(args.seed)   # the same on every rank: identical initial weights
        build.ensure_data_dir(args, self.dist, self.log)
        started = time.perf_counter()
        raw = build.read_splits(args, self.dist, self.log)
        self.label_names = list(raw["train"].label_names)
        self.train_label_counts = build.label_counts(raw["train"])
        # a resumed run keeps the hub snapshot it started with, whatever main is now
        revision = resume_state["model_config"].get("text_revision") if resume_state else None
        self.splits, self.cfg, text_encoder = build.encode_splits(args, raw, self.log, started,
                                                                  revision)
        self.model, self.criterion = build.build_model(args, self.cfg, text_encoder, self.device,
                                                       self.dist.group, self.train_label_counts)
        self.with_anchor = args.lambda_mv != 0
        self.outlier_exposure = open_intent.OutlierExposure(self) if args.open_intent else None
        self.compiled = build.compile_fusion(self.model, args.compile, self.device)
        # Training runs through the DDP wrapper; evaluation and checkpoints use the bare model.
        self.train_model = build.data_parallel(self.model, self.dist, args.seed)
        self.train_loader = self._loader("train", args.batch_size, shuffle=True)
        self.steps_per_epoch = len(self.train_loader)
        total_steps = args.epochs * self.steps_per_epoch
        if args.max_steps is not None:
            total_steps = min(total_steps, args.max_steps)
        self.optimizer = build.build_optimizer(self.model, args, capturable=args.compile == "step")
        self.scheduler = build.build_schedule(self.optimizer, args.warmup, total_steps)
        self.amp_dtype = autocast_dtype(args.precision, self.device)
        self.precision = next(name for name, dtype in PRECISIONS.items() if dtype == self.amp_dtype)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        capture = args.compile == "step"
        if capture:
            self._check_capture()
        self.step = TrainingStep(self.model, self.criterion, self.optimizer,
                                 amp_dtype=self.amp_dtype, grad_clip=args.grad_clip,
                                 scaler=self.scaler, train_model=self.train_model, cache=not capture,
                                 ood_weight=args.ood_weight if args.open_intent else 0.0)
        self.run_step = CapturedStep(self.step, self.device) if capture else self.step
        self.progress = checkpoints.Progress()
        self.epoch_sums: dict[str, float] = {}   # this rank's loss sums over the unfinished epoch
        self.criterion.check_bank_every_step = False    # checked when the meter is read

    def log(self, message: str) -> None:
        """Print and append to train.log (rank 0 only: the ranks agree on everything logged)."""
        from tqdm import tqdm

        if self.dist.is_main:
            tqdm.write(message)
            self.append_to_log(message)

    def append_to_log(self, message: str) -> None:
        """Append to train.log only (what the command prints itself: its error line)."""
        if self.log_file is None:
            return
        try:
            self.log_file.write(message + "\n")
            self.log_file.flush()
        except OSError as err:
            raise runs.output_error(err, self.output_dir, runs.LOG_NAME, "--output-dir") from err

    def _loader(self, split: str, batch_size: int, shuffle: bool):
        return data_loader(self.splits[split].split, batch_size, shuffle=shuffle, seed=self.args.seed,
                           dist=self.dist, num_workers=self.args.num_workers,
                           pin_memory=self.device.type == "cuda", full_batches=split == "train")

    def _check_capture(self) -> None:
        """--compile step: what a CUDA graph of the step cannot hold is refused here."""
        refused = [(self.device.type != "cuda", "a CUDA device (--device)", "--device cuda"),
                   (self.amp_dtype == torch.float16, "--precision bf16 or fp32 (fp16's gradient "
                    "scaler reads the device every step)", "--precision bf16"),
                   (self.args.prototypes == "ema", "--prototypes batch (the ema bank's use "
                    "changes the step)", "--prototypes batch"),
                   (self.dist.enabled, "one process", "a plain python -m mvcl_fast.train")]
        for failed, needs, fix in refused:
            if failed:
                raise ConfigError(f"--compile step captures the training step as a CUDA graph, "
                                  f"which needs {needs}", f"pass {fix}, or --compile on")

    def train_step(self, batch: dict) -> None:
        """One optimisation step on batch. It makes no host sync: the losses go to the meter."""
        inputs = model_inputs(self.splits["train"].tokens, batch, self.cfg.modalities, self.device,
                              with_anchor=self.with_anchor)
        inputs["labels"] = to_device(batch["label"], self.device)
        if self.outlier_exposure is not None:     # --open-intent: the step's OOS rows
            inputs.update(self.outlier_exposure.inputs(self.progress.global_step))
        self.run_step(inputs)
        self.scheduler.step()     # outside the step: it sets the learning rates in place

    def read_losses(self, bar=None, scheduled: bool = True) -> None:
        """Read the meter (a host sync): add its sums to the epoch's, or stop the run if a step's
        loss was NaN/Inf, on any rank (the ranks decide together). A scheduled reading (every
        --log-every steps, an epoch's end: at the same steps in any run, resumed or not) also
        checks whether the ema bank can be used from the next step."""
        if self.step.meter is None:
            return
        reading = self.step.meter.read()
        diverged, = self.dist.any(reading.first_bad is not None)
        if diverged:
            raise TrainingDiverged(self._divergence(reading))
        for name, value in reading.sums.items():
            self.epoch_sums[name] = self.epoch_sums.get(name, 0.0) + value
        if bar is not None and reading.steps:
            bar.set_postfix(loss=f"{reading.sums['loss'] / reading.steps:.3f}")
        if scheduled:
            self.criterion.check_bank()

    def _divergence(self, reading) -> str:
        """The message of a NaN/Inf loss: the step (1-based) and its losses."""
        last = self.progress.global_step
        if reading.first_bad is None:
            return (f"stopping at global step {last}: the training loss on another rank is NaN/Inf "
                    f"(in one of global steps {last - reading.steps + 1} to {last})")
        step = last - reading.steps + reading.first_bad         # 0-based global step
        epoch, in_epoch = divmod(step, self.steps_per_epoch)
        where = f" on rank {self.dist.rank}" if self.dist.enabled else ""
        losses = reading.bad_losses
        message = (f"stopping at epoch {epoch + 1}, step {in_epoch + 1} (global step {step + 1}): "
                   f"the training loss{where} is {losses['loss']} ("
                   + ", ".join(f"{k} {v:.4g}" for k, v in losses.items() if k != "loss") + ")")
        if step + 1 < last:
            message += (f"; found at global step {last} (the losses are read every --log-every "
                        f"{self.args.log_every} steps and at an epoch's end)")
        return message

    def split_logits(self, split: str, blank: Optional[str] = None) -> torch.Tensor:
        """The model's logits [N, num_labels] over the whole split, in file order (on the CPU)."""
        loader = self._loader(split, self.args.eval_batch_size, shuffle=False)
        return split_logits(self.model, self.splits[split].tokens, loader, self.cfg.modalities,
                            self.device, self.amp_dtype, self.dist, blank)

    def evaluate(self, split: str, blank: Optional[str] = None,
                 logits: Optional[torch.Tensor] = None) -> tuple[dict, np.ndarray, np.ndarray]:
        """(metrics, labels, predictions) of the whole split; blank: a modality blanked out;
        logits: the split's, when already computed (:meth:`split_logits`)."""
        from mvcl_fast.intent.metrics import classification_metrics

        logits = self.split_logits(split, blank) if logits is None else logits
        y_pred = logits.argmax(dim=-1).numpy()
        y_true = self.splits[split].split.labels.numpy()
        return classification_metrics(y_true, y_pred, self.cfg.num_labels), y_true, y_pred

    def _stop_agreed(self) -> bool:
        """Whether any rank got a stop signal: one all-reduce, so every rank decides the same."""
        stop, = self.dist.any(self.stops.received > 0)
        return stop

    def _out_of_steps(self) -> bool:
        return self.args.max_steps is not None and self.progress.global_step >= self.args.max_steps

    def fit(self) -> str:
        """Train until done, early-stopped, interrupted or diverged: 'done' | 'interrupted'."""
        from tqdm import tqdm

        progress = self.progress
        with self.stops:
            while not progress.finished:
                # A signal that came during the evaluation: every rank decides it here.
                if self._stop_agreed():
                    return "interrupted"
                epoch, start = progress.epoch, time.perf_counter()
                if self.dist.enabled:
                    self.train_loader.batch_sampler.sampler.set_epoch(epoch)
                else:
                    self.train_loader.generator.manual_seed(self.args.seed * 1000 + epoch)
                batches = itertools.islice(self.train_loader, progress.step_in_epoch, None)
                bar = tqdm(batches, total=self.steps_per_epoch, initial=progress.step_in_epoch,
                           desc=f"epoch {epoch + 1}/{self.args.epochs}", unit="step",
                           dynamic_ncols=True, leave=False, disable=not self.dist.is_main)
                for batch in bar:
                    self.train_step(batch)
                    progress.step_in_epoch += 1
                    progress.global_step += 1
                    if progress.global_step % self.args.log_every == 0:
                        self.read_losses(bar)
                    epoch_done = self._out_of_steps() or progress.step_in_epoch == self.steps_per_epoch
                    agree = not self.dist.enabled or progress.global_step % self.args.log_every == 0
                    # A stop on an epoch's last step still gets the epoch's evaluation and checkpoint.
                    if agree and self._stop_agreed() and not epoch_done:
                        seconds = time.perf_counter() - start
                        progress.elapsed += seconds
                        progress.epoch_train_seconds += seconds
                        bar.close()
                        self.read_losses(scheduled=False)
                        self._check_weights()
                        with self.stops.held():
                            checkpoints.save_last(self)
                        self.log(f"interrupted at epoch {epoch + 1}, step {progress.step_in_epoch}: "
                                 f"saved {self.last_path}; continue with --resume {self.output_dir}")
                        return "interrupted"
                    if self._out_of_steps():
                        break
                bar.close()
                self._end_epoch(time.perf_counter() - start)
            return "done"

    def _end_epoch(self, train_seconds: float) -> None:
        """Evaluate dev, keep the best model, decide whether to stop, save last.pt.
        train_seconds: the epoch's training time since it (re)started in this process."""
        progress = self.progress
        self.read_losses()
        self._check_weights()
        steps = max(1, progress.step_in_epoch) * self.dist.world_size
        # every rank's sums: the means are over the steps of all of them
        sums = dict(zip(self.epoch_sums, self.dist.sum(list(self.epoch_sums.values()))))
        start = time.perf_counter()
        dev, _, _ = self.evaluate("dev")
        progress.epoch += 1
        progress.step_in_epoch = 0
        self.epoch_sums = {}
        epoch_seconds = progress.epoch_train_seconds + train_seconds + time.perf_counter() - start
        progress.epoch_train_seconds = 0.0
        progress.elapsed += train_seconds + time.perf_counter() - start
        metric = self.args.select_metric
        improved = dev[metric] > progress.best_score
        if improved:
            progress.best_score, progress.best_epoch, progress.bad_epochs = dev[metric], progress.epoch, 0
            with self.stops.held():
                checkpoints.save_best(self, dev)
        else:
            progress.bad_epochs += 1
        progress.history.append({"epoch": progress.epoch,
                                 **{f"train_{k}": round(v / steps, 5) for k, v in sums.items()},
                                 **{f"dev_{k}": round(v, 2) for k, v in dev.items()}})
        progress.epoch_seconds.append(round(epoch_seconds, 2))
        losses = ", ".join(f"{k} {v / steps:.4f}" for k, v in sums.items())
        self.log(f"epoch {progress.epoch}: train {losses} | dev acc {dev['acc']:.2f} macro-F1 "
                 f"{dev['f1']:.2f}{' (best)' if improved else ''} | {epoch_seconds:.1f}s")
        if progress.epoch >= self.args.epochs or self._out_of_steps():
            progress.finished = True
        elif progress.bad_epochs >= self.args.patience:
            self.log(f"early stop: dev {metric} has not improved for {progress.bad_epochs} epochs "
                     f"(best {progress.best_score:.2f} at epoch {progress.best_epoch})")
            progress.finished = True
        with self.stops.held():
            checkpoints.save_last(self)

    def _check_weights(self) -> None:
        """Before a checkpoint: a step whose loss was finite can still leave NaN/Inf weights (an
        overflowing update), which the next step's loss would only show after they were saved.
        The ranks hold the same weights, so they decide alike."""
        finite = torch.stack([torch.isfinite(p).all() for p in self.model.parameters()]).all()
        if not finite.item():
            raise TrainingDiverged(f"stopping after global step {self.progress.global_step}: the "
                                   "weights are NaN/Inf")

    def close(self) -> None:
        if self.log_file is not None:
            # What a close could still flush is what a failed write already reported.
            with contextlib.suppress(OSError):
                self.log_file.close()
        if self.folder is not None:
            self.folder.release()
        self.dist.close()
