// Row-wise LayerNorm kernels shared by layer_norm.cu and cls_proj.cu: one warp per row.
//
// Forward: h = x (+ residual, rounded to T), two-pass statistics on h, y = LN(h) (LayerNorm) or
// GELU(LN(h)) (CLS projection). Backward: g = dy (LayerNorm) or dact ⊙ GELU'(u) (CLS
// projection), dn = g ⊙ w, dx = rstd (dn − mean(dn) − n mean(dn n)) (+ dh), per-block partial
// dweight = Σ g n and dbias = Σ g.
//
// A lane moves its row through 16-byte chunks (chunk k = lane + 32 i) and keeps what it needs
// for the next pass in shared memory, striped per lane: slot s of a lane is float4 s * 32 + lane,
// so a warp's 32 lanes touch 32 consecutive float4s (no bank conflicts) and any C works.
#pragma once

#include "common.cuh"

namespace cvf {

template <typename T>
struct RowLayout {
  static constexpr int kVec = Chunk<T>::kVec;  // elements per chunk
  static constexpr int kF4 = kVec / 4;         // float4 slots per chunk
  int chunks;                                  // ceil(C / kVec)
  int iters;                                   // chunks per lane (the last may be partial)
  __host__ __device__ explicit RowLayout(int C)
      : chunks(ceil_div(C, kVec)), iters(ceil_div(ceil_div(C, kVec), kWarp)) {}
  // float4s of one striped row (a whole warp's worth).
  __host__ __device__ int slots() const { return iters * kF4 * kWarp; }
};

// Upper bound on one striped row's bytes, for any dtype (32 chunks of at most 8 elements).
inline size_t striped_row_bytes(int C) { return static_cast<size_t>(round_up(C, 256)) * sizeof(float); }

struct RowFwdParams {
  const void* x;
  int64_t x_stride;
  const void* residual;  // null: h = x
  int64_t r_stride;
  const float* weight;
  const float* bias;
  void* y;               // TOut [M, C]
  void* h;               // T [M, C], written only with a residual
  float* mean;
  float* rstd;
  int M, C;
  float eps;
  bool vec_in;           // x and residual rows can be read in 16-byte chunks
  bool vec_out;          // y and h rows can be written in whole chunks (16-byte aligned rows)
};

__device__ __forceinline__ float gelu(float u) {
  return 0.5f * u * (1.f + erff(u * 0.70710678118654752f));
}

// Grid: ceil(M / warps); block: warps * 32; dynamic smem: warps striped rows.
template <typename T, typename TOut, bool kGelu>
__global__ void row_norm_fwd_kernel(RowFwdParams p) {
  constexpr int V = RowLayout<T>::kVec, F4 = RowLayout<T>::kF4;
  extern __shared__ float4 smem4[];
  const RowLayout<T> lay(p.C);
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarp) + warp;
  if (row >= p.M) return;  // warps are independent: no block-wide barrier in this kernel
  float4* stripe = smem4 + warp * lay.slots() + lane;
  const T* x = static_cast<const T*>(p.x) + row * p.x_stride;
  const T* res = p.residual ? static_cast<const T*>(p.residual) + row * p.r_stride : nullptr;

  // Pass 1: h (stored when there is a residual), its sum, and a striped copy.
  float sum = 0.f;
  for (int i = 0; i < lay.iters; ++i) {
    const int k = lane + i * kWarp;
    if (k >= lay.chunks) break;
    const int c = k * V;
    float v[V];
    load_chunk<T, V>(x, c, p.C, p.vec_in, v);
    if (res) {
      float r[V];
      load_chunk<T, V>(res, c, p.C, p.vec_in, r);
      // Round h to T first: the statistics are those of the h that is returned.
#pragma unroll
      for (int e = 0; e < V; ++e) v[e] = to_float(from_float<T>(v[e] + r[e]));
      store_chunk<T, V>(static_cast<T*>(p.h) + row * p.C, c, p.C, p.vec_out, v);
    }
#pragma unroll
    for (int f = 0; f < F4; ++f) {
      sum += (v[4 * f] + v[4 * f + 1]) + (v[4 * f + 2] + v[4 * f + 3]);
      stripe[(i * F4 + f) * kWarp] = make_float4(v[4 * f], v[4 * f + 1], v[4 * f + 2], v[4 * f + 3]);
    }
  }
  const float mean = warp_sum(sum) / p.C;

  // Pass 2: variance about the mean (two-pass, so no cancellation).
  float sq = 0.f;
  for (int i = 0; i < lay.iters; ++i) {
    const int k = lane + i * kWarp;
    if (k >= lay.chunks) break;
#pragma unroll
    for (int f = 0; f < F4; ++f) {
      const float4 q = stripe[(i * F4 + f) * kWarp];
      const float e[4] = {q.x, q.y, q.z, q.w};
      const int c = k * V + 4 * f;
#pragma unroll
      for (int t = 0; t < 4; ++t) {
        const float d = c + t < p.C ? e[t] - mean : 0.f;
        sq = fmaf(d, d, sq);
      }
    }
  }
  const float rstd = rsqrtf(warp_sum(sq) / p.C + p.eps);

  // Pass 3: y = (h - mean) rstd w + b, then GELU for the CLS projection.
  TOut* y = static_cast<TOut*>(p.y) + row * p.C;
  for (int i = 0; i < lay.iters; ++i) {
    const int k = lane + i * kWarp;
    if (k >= lay.chunks) break;
    const int c = k * V;
    float out[V];
#pragma unroll
    for (int f = 0; f < F4; ++f) {
      const float4 q = stripe[(i * F4 + f) * kWarp];
      const float e[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
      for (int t = 0; t < 4; ++t) {
        const int cc = c + 4 * f + t;
        float u = 0.f;
        if (cc < p.C) u = fmaf((e[t] - mean) * rstd, __ldg(p.weight + cc), __ldg(p.bias + cc));
        out[4 * f + t] = kGelu ? gelu(u) : u;
      }
    }
    store_chunk<TOut, V>(y, c, p.C, p.vec_out, out);
  }
  if (lane == 0) {
    p.mean[row] = mean;
    p.rstd[row] = rstd;
  }
}

struct RowBwdParams {
  const void* g;         // kGelu: fp32 dact [M, C]; else dy (T)
  int64_t g_stride;
  const void* dh;        // T or null (LayerNorm only)
  int64_t dh_stride;
  const void* x;         // T: the normalized input (h for LayerNorm)
  int64_t x_stride;
  const float* weight;
  const float* bias;     // kGelu only
  const float* mean;
  const float* rstd;
  void* dx;              // T [M, C]
  float* act;            // kGelu: fp32 [M, C]
  float* dw_part;        // [gridDim.x, C]
  float* db_part;
  int M, C;
  bool vec_in;           // g, dh and x rows can be read in 16-byte chunks
  bool vec_out;          // dx and act rows can be written in 16-byte chunks
};

// Grid: P blocks that stride over the rows, warp by warp; block: warps * 32; dynamic smem:
// 4 striped rows per warp (n, dn, and the warp's running dweight, dbias).
template <typename T, bool kGelu>
__global__ void row_norm_bwd_kernel(RowBwdParams p) {
  constexpr int V = RowLayout<T>::kVec, F4 = RowLayout<T>::kF4;
  using TG = typename std::conditional<kGelu, float, T>::type;
  extern __shared__ float4 smem4[];
  const RowLayout<T> lay(p.C);
  const int S = lay.slots();
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, warps = blockDim.x / kWarp;
  float4* n_s = smem4 + warp * 4 * S + lane;
  float4* dn_s = n_s + S;
  float4* dw_s = n_s + 2 * S;
  float4* db_s = n_s + 3 * S;
  for (int s = 0; s < S; s += kWarp) dw_s[s] = db_s[s] = make_float4(0.f, 0.f, 0.f, 0.f);

  for (int64_t row = static_cast<int64_t>(blockIdx.x) * warps + warp; row < p.M;
       row += static_cast<int64_t>(gridDim.x) * warps) {
    const T* x = static_cast<const T*>(p.x) + row * p.x_stride;
    const TG* gr = static_cast<const TG*>(p.g) + row * p.g_stride;
    const float mu = p.mean[row], r = p.rstd[row];

    // Pass 1: n, g, dn; the row sums of dn and dn n; the weight and bias gradients.
    float s_dn = 0.f, s_dnn = 0.f;
    for (int i = 0; i < lay.iters; ++i) {
      const int k = lane + i * kWarp;
      if (k >= lay.chunks) break;
      const int c = k * V;
      float xv[V], g[V], n[V], dn[V], act[V];
      load_chunk<T, V>(x, c, p.C, p.vec_in, xv);
      load_chunk<TG, V>(gr, c, p.C, p.vec_in, g);
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const bool in_row = c + e < p.C;
        n[e] = in_row ? (xv[e] - mu) * r : 0.f;
        const float w = in_row ? __ldg(p.weight + c + e) : 0.f;
        if (kGelu) {
          float grad;
          const float b = in_row ? __ldg(p.bias + c + e) : 0.f;
          gelu_and_grad(fmaf(n[e], w, b), act[e], grad);
          g[e] *= grad;
        }
        dn[e] = g[e] * w;
        s_dn += dn[e];
        s_dnn = fmaf(dn[e], n[e], s_dnn);
      }
      if (kGelu) store_chunk<float, V>(p.act + row * p.C, c, p.C, p.vec_out, act);
#pragma unroll
      for (int f = 0; f < F4; ++f) {
        const int s = (i * F4 + f) * kWarp;
        const float* nf = n + 4 * f;
        const float* gf = g + 4 * f;
        n_s[s] = make_float4(nf[0], nf[1], nf[2], nf[3]);
        dn_s[s] = make_float4(dn[4 * f], dn[4 * f + 1], dn[4 * f + 2], dn[4 * f + 3]);
        float4 w4 = dw_s[s], b4 = db_s[s];
        w4.x = fmaf(gf[0], nf[0], w4.x); w4.y = fmaf(gf[1], nf[1], w4.y);
        w4.z = fmaf(gf[2], nf[2], w4.z); w4.w = fmaf(gf[3], nf[3], w4.w);
        b4.x += gf[0]; b4.y += gf[1]; b4.z += gf[2]; b4.w += gf[3];
        dw_s[s] = w4;
        db_s[s] = b4;
      }
    }
    const float mean_dn = warp_sum(s_dn) / p.C, mean_dnn = warp_sum(s_dnn) / p.C;

    // Pass 2: dx (+ dh).
    const T* dh = p.dh ? static_cast<const T*>(p.dh) + row * p.dh_stride : nullptr;
    T* dx = static_cast<T*>(p.dx) + row * p.C;
    for (int i = 0; i < lay.iters; ++i) {
      const int k = lane + i * kWarp;
      if (k >= lay.chunks) break;
      const int c = k * V;
      float out[V];
      if (dh) {
        load_chunk<T, V>(dh, c, p.C, p.vec_in, out);
      } else {
#pragma unroll
        for (int e = 0; e < V; ++e) out[e] = 0.f;
      }
#pragma unroll
      for (int f = 0; f < F4; ++f) {
        const int s = (i * F4 + f) * kWarp;
        const float4 nq = n_s[s], dq = dn_s[s];
        out[4 * f + 0] += r * (dq.x - mean_dn - nq.x * mean_dnn);
        out[4 * f + 1] += r * (dq.y - mean_dn - nq.y * mean_dnn);
        out[4 * f + 2] += r * (dq.z - mean_dn - nq.z * mean_dnn);
        out[4 * f + 3] += r * (dq.w - mean_dn - nq.w * mean_dnn);
      }
      store_chunk<T, V>(dx, c, p.C, p.vec_out, out);
    }
  }

  // This block's row of partial dweight/dbias: the sum of its warps' striped accumulators.
  __syncthreads();
  for (int idx = threadIdx.x; idx < S; idx += blockDim.x) {
    float4 w4 = make_float4(0.f, 0.f, 0.f, 0.f), b4 = w4;
    for (int w = 0; w < warps; ++w) {
      const float4 a = smem4[w * 4 * S + 2 * S + idx], b = smem4[w * 4 * S + 3 * S + idx];
      w4.x += a.x; w4.y += a.y; w4.z += a.z; w4.w += a.w;
      b4.x += b.x; b4.y += b.y; b4.z += b.z; b4.w += b.w;
    }
    const int slot = idx / kWarp, ln = idx % kWarp;
    const int c = ((slot / F4) * kWarp + ln) * V + (slot % F4) * 4;  // the slot's first column
    const float wv[4] = {w4.x, w4.y, w4.z, w4.w}, bv[4] = {b4.x, b4.y, b4.z, b4.w};
    float* dw = p.dw_part + static_cast<int64_t>(blockIdx.x) * p.C;
    float* db = p.db_part + static_cast<int64_t>(blockIdx.x) * p.C;
#pragma unroll
    for (int t = 0; t < 4; ++t) {
      if (c + t < p.C) {
        dw[c + t] = wv[t];
        db[c + t] = bv[t];
      }
    }
  }
}

// ---- host ------------------------------------------------------------------------------------

// Warps per block such that their striped rows fit the default 48 KiB of shared memory (at
// least one warp; a single warp past 48 KiB opts in to more).
inline int row_warps(int C, int rows_per_warp, int max_warps) {
  const size_t per_warp = rows_per_warp * striped_row_bytes(C);
  const int fit = static_cast<int>((48u << 10) / per_warp);
  return fit < 1 ? 1 : (fit > max_warps ? max_warps : fit);
}

constexpr int kRowFwdMaxWarps = 8;
constexpr int kRowBwdMaxWarps = 4;

// Dynamic shared memory of one warp at width C: one striped row (forward) or four (backward).
template <typename T>
size_t row_warp_smem(int C, bool backward) {
  return static_cast<size_t>(backward ? 4 : 1) * RowLayout<T>(C).slots() * sizeof(float4);
}

template <typename T, typename TOut, bool kGelu>
cudaError_t launch_row_norm_fwd(const RowFwdParams& p, cudaStream_t stream) {
  if (p.M == 0) return cudaSuccess;
  const int warps = row_warps(p.C, 1, kRowFwdMaxWarps);
  const size_t smem = static_cast<size_t>(warps) * row_warp_smem<T>(p.C, false);
  auto kernel = row_norm_fwd_kernel<T, TOut, kGelu>;
  cudaError_t err = allow_smem(reinterpret_cast<const void*>(kernel), smem);
  if (err != cudaSuccess) return err;
  kernel<<<ceil_div(p.M, warps), warps * kWarp, smem, stream>>>(p);
  return cudaGetLastError();
}

// Rows of partial weight/bias gradients the backward writes (one per block, at least one).
inline int row_bwd_blocks(int M, int C) {
  const int warps = row_warps(C, 4, kRowBwdMaxWarps);
  int sms = device_attribute(cudaDevAttrMultiProcessorCount);
  if (sms <= 0) sms = 108;
  const int needed = ceil_div(M, warps);
  const int cap = 4 * sms;
  return needed < 1 ? 1 : (needed > cap ? cap : needed);
}

template <typename T, bool kGelu>
cudaError_t launch_row_norm_bwd(const RowBwdParams& p, int blocks, cudaStream_t stream) {
  const int warps = row_warps(p.C, 4, kRowBwdMaxWarps);
  const size_t smem = static_cast<size_t>(warps) * row_warp_smem<T>(p.C, true);
  auto kernel = row_norm_bwd_kernel<T, kGelu>;
  cudaError_t err = allow_smem(reinterpret_cast<const void*>(kernel), smem);
  if (err != cudaSuccess) return err;
  kernel<<<blocks, warps * kWarp, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace cvf
