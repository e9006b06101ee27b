// The CLS attention maps of the single-query cross-attention: a_hj = exp(s_hj - lse_h), the
// softmax weights of the forward token pass (attn_pool.cu) recomputed from its log-sum-exp.
// Runs only when the maps are asked for (not a hot path): one warp per token, no shared memory.
//
// A warp loads its token (x0 for t = 0, patches[b, t - 1] otherwise) into registers, lane l
// holding the columns c ≡ l (mod 32); takes its LayerNorm statistics (two-pass, as the token
// pass); then, per head, the score s_h = kt_h · (γ ⊙ n + β) (a warp sum) and writes
// exp(s_h - lse_h) to a[b, h, t].
#include <algorithm>

#include "common.cuh"

namespace cvf {
namespace {

constexpr int kWeightsWarps = 8;                         // tokens per block
constexpr int kColsPerLane = kAttnPoolMaxC / kWarp;      // registers holding a token's row
constexpr int kMaxGridY = 65535;

template <typename T>
__global__ void __launch_bounds__(kWeightsWarps * kWarp)
attn_weights_kernel(const __grid_constant__ AttnPoolArgs a, const float* __restrict__ lse,
                    float* __restrict__ out) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int b = blockIdx.x, C = a.C, H = a.H, tokens = a.N + 1;
  const float* kt = a.kt + static_cast<int64_t>(b) * H * C;
  for (int t = blockIdx.y * kWeightsWarps + warp; t < tokens; t += gridDim.y * kWeightsWarps) {
    const T* row = t == 0 ? static_cast<const T*>(a.x0) + b * a.x0_stride_b
                          : static_cast<const T*>(a.patches) + b * a.p_stride_b +
                                static_cast<int64_t>(t - 1) * a.p_stride_n;
    float v[kColsPerLane];
    float sum = 0.f;
#pragma unroll
    for (int k = 0; k < kColsPerLane; ++k) {
      const int c = lane + k * kWarp;
      v[k] = c < C ? to_float(row[c]) : 0.f;
      sum += v[k];
    }
    const float mean = warp_sum(sum) / C;
    float sq = 0.f;
#pragma unroll
    for (int k = 0; k < kColsPerLane; ++k) {
      const int c = lane + k * kWarp;
      const float d = c < C ? v[k] - mean : 0.f;
      sq = fmaf(d, d, sq);
    }
    const float rstd = rsqrtf(warp_sum(sq) / C + a.eps);
#pragma unroll
    for (int k = 0; k < kColsPerLane; ++k) {  // v becomes x̂ = γ ⊙ n + β (zero past C)
      const int c = lane + k * kWarp;
      v[k] = c < C ? fmaf(a.gamma[c], (v[k] - mean) * rstd, a.beta[c]) : 0.f;
    }
    for (int h = 0; h < H; ++h) {
      float s = 0.f;
#pragma unroll
      for (int k = 0; k < kColsPerLane; ++k) {
        const int c = lane + k * kWarp;
        if (c < C) s = fmaf(kt[h * C + c], v[k], s);
      }
      s = warp_sum(s);
      if (lane == 0) {
        const int64_t bh = static_cast<int64_t>(b) * H + h;
        out[bh * tokens + t] = expf(s - lse[bh]);
      }
    }
  }
}

}  // namespace

cudaError_t attn_weights(const AttnPoolArgs& a, const float* lse, float* out,
                         cudaStream_t stream) {
  if (a.B == 0) return cudaSuccess;
  const int blocks_y = std::min(ceil_div(a.N + 1, kWeightsWarps), kMaxGridY);
  return dispatch_dtype(a.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    attn_weights_kernel<T><<<dim3(a.B, blocks_y), kWeightsWarps * kWarp, 0, stream>>>(a, lse, out);
    return cudaGetLastError();
  });
}

}  // namespace cvf
