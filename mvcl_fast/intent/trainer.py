"""The training loop of one run: claim its folder, build it, train epoch by epoch, report.

Every epoch trains on the shuffled training split, evaluates dev, keeps
``best.pt`` when the dev selection metric improved and replaces ``last.pt``;
the run stops after --epochs or --max-steps, or early after --patience epochs
without improvement. Ctrl-C or SIGTERM finishes the current step, saves
``last.pt`` and stops (a second one aborts, once a checkpoint being written is
complete); a NaN/Inf loss stops the run naming the step, and so do NaN/Inf
weights before a checkpoint is written, so ``last.pt`` and ``best.pt`` only ever
hold finite weights. Under DDP every rank runs this loop: the ranks decide
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
from torch import nn

from mvcl_fast.intent import build, checkpoints, distributed, open_intent, runs
from mvcl_fast.intent.data import data_loader
from mvcl_fast.intent.distributed import Distributed
from mvcl_fast.intent.errors import MVCLError
from mvcl_fast.intent.evaluation import predicted_labels
from mvcl_fast.intent.loading import PRECISIONS, autocast, autocast_dtype, model_inputs

# Ctrl-C (SIGINT) and SIGTERM (what schedulers preempting a job send; torchrun forwards the
# signal it receives to every worker): both finish the step, save last.pt and exit.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingDiverged(MVCLError):
    """The loss or the weights became NaN or Inf."""


class StopSignals:
    """While entered: the first stop signal is counted (the loop stops after its step), a second
    one raises KeyboardInterrupt, or, while a checkpoint is written (:meth:`held`), once it is.
    Handlers are installed in the main thread only."""

    def __init__(self, log):
        self.log = log
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
        self.log(f"{signal.Signals(signum).name}: finishing the current step, then saving last.pt "
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
        self.stops = StopSignals(self.log)
        try:
            self.folder = runs.claim_on_every_rank(self.output_dir, self.dist,
                                                   resume=resume_state is not None,
                                                   overwrite=args.overwrite)
            if self.folder is not None:
                self.log_file = self.folder.open_log()
            self._build()
            if resume_state is not None:
                checkpoints.restore_last(self, resume_state)
        except BaseException:
            self.close()     # the folder's lock and the process group go with a failed start
            raise

    def _build(self) -> None:
        args = self.args
        checkpoints.seed_everything(args.seed)   # the same on every rank: identical initial weights
        build.ensure_data_dir(args, self.dist, self.log)
        started = time.perf_counter()
        raw = build.read_splits(args, self.dist, self.log)
        self.label_names = list(raw["train"].label_names)
        self.train_label_counts = build.label_counts(raw["train"])
        self.splits, self.cfg, text_encoder = build.encode_splits(args, raw, self.log, started)
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
        self.optimizer = build.build_optimizer(self.model, args)
        self.scheduler = build.build_schedule(self.optimizer, args.warmup, total_steps)
        self.amp_dtype = autocast_dtype(args.precision, self.device)
        self.precision = next(name for name, dtype in PRECISIONS.items() if dtype == self.amp_dtype)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.progress = checkpoints.Progress()
        self.epoch_sums: dict[str, float] = {}   # this rank's loss sums over the unfinished epoch

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
                           pin_memory=self.device.type == "cuda")

    def train_step(self, batch: dict) -> dict:
        self.model.train()
        labels = batch["label"].to(self.device)
        with autocast(self.device, self.amp_dtype):
            out = self.train_model(**model_inputs(self.splits["train"].tokens, batch, self.cfg.modalities,
                                                  self.device, with_anchor=self.with_anchor))
            loss, parts = self.criterion(out, labels)
            if self.outlier_exposure is not None:   # --open-intent: OOS rows, a forward of their own
                loss, parts = self.outlier_exposure(self.train_model, loss, parts,
                                                    self.progress.global_step)
        # The ranks agree before backward (whose all-reduces they must all join) on whether any
        # rank's loss diverged.
        diverged, = self.dist.any(not torch.isfinite(loss).item())
        if diverged:
            if torch.isfinite(loss):
                raise TrainingDiverged("the training loss on another rank is NaN/Inf")
            where = f" on rank {self.dist.rank}" if self.dist.enabled else ""
            raise TrainingDiverged(f"the training loss{where} is {loss.item()} ("
                                   + ", ".join(f"{k} {v.item():.4g}" for k, v in parts.items()) + ")")
        self.optimizer.zero_grad(set_to_none=True)
        # The scaler is a pass-through unless --precision fp16 (whose small gradients need it).
        self.scaler.scale(loss).backward()
        if self.args.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)   # clip the true gradients
            nn.utils.clip_grad_norm_(self.model.parameters(), self.args.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        # after backward: the loss read the bank as it was before this step
        self.criterion.update_prototype_bank(out, labels)
        return {"loss": loss.item(), **{k: v.item() for k, v in parts.items()}}

    def evaluate(self, split: str, blank: Optional[str] = None) -> tuple[dict, np.ndarray, np.ndarray]:
        """(metrics, labels, predictions) of the whole split; blank: a modality blanked out."""
        from mvcl_fast.intent.metrics import classification_metrics

        loader = self._loader(split, self.args.eval_batch_size, shuffle=False)
        y_pred = predicted_labels(self.model, self.splits[split].tokens, loader, self.cfg.modalities,
                                  self.device, self.amp_dtype, self.dist, blank)
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
                    self.train_loader.sampler.set_epoch(epoch)
                else:
                    self.train_loader.generator.manual_seed(self.args.seed * 1000 + epoch)
                batches = itertools.islice(self.train_loader, progress.step_in_epoch, None)
                bar = tqdm(batches, total=self.steps_per_epoch, initial=progress.step_in_epoch,
                           desc=f"epoch {epoch + 1}/{self.args.epochs}", unit="step",
                           dynamic_ncols=True, leave=False, disable=not self.dist.is_main)
                for batch in bar:
                    try:
                        stats = self.train_step(batch)
                    except TrainingDiverged as err:
                        raise TrainingDiverged(
                            f"stopping at epoch {epoch + 1}, step {progress.step_in_epoch + 1} "
                            f"(global step {progress.global_step + 1}): {err}") from None
                    progress.step_in_epoch += 1
                    progress.global_step += 1
                    for k, v in stats.items():
                        self.epoch_sums[k] = self.epoch_sums.get(k, 0.0) + v
                    bar.set_postfix(loss=f"{stats['loss']:.3f}")
                    epoch_done = self._out_of_steps() or progress.step_in_epoch == self.steps_per_epoch
                    # A stop on an epoch's last step still gets the epoch's evaluation and checkpoint.
                    if self._stop_agreed() and not epoch_done:
                        seconds = time.perf_counter() - start
                        progress.elapsed += seconds
                        progress.epoch_train_seconds += seconds
                        bar.close()
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
