// The arguments of the epilogue's row kernels: raw pointers into one chunk's tensors, the
// same structs for the CPU row loops (csrc/cpu/uss_rows.h, csrc/cpu/softmax_rows.h) and the CUDA
// kernels (csrc/cuda/uss_rows.cuh, csrc/cuda/*.cu). Row-major B × c blocks; per-row vectors
// have B entries, per-column vectors c; a "state" or "stats" pointer addresses rows of B
// values (row k at k·B). Built from the chunk structs of csrc/uss.h / csrc/unitsface.h by
// their rows_of() functions.
#pragma once

#include <cstdint>

#include "epilogue.h"
#include "stats.h"

namespace unitsface {

// What an epilogue pass computes.
enum class Pass {
  kForward,       // running statistics
  kForwardGrads,  // running statistics and the per-row gradients (unitsface row_grads, CPU)
  kBackward,      // gradient coefficients
};

// USS against one chunk of reference rows (docs/design.md §1.1): the USS family's chunks, and
// the bank part of the unitsface family, whose column labels are the classes of the chunk (the
// positive of row i is the bank row of class y_i).
template <typename T>
struct UssRows {
  T* dots;            // B × c raw dots x_i · r_j; the lse forward writes z over them (CPU)
  T* grads;           // CPU backward / fused forward: B × c, receives g_ij·inv_r_j (may
                      // alias dots); the CUDA kernels take it typed as the GEMM dtype
  const T* inv_x;     // B   1 / max(||x_i||, eps)
  const T* inv_r;     // c   1 / max(||r_j||, eps)
  const int64_t* y;   // B   labels y_i
  const int64_t* l;   // c   column labels l_j
  const T* valid;     // c   v_j as 0 / 1 (CPU: byte or bool masks keep GCC from vectorising)
  const T* bias;      // c   b_j (a scalar b expanded)
  int64_t B, c, col0;  // the chunk holds reference rows [col0, col0 + c)
  bool in_batch;       // the reference set is the batch: column i − col0 is row i (no pair)
  epi::UssParams<T> p;
  T* state;           // forward: 4 rows: Σ softplus (pairs) | m⁺, s⁺, m⁻, s⁻ (lse)
  const T* go;        // backward: upstream gradient per row (λ included in the bank part)
  const T* stats;     // backward: the 4 rows of stats::UssRow (lse)
  T* hs;              // backward: 2 rows, += Σ_j g_ij cos_ij, Σ_j g_ij
  // fused forward (the bank part of unitsface's row_grads, CPU): uss_rows.h's fwd_grads
  T* sums;            // 3 rows, += Σ g·cos and Σ g (pairs) | Σ_N e^{z⁻ − m⁻}·cos (lse,
                      // rescaled with m⁻), the cosine of the positive (lse)
  T* alpha;           // 1 row: e^{m⁻_old − m⁻_new} of this chunk (lse)
  T weight;           // λ, the factor of the pairs gradients
};

// Column j's membership of P_i and N_i (docs/design.md §1.1): a valid row with y_i's label
// (not row i itself in-batch: `self`), or a valid row with another label. (Two functions:
// GCC does not vectorise a loop that builds a struct of the two bools.)
template <typename T>
UF_HOST_DEVICE bool uss_pos(const UssRows<T>& a, int64_t yi, int64_t self, int64_t j) {
  return (a.valid[j] != T(0)) & (a.l[j] == yi) & (j != self);
}
template <typename T>
UF_HOST_DEVICE bool uss_neg(const UssRows<T>& a, int64_t yi, int64_t j) {
  return (a.valid[j] != T(0)) & (a.l[j] != yi);
}

// the column of row i itself in the chunk (in-batch), or −1
template <typename T>
UF_HOST_DEVICE int64_t self_column(const UssRows<T>& a, int64_t i) {
  return a.in_batch ? i - a.col0 : -1;
}

// The margin softmax over one chunk of classes (docs/design.md §1.2, the family §1.5). With K
// sub-centres per class the dots, grads and inv_w have c·K columns, sub-centre-major: class
// j's sub-centre r in r·c + j (csrc/chunking.h sub_centre_rows says why).
template <typename T>
struct SoftmaxRows {
  T* dots;               // B × c·K raw dots x_i · w_r; the forward writes logits over them
  T* grads;              // CPU backward / fused forward: B × c·K, g_ir·inv_w_r (may alias
                         // dots; with K > 1 nonzero on each class's arg-max row only)
  const T* inv_x;        // B
  const T* inv_w;        // c·K
  const int64_t* target; // B   the column (in S) of y_i, −1 when y_i is not in S
  int64_t B, c, col0;    // the chunk holds columns [col0, col0 + c) of S
  int64_t k;             // K, the sub-centres per class
  epi::SoftmaxParams<T> p;
  const T* margin_rows;  // the family: [4, B] (csrc/stats.h margin_row), or null
  T* state;              // forward: 3 rows: m, Σ e^{z − m}, z_iy
  const T* go;           // backward: upstream gradient per row
  const T* lse;          // backward: the row's logsumexp (stats row stats::kLse)
  T* h;                  // backward: 1 row, += Σ_c g_ic cos_ic
  // fused forward (row_grads, CPU): softmax_rows.h's fwd_grads
  T* target_state;       // 3 rows: the target's raw cosine, κ = ∂z_iy/∂cos / s,
                         // Σ_c e^{z − m}·κ_c·cos_c (rescaled with m; κ_c = clamp mask)
  T* alpha;              // 1 row: e^{m_old − m_new} of this chunk
  T* target_arg;         // the family: 1 row, the arg-max sub-centre r of the target class
};

// The column of row i's own class inside a chunk of SoftmaxRows, or −1.
template <typename T>
UF_HOST_DEVICE int64_t chunk_target(const SoftmaxRows<T>& a, int64_t i) {
  const int64_t t = a.target[i] - a.col0;
  return (t >= 0 && t < a.c) ? t : -1;
}

}  // namespace unitsface
