// The table of one instruction set's row kernels (csrc/cpu/row_kernels.h). Included by each
// csrc/cpu/rows_<isa>.cpp inside its namespace, after the row headers, in the same
// `#pragma GCC target` region (so the instantiations below are compiled for that target).
#pragma once

template <typename T>
RowKernels<T> kernels() {
  return {&uss_fwd<T>,     &uss_bwd<T>,     &uss_fwd_grads<T>,
          &softmax_fwd<T>, &softmax_bwd<T>, &softmax_fwd_grads<T>,
          &family_fwd<T>,  &family_bwd<T>,  &family_fwd_grads<T>};
}
template RowKernels<float> kernels<float>();
template RowKernels<double> kernels<double>();
