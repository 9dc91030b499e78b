// Plain C++ shared by the CPU implementation (moe_route_*_cpu.cpp) and the CUDA kernels
// (cuda/moe_route_*.cu). No torch header here: nvcc must compile it on machines whose
// torch has no CUDA headers (see DESIGN.md, "CUDA code that CI can still check").
//
// Ordering contract of moe_route (both backends, and the PyTorch reference):
//   experts are ranked by their *logit* (softmax and sigmoid are monotone, so this is the
//   top-k of the scores, but exact and independent of how exp() rounds on each device);
//   NaN ranks above every number (torch.sort semantics); equal logits -> lower expert id first.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define MINIMIND_FAST_HD __host__ __device__ __forceinline__
#else
#define MINIMIND_FAST_HD inline
#endif

namespace minimind_fast {

enum class Scoring : int { kSoftmax = 0, kSigmoid = 1 };

// MiniMind's epsilon in the top-k renormalisation: w / (sum(w) + 1e-20).
constexpr double kNormEps = 1e-20;

// True when `a` ranks strictly before `b` (greater, NaN greatest). Ties are left to the caller,
// which breaks them toward the lower expert id.
template <typename T>
MINIMIND_FAST_HD bool ranks_before(T a, T b) {
  return a > b || (a != a && b == b);
}

// Chunks of `chunk` consecutive tokens are the unit of parallel work and of the deterministic
// statistics: inside a chunk the tokens of one sequence form a "segment". A segment that is a
// whole sequence is written straight to the per-sequence outputs; otherwise it is the chunk's
// "head" (its sequence began before the chunk) or its "tail" (it begins inside the chunk and
// ends after it). A sequence spanning chunks first..last is tail(first) + head(first+1..last).
MINIMIND_FAST_HD int64_t first_chunk_of_sequence(int64_t seq, int64_t seq_len, int64_t chunk) {
  return seq * seq_len / chunk;
}
MINIMIND_FAST_HD int64_t last_chunk_of_sequence(int64_t seq, int64_t seq_len, int64_t chunk) {
  return ((seq + 1) * seq_len - 1) / chunk;
}

}  // namespace minimind_fast
