// The unitsface family's CPU drivers (csrc/unitsface.h): ATen code around the row kernels'
// epilogue (csrc/cpu/unitsface.cpp). CUDA tensors have their own sweep
// (csrc/cuda/unitsface_sweep.cu).
//
// Forward, per chunk of c classes of S: the W rows (c·K with K sub-centres, whose dots and
// gradient tiles are sub-centre-major: csrc/chunking.h sub_centre_rows) and the bank rows of
// the chunk's classes (a view, or a chunk-sized gather under partial FC; invalid bank rows read as
// zero rows), their norms, the GEMMs x·W_cᵀ and x·bank_cᵀ (raw; inverse norms applied in the
// epilogue), one epilogue pass per row: online max / sum-exp of the margin logits and the target
// logit, and the USS sums or running lse pairs of the bank part. Backward, per chunk: the same
// GEMMs, one epilogue pass writing g·inv_w (softmax) and g'·inv_b (USS) over the dots and
// accumulating h_i and Σ g'; then (docs/design.md §2)
//   G  += g_W · W_c + g_B · bank_c       (∂x)
//   ∂W rows of the chunk's classes from g_Wᵀ · x̂   (zero elsewhere)
//   Σ_i g'_ic                            (∂b_c of a per-class threshold)
// The target column of row i is found once per call (a binary search of y_i in the sorted
// index), so the softmax loops treat every other column alike and vectorise. With row_grads
// the forward also forms ∂L_i/∂x_i (csrc/cpu/unitsface_row_grads.h) and the backward then
// only sweeps for ∂W (and a per-class threshold's ∂b).
#include "unitsface.h"

#include <optional>

#include "chunking.h"
#include "cpu/unitsface_row_grads.h"

namespace unitsface {

using chunking::acc_type;
using chunking::scratch;

namespace {

// The sorted partial-FC index S as int64 (undefined: all C classes).
at::Tensor class_index(const UnitsfaceInputs& in) {
  if (!in.index.has_value()) return at::Tensor();
  const at::Tensor index = in.index->to(at::kLong).contiguous();
  // the target search needs a sorted, unique index (Python checks it)
  const int64_t* p = index.const_data_ptr<int64_t>();
  for (int64_t j = 0; j + 1 < index.numel(); ++j) {
    TORCH_CHECK_VALUE(p[j] < p[j + 1], "unitsface: index must be sorted (ascending) and unique");
  }
  return index;
}

// The column of y_i in S, −1 when y_i is not there (no target: −1, or another shard's class).
at::Tensor target_columns(const at::Tensor& labels, const at::Tensor& index, int64_t C) {
  const at::Tensor y = labels.to(at::kLong).contiguous();
  if (!index.defined()) {
    return at::where(at::logical_and(y >= 0, y < C), y, at::full_like(y, -1)).contiguous();
  }
  if (index.numel() == 0) return at::full_like(y, -1);
  const at::Tensor pos = at::searchsorted(index, y).clamp_max(index.numel() - 1);
  return at::where(index.index_select(0, pos) == y, pos, at::full_like(pos, -1)).contiguous();
}

// The centre rows of the classes of S with K sub-centres each: index[j]·K + r in the order
// (j, r) (contract.class_row_ids); the index itself for K = 1; undefined without an index
// (then the rows of classes [j0, j0 + n) are rows [j0·K, (j0 + n)·K)).
at::Tensor class_row_ids(const at::Tensor& index, int64_t K) {
  if (!index.defined() || K == 1) return index;
  return (index.unsqueeze(1) * K + at::arange(K, index.options())).reshape({-1});
}

// The per-call pieces shared by the forward and the backward.
struct UnitsfaceCall {
  at::ScalarType acc, gdt, xdt;  // accumulation, GEMM operands, x (centres and bank read in it)
  int64_t B, D, K, C, S;         // K sub-centres per class, C classes (centres: C·K rows)
  bool has_bank;
  at::Tensor xg;       // x in the GEMM dtype, contiguous
  at::Tensor centres;  // contiguous
  at::Tensor bank;     // contiguous (has_bank)
  at::Tensor index;    // S classes, or undefined (all)
  at::Tensor row_ids;  // the S·K centre rows of S (class_row_ids)
  at::Tensor target;   // B
  at::Tensor margin_rows;  // the family's [4, B], contiguous, or undefined
  chunking::Sweep sweep;
  UssColumns bank_cols;  // the bank part: column labels = the classes of S (has_bank)
  at::TensorOptions opts;

  UnitsfaceCall(const UnitsfaceInputs& in, const UnitsfaceOptions& o)
      : acc(acc_type(in.x.scalar_type())),
        gdt(chunking::gemm_type(in.x)),
        xdt(in.x.scalar_type()),
        B(in.x.size(0)),
        D(in.x.size(1)),
        K(o.k()),
        C(in.centres.size(0) / K),
        has_bank(in.bank.has_value()),
        xg(in.x.to(gdt).contiguous()),
        centres(in.centres.contiguous()),
        index(class_index(in)),
        row_ids(class_row_ids(index, K)),
        target(target_columns(in.labels, index, C)),
        // (a chunk of c classes has B·c·K dots)
        sweep(B * K, index.defined() ? index.numel() : C, /*cuda=*/false),
        opts(xg.options().dtype(acc)) {
    S = sweep.cols;
    if (in.margin_rows.has_value()) margin_rows = in.margin_rows->contiguous();
    if (!has_bank) return;
    bank = in.bank->contiguous();
    const at::Tensor classes =
        index.defined() ? index : at::arange(C, in.labels.options().dtype(at::kLong));
    at::Tensor valid, bias = *in.bias;
    if (in.bank_valid.has_value()) valid = of_classes(*in.bank_valid);
    if (bias.numel() > 1) bias = of_classes(bias.reshape({-1}));
    bank_cols = uss_columns(in.labels, classes, valid, bias, sweep.c, acc);
  }

  // the per-class vector v at the classes of S
  at::Tensor of_classes(const at::Tensor& v) const {
    return index.defined() ? v.index_select(0, index) : v;
  }
  // the n·K centre rows of classes [j0, j0 + n) of S
  at::Tensor centre_rows(int64_t j0, int64_t n) const {
    return chunking::chunk_rows(centres, row_ids, j0 * K, n * K, xdt, gdt);
  }
  // invalid bank rows read as zero rows
  at::Tensor bank_rows(int64_t j0, int64_t n) const {
    return chunking::chunk_rows(bank, index, j0, n, xdt, gdt, bank_cols.valid_chunk(j0, n));
  }

  UnitsfaceChunk proto(Pass pass, const UnitsfaceOptions& o, const at::Tensor& inv_x) const {
    UnitsfaceChunk ck;
    ck.pass = pass;
    ck.options = o;
    ck.do_b = has_bank;
    ck.softmax.inv_x = inv_x;
    ck.softmax.target = target;
    ck.softmax.margin_rows = margin_rows;
    ck.bank.pass = pass;
    ck.bank.options = o.uss();
    ck.bank.inv_x = inv_x;
    return ck;
  }
};

}  // namespace

UnitsfaceForward unitsface_forward_cpu(const UnitsfaceInputs& in, const UnitsfaceOptions& o,
                                       bool row_grads) {
  check_unitsface_args("unitsface_fwd_native", in, o);
  TORCH_CHECK_VALUE(!in.x.is_cuda(),
                    "unitsface_fwd_native: this driver is for CPU tensors (CUDA tensors have "
                    "their own sweep, csrc/cuda/unitsface_sweep.cu)");
  const UnitsfaceCall call(in, o);
  const int64_t B = call.B, S = call.S, K = call.K, splits = call.sweep.splits;
  const int64_t c = call.sweep.c;
  const at::Tensor nx = chunking::row_norms(call.xg, call.acc);
  at::Tensor state = at::zeros({splits, row_grads ? kFusedRows : kPlainRows, B}, call.opts);
  state.select(1, kMax).fill_(epi::kNegBig);
  if (call.has_bank) chunking::init_uss_state(state, kUss, o.uss_lse);
  at::Tensor nw = at::empty({S * K}, call.opts);
  at::Tensor nb = at::empty({call.has_bank ? S : 0}, call.opts);
  const at::Tensor flat_w = at::empty({splits, B * c * K}, call.opts);
  const at::Tensor flat_b = call.has_bank ? at::empty({splits, B * c}, call.opts) : at::Tensor();
  std::optional<RowGrads> rg;
  if (row_grads) rg.emplace(splits, B, call.D, call.has_bank, o, call.opts);

  const UnitsfaceChunk proto = call.proto(row_grads ? Pass::kForwardGrads : Pass::kForward, o,
                                          chunking::inv_norms(nx, o.eps));
  call.sweep.run([&](int64_t sp, int64_t j0, int64_t n) {
    UnitsfaceChunk ck = proto;
    const at::Tensor st = state[sp];
    ck.softmax.state = st.narrow(0, kMax, 3);
    ck.softmax.col0 = j0;
    const at::Tensor wc = call.centre_rows(j0, n);
    const at::Tensor nwc = chunking::row_norms(wc, call.acc);
    nw.narrow(0, j0 * K, n * K).copy_(nwc);
    ck.softmax.inv_w = chunking::sub_centre_major(chunking::inv_norms(nwc, o.eps), K);
    ck.softmax.dots = scratch(flat_w[sp], B, n * K);
    chunking::gemm_nt_k(ck.softmax.dots, call.xg, wc, K);
    at::Tensor bc;
    if (call.has_bank) {
      ck.bank.state = st.narrow(0, kUss, 4);
      bc = call.bank_rows(j0, n);
      const at::Tensor nbc = chunking::row_norms(bc, call.acc);
      nb.narrow(0, j0, n).copy_(nbc);
      ck.bank.inv_r = chunking::inv_norms(nbc, o.eps);
      ck.bank.dots = scratch(flat_b[sp], B, n);
      chunking::gemm_nt(ck.bank.dots, call.xg, bc);
      call.bank_cols.set(ck.bank, j0, n);
    }
    if (rg) rg->bind(ck, st, sp);
    unitsface_epilogue_cpu(ck);
    if (rg) rg->accumulate(ck, sp, wc, bc);
  });

  // Merge the splits: each (max, sum) pair, and what the fused forward keeps relative to the
  // same max, to the common maxima.
  std::vector<chunking::MaxPair> pairs = {{kMax, {}}};
  const bool uss_lse = call.has_bank && o.uss_lse;
  if (call.has_bank) {
    for (const chunking::MaxPair& p : chunking::uss_max_pairs(kUss, o.uss_lse)) pairs.push_back(p);
  }
  if (row_grads) {
    pairs[0].rescaled.push_back(kHw);
    if (uss_lse) pairs[2].rescaled.push_back(kUssSums);  // the negatives' pair
  }
  const auto merged = chunking::merge_splits(state, pairs);
  state = merged.first;

  at::Tensor stats = at::zeros({stats::kUnitsfaceRows, B}, call.opts);
  stats[stats::kLse].copy_(chunking::lse_from(state[kMax], state[kSumExp]));
  stats[stats::kTargetLogit].copy_(state[kTargetLogit]);
  at::Tensor rows = stats[stats::kLse] - state[kTargetLogit];
  if (call.has_bank) {
    stats[stats::kUssLoss].copy_(
        chunking::uss_rows_from_state(state, kUss, o.uss(), stats, stats::kUss));
    rows = rows + o.uss_weight * stats[stats::kUssLoss];
  }
  // exps, exp_rows: empty (the triton backend's stored exponentials; docs/design.md §2)
  const at::Tensor exps = in.x.new_empty({0}), exp_rows = nx.new_empty({0});
  if (!rg) {
    return {rows, stats, nx, nw, nb, nx.new_empty({0}), nx.new_empty({0}), exps, exp_rows};
  }

  rg->merge(merged.second[0], uss_lse ? merged.second[2] : at::Tensor());
  RowGradsInputs rgi;
  rgi.x = call.xg.to(call.acc);
  rgi.nx = nx;
  rgi.centres = call.centres;
  if (call.has_bank) rgi.bank = call.bank;
  if (in.bank_valid.has_value()) rgi.bank_valid = *in.bank_valid;
  rgi.labels = in.labels.to(at::kLong);
  rgi.target = call.target;
  rgi.k = K;
  rgi.nw = nw;
  rgi.nb = nb;
  rgi.read = call.xdt;
  const auto grads = rg->finish(state, stats, rgi);
  return {rows, stats, nx, nw, nb, grads.first, grads.second, exps, exp_rows};
}

Grads unitsface_backward_cpu(const at::Tensor& grad_rows, const UnitsfaceInputs& in,
                             const UnitsfaceSaved& saved, const UnitsfaceOptions& o,
                             std::array<bool, 3> needs) {
  check_unitsface_args("unitsface_bwd_native", in, o);
  check_unitsface_saved("unitsface_bwd_native", grad_rows, in, saved, o);
  const bool has_bank = in.bank.has_value();
  bool need_dx = needs[0];
  const bool need_dw = needs[1];
  const bool need_db = needs[2] && in.bias.has_value();
  // Gradients not asked for come back empty (the contract's fake kernels do the same).
  at::Tensor dx = in.x.new_empty({0}), dw = in.x.new_empty({0}), db = in.x.new_empty({0});
  if (need_db && !has_bank) db = at::zeros_like(*in.bias);  // b only enters through USS
  bool uss_db = need_db && has_bank;
  const bool vector_bias = has_bank && in.bias->numel() > 1;
  const at::ScalarType acc = acc_type(in.x.scalar_type());
  const at::Tensor go = grad_rows.reshape({-1}).to(acc).contiguous();
  if (saved.dx_rows.numel() > 0) {
    // the fused forward formed ∂L_i/∂x_i and a scalar b's ∂L_i/∂b (row_grads)
    if (need_dx) dx = (saved.dx_rows * go.unsqueeze(1)).to(in.x.scalar_type());
    if (uss_db && !vector_bias) {
      db = (saved.db_rows * go).sum().reshape(in.bias->sizes()).to(in.bias->scalar_type());
    }
    need_dx = false;
    uss_db = uss_db && vector_bias;
  }
  const bool do_w = need_dx || need_dw;
  const bool do_b = has_bank && (need_dx || uss_db);
  if (!do_w && !do_b) return {dx, dw, db};

  const UnitsfaceCall call(in, o);
  const int64_t B = call.B, S = call.S, D = call.D, K = call.K, splits = call.sweep.splits;
  const int64_t c = call.sweep.c;
  const at::Tensor nx = saved.nx.to(acc).contiguous();
  const at::Tensor nw = saved.nw.to(acc).contiguous();
  const at::Tensor nb = has_bank ? saved.nb.to(acc).contiguous() : at::Tensor();
  const at::Tensor inv_x = chunking::inv_norms(nx, o.eps);
  const at::Tensor inv_w = chunking::inv_norms(nw, o.eps);
  const at::Tensor inv_b = has_bank ? chunking::inv_norms(nb, o.eps) : at::Tensor();

  at::Tensor hs = at::zeros({splits, 2, B}, call.opts);
  at::Tensor G = need_dx ? at::zeros({splits, B, D}, call.opts) : at::Tensor();
  const at::Tensor xh =
      need_dw ? (call.xg.to(acc) * inv_x.unsqueeze(1)).to(call.gdt) : at::Tensor();
  // ∂centres of the classes of S only, rows j·K + r for class S_j (compact: the caller
  // scatters it or hands it on as a sparse gradient; contract.py), in the centres' dtype
  if (need_dw) dw = at::empty({S * K, D}, call.centres.options());
  at::Tensor db_cols = (uss_db && vector_bias) ? at::zeros({call.C}, call.opts) : at::Tensor();
  const at::Tensor flat_w = do_w ? at::empty({splits, B * c * K}, call.opts) : at::Tensor();
  const at::Tensor flat_b = do_b ? at::empty({splits, B * c}, call.opts) : at::Tensor();
  const at::Tensor qflat = need_dw ? at::empty({splits, c * K * D}, call.opts) : at::Tensor();

  UnitsfaceChunk proto = call.proto(Pass::kBackward, o, inv_x);
  proto.do_w = do_w;
  proto.do_b = do_b;
  proto.softmax.go = go;
  proto.softmax.lse = saved.stats[stats::kLse].to(acc).contiguous();
  proto.bank.go = go * o.uss_weight;
  proto.bank.stats = saved.stats.narrow(0, stats::kUss, stats::kUssRows).to(acc).contiguous();
  call.sweep.run([&](int64_t sp, int64_t j0, int64_t n) {
    UnitsfaceChunk ck = proto;
    ck.softmax.h = hs[sp][0];
    ck.bank.hs = hs[sp];
    at::Tensor wc, bc;
    if (do_w) {
      wc = call.centre_rows(j0, n);
      ck.softmax.col0 = j0;
      ck.softmax.inv_w = chunking::sub_centre_major(inv_w.narrow(0, j0 * K, n * K), K);
      ck.softmax.dots = scratch(flat_w[sp], B, n * K);
      chunking::gemm_nt_k(ck.softmax.dots, call.xg, wc, K);
      ck.softmax.grads = ck.softmax.dots;  // the g' blocks overwrite the dots (fp32 GEMMs)
    }
    if (do_b) {
      bc = call.bank_rows(j0, n);
      ck.bank.inv_r = inv_b.narrow(0, j0, n);
      ck.bank.dots = scratch(flat_b[sp], B, n);
      chunking::gemm_nt(ck.bank.dots, call.xg, bc);
      ck.bank.grads = ck.bank.dots;
      call.bank_cols.set(ck.bank, j0, n);
    }
    unitsface_epilogue_cpu(ck);
    if (need_dx) {
      at::Tensor g = G[sp];
      chunking::gemm_acc_k(g, ck.softmax.grads, wc, K);
      if (do_b) chunking::gemm_acc(g, ck.bank.grads, bc);
    }
    if (need_dw) {
      chunking::column_grads(dw, ck.softmax.grads, xh, wc, nw.narrow(0, j0 * K, n * K), j0 * K,
                             scratch(qflat[sp], n * K, D), o.eps, K);
    }
    if (uss_db && vector_bias) {
      chunking::write_columns(db_cols, call.index, j0,
                              chunking::bias_grad_columns(ck.bank.grads, nb.narrow(0, j0, n),
                                                          o.scale, o.eps, acc));
    }
  });
  hs = hs.sum(0);
  if (need_dx) {
    dx = chunking::normalised_grad(G.sum(0), hs[0], call.xg.to(acc), nx, o.eps)
             .to(in.x.scalar_type());
  }
  if (uss_db) {
    const at::Tensor b = vector_bias ? db_cols : hs[1].sum() * (-1.0 / o.scale);
    db = b.reshape(in.bias->sizes()).to(in.bias->scalar_type());
  }
  return {dx, dw, db};
}

}  // namespace unitsface
