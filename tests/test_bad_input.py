"""Bad input gets a clear error that names the argument, never garbage or a deep crash."""
import pytest
import torch

import mvcl_fast

Z = torch.randn(6, 8)
Y = torch.tensor([0, 1, 2, 0, 1, 2])


def _daf(**overrides):
    args = dict(q=torch.randn(2, 3, 8), k=torch.randn(2, 5, 8), v=torch.randn(2, 5, 8),
                gate=torch.randn(2, 3, 8), residual=torch.randn(2, 3, 8), num_heads=2)
    args.update(overrides)
    return mvcl_fast.daf_attention(**args)


CASES = [
    ("labels above range", lambda: mvcl_fast.prototype_infonce(Z, torch.tensor([0, 1, 2, 3, 9, 0]), 4),
     ValueError, r"y has label 9 outside \[0, num_classes=4\)"),
    ("negative label", lambda: mvcl_fast.batch_prototypes(Z, torch.tensor([0, -1, 2, 0, 1, 2]), 3),
     ValueError, "y has label -1"),
    ("float labels", lambda: mvcl_fast.prototype_infonce(Z, Y.float(), 3), TypeError, "y must hold integer"),
    ("bool labels", lambda: mvcl_fast.batch_prototypes(Z, Y > 0, 3), TypeError, "y must hold integer"),
    ("label count", lambda: mvcl_fast.prototype_infonce(Z, Y[:4], 3), ValueError, r"y must have shape \(6,\)"),
    ("labels as list", lambda: mvcl_fast.prototype_infonce(Z, [0, 1], 3), TypeError, "y must be a torch.Tensor"),
    ("int embeddings", lambda: mvcl_fast.prototype_infonce(Z.long(), Y, 3), TypeError, "z must be a floating"),
    ("1-D embeddings", lambda: mvcl_fast.prototype_infonce(Z[0], Y, 3), ValueError, "z must be 2-D or 3-D"),
    ("empty batch", lambda: mvcl_fast.prototype_infonce(Z[:0], Y[:0], 3), ValueError, "z is empty"),
    ("empty batch prototypes", lambda: mvcl_fast.batch_prototypes(Z[:0], Y[:0], 3), ValueError, "z is empty"),
    ("tau zero", lambda: mvcl_fast.prototype_infonce(Z, Y, 3, tau=0.0), ValueError, "tau must be a finite number > 0"),
    ("tau negative", lambda: mvcl_fast.multiview_infonce(Z, Z[None], tau=-1), ValueError, "tau must be"),
    ("tau nan", lambda: mvcl_fast.multiview_infonce(Z, Z[None], tau=float("nan")), ValueError, "tau must be"),
    ("tau tensor", lambda: mvcl_fast.multiview_infonce(Z, Z[None], tau=torch.tensor(0.1)), TypeError, "tau must be a Python float"),
    ("num_classes zero", lambda: mvcl_fast.prototype_infonce(Z, Y, 0), ValueError, "num_classes must be an int >= 1"),
    ("prototype shape", lambda: mvcl_fast.prototype_infonce(Z, Y, 3, prototypes=torch.randn(3, 5)),
     ValueError, r"prototypes must have shape \(3, 8\)"),
    ("prototype dtype", lambda: mvcl_fast.prototype_infonce(Z, Y, 3, prototypes=torch.randn(3, 8).double()),
     TypeError, "prototypes has dtype torch.float64 but z has torch.float32"),
    ("nan embeddings", lambda: mvcl_fast.prototype_infonce(Z.clone().fill_(float("nan")), Y, 3),
     ValueError, "z contains NaN or Inf"),
    ("inf prototypes", lambda: mvcl_fast.prototype_infonce(Z, Y, 3, prototypes=torch.full((3, 8), float("inf"))),
     ValueError, "prototypes contains NaN or Inf"),
    ("views shape", lambda: mvcl_fast.multiview_infonce(Z, torch.randn(2, 5, 8)), ValueError, r"views must have shape"),
    ("views list shape", lambda: mvcl_fast.multiview_infonce(Z, [Z, Z[:3]]), ValueError, r"views\[1\] must have shape"),
    ("views empty list", lambda: mvcl_fast.multiview_infonce(Z, []), ValueError, "views is an empty list"),
    ("views dtype", lambda: mvcl_fast.multiview_infonce(Z, Z[None].half()), TypeError, "views has dtype"),
    ("anchor empty", lambda: mvcl_fast.multiview_infonce(Z[:0], Z[None, :0]), ValueError, "anchor is empty"),
    ("nan views", lambda: mvcl_fast.multiview_infonce(Z, torch.full((1, 6, 8), float("nan"))),
     ValueError, "views contains NaN"),
    ("heads not dividing", lambda: _daf(num_heads=3), ValueError, "num_heads=3 must divide the model width D=8"),
    ("k shape", lambda: _daf(k=torch.randn(2, 5, 4)), ValueError, r"k must have shape \(2, 5, 8\)"),
    ("v length", lambda: _daf(v=torch.randn(2, 4, 8)), ValueError, r"v must have shape \(2, 5, 8\)"),
    ("gate shape", lambda: _daf(gate=torch.randn(2, 4, 8)), ValueError, "gate must have shape"),
    ("mask dtype", lambda: _daf(key_padding_mask=torch.zeros(2, 5)), TypeError, "key_padding_mask must be a bool"),
    ("mask shape", lambda: _daf(key_padding_mask=torch.zeros(2, 4, dtype=torch.bool)), ValueError,
     r"key_padding_mask must have shape \(2, 5\)"),
    ("residual dtype", lambda: _daf(residual=torch.randn(2, 3, 8).double()), TypeError, "residual has dtype"),
    ("nan gate", lambda: _daf(gate=torch.full((2, 3, 8), float("nan"))), ValueError, "gate contains NaN"),
    ("empty keys", lambda: _daf(k=torch.randn(2, 0, 8), v=torch.randn(2, 0, 8)), ValueError, "k is empty"),
    ("q not a tensor", lambda: _daf(q=[[1.0]]), TypeError, "q must be a torch.Tensor"),
]


@pytest.mark.parametrize("name,call,error,message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises_clear_error(name, call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_value_checks_can_be_turned_off_and_on():
    bad = Z.clone()
    bad[0, 0] = float("inf")
    mvcl_fast.multiview_infonce(bad, Z[None], validate=False)  # no check asked for: no error
    with pytest.raises(ValueError, match="anchor contains NaN or Inf"):
        mvcl_fast.multiview_infonce(bad, Z[None], validate=True)
    with pytest.raises(ValueError, match="z contains NaN or Inf"):
        mvcl_fast.prototype_infonce(bad, Y, 3, validate=True)
    mvcl_fast.prototype_infonce(bad, Y, 3, validate=False)



def test_label_range_is_checked_under_torch_compile():
    torch._dynamo.reset()
    fn = torch.compile(lambda z, y: mvcl_fast.prototype_infonce(z, y, 3), fullgraph=True, backend="aot_eager")
    with pytest.raises(Exception, match="outside"):
        fn(Z, torch.tensor([0, 1, 2, 3, 0, 0]))


def test_device_mismatch_is_named():
    meta = torch.randn(6, 8, device="meta")
    with pytest.raises(ValueError, match="y is on cpu but the embeddings are on meta"):
        mvcl_fast.prototype_infonce(meta, Y, 3)
