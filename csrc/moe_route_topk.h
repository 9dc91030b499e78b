// Top-k selection of the CPU routing kernel on transposed blocks of W tokens (moe_route_simd.h):
// int32 keys with the order of the logits, a branch-free bubble over the k slots for small E * k,
// and for W = 8 64-bit (key, id) composites through a chain of k slots (k <= 4) or sorting
// networks (k <= 8). Ordering contract: moe_route_common.h. No torch header.
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>

#include "moe_route_simd.h"

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"  // 32-byte vectors only live inside AVX2 functions

namespace minimind_fast {
namespace simd {

// Signed int32 key with the order of the logits: -0 == +0, every NaN above +inf.
template <int W>
MINIMIND_FAST_SIMD typename Vec<W>::I order_key(typename Vec<W>::F v) {
  using I = typename Vec<W>::I;
  v = v + 0.0f;  // -0 -> +0
  const I bits = (I)v;
  const I key = bits < 0 ? bits ^ 0x7FFFFFFF : bits;
  return v != v ? splat_i<W>(std::numeric_limits<int32_t>::max()) : key;
}

// True when any lane of a comparison mask is set (portable: OR of the 64-bit halves).
template <int W>
MINIMIND_FAST_SIMD bool any_lane(typename Vec<W>::I mask) {
  using Q = typename Vec<W>::Q;
  const Q q = (Q)mask;
  int64_t bits = 0;
  for (int i = 0; i < W / 2; ++i) bits |= q[i];
  return bits != 0;
}

// Top-k of a block, all W tokens at once, branch-free per lane. Slots hold (key, id) sorted
// best first; INT32_MIN marks an empty slot (below every key). Experts come in id order, so a
// newcomer that beats the last slot (strictly: an equal key belongs to a lower id) bubbles up
// while it beats the slot above (strictly again: the slots above hold lower ids). For large E * k,
// blocks where no lane admits the expert, or no lane moves it further up, skip the rest.
constexpr int64_t kMaxBlockK = 16;

template <int W>
MINIMIND_FAST_SIMD void block_top_k(const typename Vec<W>::I* keys, int64_t E, int64_t k,
                                    typename Vec<W>::I* top_key, typename Vec<W>::I* top_id) {
  using I = typename Vec<W>::I;
  for (int64_t j = 0; j < k; ++j) {
    top_key[j] = splat_i<W>(std::numeric_limits<int32_t>::min());
    top_id[j] = splat_i<W>(0);
  }
  const bool branch_free = E * k <= 32;  // small problems: fewer mispredictions without the skips
  for (int64_t e = 0; e < E; ++e) {
    const I key = keys[e];
    const I enter = key > top_key[k - 1];
    if (!branch_free && !any_lane<W>(enter)) continue;
    top_key[k - 1] = enter ? key : top_key[k - 1];
    top_id[k - 1] = enter ? splat_i<W>(static_cast<int32_t>(e)) : top_id[k - 1];
    for (int64_t j = k - 1; j > 0; --j) {
      const I up = top_key[j] > top_key[j - 1];
      if (!branch_free && !any_lane<W>(up)) break;
      const I key_j = top_key[j], id_j = top_id[j];
      top_key[j] = up ? top_key[j - 1] : key_j;
      top_id[j] = up ? top_id[j - 1] : id_j;
      top_key[j - 1] = up ? key_j : top_key[j - 1];
      top_id[j - 1] = up ? id_j : top_id[j - 1];
    }
  }
}

// Top-k (k <= 8) of a block of 8 tokens for larger E, branch-free: each token's experts become
// distinct 64-bit composites (key << 32 | ~id: larger = ranks first), sorted in groups of 8 by
// an optimal 19-comparator network, and groups merged keeping the best 8 (max(a_i, b_7-i) is
// bitonic, then a 12-comparator bitonic sort). AVX2 / AVX-512VL only. The 8 token lanes are done
// as two halves of 4 (one 4 x int64 vector per composite), so that a half's 16 composites (the
// best 8 and the incoming group) stay in the 16 ymm registers: the networks are fully unrolled.
typedef int64_t L4 __attribute__((vector_size(32)));
typedef int32_t I4 __attribute__((vector_size(16)));

MINIMIND_FAST_SIMD void compare_exchange(L4& a, L4& b) {  // a <- larger, b <- smaller
  const L4 larger = a > b ? a : b;  // max / min (one instruction each with AVX-512VL)
  b = a > b ? b : a;
  a = larger;
}

template <int N>
MINIMIND_FAST_SIMD void run_network(L4* v, const int (&pairs)[N][2]) {
#pragma GCC unroll 32
  for (int i = 0; i < N; ++i) compare_exchange(v[pairs[i][0]], v[pairs[i][1]]);
}

constexpr int kSort8[19][2] = {{0, 2}, {1, 3}, {4, 6}, {5, 7}, {0, 4}, {1, 5}, {2, 6}, {3, 7}, {0, 1}, {2, 3},
                               {4, 5}, {6, 7}, {2, 4}, {3, 5}, {1, 4}, {3, 6}, {1, 2}, {3, 4}, {5, 6}};
constexpr int kBitonic8[12][2] = {{0, 4}, {1, 5}, {2, 6}, {3, 7}, {0, 2}, {1, 3},
                                  {4, 6}, {5, 7}, {0, 1}, {2, 3}, {4, 5}, {6, 7}};

// The composite of expert e for token lanes 4h..4h+3.
MINIMIND_FAST_SIMD L4 composite(const typename Vec<8>::I* keys, int64_t e, int h) {
  I4 half;
  std::memcpy(&half, reinterpret_cast<const char*>(&keys[e]) + h * sizeof(I4), sizeof(half));
  return (__builtin_convertvector(half, L4) << 32) | static_cast<int64_t>(~static_cast<uint32_t>(e));
}

// Composites of experts g..g+7 for token lanes 4h..4h+3; experts past E pad below every real one.
MINIMIND_FAST_SIMD void load_group(const typename Vec<8>::I* keys, int64_t E, int64_t g, int h, L4* v) {
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {
    const int64_t e = g + i;
    v[i] = e < E ? composite(keys, e, h) : L4{} + std::numeric_limits<int64_t>::min();
  }
}

MINIMIND_FAST_SIMD void block_top_k_network(const typename Vec<8>::I* keys, int64_t E, int64_t k,
                                            typename Vec<8>::I* top_id) {
  for (int h = 0; h < 2; ++h) {
    L4 best[8], group[8];
    load_group(keys, E, 0, h, best);
    run_network(best, kSort8);
    for (int64_t g = 8; g < E; g += 8) {
      load_group(keys, E, g, h, group);
      run_network(group, kSort8);
#pragma GCC unroll 8
      for (int i = 0; i < 8; ++i) best[i] = best[i] > group[7 - i] ? best[i] : group[7 - i];
      run_network(best, kBitonic8);
    }
    for (int64_t j = 0; j < k; ++j) {
      const I4 ids = ~__builtin_convertvector(best[j], I4);  // the low word held ~id
      std::memcpy(reinterpret_cast<char*>(&top_id[j]) + h * sizeof(I4), &ids, sizeof(ids));
    }
  }
}

// Top-k (k <= 4) of a block of 8 tokens for larger E: every expert's composite passes down k
// slots, each keeping the larger and handing on the smaller (k max/min pairs per expert; the
// networks above cost about 5 pairs per expert whatever k is).
template <int K>
MINIMIND_FAST_SIMD void block_top_k_chain(const typename Vec<8>::I* keys, int64_t E, typename Vec<8>::I* top_id) {
  for (int h = 0; h < 2; ++h) {
    L4 best[K];
#pragma GCC unroll 4
    for (int j = 0; j < K; ++j) best[j] = L4{} + std::numeric_limits<int64_t>::min();
    for (int64_t e = 0; e < E; ++e) {
      L4 candidate = composite(keys, e, h);
#pragma GCC unroll 4
      for (int j = 0; j < K; ++j) compare_exchange(best[j], candidate);
    }
#pragma GCC unroll 4
    for (int j = 0; j < K; ++j) {
      const I4 ids = ~__builtin_convertvector(best[j], I4);
      std::memcpy(reinterpret_cast<char*>(&top_id[j]) + h * sizeof(I4), &ids, sizeof(ids));
    }
  }
}

// 64-bit (key, ~id) for a comparison sort: larger = ranks first, all distinct within a row.
MINIMIND_FAST_SIMD uint64_t sort_key(int32_t key, int64_t expert) {
  const uint32_t high = static_cast<uint32_t>(key) ^ 0x80000000u;
  return (static_cast<uint64_t>(high) << 32) | static_cast<uint32_t>(~static_cast<uint32_t>(expert));
}
MINIMIND_FAST_SIMD int64_t sort_key_expert(uint64_t key) {
  return static_cast<uint32_t>(~static_cast<uint32_t>(key));
}

}  // namespace simd
}  // namespace minimind_fast

#pragma GCC diagnostic pop
