"""The PyTorch backend: the per-backend primitives written with plain torch ops.

Every backend (``torch``, ``triton``, ``cuda``) implements the same seven primitives with the same
signatures and output dtypes; the custom ops in :mod:`crossvit_fast.ops` compose them with the
small per-sample products. This module is also the readable statement of the math (design.md §2).

Conventions shared by all backends:

* activations (``x``, ``x0``, ``patches``, ``dy``) come in one dtype ``T`` (fp32, fp16 or bf16),
  except LayerNorm's ``x`` and ``residual``, which may differ (``T`` is their promotion), and
  its ``y`` and ``dy``, which are in ``out_dtype`` where the forward was given one;
  parameters and ``kt``/``dz`` may be of any float dtype and are read as fp32;
* statistics (``mean``, ``rstd``, ``lse``), ``z`` and every parameter gradient are returned in
  fp32 (float64 when the activations are float64: the tests' reference precision); activation
  gradients and ``y``/``h`` are returned in ``T``;
* ``kt`` and ``dz`` may be strided views (e.g. ``[B, H, C]`` transposes of heads-first products);
* ``patches`` may be a strided view (e.g. ``tokens[:, 1:]``) and may have ``N == 0`` tokens.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

_INV_SQRT2 = 1.0 / math.sqrt(2.0)


def _acc(t: Tensor) -> Tensor:
    """``t`` in the accumulation dtype: float64 stays float64, everything else becomes fp32."""
    return t if t.dtype == torch.float64 else t.float()


def _acc_of(t: Tensor, activations: Tensor) -> Tensor:
    """``t`` (a parameter, ``kt``, ``dz``...) in the accumulation dtype of ``activations``, which
    may differ from ``t``'s own (e.g. fp32 parameters with float64 rows)."""
    return t.to(torch.float64 if activations.dtype == torch.float64 else torch.float32)


def normalize(x: Tensor, eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    """``(n, mean, rstd)`` of LayerNorm over the last dim, ``n = (x - mean) * rstd`` (one ATen op)."""
    n, mean, rstd = torch.native_layer_norm(_acc(x), (x.shape[-1],), None, None, eps)
    return n, mean.squeeze(-1), rstd.squeeze(-1)


def layer_normed(x: Tensor, gamma: Tensor, beta: Tensor, eps: float) -> Tensor:
    """``γ ⊙ n + β``, the LayerNorm of the rows of ``x`` in the accumulation dtype: the tokens
    the scores and the weighted sum read. The width comes from ``γ``: a traced input's shape
    would not be a constant to ONNX's TorchScript exporter."""
    return F.layer_norm(_acc(x), gamma.shape, gamma, beta, eps)


def layer_norm_input_grad(dn: Tensor, n: Tensor, rstd: Tensor) -> Tensor:
    """Gradient through ``n = (x - mean) * rstd`` given ``dn = dL/dn`` (all fp32)."""
    mean_dn = dn.mean(dim=-1, keepdim=True)
    mean_dn_n = (dn * n).mean(dim=-1, keepdim=True)
    return (dn - mean_dn - n * mean_dn_n) * rstd.unsqueeze(-1)


# ---------------------------------------------------------------------------------------------
# CLS attention pooling: the token pass of the single-query cross-attention.
# ---------------------------------------------------------------------------------------------

def attn_pool_fwd(x0: Tensor, patches: Tensor, kt: Tensor, gamma: Tensor, beta: Tensor,
                  eps: float, dot_dtype: Optional[torch.dtype] = None) -> Tuple[Tensor, Tensor]:
    """Softmax-weighted mean of the LayerNorm-ed tokens ``[x0 ‖ patches]``, one per head.

    With ``x̂_j = γ ⊙ n_j + β`` (LayerNorm of token j) and scores ``s_hj = kt_h · x̂_j``:
    returns ``z[b, h] = Σ_j softmax_j(s_h)_j x̂_j`` (``[B, H, C]``) and ``lse[b, h] =
    logsumexp_j s_hj`` (``[B, H]``). ``x0``: ``[B, C]``; ``patches``: ``[B, N, C]``;
    ``kt``: ``[B, H, C]``. The CLS token and the patches are read separately, never concatenated.
    ``dot_dtype`` allows fp16/bf16 products for fp32 tokens (under autocast); this backend
    computes in fp32 regardless.
    """
    kt, gamma, beta = (_acc_of(t, x0) for t in (kt, gamma, beta))
    xhat0, xhat = (layer_normed(t, gamma, beta, eps) for t in (x0.unsqueeze(1), patches))
    # bmm and broadcasts, not einsum: einsum reshapes the heads-first kt view, and under export
    # with a symbolic batch that copy-or-view choice pins the batch to 1 (ONNX from a batch of 1)
    s0 = (kt * xhat0).sum(dim=-1, keepdim=True)                     # [B, H, 1]
    s = torch.bmm(kt, xhat.transpose(1, 2))                         # [B, H, N]
    lse = torch.logsumexp(torch.cat([s0, s], dim=-1), dim=-1)       # scores only: [B, H, N + 1]
    z = torch.exp(s0 - lse.unsqueeze(-1)) * xhat0 + torch.bmm(torch.exp(s - lse.unsqueeze(-1)), xhat)
    return z, lse


def attn_pool_bwd(dz: Tensor, x0: Tensor, patches: Tensor, kt: Tensor, gamma: Tensor,
                  beta: Tensor, z: Tensor, lse: Tensor, eps: float,
                  dot_dtype: Optional[torch.dtype] = None
                  ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Backward of :func:`attn_pool_fwd` given ``dz = dL/dz``.

    Recomputes the probabilities from ``lse``; returns ``(dx0 [B, C] T, dpatches [B, N, C] T,
    dkt [B, H, C], dgamma [C], dbeta [C])``. Per head, with ``δ_h = dz_h · z_h``:
    ``ds_hj = a_hj (dz_h · x̂_j − δ_h)``, ``dx̂_j = Σ_h (a_hj dz_h + ds_hj kt_h)``,
    ``dkt_h = Σ_j ds_hj x̂_j``, then LayerNorm's backward per token.
    """
    g, b_, kt, dz, z, lse = (_acc_of(t, x0) for t in (gamma, beta, kt, dz, z, lse))
    delta = (dz * z).sum(dim=-1, keepdim=True)                      # [B, H, 1]

    def token_grads(x: Tensor):
        n, _, rstd = normalize(x, eps)
        xhat = n * g + b_
        a = torch.exp(torch.einsum("bhc,bnc->bhn", kt, xhat) - lse.unsqueeze(-1))
        ds = a * (torch.einsum("bhc,bnc->bhn", dz, xhat) - delta)
        dxhat = torch.einsum("bhn,bhc->bnc", a, dz) + torch.einsum("bhn,bhc->bnc", ds, kt)
        dx = layer_norm_input_grad(dxhat * g, n, rstd)
        return (dx.to(x.dtype), torch.einsum("bhn,bnc->bhc", ds, xhat),
                (dxhat * n).sum(dim=(0, 1)), dxhat.sum(dim=(0, 1)))

    dx0, dkt0, dg0, db0 = token_grads(x0.unsqueeze(1))
    dp, dktp, dgp, dbp = token_grads(patches)
    return dx0.squeeze(1), dp, dkt0 + dktp, dg0 + dgp, db0 + dbp


# ---------------------------------------------------------------------------------------------
# LayerNorm with an optional residual add folded in.
# ---------------------------------------------------------------------------------------------

def layer_norm_fwd(x: Tensor, residual: Optional[Tensor], weight: Tensor, bias: Tensor,
                   eps: float, out_dtype: Optional[torch.dtype] = None
                   ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``h = x + residual`` (rounded to ``T``; ``h = x`` without residual), ``y = LN(h)``.

    ``x``, ``residual``: ``[M, C]``, possibly of two dtypes (``T`` is then their promotion, as
    for ``x + residual``). Returns ``(y [M, C] T, h [M, C] T, mean [M], rstd [M])``, ``y`` in
    ``out_dtype`` instead where given.
    Runs ATen's native LayerNorm kernel (fp32 statistics for fp16/bf16 rows).
    """
    # contiguous like every backend's outputs (ATen's add and LayerNorm follow a permuted x's layout)
    h = (x if residual is None else x + residual).contiguous()
    acc = _acc(h).dtype
    # fp16/bf16 rows go up to fp32 first: ATen's CUDA kernel wants weights of the input's dtype,
    # and rounding the fp32 affine parameters down would add an error timm does not have.
    y, mean, rstd = torch.native_layer_norm(_acc(h), weight.shape, weight.to(acc), bias.to(acc), eps)
    return y.to(out_dtype or h.dtype), h, mean.squeeze(-1), rstd.squeeze(-1)


def layer_norm_bwd(dy: Tensor, dh: Optional[Tensor], h: Tensor, weight: Tensor, mean: Tensor,
                   rstd: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Backward of :func:`layer_norm_fwd`; ``dh`` is the gradient reaching ``h`` directly.

    Returns ``(dx [M, C] T, dweight [C], dbias [C])``; ``dresidual`` equals ``dx``.
    """
    acc = _acc(h).dtype
    # the gradients in h's accumulation dtype, whatever theirs (y may be written in another one)
    dy = dy.to(acc)
    dx, dweight, _ = torch.ops.aten.native_layer_norm_backward(
        dy.contiguous(), _acc(h).contiguous(), [h.shape[-1]], mean.to(acc).unsqueeze(-1), rstd.to(acc).unsqueeze(-1),
        weight.to(acc), None, [True, True, False])
    if dh is not None:
        dx = dx.add_(dh.to(acc))   # in place: dx keeps its contiguous layout
    return dx.to(h.dtype), dweight, dy.sum(dim=0)


# ---------------------------------------------------------------------------------------------
# CLS projection: LayerNorm -> GELU (erf) -> Linear.
# ---------------------------------------------------------------------------------------------

def _gelu_and_grad(u: Tensor) -> Tuple[Tensor, Tensor]:
    cdf = 0.5 * (1.0 + torch.erf(u * _INV_SQRT2))
    pdf = torch.exp(-0.5 * u * u) * (_INV_SQRT2 / math.sqrt(math.pi))
    return u * cdf, cdf + u * pdf


def cls_proj_fwd(x: Tensor, ln_weight: Tensor, ln_bias: Tensor, weight: Tensor, bias: Tensor,
                 eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    """``y = GELU(LN(x)) @ weight.T + bias``; ``x``: ``[M, Cin]``, ``weight``: ``[Cout, Cin]``.

    Returns ``(y [M, Cout] T, mean [M], rstd [M])``.
    """
    acc = _acc(x)
    u, mean, rstd = torch.native_layer_norm(acc, ln_weight.shape, ln_weight.to(acc.dtype),
                                            ln_bias.to(acc.dtype), eps)
    y = F.linear(F.gelu(u), weight.to(acc.dtype), bias.to(acc.dtype))
    return y.to(x.dtype), mean.squeeze(-1), rstd.squeeze(-1)


def cls_proj_bwd(dy: Tensor, x: Tensor, ln_weight: Tensor, ln_bias: Tensor, weight: Tensor,
                 mean: Tensor, rstd: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Backward of :func:`cls_proj_fwd`.

    Returns ``(dx [M, Cin] T, dln_weight, dln_bias, dweight [Cout, Cin], dbias)``.
    """
    dy, ln_weight, ln_bias, weight = (_acc_of(t, x) for t in (dy, ln_weight, ln_bias, weight))
    n = (_acc(x) - mean.unsqueeze(-1)) * rstd.unsqueeze(-1)
    act, dact_du = _gelu_and_grad(n * ln_weight + ln_bias)
    du = (dy @ weight) * dact_du
    dx = layer_norm_input_grad(du * ln_weight, n, rstd)
    return (dx.to(x.dtype), (du * n).sum(dim=0), du.sum(dim=0), dy.t() @ act, dy.sum(dim=0))


def unavailable_reason(device: torch.device) -> Optional[str]:
    """The PyTorch backend runs on every device."""
    return None


# ---------------------------------------------------------------------------------------------
# CLS attention maps: the softmax weights of the token pass, recomputed from its log-sum-exp.
# ---------------------------------------------------------------------------------------------

def attn_weights(x0: Tensor, patches: Tensor, kt: Tensor, gamma: Tensor, beta: Tensor,
                 lse: Tensor, eps: float, dot_dtype: Optional[torch.dtype] = None) -> Tensor:
    """``a[b, h, j] = exp(s_hj − lse[b, h])`` over the tokens ``[x0 ‖ patches]``: the softmax
    weights of :func:`attn_pool_fwd` given its ``lse`` (``[B, H]``), as ``[B, H, N + 1]`` in the
    accumulation dtype (token 0 is ``x0``). Same arguments as :func:`attn_pool_fwd`; this
    backend computes in fp32 whatever ``dot_dtype``.
    """
    kt, gamma, beta, lse = (_acc_of(t, x0) for t in (kt, gamma, beta, lse))
    scores = [torch.einsum("bhc,bnc->bhn", kt, layer_normed(t, gamma, beta, eps))
              for t in (x0.unsqueeze(1), patches)]
    return torch.exp(torch.cat(scores, dim=-1) - lse.unsqueeze(-1))
