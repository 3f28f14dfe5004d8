"""What the trainer, ``mvcl_fast.predict`` and ``mvcl_fast.analyze`` share: the trained model,
its data, batch inputs, precision.

``load_model(path)`` is the one way a trained model comes back, for the
trainer's final evaluation, ``predict`` and ``analyze``: the best checkpoint
(read with ``weights_only=True``), its text encoder and tokenizer, its intent
names and the options of the run that trained it. ``read_split`` loads a
split of a data folder for such a model (its data set, its feature widths),
``read_clips`` new clips without labels. ``model_inputs`` turns a DataLoader
batch into the model's keyword arguments the same way for training,
evaluation and prediction.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from mvcl_fast.intent.checkpoints import (BEST_CHECKPOINT, MODEL_FIELDS, check_fields,
                                          load_checkpoint)
from mvcl_fast.intent.errors import (CheckpointError, ConfigError, DataError, first_line,
                                     reraised_as)

# A permission refused or a read-only file system: most often the feature cache, which is
# written beside the pickles unless --cache-dir names a folder.
UNWRITABLE_DATA_HINT = ("the feature cache is written beside the pickles: pass --cache-dir, a "
                        "folder you can write to (and make sure the data files are readable)")

# --precision: the dtype of torch.autocast (fp32: no autocast).
PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def quiet_transformers(prog: str) -> None:
    """transformers' warnings and progress bars off: the commands say what matters themselves."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        raise SystemExit(f"{prog} needs transformers: pip install 'mvcl_fast[train]'") from None
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def autocast_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """--precision as the dtype of torch.autocast on device (None: fp32, no autocast)."""
    cuda = device.type == "cuda"
    if precision == "auto":
        return torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else None
    if precision == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"--precision bf16: {torch.cuda.get_device_name(device)} does not support "
                          "bf16", "use --precision fp16 (with a GradScaler) or fp32")
    return PRECISIONS[precision]


def autocast(device: torch.device, dtype: Optional[torch.dtype], cache: bool = True):
    """The forward passes' autocast region in dtype (None: none, fp32); the weights stay fp32.
    cache=False: no cast cache (a captured CUDA graph must not keep one across the capture)."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None, cache_enabled=cache)


@dataclass
class LoadedModel:
    """A trained model in eval mode, with what it needs to read new utterances."""

    model: torch.nn.Module            # mvcl_fast.intent.model.MVCLDAFPlusPlus, without the anchor encoder
    checkpoint: Path                  # the file it was read from
    label_names: list[str]
    tokenizer: object
    dataset: str                      # the data set whose intents the model predicts
    train_label_counts: list[int]     # training utterances per intent (head / middle / tail;
                                      # empty for last.pt, which does not record them)
    run_options: dict                 # the trainer's options of the run
    doc_thresholds: Optional[list[float]] = None   # --open-intent: per intent (open_intent.doc_predict)

    @property
    def config(self):
        return self.model.cfg


def dataset_of(label_names: list[str], path: Path) -> str:
    """The data set whose intent list the checkpoint's is."""
    from mvcl_fast.intent.data import DATASETS, OOS_LABEL

    for name, info in DATASETS.items():
        if list(info.labels) == list(label_names):
            return name
        if info.oos_folder and list(label_names) == [*info.labels, OOS_LABEL]:
            # Refused rather than cut down to 30 logits: its softmax was trained over 31 classes.
            raise CheckpointError(f"{path}: a {name} model with a logit for {OOS_LABEL} besides its "
                                  f"{info.num_labels} intents, written before the in-scope task "
                                  f"became {info.num_labels}-way",
                                  f"train it again (--dataset {name}; --open-intent for the "
                                  "open-intent protocol)")
    raise CheckpointError(f"{path}: its {len(label_names)} intents are not those of any known data "
                          f"set ({', '.join(DATASETS)})", "pass a checkpoint that mvcl_fast.train wrote")


MODEL_CONFIG_HINT = "pass best.pt or last.pt of a mvcl_fast.train run, unchanged"
# ModelConfig's field annotations, as the types a checkpoint's plain values come back as
_CONFIG_TYPES = {"int": int, "float": (int, float), "str": str, "Optional[str]": (str, type(None)),
                 "tuple[str, ...]": (list, tuple)}


def model_config(saved: dict, path: Path, text_model: Optional[str] = None):
    """The ModelConfig a checkpoint's field 'model_config' holds, every field known and of its
    type; text_model (if given) in place of the recorded one (and of its recorded revision)."""
    from dataclasses import MISSING, fields

    from mvcl_fast.intent.model import ModelConfig

    known = {f.name: f for f in fields(ModelConfig)}
    for name in saved:
        if name not in known:
            raise CheckpointError(f"{path}: field 'model_config' holds {name!r}, which is no "
                                  "field of this version's model", MODEL_CONFIG_HINT)
    for name, f in known.items():
        if name not in saved:
            if f.default is MISSING and f.default_factory is MISSING:
                raise CheckpointError(f"{path}: field 'model_config' has no {name!r}",
                                      MODEL_CONFIG_HINT)
            continue
        value, kind = saved[name], _CONFIG_TYPES[f.type]
        if isinstance(value, bool) or not isinstance(value, kind):
            raise CheckpointError(f"{path}: field 'model_config': {name!r} is {value!r}, not "
                                  f"of type {f.type}", MODEL_CONFIG_HINT)
    try:
        given = {"text_model": text_model, "text_revision": None} if text_model else {}
        return ModelConfig(**{**saved, **given})
    except (TypeError, ValueError, AttributeError) as err:
        raise CheckpointError(f"{path}: field 'model_config' ({first_line(err)})",
                              MODEL_CONFIG_HINT) from None


def load_model(path: str | Path, device: str | torch.device = "cpu",
               text_model: Optional[str] = None) -> LoadedModel:
    """The trained model of a run folder (its best.pt) or of a checkpoint file, ready to predict.

    text_model: the encoder folder when the one recorded in the checkpoint has moved; its
    weights' shapes and vocabulary must be the checkpoint's. A hub id is loaded at the commit
    the checkpoint records, so that the weights are the run's even after the hub moved on.
    """
    from mvcl_fast.intent.model import MVCLDAFPlusPlus, load_text_encoder
    from mvcl_fast.intent.open_intent import saved_thresholds

    path = Path(path)
    if path.is_dir():
        path = path / BEST_CHECKPOINT
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist",
                              "pass a run folder that holds best.pt, or the checkpoint file")
    from mvcl_fast.intent.cli import check_saved_options

    state = load_checkpoint(path)
    check_fields(state, path, MODEL_FIELDS, "pass best.pt or last.pt of a mvcl_fast.train run")
    check_saved_options(state["args"], path)
    cfg = model_config(state["model_config"], path, text_model)
    try:
        tokenizer, encoder = load_text_encoder(cfg.text_model, cfg.text_revision)
    except (OSError, ValueError) as err:
        at = f" at revision {cfg.text_revision}" if cfg.text_revision else ""
        fetch = (f"get that revision (hf download {cfg.text_model} --revision "
                 f"{cfg.text_revision}), or " if cfg.text_revision else "")
        raise ConfigError(f"text model {cfg.text_model}{at} of {path} cannot be loaded "
                          f"({first_line(err)})", f"{fetch}pass its current folder with "
                                                  "--text-model") from None
    try:
        model = MVCLDAFPlusPlus(cfg, encoder)
    except (RuntimeError, ValueError) as err:
        raise CheckpointError(f"{path}: field 'model_config' does not make a model "
                              f"({first_line(err)})", MODEL_CONFIG_HINT) from None
    model.anchor_encoder = None    # only training reads the anchor view
    weights = {k: v for k, v in state["model"].items() if not k.startswith("anchor_encoder.")}
    mismatch = f"{path} was trained with another text model than {cfg.text_model}"
    if len(tokenizer) > model.text_encoder.get_input_embeddings().num_embeddings:
        raise ConfigError(f"{mismatch}: its tokenizer has {len(tokenizer)} word pieces",
                          "pass the text model the run was trained with (--text-model)")
    try:
        model.load_state_dict(weights)
    except (RuntimeError, TypeError, AttributeError) as err:
        detail = next((line.strip() for line in str(err).splitlines() if "size mismatch" in line),
                      first_line(err))
        raise ConfigError(f"{mismatch}, or with other model options ({detail})",
                          "pass the text model the run was trained with (--text-model)") from None
    label_names = list(state["label_names"])
    return LoadedModel(model=model.to(device).eval(), checkpoint=path, label_names=label_names,
                       tokenizer=tokenizer, dataset=dataset_of(label_names, path),
                       train_label_counts=list(state.get("train_label_counts", [])),
                       run_options=dict(state["args"]),
                       doc_thresholds=saved_thresholds(state, path, label_names))


def read_split(loaded: LoadedModel, data_dir: str | Path, split: str, *, dataset: Optional[str] = None,
               video_len: Optional[int] = None, audio_len: Optional[int] = None,
               video_feats: Optional[str] = None, audio_feats: Optional[str] = None,
               cache_dir: Optional[str] = None, out_of_scope: bool = False):
    """One split of data_dir (a mvcl_fast.intent.data.MultimodalSplit) for the loaded model: the folder
    must hold the model's data set (dataset, if given, too) with the feature widths it was
    trained on. The other arguments are mvcl_fast.intent.data.load_split's."""
    from mvcl_fast.intent.data import load_split

    return _model_data(loaded, f"--data-dir {data_dir}", "a folder", dataset, lambda: load_split(
        data_dir, loaded.dataset, split, video_len=video_len, audio_len=audio_len,
        video_feats_path=video_feats, audio_feats_path=audio_feats, cache_dir=cache_dir,
        out_of_scope=out_of_scope))


def read_clips(loaded: LoadedModel, tsv: str | Path, *, dataset: Optional[str] = None,
               video_feats: Optional[str] = None, audio_feats: Optional[str] = None,
               cache_dir: Optional[str] = None):
    """New clips without labels for the loaded model: a TSV in the layout of its data set (the
    label column absent, empty or not read) and the feature pickles of its clips, of the widths
    it was trained on. The other arguments are mvcl_fast.intent.data.load_tsv's."""
    from mvcl_fast.intent.data import load_tsv

    return _model_data(
        loaded, f"--input {tsv}", "a TSV (and feature pickles with each of its clips)", dataset,
        lambda: load_tsv(tsv, loaded.dataset, labelled=False, video_feats_path=video_feats,
                         audio_feats_path=audio_feats, cache_dir=cache_dir))


def _model_data(loaded: LoadedModel, source: str, layout: str, dataset: Optional[str], load):
    """load()'s MultimodalSplit, checked against the model: its data set and feature widths;
    source (the option that named the data) starts every error message."""
    if dataset is not None and dataset != loaded.dataset:
        raise CheckpointError(f"--dataset {dataset}: {loaded.checkpoint} is a model of "
                              f"{loaded.dataset} (its {len(loaded.label_names)} intents)",
                              f"pass {loaded.dataset} data, or a model trained on {dataset}")
    with reraised_as(DataError, f"{source}: ",
                     f"the model predicts the intents of {loaded.dataset}: pass {layout} in its "
                     "layout (docs/data.md)", UNWRITABLE_DATA_HINT):
        data = load()
    cfg = loaded.config
    for name, dim in (("video", data.video.dim), ("audio", data.audio.dim)):
        if name in cfg.modalities and dim != getattr(cfg, f"{name}_dim"):
            raise DataError(f"{source}: {name} features of width {dim}; the model "
                            f"was trained on {getattr(cfg, f'{name}_dim')}",
                            f"pass the {name} features of the release the run was trained on "
                            f"(--{name}-feats)")
    return data


def model_inputs(tokens: dict, batch: dict, modalities, device: torch.device, *,
                 with_anchor: bool = False, blank: Optional[str] = None) -> dict:
    """The model's keyword arguments for a batch: its label-prompt tokens and its frames.

    Every tensor has the shape the options fix (batch, the model's seq_len, the frame lengths),
    whatever the batch's real lengths: a training step is one fixed sequence of kernels.

    blank: a modality to blank out (evaluation without it): its frames zeroed. Text blanked,
    or a model without text: the encoder reads the label prompt alone, [CLS] [MASK]*label_len
    [SEP], the utterance's word pieces left out (the anchor: [CLS], the label words, [SEP]).
    """
    index = batch["index"]
    input_ids, attention_mask = tokens["input_ids"][index], tokens["attention_mask"][index]
    label_start = tokens["label_start"][index]
    anchor_ids = tokens["anchor_ids"][index] if with_anchor else None
    if blank == "text" or "text" not in modalities:
        # Columns 0 and label_start.. of each row: the slots move up to position 1, so that
        # their position embeddings do not tell the utterance's length either.
        prompt_len = int(attention_mask[0].sum() - label_start[0]) + 1   # the same in every row
        offset = torch.arange(prompt_len)[None, :]
        columns = torch.where(offset == 0, 0, label_start[:, None] + offset - 1)
        input_ids, attention_mask = input_ids.gather(1, columns), attention_mask.gather(1, columns)
        anchor_ids = None if anchor_ids is None else anchor_ids.gather(1, columns)
        label_start = torch.ones_like(label_start)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "label_start": label_start}
    for name in ("video", "audio"):
        if name in modalities:
            frames = batch[name]
            inputs.update({name: torch.zeros_like(frames) if blank == name else frames,
                           f"{name}_lengths": batch[f"{name}_length"]})
    if anchor_ids is not None:
        inputs["anchor_ids"] = anchor_ids
    return {k: to_device(v, device) for k, v in inputs.items()}


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """tensor on device without the host waiting: a copy from pinned host memory queues behind
    the device's work, one from pageable memory would wait for it (the rows gathered from the
    token tables are pageable: they are pinned first, a host-side copy)."""
    if device.type == "cuda" and tensor.device.type == "cpu" and not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)
