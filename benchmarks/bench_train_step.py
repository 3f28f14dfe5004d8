"""One MVCL-DAF++ training step (forward, backward, AdamW) at MIntRec shapes.

Batch 32; text: 50 positions ([CLS] + 28-45 word pieces + 3 label slots +
[SEP], the rest padding); video 230 x 256 and audio 480 x 768 frames, each
clip with a random number of real frames. The text and anchor encoders are
bert-base sized (transformers.BertConfig() defaults, random init: timing only).
fp32 weights (AdamW on fp32 master weights); the forward and the loss in fp32 or
under torch.autocast(bf16), as mvcl_fast.train --precision runs them (bf16 is
its default on CUDA); CE + prototype InfoNCE
+ multi-view InfoNCE (lambda 1 : 1 : 1, tau 0.1); AdamW with the trainer's
two learning rates and weight decay 0.2 on matrices.

Providers: eager (MVCL_FAST_BACKEND=reference, nothing compiled), fused (the
Triton ops, nothing compiled) and fused+compile (the Triton ops, and the
fusion layers compiled as mvcl_fast.train does on CUDA: video/audio streams,
coarse context and DAF blocks; the encoders stay eager), each in fp32 and
with " bf16" under autocast: the trainer's CUDA default, bf16 fused+compile,
against fp32 eager (x_vs_eager) and bf16 eager. On CPU only a tiny smoke
shape runs, on the eager providers, to keep this file working there (the dry
run also runs the fused providers there, through the interpreter). Headline
case: the MIntRec shape.
"""
import contextlib

import pytest
import torch

from harness import CUDA, DEVICE, EAGER, FUSED, Case, labels, run_case, shape_params, skip_off_gpu

FUSED_COMPILE = "fused+compile"
BF16 = " bf16"
PROVIDERS = tuple(p + precision for precision in ("", BF16) for p in (EAGER, FUSED, FUSED_COMPILE))
NUM_LABELS, LABEL_LEN = 20, 3
SHAPES = {
    # name: batch, text tokens (max, min), video (frames, dim), audio (frames, dim), BertConfig overrides
    "mintrec": dict(batch=32, text=(45, 28), video=(230, 256), audio=(480, 768), bert={}),
    "cpu-smoke": dict(batch=4, text=(10, 6), video=(20, 16), audio=(30, 24),
                      bert=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=128, vocab_size=1000)),
}


def build_model(shape: dict):
    from transformers import BertConfig, BertModel

    from mvcl_fast.intent.model import ModelConfig, MVCLDAFPlusPlus, MVCLLoss

    torch.manual_seed(0)
    encoder = BertModel(BertConfig(**shape["bert"]))
    cfg = ModelConfig(num_labels=NUM_LABELS, label_len=LABEL_LEN, max_text_tokens=shape["text"][0],
                      video_dim=shape["video"][1], audio_dim=shape["audio"][1],
                      text_model="bert-base (random init)")
    model = MVCLDAFPlusPlus(cfg, encoder).to(DEVICE).train()
    return model, MVCLLoss(NUM_LABELS, 1.0, 1.0, 0.1), cfg


def optimizer_for(model):
    """AdamW as mvcl_fast.train sets it up: encoders at 2e-5, the rest at 1e-3, decay on matrices."""
    encoder = {id(p) for p in model.encoder_parameters()}
    groups = {}
    for p in model.parameters():
        key = (id(p) in encoder, p.ndim >= 2)
        groups.setdefault(key, {"params": [], "lr": 2e-5 if key[0] else 1e-3,
                                "weight_decay": 0.2 if key[1] else 0.0})["params"].append(p)
    return torch.optim.AdamW(list(groups.values()))


def make_batch(shape: dict, seq_len: int, vocab: int):
    g = torch.Generator().manual_seed(1)
    low = 1000 if vocab > 2000 else 5   # clear of the special tokens
    batch = shape["batch"]
    max_text, min_text = shape["text"]
    text_len = torch.randint(min_text, max_text + 1, (batch,), generator=g)
    input_ids = torch.zeros(batch, seq_len, dtype=torch.long)
    attention_mask = torch.zeros(batch, seq_len, dtype=torch.long)
    anchor_ids = torch.zeros(batch, seq_len, dtype=torch.long)
    for i, n in enumerate(text_len.tolist()):
        used = n + LABEL_LEN + 2
        input_ids[i, :used] = torch.randint(low, vocab, (used,), generator=g)
        anchor_ids[i, :used] = input_ids[i, :used]
        anchor_ids[i, 1 + n: 1 + n + LABEL_LEN] = torch.randint(low, vocab, (LABEL_LEN,), generator=g)
        attention_mask[i, :used] = 1
    video_frames, video_dim = shape["video"]
    audio_frames, audio_dim = shape["audio"]
    video_lengths = torch.randint(video_frames // 3, video_frames + 1, (batch,), generator=g)
    audio_lengths = torch.randint(audio_frames // 3, audio_frames + 1, (batch,), generator=g)
    video = torch.randn(batch, video_frames, video_dim, generator=g)
    audio = torch.randn(batch, audio_frames, audio_dim, generator=g)
    video *= (torch.arange(video_frames)[None, :] < video_lengths[:, None])[..., None]   # zero-padded
    audio *= (torch.arange(audio_frames)[None, :] < audio_lengths[:, None])[..., None]
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask, label_start=1 + text_len,
                  video=video, video_lengths=video_lengths, audio=audio, audio_lengths=audio_lengths,
                  anchor_ids=anchor_ids)
    # The lengths go to the device too: the streams build their padding masks from them.
    return {k: v.to(DEVICE) for k, v in inputs.items()}


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape_name", shape_params(list(SHAPES), str, {"mintrec": "cpu-smoke"},
                                                    {"mintrec": "train_step MIntRec"}))
def test_train_step(benchmark, monkeypatch, shape_name, provider):
    kernels, bf16 = provider.removesuffix(BF16), provider.endswith(BF16)
    skip_off_gpu(kernels, fused=kernels != EAGER, compiles=kernels == FUSED_COMPILE)
    if CUDA and shape_name == "cpu-smoke":
        pytest.skip("CPU smoke shape: on CUDA the MIntRec shape is timed")
    if not CUDA and shape_name == "mintrec":
        pytest.skip("CUDA only: a bert-base training step at batch 32 takes seconds on CPU")
    pytest.importorskip("transformers")
    monkeypatch.setenv("MVCL_FAST_BACKEND", "reference" if kernels == EAGER else "auto")
    shape = SHAPES[shape_name]
    model, criterion, cfg = build_model(shape)
    if kernels == FUSED_COMPILE:
        for module in [*model.streams.values(), model.coarse, *model.daf]:
            module.compile()
    optimizer = optimizer_for(model)
    inputs = make_batch(shape, cfg.seq_len, model.text_encoder.config.vocab_size)
    y = labels(shape["batch"], NUM_LABELS)

    region = (lambda: torch.autocast(DEVICE, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext

    def loss():
        with region():
            return criterion(model(**inputs), y)[0]

    run_case(benchmark, Case(
        op="train_step", shape=f"{shape_name} B={shape['batch']} L={cfg.seq_len} "
                               f"video={shape['video'][0]}x{shape['video'][1]} "
                               f"audio={shape['audio'][0]}x{shape['audio'][1]}",
        provider=provider, forward=loss, step_inputs=list(model.parameters()),
        update=optimizer.step, params={"B": shape["batch"], "L": cfg.seq_len},
        bytes_floor=0, flops_floor=0, x=shape["batch"], x_label="batch", series=shape_name))
