// Internals shared by the CPU files of moe_route: the entry points and checks (moe_route.cpp),
// the forward (moe_route_forward_cpu.cpp) and the backward (moe_route_backward_cpu.cpp).
#pragma once

#include <cstdint>
#include <memory>

#include "moe_route.h"

namespace minimind_fast {

// AVX2 + FMA present, unless MINIMIND_FAST_CPU_NO_AVX2=1 (the C++ test runs both paths).
bool cpu_uses_avx2();

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
