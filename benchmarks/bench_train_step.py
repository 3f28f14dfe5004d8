"""One MVCL-DAF++ training step (forward, losses, backward, clipping, AdamW) at MIntRec shapes.

Batch 16 (the headline) and 64; text: [CLS] + 30 word-piece positions + 4 label slots +
[SEP] (each utterance 18-30 real word pieces, the rest padding); video 230 x 1024 and audio
480 x 768 frames, each clip with a random number of real frames. The text and anchor
encoders are bert-base sized (transformers.BertConfig() defaults, random init: timing only).
fp32 weights; the step is the trainer's own (mvcl_fast.intent.step.TrainingStep): CE +
prototype InfoNCE + multi-view InfoNCE (1 : 1 : 1, tau 0.1), gradient clipping at 1.0,
fused AdamW with the trainer's two learning rates and weight decay 0.2 on matrices.

Providers:
- ``eager fp32``: the PyTorch reference ops (MVCL_FAST_BACKEND=reference), fp32, nothing compiled;
- ``eager``: the same under bf16 autocast, autocast casting each weight where it is used:
  the baseline of the target;
- ``fused eager``: bf16, the Triton ops, the weights cast once per step, nothing compiled
  (``--compile off`` on CUDA);
- ``fused+compile``: that, with the fusion layers compiled (``--compile on``, the CUDA default);
- ``fused``: that, with the whole step captured as one CUDA graph and replayed
  (``--compile step``; mvcl_fast.intent.step.CapturedStep). Target at batch 16: at least 4x
  the ``eager`` step, within 2x of the floor.

Floors: the AdamW bytes (param, grad and both moments read, param and moments written: 28
bytes per parameter) over the card's bandwidth, and the step's matmul FLOPs
(torch.utils.flop_counter) over its bf16 peak; the harness takes the larger. On CPU only a
tiny smoke shape runs, on the eager providers (the dry run also runs the fused ones through the
interpreter, ``fused`` without compiling or capturing).
"""
import pytest
import torch

from harness import CUDA, DEVICE, EAGER, FUSED, Case, labels, run_case, shape_params, skip_off_gpu

EAGER_FP32, FUSED_EAGER, FUSED_COMPILE = "eager fp32", "fused eager", "fused+compile"
PROVIDERS = (EAGER_FP32, EAGER, FUSED_EAGER, FUSED_COMPILE, FUSED)
NUM_LABELS, LABEL_LEN, ADAMW_BYTES_PER_PARAM = 20, 4, 28
MINTREC = dict(text=(30, 18), video=(230, 1024), audio=(480, 768), bert={})
SHAPES = {
    # name: batch, text word pieces (max, min), video (frames, dim), audio (frames, dim), BertConfig overrides
    "mintrec-b16": dict(batch=16, **MINTREC),
    "mintrec-b64": dict(batch=64, **MINTREC),
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


def optimizer_for(model, capturable: bool):
    """The trainer's AdamW (mvcl_fast.intent.build.build_optimizer): encoders at 2e-5, the rest
    at 1e-3, weight decay 0.2 on matrices; tensor learning rates when the step is captured."""
    from argparse import Namespace

    from mvcl_fast.intent.build import build_optimizer

    return build_optimizer(model, Namespace(lr=2e-5, fusion_lr=1e-3, weight_decay=0.2),
                           capturable=capturable)


def make_inputs(shape: dict, seq_len: int, vocab: int) -> dict:
    """The step's inputs on the device: label-prompt tokens padded to seq_len, zero-padded frames."""
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
    video *= (torch.arange(video_frames)[None, :] < video_lengths[:, None])[..., None]
    audio *= (torch.arange(audio_frames)[None, :] < audio_lengths[:, None])[..., None]
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask, label_start=1 + text_len,
                  video=video, video_lengths=video_lengths, audio=audio, audio_lengths=audio_lengths,
                  anchor_ids=anchor_ids)
    return {**{k: v.to(DEVICE) for k, v in inputs.items()}, "labels": labels(batch, NUM_LABELS)}


def matmul_flops(step, inputs) -> int:
    """The FLOPs torch's flop counter finds in one step (matmuls, attention, convolutions)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step(inputs)
    return counter.get_total_flops()


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape_name", shape_params(list(SHAPES), str, {"mintrec-b16": "cpu-smoke"},
                                                    {"mintrec-b16": "train_step MIntRec"}))
def test_train_step(benchmark, monkeypatch, shape_name, provider):
    from mvcl_fast.intent.step import CapturedStep, TrainingStep

    # Off the GPU (the dry run) the fused provider runs neither compiled nor captured.
    fused, captured = provider not in (EAGER_FP32, EAGER), provider == FUSED and CUDA
    compiles = provider == FUSED_COMPILE or captured
    skip_off_gpu(provider, fused=fused, compiles=compiles)
    if CUDA and shape_name == "cpu-smoke":
        pytest.skip("CPU smoke shape: on CUDA the MIntRec shapes are timed")
    if not CUDA and shape_name.startswith("mintrec"):
        pytest.skip("CUDA only: a bert-base training step takes seconds on CPU")
    pytest.importorskip("transformers")
    monkeypatch.setenv("MVCL_FAST_BACKEND", "auto" if fused else "reference")
    shape = SHAPES[shape_name]
    model, criterion, cfg = build_model(shape)
    if compiles:
        for module in [*model.streams.values(), model.coarse, *model.daf]:
            module.compile()
    optimizer = optimizer_for(model, capturable=captured)
    bf16 = provider != EAGER_FP32
    # The eager baselines let autocast cast each weight where it is used.
    step = TrainingStep(model, criterion, optimizer, amp_dtype=torch.bfloat16 if bf16 else None,
                        grad_clip=1.0, cast_weights=fused, cache=not captured)
    inputs = make_inputs(shape, cfg.seq_len, model.text_encoder.config.vocab_size)
    flops = matmul_flops(step, inputs) if CUDA else 0
    params = sum(p.numel() for p in model.parameters())
    run = CapturedStep(step, torch.device(DEVICE)) if captured else step
    run_case(benchmark, Case(
        op="train_step", shape=f"{shape_name} B={shape['batch']} L={cfg.seq_len} "
                               f"video={shape['video'][0]}x{shape['video'][1]} "
                               f"audio={shape['audio'][0]}x{shape['audio'][1]}",
        provider=provider, forward=None, whole_step=lambda: run(inputs),
        step_inputs=[model.classifier.weight], params={"B": shape["batch"], "L": cfg.seq_len},
        bytes_floor=ADAMW_BYTES_PER_PARAM * params, flops_floor=flops, x=shape["batch"],
        x_label="batch", series="mintrec" if shape_name.startswith("mintrec") else shape_name),
        warmup=CapturedStep.WARMUP_STEPS + 1 if captured else 2)
