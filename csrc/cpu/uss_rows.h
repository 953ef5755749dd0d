// The CPU row kernels of USS (docs/design.md §1.1) on one chunk of reference rows (UssRows,
// csrc/rows.h): the USS family's chunks, and the bank part of the unitsface family (column
// labels = the classes of the chunk). Compiled once per instruction set: csrc/cpu/rows_<isa>.cpp
// include this file inside their namespace (see csrc/cpu/row_kernels.h), so it includes nothing and
// needs UssRows, epi:: and UF_ALWAYS_INLINE in scope.
//
// The loops are written for GCC's vectoriser: `#pragma omp simd` reductions, masks combined
// with & and | (the branches of && and || keep the loops scalar), selects instead of ifs, the
// polynomial exp / log1p of csrc/epilogue.h.
#pragma once

// lse, the first pass over row i's chunk: the cosines written over the dots, and the chunk
// maxima of z⁺ over P_i and of z⁻ over N_i folded into the running maxima mp, mn.
template <typename T>
UF_ALWAYS_INLINE void uss_lse_maxima(const UssRows<T>& a, int64_t i, T& mp, T& mn) {
  const int64_t c = a.c;
  const T neg_big = static_cast<T>(epi::kNegBig);
  T* d = a.dots + i * c;
  const T ix = a.inv_x[i];
  const int64_t yi = a.y[i], self = self_column(a, i);
  T cp = neg_big, cn = neg_big;
#pragma omp simd reduction(max : cp, cn)
  for (int64_t j = 0; j < c; ++j) {
    const T cos = d[j] * ix * a.inv_r[j];
    d[j] = cos;
    const bool pos = uss_pos(a, yi, self, j), neg = uss_neg(a, yi, j);
    const T z = epi::uss_z<T>(cos, a.bias[j], pos, a.p);
    const T zp = pos ? z : neg_big;
    const T zn = neg ? z : neg_big;
    cp = zp > cp ? zp : cp;
    cn = zn > cn ? zn : cn;
  }
  mp = cp > mp ? cp : mp;
  mn = cn > mn ? cn : mn;
}

// lse: fold the chunk's sums (relative to the new maxima) into the running pairs of row i;
// returns the negatives' rescale factor e^{m⁻_old − m⁻_new}.
template <typename T>
UF_ALWAYS_INLINE T uss_lse_fold(T* st, int64_t B, int64_t i, T mp_new, T mn_new, T sp, T sn) {
  const T alpha = epi::uf_exp<T>(st[2 * B + i] - mn_new);
  st[B + i] = st[B + i] * epi::uf_exp<T>(st[i] - mp_new) + sp;
  st[i] = mp_new;
  st[3 * B + i] = st[3 * B + i] * alpha + sn;
  st[2 * B + i] = mn_new;
  return alpha;
}

// Forward: fold the chunk into the rows' running statistics (UssRows::state).
template <typename T>
void uss_fwd(const UssRows<T>& args, int64_t r0, int64_t r1) {
  const UssRows<T> a = args;  // a local copy: stores cannot alias its pointers
  const int64_t B = a.B, c = a.c;
  for (int64_t i = r0; i < r1; ++i) {
    T* d = a.dots + i * c;
    const T ix = a.inv_x[i];
    const int64_t yi = a.y[i], self = self_column(a, i);
    if (!a.p.lse) {  // pairs: Σ softplus over P and N
      T acc = 0;
#pragma omp simd reduction(+ : acc)
      for (int64_t j = 0; j < c; ++j) {
        const T cos = d[j] * ix * a.inv_r[j];
        const bool pos = uss_pos(a, yi, self, j), neg = uss_neg(a, yi, j);
        const T v = epi::uss_pair_loss<T>(epi::uss_z<T>(cos, a.bias[j], pos, a.p), a.p);
        acc += (pos | neg) ? v : T(0);
      }
      a.state[i] += acc;
      continue;
    }
    // lse: the new running maxima of z over P and N, then Σ e^{z − max}
    T mp_new = a.state[i], mn_new = a.state[2 * B + i];
    uss_lse_maxima(a, i, mp_new, mn_new);
    T sp = 0, sn = 0;
#pragma omp simd reduction(+ : sp, sn)
    for (int64_t j = 0; j < c; ++j) {
      const bool pos = uss_pos(a, yi, self, j), neg = uss_neg(a, yi, j);
      const T z = epi::uss_z<T>(d[j], a.bias[j], pos, a.p);
      const T e = epi::uf_exp<T>(z - (pos ? mp_new : mn_new));
      sp += pos ? e : T(0);
      sn += neg ? e : T(0);
    }
    uss_lse_fold(a.state, B, i, mp_new, mn_new, sp, sn);
  }
}

// Backward of row i: g_ij = go_i·∂L_i/∂cos_ij; grads ← g·inv_r_j; hs += (Σ g·cos, Σ g).
// The form is a template parameter: each instantiation's loop vectorises with no branch on it.
template <typename T, bool Lse>
UF_ALWAYS_INLINE void uss_bwd_row(const UssRows<T>& a, int64_t i) {
  const int64_t B = a.B, c = a.c;
  const T* d = a.dots + i * c;
  T* g_out = a.grads + i * c;  // may alias d: each element is read, then written
  const T ix = a.inv_x[i], go = a.go[i];
  const int64_t yi = a.y[i], self = self_column(a, i);
  const T sa = a.stats[stats::kA * B + i], fa = a.stats[stats::kSigmaA * B + i];
  const T sb = a.stats[stats::kB * B + i], fb = a.stats[stats::kSigmaB * B + i];
  T h = 0, gs = 0;
#pragma omp simd reduction(+ : h, gs)
  for (int64_t j = 0; j < c; ++j) {
    const T cos = d[j] * ix * a.inv_r[j];
    const bool pos = uss_pos(a, yi, self, j), neg = uss_neg(a, yi, j);
    const T z = epi::uss_z<T>(cos, a.bias[j], pos, a.p);
    T g0;
    if constexpr (Lse) {
      g0 = epi::uss_lse_grad<T>(z, pos, pos ? sa : sb, pos ? fa : fb, a.p) * go;
    } else {
      g0 = epi::uss_pair_grad<T>(z, pos, a.p) * go;
    }
    const T g = (pos | neg) ? g0 : T(0);
    h += g * cos;
    gs += g;
    g_out[j] = g * a.inv_r[j];
  }
  a.hs[i] += h;
  a.hs[B + i] += gs;
}

template <typename T>
void uss_bwd(const UssRows<T>& args, int64_t r0, int64_t r1) {
  const UssRows<T> a = args;  // a local copy: stores cannot alias its pointers
  for (int64_t i = r0; i < r1; ++i) {
    if (a.p.lse) {
      uss_bwd_row<T, true>(a, i);
    } else {
      uss_bwd_row<T, false>(a, i);
    }
  }
}

// Fused forward (the bank part of unitsface's row_grads): the forward's statistics plus, in
// the same sweep, what ∂L_i/∂x_i needs (csrc/cpu/unitsface_row_grads.cpp finishes it), with the
// weights of the ∂x GEMM written to grads:
//   pairs: g'_ij = λ·∂(term)/∂cos_ij·inv_r_j for P and N; sums += (Σ g·cos, Σ g).
//   lse:   e^{z⁻ − m⁻_new}·inv_r_j on N (the final factor λ·s·σB / s⁻ comes at the end),
//          sums[0] += Σ_N e^{z⁻ − m⁻}·cos rescaled like s⁻ (alpha = e^{m⁻_old − m⁻_new}),
//          and the cosine of the positive in sums[2]: the bank holds one row per class, so a
//          row has at most one positive in the whole sweep, and the driver adds its term.
template <typename T>
void uss_fwd_grads(const UssRows<T>& args, int64_t r0, int64_t r1) {
  const UssRows<T> a = args;  // a local copy: stores cannot alias its pointers
  const int64_t B = a.B, c = a.c;
  T* st = a.state;
  for (int64_t i = r0; i < r1; ++i) {
    T* d = a.dots + i * c;
    T* g_out = a.grads + i * c;  // may alias d: each element is read, then written
    const T ix = a.inv_x[i];
    const int64_t yi = a.y[i], self = self_column(a, i);
    if (!a.p.lse) {
      T loss = 0, h = 0, gs = 0;
#pragma omp simd reduction(+ : loss, h, gs)
      for (int64_t j = 0; j < c; ++j) {
        const T cos = d[j] * ix * a.inv_r[j];
        const bool pos = uss_pos(a, yi, self, j), neg = uss_neg(a, yi, j);
        T term, grad;
        epi::uss_pair_loss_grad<T>(epi::uss_z<T>(cos, a.bias[j], pos, a.p), pos, a.p, term,
                                   grad);
        const bool member = pos | neg;
        const T g = member ? a.weight * grad : T(0);
        loss += member ? term : T(0);
        h += g * cos;
        gs += g;
        g_out[j] = g * a.inv_r[j];
      }
      st[i] += loss;
      a.sums[i] += h;
      a.sums[B + i] += gs;
      continue;
    }
    T mp_new = st[i], mn_new = st[2 * B + i];
    uss_lse_maxima(a, i, mp_new, mn_new);
    T sp = 0, sn = 0, hn = 0, cos_pos = 0;
#pragma omp simd reduction(+ : sp, sn, hn, cos_pos)
    for (int64_t j = 0; j < c; ++j) {
      const T cos = d[j];
      const bool pos = uss_pos(a, yi, self, j), neg = uss_neg(a, yi, j);
      const T z = epi::uss_z<T>(cos, a.bias[j], pos, a.p);
      const T e = epi::uf_exp<T>(z - (pos ? mp_new : mn_new));
      sp += pos ? e : T(0);
      sn += neg ? e : T(0);
      hn += neg ? e * cos : T(0);
      cos_pos += pos ? cos : T(0);
      g_out[j] = neg ? e * a.inv_r[j] : T(0);
    }
    const T alpha = uss_lse_fold(st, B, i, mp_new, mn_new, sp, sn);
    a.sums[i] = a.sums[i] * alpha + hn;
    a.sums[2 * B + i] += cos_pos;
    a.alpha[i] = alpha;
  }
}
