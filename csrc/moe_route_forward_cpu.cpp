// CPU forward of minimind_fast::moe_route. Follows MiniMind's MoEGate (model/model_minimind.py):
// softmax or sigmoid scores, top-k, renormalisation whenever norm_topk_prob (for every k, as
// MiniMind-3 and Qwen3-MoE do), and the statistics of its sequence-level and token-level
// auxiliary losses; adds the expert-sorted permutation that a grouped expert computation needs.
//
// Over fixed 256-token chunks (so results do not depend on the thread count):
//   1. (parallel) blocks of W tokens, transposed in registers, fp32 maths across the tokens
//      (moe_route_simd.h; W = 8 under AVX2 / AVX-512, else 4): scores, top-k by logit (a
//      branch-free bubble over the k slots; with W = 8 and E * k > 32, 64-bit (key, id) composites
//      through a chain of k slots for k <= 4 or sorting networks for k <= 8; a per-token partial
//      sort for k > 16), weights; per chunk, the pair counts of each expert and the score sums of
//      each sequence segment (moe_route_common.h);
//   2. (serial, E x chunks) exclusive scan of the chunk counts -> expert offsets and the first
//      output position of every (chunk, expert); token means of the scores;
//   3. (parallel) counting-sort scatter of each chunk's pairs (stable: pairs visited in order);
//   4. (parallel) sequences that straddle chunks: add their head/tail segments in chunk order.
// fp64 logits (gradcheck) take a scalar fp64 path with the same formulas.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <numeric>
#include <type_traits>
#include <vector>

#include "moe_route_cpu.h"
#include "moe_route_simd.h"
#include "moe_route_topk.h"

// 32-byte vectors are passed only between always-inline helpers inside AVX2 functions.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace minimind_fast {
namespace {

constexpr int64_t kChunkTokens = 256;  // a multiple of every block width

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

// Pass 1 for one chunk, fp32 maths on transposed blocks of W tokens. kE, kK > 0: E and k known
// at compile time (MiniMind's shapes): the per-expert loops unroll and the block's vectors live in
// local arrays that the compiler keeps in registers; 0: known at run time (scratch arrays).
template <int W, int kE, int kK, typename scalar_t>
MINIMIND_FAST_SIMD void forward_chunk_fp32(const scalar_t* x, const RouteShape& shape, int64_t c,
                                           const ForwardOut<float>& out, SegmentWriter<float>& seg,
                                           BlockScratch<W>& scratch) {
  using F = typename simd::Vec<W>::F;
  using I = typename simd::Vec<W>::I;
  const int64_t T = shape.tokens, E = kE ? kE : shape.experts, k = kK ? kK : shape.top_k;
  const int64_t c0 = c * kChunkTokens, c1 = std::min(T, c0 + kChunkTokens);
  constexpr int kLocalE = kE ? kE : 1, kLocalK = kK ? kK : 1;
  F local_value[kLocalE], local_score[kLocalE], local_acc[kLocalE], local_weight[kLocalK];
  I local_keys[kLocalE], local_count[kLocalE], local_top_key[kLocalK], local_top_id[kLocalK];
  F* value = kE ? local_value : scratch.value.data();
  F* score = kE ? local_score : scratch.score.data();
  F* acc = kE ? local_acc : scratch.acc.data();
  I* keys = kE ? local_keys : scratch.keys.data();
  I* count = kE ? local_count : scratch.count.data();
  I* top_key = kK ? local_top_key : scratch.top_key.data();
  I* top_id = kK ? local_top_id : scratch.top_id.data();
  F* weight = kK ? local_weight : scratch.weight.data();
  int64_t* ids = scratch.ids.data();
  const bool vector_slots = k <= simd::kMaxBlockK;          // top-k slots as lane vectors
  const bool small_e = E <= 16;                              // select by blends, count by compares
  const bool vector_counts = vector_slots && small_e;
  const bool composites = k <= 8 && E * k > 32;  // 64-bit (key, id) chains / networks beat the bubble
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
        if (!composites) simd::block_top_k<W>(keys, E, k, top_key, top_id);
        else if (k == 1) simd::block_top_k_chain<1>(keys, E, top_id);
        else if (k == 2) simd::block_top_k_chain<2>(keys, E, top_id);
        else if (k == 3) simd::block_top_k_chain<3>(keys, E, top_id);
        else if (k == 4) simd::block_top_k_chain<4>(keys, E, top_id);
        else simd::block_top_k_network(keys, E, k, top_id);
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

template <int W, int kE, int kK, typename scalar_t>
MINIMIND_FAST_SIMD void forward_chunk_range(const scalar_t* x, const RouteShape& shape, int64_t begin, int64_t end,
                                            const ForwardOut<float>& out, SegmentWriter<float>& seg) {
  BlockScratch<W> scratch(shape.experts, shape.top_k);
  for (int64_t c = begin; c < end; ++c) forward_chunk_fp32<W, kE, kK>(x, shape, c, out, seg, scratch);
}

// The chunks [begin, end) of one thread, with E and k compile-time constants where they are
// MiniMind's (4 or 8 experts, top-1 or top-2). Templates and always-inline all the way down: the
// code must be compiled inside the caller's AVX2 / AVX-512 target (no lambdas, no pointers).
template <int W, typename scalar_t>
MINIMIND_FAST_SIMD void forward_chunks(const scalar_t* x, const RouteShape& shape, int64_t begin, int64_t end,
                                       const ForwardOut<float>& out, SegmentWriter<float>& seg) {
  const int64_t E = shape.experts, k = shape.top_k;
  if (E == 4 && k == 1) return forward_chunk_range<W, 4, 1>(x, shape, begin, end, out, seg);
  if (E == 4 && k == 2) return forward_chunk_range<W, 4, 2>(x, shape, begin, end, out, seg);
  if (E == 8 && k == 1) return forward_chunk_range<W, 8, 1>(x, shape, begin, end, out, seg);
  if (E == 8 && k == 2) return forward_chunk_range<W, 8, 2>(x, shape, begin, end, out, seg);
  forward_chunk_range<W, 0, 0>(x, shape, begin, end, out, seg);
}

template <typename scalar_t>
void forward_chunks_sse(const scalar_t* x, const RouteShape& shape, int64_t begin, int64_t end,
                        const ForwardOut<float>& out, SegmentWriter<float>& seg) {
  forward_chunks<4>(x, shape, begin, end, out, seg);
}

#ifdef MINIMIND_FAST_X86
template <typename scalar_t>
MINIMIND_FAST_TARGET_AVX2 void forward_chunks_avx2(const scalar_t* x, const RouteShape& shape, int64_t begin,
                                                   int64_t end, const ForwardOut<float>& out,
                                                   SegmentWriter<float>& seg) {
  forward_chunks<8>(x, shape, begin, end, out, seg);
}

template <typename scalar_t>
MINIMIND_FAST_TARGET_AVX512 void forward_chunks_avx512(const scalar_t* x, const RouteShape& shape, int64_t begin,
                                                       int64_t end, const ForwardOut<float>& out,
                                                       SegmentWriter<float>& seg) {
  forward_chunks<8>(x, shape, begin, end, out, seg);
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
void forward_typed(const at::Tensor& logits, const RouteShape& shape, RouteResult& result) {
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
  const CpuIsa isa = cpu_isa();
  at::parallel_for(0, NC, 1, [&](int64_t begin, int64_t end) {
    SegmentWriter<real_t> seg(E, L, seq_prob_mean, seq_counts, part_prob.data(), part_count.data());
    if constexpr (std::is_same_v<scalar_t, double>) {
      std::vector<int64_t> order(E);
      for (int64_t c = begin; c < end; ++c) forward_chunk_fp64(x, shape, c, out, seg, order);
    } else {
#ifdef MINIMIND_FAST_X86
      if (isa == CpuIsa::kAvx512) return forward_chunks_avx512(x, shape, begin, end, out, seg);
      if (isa == CpuIsa::kAvx2) return forward_chunks_avx2(x, shape, begin, end, out, seg);
#endif
      forward_chunks_sse(x, shape, begin, end, out, seg);
    }
  });

  // Pass 2: exclusive scan over (expert, chunk) -> offsets and per-chunk start positions.
  std::vector<int64_t> chunk_start(NC * E);
  int64_t running = 0;
  for (int64_t e = 0; e < E; ++e) {
    int64_t count = 0;
    double prob = 0.0;
    for (int64_t c = 0; c < NC; ++c) {
      chunk_start[c * E + e] = running + count;
      count += chunk_count[c * E + e];
      prob += chunk_prob[c * E + e];
    }
    expert_counts[e] = count;
    offsets[e] = running;
    prob_mean[e] = static_cast<real_t>(prob / static_cast<double>(T));
    running += count;
  }
  offsets[E] = running;

  // Pass 3: counting sort of each chunk's pairs into a local buffer (visiting pairs in order keeps
  // each expert's run stable), then one contiguous copy per expert run. Scattering pair by pair
  // straight into sorted_pairs would keep E write streams open whose addresses, about T*k/E
  // pairs apart, often share an L1 set (E = 64: every stream 8 KiB apart, one set).
  at::parallel_for(0, NC, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> local_begin(E), cursor(E), local(C * k);
    for (int64_t c = begin; c < end; ++c) {
      const int64_t* count = chunk_count.data() + c * E;
      const int64_t* start = chunk_start.data() + c * E;
      for (int64_t e = 0, at = 0; e < E; at += count[e], ++e) local_begin[e] = cursor[e] = at;
      const int64_t p_begin = c * C * k, p_end = std::min(T, (c + 1) * C) * k;
      for (int64_t p = p_begin; p < p_end; ++p) {
        const int64_t e = topk_idx[p];
        const int64_t slot = cursor[e]++;
        local[slot] = p;
        pair_positions[p] = start[e] + (slot - local_begin[e]);
      }
      for (int64_t e = 0; e < E; ++e)
        std::memcpy(sorted_pairs + start[e], local.data() + local_begin[e], sizeof(int64_t) * count[e]);
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

}  // namespace

void route_forward_cpu(const at::Tensor& router_logits, const RouteShape& shape, RouteResult& result) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, router_logits.scalar_type(), "moe_route_cpu",
                                  [&] { forward_typed<scalar_t>(router_logits, shape, result); });
}

}  // namespace minimind_fast
