// Device helpers shared by the CUDA kernels of the fused MoE routing op (moe_route_forward.cu,
// moe_route_backward.cu): launch constants, fp32/fp64 accumulation types and conversions, warp
// reductions, the ranking rule of moe_route_common.h. No torch header.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cmath>

#include "moe_route_kernels.h"

namespace minimind_fast {
namespace cuda {
namespace detail {

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kForwardWarps = 4;       // warps per block of the routing kernel
constexpr int kBlockThreads = 256;     // scan / scatter / fixup / backward blocks

template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }

template <typename T>
__device__ __forceinline__ T from_acc(float x);
template <>
__device__ __forceinline__ float from_acc<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
template <>
__device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half(x); }
template <typename T>
__device__ __forceinline__ T from_acc(double x) { return x; }

__device__ __forceinline__ float exp_acc(float x) { return expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }

template <typename acc_t>
__device__ __forceinline__ acc_t warp_max(acc_t v) {  // v is never NaN (callers skip NaN)
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) {
    const acc_t other = __shfl_xor_sync(kFullMask, v, offset);
    v = other > v ? other : v;
  }
  return v;
}

// Butterfly sum: every lane ends with the bit-identical total (a + b == b + a at each level).
template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

// (value, expert) `a` ranks before `b`; expert INT_MAX marks "no candidate".
template <typename acc_t>
__device__ __forceinline__ bool beats(acc_t a_value, int a_expert, acc_t b_value, int b_expert) {
  if (a_expert == INT_MAX) return false;
  if (b_expert == INT_MAX) return true;
  if (ranks_before(a_value, b_value)) return true;
  if (ranks_before(b_value, a_value)) return false;
  return a_expert < b_expert;
}


inline int experts_per_lane(int64_t experts) {
  return experts <= 32 ? 1 : experts <= 64 ? 2 : experts <= 128 ? 4 : 8;
}

inline unsigned grid_for(int64_t items, int64_t per_block, int64_t cap) {
  const int64_t blocks = (items + per_block - 1) / per_block;
  return static_cast<unsigned>(blocks < 1 ? 1 : blocks > cap ? cap : blocks);
}

}  // namespace detail
}  // namespace cuda
}  // namespace minimind_fast
