// Device helpers shared by the kernels: dtype conversion, 16-byte chunk loads/stores, warp
// reductions. Plain CUDA only (no torch headers), so every .cu file compiles without torch.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "launchers.h"

namespace cvf {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarp = 32;

__host__ __device__ constexpr int ceil_div(int a, int b) { return (a + b - 1) / b; }
__host__ __device__ constexpr int round_up(int a, int b) { return ceil_div(a, b) * b; }

// ---- dtype conversion (all arithmetic is fp32) ------------------------------------------------

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// ---- 16-byte chunks ---------------------------------------------------------------------------
// A "chunk" is kVec = 16 / sizeof(T) consecutive elements: what one 16-byte access moves. With
// `vec` set (the caller checked that the row pointers are 16-byte aligned and the width is a
// multiple of the chunk), a chunk moves as 16-byte words; otherwise element by element, masked
// at the row's end `n`.

template <typename T> struct Chunk { static constexpr int kVec = 16 / sizeof(T); };

// Elements [c, c + K) of `row` as floats, zeros past `n`. With `vec`, K * sizeof(T) must be a
// multiple of 16 and row + c 16-byte aligned.
template <typename T, int K>
__device__ __forceinline__ void load_chunk(const T* __restrict__ row, int c, int n, bool vec,
                                           float (&out)[K]) {
  static_assert((K * sizeof(T)) % 16 == 0, "a chunk load moves whole 16-byte words");
  if (vec) {
    constexpr int kPerWord = 16 / sizeof(T);
#pragma unroll
    for (int w = 0; w < K / kPerWord; ++w) {
      const uint4 raw = __ldg(reinterpret_cast<const uint4*>(row + c + w * kPerWord));
      const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int i = 0; i < kPerWord; ++i) out[w * kPerWord + i] = to_float(e[i]);
    }
  } else {
#pragma unroll
    for (int i = 0; i < K; ++i) out[i] = c + i < n ? to_float(row[c + i]) : 0.f;
  }
}

// Stores the K values `in` to elements [c, c + K) of `row` (rounded to TOut), skipping those past
// `n`. With `vec`, the chunk moves as 16-byte words, or as 8-byte ones where it is 8 bytes long
// (4 fp32 values written as fp16/bf16), and row + c must be aligned to the word.
template <typename TOut, int K>
__device__ __forceinline__ void store_chunk(TOut* __restrict__ row, int c, int n, bool vec,
                                            const float (&in)[K]) {
  constexpr int kBytes = K * static_cast<int>(sizeof(TOut));
  static_assert(kBytes % 8 == 0, "a chunk store moves whole 8- or 16-byte words");
  using Word = typename std::conditional<kBytes % 16 == 0, uint4, uint2>::type;
  if (vec) {
    constexpr int kPerWord = sizeof(Word) / sizeof(TOut);
#pragma unroll
    for (int w = 0; w < K / kPerWord; ++w) {
      Word raw;
      TOut* e = reinterpret_cast<TOut*>(&raw);
#pragma unroll
      for (int i = 0; i < kPerWord; ++i) e[i] = from_float<TOut>(in[w * kPerWord + i]);
      *reinterpret_cast<Word*>(row + c + w * kPerWord) = raw;
    }
  } else {
#pragma unroll
    for (int i = 0; i < K; ++i)
      if (c + i < n) row[c + i] = from_float<TOut>(in[i]);
  }
}

// True when `p` is 16-byte aligned.
__host__ __device__ inline bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

// ---- warp reductions --------------------------------------------------------------------------

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}

// One step of warp_reduce_scatter on the first N of the NV values: this lane keeps the upper
// half if bit `offset` of its index is set (its partner the lower) and sends the other half.
// The choice is a bitwise blend: selecting between array elements would put v in local memory.
template <int N, int NV>
__device__ __forceinline__ void reduce_scatter_steps(float (&v)[NV], int lane) {
  if constexpr (N > 1) {
    constexpr int half = N / 2, offset = (kWarp / 2) / (NV / N);
    const unsigned upper = (lane & offset) ? ~0u : 0u;
#pragma unroll
    for (int i = 0; i < half; ++i) {
      const unsigned lo = __float_as_uint(v[i]), hi = __float_as_uint(v[i + half]);
      const float keep = __uint_as_float((hi & upper) | (lo & ~upper));
      const float give = __uint_as_float((lo & upper) | (hi & ~upper));
      v[i] = keep + __shfl_xor_sync(kFullMask, give, offset);
    }
    reduce_scatter_steps<half, NV>(v, lane);
  }
}

// Sums each of the NV values across the warp in NV - 1 + log2(32 / NV) shuffles instead of
// 5 * NV: every step halves the set a lane keeps and swaps the other half with its partner.
// Returns, in lane l, the warp total of v[l / (32 / NV)].
template <int NV>
__device__ __forceinline__ float warp_reduce_scatter(float (&v)[NV], int lane) {
  static_assert(NV >= 1 && NV <= kWarp && (NV & (NV - 1)) == 0, "NV: a power of two <= 32");
  reduce_scatter_steps<NV, NV>(v, lane);
  float total = v[0];
#pragma unroll
  for (int offset = kWarp / 2 / NV; offset > 0; offset >>= 1)
    total += __shfl_xor_sync(kFullMask, total, offset);
  return total;
}

// GELU (exact, erf) and its derivative.
__device__ __forceinline__ void gelu_and_grad(float u, float& act, float& grad) {
  const float cdf = 0.5f * (1.f + erff(u * 0.70710678118654752f));
  const float pdf = expf(-0.5f * u * u) * 0.39894228040143268f;
  act = u * cdf;
  grad = cdf + u * pdf;
}

// ---- host: dtype dispatch ----------------------------------------------------------------------

template <typename T> struct TypeTag { using type = T; };

// Calls f(TypeTag<T>{}) with T the element type of `dtype`.
template <typename F>
decltype(auto) dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat16: return f(TypeTag<__half>{});
    case DType::kBFloat16: return f(TypeTag<__nv_bfloat16>{});
    case DType::kFloat32: break;
  }
  return f(TypeTag<float>{});
}

// Device attributes of the current device (0 on error; the launch that follows reports it).
inline int device_attribute(cudaDeviceAttr attr) {
  int dev = 0, value = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&value, attr, dev) != cudaSuccess)
    return 0;
  return value;
}

// Lets `kernel` launch with more than the default 48 KiB of dynamic shared memory when `bytes`
// needs it. The limit is raised to the device's opt-in maximum, the same value from every
// call, and only where it is below `bytes` (once raised, a call costs one attribute query):
// were it set to each call's own size, a host thread launching a smaller configuration of the
// same kernel could lower it between another thread's setting and its launch.
inline cudaError_t allow_smem(const void* kernel, size_t bytes) {
  if (bytes <= (48u << 10)) return cudaSuccess;
  cudaFuncAttributes attributes;
  cudaError_t err = cudaFuncGetAttributes(&attributes, kernel);
  if (err != cudaSuccess || static_cast<size_t>(attributes.maxDynamicSharedSizeBytes) >= bytes)
    return err;
  const int optin = device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin);
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                              optin - static_cast<int>(attributes.sharedSizeBytes));
}

}  // namespace cvf
