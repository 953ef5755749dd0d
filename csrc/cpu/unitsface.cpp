// unitsface::unitsface_{fwd,bwd}_native on CPU tensors: the drivers of
// csrc/cpu/unitsface_sweep.cpp, and their epilogue of one chunk, the row kernels of
// csrc/cpu/softmax_rows.h (csrc/cpu/family_rows.h for the margin family) and
// csrc/cpu/uss_rows.h (for the instruction set that
// csrc/cpu/row_kernels.h picks): per row, the softmax part, then USS on the bank rows (the USS
// family's row code, column labels = the chunk's classes).
#include <torch/library.h>

#include "cpu/row_kernels.h"
#include "unitsface.h"

namespace unitsface {
namespace {

template <typename T>
void run_rows(const UnitsfaceChunk& ck) {
  const cpu::RowKernels<T>& k = cpu::row_kernels<T>();
  SoftmaxRows<T> w{};
  UssRows<T> b{};
  if (ck.do_w) w = rows_of<T>(ck.softmax, ck.options);
  if (ck.do_b) b = rows_of<T>(ck.bank);
  const cpu::SoftmaxRowFn<T> softmax = k.softmax(ck.pass, ck.options.margin_family());
  const cpu::UssRowFn<T> uss = k.uss(ck.pass);
  const int64_t rows = ck.softmax.inv_x.size(0);
  const int64_t cols = ck.do_w ? w.c * w.k : b.c;
  cpu::for_rows(rows, cols * (ck.do_w + ck.do_b), [&](int64_t r0, int64_t r1) {
    if (ck.do_w) softmax(w, r0, r1);
    if (ck.do_b) uss(b, r0, r1);
  });
}

}  // namespace

void unitsface_epilogue_cpu(const UnitsfaceChunk& ck) {
  if (ck.softmax.inv_x.scalar_type() == at::kDouble) {
    run_rows<double>(ck);
  } else {
    run_rows<float>(ck);
  }
}

TORCH_LIBRARY_IMPL(unitsface, CPU, m) {
  m.impl("unitsface_fwd_native", &unitsface_fwd_op<&unitsface_forward_cpu>);
  m.impl("unitsface_bwd_native", &unitsface_bwd_op<&unitsface_backward_cpu>);
}

}  // namespace unitsface
