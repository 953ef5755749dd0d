// The CPU row kernels of the margin family (docs/design.md §1.5) on one chunk of classes
// (SoftmaxRows, csrc/rows.h): K sub-centres per class, per-row margins, angle clip,
// curricular negatives, the inter-class filter. Compiled once per instruction set like
// csrc/cpu/softmax_rows.h (csrc/cpu/rows_<isa>.cpp include it inside their namespace), and
// run instead of those kernels only when options.margin_family() (csrc/cpu/unitsface.cpp
// chooses per chunk), so CosFace/ArcFace pay nothing for the family.
//
// Per row: the class cosines c_j = max_r cos_{r·c+j} (first arg-max; NaN wins; the chunk's
// columns are sub-centre-major, csrc/rows.h) into a scratch row, then the loops of
// csrc/cpu/softmax_rows.h with the family's logits (epi::family_z) and factors κ
// (epi::family_kappa); the gradient of class j goes to its arg-max column arg_j·c + j, the
// other K − 1 columns get 0. As there, the loops treat every
// class as a negative (so that they vectorise) and the target is fixed up after them.
#pragma once

// A task's scratch: the class cosines (raw, before the clamp) and arg-max rows of one row.
template <typename T>
struct FamilyScratch {
  std::vector<T> cos;
  std::vector<int32_t> arg;
  explicit FamilyScratch(int64_t c) : cos(c), arg(c) {}
};

// The class cosines of row i of the chunk into sc (see above).
template <typename T>
UF_ALWAYS_INLINE void class_cosines(const SoftmaxRows<T>& a, int64_t i, FamilyScratch<T>& sc) {
  const int64_t c = a.c, K = a.k;
  const T* d = a.dots + i * c * K;
  const T ix = a.inv_x[i];
  T* cos = sc.cos.data();
  int32_t* arg = sc.arg.data();
#pragma omp simd
  for (int64_t j = 0; j < c; ++j) {
    cos[j] = d[j] * ix * a.inv_w[j];
    arg[j] = 0;
  }
  for (int32_t r = 1; r < K; ++r) {  // the next sub-centre's block of c columns
    const T* dr = d + r * c;
    const T* iw = a.inv_w + r * c;
#pragma omp simd
    for (int64_t j = 0; j < c; ++j) epi::sub_centre_max<T>(cos[j], arg[j], dr[j] * ix * iw[j], r);
  }
}

// Row i's weights per class (wt[j], in sc.cos) onto the chunk's c·K columns: w·inv_w on
// each class's arg-max column, 0 on the others (g_out may alias the dots: they were read).
template <typename T>
UF_ALWAYS_INLINE void scatter_class_grads(const SoftmaxRows<T>& a, int64_t i, const T* wt,
                                          const int32_t* arg) {
  const int64_t c = a.c, K = a.k;
  T* g_out = a.grads + i * c * K;
  if (K == 1) {
#pragma omp simd
    for (int64_t j = 0; j < c; ++j) g_out[j] = wt[j] * a.inv_w[j];
    return;
  }
  for (int32_t r = 0; r < K; ++r) {
    T* gr = g_out + r * c;
    const T* iw = a.inv_w + r * c;
#pragma omp simd
    for (int64_t j = 0; j < c; ++j) gr[j] = r == arg[j] ? wt[j] * iw[j] : T(0);
  }
}

// Row i's family logits z_j of the class cosines cos (z may be cos itself), the target's
// (column t, or none: −1) added to z_iy in state row 2; returns their chunk max.
template <typename T>
UF_ALWAYS_INLINE T family_logits(const SoftmaxRows<T>& a, int64_t i, int64_t t,
                                 const epi::RowTerms<T>& rt, const T* cos, T* z) {
  const int64_t c = a.c;
  const T neg_big = static_cast<T>(epi::kNegBig);
  const T raw_t = t >= 0 ? cos[t] : T(0);  // read before the loop may overwrite it
  T cm = neg_big;
#pragma omp simd reduction(max : cm)
  for (int64_t j = 0; j < c; ++j) {
    z[j] = epi::family_z<T>(cos[j], false, rt);
    const T zm = j != t ? z[j] : neg_big;
    cm = zm > cm ? zm : cm;
  }
  if (t >= 0) {
    const T zt = epi::family_z<T>(raw_t, true, rt);
    z[t] = zt;
    cm = zt > cm ? zt : cm;
    a.state[2 * a.B + i] += zt;
  }
  return cm;
}

// Forward: the running (max, Σ e^{z − max}) and z_iy of the family's logits.
template <typename T>
void family_fwd(const SoftmaxRows<T>& args, int64_t r0, int64_t r1) {
  const SoftmaxRows<T> a = args;
  FamilyScratch<T> sc(a.c);
  T* z = sc.cos.data();  // the logits overwrite the cosines
  for (int64_t i = r0; i < r1; ++i) {
    const epi::RowTerms<T> rt = epi::row_terms<T>(a.p, a.margin_rows, a.B, i);
    class_cosines(a, i, sc);
    const T cm = family_logits(a, i, chunk_target(a, i), rt, z, z);
    fold_chunk_sum(a.state, a.B, i, z, a.c, cm);
  }
}

// Backward: g_ij = go_i·s·(p_ij − [j = y_i])·κ_ij from the row's final lse on the arg-max
// columns; h += Σ_j g_ij·c_ij.
template <typename T>
void family_bwd(const SoftmaxRows<T>& args, int64_t r0, int64_t r1) {
  const SoftmaxRows<T> a = args;
  const int64_t c = a.c;
  FamilyScratch<T> sc(c);
  T* cos = sc.cos.data();  // the weights overwrite the cosines
  for (int64_t i = r0; i < r1; ++i) {
    const epi::RowTerms<T> rt = epi::row_terms<T>(a.p, a.margin_rows, a.B, i);
    class_cosines(a, i, sc);
    const T go = a.go[i], lse = a.lse[i];
    const int64_t t = chunk_target(a, i);
    const T raw_t = t >= 0 ? cos[t] : T(0);
    T h = 0;
#pragma omp simd reduction(+ : h)
    for (int64_t j = 0; j < c; ++j) {
      const T raw = cos[j];
      const T g = j != t ? epi::family_grad<T>(raw, false, lse, rt) * go : T(0);
      h += g * raw;
      cos[j] = g;
    }
    if (t >= 0) {
      const T g = epi::family_grad<T>(raw_t, true, lse, rt) * go;
      h += g * raw_t;
      cos[t] = g;
    }
    scatter_class_grads(a, i, cos, sc.arg.data());
    a.h[i] += h;
  }
}

// Fused forward (row_grads): the forward's statistics and the ∂x weights e^{z − m_new}·κ_j
// relative to the running max, as softmax_fwd_grads in csrc/cpu/softmax_rows.h (whose
// comment has the maths), with the family's κ (negatives: n'(c), not only the clamp mask)
// and the target's arg-max sub-centre in target_arg.
template <typename T>
void family_fwd_grads(const SoftmaxRows<T>& args, int64_t r0, int64_t r1) {
  const SoftmaxRows<T> a = args;
  const int64_t B = a.B, c = a.c;
  T *st = a.state, *ts = a.target_state;
  FamilyScratch<T> sc(c);
  std::vector<T> zs(c);
  T *cos = sc.cos.data(), *z = zs.data();
  for (int64_t i = r0; i < r1; ++i) {
    const epi::RowTerms<T> rt = epi::row_terms<T>(a.p, a.margin_rows, B, i);
    class_cosines(a, i, sc);
    const int64_t t = chunk_target(a, i);
    const T cm = family_logits(a, i, t, rt, cos, z);
    T raw_t = 0, zt = 0, kappa_t = 0;
    if (t >= 0) {
      raw_t = cos[t];
      zt = z[t];
      kappa_t = epi::family_kappa<T>(raw_t, true, rt);
      ts[i] = raw_t;
      ts[B + i] = kappa_t;
      a.target_arg[i] = static_cast<T>(sc.arg[t]);
    }
    const T m_old = st[i];
    const T m_new = cm > m_old ? cm : m_old;
    T se = 0, hw = 0;
#pragma omp simd reduction(+ : se, hw)
    for (int64_t j = 0; j < c; ++j) {
      const T e = epi::uf_exp<T>(z[j] - m_new);
      const T w = j != t ? e * epi::family_kappa<T>(cos[j], false, rt) : T(0);
      se += j != t ? e : T(0);
      hw += w * cos[j];
      cos[j] = w;
    }
    if (t >= 0) {
      const T e = epi::uf_exp<T>(zt - m_new);
      const T w = e * kappa_t;
      se += e;
      hw += w * raw_t;
      cos[t] = w;
    }
    scatter_class_grads(a, i, cos, sc.arg.data());
    const T alpha = epi::uf_exp<T>(m_old - m_new);
    a.alpha[i] = alpha;
    st[B + i] = st[B + i] * alpha + se;
    ts[2 * B + i] = ts[2 * B + i] * alpha + hw;
    st[i] = m_new;
  }
}
