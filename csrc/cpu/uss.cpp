// unitsface::uss_{fwd,bwd}_native on CPU tensors: the drivers of csrc/uss_sweep.cpp with the row
// kernels of csrc/cpu/uss_rows.h (for the instruction set that csrc/cpu/row_kernels.h picks) as the
// epilogue, run over the chunk's rows on torch's intra-op threads.
#include <torch/library.h>

#include "cpu/row_kernels.h"
#include "uss.h"

namespace unitsface {
namespace {

template <typename T>
void run_rows(const UssChunk& ck) {
  const UssRows<T> a = rows_of<T>(ck);
  const cpu::UssRowFn<T> fn = cpu::row_kernels<T>().uss(ck.pass);
  cpu::for_rows(a.B, a.c, [&](int64_t r0, int64_t r1) { fn(a, r0, r1); });
}

void uss_epilogue_cpu(const UssChunk& ck) {
  if (ck.dots.scalar_type() == at::kDouble) {
    run_rows<double>(ck);
  } else {
    run_rows<float>(ck);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(unitsface, CPU, m) {
  m.impl("uss_fwd_native", &uss_fwd_op<&uss_epilogue_cpu>);
  m.impl("uss_bwd_native", &uss_bwd_op<&uss_epilogue_cpu>);
}

}  // namespace unitsface
