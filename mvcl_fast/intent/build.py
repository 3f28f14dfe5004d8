"""What a training run is built from: its data, tokenised once, the model and its loss, the
optimiser and the learning-rate schedule, each from the run's options.

The order of the steps is part of a run's result: the trainer seeds every
generator, then reads the data, loads the text encoder and builds the model
(whose fresh layers draw from the seeded generator), so every rank starts with
the same weights and a resumed run rebuilds the same model before loading it.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from mvcl_fast.intent.data import SPLITS, MultimodalSplit, load_split
from mvcl_fast.intent.errors import ConfigError, DataError, reraised_as
from mvcl_fast.intent.loading import UNWRITABLE_DATA_HINT
from mvcl_fast.intent.model import (LabelPrompter, ModelConfig, MVCLDAFPlusPlus, MVCLLoss,
                                    default_text_model, hub_revision, load_text_encoder)


@dataclass
class EncodedSplit:
    """A split with its label-prompt tokens, computed once."""

    split: MultimodalSplit
    tokens: dict                  # input_ids, attention_mask, anchor_ids, label_start [N, ...]

    def __len__(self):
        return len(self.split)


DATA_HINT = "check --data-dir against the layouts in docs/data.md"


def ensure_data_dir(args: argparse.Namespace, dist, log: Callable[[str], None]) -> None:
    """Without --data-dir, the synthetic set of --dataset (args.data_dir is set to it): rank 0
    writes it once, the other ranks then read it."""
    from mvcl_fast.intent import synthetic

    if args.data_dir is not None:
        return
    with reraised_as(DataError, "", DATA_HINT):
        if not dist.is_main:
            dist.barrier()
        args.data_dir = str(synthetic.ensure_synthetic(synthetic.DEFAULT_CACHE, args.dataset))
        if dist.is_main:
            dist.barrier()
    layout = "MIntRec2.0 (in-scope and out-of-scope)" if args.dataset == "mintrec2" else "MIntRec"
    log(f"data: synthetic {layout}-format set in {args.data_dir} (a test bed, not a benchmark)")


def read_splits(args: argparse.Namespace, dist, log: Callable[[str], None]) -> dict[str, MultimodalSplit]:
    """The train, dev and test splits of --data-dir (--open-intent: and the release's
    out-of-scope splits, named oos_train, oos_dev, oos_test). Collective under DDP: rank 0
    converts the feature pickles once, the other ranks then map them."""
    from mvcl_fast.intent.open_intent import OOS_PREFIX

    parts = [("", False), *([(OOS_PREFIX, True)] if args.open_intent else [])]
    with reraised_as(DataError, "", DATA_HINT, UNWRITABLE_DATA_HINT):
        if not dist.is_main:
            dist.barrier()
        try:
            splits = {prefix + name: load_split(args.data_dir, args.dataset, name,
                                                video_len=args.video_len, audio_len=args.audio_len,
                                                video_feats_path=args.video_feats,
                                                audio_feats_path=args.audio_feats,
                                                cache_dir=args.cache_dir, out_of_scope=oos)
                      for prefix, oos in parts for name in SPLITS}
        finally:   # also on an error: the others then meet it themselves instead of waiting
            if dist.is_main:
                dist.barrier()
    for note in dict.fromkeys(note for split in splits.values() for note in split.notes):
        log(f"data: {note}")
    return splits


def encode_splits(args: argparse.Namespace, splits: dict[str, MultimodalSplit],
                  log: Callable[[str], None], started: float, revision: Optional[str] = None):
    """(the splits with their label-prompt tokens, the model's ModelConfig, the text encoder):
    the text encoder of --text-model, its tokenizer run once over every split. The utterances
    keep at most --max-text-tokens word pieces (capped at the longest training text); feature
    widths come from the data. started: when reading the data began (for the log). revision: the
    hub snapshot of a hub id to load (default: the one main names now)."""
    train = splits["train"]
    label_names = list(train.label_names)
    text_model = args.text_model or default_text_model()
    with reraised_as(ConfigError, f"--text-model {text_model}: ",
                     "pass the folder of a BERT-family encoder checkpoint, or a hub id"):
        revision = revision or hub_revision(text_model)   # recorded: predict loads the same
        tokenizer, text_encoder = load_text_encoder(text_model, revision)
        probe = LabelPrompter(tokenizer, label_names, args.max_text_tokens)
    max_text_tokens = max(1, min(args.max_text_tokens, probe.longest_text(train.texts)))
    prompter = LabelPrompter(tokenizer, label_names, max_text_tokens)
    # Out-of-scope rows have no label words for the anchor view (the multi-view term never sees them).
    encoded = {name: EncodedSplit(split, prompter.encode(split.texts,
                                                         None if split.out_of_scope else split.labels))
               for name, split in splits.items()}
    log(f"data: {', '.join(f'{k} {len(v)}' for k, v in encoded.items())} utterances, "
        f"{len(label_names)} intents, text {prompter.seq_len} tokens "
        f"(label slots {prompter.label_len}), video {tuple(train.video.shape[1:])}, "
        f"audio {tuple(train.audio.shape[1:])}; loaded in {time.perf_counter() - started:.1f}s")
    cfg = ModelConfig(
        num_labels=len(label_names), label_len=prompter.label_len,
        max_text_tokens=max_text_tokens, video_dim=train.video.dim,
        audio_dim=train.audio.dim, text_model=text_model, text_revision=revision,
        modalities=args.modalities,
        video_width=args.video_width, video_layers=args.video_layers,
        audio_width=args.audio_width, fusion_heads=args.fusion_heads, dropout=args.dropout)
    return encoded, cfg, text_encoder


def label_counts(split: MultimodalSplit) -> list[int]:
    """Utterances per intent (the head / middle / tail groups; the ema bank's intents)."""
    return np.bincount(split.labels.numpy(), minlength=len(split.label_names)).tolist()


def build_model(args: argparse.Namespace, cfg: ModelConfig, text_encoder: nn.Module,
                device: torch.device, group, train_label_counts: list[int]):
    """(model, loss) on device. Under DDP (group: the process group) the prototypes and the
    multi-view negatives come from the global batch. Without the multi-view term (--lambda-mv
    0) nothing reads the anchor encoder: it is frozen, neither trained nor stored."""
    model = MVCLDAFPlusPlus(cfg, text_encoder).to(device)
    criterion = MVCLLoss(
        cfg.num_labels, args.lambda_proto, args.lambda_mv, args.tau, group=group,
        prototypes=args.prototypes, momentum=args.prototype_momentum,
        embedding_dim=text_encoder.config.hidden_size,
        bank_classes=torch.tensor(train_label_counts) > 0).to(device)
    if args.lambda_mv == 0:
        model.anchor_encoder.requires_grad_(False)
    return model, criterion


def compile_fusion(model: MVCLDAFPlusPlus, mode: str, device: torch.device) -> bool:
    """--compile: torch.compile the fusion layers (on / step / off / auto: on for CUDA); whether
    it did (step also captures the whole step: mvcl_fast.intent.step.CapturedStep).
    The fused ops are custom ops with fake impls, so they trace without graph breaks; the
    pretrained encoders stay eager (compiling them costs more than it saves here)."""
    use = mode in ("on", "step") or (mode == "auto" and device.type == "cuda")
    if use:
        for module in [*model.streams.values(), model.coarse, *model.daf]:
            if module is not None:
                module.compile()
    return use


def data_parallel(model: nn.Module, dist, seed: int) -> nn.Module:
    """The module training runs through: under DDP the DistributedDataParallel wrapper (gradients
    averaged across ranks; each rank then draws its own dropout masks), else the model itself."""
    if not dist.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    wrapped = DistributedDataParallel(
        model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)
    torch.manual_seed(seed + dist.rank)
    return wrapped


def build_optimizer(model: MVCLDAFPlusPlus, args: argparse.Namespace,
                    capturable: bool = False) -> torch.optim.AdamW:
    """AdamW: the pretrained text encoders at --lr, everything trained from scratch at
    --fusion-lr; weight decay on matrices only (not on biases, norm weights, PReLU slopes).
    capturable: for a step captured as a CUDA graph, the learning rates are device tensors
    (the schedule updates them in place; a float would be frozen into the graph)."""
    encoder_ids = {id(p) for p in model.encoder_parameters()}
    groups = {}
    for param in model.parameters():
        if not param.requires_grad:
            continue
        encoder = id(param) in encoder_ids
        decay = param.ndim >= 2
        key = (encoder, decay)
        if key not in groups:
            lr = args.lr if encoder else args.fusion_lr
            groups[key] = {"params": [], "lr": torch.tensor(lr, device=param.device) if capturable else lr,
                           "weight_decay": args.weight_decay if decay else 0.0}
        groups[key]["params"].append(param)
    # The fused AdamW is one kernel per parameter group instead of several passes over
    # every tensor: 6x less optimiser time for the ~50M parameters here (on the CPU too).
    return torch.optim.AdamW([groups[k] for k in sorted(groups)], fused=True, capturable=capturable)


def linear_warmup_decay(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / (warmup + 1)
    return max(0.0, (total - step) / max(1, total - warmup))


def build_schedule(optimizer: torch.optim.Optimizer, warmup_share: float,
                   total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over warmup_share of total_steps, then linear decay to 0."""
    warmup = int(warmup_share * total_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: linear_warmup_decay(step, warmup, total_steps))
