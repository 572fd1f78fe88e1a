// The kd_lib_cuda operator namespace: schemas, and the CUDA kernels as their implementations.
// The kd_lib operators of kd_lib/ops/*.py call these for CUDA tensors.
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY(kd_lib_cuda, m) {
  m.def(
      "paired_resize(Tensor images, Tensor row_start, Tensor row_weight, Tensor col_start, "
      "Tensor col_weight, float[] mean, float[] std, ScalarType dtype, bool channels_last) "
      "-> (Tensor, Tensor)");
  m.def("kd_loss_forward(Tensor student, Tensor teacher, float temperature) -> (Tensor, Tensor, Tensor)");
  m.def(
      "kd_loss_backward(Tensor grad, Tensor student, Tensor teacher, Tensor lse_student, "
      "Tensor lse_teacher, float temperature) -> Tensor");
  m.def("mmd2_forward(Tensor x, Tensor y, Tensor bandwidths) -> Tensor");
  m.def("mmd2_backward(Tensor grad, Tensor x, Tensor y, Tensor bandwidths) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(kd_lib_cuda, CUDA, m) {
  m.impl("paired_resize", &kd_lib_ops::paired_resize);
  m.impl("kd_loss_forward", &kd_lib_ops::kd_loss_forward);
  m.impl("kd_loss_backward", &kd_lib_ops::kd_loss_backward);
  m.impl("mmd2_forward", &kd_lib_ops::mmd2_forward);
  m.impl("mmd2_backward", &kd_lib_ops::mmd2_backward);
}
