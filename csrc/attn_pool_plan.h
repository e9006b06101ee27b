// Launch shape and shared memory of the token-pass kernels (attn_pool.cu): tiles, block sizes,
// head padding, and the dynamic shared memory each kernel asks for. Plain C++ (no CUDA headers),
// so a host program computes the very bytes the launch plan does: tests/test_cuda_plan.py checks
// them against the per-block limits of sm_80 to sm_90 at every variant's (C, H).
#pragma once

#include <cstddef>
#include <cstdint>

#if defined(__CUDACC__)
#define CVF_PLAN_HD __host__ __device__
#else
#define CVF_PLAN_HD
#endif

namespace cvf {
namespace attn_pool_plan {

constexpr int kWarpSize = 32;
constexpr int kFwdTile = 16;          // tokens per tile: 2 per lane in phase (c)
constexpr int kBwdTile = 8;           // 1 per lane; keeps the backward's registers in check
constexpr int kFwdMaxThreads = 256;   // one column quad per thread: C <= 1024
constexpr int kBwdMaxThreads = 512;   // one column pair per thread: C <= 1024
constexpr int kMinThreads = 64;

CVF_PLAN_HD constexpr int div_up(int a, int b) { return (a + b - 1) / b; }
CVF_PLAN_HD constexpr int round_up_to(int a, int b) { return div_up(a, b) * b; }

// Row stride (floats) of a C-wide row in shared memory (and in the backward's operand
// workspace): >= C rounded up to quads, ≡ 4 (mod 8).
CVF_PLAN_HD constexpr int smem_row_stride(int C) { return round_up_to(C, 8) + 4; }

// Heads padded to the kernels' compile-time head count HMAX: 4, 8 or 16.
constexpr int head_pad(int H) { return H <= 4 ? 4 : (H <= 8 ? 8 : 16); }

// Block size: one thread per owned column group, whole warps, within [kMinThreads, max].
constexpr int clamp_threads(int columns_owned, int max_threads) {
  const int t = round_up_to(columns_owned, kWarpSize);
  return t < kMinThreads ? kMinThreads : (t > max_threads ? max_threads : t);
}
constexpr int fwd_threads(int C) { return clamp_threads(div_up(C, 4), kFwdMaxThreads); }
constexpr int bwd_threads(int C) { return clamp_threads(div_up(C, 2), kBwdMaxThreads); }

// Shared memory of the forward, in floats: the tile, g = kt ⊙ γ ([H][RS]), partial scores,
// probabilities and per-head scalars.
constexpr size_t fwd_smem_floats(int C, int H, int HMAX, int warps) {
  const size_t RS = smem_row_stride(C);
  return kFwdTile * RS + H * RS + static_cast<size_t>(warps) * kFwdTile * (HMAX + 1) +
         kFwdTile * HMAX + 4 * HMAX;
}

// Shared memory of the backward, in floats. Independent of H * C: the per-head operand rows
// kt ⊙ γ and dz ⊙ γ live in a global workspace (bwd_operand_floats), not here.
constexpr size_t bwd_smem_floats(int C, int HMAX, int warps) {
  const size_t RS = smem_row_stride(C);
  return kBwdTile * RS + 2 * static_cast<size_t>(warps) * kBwdTile * (HMAX + 1) +
         2 * HMAX * kBwdTile + static_cast<size_t>(warps) * 2 * kBwdTile + 2 * kBwdTile +
         kBwdTile + 6 * HMAX;
}

// Bytes of dynamic shared memory a block of each kernel needs at width C with H heads.
constexpr size_t fwd_smem_bytes(int C, int H) {
  return fwd_smem_floats(C, H, head_pad(H), fwd_threads(C) / kWarpSize) * sizeof(float);
}
constexpr size_t bwd_smem_bytes(int C, int H) {
  return bwd_smem_floats(C, head_pad(H), bwd_threads(C) / kWarpSize) * sizeof(float);
}

// The backward's fp32 operand workspace [B][2][H][RS]: kt ⊙ γ, then dz ⊙ γ, zero past C.
constexpr int64_t bwd_operand_floats(int B, int C, int H) {
  return static_cast<int64_t>(B) * 2 * H * smem_row_stride(C);
}

}  // namespace attn_pool_plan
}  // namespace cvf
