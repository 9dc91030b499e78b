// fp32 routing maths for the CPU, vectorised ACROSS TOKENS: a block of W tokens is held
// transposed (one W-lane vector per expert), so the work per token does not depend on E and
// E = 4 wastes no lane. The CPU kernel instantiates W = 4 (SSE2 / NEON baseline) and, on
// x86-64, W = 8 inside functions compiled for AVX2 or AVX-512VL (run-time dispatch). Top-k
// selection: moe_route_topk.h. No torch header.
//
// GCC vector extensions (__builtin_shuffle, vector ?:): needs GCC >= 9, the Linux toolchain.
//
// Numerics follow the PyTorch reference: softmax = exp(x - max) * (1 / sum), the sum in expert
// order (fp32 within groups of 8, fp64 across); sigmoid = 1 / (1 + exp(-x)); exp is Cephes'
// expf (about 1 ulp; -inf -> 0, NaN propagates). Expert order (moe_route_common.h) is decided on
// int32 keys of the logits (moe_route_topk.h).
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>

#include "moe_route_common.h"

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"  // 32-byte vectors only live inside AVX2 functions

namespace minimind_fast {
namespace simd {

#define MINIMIND_FAST_SIMD inline __attribute__((always_inline))

template <int W>
struct Vec;
template <>
struct Vec<4> {
  typedef float F __attribute__((vector_size(16)));
  typedef int32_t I __attribute__((vector_size(16)));
  typedef uint32_t U __attribute__((vector_size(16)));
  typedef int64_t Q __attribute__((vector_size(16)));
  typedef double D __attribute__((vector_size(32)));
};
template <>
struct Vec<8> {
  typedef float F __attribute__((vector_size(32)));
  typedef int32_t I __attribute__((vector_size(32)));
  typedef uint32_t U __attribute__((vector_size(32)));
  typedef int64_t Q __attribute__((vector_size(32)));
  typedef double D __attribute__((vector_size(64)));
};

template <int W>
MINIMIND_FAST_SIMD typename Vec<W>::F splat(float x) {
  return typename Vec<W>::F{} + x;
}
template <int W>
MINIMIND_FAST_SIMD typename Vec<W>::I splat_i(int32_t x) {
  return typename Vec<W>::I{} + x;
}

// exp of the reduced argument c (any finite float in [-87.3, 88.3]); the callers handle the rest.
template <int W>
MINIMIND_FAST_SIMD typename Vec<W>::F exp_reduced(typename Vec<W>::F c) {
  using F = typename Vec<W>::F;
  using I = typename Vec<W>::I;
  using U = typename Vec<W>::U;
  const F n = (c * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  F r = c - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  F p = splat<W>(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const U bits = (U)(__builtin_convertvector(n, I) + 127) << 23;  // n + 127 in [1, 254]
  return p * (F)bits;
}

template <int W>
MINIMIND_FAST_SIMD typename Vec<W>::F exp_vec(typename Vec<W>::F x) {
  using F = typename Vec<W>::F;
  F c = x != x ? splat<W>(0.0f) : x;
  c = c < -87.3f ? splat<W>(-87.3f) : c;
  c = c > 88.3f ? splat<W>(88.3f) : c;
  F y = exp_reduced<W>(c);
  y = x < -87.3f ? splat<W>(0.0f) : y;
  y = x > 88.3f ? splat<W>(std::numeric_limits<float>::infinity()) : y;
  return x != x ? x : y;
}

// exp_vec for x <= 0 or NaN (softmax's x - max): one clamp, which also turns NaN into a number.
template <int W>
MINIMIND_FAST_SIMD typename Vec<W>::F exp_nonpositive(typename Vec<W>::F x) {
  using F = typename Vec<W>::F;
  const F y = exp_reduced<W>(x > -87.3f ? x : splat<W>(-87.3f));
  return x != x ? x : x < -87.3f ? splat<W>(0.0f) : y;
}

// ---- transposes: W rows (tokens) x W experts <-> W expert vectors over the W tokens ----

template <int W>
MINIMIND_FAST_SIMD void transpose(typename Vec<W>::F* r) {
  using F = typename Vec<W>::F;
  using I = typename Vec<W>::I;
  if constexpr (W == 4) {
    const F t0 = __builtin_shuffle(r[0], r[1], I{0, 4, 1, 5}), t1 = __builtin_shuffle(r[0], r[1], I{2, 6, 3, 7});
    const F t2 = __builtin_shuffle(r[2], r[3], I{0, 4, 1, 5}), t3 = __builtin_shuffle(r[2], r[3], I{2, 6, 3, 7});
    r[0] = __builtin_shuffle(t0, t2, I{0, 1, 4, 5});
    r[1] = __builtin_shuffle(t0, t2, I{2, 3, 6, 7});
    r[2] = __builtin_shuffle(t1, t3, I{0, 1, 4, 5});
    r[3] = __builtin_shuffle(t1, t3, I{2, 3, 6, 7});
  } else {
    const I lo = {0, 8, 1, 9, 4, 12, 5, 13}, hi = {2, 10, 3, 11, 6, 14, 7, 15};
    const I lo2 = {0, 1, 8, 9, 4, 5, 12, 13}, hi2 = {2, 3, 10, 11, 6, 7, 14, 15};
    const I lo4 = {0, 1, 2, 3, 8, 9, 10, 11}, hi4 = {4, 5, 6, 7, 12, 13, 14, 15};
    F t[8], u[8];
    for (int i = 0; i < 4; ++i) {
      t[2 * i] = __builtin_shuffle(r[2 * i], r[2 * i + 1], lo);
      t[2 * i + 1] = __builtin_shuffle(r[2 * i], r[2 * i + 1], hi);
    }
    for (int i = 0; i < 2; ++i) {  // u[4i + m]: pairs (t[4i], t[4i+2]) and (t[4i+1], t[4i+3])
      u[4 * i + 0] = __builtin_shuffle(t[4 * i], t[4 * i + 2], lo2);
      u[4 * i + 1] = __builtin_shuffle(t[4 * i], t[4 * i + 2], hi2);
      u[4 * i + 2] = __builtin_shuffle(t[4 * i + 1], t[4 * i + 3], lo2);
      u[4 * i + 3] = __builtin_shuffle(t[4 * i + 1], t[4 * i + 3], hi2);
    }
    for (int j = 0; j < 4; ++j) {
      r[j] = __builtin_shuffle(u[j], u[j + 4], lo4);
      r[j + 4] = __builtin_shuffle(u[j], u[j + 4], hi4);
    }
  }
}

// Row loaders: W consecutive values of one row as fp32 (raw bf16 bits are the top half of fp32).
template <int W>
MINIMIND_FAST_SIMD typename Vec<W>::F load_row(const float* src) {
  typename Vec<W>::F v;
  std::memcpy(&v, src, sizeof(v));
  return v;
}
template <int W>
MINIMIND_FAST_SIMD typename Vec<W>::F load_row(const uint16_t* bf16_bits) {
  typedef uint16_t H __attribute__((vector_size(2 * W)));
  H h;
  std::memcpy(&h, bf16_bits, sizeof(h));
  return (typename Vec<W>::F)(__builtin_convertvector(h, typename Vec<W>::U) << 16);
}

// One element as fp32: a float, or raw bf16 bits (the top half of an fp32).
MINIMIND_FAST_SIMD float load_one(const float* value) { return *value; }
MINIMIND_FAST_SIMD float load_one(const uint16_t* bf16_bits) {
  const uint32_t bits = static_cast<uint32_t>(*bf16_bits) << 16;
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

// value[e] = lane vector of expert e over tokens t0 .. t0 + n - 1 (rows `stride` elements apart;
// lanes >= n are zero). Needs E % W == 0, or W == 8 and E == 4. Returns false otherwise.
template <int W, typename T>
MINIMIND_FAST_SIMD bool load_block(const T* rows, int64_t E, int n, typename Vec<W>::F* value) {
  using F = typename Vec<W>::F;
  using I = typename Vec<W>::I;
  if (E % W == 0) {
    for (int64_t g = 0; g < E; g += W) {
      F* tile = value + g;
      for (int w = 0; w < W; ++w) tile[w] = w < n ? load_row<W>(rows + w * E + g) : splat<W>(0.0f);
      transpose<W>(tile);
    }
    return true;
  }
  if constexpr (W == 8) {
    if (E == 4) {  // two rows per 8-wide load
      F q[4];
      for (int m = 0; m < 4; ++m) {
        if (2 * m + 1 < n) {
          q[m] = load_row<8>(rows + 8 * m);
        } else {
          q[m] = splat<8>(0.0f);
          if (2 * m < n)
            for (int e = 0; e < 4; ++e) q[m][e] = load_one(rows + 8 * m + e);  // row 2m only
        }
      }
      const F a = __builtin_shuffle(q[0], q[1], I{0, 4, 8, 12, 1, 5, 9, 13});
      const F b = __builtin_shuffle(q[0], q[1], I{2, 6, 10, 14, 3, 7, 11, 15});
      const F c = __builtin_shuffle(q[2], q[3], I{0, 4, 8, 12, 1, 5, 9, 13});
      const F d = __builtin_shuffle(q[2], q[3], I{2, 6, 10, 14, 3, 7, 11, 15});
      value[0] = __builtin_shuffle(a, c, I{0, 1, 2, 3, 8, 9, 10, 11});
      value[1] = __builtin_shuffle(a, c, I{4, 5, 6, 7, 12, 13, 14, 15});
      value[2] = __builtin_shuffle(b, d, I{0, 1, 2, 3, 8, 9, 10, 11});
      value[3] = __builtin_shuffle(b, d, I{4, 5, 6, 7, 12, 13, 14, 15});
      return true;
    }
  }
  return false;
}

// The inverse: rows t0 .. t0 + n - 1 of `out` (E floats each) from the lane vectors. Same
// shape condition as load_block.
template <int W>
MINIMIND_FAST_SIMD bool store_block(const typename Vec<W>::F* value, int64_t E, int n, float* rows) {
  using F = typename Vec<W>::F;
  using I = typename Vec<W>::I;
  if (E % W == 0) {
    for (int64_t g = 0; g < E; g += W) {
      F tile[W];
      for (int w = 0; w < W; ++w) tile[w] = value[g + w];
      transpose<W>(tile);
      for (int w = 0; w < n; ++w) std::memcpy(rows + w * E + g, &tile[w], sizeof(F));
    }
    return true;
  }
  if constexpr (W == 8) {
    if (E == 4) {
      const F a = __builtin_shuffle(value[0], value[1], I{0, 8, 1, 9, 2, 10, 3, 11});
      const F b = __builtin_shuffle(value[2], value[3], I{0, 8, 1, 9, 2, 10, 3, 11});
      const F c = __builtin_shuffle(value[0], value[1], I{4, 12, 5, 13, 6, 14, 7, 15});
      const F d = __builtin_shuffle(value[2], value[3], I{4, 12, 5, 13, 6, 14, 7, 15});
      F q[4];
      q[0] = __builtin_shuffle(a, b, I{0, 1, 8, 9, 2, 3, 10, 11});
      q[1] = __builtin_shuffle(a, b, I{4, 5, 12, 13, 6, 7, 14, 15});
      q[2] = __builtin_shuffle(c, d, I{0, 1, 8, 9, 2, 3, 10, 11});
      q[3] = __builtin_shuffle(c, d, I{4, 5, 12, 13, 6, 7, 14, 15});
      for (int m = 0; m < 4; ++m) {
        if (2 * m + 1 < n) {
          std::memcpy(rows + 8 * m, &q[m], sizeof(F));
        } else if (2 * m < n) {
          for (int e = 0; e < 4; ++e) rows[8 * m + e] = q[m][e];
        }
      }
      return true;
    }
  }
  return false;
}

// Writes slots [0, k) of lanes [0, n) as rows t0 .. t0 + n - 1 of (T, k) outputs: vector stores
// for k = 1 and 2 (interleaved), element stores otherwise.
template <int W>
MINIMIND_FAST_SIMD void store_slots(const typename Vec<W>::F* weight, const typename Vec<W>::I* id, int64_t k,
                                    int n, float* weight_rows, int64_t* id_rows) {
  using F = typename Vec<W>::F;
  using I = typename Vec<W>::I;
  typedef int32_t I4 __attribute__((vector_size(16)));
  auto store_ids = [&](const I& ids, int count, int64_t* out) {  // int32 lanes -> int64 memory
    for (int h = 0; h < W / 4; ++h) {
      I4 quarter;
      std::memcpy(&quarter, reinterpret_cast<const char*>(&ids) + 16 * h, sizeof(quarter));
      const int64_t wide[4] = {quarter[0], quarter[1], quarter[2], quarter[3]};
      const int take = count - 4 * h < 4 ? count - 4 * h : 4;
      if (take > 0) std::memcpy(out + 4 * h, wide, sizeof(int64_t) * take);
    }
  };
  if (k == 1 && n == W) {
    std::memcpy(weight_rows, &weight[0], sizeof(F));
    store_ids(id[0], W, id_rows);
    return;
  }
  if (k == 2 && n == W) {
    I lo_mask, hi_mask;
    for (int i = 0; i < W / 2; ++i) {
      lo_mask[2 * i] = i, lo_mask[2 * i + 1] = W + i;
      hi_mask[2 * i] = W / 2 + i, hi_mask[2 * i + 1] = W + W / 2 + i;
    }
    const F w_lo = __builtin_shuffle(weight[0], weight[1], lo_mask);
    const F w_hi = __builtin_shuffle(weight[0], weight[1], hi_mask);
    std::memcpy(weight_rows, &w_lo, sizeof(F));
    std::memcpy(weight_rows + W, &w_hi, sizeof(F));
    store_ids(__builtin_shuffle(id[0], id[1], lo_mask), W, id_rows);
    store_ids(__builtin_shuffle(id[0], id[1], hi_mask), W, id_rows + W);
    return;
  }
  for (int w = 0; w < n; ++w)
    for (int64_t j = 0; j < k; ++j) {
      weight_rows[w * k + j] = weight[j][w];
      id_rows[w * k + j] = id[j][w];
    }
}

// The inverse of store_slots: slots [0, k) of rows t0 .. t0 + n - 1 of (T, k) inputs as lane
// vectors (lanes >= n: weight 0, id 0).
template <int W>
MINIMIND_FAST_SIMD void load_slots(const float* weight_rows, const int64_t* id_rows, int64_t k, int n,
                                   typename Vec<W>::F* weight, typename Vec<W>::I* id) {
  if (k == 1 && n == W) {
    weight[0] = load_row<W>(weight_rows);
    for (int w = 0; w < W; ++w) id[0][w] = static_cast<int32_t>(id_rows[w]);
    return;
  }
  for (int64_t j = 0; j < k; ++j) weight[j] = splat<W>(0.0f), id[j] = splat_i<W>(0);
  for (int w = 0; w < n; ++w)
    for (int64_t j = 0; j < k; ++j) {
      weight[j][w] = weight_rows[w * k + j];
      id[j][w] = static_cast<int32_t>(id_rows[w * k + j]);
    }
}

// Sum of the lanes, pairwise (halves added until one lane is left).
template <int W>
MINIMIND_FAST_SIMD float sum_lanes(typename Vec<W>::F v) {
  using I = typename Vec<W>::I;
  if constexpr (W == 8) {
    v += __builtin_shuffle(v, I{4, 5, 6, 7, 0, 1, 2, 3});
    v += __builtin_shuffle(v, I{2, 3, 0, 1, 6, 7, 4, 5});
    v += __builtin_shuffle(v, I{1, 0, 3, 2, 5, 4, 7, 6});
  } else {
    v += __builtin_shuffle(v, I{2, 3, 0, 1});
    v += __builtin_shuffle(v, I{1, 0, 3, 2});
  }
  return v[0];
}

// Scores of a transposed block: value[e] (expert e's logits for the block's tokens) -> score[e].
template <int W>
MINIMIND_FAST_SIMD void block_scores(const typename Vec<W>::F* value, int64_t E, Scoring scoring,
                                     typename Vec<W>::F* score) {
  using F = typename Vec<W>::F;
  if (scoring == Scoring::kSoftmax) {
    // max over the non-NaN logits; a NaN anywhere makes the row NaN, like torch.softmax
    F max_value = splat<W>(-std::numeric_limits<float>::infinity());
    for (int64_t e = 0; e < E; ++e) max_value = value[e] > max_value ? value[e] : max_value;
    // the denominator: fp32 sums of 8 experts, added up in fp64 (one long fp32 chain would
    // drift by several ulp at E = 256; converting every term would cost more than the exp).
    // E <= 8 is one group: 1 / sum in fp32 is then the same number (a quotient of floats
    // computed in fp64 and rounded to fp32 is correctly rounded), without the fp64 division.
    F inv_sum;
    if (E <= 8) {
      F sum = splat<W>(0.0f);
      for (int64_t e = 0; e < E; ++e) {
        score[e] = exp_nonpositive<W>(value[e] - max_value);
        sum += score[e];
      }
      inv_sum = 1.0f / sum;
    } else {
      using D = typename Vec<W>::D;
      D sum = D{} + 0.0;
      F group = splat<W>(0.0f);
      for (int64_t e = 0; e < E; ++e) {
        score[e] = exp_nonpositive<W>(value[e] - max_value);
        group += score[e];
        if ((e & 7) == 7 || e + 1 == E) {
          sum += __builtin_convertvector(group, D);
          group = splat<W>(0.0f);
        }
      }
      inv_sum = __builtin_convertvector(1.0 / sum, F);
    }
    for (int64_t e = 0; e < E; ++e) score[e] *= inv_sum;
  } else {
    for (int64_t e = 0; e < E; ++e) score[e] = 1.0f / (1.0f + exp_vec<W>(-value[e]));
  }
}

}  // namespace simd
}  // namespace minimind_fast

#pragma GCC diagnostic pop
