// CUDA forward of the fused MoE routing op (declared in moe_route_kernels.h). No torch header.
//
// Forward, four kernels, no atomics (bitwise reproducible):
//   1. route_forward_kernel: one warp per chunk of C consecutive tokens (C depends on T only);
//      per token the lanes hold the experts (lane + 32 i), compute max / sum by shuffles, the
//      scores, and pick the top-k by k rounds of a warp arg-max on (logit, -id); weights are
//      renormalised in slot order like the CPU. Per chunk and expert: pair counts, score sums,
//      and the score sums / counts of the chunk's head and tail segments (moe_route_common.h);
//      sequences inside the chunk are written directly.
//   2. route_scan_kernel: one block per expert, a block-wide exclusive scan over the chunks of
//      the counts (-> each chunk's first slot inside the expert's run) and of the head segments
//      (-> prefix sums), and the token means of the scores (fixed-order reduction).
//   3. route_scatter_kernel: expert offsets (scan over E in every block), then one warp per chunk
//      places its pairs in order: __match_any_sync ranks equal experts among 32 pairs, a per-warp
//      cursor per expert carries on -- a stable counting sort.
//   4. route_seq_fixup_kernel: a sequence spanning chunks first..last gets
//      tail(first) + (head prefix(last + 1) - head prefix(first + 1)).
#include "moe_route_device.cuh"

namespace minimind_fast {
namespace cuda {
namespace {

using namespace detail;  // NOLINT: the shared device helpers of this op

constexpr int kMaxSlotsPerLane = 8;    // top_k <= 256 = 8 slots x 32 lanes
constexpr int64_t kMaxChunks = 16384;  // chunk size grows with T beyond 8 * kMaxChunks tokens

int64_t chunk_tokens(int64_t tokens) {
  const int64_t by_count = (tokens + kMaxChunks - 1) / kMaxChunks;
  return by_count > 8 ? by_count : 8;
}

// Inclusive scan of `value` over the lanes of a warp (Hillis-Steele, fixed order); *exclusive
// gets the sum of the lanes before this one (0 on lane 0).
template <typename T>
__device__ __forceinline__ T warp_inclusive_scan(T value, int lane, T* exclusive) {
#pragma unroll
  for (int offset = 1; offset < kWarp; offset <<= 1) {
    const T other = __shfl_up_sync(kFullMask, value, offset);
    if (lane >= offset) value += other;
  }
  const T before = __shfl_up_sync(kFullMask, value, 1);
  *exclusive = lane == 0 ? T(0) : before;
  return value;
}

// Exclusive scan over a block of kBlockThreads threads, in a fixed order (deterministic even
// for double: no subtraction). Every thread must call it; *total gets the block total.
template <typename T>
__device__ T block_exclusive_scan(T value, T* total) {
  constexpr int kWarps = kBlockThreads / kWarp;
  __shared__ T warp_prefix[kWarps];
  __shared__ T block_total;
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  T exclusive;
  const T inclusive = warp_inclusive_scan(value, lane, &exclusive);
  if (lane == kWarp - 1) warp_prefix[warp] = inclusive;  // the warp's total, for now
  __syncthreads();
  if (warp == 0) {
    T before;
    const T running = warp_inclusive_scan(lane < kWarps ? warp_prefix[lane] : T(0), lane, &before);
    if (lane < kWarps) warp_prefix[lane] = before;
    if (lane == kWarps - 1) block_total = running;
  }
  __syncthreads();
  const T result = warp_prefix[warp] + exclusive;
  *total = block_total;
  __syncthreads();  // the shared arrays may be reused by the next call
  return result;
}

__device__ double block_sum(double value) {
  constexpr int kWarps = kBlockThreads / kWarp;
  __shared__ double partial[kWarps];
  __shared__ double result;
  value = warp_sum(value);
  if (threadIdx.x % kWarp == 0) partial[threadIdx.x / kWarp] = value;
  __syncthreads();
  if (threadIdx.x == 0) {
    double sum = 0.0;
    for (int w = 0; w < kWarps; ++w) sum += partial[w];
    result = sum;
  }
  __syncthreads();
  const double out = result;
  __syncthreads();
  return out;
}

// Per-(expert, chunk) scratch, expert-major so the scan kernel reads it coalesced.
template <typename acc_t>
struct Workspace {
  int32_t* chunk_count;      // [E][NC]; becomes the exclusive start inside the expert's run
  acc_t* chunk_prob;         // [E][NC] score sums
  int32_t* head_count;       // [E][NC + 1]; becomes its exclusive prefix (NC: the total)
  acc_t* head_prob;          // [E][NC]
  double* head_prob_prefix;  // [E][NC + 1]
  int32_t* tail_count;       // [E][NC] (written only for chunks that have a tail segment)
  acc_t* tail_prob;          // [E][NC]
};

struct Layout {
  size_t offsets[7];
  size_t total;
};

Layout workspace_layout(const RouteProblem& p) {
  const size_t E = static_cast<size_t>(p.experts);
  const size_t NC = static_cast<size_t>((p.tokens + chunk_tokens(p.tokens) - 1) / chunk_tokens(p.tokens));
  const size_t real = p.dtype == DType::kFloat64 ? sizeof(double) : sizeof(float);
  const size_t bytes[7] = {E * NC * 4, E * NC * real, E * (NC + 1) * 4, E * NC * real,
                           E * (NC + 1) * sizeof(double), E * NC * 4, E * NC * real};
  Layout layout{};
  for (int i = 0; i < 7; ++i) {
    layout.offsets[i] = layout.total;
    layout.total += (bytes[i] + 255) / 256 * 256;
  }
  return layout;
}

template <typename acc_t>
Workspace<acc_t> carve(const RouteProblem& p, void* base) {
  const Layout layout = workspace_layout(p);
  char* bytes = static_cast<char*>(base);
  return Workspace<acc_t>{reinterpret_cast<int32_t*>(bytes + layout.offsets[0]),
                          reinterpret_cast<acc_t*>(bytes + layout.offsets[1]),
                          reinterpret_cast<int32_t*>(bytes + layout.offsets[2]),
                          reinterpret_cast<acc_t*>(bytes + layout.offsets[3]),
                          reinterpret_cast<double*>(bytes + layout.offsets[4]),
                          reinterpret_cast<int32_t*>(bytes + layout.offsets[5]),
                          reinterpret_cast<acc_t*>(bytes + layout.offsets[6])};
}

template <typename scalar_t, typename acc_t, int EPL>
__global__ void __launch_bounds__(kForwardWarps * kWarp)
    route_forward_kernel(const scalar_t* __restrict__ logits, const RouteProblem p, const int64_t chunk,
                         const int64_t num_chunks, acc_t* __restrict__ topk_weight, int64_t* __restrict__ topk_idx,
                         acc_t* __restrict__ scores, acc_t* __restrict__ seq_prob_mean,
                         int64_t* __restrict__ seq_counts, const Workspace<acc_t> ws) {
  const int lane = threadIdx.x % kWarp;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kForwardWarps + threadIdx.x / kWarp;
  if (c >= num_chunks) return;  // uniform across the warp
  const int64_t T = p.tokens, E = p.experts, k = p.top_k, L = p.seq_len, NC = num_chunks;
  const int64_t c0 = c * chunk, c1 = c0 + chunk < T ? c0 + chunk : T;
  acc_t seg_prob[EPL], chunk_prob[EPL];
  int seg_count[EPL], chunk_count[EPL];
#pragma unroll
  for (int i = 0; i < EPL; ++i) seg_prob[i] = chunk_prob[i] = acc_t(0), seg_count[i] = chunk_count[i] = 0;
  bool wrote_head = false;
  int64_t seq = c0 / L, seq_end = (seq + 1) * L;
  for (int64_t t = c0; t < c1; ++t) {
    const scalar_t* row = logits + t * E;
    acc_t value[EPL], score[EPL];
#pragma unroll
    for (int i = 0; i < EPL; ++i) {
      const int e = lane + kWarp * i;
      value[i] = e < E ? to_acc(row[e]) : acc_t(0);
    }
    if (p.scoring == Scoring::kSoftmax) {
      acc_t max_value = -INFINITY;  // over non-NaN logits; a NaN makes the row NaN via the sum
#pragma unroll
      for (int i = 0; i < EPL; ++i)
        if (lane + kWarp * i < E && value[i] > max_value) max_value = value[i];
      max_value = warp_max(max_value);
      acc_t sum = 0;
#pragma unroll
      for (int i = 0; i < EPL; ++i) {
        score[i] = lane + kWarp * i < E ? exp_acc(value[i] - max_value) : acc_t(0);
        sum += score[i];
      }
      const acc_t inv_sum = acc_t(1) / warp_sum(sum);
#pragma unroll
      for (int i = 0; i < EPL; ++i) score[i] *= inv_sum;
    } else {
#pragma unroll
      for (int i = 0; i < EPL; ++i)
        score[i] = lane + kWarp * i < E ? acc_t(1) / (acc_t(1) + exp_acc(-value[i])) : acc_t(0);
    }
#pragma unroll
    for (int i = 0; i < EPL; ++i) {
      const int e = lane + kWarp * i;
      if (e < E) {
        scores[t * E + e] = score[i];
        seg_prob[i] += score[i];
      }
    }
    // top-k: k rounds of a warp arg-max over the experts not taken yet
    unsigned taken = 0;
    acc_t selected = 0;
    acc_t keep_weight[kMaxSlotsPerLane];
    int keep_expert[kMaxSlotsPerLane];
    for (int64_t j = 0; j < k; ++j) {
      acc_t best_value = 0;
      int best_expert = INT_MAX;
#pragma unroll
      for (int i = 0; i < EPL; ++i) {
        const int e = lane + kWarp * i;
        if (e < E && !((taken >> i) & 1u) && beats(value[i], e, best_value, best_expert)) {
          best_value = value[i];
          best_expert = e;
        }
      }
#pragma unroll
      for (int offset = kWarp / 2; offset > 0; offset >>= 1) {
        const acc_t other_value = __shfl_xor_sync(kFullMask, best_value, offset);
        const int other_expert = __shfl_xor_sync(kFullMask, best_expert, offset);
        if (beats(other_value, other_expert, best_value, best_expert)) {
          best_value = other_value;
          best_expert = other_expert;
        }
      }
      const int owner = best_expert % kWarp, owner_slot = best_expert / kWarp;
      acc_t owner_score = 0;
#pragma unroll
      for (int i = 0; i < EPL; ++i)
        if (i == owner_slot) owner_score = score[i];
      const acc_t weight = __shfl_sync(kFullMask, owner_score, owner);
      if (lane == owner) {
#pragma unroll
        for (int i = 0; i < EPL; ++i)
          if (i == owner_slot) {
            taken |= 1u << i;
            ++seg_count[i];
          }
      }
      selected += weight;  // slot order, as the CPU and MiniMind
      if (lane == static_cast<int>(j % kWarp)) {
#pragma unroll
        for (int q = 0; q < kMaxSlotsPerLane; ++q)
          if (q == static_cast<int>(j / kWarp)) {
            keep_weight[q] = weight;
            keep_expert[q] = best_expert;
          }
      }
    }
    const acc_t denom = selected + static_cast<acc_t>(kNormEps);
#pragma unroll
    for (int q = 0; q < kMaxSlotsPerLane; ++q) {
      const int64_t j = lane + kWarp * q;
      if (j < k) {
        topk_weight[t * k + j] = p.normalize ? keep_weight[q] / denom : keep_weight[q];
        topk_idx[t * k + j] = keep_expert[q];
      }
    }
    if (t + 1 == seq_end || t + 1 == c1) {  // the segment of sequence `seq` ends here
      const int64_t seq_begin = seq * L;
      const bool whole = seq_begin >= c0 && seq_end <= c1, head = seq_begin < c0;
#pragma unroll
      for (int i = 0; i < EPL; ++i) {
        const int64_t e = lane + kWarp * i;
        if (e >= E) continue;
        if (whole) {
          seq_prob_mean[seq * E + e] = seg_prob[i] / static_cast<acc_t>(L);
          seq_counts[seq * E + e] = seg_count[i];
        } else if (head) {
          ws.head_prob[e * NC + c] = seg_prob[i];
          ws.head_count[e * (NC + 1) + c] = seg_count[i];
        } else {
          ws.tail_prob[e * NC + c] = seg_prob[i];
          ws.tail_count[e * NC + c] = seg_count[i];
        }
        chunk_prob[i] += seg_prob[i];
        chunk_count[i] += seg_count[i];
        seg_prob[i] = acc_t(0);
        seg_count[i] = 0;
      }
      wrote_head = wrote_head || (head && !whole);
      ++seq;
      seq_end += L;
    }
  }
#pragma unroll
  for (int i = 0; i < EPL; ++i) {
    const int64_t e = lane + kWarp * i;
    if (e >= E) continue;
    if (!wrote_head) {
      ws.head_prob[e * NC + c] = acc_t(0);
      ws.head_count[e * (NC + 1) + c] = 0;
    }
    ws.chunk_prob[e * NC + c] = chunk_prob[i];
    ws.chunk_count[e * NC + c] = chunk_count[i];
  }
}

template <typename acc_t>
__global__ void __launch_bounds__(kBlockThreads)
    route_scan_kernel(const RouteProblem p, const int64_t num_chunks, const Workspace<acc_t> ws,
                      acc_t* __restrict__ prob_mean, int64_t* __restrict__ expert_counts) {
  const int64_t e = blockIdx.x, NC = num_chunks;
  const int64_t per_thread = (NC + kBlockThreads - 1) / kBlockThreads;
  const int64_t begin = threadIdx.x * per_thread < NC ? threadIdx.x * per_thread : NC;
  const int64_t end = begin + per_thread < NC ? begin + per_thread : NC;
  int32_t* count = ws.chunk_count + e * NC;
  const acc_t* prob = ws.chunk_prob + e * NC;
  int32_t* head_count = ws.head_count + e * (NC + 1);
  const acc_t* head_prob = ws.head_prob + e * NC;
  double* head_prefix = ws.head_prob_prefix + e * (NC + 1);
  int32_t count_sum = 0, head_count_sum = 0;
  double head_sum = 0.0, prob_sum = 0.0;
  for (int64_t c = begin; c < end; ++c) {
    count_sum += count[c];
    head_count_sum += head_count[c];
    head_sum += static_cast<double>(head_prob[c]);
    prob_sum += static_cast<double>(prob[c]);
  }
  int32_t count_total, head_count_total;
  double head_total;
  int32_t count_running = block_exclusive_scan(count_sum, &count_total);
  int32_t head_count_running = block_exclusive_scan(head_count_sum, &head_count_total);
  double head_running = block_exclusive_scan(head_sum, &head_total);
  const double prob_total = block_sum(prob_sum);
  for (int64_t c = begin; c < end; ++c) {
    const int32_t n = count[c], h = head_count[c];
    count[c] = count_running;
    count_running += n;
    head_count[c] = head_count_running;
    head_count_running += h;
    head_prefix[c] = head_running;
    head_running += static_cast<double>(head_prob[c]);
  }
  if (begin < end && end == NC) {  // the thread owning the last chunk closes the prefix arrays
    head_count[NC] = head_count_running;
    head_prefix[NC] = head_running;
  }
  if (threadIdx.x == 0) {
    expert_counts[e] = count_total;
    prob_mean[e] = static_cast<acc_t>(prob_total / static_cast<double>(p.tokens));
  }
}

__global__ void __launch_bounds__(kBlockThreads)
    route_scatter_kernel(const RouteProblem p, const int64_t chunk, const int64_t num_chunks,
                         const int64_t* __restrict__ topk_idx, const int32_t* __restrict__ chunk_start,
                         const int64_t* __restrict__ expert_counts, int64_t* __restrict__ expert_offsets,
                         int64_t* __restrict__ sorted_pairs, int64_t* __restrict__ pair_positions) {
  extern __shared__ int32_t shared[];  // offsets [E], then a cursor row [E] per warp
  const int E = static_cast<int>(p.experts);
  const int tid = threadIdx.x, lane = tid % kWarp, warp = tid / kWarp;
  int32_t total;
  const int32_t start = block_exclusive_scan(tid < E ? static_cast<int32_t>(expert_counts[tid]) : 0, &total);
  if (tid < E) shared[tid] = start;
  if (blockIdx.x == 0) {
    if (tid < E) expert_offsets[tid] = start;
    if (tid == 0) expert_offsets[E] = total;
  }
  __syncthreads();
  const int64_t c = static_cast<int64_t>(blockIdx.x) * (kBlockThreads / kWarp) + warp;
  if (c >= num_chunks) return;  // uniform across the warp; no block barrier follows
  int32_t* cursor = shared + E * (1 + warp);
  for (int e = lane; e < E; e += kWarp) cursor[e] = shared[e] + chunk_start[static_cast<int64_t>(e) * num_chunks + c];
  __syncwarp();
  const int64_t k = p.top_k;
  const int64_t pair_end = (c * chunk + chunk < p.tokens ? c * chunk + chunk : p.tokens) * k;
  for (int64_t base = c * chunk * k; base < pair_end; base += kWarp) {
    const int64_t pair = base + lane;
    const bool active = pair < pair_end;
    const unsigned active_mask = __ballot_sync(kFullMask, active);
    int expert = 0;
    unsigned peers = 0;
    if (active) {
      expert = static_cast<int>(topk_idx[pair]);
      peers = __match_any_sync(active_mask, expert);
      const int32_t position = cursor[expert] + __popc(peers & ((1u << lane) - 1u));
      sorted_pairs[position] = pair;
      pair_positions[pair] = position;
    }
    __syncwarp();
    if (active && lane == 31 - __clz(peers)) cursor[expert] += __popc(peers);
    __syncwarp();
  }
}

template <typename acc_t>
__global__ void __launch_bounds__(kBlockThreads)
    route_seq_fixup_kernel(const RouteProblem p, const int64_t chunk, const int64_t num_chunks,
                           const Workspace<acc_t> ws, acc_t* __restrict__ seq_prob_mean,
                           int64_t* __restrict__ seq_counts) {
  const int64_t E = p.experts, L = p.seq_len, NC = num_chunks, total = p.num_seqs * E;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    const int64_t s = i / E, e = i % E;
    const int64_t first = first_chunk_of_sequence(s, L, chunk), last = last_chunk_of_sequence(s, L, chunk);
    if (first == last) continue;  // written by the routing kernel
    const double* prefix = ws.head_prob_prefix + e * (NC + 1);
    const int32_t* count_prefix = ws.head_count + e * (NC + 1);
    const double prob = static_cast<double>(ws.tail_prob[e * NC + first]) + (prefix[last + 1] - prefix[first + 1]);
    seq_prob_mean[i] = static_cast<acc_t>(prob / static_cast<double>(L));
    seq_counts[i] = ws.tail_count[e * NC + first] + (count_prefix[last + 1] - count_prefix[first + 1]);
  }
}


template <typename scalar_t, int EPL>
void forward_typed(const RouteProblem& p, const void* logits, const RouteForwardOutputs& out, void* workspace,
                   cudaStream_t stream) {
  using acc_t = typename AccOf<scalar_t>::type;
  const int64_t chunk = chunk_tokens(p.tokens), NC = (p.tokens + chunk - 1) / chunk;
  const Workspace<acc_t> ws = carve<acc_t>(p, workspace);
  route_forward_kernel<scalar_t, acc_t, EPL>
      <<<grid_for(NC, kForwardWarps, INT32_MAX), kForwardWarps * kWarp, 0, stream>>>(
          static_cast<const scalar_t*>(logits), p, chunk, NC, static_cast<acc_t*>(out.topk_weight), out.topk_idx,
          static_cast<acc_t*>(out.scores), static_cast<acc_t*>(out.seq_prob_mean), out.seq_expert_counts, ws);
  route_scan_kernel<acc_t><<<static_cast<unsigned>(p.experts), kBlockThreads, 0, stream>>>(
      p, NC, ws, static_cast<acc_t*>(out.prob_mean), out.expert_counts);
  const size_t scatter_shared = sizeof(int32_t) * p.experts * (1 + kBlockThreads / kWarp);
  route_scatter_kernel<<<grid_for(NC, kBlockThreads / kWarp, INT32_MAX), kBlockThreads, scatter_shared, stream>>>(
      p, chunk, NC, out.topk_idx, ws.chunk_count, out.expert_counts, out.expert_offsets, out.sorted_pairs,
      out.pair_positions);
  route_seq_fixup_kernel<acc_t><<<grid_for(p.num_seqs * p.experts, kBlockThreads, 4096), kBlockThreads, 0, stream>>>(
      p, chunk, NC, ws, static_cast<acc_t*>(out.seq_prob_mean), out.seq_expert_counts);
}

template <typename scalar_t>
void forward_by_width(const RouteProblem& p, const void* logits, const RouteForwardOutputs& out, void* workspace,
                      cudaStream_t stream) {
  switch (experts_per_lane(p.experts)) {
    case 1: return forward_typed<scalar_t, 1>(p, logits, out, workspace, stream);
    case 2: return forward_typed<scalar_t, 2>(p, logits, out, workspace, stream);
    case 4: return forward_typed<scalar_t, 4>(p, logits, out, workspace, stream);
    default: return forward_typed<scalar_t, 8>(p, logits, out, workspace, stream);
  }
}
}  // namespace

size_t route_forward_workspace_bytes(const RouteProblem& problem) { return workspace_layout(problem).total; }

cudaError_t launch_route_forward(const RouteProblem& problem, const void* logits, const RouteForwardOutputs& out,
                                 void* workspace, cudaStream_t stream) {
  if (problem.experts < 1 || problem.experts > kMaxExperts || problem.tokens < 1) return cudaErrorInvalidValue;
  switch (problem.dtype) {
    case DType::kFloat64: forward_by_width<double>(problem, logits, out, workspace, stream); break;
    case DType::kBFloat16: forward_by_width<__nv_bfloat16>(problem, logits, out, workspace, stream); break;
    case DType::kFloat16: forward_by_width<__half>(problem, logits, out, workspace, stream); break;
    default: forward_by_width<float>(problem, logits, out, workspace, stream); break;
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace minimind_fast
