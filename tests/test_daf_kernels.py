"""The fused DAF attention kernels (kernels/daf_attention.py) against the reference.

Through the public mvcl_fast.daf_attention with the Triton backend forced: on
CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set by
conftest.py), on CUDA natively. Forward output and the gradients of q, k, v,
gate and residual are compared with the float64 reference by relative error:
the kernel must be no worse than the reference in the same dtype (plus the
helpers' tolerance). Kernel outputs are allocated NaN-poisoned, so an element a
kernel forgets to write fails.
"""

import pytest
import torch

import mvcl_fast
from helpers import assert_no_worse_than_reference, poisoned_allocations
from mvcl_fast import reference

CUDA = torch.cuda.is_available()
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])

# (batch, len_q, len_k, heads, head_dim, mask): a covering subset of len_q in
# {1, 37, 80} x len_k in {1, 50, 231}, heads in {1, 8}, power-of-two and padded
# head dims. mask "random" pads ~30% of the keys and every key of batch row 1.
CASES = {
    "q1-k1-h1-d32": (2, 1, 1, 1, 32, None),
    "q1-k231-h8-d16-masked": (2, 1, 231, 8, 16, "random"),
    "q1-k50-h8-d64-masked": (2, 1, 50, 8, 64, "random"),
    "q37-k1-h1-d16": (2, 37, 1, 1, 16, None),
    "q37-k50-h1-d64-masked": (2, 37, 50, 1, 64, "random"),
    "q80-k1-h8-d16-masked": (2, 80, 1, 8, 16, "random"),
    "q37-k231-h1-d48": (2, 37, 231, 1, 48, None),
    "q37-k50-h2-d96-masked": (2, 37, 50, 2, 96, "random"),
    "q80-k50-h8-d32": (2, 80, 50, 8, 32, None),
    "q80-k231-h8-d16-masked": (2, 80, 231, 8, 16, "random"),
}


def _key_padding(batch, len_k, device):
    mask = torch.rand(batch, len_k, device=device) < 0.3
    mask[1] = True  # a batch row whose keys are all padded: attention 0, never NaN
    return mask


def _inputs(batch, len_q, len_k, dim, dtype, device):
    """q, gate, residual [B, Lq, D]; k, v [B, Lk, D], requiring grad."""
    shapes = [(batch, len_q, dim), (batch, len_k, dim), (batch, len_k, dim), (batch, len_q, dim),
              (batch, len_q, dim)]
    return [torch.randn(shape, device=device).to(dtype).requires_grad_() for shape in shapes]


def _check_against_reference(inputs, heads, mask, dtype):
    """Kernel forward and gradients vs reference in float64 (truth) and in dtype."""
    grad = torch.randn(inputs[0].shape, device=inputs[0].device).to(dtype)
    with poisoned_allocations():
        out = mvcl_fast.daf_attention(*inputs, heads, mask)
        grads = torch.autograd.grad(out, inputs, grad)
    assert out.dtype == dtype

    def reference_run(cast):
        leaves = [cast(x.detach()).requires_grad_() for x in inputs]
        ref = reference.daf_attention(*leaves, heads, mask)
        return ref, torch.autograd.grad(ref, leaves, cast(grad))

    truth, truth_grads = reference_run(torch.Tensor.double)
    same, same_grads = reference_run(lambda x: x.clone())
    assert_no_worse_than_reference("out", out, same, truth, dtype)
    for name, got, ref, true in zip(["dq", "dk", "dv", "dgate", "dresidual"], grads, same_grads, truth_grads):
        assert got.dtype == dtype and got.shape == true.shape, name
        assert_no_worse_than_reference(name, got, ref, true, dtype)
    return grads


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(case, dtype, kernel_device):
    batch, len_q, len_k, heads, head_dim, mask_kind = CASES[case]
    inputs = _inputs(batch, len_q, len_k, heads * head_dim, dtype, kernel_device)
    mask = _key_padding(batch, len_k, kernel_device) if mask_kind else None
    grads = _check_against_reference(inputs, heads, mask, dtype)
    if mask_kind:
        # Nothing flows into or out of the fully padded batch row.
        for name, grad in zip(["dq", "dk", "dv", "dgate"], grads[:4]):
            assert not grad[1].any(), name


@pytest.mark.skipif(CUDA, reason="bfloat16 runs in test_matches_reference on CUDA")
@pytest.mark.parametrize("case", ["q37-k50-h1-d64-masked", "q80-k231-h8-d16-masked"])
def test_bfloat16_in_interpreter(case, kernel_device):
    """bf16 on CPU: the interpreter has no bf16 tl.dot, so the kernels upcast the operands
    (already rounded to bf16 as the GPU's would be) to fp32 for their dots. The interpreter
    also truncates fp32 -> bf16 casts where the GPU rounds to nearest, so its error here is
    larger than on the GPU; it must still stay within the bf16 tolerance."""
    batch, len_q, len_k, heads, head_dim, _ = CASES[case]
    inputs = _inputs(batch, len_q, len_k, heads * head_dim, torch.bfloat16, kernel_device)
    _check_against_reference(inputs, heads, _key_padding(batch, len_k, kernel_device), torch.bfloat16)


def _force_tiles(monkeypatch, kernels, forward, backward):
    """Launch every kernel with these configs, on the interpreter as on CUDA."""
    monkeypatch.setattr(kernels, "CONFIGS", ((None, "fwd", None, 512, forward),
                                             (None, "bwd", None, 512, backward)))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("len_q", [37, 48], ids=lambda n: f"q{n}")
def test_smallest_tiles_many_blocks(dtype, len_q, kernel_device, monkeypatch):
    """The smallest GPU tiles (16 queries x 32 keys) forced on the forward and the backward's
    keys: rows span 8 key blocks (the online softmax rescales across them), all ragged. With
    backward row tiles of up to 64, 37 queries take three 16-row tiles that leave fp32 partial
    dK/dV between them; 48 take one 64-row tile that stores dK/dV per key tile."""
    from mvcl_fast.kernels import daf_attention as kernels

    _force_tiles(monkeypatch, kernels, kernels._Config(16, 32, 0, 4, 2, long_block_m=16),
                 kernels._Config(64, 32, 0, 4, 2))
    assert kernels._row_tile(len_q, 64) == {37: 16, 48: 64}[len_q]
    batch, len_k, heads, head_dim = 3, 231, 2, 32
    inputs = _inputs(batch, len_q, len_k, heads * head_dim, dtype, kernel_device)
    mask = _key_padding(batch, len_k, kernel_device)
    mask[0, :100] = True  # whole padded key blocks ahead of the first real key
    mask[2, 150:] = True  # and past the last one: skipped, their dK/dV written as zeros
    grads = _check_against_reference(inputs, heads, mask, dtype)
    for grad in grads[1:3]:
        assert not grad[2, 150:].any()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous_inputs(dtype, kernel_device):
    """Strided views are read in place: a strided head dim, batch-inner and offset layouts."""
    batch, len_q, len_k, heads, head_dim = 2, 37, 50, 2, 32
    dim = heads * head_dim

    def leaf(*shape):
        return torch.randn(*shape, device=kernel_device).to(dtype).requires_grad_()

    inputs = [
        leaf(batch, len_q, 2 * dim)[..., ::2],                   # head-dim stride 2
        leaf(len_k, batch, dim).transpose(0, 1),                 # batch-inner layout
        leaf(batch, len_k, dim + 8)[..., 5:5 + dim],             # padded rows, offset start
        leaf(dim, len_q, batch).permute(2, 1, 0),                # every stride permuted
        leaf(batch, 2 * len_q, dim)[:, ::2],                     # every other row
    ]
    mask = (torch.rand(len_k, batch, device=kernel_device) < 0.3).T
    mask[1] = True
    assert not any(x.is_contiguous() for x in inputs) and not mask.is_contiguous()
    _check_against_reference(inputs, heads, mask, dtype)


def test_kernel_outputs_attention_lse_and_zero_for_fully_padded_rows(kernel_device):
    """daf_attention_forward/backward directly: attn and lse as the reference's parts;
    a query with no unpadded key gets attn 0, lse -inf, out = residual, zero gradients;
    whole key tiles padded ahead of the first real key change nothing."""
    from mvcl_fast.kernels import daf_attention as kernels

    batch, len_q, len_k, heads, head_dim = 3, 20, 231, 2, 32
    q, k, v, gate, residual = [x.detach() for x in
                               _inputs(batch, len_q, len_k, heads * head_dim, torch.float32, kernel_device)]
    mask = _key_padding(batch, len_k, kernel_device)
    mask[0, :200] = True  # the first real key comes after whole padded tiles
    mask[2, :-1], mask[2, -1] = True, False  # one key left: a softmax over a single key
    with poisoned_allocations():
        out, attn, lse = kernels.daf_attention_forward(q, k, v, gate, residual, mask, heads)
        dq, dk, dv, dgate = kernels.daf_attention_backward(
            torch.randn_like(q), q, k, v, gate, mask, attn, lse, heads)
    ref_attn, ref_lse = reference.daf_attention_parts(q.double(), k.double(), v.double(), mask, heads)
    assert lse.dtype == torch.float32 and lse.shape == (batch, heads, len_q)
    torch.testing.assert_close(attn.double(), ref_attn, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-6)
    assert torch.equal(lse[1], torch.full_like(lse[1], float("-inf")))
    assert torch.isfinite(lse[[0, 2]]).all()
    assert not attn[1].any() and torch.equal(out[1], residual[1])
    torch.testing.assert_close(attn[2], v[2, -1].expand(len_q, -1))
    for grad in (dq, dk, dv, dgate):
        assert torch.isfinite(grad).all() and not grad[1].any()
    assert not dk[mask].any() and not dv[mask].any()  # padded keys get no gradient
    assert dk[0, 200:].any() and dv[0, 200:].any()


@pytest.mark.skipif(not CUDA, reason="MIntRec-sized shapes: CUDA only (the interpreter is too slow)")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_model_sized_shapes(dtype, kernel_device):
    """The DAF blocks' shape: batch 32, 80 text tokens over 710 context tokens, D=768, 12 heads."""
    batch, len_q, len_k, heads, dim = 32, 80, 710, 12, 768
    inputs = _inputs(batch, len_q, len_k, dim, dtype, kernel_device)
    # Zero-padded features: each row keeps a random prefix of its keys (row 1: none).
    lengths = torch.randint(1, len_k + 1, (batch,), device=kernel_device)
    lengths[1] = 0
    mask = torch.arange(len_k, device=kernel_device)[None, :] >= lengths[:, None]
    _check_against_reference(inputs, heads, mask, dtype)


def test_pinned_configs_follow_dtype_head_dim_and_query_length(monkeypatch):
    """Without MVCL_FAST_AUTOTUNE the launches take the pinned configs: 16-row forward tiles
    for DAF's short text side (Lq = 30-80), the largest backward row tile (up to the largest
    that compiles without spills at the head width) leaving at most a quarter of its rows
    masked, the FMA rows for IEEE fp32."""
    from mvcl_fast.kernels import daf_attention as kernels

    monkeypatch.setattr(kernels, "_config_target", lambda: "gpu")
    monkeypatch.delenv(kernels.AUTOTUNE_ENV, raising=False)

    def rows(kind, dtype, precision, head_dim, len_q):
        config = {"fwd": kernels._forward_config, "bwd": kernels._backward_config}[kind](
            dtype, precision, kernels._tile(head_dim)["BLOCK_HD"], len_q)
        return config["BLOCK_M"]

    for len_q in (30, 48, 80):
        assert rows("fwd", torch.bfloat16, "ieee", 64, len_q) == 16
    assert rows("fwd", torch.bfloat16, "ieee", 64, 300) == 32
    assert [rows("bwd", torch.bfloat16, "ieee", 64, n) for n in (1, 30, 48, 80, 300)] == [16, 32, 64, 32, 64]
    assert rows("bwd", torch.bfloat16, "ieee", 128, 80) == 32
    assert rows("bwd", torch.float32, "tf32", 64, 80) == 32
    assert rows("bwd", torch.float32, "ieee", 64, 80) == 16
    assert not kernels.autotune_requested()
    assert kernels._length_bucket(1) == 16 and kernels._length_bucket(710) == 1024
    assert kernels._length_bucket(10 ** 6) == 4096


def test_autotune_space_is_pruned_to_the_lengths():
    """MVCL_FAST_AUTOTUNE=1 searches every combination of SEARCH_SPACE, less the tiles
    longer than the bucketed sequences (the shortest kept)."""
    from mvcl_fast.kernels import daf_attention as kernels

    space = kernels._search_space("fwd")
    assert len(space) == 4 * 4 * 2 * 2
    kept = kernels._prune_to_lengths(space, {}, len_q_bucket=16, len_k_bucket=32)
    assert {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in kept} == {(16, 16), (16, 32)}
    backward = kernels._prune_to_lengths(kernels._search_space("bwd"), {}, len_q_bucket=128, len_k_bucket=1024)
    assert len(backward) == 4 * 4 * 2 * 3


@pytest.mark.skipif(CUDA, reason="the interpreter's refusal; CUDA searches for real below")
def test_autotune_needs_a_gpu(kernel_device, monkeypatch):
    monkeypatch.setenv("MVCL_FAST_AUTOTUNE", "1")
    inputs = _inputs(1, 4, 4, 16, torch.float32, kernel_device)
    with pytest.raises(RuntimeError, match="MVCL_FAST_AUTOTUNE=1 needs a GPU"):
        mvcl_fast.daf_attention(*inputs, 1)


@pytest.mark.skipif(not CUDA, reason="autotuning times configs on a GPU")
def test_autotune_searches_and_prints_its_choice(kernel_device, monkeypatch, capsys):
    monkeypatch.setenv("MVCL_FAST_AUTOTUNE", "1")
    inputs = _inputs(2, 37, 50, 64, torch.float16, kernel_device)
    _check_against_reference(inputs, 2, _key_padding(2, 50, kernel_device), torch.float16)
    printed = capsys.readouterr().out
    assert "MVCL_FAST_AUTOTUNE: daf_attention fwd" in printed and "daf_attention bwd" in printed


def test_autotuned_backward_gets_fp32_partials(monkeypatch):
    """MVCL_FAST_AUTOTUNE=1 searches the backward's row tile too: half inputs whose pinned tile
    holds every query still get fp32 dK/dV partials, in case the tuner picks a shorter tile."""
    from mvcl_fast.kernels import daf_attention as kernels

    monkeypatch.setenv(kernels.AUTOTUNE_ENV, "1")
    monkeypatch.setattr(kernels, "triton_interpreter_enabled", lambda: False)
    partials = []
    monkeypatch.setattr(kernels, "_launch", lambda name, kernel, tuner, grid, args, *rest:
                        partials.append(args[12].dtype))
    q = torch.empty(1, 48, 64, dtype=torch.bfloat16)  # one head of 64: the pinned tile is 64 rows
    assert kernels._backward_config(q.dtype, "ieee", 64, 48, "gpu")["BLOCK_M"] == 64
    kernels.daf_attention_backward(q, q, q, q, q, None, q, torch.empty(1, 1, 48), 1)
    assert partials == [torch.float32]
