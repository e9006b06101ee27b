// LayerNorm with an optional residual add, forward and backward (kernels in rows.cuh). The
// forward writes y in its own dtype (e.g. bf16 for an fp32 residual stream under autocast), in
// the same pass.
#include "rows.cuh"

namespace cvf {

cudaError_t layer_norm_fwd(const LayerNormFwdArgs& a, cudaStream_t stream) {
  return dispatch_dtype(a.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    constexpr int V = Chunk<T>::kVec;
    RowFwdParams p{};
    p.x = a.x;
    p.x_stride = a.x_stride;
    p.residual = a.residual;
    p.r_stride = a.r_stride;
    p.weight = a.weight;
    p.bias = a.bias;
    p.y = a.y;
    p.h = a.h;
    p.mean = a.mean;
    p.rstd = a.rstd;
    p.M = a.M;
    p.C = a.C;
    p.eps = a.eps;
    p.vec_in = a.C % V == 0 && a.x_stride % V == 0 && aligned16(a.x) &&
               (!a.residual || (a.r_stride % V == 0 && aligned16(a.residual)));
    // y's chunks of V values are 8 or 16 bytes; with C a multiple of V, each starts at a multiple
    // of its size from the 16-byte aligned base
    p.vec_out = a.C % V == 0 && aligned16(a.y) && (!a.residual || aligned16(a.h));
    return dispatch_dtype(a.out_dtype, [&](auto out_tag) {
      using TOut = typename decltype(out_tag)::type;
      return launch_row_norm_fwd<T, TOut, false>(p, stream);
    });
  });
}

int layer_norm_bwd_partials(int M, int C) { return row_bwd_blocks(M, C); }

size_t row_norm_smem_bytes(DType dtype, int C, bool backward) {
  return dispatch_dtype(dtype, [&](auto tag) {
    return row_warp_smem<typename decltype(tag)::type>(C, backward);
  });
}

cudaError_t layer_norm_bwd(const LayerNormBwdArgs& a, float* dweight_part, float* dbias_part,
                           int partials, cudaStream_t stream) {
  return dispatch_dtype(a.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    constexpr int V = Chunk<T>::kVec;
    RowBwdParams p{};
    p.g = a.dy;
    p.g_stride = a.dy_stride;
    p.dh = a.dh;
    p.dh_stride = a.dh_stride;
    p.x = a.h;
    p.x_stride = a.h_stride;
    p.weight = a.weight;
    p.mean = a.mean;
    p.rstd = a.rstd;
    p.dx = a.dx;
    p.dw_part = dweight_part;
    p.db_part = dbias_part;
    p.M = a.M;
    p.C = a.C;
    p.vec_in = a.C % V == 0 && a.dy_stride % V == 0 && a.h_stride % V == 0 && aligned16(a.dy) &&
               aligned16(a.h) && (!a.dh || (a.dh_stride % V == 0 && aligned16(a.dh)));
    p.vec_out = a.C % V == 0 && aligned16(a.dx);
    return launch_row_norm_bwd<T, false>(p, partials, stream);
  });
}

}  // namespace cvf
