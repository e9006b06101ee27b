// Host launchers of the crossvit-fast CUDA kernels: raw pointers, sizes, strides (in elements)
// and a stream; no torch types. bindings.cpp validates tensors, allocates outputs and calls these.
//
// Conventions: activations (x, x0, patches, dy, dh, dx, y, h) are of one dtype `dtype`
// (fp32/fp16/bf16) and have unit stride along their last dim; every `float*` is fp32 and
// contiguous. Outputs described as [.., C] are contiguous. Launchers return the first CUDA error
// (cudaSuccess when all went well); they do not synchronize.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace cvf {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Widest C and most heads the token-pass kernels take (one thread owns 4 (forward) or 2
// (backward) columns of a block of at most 256 / 512 threads; heads are padded to 4, 8 or 16).
constexpr int kAttnPoolMaxC = 1024;
constexpr int kAttnPoolMaxH = 16;

// ---- CLS attention pooling (design.md §2) -----------------------------------------------------

struct AttnPoolArgs {
  DType dtype;
  const void* x0;          // [B, C]: row b at x0 + b * x0_stride_b
  int64_t x0_stride_b;
  const void* patches;     // [B, N, C]: token n of sample b at patches + b * p_stride_b + n * p_stride_n
  int64_t p_stride_b, p_stride_n;
  const float* kt;         // [B, H, C]
  const float* gamma;      // [C]
  const float* beta;       // [C]
  int B, N, C, H;
  float eps;
};

// How a token pass is launched on the current device: `splits` programs per sample share the
// N + 1 tokens, `chunk` tokens each (a multiple of the tile). `smem_bytes` is the dynamic shared
// memory a block needs and `smem_limit` what the device grants; a plan with smem_bytes >
// smem_limit cannot run. `workspace_floats` is the fp32 scratch the launch needs (the backward's
// operand rows; 0 for the forward). `error` is any CUDA error met while planning.
struct AttnPoolPlan {
  int splits = 1;
  int chunk = 0;
  int threads = 0;
  size_t smem_bytes = 0;
  size_t smem_limit = 0;
  int64_t workspace_floats = 0;
  cudaError_t error = cudaSuccess;
};

AttnPoolPlan attn_pool_fwd_plan(const AttnPoolArgs& args);
AttnPoolPlan attn_pool_bwd_plan(const AttnPoolArgs& args);

// z [B, H, C], lse [B, H]. With plan.splits > 1 the workspace holds the per-split partials:
// ws_acc [B, S, H, C], ws_m and ws_l [B, S, H] (unused, may be null, when splits == 1).
cudaError_t attn_pool_fwd(const AttnPoolArgs& args, const AttnPoolPlan& plan, float* z, float* lse,
                          float* ws_acc, float* ws_m, float* ws_l, cudaStream_t stream);

// Gradients: dx0 [B, C] and dpatches [B, N, C] (activation dtype, contiguous); per-split partials
// dkt_part [B, S, H, C], dgamma_part and dbeta_part [B * S, C], summed by the caller.
// `workspace`: plan.workspace_floats fp32, 16-byte aligned, overwritten.
cudaError_t attn_pool_bwd(const AttnPoolArgs& args, const AttnPoolPlan& plan, const float* z,
                          const float* dz, const float* lse, float* workspace, void* dx0,
                          void* dpatches, float* dkt_part, float* dgamma_part, float* dbeta_part,
                          cudaStream_t stream);

// CLS attention maps: out [B, H, N + 1] (contiguous) = exp(s - lse) per token, from the lse
// [B, H] of attn_pool_fwd on the same inputs.
cudaError_t attn_weights(const AttnPoolArgs& args, const float* lse, float* out,
                         cudaStream_t stream);

// ---- LayerNorm with an optional residual add --------------------------------------------------

// The least dynamic shared memory a block of the LayerNorm and CLS-projection row kernels needs
// at width C (one warp); where the GPU grants less, that width cannot run on it.
size_t row_norm_smem_bytes(DType dtype, int C, bool backward);

struct LayerNormFwdArgs {
  DType dtype;            // of x, residual and h
  DType out_dtype;        // of y
  const void* x;          // [M, C], row stride x_stride
  int64_t x_stride;
  const void* residual;   // [M, C] or null, row stride r_stride
  int64_t r_stride;
  const float* weight;    // [C]
  const float* bias;      // [C]
  void* y;                // [M, C] in out_dtype
  void* h;                // [M, C] = x + residual rounded to dtype; written only with a residual
  float* mean;            // [M]
  float* rstd;            // [M]
  int M, C;
  float eps;
};
cudaError_t layer_norm_fwd(const LayerNormFwdArgs& args, cudaStream_t stream);

struct LayerNormBwdArgs {
  DType dtype;
  const void* dy;         // [M, C], row stride dy_stride
  int64_t dy_stride;
  const void* dh;         // [M, C] or null: gradient reaching h directly
  int64_t dh_stride;
  const void* h;          // [M, C], row stride h_stride
  int64_t h_stride;
  const float* weight;    // [C]
  const float* mean;      // [M]
  const float* rstd;      // [M]
  void* dx;               // [M, C]
  int M, C;
};
// Number of rows of partial dweight/dbias sums layer_norm_bwd writes for M rows of width C.
int layer_norm_bwd_partials(int M, int C);
// dweight_part, dbias_part: [partials, C], summed over rows by the caller.
cudaError_t layer_norm_bwd(const LayerNormBwdArgs& args, float* dweight_part, float* dbias_part,
                           int partials, cudaStream_t stream);

// ---- CLS projection: LayerNorm -> GELU (erf) -> Linear ----------------------------------------
// The kernels do the row-wise LayerNorm and GELU; the Linear's GEMMs are cuBLAS (bindings.cpp).

struct ClsProjFwdArgs {
  DType dtype;
  const void* x;          // [M, C], row stride x_stride
  int64_t x_stride;
  const float* ln_weight; // [C]
  const float* ln_bias;   // [C]
  float* act;             // [M, C]: GELU(LN(x))
  float* mean;            // [M]
  float* rstd;            // [M]
  int M, C;
  float eps;
};
cudaError_t cls_proj_ln_gelu_fwd(const ClsProjFwdArgs& args, cudaStream_t stream);

struct ClsProjBwdArgs {
  DType dtype;
  const float* dact;      // [M, C]: dy @ weight, the gradient reaching GELU's output
  const void* x;          // [M, C], row stride x_stride
  int64_t x_stride;
  const float* ln_weight; // [C]
  const float* ln_bias;   // [C]
  const float* mean;      // [M]
  const float* rstd;      // [M]
  void* dx;               // [M, C]
  float* act;             // [M, C]: GELU(LN(x)) recomputed, for dweight = dyᵀ act
  int M, C;
};
// Same partial-sum layout as layer_norm_bwd (rows from layer_norm_bwd_partials).
cudaError_t cls_proj_ln_gelu_bwd(const ClsProjBwdArgs& args, float* dln_weight_part,
                                 float* dln_bias_part, int partials, cudaStream_t stream);

}  // namespace cvf
