// Paired resize (kd_lib/ops/paired_resize.py): uint8 (N, H, W, C) in; normalized HR (N, C, H, W)
// and downsampled LR (N, C, h, w) out, in one kernel.
//
// A block owns a run of up to blockDim.x LR pixels of one LR row, and the HR pixels they cover:
// rows floor(oy H / h) .. floor((oy + 1) H / h) - 1, and the columns likewise, which tile the HR
// image exactly. Each thread first computes one LR pixel from its taps window (separable
// weights, rows then columns, from resize_taps; all channels at once); then the block writes
// its HR pixels with consecutive threads on consecutive output addresses (in either memory
// format), so the stores coalesce; channel loops are unrolled, so the per-channel constants stay
// in registers. Neighbouring windows overlap and the HR pass reads what the
// LR pass just read, so the repeated reads hit the L1/L2 caches and DRAM sees each input byte
// about once.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <limits>

#include "ops.h"

namespace kd_lib_ops {
namespace {

constexpr int kMaxChannels = 4;
constexpr int kMaxThreads = 256;

struct Normalization {
  float scale[kMaxChannels];  // 1 / (255 std)
  float shift[kMaxChannels];  // -mean / std
};

struct Strides {
  int64_t n, c, y, x;
};

template <typename out_t>
__global__ void paired_resize_kernel(
    const uint8_t* __restrict__ images, int height, int width, int channels, int lr_height,
    int lr_width, const int* __restrict__ row_start, const float* __restrict__ row_weight,
    int row_taps, const int* __restrict__ col_start, const float* __restrict__ col_weight,
    int col_taps, Normalization norm, bool channels_last, out_t* __restrict__ hr,
    Strides hr_stride, out_t* __restrict__ lr, Strides lr_stride) {
  const int64_t n = blockIdx.x / lr_height;
  const int oy = static_cast<int>(blockIdx.x % lr_height);
  const int ox_begin = static_cast<int>(blockIdx.y) * blockDim.x;
  const int ox_end = min(ox_begin + static_cast<int>(blockDim.x), lr_width);
  const uint8_t* image = images + n * height * width * channels;

  const int ox = ox_begin + static_cast<int>(threadIdx.x);
  if (ox < ox_end) {
    float sum[kMaxChannels] = {0.f, 0.f, 0.f, 0.f};
    for (int ty = 0; ty < row_taps; ++ty) {
      const float wy = row_weight[oy * row_taps + ty];
      if (wy == 0.f) continue;
      const int y = min(row_start[oy] + ty, height - 1);
      float row_sum[kMaxChannels] = {0.f, 0.f, 0.f, 0.f};
      for (int tx = 0; tx < col_taps; ++tx) {
        const float wx = col_weight[ox * col_taps + tx];
        const int x = min(col_start[ox] + tx, width - 1);
        const uint8_t* pixel = image + (static_cast<int64_t>(y) * width + x) * channels;
#pragma unroll
        for (int c = 0; c < kMaxChannels; ++c) {
          if (c < channels) row_sum[c] += wx * static_cast<float>(__ldg(pixel + c));
        }
      }
#pragma unroll
      for (int c = 0; c < kMaxChannels; ++c) sum[c] += wy * row_sum[c];
    }
    out_t* lr_pixel = lr + n * lr_stride.n + oy * lr_stride.y + ox * lr_stride.x;
#pragma unroll
    for (int c = 0; c < kMaxChannels; ++c) {
      if (c < channels) lr_pixel[c * lr_stride.c] = static_cast<out_t>(sum[c] * norm.scale[c] + norm.shift[c]);
    }
  }

  const int y_begin = static_cast<int>(static_cast<int64_t>(oy) * height / lr_height);
  const int y_end = static_cast<int>(static_cast<int64_t>(oy + 1) * height / lr_height);
  const int x_begin = static_cast<int>(static_cast<int64_t>(ox_begin) * width / lr_width);
  const int x_end = static_cast<int>(static_cast<int64_t>(ox_end) * width / lr_width);
  for (int y = y_begin; y < y_end; ++y) {
    const uint8_t* row = image + static_cast<int64_t>(y) * width * channels;
    out_t* hr_row = hr + n * hr_stride.n + y * hr_stride.y;
    // consecutive threads on consecutive addresses: a pixel's channels per thread when they are
    // adjacent (channels-last), else one channel plane after the other
    if (channels_last) {
      for (int x = x_begin + static_cast<int>(threadIdx.x); x < x_end; x += blockDim.x) {
#pragma unroll
        for (int c = 0; c < kMaxChannels; ++c) {
          if (c < channels) {
            hr_row[c * hr_stride.c + x * hr_stride.x] = static_cast<out_t>(
                static_cast<float>(__ldg(row + x * channels + c)) * norm.scale[c] + norm.shift[c]);
          }
        }
      }
    } else {
#pragma unroll
      for (int c = 0; c < kMaxChannels; ++c) {
        if (c >= channels) break;
        for (int x = x_begin + static_cast<int>(threadIdx.x); x < x_end; x += blockDim.x) {
          hr_row[c * hr_stride.c + x * hr_stride.x] = static_cast<out_t>(
              static_cast<float>(__ldg(row + x * channels + c)) * norm.scale[c] + norm.shift[c]);
        }
      }
    }
  }
}

Strides strides_of(const at::Tensor& t) {
  return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

void check_taps(const at::Tensor& start, const at::Tensor& weight, int64_t size, const char* name) {
  TORCH_CHECK(start.is_cuda() && weight.is_cuda(), name, " taps must be CUDA tensors");
  TORCH_CHECK(start.scalar_type() == at::kInt && start.dim() == 1 && start.size(0) == size &&
                  start.is_contiguous(),
              name, "_start must be contiguous int32 (", size, ",)");
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.dim() == 2 && weight.size(0) == size &&
                  weight.size(1) >= 1 && weight.is_contiguous(),
              name, "_weight must be contiguous float32 (", size, ", taps)");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> paired_resize(
    const at::Tensor& images, const at::Tensor& row_start, const at::Tensor& row_weight,
    const at::Tensor& col_start, const at::Tensor& col_weight, c10::ArrayRef<double> mean,
    c10::ArrayRef<double> std, c10::ScalarType dtype, bool channels_last) {
  TORCH_CHECK(images.is_cuda() && images.scalar_type() == at::kByte && images.dim() == 4 &&
                  images.is_contiguous(),
              "images must be a contiguous uint8 CUDA tensor (N, H, W, C)");
  const int64_t batch = images.size(0), height = images.size(1), width = images.size(2);
  const int64_t channels = images.size(3);
  TORCH_CHECK(channels >= 1 && channels <= kMaxChannels, "at most ", kMaxChannels, " channels");
  TORCH_CHECK(static_cast<int64_t>(mean.size()) == channels && static_cast<int64_t>(std.size()) == channels,
              "mean and std need one value per channel");
  const int64_t lr_height = row_start.size(0), lr_width = col_start.size(0);
  check_taps(row_start, row_weight, lr_height, "row");
  check_taps(col_start, col_weight, lr_width, "col");
  TORCH_CHECK(lr_height >= 1 && lr_height <= height && lr_width >= 1 && lr_width <= width,
              "the LR size must be from 1 to the HR size");
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "dtype must be float32, bfloat16 or float16");

  const c10::cuda::CUDAGuard guard(images.device());
  const auto layout = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const auto options = images.options().dtype(dtype).memory_format(layout);
  at::Tensor hr = at::empty({batch, channels, height, width}, options);
  at::Tensor lr = at::empty({batch, channels, lr_height, lr_width}, options);
  if (batch == 0) return {hr, lr};

  Normalization norm{};
  for (int64_t c = 0; c < channels; ++c) {
    norm.scale[c] = static_cast<float>(1.0 / (255.0 * std[c]));
    norm.shift[c] = static_cast<float>(-mean[c] / std[c]);
  }
  // one thread per LR pixel of a row, in whole warps, up to kMaxThreads; the rest in more blocks
  const int threads = static_cast<int>(std::min<int64_t>(kMaxThreads, (lr_width + 31) / 32 * 32));
  TORCH_CHECK(batch * lr_height <= std::numeric_limits<int32_t>::max(), "batch too large");
  const dim3 grid(static_cast<unsigned int>(batch * lr_height),
                  static_cast<unsigned int>((lr_width + threads - 1) / threads));
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "paired_resize", [&] {
    paired_resize_kernel<scalar_t><<<grid, threads, 0, stream>>>(
        images.data_ptr<uint8_t>(), static_cast<int>(height), static_cast<int>(width),
        static_cast<int>(channels), static_cast<int>(lr_height), static_cast<int>(lr_width),
        row_start.data_ptr<int>(), row_weight.data_ptr<float>(), static_cast<int>(row_weight.size(1)),
        col_start.data_ptr<int>(), col_weight.data_ptr<float>(), static_cast<int>(col_weight.size(1)),
        norm, channels_last, hr.data_ptr<scalar_t>(), strides_of(hr), lr.data_ptr<scalar_t>(),
        strides_of(lr));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {hr, lr};
}

}  // namespace kd_lib_ops
