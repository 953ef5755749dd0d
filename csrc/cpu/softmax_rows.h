// The CPU row kernels of the margin softmax (docs/design.md §1.2) on one chunk of classes
// (SoftmaxRows, csrc/rows.h). Compiled once per instruction set: csrc/cpu/rows_<isa>.cpp include
// this file inside their namespace (see csrc/cpu/row_kernels.h), so it includes nothing and needs
// SoftmaxRows, epi:: and UF_ALWAYS_INLINE in scope.
//
// The target column of a row is known (SoftmaxRows::target), so every loop treats all columns
// as non-targets, with selects, and fixes up the one target column after the loop: the loops
// vectorise and only one column pays for the margin's sqrt.
#pragma once

// Row i's running (m, Σ e^{z − m}) in state rows 0 and 1 with a chunk's logits z[0, c), whose
// max is cm: m_new = max(m, cm), Σ ← Σ·e^{m − m_new} + Σ_j e^{z_j − m_new}.
template <typename T>
UF_ALWAYS_INLINE void fold_chunk_sum(T* st, int64_t B, int64_t i, const T* z, int64_t c, T cm) {
  const T m_new = cm > st[i] ? cm : st[i];
  T se = 0;
#pragma omp simd reduction(+ : se)
  for (int64_t j = 0; j < c; ++j) se += epi::uf_exp<T>(z[j] - m_new);
  st[B + i] = st[B + i] * epi::uf_exp<T>(st[i] - m_new) + se;
  st[i] = m_new;
}

// Forward: the chunk's logits over the dots, folded into the running (max, Σ e^{z − max})
// and the target logit z_iy.
template <typename T>
void softmax_fwd(const SoftmaxRows<T>& args, int64_t r0, int64_t r1) {
  const SoftmaxRows<T> a = args;  // a local copy: stores cannot alias its pointers
  const int64_t B = a.B, c = a.c;
  const T s = a.p.scale, neg_big = static_cast<T>(epi::kNegBig);
  T* st = a.state;
  for (int64_t i = r0; i < r1; ++i) {
    T* d = a.dots + i * c;
    const T ix = a.inv_x[i];
    const int64_t t = chunk_target(a, i);
    const T raw_t = t >= 0 ? d[t] * ix * a.inv_w[t] : T(0);
    T cm = neg_big;
#pragma omp simd reduction(max : cm)
    for (int64_t j = 0; j < c; ++j) {
      const T z = s * epi::clamp_unit<T>(d[j] * ix * a.inv_w[j]);
      d[j] = z;
      const T zm = j != t ? z : neg_big;  // the exact max: a lone target gives lse = z_iy
      cm = zm > cm ? zm : cm;
    }
    if (t >= 0) {
      const T zt = epi::softmax_z<T>(raw_t, true, a.p);
      d[t] = zt;
      cm = zt > cm ? zt : cm;
      st[2 * B + i] += zt;
    }
    fold_chunk_sum(st, B, i, d, c, cm);
  }
}

// Backward: g_ic = go_i·∂L_i/∂cos_ic from the row's final lse; grads ← g·inv_w_c, h += Σ g·cos.
template <typename T>
void softmax_bwd(const SoftmaxRows<T>& args, int64_t r0, int64_t r1) {
  const SoftmaxRows<T> a = args;  // a local copy: stores cannot alias its pointers
  const int64_t c = a.c;
  const T s = a.p.scale;
  for (int64_t i = r0; i < r1; ++i) {
    const T* d = a.dots + i * c;
    T* g_out = a.grads + i * c;  // may alias d: each element is read, then written
    const T ix = a.inv_x[i], go = a.go[i], lse = a.lse[i];
    const int64_t t = chunk_target(a, i);
    const T raw_t = t >= 0 ? d[t] * ix * a.inv_w[t] : T(0);
    T h = 0;
#pragma omp simd reduction(+ : h)
    for (int64_t j = 0; j < c; ++j) {
      const T raw = d[j] * ix * a.inv_w[j];
      const T z = s * epi::clamp_unit<T>(raw);
      const T g = j != t ? epi::softmax_grad_other<T>(raw, z, lse, s) * go : T(0);
      h += g * raw;
      g_out[j] = g * a.inv_w[j];
    }
    if (t >= 0) {
      const T zt = epi::softmax_z<T>(raw_t, true, a.p);
      const T g = epi::softmax_grad<T>(raw_t, zt, true, lse, a.p) * go;
      h += g * raw_t;
      g_out[t] = g * a.inv_w[t];
    }
    a.h[i] += h;
  }
}

// Fused forward (row_grads): the forward's statistics plus the weights of the ∂x GEMM, written
// to grads, and the per-row scalars of G_i and h_i (target_state; csrc/cpu/unitsface_row_grads.cpp
// finishes them). p_ic = e^{z_ic − m}/Σ is not final before the sweep ends, so, like
// flash-attention's output, the weights are e^{z − m_new}·κ_c·inv_w_c relative to the running
// max (κ_c: the clamp mask, times f'(cos) at the target), and alpha = e^{m_old − m_new}
// rescales what was accumulated before this chunk.
template <typename T>
void softmax_fwd_grads(const SoftmaxRows<T>& args, int64_t r0, int64_t r1) {
  const SoftmaxRows<T> a = args;  // a local copy: stores cannot alias its pointers
  const int64_t B = a.B, c = a.c;
  const T s = a.p.scale, neg_big = static_cast<T>(epi::kNegBig);
  T *st = a.state, *ts = a.target_state;
  for (int64_t i = r0; i < r1; ++i) {
    T* d = a.dots + i * c;
    T* g_out = a.grads + i * c;  // may alias d: each element is read, then written
    const T ix = a.inv_x[i];
    const int64_t t = chunk_target(a, i);
    // raw cosines over the dots, the chunk max of the logits
    T cm = neg_big;
#pragma omp simd reduction(max : cm)
    for (int64_t j = 0; j < c; ++j) {
      const T raw = d[j] * ix * a.inv_w[j];
      d[j] = raw;
      const T zm = j != t ? s * epi::clamp_unit<T>(raw) : neg_big;
      cm = zm > cm ? zm : cm;
    }
    T zt = 0, raw_t = 0, kappa_t = 0;
    if (t >= 0) {
      raw_t = d[t];
      zt = epi::softmax_z<T>(raw_t, true, a.p);
      cm = zt > cm ? zt : cm;
      kappa_t = epi::target_kappa<T>(raw_t, a.p);
      st[2 * B + i] += zt;
      ts[i] = raw_t;
      ts[B + i] = kappa_t;
    }
    const T m_old = st[i];
    const T m_new = cm > m_old ? cm : m_old;
    T se = 0, hw = 0;
#pragma omp simd reduction(+ : se, hw)
    for (int64_t j = 0; j < c; ++j) {
      const T raw = d[j];
      const T e = epi::uf_exp<T>(s * epi::clamp_unit<T>(raw) - m_new);
      const bool other = j != t;
      const bool use = other & epi::clamp_unit_inactive<T>(raw);
      se += other ? e : T(0);
      hw += use ? e * raw : T(0);
      g_out[j] = use ? e * a.inv_w[j] : T(0);
    }
    if (t >= 0) {
      const T e = epi::uf_exp<T>(zt - m_new);
      se += e;
      hw += e * kappa_t * raw_t;
      g_out[t] = e * kappa_t * a.inv_w[t];
    }
    const T alpha = epi::uf_exp<T>(m_old - m_new);
    a.alpha[i] = alpha;
    st[B + i] = st[B + i] * alpha + se;
    ts[2 * B + i] = ts[2 * B + i] * alpha + hw;
    st[i] = m_new;
  }
}
