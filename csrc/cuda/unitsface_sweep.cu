// unitsface::unitsface_{fwd,bwd}_native on CUDA tensors: the chunked sweep of the unitsface
// family (docs/design.md §2) with its own driver, cuBLAS GEMMs through ATen and the kernels of
// csrc/cuda/sweep_*.cuh. (The CPU driver, csrc/cpu/unitsface_sweep.cpp, runs the same maths
// with its own chunking; the per-element maths of both is csrc/epilogue.h.)
//
// Per call: one kernel for the norms (x, the W rows and the bank rows of S, read once) and the
// per-column arrays. Per chunk of c columns (csrc/cuda_plan.h: c·B fp32 dots per part fit in
// L2 with their tiles; c ≈ 8192 at B = 512 for bf16):
//
//   forward        [stage]  dots = x·[W_c | bank_c]ᵀ  epilogue  [∂x products]
//   backward       [stage]  dots = x·[W_c | bank_c]ᵀ or x·W_cᵀ  epilogue  [∂x products]
//                           [Q = tileᵀ·x̂, projection]
//
// "stage" gathers / converts / masks the chunk's rows only when they cannot be read in place
// (a partial-FC index, reference rows in another dtype than x, a bank validity mask) and, for
// fp16, writes their normalised copies for the ∂x products. The ∂x products are a split-K
// batched GEMM: slice k of the chunk's gradient tile times slice k of its rows, accumulated
// into acc[k] (fp32, [ns, B, D] per part); the epilogue rescales acc[k]'s row when split k's
// running max moved (only then), and the finish merges the splits in a fixed order.
//
// W and the bank are two tables, but a GEMM of each part per chunk would double the launches
// (issue 26): where the two parts' operands lie at one offset from each other, one batched
// GEMM takes both (cuBLAS's batch stride; "both parts in one GEMM" below). The dots can with
// one sub-centre: the rows, staged or in place, are two n × D matrices, and the offset between
// them (a multiple of 16 bytes, else a GEMM each) is the batch stride. The forward's ∂x
// products can too: a chunk's ns > 1 slices when the rows are staged (the batch (part, slice)
// needs the bank's rows ns slices after W's, as in the staging buffer; in place they are
// wherever the tables are), a single slice (the last, partial one) whenever the bank's rows
// lie above W's.
//
// Gradient tiles are in x's dtype (bf16 for bf16 inputs) with fp32 accumulation; they carry
// the column's inverse norm except for fp16, whose product rows are normalised instead (an
// fp16 tile g·inv_r overflows for rows below the eps).
//
// row_grads (the forward forms ∂L_i/∂x_i and ∂L_i/∂b during its sweep, csrc/cpu/unitsface_row_grads.h
// for the maths): 6 GEMM-equivalents per step for the objective (forward 2 dots + 2 products,
// backward 1 dots + 1 ∂W product) instead of 7. No host synchronisation: every size is known
// on the host, every value stays on the device. No float atomics: each output element has one
// writer, every sum a fixed order.
//
// The same source also builds for the host under UNITSFACE_CUDA_EMU (csrc/emu/: CUDA threads
// emulated as fibers, ops registered for CPU tensors in the namespace unitsface_emu), so that
// the CPU tests run these kernels and this driver; everything device-specific goes through the
// glue below (the stream, the L2 size, the launch) and, there, the GEMMs' dtypes.
#include <algorithm>
#include <array>
#include <functional>
#include <limits>
#include <optional>
#include <vector>

#include <ATen/ATen.h>
#include <torch/library.h>

#ifndef UNITSFACE_CUDA_EMU
#include <ATen/cuda/CUDAContext.h>
#endif

#include "chunking.h"
#include "cuda_plan.h"
#include "unitsface.h"
#include "cuda/sweep_backward.cuh"
#include "cuda/sweep_finish.cuh"
#include "cuda/sweep_forward.cuh"
#include "cuda/sweep_project.cuh"
#include "cuda/sweep_setup.cuh"

namespace unitsface {
namespace {

using cuda_sweep::DType;

// ------------------------------------------------------------------------ device glue
#ifndef UNITSFACE_CUDA_EMU
using Stream = cudaStream_t;
Stream current_stream() { return at::cuda::getCurrentCUDAStream(); }
int64_t l2_bytes() { return at::cuda::getCurrentDeviceProperties()->l2CacheSize; }
template <typename... P, typename... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, Stream stream, A&&... args) {
  kernel<<<grid, block, 0, stream>>>(std::forward<A>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
#else
using Stream = int;
Stream current_stream() { return 0; }
int64_t l2_bytes() { return cuda_plan::kDefaultL2Bytes; }
template <typename... P, typename... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, Stream, A&&... args) {
  cuda_emu::run(grid, block, [&] { kernel(args...); });
}
#endif

DType dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kHalf:
      return DType::kHalf;
    case at::kBFloat16:
      return DType::kBFloat16;
    case at::kDouble:
      return DType::kDouble;
    case at::kFloat:
      return DType::kFloat;
    default:
      TORCH_CHECK_TYPE(false, "unitsface (CUDA): unsupported dtype ", t);
  }
}

// fn(T{}, X{}) for the accumulation dtype T and x's dtype X
template <typename F>
void dispatch_x(at::ScalarType xdt, const F& fn) {
  switch (xdt) {
    case at::kFloat:
      return fn(float{}, float{});
    case at::kHalf:
      return fn(float{}, c10::Half{});
    case at::kBFloat16:
      return fn(float{}, c10::BFloat16{});
    case at::kDouble:
      return fn(double{}, double{});
    default:
      TORCH_CHECK_TYPE(false, "unitsface (CUDA): x must be float64, float32, float16 or "
                       "bfloat16, got ", xdt);
  }
}

unsigned grid_for(int64_t warps_needed) {
  const int64_t per_block = cuda_sweep::kRowThreads / cuda_sweep::kWarp;
  return static_cast<unsigned>(
      std::max<int64_t>(1, std::min<int64_t>((warps_needed + per_block - 1) / per_block,
                                             int64_t(1) << 20)));
}

template <typename T>
const T* cptr(const at::Tensor& t) {
  return t.defined() && t.numel() > 0 ? t.const_data_ptr<T>() : nullptr;
}
template <typename T>
T* mptr(const at::Tensor& t) {
  return t.defined() && t.numel() > 0 ? t.data_ptr<T>() : nullptr;
}

// out (rows × n view) = a (rows × D) · bᵀ (b: n × D), fp32 results from 16-bit operands
void gemm_nt(at::Tensor out, const at::Tensor& a, const at::Tensor& b) {
#ifdef UNITSFACE_CUDA_EMU  // the CPU has no mixed-dtype mm: the same products in fp32
  if (a.scalar_type() != out.scalar_type()) {
    at::mm_out(out, a.to(out.scalar_type()), b.to(out.scalar_type()).t());
    return;
  }
#endif
  chunking::gemm_nt(out, a, b);
}

// Part p's gradient tile (B × c, row stride parts·c) of a chunk's tiles [B, parts, c].
at::Tensor tile_part(const at::Tensor& tiles, int64_t p) { return tiles.select(1, p); }

// out = beta·out + b1 @ b2 (batched), fp32 accumulators for 16-bit operands
void baddbmm_acc(at::Tensor out, const at::Tensor& b1, const at::Tensor& b2, double beta) {
  if (b1.scalar_type() == out.scalar_type()) {
    at::baddbmm_out(out, out, b1, b2, beta, 1.0);
    return;
  }
#ifdef UNITSFACE_CUDA_EMU
  at::baddbmm_out(out, out, b1.to(out.scalar_type()), b2.to(out.scalar_type()), beta, 1.0);
#else
  at::baddbmm_out(out, out, b1, b2, out.scalar_type(), beta, 1.0);
#endif
}

// ------------------------------------------------------------------ both parts in one GEMM
// The offset (elements) from a's first element to b's when it lets one batched GEMM operand
// reach both: a multiple of 16 bytes, so that every batch keeps the alignment of the first
// (cuBLAS's vectorised kernels need 16 bytes; a GEMM per part is better than a slower
// unaligned pair), and below 2^40 bytes, the largest stride of a tensor-memory-access
// descriptor (no allocation is that large, so no single tensor ever gave cuBLAS more).
std::optional<int64_t> part_offset(const at::Tensor& a, const at::Tensor& b) {
  const auto pa = reinterpret_cast<uintptr_t>(a.const_data_ptr());
  const auto pb = reinterpret_cast<uintptr_t>(b.const_data_ptr());
  const uintptr_t gap = pb >= pa ? pb - pa : pa - pb;
  if (gap % 16 != 0 || gap >= (uintptr_t(1) << 40)) return std::nullopt;
  const int64_t elems = static_cast<int64_t>(gap) / a.element_size();
  return pb >= pa ? elems : -elems;
}

// The W part's and the bank part's operand of a batched GEMM (w, b: alike in dtype, sizes and
// strides; batch dim 0) as one operand whose batches are w's then b's: its batch stride must
// go on from w's last batch to b's first (b lies w.size(0) batch strides above w), or, with
// one batch per part, b's offset above w is the stride. Within one allocation (a chunk buffer,
// the staged rows) an as_strided view; across two (W and the bank read in place) a zero-copy
// at::from_blob over both, which only a GEMM of this call reads, while the tables live (only
// inputs span two allocations: the outputs are chunk buffers). nullopt when no stride fits.
std::optional<at::Tensor> parts_batch(const at::Tensor& w, const at::Tensor& b) {
  if (w.scalar_type() != b.scalar_type() || w.sizes() != b.sizes() ||
      w.strides() != b.strides()) {
    return std::nullopt;
  }
  const std::optional<int64_t> off = part_offset(w, b);
  const int64_t nb = w.size(0), step = w.stride(0);
  if (!off || *off < 0 || (nb > 1 && *off != nb * step)) return std::nullopt;
  std::vector<int64_t> sizes = w.sizes().vec(), strides = w.strides().vec();
  sizes[0] = 2 * nb;
  strides[0] = nb > 1 ? step : *off;
  if (w.storage().is_alias_of(b.storage())) return w.as_strided(sizes, strides);
  return at::for_blob(const_cast<void*>(w.const_data_ptr()), sizes)
      .strides(strides)
      .options(w.options())
      .target_device(w.device())  // (no pointer query)
      .make_tensor();
}

// One part's operands of a chunk's ∂x products: its gradient tile (B × ≥ n columns, any row
// stride), its rows (≥ n × D, any row stride) and its accumulators acc ([ns, B, D]); n columns
// in slices of kw.
struct SliceOperands {
  at::Tensor acc, tile, rows;
  int64_t n, kw;
};

// acc[k] (beta = 0: =, 1: +=) tile[:, k·kw : (k+1)·kw] · rows[k·kw : (k+1)·kw] for the slices
// k of one chunk: the full slices in one batched GEMM (split-K), the last partial slice (the
// sweep's last chunk only) in a second one. With `bank` (the forward: both parts' accumulators
// start on the same chunk) each of these is one GEMM for both parts where parts_batch joins
// every operand: the batch (part, slice) then has one stride per operand — the tiles are
// [B][parts][c] and the accumulators [parts][ns][B][D], so for a chunk's ns full slices the
// rows must lie c rows apart (staged rows), for a single slice anywhere above W's.
void slice_products(const SliceOperands& w, const SliceOperands* bank, double beta) {
  if (bank != nullptr && (bank->n != w.n || bank->kw != w.kw)) {  // K > 1: W has n·K columns
    slice_products(w, nullptr, beta);
    slice_products(*bank, nullptr, beta);
    return;
  }
  // part p's acc, tile and rows operands of the slices [k0, k0 + nb), kk columns each
  using Operands = std::array<at::Tensor, 3>;
  auto operands = [](const SliceOperands& p, int64_t k0, int64_t nb, int64_t kk) {
    const int64_t B = p.tile.size(0), ld = p.tile.stride(0);
    const int64_t D = p.rows.size(1), rs = p.rows.stride(0);
    return Operands{
        p.acc.narrow(0, k0, nb),
        p.tile.as_strided({nb, B, kk}, {p.kw, ld, 1}, p.tile.storage_offset() + k0 * p.kw),
        p.rows.as_strided({nb, kk, D}, {p.kw * rs, rs, 1},
                          p.rows.storage_offset() + k0 * p.kw * rs)};
  };
  auto batched = [&](int64_t k0, int64_t nb, int64_t kk) {
    const Operands ow = operands(w, k0, nb, kk);
    if (bank != nullptr) {
      const Operands ob = operands(*bank, k0, nb, kk);
      Operands both;
      size_t o = 0;
      for (; o < both.size(); ++o) {
        std::optional<at::Tensor> t = parts_batch(ow[o], ob[o]);
        if (!t) break;
        both[o] = std::move(*t);
      }
      if (o == both.size()) {
        baddbmm_acc(both[0], both[1], both[2], beta);
        return;
      }
      baddbmm_acc(ob[0], ob[1], ob[2], beta);
    }
    baddbmm_acc(ow[0], ow[1], ow[2], beta);
  };
  const int64_t full = w.n / w.kw, rem = w.n - full * w.kw;
  if (full > 0) batched(0, full, w.kw);
  if (rem > 0) batched(full, 1, rem);
}

// The per-call pieces shared by the forward and the backward.
struct Call {
  at::ScalarType acc, xdt;
  int64_t B = 0, D = 0, K = 1, C = 0, S = 0;  // K sub-centres per class, C classes
  bool has_bank = false, vector_bias = false, fold = true;
  bool family = false;  // the margin family's epilogues (csrc/cuda/sweep_family.cuh)
  at::Tensor x, centres, bank, index, labels, bank_valid, bias, margin_rows;
  at::TensorOptions opts;
  Stream stream;

  Call(const UnitsfaceInputs& in, const UnitsfaceOptions& o)
      : acc(chunking::acc_type(in.x.scalar_type())), xdt(in.x.scalar_type()) {
    B = in.x.size(0);
    D = in.x.size(1);
    K = o.k();
    C = in.centres.size(0) / K;
    family = o.margin_family();
    if (in.margin_rows.has_value()) margin_rows = in.margin_rows->contiguous();
    has_bank = in.bank.has_value();
    fold = xdt != at::kHalf;
    x = in.x.contiguous();
    centres = in.centres.contiguous();
    if (has_bank) bank = in.bank->contiguous();
    if (in.index.has_value()) index = in.index->to(at::kLong).contiguous();
    S = index.defined() ? index.numel() : C;
    labels = in.labels.to(at::kLong).contiguous();
    if (in.bank_valid.has_value()) bank_valid = in.bank_valid->contiguous();
    if (in.bias.has_value()) {
      bias = in.bias->detach().reshape({-1}).to(acc).contiguous();
      vector_bias = has_bank && bias.numel() > 1;
    }
    opts = x.options().dtype(acc);
    stream = current_stream();
  }

  // rows [j0, j0 + n) of S of a table, in place (a view), when neither an index, a dtype
  // conversion nor a validity mask stands in the way
  bool in_place(const at::Tensor& table, bool masked) const {
    return !index.defined() && table.scalar_type() == xdt && !masked;
  }

  // The chunk plan over the S classes. With K > 1 sub-centres a class column also has K
  // sub-centre dots and K product-tile entries per row (SubCentres): counted as K more parts.
  cuda_plan::SweepPlan plan(int64_t parts, bool with_q) const {
    return cuda_plan::plan_chunks(B, S, D, parts + (K > 1 ? K : 0), c10::elementSize(acc),
                                  c10::elementSize(xdt), with_q, l2_bytes());
  }
};

// The padded per-column arrays (inverse norms, bank validity, thresholds), the rows' inverse
// norms and targets, and (forward) the norms themselves.
struct Columns {
  at::Tensor cols;  // [4, s_pad·K]: inv_w (per sub-centre row), then per class (the first
                    // s_pad entries) inv_b, vb, cb
  at::Tensor inv_x, target;

  template <typename T, typename X>
  void compute(const Call& call, int64_t s_pad, bool with_bank, const at::Tensor& nx,
               const at::Tensor& nw, const at::Tensor& nb, bool have_norms, double eps) {
    cols = at::empty({4, s_pad * call.K}, call.opts);
    inv_x = at::empty({call.B}, call.opts);
    target = at::empty({call.B}, call.labels.options());
    cuda_sweep::ColumnArgs<T> a{};
    a.x = call.x.const_data_ptr();
    a.centres = call.centres.const_data_ptr();
    a.wt = dtype_code(call.centres.scalar_type());
    a.bank = with_bank ? call.bank.const_data_ptr() : nullptr;
    a.bt = with_bank ? dtype_code(call.bank.scalar_type()) : DType::kFloat;
    a.index = cptr<int64_t>(call.index);
    a.bank_valid = with_bank ? cptr<bool>(call.bank_valid) : nullptr;
    a.bias = with_bank ? cptr<T>(call.bias) : nullptr;
    a.vector_bias = call.vector_bias;
    a.labels = cptr<int64_t>(call.labels);
    a.B = call.B;
    a.S = call.S;
    a.C = call.C;
    a.D = call.D;
    a.K = call.K;
    a.have_norms = have_norms;
    a.eps = static_cast<T>(eps);
    a.nx = mptr<T>(nx);
    a.nw = mptr<T>(nw);
    a.nb = with_bank ? mptr<T>(nb) : nullptr;
    a.inv_x = mptr<T>(inv_x);
    a.inv_w = mptr<T>(cols[0]);
    a.inv_b = mptr<T>(cols[1]);
    a.vb = mptr<T>(cols[2]);
    a.cb = mptr<T>(cols[3]);
    a.target = mptr<int64_t>(target);
    const int64_t tasks = call.B + call.S * call.K + (with_bank ? call.S : 0);
    if (tasks == 0) return;
    launch(&cuda_sweep::uf_columns_kernel<T, X>, grid_for(tasks), cuda_sweep::kRowThreads, call.stream, a);
  }
};

// The chunk rows of W (part 0) and the bank (part 1): views or staged copies, and (fp16 with
// ∂x products) their normalised copies.
struct ChunkRows {
  bool stage_raw[2] = {false, false};
  bool stage_unit = false;
  at::Tensor raw_buf, unit_buf;  // [2, c·K, D] in X (the bank part uses c rows)

  // with_w / with_bank: the parts whose dots the sweep computes (a backward for a per-class
  // ∂b alone reads no W row); products: the ∂x products read the rows too.
  ChunkRows(const Call& call, int64_t c, bool with_w, bool with_bank, bool products) {
    stage_raw[0] = with_w && !call.in_place(call.centres, false);
    stage_raw[1] = with_bank && !call.in_place(call.bank, call.bank_valid.defined());
    stage_unit = products && !call.fold;
    if (stage_raw[0] || stage_raw[1]) {
      raw_buf = at::empty({2, c * call.K, call.D}, call.x.options());
    }
    if (stage_unit) unit_buf = at::empty({2, c * call.K, call.D}, call.x.options());
  }

  template <typename T, typename X>
  void stage(const Call& call, const Columns& cols, int64_t j0, int64_t n, bool with_bank) {
    if (!stage_raw[0] && !stage_raw[1] && !stage_unit) return;
    cuda_sweep::StageArgs<T> a{};
    a.table[0] = call.centres.const_data_ptr();
    a.dt[0] = dtype_code(call.centres.scalar_type());
    a.table[1] = with_bank ? call.bank.const_data_ptr() : nullptr;
    a.dt[1] = with_bank ? dtype_code(call.bank.scalar_type()) : DType::kFloat;
    a.bank_valid = cptr<bool>(call.bank_valid);
    a.index = cptr<int64_t>(call.index);
    for (int p = 0; p < 2; ++p) {
      const bool part = p == 0 || with_bank;
      a.inv[p] = stage_unit ? cptr<T>(cols.cols[p]) : nullptr;
      a.raw[p] = part && stage_raw[p] ? raw_buf[p].data_ptr() : nullptr;
      a.unit[p] = part && stage_unit ? unit_buf[p].data_ptr() : nullptr;
    }
    a.j0 = j0;
    a.n = n;
    a.D = call.D;
    a.k[0] = call.K;
    a.k[1] = 1;
    const dim3 grid(grid_for(n * call.K), with_bank ? 2 : 1);
    launch(&cuda_sweep::uf_stage_kernel<T, X>, grid, cuda_sweep::kRowThreads, call.stream, a);
  }

  // the rows the GEMMs read (raw), and the rows the ∂x products read: n·K of W, n of the bank
  at::Tensor rows(const Call& call, int p, int64_t j0, int64_t n) const {
    const int64_t k = p == 0 ? call.K : 1;
    if (stage_raw[p]) return raw_buf[p].narrow(0, 0, n * k);
    return (p == 0 ? call.centres : call.bank).narrow(0, j0 * k, n * k);
  }
  at::Tensor product_rows(const Call& call, int p, int64_t j0, int64_t n) const {
    return stage_unit ? unit_buf[p].narrow(0, 0, n * (p == 0 ? call.K : 1))
                      : rows(call, p, j0, n);
  }
};

// K > 1 sub-centres per class (csrc/cuda/sweep_family.cuh): the W GEMM's B × n·K raw dots,
// reduced to the class cosines in the W part's dots (arg-max in `arg`), and the n·K-column
// product tile expanded from the W part's class tile. With K = 1 all of it is the W part's
// own dots and tile.
template <typename T, typename X>
struct SubCentres {
  const Call& call;
  int64_t c;
  at::Tensor dots_k, arg, tile_k;
  cuda_sweep::SubCentreArgs<T, X> a{};

  SubCentres(const Call& call_, const Columns& cols, int64_t c_, const at::Tensor& dots,
             const at::Tensor& tiles)
      : call(call_), c(c_) {
    if (call.K == 1) return;
    dots_k = at::empty({call.B, c * call.K}, call.opts);
    arg = at::empty({call.B, c}, call.labels.options().dtype(at::kInt));
    a.dots_k = dots_k.const_data_ptr<T>();
    a.inv_x = cptr<T>(cols.inv_x);
    a.inv_wk = cptr<T>(cols.cols[0]);
    a.cos = mptr<T>(dots[0]);
    a.arg = arg.data_ptr<int32_t>();
    if (tiles.defined()) {
      tile_k = at::empty({call.B, c * call.K}, call.x.options());
      a.tile = tiles.const_data_ptr<X>();
      a.tile_k = tile_k.data_ptr<X>();
      a.tld = tiles.stride(0);
    }
    a.B = call.B;
    a.ld = c;
    a.k = call.K;
    a.fold_inv = call.fold;
  }
  const int32_t* arg_ptr() const { return cptr<int32_t>(arg); }
  // where the W GEMM writes its B × n·K dots
  at::Tensor w_dots(const at::Tensor& dots, int64_t n) const {
    if (call.K == 1) return dots[0].as_strided({call.B, n}, {c, 1});
    return dots_k.as_strided({call.B, n * call.K}, {c * call.K, 1});
  }
  // the class cosines after the W GEMM
  void reduce(int64_t j0, int64_t n) {
    if (call.K == 1) return;
    a.n = n;
    a.col0 = j0;
    launch(&cuda_sweep::uf_class_cos_kernel<T, X>, grid_for(call.B * n / cuda_sweep::kWarp + 1),
           cuda_sweep::kRowThreads, call.stream, a);
  }
  // the product tile (B × n·K, row stride tile().stride(0)) after the epilogue
  at::Tensor tile(const at::Tensor& tiles, int64_t j0, int64_t n) {
    if (call.K == 1) return tile_part(tiles, 0);
    a.n = n;
    a.col0 = j0;
    launch(&cuda_sweep::uf_expand_kernel<T, X>,
           grid_for(call.B * n * call.K / cuda_sweep::kWarp + 1), cuda_sweep::kRowThreads,
           call.stream, a);
    return tile_k;
  }
};

// The chunk's dots into dots [parts, B, c]: W's (where SubCentres wants them) when do_w, the
// bank's when do_b. With K = 1 and both parts, one batched GEMM x·[W rows | bank rows]ᵀ over x
// expanded to both parts (batch stride 0) and the two parts' rows as one operand
// (parts_batch), ordered by address (ATen has no negative stride), so the dots' parts are in
// that order too; `a` learns where each part's dots are. Else (K > 1: W's n·K dots go
// elsewhere; rows that no stride joins) a GEMM per part, in part order.
template <typename T, typename X>
void chunk_dots(const Call& call, const ChunkRows& rows, const SubCentres<T, X>& sub,
                const at::Tensor& dots, int64_t j0, int64_t n, bool do_w, bool do_b,
                cuda_sweep::ChunkArgs<T, X>& a) {
  const int64_t part = dots.stride(0);
  a.dots = cptr<T>(dots);
  a.dots_part = part;
  if (do_w && do_b && call.K == 1) {
    const at::Tensor rw = rows.rows(call, 0, j0, n).unsqueeze(0);
    const at::Tensor rb = rows.rows(call, 1, j0, n).unsqueeze(0);
    const bool bank_first = std::less<const void*>()(rb.const_data_ptr(), rw.const_data_ptr());
    if (const auto both = bank_first ? parts_batch(rb, rw) : parts_batch(rw, rb)) {
      baddbmm_acc(dots.narrow(2, 0, n), call.x.expand({2, call.B, call.D}),
                  both->transpose(1, 2), 0.0);
      if (bank_first) {
        a.dots += part;
        a.dots_part = -part;
      }
      return;
    }
  }
  if (do_w) gemm_nt(sub.w_dots(dots, n), call.x, rows.rows(call, 0, j0, n));
  if (do_b) gemm_nt(dots[1].narrow(1, 0, n), call.x, rows.rows(call, 1, j0, n));
}

// The epilogues' arguments common to both passes; dots [parts, B, c] (chunk_dots sets where
// each part's are) and tiles [B, parts, c] (or undefined).
template <typename T, typename X>
cuda_sweep::ChunkArgs<T, X> chunk_args(const Call& call, const Columns& cols,
                                       const cuda_plan::SweepPlan& plan,
                                       const UnitsfaceOptions& o, const at::Tensor& tiles) {
  cuda_sweep::ChunkArgs<T, X> a{};
  a.tiles = mptr<X>(tiles);
  a.ld = plan.c;
  a.tld = tiles.defined() ? tiles.stride(0) : 0;
  a.B = call.B;
  a.D = call.D;
  a.kw = plan.kw;
  a.ns = plan.ns_used;
  a.fold_inv = call.fold;
  a.inv_x = cptr<T>(cols.inv_x);
  a.target = cptr<int64_t>(cols.target);
  a.inv_w = cptr<T>(cols.cols[0]);
  a.inv_b = cptr<T>(cols.cols[1]);
  a.vb = cptr<T>(cols.cols[2]);
  a.cb = cptr<T>(cols.cols[3]);
  a.sp = epi::softmax_params<T>(o);
  a.margin_rows = cptr<T>(call.margin_rows);
  a.cosines = call.K > 1;
  a.up = epi::uss_params<T>(o.uss());
  a.weight = static_cast<T>(o.uss_weight);
  return a;
}

// ----------------------------------------------------------------------------- forward

template <typename T, typename X>
UnitsfaceForward forward_typed(const Call& call, const UnitsfaceOptions& o, bool row_grads) {
  const int64_t B = call.B, D = call.D, S = call.S;
  const int parts = call.has_bank ? 2 : 1;
  const cuda_plan::SweepPlan plan = call.plan(parts, /*with_q=*/false);
  const int64_t s_pad = std::max<int64_t>(plan.n_chunks, 1) * plan.c;
  at::Tensor nx = at::empty({B}, call.opts);
  at::Tensor nw = at::empty({S * call.K}, call.opts);
  at::Tensor nb = at::empty({call.has_bank ? S : 0}, call.opts);
  Columns cols;
  cols.compute<T, X>(call, s_pad, call.has_bank, nx, nw, nb, /*have_norms=*/false, o.eps);
  const int64_t K = call.K;

  const int64_t ns = plan.ns_used;
  at::Tensor state = at::empty({cuda_sweep::kStateRows, std::max<int64_t>(ns, 1), B}, call.opts);
  const at::Tensor dots = at::empty({parts, B, plan.c}, call.opts);
  at::Tensor tiles, acc_w, acc_b;
  if (row_grads) {  // (both parts' accumulators in one buffer: slice_products joins them)
    tiles = at::empty({B, parts, plan.c}, call.x.options());
    const at::Tensor acc = at::empty({parts, std::max<int64_t>(ns, 1), B, D}, call.opts);
    acc_w = acc[0];
    if (call.has_bank) acc_b = acc[1];
  }
  ChunkRows rows(call, plan.c, /*with_w=*/true, call.has_bank, row_grads);
  cuda_sweep::ChunkArgs<T, X> a = chunk_args<T, X>(call, cols, plan, o, tiles);
  SubCentres<T, X> sub(call, cols, plan.c, dots, tiles);
  a.arg = sub.arg_ptr();
  a.state = mptr<T>(state);
  a.acc_w = mptr<T>(acc_w);
  a.acc_b = mptr<T>(acc_b);

  for (int64_t q = 0; q < plan.n_chunks && B > 0; ++q) {
    const int64_t j0 = q * plan.c, n = std::min(plan.c, S - j0);
    rows.stage<T, X>(call, cols, j0, n, call.has_bank);
    chunk_dots<T, X>(call, rows, sub, dots, j0, n, /*do_w=*/true, call.has_bank, a);
    sub.reduce(j0, n);
    a.n = n;
    a.col0 = j0;
    a.first = q == 0;
    const dim3 grid(static_cast<unsigned>((B + cuda_sweep::kEpiWarps - 1) / cuda_sweep::kEpiWarps),
                    static_cast<unsigned>((n + plan.kw - 1) / plan.kw), parts);
    const unsigned threads = cuda_sweep::kEpiWarps * cuda_sweep::kWarp;
    if (row_grads) {
      launch(call.family ? &cuda_sweep::uf_fwd_epilogue<T, X, true, true>
                         : &cuda_sweep::uf_fwd_epilogue<T, X, true, false>,
             grid, dim3(threads), call.stream, a);
    } else {
      launch(call.family ? &cuda_sweep::uf_fwd_epilogue<T, X, false, true>
                         : &cuda_sweep::uf_fwd_epilogue<T, X, false, false>,
             grid, dim3(threads), call.stream, a);
    }
    if (row_grads) {
      const SliceOperands w{acc_w, sub.tile(tiles, j0, n), rows.product_rows(call, 0, j0, n),
                            n * K, plan.kw * K};
      std::optional<SliceOperands> bank;
      if (call.has_bank) {
        bank = SliceOperands{acc_b, tile_part(tiles, 1), rows.product_rows(call, 1, j0, n), n,
                             plan.kw};
      }
      slice_products(w, bank ? &*bank : nullptr, q == 0 ? 0.0 : 1.0);
    }
  }

  at::Tensor out_rows = at::empty({B}, call.opts);
  at::Tensor stats = at::empty({stats::kUnitsfaceRows, B}, call.opts);
  at::Tensor dx_rows = row_grads ? at::empty({B, D}, call.opts) : nx.new_empty({0});
  at::Tensor db_rows = row_grads ? at::empty({B}, call.opts) : nx.new_empty({0});
  if (B > 0) {
    cuda_sweep::FinishArgs<T> f{};
    f.B = B;
    f.D = D;
    f.ns = plan.n_chunks > 0 ? ns : 0;
    f.C = call.C;
    f.K = K;
    f.state = cptr<T>(state);
    f.acc_w = cptr<T>(acc_w);
    f.acc_b = cptr<T>(acc_b);
    f.has_bank = call.has_bank;
    f.grads = row_grads;
    f.up = a.up;
    f.scale = static_cast<T>(o.scale);
    f.weight = static_cast<T>(o.uss_weight);
    f.eps = static_cast<T>(o.eps);
    f.x = call.x.const_data_ptr();
    f.nx = cptr<T>(nx);
    f.inv_x = cptr<T>(cols.inv_x);
    f.labels = cptr<int64_t>(call.labels);
    f.target = cptr<int64_t>(cols.target);
    f.centres = call.centres.const_data_ptr();
    f.wt = dtype_code(call.centres.scalar_type());
    f.bank = call.has_bank ? call.bank.const_data_ptr() : nullptr;
    f.bt = call.has_bank ? dtype_code(call.bank.scalar_type()) : DType::kFloat;
    f.bank_valid = cptr<bool>(call.bank_valid);
    f.inv_w = cptr<T>(cols.cols[0]);
    f.inv_b = cptr<T>(cols.cols[1]);
    f.rows = mptr<T>(out_rows);
    f.stats = mptr<T>(stats);
    f.dx_rows = mptr<T>(dx_rows);
    f.db_rows = mptr<T>(db_rows);
    launch(&cuda_sweep::uf_fwd_finish<T, X>, static_cast<unsigned>(B), cuda_sweep::kRowThreads, call.stream, f);
  }
  // exps, exp_rows: empty (the triton backend's stored exponentials; docs/design.md §2)
  return {out_rows, stats, nx, nw, nb, dx_rows, db_rows, call.x.new_empty({0}),
          nx.new_empty({0})};
}

UnitsfaceForward forward_cuda(const UnitsfaceInputs& in, const UnitsfaceOptions& o,
                              bool row_grads) {
  check_unitsface_args("unitsface_fwd_native", in, o);
  const Call call(in, o);
  UnitsfaceForward out;
  dispatch_x(call.xdt, [&](auto t, auto xt) {
    out = forward_typed<decltype(t), decltype(xt)>(call, o, row_grads);
  });
  return out;
}

// ----------------------------------------------------------------------------- backward

template <typename T, typename X>
Grads backward_typed(const at::Tensor& grad_rows, const Call& call, const at::Tensor& bias_in,
                     const UnitsfaceSaved& saved, const UnitsfaceOptions& o,
                     std::array<bool, 3> needs) {
  const int64_t B = call.B, D = call.D, S = call.S;
  const at::Tensor& x = call.x;
  const bool need_dx = needs[0], need_dw = needs[1];
  const bool need_db = needs[2] && bias_in.defined();
  const bool row_grads = saved.dx_rows.numel() > 0;
  // Gradients not asked for come back empty (the contract's fake kernels do the same); a
  // threshold only enters through USS, so without a bank its gradient is zero.
  at::Tensor dx = x.new_empty({0}), dw = x.new_empty({0}), db = x.new_empty({0});
  const bool uss_db = need_db && call.has_bank;
  if (need_db && !call.has_bank) db = at::zeros_like(bias_in);
  const bool sweep_dx = need_dx && !row_grads;   // else ∂x = go·dx_rows
  const bool do_w = need_dw || sweep_dx;
  // the bank part is swept for ∂x, for a per-class ∂b, and for a scalar ∂b that the forward
  // did not form (its Σ g per row)
  const bool do_b =
      call.has_bank && (sweep_dx || (uss_db && (call.vector_bias || !row_grads)));
  const bool scalar_db = uss_db && !call.vector_bias;
  if (need_dx) dx = at::empty_like(x);
  if (need_dw) dw = at::empty({S * call.K, D}, call.centres.options());
  if (!need_dx && !need_dw && !uss_db) return {dx, dw, db};

  const at::Tensor go = grad_rows.reshape({-1}).to(call.acc).contiguous();
  const at::Tensor nx = saved.nx.to(call.acc).contiguous();
  const at::Tensor nw = saved.nw.to(call.acc).contiguous();
  const at::Tensor nb = call.has_bank ? saved.nb.to(call.acc).contiguous() : at::Tensor();
  const at::Tensor stats = saved.stats.to(call.acc).contiguous();
  const at::Tensor dx_rows = row_grads ? saved.dx_rows.to(call.acc).contiguous() : at::Tensor();
  const at::Tensor db_rows = row_grads ? saved.db_rows.to(call.acc).contiguous() : at::Tensor();
  const at::Tensor db_scalar = scalar_db ? at::empty({1}, call.opts) : at::Tensor();
  at::Tensor db_cols =
      (uss_db && call.vector_bias) ? at::zeros({call.C}, call.opts) : at::Tensor();
  // a per-class ∂b_j = −(1/s)·Σ_i g_ij from the bank's tile, which holds g·inv_b (fp16: g,
  // and no norm to multiply back in)
  const at::Tensor db_norms = db_cols.defined() && call.fold ? nb : at::Tensor();

  const int parts = do_b ? 2 : 1;
  const cuda_plan::SweepPlan plan = call.plan(parts, need_dw);
  const int64_t s_pad = std::max<int64_t>(plan.n_chunks, 1) * plan.c;
  const int64_t ns = plan.ns_used;
  const bool sweep = (do_w || do_b) && B > 0 && plan.n_chunks > 0;
  Columns cols;
  cols.compute<T, X>(call, s_pad, do_b, nx, nw, nb, /*have_norms=*/true, o.eps);
  const at::Tensor xh = need_dw ? at::empty({B, D}, x.options()) : at::Tensor();
  at::Tensor acc = sweep && sweep_dx ? at::empty({ns, B, D}, call.opts) : at::Tensor();
  at::Tensor hs = sweep ? at::empty({cuda_sweep::kBwdRows, ns, B}, call.opts) : at::Tensor();

  // Per-row work (uf_rows_kernel). Before the sweep: x̂ for the ∂W product, and with
  // row_grads ∂x = go·dx_rows and a scalar ∂b = Σ go·db_rows. After it (plain backward): ∂x
  // from the accumulators and a scalar ∂b from the rows' Σ g.
  auto rows_kernel = [&](bool before) {
    cuda_sweep::RowsArgs<T> r{};
    r.B = B;
    r.D = D;
    r.ns = hs.defined() ? ns : 0;
    r.x = x.const_data_ptr();
    r.nx = cptr<T>(nx);
    r.inv_x = cptr<T>(cols.inv_x);
    r.go = cptr<T>(go);
    r.dx_t = dtype_code(x.scalar_type());
    r.db_t = dtype_code(call.acc);
    r.db_scale = static_cast<T>(-1.0 / o.scale);
    r.eps = static_cast<T>(o.eps);
    if (before) {
      r.xh = xh.defined() ? xh.data_ptr() : nullptr;
      if (row_grads) {
        r.dx_rows = cptr<T>(dx_rows);
        r.db_rows = cptr<T>(db_rows);
        if (need_dx) r.dx = dx.data_ptr();
        if (scalar_db) r.db = db_scalar.data_ptr();
      }
    } else if (!row_grads) {
      r.acc = cptr<T>(acc);
      r.hs = cptr<T>(hs);
      r.hb = do_b;
      if (sweep_dx) r.dx = dx.data_ptr();
      if (scalar_db) r.db = db_scalar.data_ptr();
    }
    if ((r.xh == nullptr && r.dx == nullptr && r.db == nullptr) || B == 0) return;
    if (!row_grads && !before && !sweep) {  // nothing was swept (no column): zero sums
      if (r.dx != nullptr) dx.zero_();
      if (r.db != nullptr) db_scalar.zero_();
      return;
    }
    const unsigned blocks = static_cast<unsigned>(B + (r.db != nullptr ? 1 : 0));
    launch(&cuda_sweep::uf_rows_kernel<T, X>, blocks, cuda_sweep::kRowThreads, call.stream, r);
  };
  rows_kernel(/*before=*/true);

  if (sweep) {
    const at::Tensor dots = at::empty({parts, B, plan.c}, call.opts);
    const at::Tensor tiles = at::empty({B, parts, plan.c}, x.options());
    const int64_t K = call.K;
    const at::Tensor q = need_dw ? at::empty({plan.c * K, D}, call.opts) : at::Tensor();
    ChunkRows rows(call, plan.c, do_w, do_b, sweep_dx);
    cuda_sweep::ChunkArgs<T, X> a = chunk_args<T, X>(call, cols, plan, o, tiles);
    SubCentres<T, X> sub(call, cols, plan.c, dots, tiles);
    a.arg = sub.arg_ptr();
    a.go = cptr<T>(go);
    a.stats = cptr<T>(stats);
    a.hs = mptr<T>(hs);
    cuda_sweep::ProjectArgs<T> pr{};
    pr.centres = call.centres.const_data_ptr();
    pr.wt = dtype_code(call.centres.scalar_type());
    pr.index = cptr<int64_t>(call.index);
    pr.k = K;
    pr.nw = cptr<T>(nw);
    pr.inv_w = cptr<T>(cols.cols[0]);
    pr.out = need_dw ? dw.data_ptr() : nullptr;
    pr.ot = dtype_code(call.centres.scalar_type());
    pr.D = D;
    pr.fold_inv = call.fold;
    pr.eps = static_cast<T>(o.eps);
    for (int64_t qi = 0; qi < plan.n_chunks; ++qi) {
      const int64_t j0 = qi * plan.c, n = std::min(plan.c, S - j0);
      rows.stage<T, X>(call, cols, j0, n, do_b);
      chunk_dots<T, X>(call, rows, sub, dots, j0, n, do_w, do_b, a);
      if (do_w) sub.reduce(j0, n);
      a.n = n;
      a.col0 = j0;
      a.first = qi == 0;
      const dim3 grid(
          static_cast<unsigned>((B + cuda_sweep::kEpiWarps - 1) / cuda_sweep::kEpiWarps),
          static_cast<unsigned>((n + plan.kw - 1) / plan.kw), parts);
      launch(call.family ? &cuda_sweep::uf_bwd_epilogue<T, X, true>
                         : &cuda_sweep::uf_bwd_epilogue<T, X, false>,
             grid, cuda_sweep::kEpiWarps * cuda_sweep::kWarp, call.stream, a, do_w, do_b);
      const at::Tensor tile_w = do_w ? sub.tile(tiles, j0, n) : at::Tensor();
      // W part first: it starts the accumulators on the first chunk. Both parts add into the
      // same accumulators here, so they stay a GEMM each (one batched GEMM would give two of
      // its batches one output).
      if (sweep_dx) {
        slice_products({acc, tile_w, rows.product_rows(call, 0, j0, n), n * K, plan.kw * K},
                       nullptr, qi == 0 ? 0.0 : 1.0);
        if (do_b) {
          slice_products(
              {acc, tile_part(tiles, 1), rows.product_rows(call, 1, j0, n), n, plan.kw},
              nullptr, 1.0);
        }
      }
      if (need_dw) {  // Q = tileᵀ·x̂ (n·K × D, fp32), then the projection into ∂W's rows
        at::Tensor qv = q.narrow(0, 0, n * K);
        gemm_nt(qv, tile_w.narrow(1, 0, n * K).t(), xh.t());
        pr.q = cptr<T>(qv);
        pr.j0 = j0 * K;
        pr.n = n * K;
        launch(&cuda_sweep::uf_project_kernel<T, X>, grid_for(n * K), cuda_sweep::kRowThreads,
               call.stream, pr);
      }
      if (uss_db && call.vector_bias) {  // (ATen's column sum is deterministic)
        chunking::write_columns(
            db_cols, call.index, j0,
            chunking::bias_grad_columns(
                tile_part(tiles, 1).narrow(1, 0, n),
                db_norms.defined() ? db_norms.narrow(0, j0, n) : at::Tensor(), o.scale, o.eps,
                call.acc));
      }
    }
  }
  rows_kernel(/*before=*/false);
  if (scalar_db) db = db_scalar.reshape(bias_in.sizes()).to(bias_in.scalar_type());
  if (uss_db && call.vector_bias) {
    db = db_cols.reshape(bias_in.sizes()).to(bias_in.scalar_type());
  }
  return {dx, dw, db};
}

Grads backward_cuda(const at::Tensor& grad_rows, const UnitsfaceInputs& in,
                    const UnitsfaceSaved& saved, const UnitsfaceOptions& o,
                    std::array<bool, 3> needs) {
  check_unitsface_args("unitsface_bwd_native", in, o);
  check_unitsface_saved("unitsface_bwd_native", grad_rows, in, saved, o);
  const Call call(in, o);
  Grads out;
  dispatch_x(call.xdt, [&](auto t, auto xt) {
    out = backward_typed<decltype(t), decltype(xt)>(
        grad_rows, call, in.bias.has_value() ? *in.bias : at::Tensor(), saved, o, needs);
  });
  return out;
}

}  // namespace

#ifndef UNITSFACE_CUDA_EMU
TORCH_LIBRARY_IMPL(unitsface, CUDA, m) {
  m.impl("unitsface_fwd_native", &unitsface_fwd_op<&forward_cuda>);
  m.impl("unitsface_bwd_native", &unitsface_bwd_op<&backward_cuda>);
}
#endif

}  // namespace unitsface
