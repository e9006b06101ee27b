"""The bytes each fused op must move and the FLOPs it must do: the floor its times are held to.

Conventions (design.md §5):

- Bytes count every input the op cannot avoid reading once and every output it must write once,
  at ``s`` bytes per element: the microbenchmarks hold activations and weights alike in the study's
  dtype. Per-row statistics (LayerNorm mean/rstd, the softmax log-sum-exp, the ``B·H·C`` pooled
  tokens the cross-attention saves for its backward) are left out: they are small beside the
  token tensors and an implementation may recompute them.
- FLOPs count 2 per multiply-add of the products the fused algorithm must do, which is the
  minimal one (design.md §2: K and V are never formed). LayerNorm's elementwise work is counted
  for the LayerNorm op, where it is all there is; in the other two ops the LN, GELU and softmax
  elementwise work is left out, being small beside their products.
- Forward and backward are separate passes (the backward is its own launch sequence), so a
  forward+backward figure is the forward's plus the backward's: the backward reads the tokens and
  weights again, and writes the input and weight gradients.
- Every implementation of an op is held to the same floor, so "achieved" GB/s and TFLOP/s are
  ``floor / measured time``: the naive reference, which moves and computes more, simply scores lower.
"""
from __future__ import annotations

from dataclasses import dataclass

from .shapes import Case

# LayerNorm(x + residual) per element: add 1, mean 1, variance 3 (subtract, square, sum),
# normalize 2, affine 2.
LN_FWD_FLOPS_PER_ELEMENT = 9
# Its backward per element: x̂ 2, dy·γ 1, dγ 2, dβ 1, the two row means 3, dx 4, + dh 1.
LN_BWD_FLOPS_PER_ELEMENT = 14


@dataclass(frozen=True)
class Cost:
    """Bytes to move and FLOPs to do."""
    bytes: int
    flops: int

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.bytes + other.bytes, self.flops + other.flops)


def cross_attention_fwd(B: int, N: int, C: int, H: int, s: int) -> Cost:
    """CLS cross-attention forward over N patches of width C, H heads.

    Bytes: read the patches ``B·N·C`` once, the CLS token ``B·C``, the weights ``4C²``
    (q, k, v, proj) and six C-vectors (norm weight and bias, four biases); write the new CLS ``B·C``.
    FLOPs per sample: four ``C²`` products (q = Wq x̂0, k̃ = Wkᵀq, o = Wv z, y = Wo o) → ``8C²``;
    per token (the N patches and the CLS itself): H scores and H weighted sums of length C →
    ``4·H·C·(N+1)``.
    """
    return Cost(bytes=s * (B * N * C + 2 * B * C + 4 * C * C + 6 * C),
                flops=B * (8 * C * C + 4 * H * C * (N + 1)))


def cross_attention_bwd(B: int, N: int, C: int, H: int, s: int) -> Cost:
    """Its backward.

    Bytes: read the patches again (to recompute the softmax), the CLS token and dy ``2·B·C``, the
    four weights and six vectors again; write d(patches) ``B·N·C``, d(CLS) ``B·C``, four weight
    gradients ``4C²`` and six vector gradients.
    FLOPs per sample: eight ``C²`` products (dWo, do, dWv, dz, dq, dWk, dWq, dx̂0) → ``16C²``;
    per token, five H·C multiply-adds (recomputed scores, da = dz·x̂, dx̂ = a·dz + ds·k̃ (two),
    dk̃ += ds·x̂) → ``10·H·C·(N+1)``.
    """
    return Cost(bytes=s * (2 * B * N * C + 3 * B * C + 8 * C * C + 12 * C),
                flops=B * (16 * C * C + 10 * H * C * (N + 1)))


def cls_projection_fwd(B: int, c_in: int, c_out: int, s: int) -> Cost:
    """``Linear(GELU(LayerNorm(x)))`` forward on B tokens.

    Bytes: read x ``B·C_in``, the weight ``C_out·C_in``, LN weight and bias ``2·C_in``, the bias
    ``C_out``; write ``B·C_out``. FLOPs: the product, ``2·B·C_in·C_out``.
    """
    return Cost(bytes=s * (B * c_in + c_in * c_out + 2 * c_in + c_out + B * c_out),
                flops=2 * B * c_in * c_out)


def cls_projection_bwd(B: int, c_in: int, c_out: int, s: int) -> Cost:
    """Its backward.

    Bytes: read dy ``B·C_out``, x ``B·C_in``, the weight and LN weight and bias; write dx
    ``B·C_in``, dW ``C_out·C_in``, db ``C_out`` and the LN weight and bias gradients ``2·C_in``.
    FLOPs: dx̂ = dy·W and dW = dyᵀ·GELU(x̂), ``4·B·C_in·C_out``.
    """
    return Cost(bytes=s * (B * c_out + 2 * B * c_in + 2 * c_in * c_out + 4 * c_in + c_out),
                flops=4 * B * c_in * c_out)


def add_layer_norm_fwd(M: int, C: int, s: int) -> Cost:
    """``(LayerNorm(x + residual), x + residual)`` over M rows of width C.

    Bytes: read x and residual ``2·M·C``, weight and bias ``2C``; write y and the sum ``2·M·C``.
    FLOPs: ``LN_FWD_FLOPS_PER_ELEMENT · M·C``.
    """
    return Cost(bytes=s * (4 * M * C + 2 * C), flops=LN_FWD_FLOPS_PER_ELEMENT * M * C)


def add_layer_norm_bwd(M: int, C: int, s: int) -> Cost:
    """Its backward.

    Bytes: read dy, d(sum) and the saved sum ``3·M·C`` and the weight ``C``; write dx ``M·C``
    (also the residual's gradient: the same tensor) and the weight and bias gradients ``2C``.
    FLOPs: ``LN_BWD_FLOPS_PER_ELEMENT · M·C``.
    """
    return Cost(bytes=s * (4 * M * C + 3 * C), flops=LN_BWD_FLOPS_PER_ELEMENT * M * C)


def op_cost(case: Case, batch: int, elem_size: int, with_backward: bool) -> Cost:
    """The floor of ``case`` at ``batch``: forward, or forward plus backward."""
    if case.op == "cross_attention":
        dims = (batch, case.patches, case.c_in, case.heads, elem_size)
        fwd, bwd = cross_attention_fwd(*dims), cross_attention_bwd(*dims)
    elif case.op == "cls_projection":
        dims = (batch, case.c_in, case.c_out, elem_size)
        fwd, bwd = cls_projection_fwd(*dims), cls_projection_bwd(*dims)
    else:  # add_layer_norm over every token of the branch, the CLS token included
        dims = (batch * (case.patches + 1), case.c_in, elem_size)
        fwd, bwd = add_layer_norm_fwd(*dims), add_layer_norm_bwd(*dims)
    return fwd + bwd if with_backward else fwd
