// CLS projection LayerNorm -> GELU (erf) -> Linear: the row-wise LayerNorm and GELU, forward and
// backward (kernels in rows.cuh). The activation is fp32, so the Linear's GEMMs (cuBLAS, in
// bindings.cpp) run in fp32 whatever the activation dtype.
#include "rows.cuh"

namespace cvf {

cudaError_t cls_proj_ln_gelu_fwd(const ClsProjFwdArgs& a, cudaStream_t stream) {
  return dispatch_dtype(a.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    constexpr int V = Chunk<T>::kVec;
    RowFwdParams p{};
    p.x = a.x;
    p.x_stride = a.x_stride;
    p.weight = a.ln_weight;
    p.bias = a.ln_bias;
    p.y = a.act;
    p.mean = a.mean;
    p.rstd = a.rstd;
    p.M = a.M;
    p.C = a.C;
    p.eps = a.eps;
    p.vec_in = a.C % V == 0 && a.x_stride % V == 0 && aligned16(a.x);
    p.vec_out = a.C % V == 0 && aligned16(a.act);
    return launch_row_norm_fwd<T, float, true>(p, stream);
  });
}

cudaError_t cls_proj_ln_gelu_bwd(const ClsProjBwdArgs& a, float* dln_weight_part,
                                 float* dln_bias_part, int partials, cudaStream_t stream) {
  return dispatch_dtype(a.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    constexpr int V = Chunk<T>::kVec;
    RowBwdParams p{};
    p.g = a.dact;
    p.g_stride = a.C;
    p.x = a.x;
    p.x_stride = a.x_stride;
    p.weight = a.ln_weight;
    p.bias = a.ln_bias;
    p.mean = a.mean;
    p.rstd = a.rstd;
    p.dx = a.dx;
    p.act = a.act;
    p.dw_part = dln_weight_part;
    p.db_part = dln_bias_part;
    p.M = a.M;
    p.C = a.C;
    p.vec_in = a.C % V == 0 && a.x_stride % V == 0 && aligned16(a.x) && aligned16(a.dact);
    p.vec_out = a.C % V == 0 && aligned16(a.dx) && aligned16(a.act);
    return launch_row_norm_bwd<T, true>(p, partials, stream);
  });
}

}  // namespace cvf
