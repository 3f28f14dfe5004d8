"""The references are the spec: check them against independent formulations."""
import pytest
import torch
import torch.nn.functional as F

from mvcl_fast import reference


def test_batch_prototypes_matches_scatter_reduce_and_zeroes_absent_classes():
    z = torch.randn(50, 12, dtype=torch.float64)
    y = torch.randint(0, 6, (50,))
    y[y == 4] = 5  # class 4 absent
    protos, counts = reference.batch_prototypes(z, y, 7)
    expected = torch.zeros(7, 12, dtype=torch.float64).scatter_reduce(
        0, y[:, None].expand(-1, 12), z, reduce="mean", include_self=False)
    torch.testing.assert_close(protos, expected)
    assert counts.tolist() == torch.bincount(y, minlength=7).tolist()
    assert counts.dtype == torch.int64
    assert (protos[4] == 0).all() and (protos[6] == 0).all()


def _explicit_logits(z, protos, tau, mask):
    logits = F.normalize(z, dim=-1) @ F.normalize(protos, dim=-1).T / tau
    return logits if mask is None else logits.masked_fill(~mask, float("-inf"))


def test_prototype_infonce_matches_cross_entropy():
    z = torch.randn(3, 40, 16, dtype=torch.float64)
    y = torch.randint(0, 5, (40,))
    loss = reference.prototype_infonce(z, y, 8, tau=0.2)
    protos, counts = reference.batch_prototypes(z.reshape(-1, 16), y.repeat(3), 8)
    logits = _explicit_logits(z.reshape(-1, 16), protos, 0.2, counts > 0)
    torch.testing.assert_close(loss, F.cross_entropy(logits, y.repeat(3)))


def test_prototype_infonce_with_explicit_prototypes_masks_nothing():
    z = torch.randn(20, 8, dtype=torch.float64)
    y = torch.randint(0, 3, (20,))
    bank = torch.randn(6, 8, dtype=torch.float64)
    loss = reference.prototype_infonce(z, y, 6, tau=0.5, prototypes=bank)
    torch.testing.assert_close(loss, F.cross_entropy(_explicit_logits(z, bank, 0.5, None), y))


def test_prototype_infonce_detach_stops_gradient_through_prototypes():
    z = torch.randn(10, 8, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 3, (10,))
    reference.prototype_infonce(z, y, 3, detach_prototypes=True).backward()
    detached = z.grad.clone()
    z.grad = None
    reference.prototype_infonce(z, y, 3).backward()
    assert not torch.allclose(detached, z.grad)


@pytest.mark.parametrize("symmetric", [False, True])
def test_multiview_infonce_matches_cross_entropy(symmetric):
    anchor = torch.randn(9, 16, dtype=torch.float64)
    views = torch.randn(3, 9, 16, dtype=torch.float64)
    loss = reference.multiview_infonce(anchor, views, tau=0.1, symmetric=symmetric)
    target = torch.arange(9)
    terms = []
    for view in views:
        logits = F.normalize(anchor, dim=-1) @ F.normalize(view, dim=-1).T / 0.1
        term = F.cross_entropy(logits, target)
        if symmetric:
            term = 0.5 * (term + F.cross_entropy(logits.T, target))
        terms.append(term)
    torch.testing.assert_close(loss, torch.stack(terms).mean())


def test_daf_attention_matches_sdpa_with_gate_and_residual():
    batch, len_q, len_k, heads, dim = 3, 5, 7, 4, 32
    q, gate, residual = (torch.randn(batch, len_q, dim, dtype=torch.float64) for _ in range(3))
    k, v = (torch.randn(batch, len_k, dim, dtype=torch.float64) for _ in range(2))
    mask = torch.rand(batch, len_k) < 0.3
    mask[:, 0] = False
    out = reference.daf_attention(q, k, v, gate, residual, heads, mask)

    def split(x):
        return x.reshape(batch, -1, heads, dim // heads).transpose(1, 2)

    attn = F.scaled_dot_product_attention(split(q), split(k), split(v),
                                          attn_mask=~mask[:, None, None, :])
    attn = attn.transpose(1, 2).reshape(batch, len_q, dim)
    torch.testing.assert_close(out, residual + torch.sigmoid(gate) * attn)


def test_daf_attention_matches_multihead_attention_module():
    batch, len_q, len_k, heads, dim = 2, 4, 6, 2, 8
    mha = torch.nn.MultiheadAttention(dim, heads, batch_first=True, dtype=torch.float64)
    q = torch.randn(batch, len_q, dim, dtype=torch.float64)
    kv = torch.randn(batch, len_k, dim, dtype=torch.float64)
    mask = torch.tensor([[False] * 6, [False, False, False, True, True, True]])
    expected, _ = mha(q, kv, kv, key_padding_mask=mask, need_weights=False)
    w_q, w_k, w_v = mha.in_proj_weight.chunk(3)
    b_q, b_k, b_v = mha.in_proj_bias.chunk(3)
    attn = reference.daf_attention(q @ w_q.T + b_q, kv @ w_k.T + b_k, kv @ w_v.T + b_v,
                                   torch.full_like(q, 50.0), torch.zeros_like(q), heads, mask)
    torch.testing.assert_close(mha.out_proj(attn), expected)


def test_daf_attention_fully_padded_rows_give_zero_attention_and_finite_grads():
    q = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 4, 8, dtype=torch.float64, requires_grad=True)
    gate = torch.randn(2, 3, 8, dtype=torch.float64)
    residual = torch.randn(2, 3, 8, dtype=torch.float64)
    mask = torch.tensor([[True] * 4, [False, True, False, True]])
    out = reference.daf_attention(q, k, k, gate, residual, 2, mask)
    torch.testing.assert_close(out[0], residual[0])
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()
    assert (q.grad[0] == 0).all()


def test_half_inputs_return_input_dtype():
    z = torch.randn(8, 16, dtype=torch.bfloat16)
    y = torch.randint(0, 3, (8,))
    assert reference.prototype_infonce(z, y, 3).dtype == torch.bfloat16
    assert reference.multiview_infonce(z, z[None]).dtype == torch.bfloat16
    q = torch.randn(1, 2, 16, dtype=torch.float16)
    assert reference.daf_attention(q, q, q, q, q, 2).dtype == torch.float16


def test_reference_gradcheck():
    z = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 1, 3, 0, 1])
    assert torch.autograd.gradcheck(lambda z: reference.prototype_infonce(z, y, 4, 0.5), (z,))
    assert torch.autograd.gradcheck(lambda z: reference.batch_prototypes(z, y, 4)[0], (z,))
    views = torch.randn(2, 6, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, v: reference.multiview_infonce(a, v, 0.5, symmetric=True), (z, views))
    q = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    kv = torch.randn(2, 5, 4, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[False, False, True, False, True], [True] * 5])
    assert torch.autograd.gradcheck(
        lambda q, kv: reference.daf_attention(q, kv, kv, q, q, 2, mask), (q, kv))
