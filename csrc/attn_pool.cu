// CLS attention pooling: the token pass of the single-query cross-attention (design.md §2),
// forward and backward.
//
// A block takes one sample b and one split of its T = N + 1 tokens [x0 ‖ patches] (token 0 is
// x0, token t ≥ 1 is patches[b, t - 1]; both are read through their own pointer and strides).
// It walks the split in tiles of TILE tokens, each tile in five phases separated by barriers:
//   (a) stage: the tile's tokens → shared memory as fp32 (16-byte global loads where aligned);
//   (b) normalize: one warp per token, two-pass mean/variance, n = (x - μ) r in place;
//   (c) scores: partial s_jh = g_h · n_j (g = kt ⊙ γ; the backward also dz_h ⊙ γ · n_j) over
//       a K-slice of the columns per warp; inside a warp lane = (token group, head group),
//       so a shared-memory load feeds several FMAs and is broadcast, never bank-conflicted;
//   (d) softmax: one warp per head, one lane per token, sums the slices and adds kt_h · β;
//   (e) accumulate: one thread per column quad (forward) or pair (backward), all heads in
//       registers, reading the tile's n and the probabilities from shared memory.
// Shared-memory rows are padded to a stride ≡ 4 (mod 8) floats, so the eight rows a warp reads
// at one column quad fall in eight different 16-byte bank groups.
//
// With few samples the token axis is split across blocks (flash-decoding): the forward writes
// per-split (max, sum, unnormalized Σ p n) that a small kernel combines; the backward writes
// per-split parameter-gradient partials that the caller sums.
//
// The backward's per-head operand rows (kt ⊙ γ and dz ⊙ γ) are written once per sample to a
// global workspace by a small kernel and read from there (L1/L2), not staged in shared memory:
// that keeps its shared memory independent of H * C, within sm_86/89's 99 KB at every variant.
// Tiles, block sizes and the shared-memory formulas are in attn_pool_plan.h.
#include <algorithm>

#include "attn_pool_plan.h"
#include "common.cuh"

namespace cvf {
namespace {

using attn_pool_plan::kBwdMaxThreads;
using attn_pool_plan::kBwdTile;
using attn_pool_plan::kFwdMaxThreads;
using attn_pool_plan::kFwdTile;
using attn_pool_plan::smem_row_stride;
static_assert(attn_pool_plan::kWarpSize == kWarp, "the plan's block sizes assume 32-lane warps");

constexpr int kMinSplitTokens = 32;   // a split gets at least about this many tokens
constexpr int kCombineThreads = 128;
constexpr int kOperandThreads = 128;

template <int N> struct IntTag { static constexpr int value = N; };

// Calls f(IntTag<HMAX>{}) with HMAX = attn_pool_plan::head_pad(H): 4, 8 or 16.
template <typename F>
decltype(auto) dispatch_heads(int H, F&& f) {
  switch (attn_pool_plan::head_pad(H)) {
    case 4: return f(IntTag<4>{});
    case 8: return f(IntTag<8>{});
    default: break;
  }
  return f(IntTag<16>{});
}

struct FwdOut {
  float* z;       // [B, H, C]       (one split)
  float* lse;     // [B, H]
  float* ws_acc;  // [B, S, H, C]    (several splits)
  float* ws_m;    // [B, S, H]
  float* ws_l;    // [B, S, H]
};

struct BwdIo {
  const float* z;    // [B, H, C]
  const float* dz;   // [B, H, C]
  const float* lse;  // [B, H]
  const float* operands;  // [B, 2, H, RS]: kt ⊙ γ then dz ⊙ γ, zero past C
  void* dx0;         // [B, C]
  void* dpatches;    // [B, N, C]
  float* dkt;        // [B, S, H, C]
  float* dgamma;     // [B * S, C]
  float* dbeta;      // [B * S, C]
};

template <typename T>
__device__ __forceinline__ const T* token_row(const AttnPoolArgs& a, int b, int t) {
  return t == 0 ? static_cast<const T*>(a.x0) + b * a.x0_stride_b
                : static_cast<const T*>(a.patches) + b * a.p_stride_b + (t - 1) * a.p_stride_n;
}

__device__ __forceinline__ float dot4(float4 x, float4 y, float acc) {
  return fmaf(x.w, y.w, fmaf(x.z, y.z, fmaf(x.y, y.y, fmaf(x.x, y.x, acc))));
}

// (a) Rows [0, rows) of the tile: tokens t0 + j for j < valid, zeros after. Every column of the
// first round_up(C, kVec) >= round_up(C, 4) is written (zeros past C).
template <typename T>
__device__ __forceinline__ void stage_tile(float* tile, int RS, int rows, const AttnPoolArgs& a,
                                           int b, int t0, int valid, bool vec) {
  constexpr int V = Chunk<T>::kVec;
  const int chunks = ceil_div(a.C, V);
  for (int i = threadIdx.x; i < rows * chunks; i += blockDim.x) {
    const int j = i / chunks, c = (i - j * chunks) * V;
    float v[V];
    if (j < valid) {
      load_chunk<T, V>(token_row<T>(a, b, t0 + j), c, a.C, vec, v);
    } else {
#pragma unroll
      for (int e = 0; e < V; ++e) v[e] = 0.f;
    }
    float4* dst = reinterpret_cast<float4*>(tile + j * RS + c);
#pragma unroll
    for (int f = 0; f < V / 4; ++f)
      dst[f] = make_float4(v[4 * f], v[4 * f + 1], v[4 * f + 2], v[4 * f + 3]);
  }
}

// (b) LayerNorm statistics of rows [0, rows), one warp per row; each row becomes n (zero past
// C). Rows past `rows` stay zero. rstd_out (if given) receives each row's 1/σ.
__device__ __forceinline__ void normalize_rows(float* tile, int RS, int rows, int C, float eps,
                                               float* rstd_out) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, warps = blockDim.x / kWarp;
  const int Q = ceil_div(C, 4);
  for (int j = warp; j < rows; j += warps) {
    float4* row = reinterpret_cast<float4*>(tile + j * RS);
    float s = 0.f;
    for (int q = lane; q < Q; q += kWarp) {
      const float4 v = row[q];
      s += (v.x + v.y) + (v.z + v.w);
    }
    const float mean = warp_sum(s) / C;
    float sq = 0.f;
    for (int q = lane; q < Q; q += kWarp) {
      const float4 v = row[q];
      const int c = 4 * q;
      const float d0 = v.x - mean, d1 = c + 1 < C ? v.y - mean : 0.f;
      const float d2 = c + 2 < C ? v.z - mean : 0.f, d3 = c + 3 < C ? v.w - mean : 0.f;
      sq += fmaf(d0, d0, d1 * d1) + fmaf(d2, d2, d3 * d3);
    }
    const float rstd = rsqrtf(warp_sum(sq) / C + eps);
    for (int q = lane; q < Q; q += kWarp) {
      const float4 v = row[q];
      const int c = 4 * q;
      row[q] = make_float4((v.x - mean) * rstd, c + 1 < C ? (v.y - mean) * rstd : 0.f,
                           c + 2 < C ? (v.z - mean) * rstd : 0.f,
                           c + 3 < C ? (v.w - mean) * rstd : 0.f);
    }
    if (rstd_out != nullptr && lane == 0) rstd_out[j] = rstd;
  }
}

// (c) Partial scores of the tile's 8 * RJ tokens against the H rows of NB operand matrices
// (`[H][RS]`, zero past C), over the column quads q ≡ warp (mod warps). Lane = (token group tg,
// head group hg): it owns tokens 8 i + tg and heads 4 r + hg. Writes red[NB][warps][TILE][HMAX+1].
template <int HMAX, int RJ, int NB>
__device__ __forceinline__ void score_partials(const float* tile, const float* m0, const float* m1,
                                               int RS, int C, int H, float* red) {
  constexpr int RH = HMAX / 4, TILE = 8 * RJ, HS = HMAX + 1;
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, warps = blockDim.x / kWarp;
  const int tg = lane >> 2, hg = lane & 3;
  const int RS4 = RS / 4, Q = ceil_div(C, 4);
  const float4* x4 = reinterpret_cast<const float4*>(tile);
  const float4* mat[2] = {reinterpret_cast<const float4*>(m0), reinterpret_cast<const float4*>(m1)};
  int row_of[RH];  // heads past H read the last head's row; their results are never used
#pragma unroll
  for (int r = 0; r < RH; ++r) row_of[r] = min(4 * r + hg, H - 1) * RS4;

  float acc[NB][RJ][RH];
#pragma unroll
  for (int m = 0; m < NB; ++m)
#pragma unroll
    for (int i = 0; i < RJ; ++i)
#pragma unroll
      for (int r = 0; r < RH; ++r) acc[m][i][r] = 0.f;

  for (int q = warp; q < Q; q += warps) {
    float4 xv[RJ];
#pragma unroll
    for (int i = 0; i < RJ; ++i) xv[i] = x4[(8 * i + tg) * RS4 + q];
#pragma unroll
    for (int m = 0; m < NB; ++m)
#pragma unroll
      for (int r = 0; r < RH; ++r) {
        const float4 mv = mat[m][row_of[r] + q];
#pragma unroll
        for (int i = 0; i < RJ; ++i) acc[m][i][r] = dot4(xv[i], mv, acc[m][i][r]);
      }
  }
#pragma unroll
  for (int m = 0; m < NB; ++m)
#pragma unroll
    for (int i = 0; i < RJ; ++i)
#pragma unroll
      for (int r = 0; r < RH; ++r)
        red[((m * warps + warp) * TILE + 8 * i + tg) * HS + 4 * r + hg] = acc[m][i][r];
}

// ---- forward ----------------------------------------------------------------------------------

// Grid (B, splits); block: one thread per column quad (at least 64).
template <typename T, int HMAX>
__global__ void __launch_bounds__(kFwdMaxThreads, 2)
attn_pool_fwd_kernel(const __grid_constant__ AttnPoolArgs a, const __grid_constant__ FwdOut out,
                     int chunk, bool vec) {
  constexpr int TILE = kFwdTile, RH = HMAX / 4, HS = HMAX + 1;
  const int C = a.C, H = a.H, b = blockIdx.x, split = blockIdx.y, S = gridDim.y;
  const int tid = threadIdx.x, lane = tid % kWarp, warp = tid / kWarp, warps = blockDim.x / kWarp;
  const int RS = smem_row_stride(C), Q = ceil_div(C, 4);
  const int t_begin = split * chunk, t_end = min(a.N + 1, t_begin + chunk);  // never empty

  extern __shared__ float4 smem4[];
  float* tile = reinterpret_cast<float*>(smem4);  // [TILE][RS]  tokens, then their n
  float* g = tile + TILE * RS;                    // [H][RS]     kt ⊙ γ, zero past C
  float* red = g + H * RS;                        // [warps][TILE][HS] partial scores
  float* prob = red + warps * TILE * HS;          // [TILE][HMAX] exp(s - m) of the tile
  float* kb = prob + TILE * HMAX;                 // [HMAX] kt · β
  float* run_m = kb + HMAX;                       // [HMAX] running max of the scores
  float* run_l = run_m + HMAX;                    // [HMAX] running Σ exp(s - run_m)
  float* alpha = run_l + HMAX;                    // [HMAX] exp(old max - new max) of this tile

  const float* kt = a.kt + static_cast<int64_t>(b) * H * C;
  for (int i = tid; i < H * RS; i += blockDim.x) {
    const int h = i / RS, c = i - h * RS;
    g[i] = c < C ? kt[h * C + c] * a.gamma[c] : 0.f;
  }
  for (int i = tid; i < TILE * HMAX; i += blockDim.x) prob[i] = 0.f;  // heads past H stay 0
  if (tid < HMAX) {
    run_m[tid] = -INFINITY;
    run_l[tid] = 0.f;
    alpha[tid] = 1.f;
  }
  for (int h = warp; h < H; h += warps) {
    float s = 0.f;
    for (int c = lane; c < C; c += kWarp) s = fmaf(kt[h * C + c], a.beta[c], s);
    s = warp_sum(s);
    if (lane == 0) kb[h] = s;
  }
  float acc[HMAX][4];  // Σ_j exp(s_hj - run_m_h) n_j at this thread's column quad
#pragma unroll
  for (int h = 0; h < HMAX; ++h) acc[h][0] = acc[h][1] = acc[h][2] = acc[h][3] = 0.f;
  __syncthreads();

  for (int t0 = t_begin; t0 < t_end; t0 += TILE) {
    const int valid = min(TILE, t_end - t0);
    stage_tile<T>(tile, RS, TILE, a, b, t0, valid, vec);
    __syncthreads();
    normalize_rows(tile, RS, valid, C, a.eps, nullptr);
    __syncthreads();
    score_partials<HMAX, TILE / 8, 1>(tile, g, nullptr, RS, C, H, red);
    __syncthreads();

    // (d) Online softmax: lane j holds token j's score of head h.
    for (int h = warp; h < H; h += warps) {
      float s = -INFINITY;
      if (lane < valid) {
        s = kb[h];
        for (int w = 0; w < warps; ++w) s += red[(w * TILE + lane) * HS + h];
      }
      const float m_old = run_m[h];
      const float m_new = fmaxf(m_old, warp_max(s));  // finite: the tile has a token
      const float p = lane < valid ? expf(s - m_new) : 0.f;
      const float l_tile = warp_sum(p);
      if (lane < TILE) prob[lane * HMAX + h] = p;
      __syncwarp();  // every lane has read run_m[h] before lane 0 updates it
      if (lane == 0) {
        const float r = expf(m_old - m_new);  // 0 on the first tile (m_old = -inf)
        alpha[h] = r;
        run_l[h] = fmaf(run_l[h], r, l_tile);
        run_m[h] = m_new;
      }
    }
    __syncthreads();

    // (e) acc_h = alpha_h acc_h + Σ_j p_jh n_j at column quad `tid`.
    if (tid < Q) {
#pragma unroll
      for (int h = 0; h < HMAX; ++h) {
        if (h < H) {
          const float r = alpha[h];
          acc[h][0] *= r; acc[h][1] *= r; acc[h][2] *= r; acc[h][3] *= r;
        }
      }
      const float4* n4 = reinterpret_cast<const float4*>(tile) + tid;
      const float4* p4 = reinterpret_cast<const float4*>(prob);
      for (int j = 0; j < valid; ++j) {
        const float4 nv = n4[j * (RS / 4)];
#pragma unroll
        for (int hq = 0; hq < RH; ++hq) {
          if (4 * hq < H) {
            const float4 pv = p4[j * RH + hq];
            const float pw[4] = {pv.x, pv.y, pv.z, pv.w};
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              float* ah = acc[4 * hq + e];
              ah[0] = fmaf(pw[e], nv.x, ah[0]);
              ah[1] = fmaf(pw[e], nv.y, ah[1]);
              ah[2] = fmaf(pw[e], nv.z, ah[2]);
              ah[3] = fmaf(pw[e], nv.w, ah[3]);
            }
          }
        }
      }
    }
    __syncthreads();  // the next tile overwrites tile, prob and alpha
  }

  // One split: z = γ ⊙ acc / l + β, lse = m + log l. Several: this split's (acc, m, l).
  if (tid < Q) {
#pragma unroll
    for (int h = 0; h < HMAX; ++h) {
      if (h < H) {
        const int64_t row = S == 1 ? static_cast<int64_t>(b) * H + h
                                   : (static_cast<int64_t>(b) * S + split) * H + h;
        const float inv_l = 1.f / run_l[h];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int c = 4 * tid + e;
          if (c < C) {
            if (S == 1) out.z[row * C + c] = fmaf(a.gamma[c], acc[h][e] * inv_l, a.beta[c]);
            else out.ws_acc[row * C + c] = acc[h][e];
          }
        }
      }
    }
  }
  if (tid < H) {
    if (S == 1) {
      out.lse[static_cast<int64_t>(b) * H + tid] = run_m[tid] + logf(run_l[tid]);
    } else {
      const int64_t i = (static_cast<int64_t>(b) * S + split) * H + tid;
      out.ws_m[i] = run_m[tid];
      out.ws_l[i] = run_l[tid];
    }
  }
}

// Grid B * H; rescales each split's partials to the global max and normalizes (flash-decoding).
__global__ void __launch_bounds__(kCombineThreads)
attn_pool_combine_kernel(const float* __restrict__ ws_acc, const float* __restrict__ ws_m,
                         const float* __restrict__ ws_l, const float* __restrict__ gamma,
                         const float* __restrict__ beta, float* __restrict__ z,
                         float* __restrict__ lse, int S, int H, int C) {
  extern __shared__ float weight[];  // [S]: exp(m_s - max_s m_s)
  const int bh = blockIdx.x, b = bh / H, h = bh - b * H;
  const float* m = ws_m + static_cast<int64_t>(b) * S * H + h;  // split s at m[s * H]
  const float* l = ws_l + static_cast<int64_t>(b) * S * H + h;
  float m_max = -INFINITY;
  for (int s = 0; s < S; ++s) m_max = fmaxf(m_max, m[s * H]);
  for (int s = threadIdx.x; s < S; s += blockDim.x) weight[s] = expf(m[s * H] - m_max);
  __syncthreads();
  float l_sum = 0.f;
  for (int s = 0; s < S; ++s) l_sum = fmaf(weight[s], l[s * H], l_sum);
  const float inv_l = 1.f / l_sum;
  for (int c = threadIdx.x; c < C; c += blockDim.x) {
    float acc = 0.f;
    for (int s = 0; s < S; ++s)
      acc = fmaf(weight[s], ws_acc[((static_cast<int64_t>(b) * S + s) * H + h) * C + c], acc);
    z[static_cast<int64_t>(bh) * C + c] = fmaf(gamma[c], acc * inv_l, beta[c]);
  }
  if (threadIdx.x == 0) lse[bh] = m_max + logf(l_sum);
}

// ---- backward ---------------------------------------------------------------------------------

// Grid (B, H): row h of sample b of the backward's operands, g = kt ⊙ γ and gd = dz ⊙ γ, at
// stride RS and zero past C (the layout the staging loop gave them in shared memory).
__global__ void __launch_bounds__(kOperandThreads)
attn_pool_bwd_operands_kernel(const float* __restrict__ kt_all, const float* __restrict__ dz_all,
                              const float* __restrict__ gamma, float* __restrict__ operands,
                              int H, int C) {
  const int b = blockIdx.x, h = blockIdx.y, RS = smem_row_stride(C);
  const int64_t bhc = static_cast<int64_t>(b) * H * C;
  const float* kt = kt_all + bhc;
  const float* dz = dz_all + bhc;
  float* g = operands + static_cast<int64_t>(b) * 2 * H * RS;  // [H][RS]
  float* gd = g + H * RS;                                       // [H][RS]
  for (int c = threadIdx.x; c < RS; c += blockDim.x) {
    g[h * RS + c] = c < C ? kt[h * C + c] * gamma[c] : 0.f;
    gd[h * RS + c] = c < C ? dz[h * C + c] * gamma[c] : 0.f;
  }
}

// Grid (B, splits); block: one thread per column pair (at least 64).
//
// Per token j and head h, with a = exp(s - lse) and ds = a (dz_h · x̂_j - δ_h):
//   dn_j  = γ ⊙ dx̂_j = Σ_h a dzg_h + ds g_h          (dzg = dz ⊙ γ, g = kt ⊙ γ)
//   dx_j  = r_j (dn_j - mean(dn_j) - n_j mean(dn_j ⊙ n_j))
// and, with U_h = Σ_j a n_j, V_h = Σ_j ds n_j (registers) and the per-head sums of a and ds,
//   dkt_h = γ ⊙ V_h + β Σ_j ds,   dγ = Σ_h dz_h ⊙ U_h + kt_h ⊙ V_h,   dβ = Σ_h dz_h Σ_j a + kt_h Σ_j ds,
// which equal Σ_j ds x̂_j, Σ_j dx̂_j ⊙ n_j and Σ_j dx̂_j without forming dx̂ (so γ may be 0).
template <typename T, int HMAX>
__global__ void __launch_bounds__(kBwdMaxThreads)
attn_pool_bwd_kernel(const __grid_constant__ AttnPoolArgs a, const __grid_constant__ BwdIo io,
                     int chunk, bool vec) {
  constexpr int TILE = kBwdTile, HS = HMAX + 1;
  const int C = a.C, H = a.H, b = blockIdx.x, split = blockIdx.y, S = gridDim.y;
  const int tid = threadIdx.x, lane = tid % kWarp, warp = tid / kWarp, warps = blockDim.x / kWarp;
  const int RS = smem_row_stride(C), pairs = ceil_div(C, 2), c0 = 2 * tid;
  const int t_begin = split * chunk, t_end = min(a.N + 1, t_begin + chunk);  // never empty

  // The operand rows, in global memory (written by attn_pool_bwd_operands_kernel before this
  // launch, never during it, so the read-only __ldg path is safe).
  const float* g = io.operands + static_cast<int64_t>(b) * 2 * H * RS;  // [H][RS] kt ⊙ γ
  const float* gd = g + H * RS;                                         // [H][RS] dz ⊙ γ

  extern __shared__ float4 smem4[];
  float* tile = reinterpret_cast<float*>(smem4);  // [TILE][RS]  tokens, then their n
  float* red = tile + TILE * RS;                  // [2][warps][TILE][HS] partial s, dz·x̂
  float* prob = red + 2 * warps * TILE * HS;      // [HMAX][TILE] a
  float* dsc = prob + HMAX * TILE;                // [HMAX][TILE] ds
  float* rowred = dsc + HMAX * TILE;              // [warps][2 TILE] per-warp row sums
  float* rowsum = rowred + warps * 2 * TILE;      // [2 TILE] Σ dn, Σ dn n per token
  float* rstd = rowsum + 2 * TILE;                // [TILE]
  float* kb = rstd + TILE;                        // [HMAX] kt · β
  float* dzb = kb + HMAX;                         // [HMAX] dz · β
  float* delta = dzb + HMAX;                      // [HMAX] dz · z
  float* lse = delta + HMAX;                      // [HMAX]
  float* asum = lse + HMAX;                       // [HMAX] Σ_j a over this split
  float* dssum = asum + HMAX;                     // [HMAX] Σ_j ds over this split

  const int64_t bhc = static_cast<int64_t>(b) * H * C;
  const float* kt = a.kt + bhc;
  const float* dz = io.dz + bhc;
  const float* z = io.z + bhc;
  for (int i = tid; i < HMAX * TILE; i += blockDim.x) prob[i] = dsc[i] = 0.f;  // heads past H
  for (int h = warp; h < H; h += warps) {
    float s_kb = 0.f, s_dzb = 0.f, s_delta = 0.f;
    for (int c = lane; c < C; c += kWarp) {
      s_kb = fmaf(kt[h * C + c], a.beta[c], s_kb);
      s_dzb = fmaf(dz[h * C + c], a.beta[c], s_dzb);
      s_delta = fmaf(dz[h * C + c], z[h * C + c], s_delta);
    }
    s_kb = warp_sum(s_kb);
    s_dzb = warp_sum(s_dzb);
    s_delta = warp_sum(s_delta);
    if (lane == 0) {
      kb[h] = s_kb;
      dzb[h] = s_dzb;
      delta[h] = s_delta;
      lse[h] = io.lse[static_cast<int64_t>(b) * H + h];
      asum[h] = dssum[h] = 0.f;
    }
  }
  float U[HMAX][2], Vs[HMAX][2];  // Σ_j a n_j and Σ_j ds n_j at this thread's column pair
#pragma unroll
  for (int h = 0; h < HMAX; ++h) U[h][0] = U[h][1] = Vs[h][0] = Vs[h][1] = 0.f;
  __syncthreads();

  for (int t0 = t_begin; t0 < t_end; t0 += TILE) {
    const int valid = min(TILE, t_end - t0);
    stage_tile<T>(tile, RS, TILE, a, b, t0, valid, vec);
    __syncthreads();
    normalize_rows(tile, RS, valid, C, a.eps, rstd);
    __syncthreads();
    score_partials<HMAX, 1, 2>(tile, g, gd, RS, C, H, red);
    __syncthreads();

    // (d) a and ds: lane j holds token j of head h.
    for (int h = warp; h < H; h += warps) {
      float p = 0.f, ds = 0.f;
      if (lane < valid) {
        float s = kb[h], da = dzb[h];
        for (int w = 0; w < warps; ++w) {
          s += red[(w * TILE + lane) * HS + h];
          da += red[((warps + w) * TILE + lane) * HS + h];
        }
        p = expf(s - lse[h]);
        ds = p * (da - delta[h]);
      }
      if (lane < TILE) {
        prob[h * TILE + lane] = p;
        dsc[h * TILE + lane] = ds;
      }
      const float p_sum = warp_sum(p), ds_sum = warp_sum(ds);
      if (lane == 0) {
        asum[h] += p_sum;
        dssum[h] += ds_sum;
      }
    }
    __syncthreads();

    // (e) dn, U and V at column pair `tid` (zero for threads past the last pair).
    float n[TILE][2], dn[TILE][2];
#pragma unroll
    for (int j = 0; j < TILE; ++j) n[j][0] = n[j][1] = dn[j][0] = dn[j][1] = 0.f;
    if (tid < pairs) {
#pragma unroll
      for (int j = 0; j < TILE; ++j) {
        const float2 v = *reinterpret_cast<const float2*>(tile + j * RS + c0);
        n[j][0] = v.x;
        n[j][1] = v.y;
      }
#pragma unroll
      for (int h = 0; h < HMAX; ++h) {
        if (h < H) {
          const float4* p4 = reinterpret_cast<const float4*>(prob + h * TILE);
          const float4* d4 = reinterpret_cast<const float4*>(dsc + h * TILE);
          const float4 pa = p4[0], pb = p4[1], da = d4[0], db = d4[1];
          const float pv[TILE] = {pa.x, pa.y, pa.z, pa.w, pb.x, pb.y, pb.z, pb.w};
          const float dv[TILE] = {da.x, da.y, da.z, da.w, db.x, db.y, db.z, db.w};
          const float2 gv = __ldg(reinterpret_cast<const float2*>(g + h * RS + c0));
          const float2 gdv = __ldg(reinterpret_cast<const float2*>(gd + h * RS + c0));
#pragma unroll
          for (int j = 0; j < TILE; ++j) {
            dn[j][0] = fmaf(pv[j], gdv.x, fmaf(dv[j], gv.x, dn[j][0]));
            dn[j][1] = fmaf(pv[j], gdv.y, fmaf(dv[j], gv.y, dn[j][1]));
            U[h][0] = fmaf(pv[j], n[j][0], U[h][0]);
            U[h][1] = fmaf(pv[j], n[j][1], U[h][1]);
            Vs[h][0] = fmaf(dv[j], n[j][0], Vs[h][0]);
            Vs[h][1] = fmaf(dv[j], n[j][1], Vs[h][1]);
          }
        }
      }
    }

    // Row sums Σ_c dn and Σ_c dn n of every token: reduce-scatter in the warp, then across warps.
    float sums[2 * TILE];
#pragma unroll
    for (int j = 0; j < TILE; ++j) {
      sums[j] = dn[j][0] + dn[j][1];
      sums[TILE + j] = fmaf(dn[j][0], n[j][0], dn[j][1] * n[j][1]);
    }
    const float total = warp_reduce_scatter<2 * TILE>(sums, lane);  // sum number lane / 2
    if ((lane & 1) == 0) rowred[warp * 2 * TILE + lane / 2] = total;
    __syncthreads();
    if (tid < 2 * TILE) {
      float s = 0.f;
      for (int w = 0; w < warps; ++w) s += rowred[w * 2 * TILE + tid];
      rowsum[tid] = s;
    }
    __syncthreads();

    // dx of the tile's tokens at column pair `tid`, to x0's row (t = 0) or the patch's row.
    if (tid < pairs) {
#pragma unroll
      for (int j = 0; j < TILE; ++j) {
        if (j < valid) {
          const float mean_dn = rowsum[j] / C, mean_dnn = rowsum[TILE + j] / C, r = rstd[j];
          const int t = t0 + j;
          T* dst = t == 0 ? static_cast<T*>(io.dx0) + static_cast<int64_t>(b) * C
                          : static_cast<T*>(io.dpatches) + (static_cast<int64_t>(b) * a.N + (t - 1)) * C;
          dst[c0] = from_float<T>(r * (dn[j][0] - mean_dn - n[j][0] * mean_dnn));
          if (c0 + 1 < C) dst[c0 + 1] = from_float<T>(r * (dn[j][1] - mean_dn - n[j][1] * mean_dnn));
        }
      }
    }
    // No barrier needed here: the next writes to tile, rstd, prob/dsc, rowred and rowsum all
    // come after at least one more __syncthreads than the reads above.
  }

  // This split's partial dkt, dγ and dβ at column pair `tid` (asum/dssum are final: the last
  // update was followed by barriers).
  if (tid < pairs) {
    const int64_t part = static_cast<int64_t>(b) * S + split;
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int c = c0 + e;
      if (c < C) {
        float dg = 0.f, db = 0.f;
#pragma unroll
        for (int h = 0; h < HMAX; ++h) {
          if (h < H) {
            const float dzv = dz[h * C + c], ktv = kt[h * C + c];
            dg = fmaf(dzv, U[h][e], fmaf(ktv, Vs[h][e], dg));
            db = fmaf(dzv, asum[h], fmaf(ktv, dssum[h], db));
            io.dkt[(part * H + h) * C + c] = fmaf(a.gamma[c], Vs[h][e], a.beta[c] * dssum[h]);
          }
        }
        io.dgamma[part * C + c] = dg;
        io.dbeta[part * C + c] = db;
      }
    }
  }
}

// ---- host ------------------------------------------------------------------------------------

// 16-byte chunks of the tokens are allowed when every row start is 16-byte aligned.
template <typename T>
bool tokens_vectorizable(const AttnPoolArgs& a) {
  constexpr int V = Chunk<T>::kVec;
  const bool x0_ok = aligned16(a.x0) && a.x0_stride_b % V == 0;
  const bool p_ok = a.N == 0 ||
                    (aligned16(a.patches) && a.p_stride_b % V == 0 && a.p_stride_n % V == 0);
  return a.C % V == 0 && x0_ok && p_ok;
}

AttnPoolPlan make_plan(const void* kernel, int B, int tokens, int threads, size_t smem, int tile) {
  AttnPoolPlan plan;
  plan.threads = threads;
  plan.smem_bytes = smem;
  plan.smem_limit = static_cast<size_t>(device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin));
  plan.chunk = round_up(tokens, tile);
  if (smem > plan.smem_limit) return plan;  // the caller reports it
  plan.error = allow_smem(kernel, smem);
  int per_sm = 0;
  if (plan.error == cudaSuccess)
    plan.error = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem);
  if (plan.error != cudaSuccess) return plan;
  const int sms = device_attribute(cudaDevAttrMultiProcessorCount);
  const int resident = (sms > 0 ? sms : 1) * (per_sm > 0 ? per_sm : 1);
  int splits = 1;
  if (B < resident) splits = std::min(ceil_div(resident, B), ceil_div(tokens, kMinSplitTokens));
  splits = std::max(splits, 1);
  plan.chunk = round_up(ceil_div(tokens, splits), tile);
  plan.splits = ceil_div(tokens, plan.chunk);  // every split starts before `tokens`
  return plan;
}

}  // namespace

AttnPoolPlan attn_pool_fwd_plan(const AttnPoolArgs& a) {
  return dispatch_dtype(a.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return dispatch_heads(a.H, [&](auto hm) {
      constexpr int HMAX = decltype(hm)::value;
      return make_plan(reinterpret_cast<const void*>(attn_pool_fwd_kernel<T, HMAX>), a.B,
                       a.N + 1, attn_pool_plan::fwd_threads(a.C),
                       attn_pool_plan::fwd_smem_bytes(a.C, a.H), kFwdTile);
    });
  });
}

AttnPoolPlan attn_pool_bwd_plan(const AttnPoolArgs& a) {
  AttnPoolPlan plan = dispatch_dtype(a.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return dispatch_heads(a.H, [&](auto hm) {
      constexpr int HMAX = decltype(hm)::value;
      return make_plan(reinterpret_cast<const void*>(attn_pool_bwd_kernel<T, HMAX>), a.B,
                       a.N + 1, attn_pool_plan::bwd_threads(a.C),
                       attn_pool_plan::bwd_smem_bytes(a.C, a.H), kBwdTile);
    });
  });
  plan.workspace_floats = attn_pool_plan::bwd_operand_floats(a.B, a.C, a.H);
  return plan;
}

cudaError_t attn_pool_fwd(const AttnPoolArgs& a, const AttnPoolPlan& plan, float* z, float* lse,
                          float* ws_acc, float* ws_m, float* ws_l, cudaStream_t stream) {
  if (a.B == 0) return cudaSuccess;
  const FwdOut out{z, lse, ws_acc, ws_m, ws_l};
  cudaError_t err = dispatch_dtype(a.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const bool vec = tokens_vectorizable<T>(a);
    return dispatch_heads(a.H, [&](auto hm) {
      constexpr int HMAX = decltype(hm)::value;
      attn_pool_fwd_kernel<T, HMAX><<<dim3(a.B, plan.splits), plan.threads, plan.smem_bytes,
                                       stream>>>(a, out, plan.chunk, vec);
      return cudaGetLastError();
    });
  });
  if (err != cudaSuccess || plan.splits == 1) return err;
  // Weights padded to whole float4s: ptxas merges the unrolled loop's tail loads into one
  // 12-byte read, which must stay inside the allocation (compute-sanitizer caught it at S = 13).
  const size_t weight_bytes = round_up(plan.splits, 4) * sizeof(float);
  attn_pool_combine_kernel<<<a.B * a.H, kCombineThreads, weight_bytes, stream>>>(
      ws_acc, ws_m, ws_l, a.gamma, a.beta, z, lse, plan.splits, a.H, a.C);
  return cudaGetLastError();
}

cudaError_t attn_pool_bwd(const AttnPoolArgs& a, const AttnPoolPlan& plan, const float* z,
                          const float* dz, const float* lse, float* workspace, void* dx0,
                          void* dpatches, float* dkt_part, float* dgamma_part, float* dbeta_part,
                          cudaStream_t stream) {
  if (a.B == 0) return cudaSuccess;
  attn_pool_bwd_operands_kernel<<<dim3(a.B, a.H), kOperandThreads, 0, stream>>>(
      a.kt, dz, a.gamma, workspace, a.H, a.C);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const BwdIo io{z, dz, lse, workspace, dx0, dpatches, dkt_part, dgamma_part, dbeta_part};
  return dispatch_dtype(a.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const bool vec = tokens_vectorizable<T>(a);
    return dispatch_heads(a.H, [&](auto hm) {
      constexpr int HMAX = decltype(hm)::value;
      attn_pool_bwd_kernel<T, HMAX><<<dim3(a.B, plan.splits), plan.threads, plan.smem_bytes,
                                       stream>>>(a, io, plan.chunk, vec);
      return cudaGetLastError();
    });
  });
}

}  // namespace cvf
