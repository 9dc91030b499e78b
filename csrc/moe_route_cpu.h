// Internals shared by the CPU files of moe_route: the entry points and checks (moe_route.cpp),
// the forward (moe_route_forward_cpu.cpp) and the backward (moe_route_backward_cpu.cpp).
#pragma once

#include <cstdint>
#include <memory>

#include "moe_route.h"

namespace minimind_fast {

// Instruction sets of the fp32 CPU paths, chosen at run time. AVX2 and AVX-512 run blocks of 8
// token lanes (AVX-512 is the same code compiled with AVX-512VL: 64-bit max/min and mask
// registers in the top-k networks); the SSE2/NEON baseline runs blocks of 4.
enum class CpuIsa : int { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

// The best this CPU supports, capped by MINIMIND_FAST_CPU_ISA=baseline|avx2|avx512 (the tests run
// every path that way).
CpuIsa cpu_isa();

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define MINIMIND_FAST_X86 1
#define MINIMIND_FAST_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define MINIMIND_FAST_TARGET_AVX512 __attribute__((target("avx2,fma,avx512f,avx512vl,avx512bw,avx512dq")))
#endif

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


// Fills `result` (from allocate_route_outputs) for contiguous CPU logits of any supported dtype.
void route_forward_cpu(const at::Tensor& router_logits, const RouteShape& shape, RouteResult& result);

// grad_logits (T, E), already allocated with the logits' dtype, from dense incoming gradients.
void route_backward_cpu(const RouteGrads& grads, const at::Tensor& scores, const at::Tensor& topk_idx,
                        const RouteShape& shape, at::Tensor& grad_logits);

}  // namespace minimind_fast
