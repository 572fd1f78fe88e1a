// Fused KD loss (kd_lib/ops/kd_loss.py): temperature softmax, KL(p_teacher || p_student) and its
// gradient, for any class count.
//
// Forward: one block per row. Each thread folds its strided share of the row into two online
// softmax states, for a = s / T (max, sum of exp) and for b = t / T (max, sum of exp, and the sum
// of exp(b - max) * (b - a)), rescaling the sums whenever the max grows; the block then merges the
// states (warp shuffles, then shared memory). One read of both rows gives KL and both
// log-sum-exps. Backward: one elementwise pass, dL/ds = g T / N (exp(a - lse_a) - exp(b - lse_b)).
// Both read and write 16 bytes per access (4 float32 or 8 bf16/fp16 logits) when every row is a
// whole number of such aligned packs, one logit per access otherwise.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "ops.h"

namespace kd_lib_ops {
namespace {

constexpr int kWarp = 32;
constexpr int kThreads = 256;

// kPack logits moved by one access
template <typename T, int kPack>
struct alignas(sizeof(T) * kPack) Pack {
  T values[kPack];
};

// 16-byte packs when every row of both tensors is a whole number of aligned ones, else 1
template <typename scalar_t>
int pack_size(const at::Tensor& a, const at::Tensor& b, int64_t classes) {
  constexpr int pack = 16 / sizeof(scalar_t);
  const auto aligned = [](const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; };
  return classes % pack == 0 && aligned(a) && aligned(b) ? pack : 1;
}

// Softmax sums of one row's share: max m and sum_c exp(v_c - m); for the teacher also
// sum_c exp(b_c - m) (b_c - a_c).
struct State {
  float student_max, student_sum, teacher_max, teacher_sum, weighted;
};

__device__ __forceinline__ void merge_sum(float& max, float& sum, float other_max, float other_sum,
                                          float* weighted = nullptr, float other_weighted = 0.f) {
  const float top = fmaxf(max, other_max);
  if (top == -INFINITY) return;  // both empty
  const float mine = expf(max - top), theirs = expf(other_max - top);
  sum = sum * mine + other_sum * theirs;
  if (weighted) *weighted = *weighted * mine + other_weighted * theirs;
  max = top;
}

__device__ __forceinline__ void merge(State& s, const State& o) {
  merge_sum(s.student_max, s.student_sum, o.student_max, o.student_sum);
  merge_sum(s.teacher_max, s.teacher_sum, o.teacher_max, o.teacher_sum, &s.weighted, o.weighted);
}

// One logit into a running state: one exp per state, the running sums rescaled when the max grows.
__device__ __forceinline__ void add(State& s, float a, float b) {
  if (a > s.student_max) {
    s.student_sum = s.student_sum * expf(s.student_max - a) + 1.f;
    s.student_max = a;
  } else {
    s.student_sum += expf(a - s.student_max);
  }
  if (b > s.teacher_max) {
    const float rescale = expf(s.teacher_max - b);
    s.teacher_sum = s.teacher_sum * rescale + 1.f;
    s.weighted = s.weighted * rescale + (b - a);
    s.teacher_max = b;
  } else {
    const float e = expf(b - s.teacher_max);
    s.teacher_sum += e;
    s.weighted += e * (b - a);
  }
}

__device__ __forceinline__ State shuffle_down(const State& s, int offset) {
  return {__shfl_down_sync(0xffffffffu, s.student_max, offset),
          __shfl_down_sync(0xffffffffu, s.student_sum, offset),
          __shfl_down_sync(0xffffffffu, s.teacher_max, offset),
          __shfl_down_sync(0xffffffffu, s.teacher_sum, offset),
          __shfl_down_sync(0xffffffffu, s.weighted, offset)};
}

template <typename scalar_t, int kPack>
__global__ void kd_forward_kernel(const scalar_t* __restrict__ student,
                                  const scalar_t* __restrict__ teacher, int64_t classes,
                                  float inverse_temperature, float* __restrict__ row_kl,
                                  float* __restrict__ lse_student, float* __restrict__ lse_teacher) {
  using P = Pack<scalar_t, kPack>;
  const int64_t row = blockIdx.x;
  const P* s_row = reinterpret_cast<const P*>(student + row * classes);
  const P* t_row = reinterpret_cast<const P*>(teacher + row * classes);
  State state{-INFINITY, 0.f, -INFINITY, 0.f, 0.f};
  for (int64_t i = threadIdx.x; i < classes / kPack; i += blockDim.x) {
    const P s = s_row[i], t = t_row[i];
#pragma unroll
    for (int k = 0; k < kPack; ++k) {
      add(state, static_cast<float>(s.values[k]) * inverse_temperature,
          static_cast<float>(t.values[k]) * inverse_temperature);
    }
  }
  for (int offset = kWarp / 2; offset > 0; offset /= 2) merge(state, shuffle_down(state, offset));

  __shared__ State warps[kWarp];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  if (lane == 0) warps[warp] = state;
  __syncthreads();
  if (warp != 0) return;
  const int warp_count = (blockDim.x + kWarp - 1) / kWarp;
  state = lane < warp_count ? warps[lane] : State{-INFINITY, 0.f, -INFINITY, 0.f, 0.f};
  for (int offset = kWarp / 2; offset > 0; offset /= 2) merge(state, shuffle_down(state, offset));
  if (lane == 0) {
    const float lse_a = state.student_max + logf(state.student_sum);
    const float lse_b = state.teacher_max + logf(state.teacher_sum);
    lse_student[row] = lse_a;
    lse_teacher[row] = lse_b;
    row_kl[row] = state.weighted / state.teacher_sum - lse_b + lse_a;
  }
}

template <typename scalar_t, int kPack>
__global__ void kd_backward_kernel(const float* __restrict__ grad, const scalar_t* __restrict__ student,
                                   const scalar_t* __restrict__ teacher,
                                   const float* __restrict__ lse_student,
                                   const float* __restrict__ lse_teacher, int64_t rows, int64_t classes,
                                   float inverse_temperature, float scale,
                                   scalar_t* __restrict__ grad_student) {
  using P = Pack<scalar_t, kPack>;
  const float factor = *grad * scale;
  const int64_t packs = rows * classes / kPack;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < packs;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = i * kPack / classes;  // a pack never straddles two rows
    const float lse_s = lse_student[row], lse_t = lse_teacher[row];
    const P s = reinterpret_cast<const P*>(student)[i], t = reinterpret_cast<const P*>(teacher)[i];
    P out;
#pragma unroll
    for (int k = 0; k < kPack; ++k) {
      const float p_s = expf(static_cast<float>(s.values[k]) * inverse_temperature - lse_s);
      const float p_t = expf(static_cast<float>(t.values[k]) * inverse_temperature - lse_t);
      out.values[k] = static_cast<scalar_t>(factor * (p_s - p_t));
    }
    reinterpret_cast<P*>(grad_student)[i] = out;
  }
}

void check_logits(const at::Tensor& student, const at::Tensor& teacher) {
  TORCH_CHECK(student.is_cuda() && teacher.device() == student.device(),
              "student and teacher logits must be on one CUDA device");
  TORCH_CHECK(student.dim() == 2 && student.sizes() == teacher.sizes() && student.numel() > 0,
              "student and teacher logits must be non-empty (N, C) of one shape");
  TORCH_CHECK(student.scalar_type() == teacher.scalar_type(), "student and teacher logits differ in dtype");
  TORCH_CHECK(student.is_contiguous() && teacher.is_contiguous(), "logits must be contiguous");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> kd_loss_forward(
    const at::Tensor& student, const at::Tensor& teacher, double temperature) {
  check_logits(student, teacher);
  const c10::cuda::CUDAGuard guard(student.device());
  const int64_t rows = student.size(0), classes = student.size(1);
  const auto row_options = student.options().dtype(at::kFloat);
  at::Tensor row_kl = at::empty({rows}, row_options);
  at::Tensor lse_student = at::empty({rows}, row_options);
  at::Tensor lse_teacher = at::empty({rows}, row_options);
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, student.scalar_type(), "kd_loss_forward", [&] {
    const int pack = pack_size<scalar_t>(student, teacher, classes);
    // a warp per 32 packs, up to kThreads: small class counts leave no thread idle
    const int threads = static_cast<int>(std::min<int64_t>(kThreads, (classes / pack + kWarp - 1) / kWarp * kWarp));
    auto kernel = pack == 1 ? kd_forward_kernel<scalar_t, 1> : kd_forward_kernel<scalar_t, 16 / sizeof(scalar_t)>;
    kernel<<<static_cast<unsigned int>(rows), threads, 0, stream>>>(
        student.data_ptr<scalar_t>(), teacher.data_ptr<scalar_t>(), classes,
        static_cast<float>(1.0 / temperature), row_kl.data_ptr<float>(),
        lse_student.data_ptr<float>(), lse_teacher.data_ptr<float>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  at::Tensor loss = row_kl.sum().mul_(temperature * temperature / static_cast<double>(rows));
  return {loss, lse_student, lse_teacher};
}

at::Tensor kd_loss_backward(
    const at::Tensor& grad, const at::Tensor& student, const at::Tensor& teacher,
    const at::Tensor& lse_student, const at::Tensor& lse_teacher, double temperature) {
  check_logits(student, teacher);
  TORCH_CHECK(grad.numel() == 1 && grad.device() == student.device(), "grad must be one value on the logits' device");
  const c10::cuda::CUDAGuard guard(student.device());
  const int64_t rows = student.size(0), classes = student.size(1);
  const at::Tensor grad_value = grad.to(at::kFloat).contiguous();
  const at::Tensor lse_s = lse_student.to(at::kFloat).contiguous();
  const at::Tensor lse_t = lse_teacher.to(at::kFloat).contiguous();
  at::Tensor grad_student = at::empty_like(student, at::MemoryFormat::Contiguous);
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, student.scalar_type(), "kd_loss_backward", [&] {
    const int pack = pack_size<scalar_t>(student, teacher, classes);
    const int64_t wanted = (rows * classes / pack + kThreads - 1) / kThreads;
    const auto blocks = static_cast<unsigned int>(std::min<int64_t>(wanted, 65535));
    auto kernel = pack == 1 ? kd_backward_kernel<scalar_t, 1> : kd_backward_kernel<scalar_t, 16 / sizeof(scalar_t)>;
    kernel<<<blocks, kThreads, 0, stream>>>(
        grad_value.data_ptr<float>(), student.data_ptr<scalar_t>(), teacher.data_ptr<scalar_t>(),
        lse_s.data_ptr<float>(), lse_t.data_ptr<float>(), rows, classes,
        static_cast<float>(1.0 / temperature), static_cast<float>(temperature / rows),
        grad_student.data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return grad_student;
}

}  // namespace kd_lib_ops
