"""MVCL-DAF++ model: shapes, gradients, masking, label prompts, the fused-op path.

A tiny random BERT (hidden 32, 2 layers) saved to a temporary folder stands in
for all-MiniLM-L6-v2, so these tests never load the real checkpoint.
"""
from __future__ import annotations

import string

import pytest
import torch

import mvcl_fast
import mvcl_fast.intent.model as model_lib
from mvcl_fast.intent.loading import model_inputs
from mvcl_fast.intent.model import (LabelPrompter, ModelConfig, MVCLDAFPlusPlus, MVCLLoss, load_text_encoder,
                             parse_modalities, slot_mean)

LABELS = ("Complain", "Praise", "Ask for help", "Thank")
WORDS = "i am so sorry thank you for the help can you ask me oh really okay fine that is great".split()


def make_tiny_bert(folder) -> str:
    """A random 2-layer BERT (hidden 32) and a WordPiece vocabulary that spells any lowercase word."""
    from transformers import BertConfig, BertModel, BertTokenizer

    letters = list(string.ascii_lowercase)
    words = sorted(set(WORDS) | {w for name in LABELS for w in name.lower().split()})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *string.punctuation, *letters,
             *[f"##{c}" for c in letters], *words]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer(str(folder / "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=64, max_position_embeddings=128)
    BertModel(config).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> str:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def prompter(tiny_bert) -> LabelPrompter:
    tokenizer, _ = load_text_encoder(tiny_bert)
    return LabelPrompter(tokenizer, LABELS, max_text_tokens=6)


def build(tiny_bert, prompter, modalities=("text", "video", "audio"), **overrides):
    cfg = ModelConfig(num_labels=len(LABELS), label_len=prompter.label_len,
                      max_text_tokens=prompter.max_text_tokens, video_dim=10, audio_dim=12,
                      text_model=tiny_bert, modalities=modalities, video_width=16, video_heads=2,
                      audio_width=16, align_hidden=8, fusion_heads=4, **overrides)
    torch.manual_seed(0)
    return MVCLDAFPlusPlus(cfg)


def batch(prompter, n=5, video_len=7, audio_len=9):
    texts = ["oh really", "i am so sorry", "thank you so much for the help", "okay", "can you help me"]
    labels = torch.tensor([0, 1, 2, 3, 2])[:n]
    tokens = prompter.encode(texts[:n], labels)
    g = torch.Generator().manual_seed(1)
    video_lengths = torch.tensor([7, 3, 1, 5, 6])[:n]
    audio_lengths = torch.tensor([9, 4, 2, 9, 1])[:n]
    inputs = dict(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                  label_start=tokens["label_start"],
                  video=torch.randn(n, video_len, 10, generator=g), video_lengths=video_lengths,
                  audio=torch.randn(n, audio_len, 12, generator=g), audio_lengths=audio_lengths)
    for name, lengths in (("video", video_lengths), ("audio", audio_lengths)):
        pad = torch.arange(inputs[name].shape[1])[None, :] >= lengths[:, None]
        inputs[name] = inputs[name].masked_fill(pad[..., None], 0.0)   # zero padding, as the data
    return inputs, tokens["anchor_ids"], labels


def test_label_prompter_layout(tiny_bert, prompter):
    tok = prompter.tokenizer
    assert prompter.label_len == 3          # "ask for help"
    assert prompter.seq_len == 6 + 3 + 2
    out = prompter.encode(["oh really", "thank you so much for the help"], torch.tensor([2, 1]))
    ids, anchor, mask, start = out["input_ids"], out["anchor_ids"], out["attention_mask"], out["label_start"]
    assert ids.shape == anchor.shape == mask.shape == (2, prompter.seq_len)
    oh_really = tok.convert_tokens_to_ids(tok.tokenize("oh really"))
    assert ids[0].tolist() == [tok.cls_token_id, *oh_really, *[tok.mask_token_id] * 3, tok.sep_token_id,
                               *[tok.pad_token_id] * (prompter.seq_len - len(oh_really) - 5)]
    assert start.tolist() == [1 + len(oh_really), 1 + 6]    # the second text is truncated to 6 pieces
    ask_for_help = tok.convert_tokens_to_ids(["ask", "for", "help"])
    assert anchor[0, 3:6].tolist() == ask_for_help
    praise = tok.convert_tokens_to_ids(tok.tokenize("praise"))
    slots = anchor[1, 7:10].tolist()
    assert slots == praise + [tok.pad_token_id] * (3 - len(praise))
    # Outside the label slots the two inputs are the same text; both share one attention mask.
    outside = torch.ones_like(ids, dtype=torch.bool)
    for i, s in enumerate(start.tolist()):
        outside[i, s:s + 3] = False
    assert torch.equal(ids[outside], anchor[outside])
    assert mask.sum(1).tolist() == [1 + len(oh_really) + 3 + 1, prompter.seq_len]


def test_without_text_the_encoder_reads_the_label_prompt_alone(prompter):
    tok = prompter.tokenizer
    tokens = prompter.encode(["oh really", "thank you so much for the help"], torch.tensor([2, 1]))
    for modalities, blank in ((("text", "video"), "text"), (("video",), None)):
        got = model_inputs(tokens, {"index": torch.tensor([1, 0]), "video": torch.zeros(2, 3, 4),
                                    "video_length": torch.tensor([3, 2])},
                           modalities, torch.device("cpu"), with_anchor=True, blank=blank)
        assert got["input_ids"].tolist() == [[tok.cls_token_id, *[tok.mask_token_id] * 3,
                                              tok.sep_token_id]] * 2
        praise = tok.convert_tokens_to_ids(tok.tokenize("praise"))
        assert got["anchor_ids"].tolist() == [
            [tok.cls_token_id, *praise, *[tok.pad_token_id] * (3 - len(praise)), tok.sep_token_id],
            [tok.cls_token_id, *tok.convert_tokens_to_ids(["ask", "for", "help"]), tok.sep_token_id]]
        assert got["attention_mask"].tolist() == [[1] * 5] * 2 and got["label_start"].tolist() == [1, 1]


def test_slot_mean_reads_the_label_slots():
    hidden = torch.arange(2 * 6 * 3, dtype=torch.float32).reshape(2, 6, 3)
    got = slot_mean(hidden, torch.tensor([1, 3]), 2)
    assert torch.equal(got, torch.stack([hidden[0, 1:3].mean(0), hidden[1, 3:5].mean(0)]))


def packed_lstm(lstm, x, lengths):
    """run_lstm's function as packing computes it: the reference it must equal."""
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    return pad_packed_sequence(lstm(packed)[0], batch_first=True, total_length=x.shape[1])[0]


@pytest.mark.parametrize("seed", range(3))
def test_lstm_without_packing_equals_the_packed_lstm_in_float64(seed):
    """Random lengths (1 and full length among them): outputs, and the gradients of the input
    and of every weight, equal the packed LSTM's; padded frames are zero."""
    g = torch.Generator().manual_seed(seed)
    batch, frames, width, hidden = 6, 11, 5, 4
    lstm = torch.nn.LSTM(width, hidden, batch_first=True, bidirectional=True).double()
    lengths = torch.randint(1, frames + 1, (batch,), generator=g)
    lengths[:2] = torch.tensor([1, frames])
    x = torch.randn(batch, frames, width, generator=g, dtype=torch.float64)
    upstream = torch.randn(batch, frames, 2 * hidden, generator=g, dtype=torch.float64)
    results = []
    for run in (packed_lstm, model_lib.run_lstm):
        inputs = x.clone().requires_grad_()
        lstm.zero_grad()
        out = run(lstm, inputs, lengths)
        (out * upstream).sum().backward()
        results.append((out, inputs.grad, [p.grad.clone() for p in lstm.parameters()]))
    (want, want_dx, want_dw), (got, got_dx, got_dw) = results
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_dx, want_dx, rtol=1e-12, atol=1e-12)
    for name, got_p, want_p in zip([n for n, _ in lstm.named_parameters()], got_dw, want_dw):
        torch.testing.assert_close(got_p, want_p, rtol=1e-12, atol=1e-12, msg=name)
    padded = torch.arange(frames)[None, :] >= lengths[:, None]
    assert not got[padded].any()


def test_lstm_work_does_not_depend_on_the_lengths():
    """The same ops on the same shapes whatever the lengths: no per-frame or per-length work."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append((str(func), tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor))))
            return func(*args, **(kwargs or {}))

    lstm = torch.nn.LSTM(3, 2, batch_first=True, bidirectional=True)
    traces = []
    for lengths in (torch.tensor([1, 9, 4]), torch.tensor([9, 9, 9])):
        lstm.zero_grad(set_to_none=True)
        with Ops() as mode:
            model_lib.run_lstm(lstm, torch.randn(3, 9, 3), lengths).sum().backward()
        traces.append(mode.ops)
    assert traces[0] == traces[1]


def test_weights_cast_once_compute_what_autocast_computes(tiny_bert, prompter):
    """A bf16 autocast step with WeightCast (one cast of every linear weight, through
    functional_call) gives bitwise the loss and every gradient of plain autocast, which casts
    each weight where it is used; frozen or unused weights get no gradient either way."""
    from mvcl_fast.intent.step import WeightCast

    inputs, anchor_ids, labels = batch(prompter)
    results = []
    for cast_once in (False, True):
        model = build(tiny_bert, prompter).train()
        model.classifier.weight.requires_grad_(False)
        loss_fn = MVCLLoss(len(LABELS))
        cast = WeightCast(model, torch.bfloat16)
        torch.manual_seed(3)     # the same dropout masks
        with torch.autocast("cpu", dtype=torch.bfloat16):
            kwargs = {**inputs, "anchor_ids": anchor_ids}
            out = (torch.func.functional_call(model, cast(), (), kwargs) if cast_once
                   else model(**kwargs))
            loss = loss_fn(out, labels)[0]
        loss.backward()
        results.append((loss, {n: p.grad for n, p in model.named_parameters()}, cast.names))
    (want, want_grads, _), (got, got_grads, names) = results
    assert "classifier.weight" not in names and "text_encoder.encoder.layer.0.attention.self.query.weight" in names
    assert torch.equal(got, want)
    for name, grad in want_grads.items():
        assert (grad is None) == (got_grads[name] is None), name
        assert grad is None or torch.equal(got_grads[name], grad), name


def test_parse_modalities():
    assert parse_modalities("audio, text") == ("text", "audio")
    assert parse_modalities("audio,video") == ("video", "audio")
    with pytest.raises(ValueError, match="no modality given"):
        parse_modalities(" , ")
    with pytest.raises(ValueError, match="unknown modality depth"):
        parse_modalities("text,depth")


@pytest.mark.parametrize("modalities", ["text", "text,video", "text,audio", "text,video,audio",
                                        "video,audio", "audio"])
def test_forward_backward_shapes(tiny_bert, prompter, modalities):
    model = build(tiny_bert, prompter, modalities)
    inputs, anchor_ids, labels = batch(prompter)
    out = model(**inputs, anchor_ids=anchor_ids)
    width = model.text_encoder.config.hidden_size
    present = parse_modalities(modalities)
    assert out.logits.shape == (5, len(LABELS))
    # without text there is no text view: the prompt alone reads the same for every utterance
    assert list(out.views) == [m for m in ("text", "video", "audio") if m in present] + ["fused"]
    assert all(v.shape == (5, width) for v in out.views.values())
    assert out.anchor.shape == (5, width)
    assert set(model.streams) == set(present) - {"text"}
    assert (model.coarse is None) == (present == ("text",))

    loss, parts = MVCLLoss(len(LABELS))(out, labels)
    assert set(parts) == {"ce", "proto", "mv"} and torch.isfinite(loss)
    loss.backward()
    groups = {"text_encoder": model.text_encoder, "anchor_encoder": model.anchor_encoder,
              "daf": model.daf, "classifier": model.classifier, **dict(model.streams.items())}
    for name, module in groups.items():
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads), f"no gradient reaches {name}"


def test_loss_terms_with_zero_weight_are_skipped(tiny_bert, prompter):
    model = build(tiny_bert, prompter)
    inputs, _, labels = batch(prompter)
    out = model(**inputs)          # no anchor_ids: the anchor encoder does not run
    assert out.anchor is None
    loss, parts = MVCLLoss(len(LABELS), lambda_proto=0.0, lambda_mv=0.0)(out, labels)
    assert set(parts) == {"ce"} and torch.equal(loss, parts["ce"])
    with pytest.raises(ValueError, match="anchor"):
        MVCLLoss(len(LABELS), lambda_mv=1.0)(out, labels)


def test_loss_combines_the_ops(tiny_bert, prompter):
    model = build(tiny_bert, prompter)
    inputs, anchor_ids, labels = batch(prompter)
    out = model(**inputs, anchor_ids=anchor_ids)
    loss, parts = MVCLLoss(len(LABELS), lambda_proto=0.5, lambda_mv=2.0, tau=0.2)(out, labels)
    proto = mvcl_fast.prototype_infonce(torch.stack([out.views["fused"], out.views["text"]]), labels,
                                        len(LABELS), 0.2)
    mv = mvcl_fast.multiview_infonce(out.anchor, torch.stack(
        [out.views[k] for k in ("text", "video", "audio", "fused")]), 0.2)
    torch.testing.assert_close(parts["proto"], proto)
    torch.testing.assert_close(parts["mv"], mv)
    torch.testing.assert_close(loss, parts["ce"] + 0.5 * proto + 2.0 * mv)


def test_prediction_never_reads_the_label(tiny_bert, prompter):
    model = build(tiny_bert, prompter).eval()
    inputs, anchor_ids, _ = batch(prompter)
    with torch.no_grad():
        plain = model(**inputs).logits
        with_anchor = model(**inputs, anchor_ids=anchor_ids).logits
    assert torch.equal(plain, with_anchor)


def test_padding_is_masked_everywhere(tiny_bert, prompter):
    """Whatever sits in padded frames or after the text cannot change the output."""
    model = build(tiny_bert, prompter).eval()
    inputs, _, _ = batch(prompter, n=2)      # short texts, so the batch has trailing text padding
    noisy = dict(inputs)
    for name in ("video", "audio"):
        pad = torch.arange(inputs[name].shape[1])[None, :] >= inputs[f"{name}_lengths"][:, None]
        noisy[name] = inputs[name] + 100.0 * pad[..., None] * torch.randn_like(inputs[name])
    # Trimming the trailing text padding (as the trainer does per batch) changes nothing either.
    keep = int(inputs["attention_mask"].sum(1).max())
    noisy["input_ids"] = inputs["input_ids"][:, :keep]
    noisy["attention_mask"] = inputs["attention_mask"][:, :keep]
    assert keep < inputs["input_ids"].shape[1]
    with torch.no_grad():
        a, b = model(**inputs), model(**noisy)
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-5, atol=1e-5)
    for name in a.views:
        torch.testing.assert_close(a.views[name], b.views[name], rtol=1e-5, atol=1e-5)


def test_daf_blocks_call_the_fused_op(tiny_bert, prompter, monkeypatch):
    model = build(tiny_bert, prompter).eval()
    inputs, _, _ = batch(prompter)
    calls = []
    real = model_lib.daf_attention

    def spy(q, k, v, gate, residual, num_heads, key_padding_mask=None, **kw):
        calls.append((q.shape, k.shape, num_heads, key_padding_mask))
        return real(q, k, v, gate, residual, num_heads, key_padding_mask=key_padding_mask, **kw)

    monkeypatch.setattr(model_lib, "daf_attention", spy)
    with torch.no_grad():
        model(**inputs)
    seq_len = prompter.seq_len
    assert len(calls) == model.cfg.daf_blocks == 2
    for q_shape, k_shape, heads, mask in calls:
        assert q_shape == (5, seq_len, 32) and heads == 4
        # keys = [global context (text positions); video frames; audio frames]
        assert k_shape == (5, seq_len + 7 + 9, 32)
        text_pad = inputs["attention_mask"] == 0
        video_pad = torch.arange(7)[None, :] >= inputs["video_lengths"][:, None]
        audio_pad = torch.arange(9)[None, :] >= inputs["audio_lengths"][:, None]
        assert torch.equal(mask, torch.cat([text_pad, video_pad, audio_pad], dim=1))


def test_text_only_fusion_sees_only_text(tiny_bert, prompter, monkeypatch):
    model = build(tiny_bert, prompter, "text").eval()
    inputs, _, _ = batch(prompter)
    seen = []
    real = model_lib.daf_attention
    monkeypatch.setattr(model_lib, "daf_attention",
                        lambda q, k, *a, **kw: seen.append(k.shape) or real(q, k, *a, **kw))
    with torch.no_grad():
        out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                    label_start=inputs["label_start"])
    assert seen == [(5, prompter.seq_len, 32)] * 2 and out.logits.shape == (5, len(LABELS))
    assert sum(p.numel() for p in model.streams.parameters()) == 0


def test_missing_modality_input_is_a_clear_error(tiny_bert, prompter):
    model = build(tiny_bert, prompter, "text,video")
    inputs, _, _ = batch(prompter)
    del inputs["video"]
    with pytest.raises(ValueError, match="built with video"):
        model(**inputs)


def test_pooler_starts_from_the_checkpoint(tiny_bert, prompter):
    model = build(tiny_bert, prompter)
    _, encoder = load_text_encoder(tiny_bert)
    assert torch.equal(model.pooler[0].weight, encoder.pooler.dense.weight)
    assert model.text_encoder.pooler is None and model.anchor_encoder.pooler is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: lengths on the CPU, model on the GPU")
def test_cpu_lengths_with_a_cuda_model(tiny_bert, prompter):
    model = build(tiny_bert, prompter).cuda()
    inputs, anchor_ids, _ = batch(prompter)
    inputs = {k: v if k.endswith("_lengths") else v.cuda() for k, v in inputs.items()}
    out = model(**inputs, anchor_ids=anchor_ids.cuda())
    assert out.logits.is_cuda and torch.isfinite(out.logits).all()


def loss_input(num_classes: int, labels, dim: int = 4):
    """A ModelOutput with random fused and text views for labels (what MVCLLoss reads)."""
    labels = torch.tensor(labels)
    views = {"text": torch.randn(len(labels), dim), "fused": torch.randn(len(labels), dim)}
    return model_lib.ModelOutput(torch.randn(len(labels), num_classes), views, None), labels


def test_ema_prototype_bank_update_rule_and_when_the_loss_reads_it():
    classes, momentum = 3, 0.75
    loss_fn = MVCLLoss(classes, lambda_mv=0, prototypes="ema", momentum=momentum, embedding_dim=4)
    batches = [loss_input(classes, y) for y in ([0, 1, 1, 0], [1, 2, 2, 1], [2, 0, 1, 1])]

    def pooled(out, labels):
        return torch.stack([out.views["fused"], out.views["text"]]), labels

    def means(out, labels):
        views, y = pooled(out, labels)
        return mvcl_fast.batch_prototypes(views.reshape(-1, 4), y.repeat(2), classes)[0]

    (out1, y1), (out2, y2), (out3, y3) = batches
    _, parts = loss_fn(out1, y1)
    # no bank row yet for class 2: the batch prototypes, as prototypes="batch" uses
    torch.testing.assert_close(parts["proto"], mvcl_fast.prototype_infonce(*pooled(out1, y1), classes))
    loss_fn.update_prototype_bank(out1, y1)
    first = means(out1, y1)
    assert torch.equal(loss_fn.prototype_seen, torch.tensor([True, True, False]))
    assert torch.equal(loss_fn.prototype_bank[:2], first[:2]) and not loss_fn.prototype_bank[2].any()
    assert not loss_fn.bank_ready()

    loss_fn(out2, y2)
    loss_fn.update_prototype_bank(out2, y2)
    second = means(out2, y2)
    expected = torch.stack([first[0], momentum * first[1] + (1 - momentum) * second[1], second[2]])
    torch.testing.assert_close(loss_fn.prototype_bank, expected)
    assert loss_fn.bank_ready()

    # every class seen: the loss scores against the bank, every class a candidate
    _, parts = loss_fn(out3, y3)
    torch.testing.assert_close(parts["proto"], mvcl_fast.prototype_infonce(
        *pooled(out3, y3), classes, prototypes=expected))

    # the bank is state: a fresh loss that loads it reads it at once, and forgets it on reload
    state = loss_fn.state_dict()
    assert set(state) == {"prototype_bank", "prototype_seen", "bank_in_use"} and state["bank_in_use"]
    fresh = MVCLLoss(classes, lambda_mv=0, prototypes="ema", embedding_dim=4)
    fresh.load_state_dict(state)
    assert fresh.bank_ready() and torch.equal(fresh.prototype_bank, expected)
    fresh.load_state_dict(MVCLLoss(classes, prototypes="ema", embedding_dim=4).state_dict())
    assert not fresh.bank_ready()


def test_a_deferred_bank_check_reads_the_bank_from_the_next_check_on():
    """check_bank_every_step=False (the trainer's): forward makes no host sync for the bank; the
    loss reads it from the first check_bank() after every class was seen."""
    loss_fn = MVCLLoss(2, lambda_mv=0, prototypes="ema", embedding_dim=4, check_bank_every_step=False)
    loss_fn.update_prototype_bank(*loss_input(2, [0, 1]))
    assert not loss_fn.bank_ready() and not loss_fn.bank_in_use
    loss_fn.check_bank()
    assert loss_fn.bank_ready() and loss_fn.bank_in_use


def test_ema_bank_waits_only_for_the_classes_the_training_data_holds():
    loss_fn = MVCLLoss(3, lambda_mv=0, prototypes="ema", embedding_dim=4,
                       bank_classes=torch.tensor([True, True, False]))
    loss_fn.update_prototype_bank(*loss_input(3, [0, 1]))
    assert loss_fn.bank_ready()


def test_batch_prototypes_keep_no_state_and_bad_bank_options_are_refused():
    loss_fn = MVCLLoss(3)
    assert loss_fn.state_dict() == {} and not loss_fn.bank_ready()
    loss_fn.update_prototype_bank(*loss_input(3, [0, 1]))    # nothing to update
    with pytest.raises(ValueError, match="prototypes must be one of"):
        MVCLLoss(3, prototypes="mean")
    with pytest.raises(ValueError, match="momentum must be in"):
        MVCLLoss(3, prototypes="ema", momentum=1.0, embedding_dim=4)
    with pytest.raises(ValueError, match="needs embedding_dim"):
        MVCLLoss(3, prototypes="ema")
