// Fused MoE routing: the TORCH_LIBRARY schema of minimind_fast::moe_route (+ its backward) and
// the CPU implementation. Follows MiniMind's MoEGate (model/model_minimind.py): softmax or
// sigmoid scores, top-k, renormalisation only when top_k > 1 and norm_topk_prob, and the
// statistics of its sequence-level and token-level auxiliary losses; adds the expert-sorted
// permutation that a grouped expert computation needs.
//
// CPU forward, over fixed 256-token chunks (so results do not depend on the thread count):
//   1. (parallel) blocks of W tokens, transposed in registers, fp32 maths across the tokens
//      (moe_route_simd.h; W = 8 under AVX2, else 4): scores, top-k by logit (a branch-free
//      bubble over the k slots, sorting networks for k <= 8 and E > 16, a per-token partial sort
//      for k > 16), weights; per chunk, the pair counts of each expert and the score sums of each
//      sequence segment (moe_route_common.h);
//   2. (serial, E x chunks) exclusive scan of the chunk counts -> expert offsets and the first
//      output position of every (chunk, expert); token means of the scores;
//   3. (parallel) counting-sort scatter of each chunk's pairs (stable: pairs visited in order);
//   4. (parallel) sequences that straddle chunks: add their head/tail segments in chunk order.
// fp64 logits (gradcheck) take a scalar fp64 path with the same formulas.
// Backward: from the saved scores, no exp; fp32 on transposed blocks like the forward (maths
// above route_backward_rows, the fp64 version). Autograd: moe_route_autograd.cpp.
#include "moe_route.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <functional>
#include <limits>
#include <memory>
#include <numeric>
#include <string>
#include <type_traits>
#include <vector>

#include "moe_route_simd.h"

// 32-byte vectors are passed only between always-inline helpers inside AVX2 functions.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace minimind_fast {
namespace {

constexpr int64_t kChunkTokens = 256;  // a multiple of every block width

Scoring parse_scoring(c10::string_view scoring, const char* op) {
  if (scoring == "softmax") return Scoring::kSoftmax;
  if (scoring == "sigmoid") return Scoring::kSigmoid;
  TORCH_CHECK(false, op, ": scoring must be 'softmax' or 'sigmoid', got '",
              std::string(scoring.data(), scoring.size()), "'");
}

at::ScalarType real_dtype(at::ScalarType logits_dtype) {
  return logits_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

// AVX2 + FMA present, unless MINIMIND_FAST_CPU_NO_AVX2=1 (the C++ test runs both paths).
bool use_avx2() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  static const bool supported = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const char* off = std::getenv("MINIMIND_FAST_CPU_NO_AVX2");
  return supported && !(off && std::string(off) == "1");
#else
  return false;
#endif
}

// ---- per-chunk statistics: segments of sequences inside a chunk (moe_route_common.h) ----

template <typename real_t>
struct SegmentWriter {
  int64_t E, L, chunk = 0, c0 = 0, c1 = 0, seq = 0, seq_end = 0;
  real_t* seq_prob_mean;
  int64_t* seq_counts;
  double* part_prob;  // [chunk][head, tail][expert]
  int64_t* part_count;
  std::vector<double> seg_prob, total_prob;
  std::vector<int64_t> seg_count, total_count;

  SegmentWriter(int64_t experts, int64_t seq_len, real_t* spm, int64_t* sc, double* pp, int64_t* pc)
      : E(experts), L(seq_len), seq_prob_mean(spm), seq_counts(sc), part_prob(pp), part_count(pc),
        seg_prob(experts), total_prob(experts), seg_count(experts), total_count(experts) {}

  void begin_chunk(int64_t c, int64_t first_token, int64_t end_token) {
    chunk = c, c0 = first_token, c1 = end_token;
    seq = c0 / L, seq_end = (seq + 1) * L;
    std::fill(seg_prob.begin(), seg_prob.end(), 0.0);
    std::fill(total_prob.begin(), total_prob.end(), 0.0);
    std::fill(seg_count.begin(), seg_count.end(), 0);
    std::fill(total_count.begin(), total_count.end(), 0);
  }

  // The segment of sequence `seq` ends here (at seq_end or at the end of the chunk).
  void end_segment() {
    const int64_t seq_begin = seq * L;
    if (seq_begin >= c0 && seq_end <= c1) {
      for (int64_t e = 0; e < E; ++e) {
        seq_prob_mean[seq * E + e] = static_cast<real_t>(seg_prob[e] / static_cast<double>(L));
        seq_counts[seq * E + e] = seg_count[e];
      }
    } else {
      const int64_t base = (chunk * 2 + (seq_begin < c0 ? 0 : 1)) * E;
      std::copy(seg_prob.begin(), seg_prob.end(), part_prob + base);
      std::copy(seg_count.begin(), seg_count.end(), part_count + base);
    }
    for (int64_t e = 0; e < E; ++e) {
      total_prob[e] += seg_prob[e];
      total_count[e] += seg_count[e];
    }
    std::fill(seg_prob.begin(), seg_prob.end(), 0.0);
    std::fill(seg_count.begin(), seg_count.end(), 0);
    ++seq;
    seq_end += L;
  }

  void end_chunk(double* chunk_prob, int64_t* chunk_count) const {
    std::copy(total_prob.begin(), total_prob.end(), chunk_prob + chunk * E);
    std::copy(total_count.begin(), total_count.end(), chunk_count + chunk * E);
  }
};

template <typename real_t>
struct ForwardOut {
  real_t* topk_weight;
  int64_t* topk_idx;
  real_t* scores;
  int64_t* chunk_count;  // [chunk][expert]
  double* chunk_prob;    // [chunk][expert]
};

// 64-byte aligned storage for n trivially constructible T (vector types need their alignment).
template <typename T>
class AlignedArray {
 public:
  explicit AlignedArray(int64_t n) : raw_(new unsigned char[n * sizeof(T) + 64]) {
    const auto address = reinterpret_cast<uintptr_t>(raw_.get());
    data_ = reinterpret_cast<T*>((address + 63) & ~uintptr_t{63});
  }
  T* data() { return data_; }

 private:
  std::unique_ptr<unsigned char[]> raw_;
  T* data_;
};

// Scratch of one thread for the fp32 block path.
template <int W>
struct BlockScratch {
  AlignedArray<typename simd::Vec<W>::F> value, score, acc, weight;  // E, E, E, k
  AlignedArray<typename simd::Vec<W>::I> keys, count, top_key, top_id;  // E, E, k, k
  std::vector<int64_t> ids;                                               // W x k
  std::vector<uint64_t> sort_keys;                                        // E
  BlockScratch(int64_t E, int64_t k)
      : value(E), score(E), acc(E), weight(k), keys(E), count(E), top_key(k), top_id(k), ids(W * k),
        sort_keys(E) {}
};

// Pass 1 for one chunk, fp32 maths on transposed blocks of W tokens.
template <int W, typename scalar_t>
MINIMIND_FAST_SIMD void forward_chunk_fp32(const scalar_t* x, const RouteShape& shape, int64_t c,
                                           const ForwardOut<float>& out, SegmentWriter<float>& seg,
                                           BlockScratch<W>& scratch) {
  using F = typename simd::Vec<W>::F;
  using I = typename simd::Vec<W>::I;
  const int64_t T = shape.tokens, E = shape.experts, k = shape.top_k;
  const int64_t c0 = c * kChunkTokens, c1 = std::min(T, c0 + kChunkTokens);
  F* value = scratch.value.data();
  F* score = scratch.score.data();
  F* acc = scratch.acc.data();
  I* keys = scratch.keys.data();
  I* top_key = scratch.top_key.data();
  I* top_id = scratch.top_id.data();
  I* count = scratch.count.data();
  int64_t* ids = scratch.ids.data();
  const bool vector_slots = k <= simd::kMaxBlockK;          // top-k slots as lane vectors
  const bool small_e = E <= 16;                              // select by blends, count by compares
  const bool vector_counts = vector_slots && small_e;
  const bool network = k <= 8 && E > 16 && E * k > 32;       // sorting networks beat the bubble
  I lane_index;
  for (int w = 0; w < W; ++w) lane_index[w] = w;
  seg.begin_chunk(c, c0, c1);
  for (int64_t e = 0; e < E; ++e) acc[e] = simd::splat<W>(0.0f), count[e] = simd::splat_i<W>(0);
  for (int64_t t0 = c0; t0 < c1; t0 += W) {
    const int n = static_cast<int>(std::min<int64_t>(W, c1 - t0));
    bool loaded = false;  // in-register transposes for fp32 / bf16 rows, else element by element
    if constexpr (std::is_same_v<scalar_t, float>) {
      loaded = simd::load_block<W>(x + t0 * E, E, n, value);
    } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      loaded = simd::load_block<W>(reinterpret_cast<const uint16_t*>(x + t0 * E), E, n, value);
    }
    if (!loaded) {
      if (n < W)
        for (int64_t e = 0; e < E; ++e) value[e] = simd::splat<W>(0.0f);  // finite padding lanes
      for (int w = 0; w < n; ++w) {
        const scalar_t* row = x + (t0 + w) * E;
        for (int64_t e = 0; e < E; ++e) value[e][w] = static_cast<float>(row[e]);
      }
    }
    simd::block_scores<W>(value, E, shape.scoring, score);
    for (int64_t e = 0; e < E; ++e) keys[e] = simd::order_key<W>(value[e]);
    if (vector_slots) {
      if constexpr (W == 8) {
        if (network) simd::block_top_k_network(keys, E, k, top_id);
        else simd::block_top_k<W>(keys, E, k, top_key, top_id);
      } else {
        simd::block_top_k<W>(keys, E, k, top_key, top_id);
      }
    } else {  // large k: a comparison sort per token on distinct 64-bit (key, ~id)
      uint64_t* sort_keys = scratch.sort_keys.data();
      for (int w = 0; w < n; ++w) {
        for (int64_t e = 0; e < E; ++e) sort_keys[e] = simd::sort_key(keys[e][w], e);
        std::partial_sort(sort_keys, sort_keys + k, sort_keys + E, std::greater<uint64_t>());
        for (int64_t j = 0; j < k; ++j) ids[w * k + j] = simd::sort_key_expert(sort_keys[j]);
      }
    }
    if (!simd::store_block<W>(score, E, n, out.scores + t0 * E))
      for (int w = 0; w < n; ++w)
        for (int64_t e = 0; e < E; ++e) out.scores[(t0 + w) * E + e] = score[e][w];
    if (vector_slots) {  // weights of all lanes at once, summed in slot order as MiniMind does
      F* weight = scratch.weight.data();
      F selected = simd::splat<W>(0.0f);
      for (int64_t j = 0; j < k; ++j) {
        if (small_e) {
          F v = simd::splat<W>(0.0f);
          for (int64_t e = 0; e < E; ++e) v = top_id[j] == static_cast<int32_t>(e) ? score[e] : v;
          weight[j] = v;
        } else {
          for (int w = 0; w < W; ++w) weight[j][w] = score[top_id[j][w]][w];
        }
        selected += weight[j];
      }
      if (shape.normalize) {
        const F denom = selected + static_cast<float>(kNormEps);
        for (int64_t j = 0; j < k; ++j) weight[j] = weight[j] / denom;
      }
      simd::store_slots<W>(weight, top_id, k, n, out.topk_weight + t0 * k, out.topk_idx + t0 * k);
      if (!vector_counts)
        for (int w = 0; w < n; ++w)
          for (int64_t j = 0; j < k; ++j) ids[w * k + j] = top_id[j][w];
    } else {
      for (int w = 0; w < n; ++w) {
        const int64_t t = t0 + w;
        const float* score_row = out.scores + t * E;
        const int64_t* id = ids + w * k;
        float* weight = out.topk_weight + t * k;
        float selected = 0.0f;
        for (int64_t j = 0; j < k; ++j) {  // slot order, as MiniMind sums them
          weight[j] = score_row[id[j]];
          selected += weight[j];
        }
        if (shape.normalize) {
          const float denom = selected + static_cast<float>(kNormEps);
          for (int64_t j = 0; j < k; ++j) weight[j] = weight[j] / denom;
        }
        std::copy(id, id + k, out.topk_idx + t * k);
      }
    }
    // statistics: lanes [w, w_end) of the block belong to the current segment
    for (int w = 0; w < n;) {
      const int w_end = static_cast<int>(std::min<int64_t>(n, seg.seq_end - t0));
      const I in_segment = (lane_index >= w) & (lane_index < w_end);
      for (int64_t e = 0; e < E; ++e) acc[e] += in_segment ? score[e] : simd::splat<W>(0.0f);
      if (vector_counts) {  // count[e] -= (-1 per lane routed to e)
        for (int64_t j = 0; j < k; ++j)
          for (int64_t e = 0; e < E; ++e) count[e] -= (top_id[j] == static_cast<int32_t>(e)) & in_segment;
      } else {
        for (int64_t p = w * k; p < w_end * k; ++p) ++seg.seg_count[ids[p]];
      }
      if (t0 + w_end == seg.seq_end || t0 + w_end == c1) {
        for (int64_t e = 0; e < E; ++e) {
          double sum = 0.0;
          for (int lane = 0; lane < W; ++lane) sum += static_cast<double>(acc[e][lane]);
          seg.seg_prob[e] = sum;
          acc[e] = simd::splat<W>(0.0f);
          if (vector_counts) {
            int64_t routed = 0;
            for (int lane = 0; lane < W; ++lane) routed += count[e][lane];
            seg.seg_count[e] = routed;
            count[e] = simd::splat_i<W>(0);
          }
        }
        seg.end_segment();
      }
      w = w_end;
    }
  }
  seg.end_chunk(out.chunk_prob, out.chunk_count);
}

template <typename scalar_t>
void forward_chunks_sse(const scalar_t* x, const RouteShape& shape, int64_t begin, int64_t end,
                        const ForwardOut<float>& out, SegmentWriter<float>& seg) {
  BlockScratch<4> scratch(shape.experts, shape.top_k);
  for (int64_t c = begin; c < end; ++c) forward_chunk_fp32<4>(x, shape, c, out, seg, scratch);
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
template <typename scalar_t>
__attribute__((target("avx2,fma"))) void forward_chunks_avx2(const scalar_t* x, const RouteShape& shape,
                                                            int64_t begin, int64_t end, const ForwardOut<float>& out,
                                                            SegmentWriter<float>& seg) {
  BlockScratch<8> scratch(shape.experts, shape.top_k);
  for (int64_t c = begin; c < end; ++c) forward_chunk_fp32<8>(x, shape, c, out, seg, scratch);
}
#endif

// ---- fp64 logits (gradcheck): plain scalar code, same formulas and order ----

void forward_chunk_fp64(const double* x, const RouteShape& shape, int64_t c, const ForwardOut<double>& out,
                        SegmentWriter<double>& seg, std::vector<int64_t>& order) {
  const int64_t T = shape.tokens, E = shape.experts, k = shape.top_k;
  const int64_t c0 = c * kChunkTokens, c1 = std::min(T, c0 + kChunkTokens);
  seg.begin_chunk(c, c0, c1);
  for (int64_t t = c0; t < c1; ++t) {
    const double* row = x + t * E;
    double* score = out.scores + t * E;
    if (shape.scoring == Scoring::kSoftmax) {
      double max_value = -std::numeric_limits<double>::infinity(), sum = 0.0;
      for (int64_t e = 0; e < E; ++e) max_value = row[e] > max_value ? row[e] : max_value;
      for (int64_t e = 0; e < E; ++e) sum += (score[e] = std::exp(row[e] - max_value));
      const double inv_sum = 1.0 / sum;
      for (int64_t e = 0; e < E; ++e) score[e] *= inv_sum;
    } else {
      for (int64_t e = 0; e < E; ++e) score[e] = 1.0 / (1.0 + std::exp(-row[e]));
    }
    std::iota(order.begin(), order.end(), int64_t{0});
    std::partial_sort(order.begin(), order.begin() + k, order.end(), [row](int64_t a, int64_t b) {
      if (ranks_before(row[a], row[b])) return true;
      if (ranks_before(row[b], row[a])) return false;
      return a < b;
    });
    int64_t* id = out.topk_idx + t * k;
    double* weight = out.topk_weight + t * k;
    double selected = 0.0;
    for (int64_t j = 0; j < k; ++j) {
      id[j] = order[j];
      weight[j] = score[id[j]];
      selected += weight[j];
      ++seg.seg_count[id[j]];
    }
    if (shape.normalize)
      for (int64_t j = 0; j < k; ++j) weight[j] = weight[j] / (selected + kNormEps);
    for (int64_t e = 0; e < E; ++e) seg.seg_prob[e] += score[e];
    if (t + 1 == seg.seq_end || t + 1 == c1) seg.end_segment();
  }
  seg.end_chunk(out.chunk_prob, out.chunk_count);
}

template <typename scalar_t>
void route_forward_cpu(const at::Tensor& logits, const RouteShape& shape, RouteResult& result) {
  using real_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const int64_t T = shape.tokens, E = shape.experts, k = shape.top_k, L = shape.seq_len, B = shape.num_seqs;
  const int64_t C = kChunkTokens, NC = (T + C - 1) / C;
  const scalar_t* x = logits.const_data_ptr<scalar_t>();
  real_t* prob_mean = std::get<3>(result).data_ptr<real_t>();
  real_t* seq_prob_mean = std::get<4>(result).data_ptr<real_t>();
  int64_t* expert_counts = std::get<5>(result).data_ptr<int64_t>();
  int64_t* seq_counts = std::get<6>(result).data_ptr<int64_t>();
  int64_t* sorted_pairs = std::get<7>(result).data_ptr<int64_t>();
  int64_t* offsets = std::get<8>(result).data_ptr<int64_t>();
  int64_t* pair_positions = std::get<9>(result).data_ptr<int64_t>();

  std::vector<int64_t> chunk_count(NC * E);  // becomes the first output position of (chunk, expert)
  std::vector<double> chunk_prob(NC * E);
  std::vector<double> part_prob(NC * 2 * E);
  std::vector<int64_t> part_count(NC * 2 * E);
  const ForwardOut<real_t> out{std::get<0>(result).data_ptr<real_t>(), std::get<1>(result).data_ptr<int64_t>(),
                               std::get<2>(result).data_ptr<real_t>(), chunk_count.data(), chunk_prob.data()};
  const int64_t* topk_idx = out.topk_idx;

  // Pass 1: scores, top-k, weights, per-chunk counts and per-segment score sums.
  const bool avx2 = use_avx2();
  at::parallel_for(0, NC, 1, [&](int64_t begin, int64_t end) {
    SegmentWriter<real_t> seg(E, L, seq_prob_mean, seq_counts, part_prob.data(), part_count.data());
    if constexpr (std::is_same_v<scalar_t, double>) {
      std::vector<int64_t> order(E);
      for (int64_t c = begin; c < end; ++c) forward_chunk_fp64(x, shape, c, out, seg, order);
    } else {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
      if (avx2) return forward_chunks_avx2(x, shape, begin, end, out, seg);
#endif
      forward_chunks_sse(x, shape, begin, end, out, seg);
    }
  });

  // Pass 2: exclusive scan over (expert, chunk) -> offsets and per-chunk start positions.
  int64_t running = 0;
  for (int64_t e = 0; e < E; ++e) {
    int64_t count = 0;
    double prob = 0.0;
    for (int64_t c = 0; c < NC; ++c) {
      const int64_t v = chunk_count[c * E + e];
      chunk_count[c * E + e] = running + count;
      count += v;
      prob += chunk_prob[c * E + e];
    }
    expert_counts[e] = count;
    offsets[e] = running;
    prob_mean[e] = static_cast<real_t>(prob / static_cast<double>(T));
    running += count;
  }
  offsets[E] = running;

  // Pass 3: counting-sort scatter; visiting pairs in order keeps each expert's run stable.
  at::parallel_for(0, NC, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> cursor(E);
    for (int64_t c = begin; c < end; ++c) {
      std::copy(chunk_count.begin() + c * E, chunk_count.begin() + (c + 1) * E, cursor.begin());
      const int64_t p_end = std::min(T, (c + 1) * C) * k;
      for (int64_t p = c * C * k; p < p_end; ++p) {
        const int64_t position = cursor[topk_idx[p]]++;
        sorted_pairs[position] = p;
        pair_positions[p] = position;
      }
    }
  });

  // Pass 4: sequences spanning several chunks = tail(first) + head(first + 1 .. last).
  at::parallel_for(0, B, 256, [&](int64_t begin, int64_t end) {
    std::vector<double> prob(E);
    std::vector<int64_t> count(E);
    for (int64_t s = begin; s < end; ++s) {
      const int64_t first = first_chunk_of_sequence(s, L, C), last = last_chunk_of_sequence(s, L, C);
      if (first == last) continue;
      std::fill(prob.begin(), prob.end(), 0.0);
      std::fill(count.begin(), count.end(), 0);
      for (int64_t c = first; c <= last; ++c) {
        const int64_t base = (c * 2 + (s * L < c * C ? 0 : 1)) * E;
        for (int64_t e = 0; e < E; ++e) {
          prob[e] += part_prob[base + e];
          count[e] += part_count[base + e];
        }
      }
      for (int64_t e = 0; e < E; ++e) {
        seq_prob_mean[s * E + e] = static_cast<real_t>(prob[e] / static_cast<double>(L));
        seq_counts[s * E + e] = count[e];
      }
    }
  });
}

// ---- backward ----

template <typename real_t>
struct BackwardIn {
  const real_t* grad_weight;    // (T, k) or null
  const real_t* grad_scores;    // (T, E) or null
  const real_t* grad_mean;      // (E,) or null
  const real_t* grad_seq_mean;  // (B, E) or null
  const real_t* scores;         // (T, E)
  const int64_t* topk_idx;      // (T, k)
};

// Per token t (s = scores[t], g* = incoming gradients, S = sum_j s[idx_j] + 1e-20):
//   dL/ds_e  = g_scores[t, e] + g_prob_mean[e] / T + g_seq_prob_mean[t / L, e] / L
//   top-k    : dL/ds_{idx_j} += g_j                         (weights not renormalised)
//              dL/ds_{idx_j} += (g_j - sum_l g_l w_l) / S    (w_j = s_{idx_j} / S)
//   softmax  : dL/dx_e = s_e (dL/ds_e - sum_f s_f dL/ds_f);  sigmoid: dL/dx_e = dL/ds_e s_e (1 - s_e)
template <typename real_t, typename scalar_t>
MINIMIND_FAST_SIMD void route_backward_rows(const BackwardIn<real_t>& in, const RouteShape& shape, int64_t begin,
                                            int64_t end, real_t* grad_score, scalar_t* grad_logits) {
  const int64_t T = shape.tokens, E = shape.experts, k = shape.top_k, L = shape.seq_len;
  const real_t inv_tokens = real_t(1) / static_cast<real_t>(T), inv_len = real_t(1) / static_cast<real_t>(L);
  int64_t seq = begin / L, seq_end = (seq + 1) * L;
  for (int64_t t = begin; t < end; ++t) {
    const real_t* s = in.scores + t * E;
    for (int64_t e = 0; e < E; ++e) grad_score[e] = in.grad_scores ? in.grad_scores[t * E + e] : real_t(0);
    if (in.grad_mean)
      for (int64_t e = 0; e < E; ++e) grad_score[e] += in.grad_mean[e] * inv_tokens;
    if (in.grad_seq_mean) {
      if (t == seq_end) seq_end += L, ++seq;
      const real_t* g = in.grad_seq_mean + seq * E;
      for (int64_t e = 0; e < E; ++e) grad_score[e] += g[e] * inv_len;
    }
    if (in.grad_weight) {
      const int64_t* id = in.topk_idx + t * k;
      const real_t* g = in.grad_weight + t * k;
      if (shape.normalize) {
        real_t selected = 0, weighted = 0;
        for (int64_t j = 0; j < k; ++j) {
          selected += s[id[j]];
          weighted += g[j] * s[id[j]];
        }
        const real_t denom = selected + static_cast<real_t>(kNormEps);
        const real_t dot = weighted / denom;
        for (int64_t j = 0; j < k; ++j) grad_score[id[j]] += (g[j] - dot) / denom;
      } else {
        for (int64_t j = 0; j < k; ++j) grad_score[id[j]] += g[j];
      }
    }
    scalar_t* out = grad_logits + t * E;
    if (shape.scoring == Scoring::kSoftmax) {
      real_t partial[4] = {0, 0, 0, 0};  // a fixed-order 4-way dot product (vectorisable)
      int64_t e = 0;
      for (; e + 4 <= E; e += 4)
        for (int q = 0; q < 4; ++q) partial[q] += grad_score[e + q] * s[e + q];
      real_t dot = (partial[0] + partial[1]) + (partial[2] + partial[3]);
      for (; e < E; ++e) dot += grad_score[e] * s[e];
      for (e = 0; e < E; ++e) out[e] = static_cast<scalar_t>(s[e] * (grad_score[e] - dot));
    } else {
      for (int64_t e = 0; e < E; ++e) out[e] = static_cast<scalar_t>(grad_score[e] * s[e] * (real_t(1) - s[e]));
    }
  }
}

// The fp32 backward on transposed blocks of W tokens: the maths of route_backward_rows, with
// every per-expert step a W-lane vector operation.
template <int W, typename scalar_t>
MINIMIND_FAST_SIMD void route_backward_blocks(const BackwardIn<float>& in, const RouteShape& shape,
                                              int64_t block_begin, int64_t block_end, scalar_t* grad_logits) {
  using F = typename simd::Vec<W>::F;
  const int64_t T = shape.tokens, E = shape.experts, k = shape.top_k, L = shape.seq_len;
  const float inv_tokens = 1.0f / static_cast<float>(T), inv_len = 1.0f / static_cast<float>(L);
  AlignedArray<F> score_storage(E), grad_storage(E);
  F* s = score_storage.data();
  F* g = grad_storage.data();
  for (int64_t b = block_begin; b < block_end; ++b) {
    const int64_t t0 = b * W;
    const int n = static_cast<int>(std::min<int64_t>(W, T - t0));
    auto load = [&](const float* rows, F* out) {
      if (simd::load_block<W>(rows, E, n, out)) return;
      for (int64_t e = 0; e < E; ++e) out[e] = simd::splat<W>(0.0f);
      for (int w = 0; w < n; ++w)
        for (int64_t e = 0; e < E; ++e) out[e][w] = rows[w * E + e];
    };
    load(in.scores + t0 * E, s);
    if (in.grad_scores) {
      load(in.grad_scores + t0 * E, g);
    } else {
      for (int64_t e = 0; e < E; ++e) g[e] = simd::splat<W>(0.0f);
    }
    if (in.grad_mean)
      for (int64_t e = 0; e < E; ++e) g[e] += in.grad_mean[e] * inv_tokens;
    if (in.grad_seq_mean) {
      const int64_t first_seq = t0 / L, last_seq = (t0 + n - 1) / L;
      if (first_seq == last_seq) {
        for (int64_t e = 0; e < E; ++e) g[e] += in.grad_seq_mean[first_seq * E + e] * inv_len;
      } else {
        for (int w = 0; w < n; ++w)
          for (int64_t e = 0; e < E; ++e) g[e][w] += in.grad_seq_mean[((t0 + w) / L) * E + e] * inv_len;
      }
    }
    if (in.grad_weight) {
      for (int w = 0; w < n; ++w) {
        const int64_t* id = in.topk_idx + (t0 + w) * k;
        const float* gw = in.grad_weight + (t0 + w) * k;
        if (shape.normalize) {
          float selected = 0.0f, weighted = 0.0f;
          for (int64_t j = 0; j < k; ++j) {
            selected += s[id[j]][w];
            weighted += gw[j] * s[id[j]][w];
          }
          const float denom = selected + static_cast<float>(kNormEps);
          const float dot = weighted / denom;
          for (int64_t j = 0; j < k; ++j) g[id[j]][w] += (gw[j] - dot) / denom;
        } else {
          for (int64_t j = 0; j < k; ++j) g[id[j]][w] += gw[j];
        }
      }
    }
    if (shape.scoring == Scoring::kSoftmax) {
      F dot = simd::splat<W>(0.0f);
      for (int64_t e = 0; e < E; ++e) dot += g[e] * s[e];
      for (int64_t e = 0; e < E; ++e) g[e] = s[e] * (g[e] - dot);
    } else {
      for (int64_t e = 0; e < E; ++e) g[e] = g[e] * s[e] * (1.0f - s[e]);
    }
    scalar_t* out = grad_logits + t0 * E;
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (simd::store_block<W>(g, E, n, out)) continue;
    }
    for (int w = 0; w < n; ++w)
      for (int64_t e = 0; e < E; ++e) out[w * E + e] = static_cast<scalar_t>(g[e][w]);
  }
}

template <typename scalar_t>
void route_backward_fp32_sse(const BackwardIn<float>& in, const RouteShape& shape, int64_t begin, int64_t end,
                             scalar_t* grad_logits) {
  route_backward_blocks<4>(in, shape, begin, end, grad_logits);
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
template <typename scalar_t>
__attribute__((target("avx2,fma"))) void route_backward_fp32_avx2(const BackwardIn<float>& in,
                                                                 const RouteShape& shape, int64_t begin, int64_t end,
                                                                 scalar_t* grad_logits) {
  route_backward_blocks<8>(in, shape, begin, end, grad_logits);
}
#endif

template <typename scalar_t>
void run_backward(const BackwardIn<float>& in, const RouteShape& shape, scalar_t* out, bool avx2) {
  const int width = avx2 ? 8 : 4;
  const int64_t blocks = (shape.tokens + width - 1) / width;
  at::parallel_for(0, blocks, 2048 / width, [&](int64_t begin, int64_t end) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    if (avx2) return route_backward_fp32_avx2(in, shape, begin, end, out);
#endif
    route_backward_fp32_sse(in, shape, begin, end, out);
  });
}

void run_backward(const BackwardIn<double>& in, const RouteShape& shape, double* out, bool /*avx2*/) {
  at::parallel_for(0, shape.tokens, 256, [&](int64_t begin, int64_t end) {
    std::vector<double> grad_score(shape.experts);
    route_backward_rows(in, shape, begin, end, grad_score.data(), out);
  });
}

}  // namespace

RouteShape check_route_inputs(const at::Tensor& router_logits, int64_t top_k, bool norm_topk_prob,
                              c10::string_view scoring, int64_t seq_len) {
  TORCH_CHECK(router_logits.dim() == 2, "moe_route: router_logits must be 2-D (tokens, experts), got shape ",
              router_logits.sizes());
  const auto dtype = router_logits.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf,
              "moe_route: router_logits must be float32, float64, bfloat16 or float16, got ", dtype);
  TORCH_CHECK(router_logits.is_contiguous(), "moe_route: router_logits must be contiguous (strides ",
              router_logits.strides(), "); call .contiguous() first");
  RouteShape shape;
  shape.tokens = router_logits.size(0);
  shape.experts = router_logits.size(1);
  TORCH_CHECK(shape.experts >= 1, "moe_route: router_logits has 0 expert columns; need at least one expert");
  TORCH_CHECK(shape.tokens >= 1, "moe_route: router_logits has 0 token rows; need at least one token");
  TORCH_CHECK(top_k >= 1 && top_k <= shape.experts, "moe_route: top_k=", top_k, " must be in [1, ",
              shape.experts, "] (the number of experts)");
  TORCH_CHECK(shape.tokens <= std::numeric_limits<int32_t>::max() / top_k, "moe_route: tokens * top_k = ",
              shape.tokens, " * ", top_k, " exceeds 2^31 - 1 (the pair index is 32-bit on CUDA); route fewer ",
              "tokens per call");
  TORCH_CHECK(seq_len >= 0, "moe_route: seq_len=", seq_len, " must be >= 0 (0 means one sequence of all tokens)");
  shape.top_k = top_k;
  shape.seq_len = seq_len == 0 ? shape.tokens : seq_len;
  TORCH_CHECK(shape.tokens % shape.seq_len == 0, "moe_route: seq_len=", seq_len, " does not divide the ",
              shape.tokens, " tokens; pass tokens = batch * seq_len rows");
  shape.num_seqs = shape.tokens / shape.seq_len;
  shape.scoring = parse_scoring(scoring, "moe_route");
  shape.normalize = norm_topk_prob && top_k > 1;
  return shape;
}

RouteShape check_route_backward_inputs(const OptionalTensor& grad_topk_weight, const OptionalTensor& grad_scores,
                                       const OptionalTensor& grad_prob_mean, const OptionalTensor& grad_seq_prob_mean,
                                       const at::Tensor& scores, const at::Tensor& topk_idx, bool norm_topk_prob,
                                       c10::string_view scoring, int64_t seq_len, at::ScalarType logits_dtype) {
  const auto real = real_dtype(logits_dtype);
  TORCH_CHECK(scores.scalar_type() == real, "moe_route_backward: scores must be ", real, " for ", logits_dtype,
              " logits, got ", scores.scalar_type());
  TORCH_CHECK(topk_idx.dim() == 2 && topk_idx.scalar_type() == at::kLong && topk_idx.is_contiguous(),
              "moe_route_backward: topk_idx must be a contiguous int64 (tokens, top_k) tensor, got ",
              topk_idx.scalar_type(), " of shape ", topk_idx.sizes());
  const RouteShape shape = check_route_inputs(scores, topk_idx.size(1), norm_topk_prob, scoring, seq_len);
  TORCH_CHECK(topk_idx.size(0) == shape.tokens && topk_idx.device() == scores.device(), "moe_route_backward: ",
              "topk_idx (", topk_idx.sizes(), " on ", topk_idx.device(), ") does not match scores (", scores.sizes(),
              " on ", scores.device(), ")");
  auto check_grad = [&](const OptionalTensor& grad, at::IntArrayRef expected, const char* name) {
    if (!grad.has_value() || !grad->defined()) return;
    TORCH_CHECK(grad->sizes() == expected, "moe_route_backward: ", name, " must have shape ", expected, ", got ",
                grad->sizes());
    TORCH_CHECK(grad->scalar_type() == real, "moe_route_backward: ", name, " must be ", real, ", got ",
                grad->scalar_type());
    TORCH_CHECK(grad->device() == scores.device(), "moe_route_backward: ", name, " is on ", grad->device(),
                " but scores are on ", scores.device());
  };
  check_grad(grad_topk_weight, {shape.tokens, shape.top_k}, "grad_topk_weight");
  check_grad(grad_scores, {shape.tokens, shape.experts}, "grad_scores");
  check_grad(grad_prob_mean, {shape.experts}, "grad_prob_mean");
  check_grad(grad_seq_prob_mean, {shape.num_seqs, shape.experts}, "grad_seq_prob_mean");
  return shape;
}

RouteResult allocate_route_outputs(const at::Tensor& router_logits, const RouteShape& shape) {
  const auto real = router_logits.options().dtype(real_dtype(router_logits.scalar_type()));
  const auto index = router_logits.options().dtype(at::kLong);
  const int64_t T = shape.tokens, E = shape.experts, k = shape.top_k, B = shape.num_seqs;
  return RouteResult(at::empty({T, k}, real), at::empty({T, k}, index), at::empty({T, E}, real), at::empty({E}, real),
                     at::empty({B, E}, real), at::empty({E}, index), at::empty({B, E}, index),
                     at::empty({T * k}, index), at::empty({E + 1}, index), at::empty({T * k}, index));
}

RouteResult moe_route_cpu(const at::Tensor& router_logits, int64_t top_k, bool norm_topk_prob,
                          c10::string_view scoring, int64_t seq_len) {
  const RouteShape shape = check_route_inputs(router_logits, top_k, norm_topk_prob, scoring, seq_len);
  TORCH_CHECK(router_logits.device().is_cpu(), "moe_route_cpu: router_logits must be on the CPU");
  RouteResult result = allocate_route_outputs(router_logits, shape);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, router_logits.scalar_type(), "moe_route_cpu",
                                  [&] { route_forward_cpu<scalar_t>(router_logits, shape, result); });
  return result;
}

at::Tensor moe_route_backward_cpu(const OptionalTensor& grad_topk_weight, const OptionalTensor& grad_scores,
                                  const OptionalTensor& grad_prob_mean, const OptionalTensor& grad_seq_prob_mean,
                                  const at::Tensor& scores, const at::Tensor& topk_idx, bool norm_topk_prob,
                                  c10::string_view scoring, int64_t seq_len, at::ScalarType logits_dtype) {
  const RouteShape shape = check_route_backward_inputs(grad_topk_weight, grad_scores, grad_prob_mean,
                                                       grad_seq_prob_mean, scores, topk_idx, norm_topk_prob, scoring,
                                                       seq_len, logits_dtype);
  TORCH_CHECK(scores.device().is_cpu(), "moe_route_backward_cpu: scores must be on the CPU");
  // Incoming gradients may be expanded (a .sum() hands back stride-0 tensors): make them dense.
  auto dense = [](const OptionalTensor& grad) -> at::Tensor {
    return grad.has_value() && grad->defined() ? grad->contiguous() : at::Tensor();
  };
  const at::Tensor gw = dense(grad_topk_weight), gs = dense(grad_scores), gm = dense(grad_prob_mean),
                   gsm = dense(grad_seq_prob_mean);
  at::Tensor grad_logits = at::empty(scores.sizes(), scores.options().dtype(logits_dtype));
  const bool avx2 = use_avx2();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits_dtype, "moe_route_backward_cpu", [&] {
    using real_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    auto ptr = [](const at::Tensor& t) { return t.defined() ? t.const_data_ptr<real_t>() : nullptr; };
    const BackwardIn<real_t> in{ptr(gw), ptr(gs), ptr(gm), ptr(gsm), scores.const_data_ptr<real_t>(),
                                topk_idx.const_data_ptr<int64_t>()};
    run_backward(in, shape, grad_logits.data_ptr<scalar_t>(), avx2);  // fp64 overload or fp32 template
  });
  return grad_logits;
}

}  // namespace minimind_fast

TORCH_LIBRARY(minimind_fast, m) {
  // Outputs (real = float64 for float64 logits, float32 otherwise; B = T / seq_len):
  //   topk_weight (T, k) real    selected scores, renormalised iff norm_topk_prob and top_k > 1
  //   topk_idx (T, k) int64      expert ids, best first; ties -> lower id
  //   scores (T, E) real         softmax / sigmoid of the logits
  //   prob_mean (E,) real        mean score of each expert over all T tokens
  //   seq_prob_mean (B, E) real  mean score of each expert within each sequence
  //   expert_counts (E,) int64   (token, slot) pairs routed to each expert
  //   seq_expert_counts (B, E)   the same per sequence
  //   sorted_pairs (T*k,) int64  pair ids t*k + j ordered by expert, ascending within an expert
  //   expert_offsets (E+1,)      expert e owns sorted_pairs[offsets[e]:offsets[e+1]]
  //   pair_positions (T*k,)      inverse permutation: sorted_pairs[pair_positions[p]] == p
  m.def(
      "moe_route(Tensor router_logits, int top_k, bool norm_topk_prob, str scoring=\"softmax\", "
      "int seq_len=0) -> (Tensor topk_weight, Tensor topk_idx, Tensor scores, Tensor prob_mean, "
      "Tensor seq_prob_mean, Tensor expert_counts, Tensor seq_expert_counts, Tensor sorted_pairs, "
      "Tensor expert_offsets, Tensor pair_positions)");
  // Gradient of router_logits (dtype logits_dtype) from the gradients of topk_weight, scores,
  // prob_mean and seq_prob_mean (any may be None), given the forward's scores and topk_idx.
  m.def(
      "moe_route_backward(Tensor? grad_topk_weight, Tensor? grad_scores, Tensor? grad_prob_mean, "
      "Tensor? grad_seq_prob_mean, Tensor scores, Tensor topk_idx, bool norm_topk_prob, str scoring, "
      "int seq_len, ScalarType logits_dtype) -> Tensor");
}

TORCH_LIBRARY_IMPL(minimind_fast, CPU, m) {
  m.impl("moe_route", &minimind_fast::moe_route_cpu);
  m.impl("moe_route_backward", &minimind_fast::moe_route_backward_cpu);
}
