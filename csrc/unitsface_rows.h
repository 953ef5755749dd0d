// The CPU row kernels of the UniTSFace epilogue (csrc/unitsface.cpp). NO include guard:
// unitsface.cpp includes this file once per instruction set (AVX-512, AVX2, baseline), each
// time inside its own namespace and `#pragma GCC target` region, and picks one at run time
// (cpu_loops.h): the `#pragma omp simd` loops must be compiled for the target they run on.
// Needs UfRows<T> and epi:: in scope; includes nothing itself. Masks combine with & and |
// (not && / ||, whose branches keep GCC from vectorising the omp simd loops).

// The target column of row i inside this chunk, or −1.
template <typename T>
UF_ALWAYS_INLINE int64_t chunk_target(const UfRows<T>& a, int64_t i) {
  const int64_t t = a.target[i] - a.col0;
  return (t >= 0 && t < a.c) ? t : -1;
}

template <typename T>
UF_ALWAYS_INLINE void fwd_rows(const UfRows<T> a, int64_t r0, int64_t r1) {
  const int64_t c = a.c, B = a.B;
  const T neg_big = static_cast<T>(epi::kNegBig);
  const T s = a.sp.scale;
  for (int64_t i = r0; i < r1; ++i) {
    const T ix = a.inv_x[i];
    const int64_t t = chunk_target(a, i);
    T* st = a.state;
    if (a.do_w) {
      // margin softmax: z over the dots, every column as a non-target first
      T* d = a.dw + i * c;
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
        const T zt = epi::softmax_z<T>(raw_t, true, a.sp);
        d[t] = zt;
        cm = zt > cm ? zt : cm;
        st[2 * B + i] += zt;
      }
      const T m_new = cm > st[i] ? cm : st[i];
      T se = 0;
#pragma omp simd reduction(+ : se)
      for (int64_t j = 0; j < c; ++j) se += epi::uf_exp<T>(d[j] - m_new);
      st[B + i] = st[B + i] * epi::uf_exp<T>(st[i] - m_new) + se;
      st[i] = m_new;
    }
    if (a.do_b) {
      // USS on the bank rows: N = valid columns but the target, P = the target if valid
      T* d = a.db + i * c;
      const bool has_p = t >= 0 && a.valid[t] != T(0);
      const T cos_t = t >= 0 ? d[t] * ix * a.inv_b[t] : T(0);
      const T zp = has_p ? epi::uss_z<T>(cos_t, a.bias[t], true, a.up) : T(0);
      if (!a.up.lse) {
        T acc = 0;
#pragma omp simd reduction(+ : acc)
        for (int64_t j = 0; j < c; ++j) {
          const T cos = d[j] * ix * a.inv_b[j];
          const T v = epi::uss_pair_loss<T>(epi::uss_z<T>(cos, a.bias[j], false, a.up), a.up);
          acc += ((a.valid[j] != T(0)) & (j != t)) ? v : T(0);
        }
        if (has_p) acc += epi::uss_pair_loss<T>(zp, a.up);
        st[3 * B + i] += acc;
      } else {
        T mn = neg_big;
#pragma omp simd reduction(max : mn)
        for (int64_t j = 0; j < c; ++j) {
          const T z = epi::uss_z<T>(d[j] * ix * a.inv_b[j], a.bias[j], false, a.up);
          d[j] = z;
          const T zn = ((a.valid[j] != T(0)) & (j != t)) ? z : neg_big;
          mn = zn > mn ? zn : mn;
        }
        const T m_new = mn > st[5 * B + i] ? mn : st[5 * B + i];
        T sn = 0;
#pragma omp simd reduction(+ : sn)
        for (int64_t j = 0; j < c; ++j) {
          const T e = epi::uf_exp<T>(d[j] - m_new);
          sn += ((a.valid[j] != T(0)) & (j != t)) ? e : T(0);
        }
        st[6 * B + i] = st[6 * B + i] * epi::uf_exp<T>(st[5 * B + i] - m_new) + sn;
        st[5 * B + i] = m_new;
        if (has_p) epi::lse_push<T>(st[3 * B + i], st[4 * B + i], zp);
      }
    }
  }
}

template <typename T>
UF_ALWAYS_INLINE void bwd_rows(const UfRows<T> a, int64_t r0, int64_t r1) {
  const int64_t c = a.c, B = a.B;
  const T s = a.sp.scale;
  for (int64_t i = r0; i < r1; ++i) {
    const T ix = a.inv_x[i];
    const T go = a.go[i];
    const int64_t t = chunk_target(a, i);
    T h = 0, gs = 0;
    if (a.do_w) {
      const T* d = a.dw + i * c;
      T* g_out = a.gw + i * c;
      const T lse = a.stats[i];
      const T raw_t = t >= 0 ? d[t] * ix * a.inv_w[t] : T(0);
      T hw = 0;
#pragma omp simd reduction(+ : hw)
      for (int64_t j = 0; j < c; ++j) {
        const T raw = d[j] * ix * a.inv_w[j];
        const T z = s * epi::clamp_unit<T>(raw);
        const T g0 = epi::softmax_grad_other<T>(raw, z, lse, s) * go;
        const T g = j != t ? g0 : T(0);
        hw += g * raw;
        g_out[j] = g * a.inv_w[j];
      }
      if (t >= 0) {
        const T zt = epi::softmax_z<T>(raw_t, true, a.sp);
        const T g = epi::softmax_grad<T>(raw_t, zt, true, lse, a.sp) * go;
        hw += g * raw_t;
        g_out[t] = g * a.inv_w[t];
      }
      h += hw;
    }
    if (a.do_b) {
      const T* d = a.db + i * c;
      T* g_out = a.gb + i * c;
      const T sa = a.stats[B + i], fa = a.stats[2 * B + i];
      const T sb = a.stats[3 * B + i], fb = a.stats[4 * B + i];
      const T gl = go * a.lambda;
      const bool has_p = t >= 0 && a.valid[t] != T(0);
      const T cos_t = t >= 0 ? d[t] * ix * a.inv_b[t] : T(0);
      T hb = 0, gb = 0;
      if (a.up.lse) {
#pragma omp simd reduction(+ : hb, gb)
        for (int64_t j = 0; j < c; ++j) {
          const T cos = d[j] * ix * a.inv_b[j];
          const T z = epi::uss_z<T>(cos, a.bias[j], false, a.up);
          const T g0 = epi::uss_lse_grad<T>(z, false, sb, fb, a.up) * gl;
          const T g = ((a.valid[j] != T(0)) & (j != t)) ? g0 : T(0);
          hb += g * cos;
          gb += g;
          g_out[j] = g * a.inv_b[j];
        }
      } else {
#pragma omp simd reduction(+ : hb, gb)
        for (int64_t j = 0; j < c; ++j) {
          const T cos = d[j] * ix * a.inv_b[j];
          const T z = epi::uss_z<T>(cos, a.bias[j], false, a.up);
          const T g0 = epi::uss_pair_grad<T>(z, false, a.up) * gl;
          const T g = ((a.valid[j] != T(0)) & (j != t)) ? g0 : T(0);
          hb += g * cos;
          gb += g;
          g_out[j] = g * a.inv_b[j];
        }
      }
      if (has_p) {
        const T z = epi::uss_z<T>(cos_t, a.bias[t], true, a.up);
        const T g = epi::uss_grad<T>(z, true, sa, fa, sb, fb, a.up) * gl;
        hb += g * cos_t;
        gb += g;
        g_out[t] = g * a.inv_b[t];
      }
      h += hb;
      gs += gb;
    }
    a.hs[i] += h;
    a.hs[B + i] += gs;
  }
}

// Fused forward (unitsface_fwd_g): the forward's statistics plus the weights of the ∂x
// GEMMs, written over the dots, and the per-row scalars of G_i / h_i (unitsface.cpp's
// GradState rows). Softmax: column j's weight is e^{z_j − m_new}·κ_j·inv_w_j with κ_j the
// clamp mask (times f'(cos) at the target); alpha[0] = e^{m_old − m_new} rescales the
// accumulated rows. USS pairs: g'_j·inv_b_j (λ·s·σ(z⁻) on negatives, −λ·s·σ(z⁺) at the
// positive); lse: e^{z⁻_j − m⁻_new}·inv_b_j on negatives, alpha[1] = e^{m⁻_old − m⁻_new}.
template <typename T>
UF_ALWAYS_INLINE void fwdg_rows(const UfRows<T> a, int64_t r0, int64_t r1) {
  const int64_t c = a.c, B = a.B;
  const T neg_big = static_cast<T>(epi::kNegBig);
  const T s = a.sp.scale;
  T* st = a.state;
  for (int64_t i = r0; i < r1; ++i) {
    const T ix = a.inv_x[i];
    const int64_t t = chunk_target(a, i);
    {
      // margin softmax: raw cosines over the dots, the chunk max of the logits
      T* d = a.dw + i * c;
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
        zt = epi::softmax_z<T>(raw_t, true, a.sp);
        cm = zt > cm ? zt : cm;
        const bool inside = (raw_t >= T(-1)) & (raw_t <= T(1));
        kappa_t = inside ? epi::target_slope<T>(epi::clamp_unit<T>(raw_t), a.sp) : T(0);
        st[2 * B + i] += zt;  // kZt
        st[3 * B + i] = raw_t;
        st[4 * B + i] = kappa_t;
      }
      const T m_old = st[i];
      const T m_new = cm > m_old ? cm : m_old;
      T se = 0, hw = 0;
#pragma omp simd reduction(+ : se, hw)
      for (int64_t j = 0; j < c; ++j) {
        const T raw = d[j];
        const T e = epi::uf_exp<T>(s * epi::clamp_unit<T>(raw) - m_new);
        const bool other = j != t;
        const bool use = other & (raw >= T(-1)) & (raw <= T(1));
        se += other ? e : T(0);
        hw += use ? e * raw : T(0);
        d[j] = use ? e * a.inv_w[j] : T(0);
      }
      if (t >= 0) {
        const T e = epi::uf_exp<T>(zt - m_new);
        se += e;
        hw += e * kappa_t * raw_t;
        d[t] = e * kappa_t * a.inv_w[t];
      }
      const T al = epi::uf_exp<T>(m_old - m_new);
      a.alpha[i] = al;
      st[B + i] = st[B + i] * al + se;          // kS
      st[5 * B + i] = st[5 * B + i] * al + hw;  // kHw
      st[i] = m_new;
    }
    if (a.do_b) {
      T* d = a.db + i * c;
      const bool has_p = t >= 0 && a.valid[t] != T(0);
      const T cos_t = t >= 0 ? d[t] * ix * a.inv_b[t] : T(0);
      const T gl = a.lambda * s;
      if (!a.up.lse) {
        T loss = 0, hb = 0, gb = 0;
#pragma omp simd reduction(+ : loss, hb, gb)
        for (int64_t j = 0; j < c; ++j) {
          const T cos = d[j] * ix * a.inv_b[j];
          T sp, sig;
          epi::softplus_sigmoid<T>(epi::uss_z<T>(cos, a.bias[j], false, a.up), sp, sig);
          const bool neg = (a.valid[j] != T(0)) & (j != t);
          const T g = neg ? gl * sig : T(0);
          loss += neg ? sp : T(0);
          hb += g * cos;
          gb += g;
          d[j] = g * a.inv_b[j];
        }
        if (has_p) {
          T sp, sig;
          epi::softplus_sigmoid<T>(epi::uss_z<T>(cos_t, a.bias[t], true, a.up), sp, sig);
          const T g = -gl * sig;
          loss += sp;
          hb += g * cos_t;
          gb += g;
          d[t] = g * a.inv_b[t];
        }
        st[6 * B + i] += loss;  // kU0
        st[10 * B + i] += hb;   // kHb
        st[11 * B + i] += gb;   // kGsb
      } else {
        T mn = neg_big;
#pragma omp simd reduction(max : mn)
        for (int64_t j = 0; j < c; ++j) {
          const T cos = d[j] * ix * a.inv_b[j];
          d[j] = cos;
          const T z = epi::uss_z<T>(cos, a.bias[j], false, a.up);
          const T zn = ((a.valid[j] != T(0)) & (j != t)) ? z : neg_big;
          mn = zn > mn ? zn : mn;
        }
        const T m_old = st[8 * B + i];
        const T m_new = mn > m_old ? mn : m_old;
        T sn = 0, hn = 0;
#pragma omp simd reduction(+ : sn, hn)
        for (int64_t j = 0; j < c; ++j) {
          const T cos = d[j];
          const T e = epi::uf_exp<T>(epi::uss_z<T>(cos, a.bias[j], false, a.up) - m_new);
          const bool neg = (a.valid[j] != T(0)) & (j != t);
          sn += neg ? e : T(0);
          hn += neg ? e * cos : T(0);
          d[j] = neg ? e * a.inv_b[j] : T(0);
        }
        const T al = epi::uf_exp<T>(m_old - m_new);
        a.alpha[B + i] = al;
        st[9 * B + i] = st[9 * B + i] * al + sn;    // kSn
        st[10 * B + i] = st[10 * B + i] * al + hn;  // kHb
        st[8 * B + i] = m_new;
        if (has_p) {
          epi::lse_push<T>(st[6 * B + i], st[7 * B + i],
                           epi::uss_z<T>(cos_t, a.bias[t], true, a.up));
          st[12 * B + i] = cos_t;  // kCosTb
        }
      }
    }
  }
}

template <typename T>
void fwd(const UfRows<T>& a, int64_t r0, int64_t r1) {
  fwd_rows<T>(a, r0, r1);
}
template <typename T>
void bwd(const UfRows<T>& a, int64_t r0, int64_t r1) {
  bwd_rows<T>(a, r0, r1);
}
template <typename T>
void fwdg(const UfRows<T>& a, int64_t r0, int64_t r1) {
  fwdg_rows<T>(a, r0, r1);
}
template void fwd<float>(const UfRows<float>&, int64_t, int64_t);
template void bwd<float>(const UfRows<float>&, int64_t, int64_t);
template void fwd<double>(const UfRows<double>&, int64_t, int64_t);
template void bwd<double>(const UfRows<double>&, int64_t, int64_t);
template void fwdg<float>(const UfRows<float>&, int64_t, int64_t);
template void fwdg<double>(const UfRows<double>&, int64_t, int64_t);
