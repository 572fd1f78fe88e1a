// The CUDA kernels of kd_lib.ops, registered as the kd_lib_cuda operators (registration.cpp).
// Each mirrors a PyTorch reference in kd_lib/ops/*.py; the formulas are in those docstrings.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>

#include <tuple>
#include <vector>

namespace kd_lib_ops {

std::tuple<at::Tensor, at::Tensor> paired_resize(
    const at::Tensor& images, const at::Tensor& row_start, const at::Tensor& row_weight,
    const at::Tensor& col_start, const at::Tensor& col_weight, c10::ArrayRef<double> mean,
    c10::ArrayRef<double> std, c10::ScalarType dtype, bool channels_last);

std::tuple<at::Tensor, at::Tensor, at::Tensor> kd_loss_forward(
    const at::Tensor& student, const at::Tensor& teacher, double temperature);

at::Tensor kd_loss_backward(
    const at::Tensor& grad, const at::Tensor& student, const at::Tensor& teacher,
    const at::Tensor& lse_student, const at::Tensor& lse_teacher, double temperature);

at::Tensor mmd2_forward(const at::Tensor& x, const at::Tensor& y, const at::Tensor& bandwidths);

std::tuple<at::Tensor, at::Tensor> mmd2_backward(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& y, const at::Tensor& bandwidths);

}  // namespace kd_lib_ops
