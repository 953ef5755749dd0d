"""The margin family's float64 formulas (unitsface_kernels.margins) against stand-ins of each
margin's public code, restated here step by step from the published code (one-hot scatters,
in-place edits, the authors' clamps and moving statistics), to float64 round-off: loss,
gradients of the embeddings and the class centres, and the moving statistics after each step."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from unitsface_kernels import margins as M

B, D, C = 9, 12, 7
S = 64.0


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(B, D, generator=g, dtype=torch.float64) * 4.0   # norms ≈ 8–20
    w = torch.randn(C, D, generator=g, dtype=torch.float64)
    labels = torch.randint(0, C, (B,), generator=g)
    labels[:3] = 2                                                     # a repeated class
    # pull each row towards its class so targets are neither hopeless nor trivial
    x = x + 3.0 * F.normalize(w[labels]) * x.norm(dim=1, keepdim=True) / 4.0
    return x, w, labels


def _ours(x, w, labels, mg, state=None, **kw):
    xo, wo = x.clone().requires_grad_(), w.clone().requires_grad_()
    rows, state = M.margin_family_rows(xo, wo, labels, mg, state or M.MarginState(),
                                       scale=S, **kw)
    loss = rows.mean()
    return loss, torch.autograd.grad(loss, [xo, wo]), state


def _theirs(fn, x, w, labels, *args):
    xo, wo = x.clone().requires_grad_(), w.clone().requires_grad_()
    loss, *extra = fn(xo, wo, labels, *args)
    return (loss, torch.autograd.grad(loss, [xo, wo])) + tuple(extra)


def _same(ours, theirs):
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-12, atol=1e-12)
    for a, b in zip(ours[1], theirs[1]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def _unit(t):
    return t / t.norm(dim=1, keepdim=True)


# ----------------------------------------------------------------------------- stand-ins

def adaface_code(x, w, labels, state, m=0.4, h=0.333, t_alpha=0.01):
    """AdaFace's head (mk-minchul/AdaFace head.py), restated: the backbone hands the head the
    unit embedding and its norm; W is taken as the columns of a D × C kernel."""
    eps = 1e-3
    emb, norms = _unit(x), x.norm(dim=1, keepdim=True)
    cosine = (emb @ _unit(w).T).clamp(-1 + eps, 1 - eps)
    safe = torch.clip(norms, min=0.001, max=100).clone().detach()
    with torch.no_grad():
        mean, std = safe.mean(), safe.std()
        state["mean"] = mean * t_alpha + (1 - t_alpha) * state["mean"]
        state["std"] = std * t_alpha + (1 - t_alpha) * state["std"]
    scaler = torch.clip((safe - state["mean"]) / (state["std"] + eps) * h, -1, 1)
    one_hot = torch.zeros_like(cosine).scatter_(1, labels[:, None], 1.0)
    theta_m = torch.clip(cosine.acos() + one_hot * (-m * scaler), min=eps, max=math.pi - eps)
    logits = (theta_m.cos() - one_hot * (m + m * scaler)) * S
    return F.cross_entropy(logits, labels), dict(state)


def magface_code(x, w, labels, easy, l_a=10.0, u_a=110.0, l_m=0.45, u_m=0.8, lambda_g=20.0):
    """MagFace's MagLinear + MagLoss (IrvingMeng/MagFace models/magface.py) and the trainer's
    loss_id + λ_g·loss_g, restated."""
    x_norm = torch.norm(x, dim=1, keepdim=True).clamp(l_a, u_a)
    ada = (u_m - l_m) / (u_a - l_a) * (x_norm - l_a) + l_m
    cos_t = (F.normalize(x) @ F.normalize(w).T).clamp(-1, 1)
    sin_t = torch.sqrt(1.0 - cos_t ** 2)
    cos_t_m = cos_t * torch.cos(ada) - sin_t * torch.sin(ada)
    if easy:
        cos_t_m = torch.where(cos_t > 0, cos_t_m, cos_t)
    else:
        cos_t_m = torch.where(cos_t > torch.cos(math.pi - ada), cos_t_m,
                              cos_t - torch.sin(math.pi - ada) * ada)
    one_hot = torch.zeros_like(cos_t).scatter_(1, labels[:, None], 1.0)
    out = one_hot * S * cos_t_m + (1.0 - one_hot) * S * cos_t
    loss_g = torch.mean(1 / u_a ** 2 * x_norm + 1 / x_norm)
    return (F.cross_entropy(out, labels) + lambda_g * loss_g,)


def curricular_code(x, w, labels, state, m=0.5):
    """CurricularFace (HuangYG123/CurricularFace head/metrics.py), restated."""
    cos_t = (_unit(x) @ _unit(w).T).clamp(-1, 1)
    rows = torch.arange(len(labels))
    target = cos_t[rows, labels].view(-1, 1)
    sin_t = torch.sqrt(1.0 - target ** 2)
    cos_t_m = target * math.cos(m) - sin_t * math.sin(m)
    mask = cos_t > cos_t_m
    final = torch.where(target > math.cos(math.pi - m), cos_t_m,
                        target - math.sin(math.pi - m) * m)
    hard = cos_t[mask]
    with torch.no_grad():
        state["t"] = target.mean() * 0.01 + (1 - 0.01) * state["t"]
    cos_t = cos_t.clone()
    cos_t[mask] = hard * (state["t"] + hard)
    cos_t = cos_t.scatter(1, labels[:, None], final)
    return F.cross_entropy(cos_t * S, labels), dict(state)


def elastic_code(x, w, labels, margin, arc, plus):
    """ElasticArcFace / ElasticCosFace (fdbtrs/ElasticFace utils/losses.py) with the drawn
    margins given, restated."""
    cos_t = (_unit(x) @ _unit(w).T).clamp(-1, 1)
    index = torch.where(labels != -1)[0]
    if plus:
        with torch.no_grad():
            order = torch.sort(cos_t[index, labels.view(-1)].clone(), dim=0, descending=True)[1]
            margin = torch.sort(margin, dim=0)[0][order]
    m_hot = torch.zeros(index.size(0), cos_t.size(1), dtype=x.dtype).scatter_(
        1, labels[index, None], margin[:, None])
    if arc:
        theta = cos_t.acos()
        theta = theta.index_put((index,), theta[index] + m_hot)
        logits = theta.cos() * S
    else:
        logits = cos_t.index_put((index,), cos_t[index] - m_hot) * S
    return (F.cross_entropy(logits, labels),)


def insightface_filtering_code(x, w, labels, m2, m3, threshold):
    """arcface_torch's CombinedMarginLoss with interclass_filtering_threshold (losses.py),
    restated: on the clamped cosine logits, filtering first, then the margin (the ArcFace
    branch under no_grad, i.e. straight-through)."""
    logits = F.linear(F.normalize(x), F.normalize(w)).clamp(-1, 1)
    index_positive = torch.where(labels != -1)[0]
    with torch.no_grad():
        dirty = (logits > threshold).to(logits.dtype)
        mask = torch.ones([index_positive.size(0), logits.size(1)], dtype=logits.dtype)
        mask.scatter_(1, labels[index_positive, None], 0)
        dirty[index_positive] *= mask
        tensor_mul = 1 - dirty
    logits = tensor_mul * logits
    target = logits[index_positive, labels[index_positive]]
    if m2 > 0:
        with torch.no_grad():
            shift = torch.cos(torch.arccos(target) + m2) - target
        logits = logits.index_put((index_positive, labels[index_positive]), target + shift)
    else:
        logits = logits.index_put((index_positive, labels[index_positive]), target - m3)
    return (F.cross_entropy(logits * S, labels),)


def subcenter_code(x, w, labels, k, m):
    """Sub-center ArcFace: the class cosine the maximum over its K sub-centres (rows c·K + k),
    then ArcFace with insightface's fallback."""
    cos = (F.normalize(x) @ F.normalize(w).T).view(len(x), -1, k).amax(dim=2).clamp(-1, 1)
    target = cos.gather(1, labels[:, None])
    sin_t = torch.sqrt((1.0 - target ** 2).clamp_min(1e-12))
    f = torch.where(target > -math.cos(m), target * math.cos(m) - sin_t * math.sin(m),
                    target - m * math.sin(m))
    return (F.cross_entropy(cos.scatter(1, labels[:, None], f) * S, labels),)


# ----------------------------------------------------------------------------- conformance

def test_adaface_matches_its_code_over_steps(data):
    x, w, labels = data
    mg = M.margin("adaface", momentum=0.01)
    ours_state = M.MarginState(norm_mean=torch.tensor(20.0, dtype=torch.float64),
                               norm_std=torch.tensor(100.0, dtype=torch.float64))
    theirs_state = {"mean": ours_state.norm_mean, "std": ours_state.norm_std}
    for step in range(3):
        xs = x * (1.0 + 0.3 * step)       # the norms move, so the statistics do
        *ours, ours_state = _ours(xs, w, labels, mg, ours_state)
        theirs = _theirs(adaface_code, xs, w, labels, theirs_state)
        _same(ours, theirs)
        theirs_state = theirs[2]
        torch.testing.assert_close(ours_state.norm_mean.double(), theirs_state["mean"])
        torch.testing.assert_close(ours_state.norm_std.double(), theirs_state["std"])


def test_adaface_norm_enters_without_gradient(data):
    """AdaFace's margin reads the norm detached: scaling x changes the loss (through the
    margin) but ∂L/∂x stays tangent to x (x·∂L/∂x = 0), as for a plain normalised head."""
    x, w, labels = data
    _, (gx, _), _ = _ours(x, w, labels, M.margin("adaface"))
    torch.testing.assert_close((gx * x).sum(1), torch.zeros(B, dtype=torch.float64),
                               atol=1e-12, rtol=0)


@pytest.mark.parametrize("easy", [True, False])
def test_magface_matches_its_code(data, easy):
    x, w, labels = data
    x = x.clone()
    x[0] *= 20.0     # a norm above u_a: clipped, no margin gradient there
    x[1] *= 0.3      # one below l_a
    mg = M.margin("magface", easy_margin=easy)
    _same(_ours(x, w, labels, mg)[:2], _theirs(magface_code, x, w, labels, easy))


def test_magface_gradient_reaches_the_norm(data):
    """Unlike AdaFace, MagFace's margin and regulariser differentiate the norm: ∂L/∂x has a
    radial part inside [l_a, u_a]."""
    x, w, labels = data
    _, (gx, _), _ = _ours(x, w, labels, M.margin("magface"))
    radial = (gx * x).sum(1)
    assert radial.abs().max() > 1e-6


def test_curricular_matches_its_code_over_steps(data):
    x, w, labels = data
    mg = M.margin("curricular")
    ours_state = M.MarginState(t=torch.zeros((), dtype=torch.float64))
    theirs_state = {"t": torch.zeros(1, dtype=torch.float64)}
    for step in range(3):
        xs = x + step * 0.5 * w[labels]   # the targets move, so t does, and the hard set
        *ours, ours_state = _ours(xs, w, labels, mg, ours_state)
        theirs = _theirs(curricular_code, xs, w, labels, theirs_state)
        _same(ours, theirs)
        theirs_state = theirs[2]
        torch.testing.assert_close(ours_state.t.double().reshape(1), theirs_state["t"])
    assert ours_state.t > 0.01      # t has moved
    cos = F.normalize(xs) @ F.normalize(w).T
    c_y = cos.gather(1, labels[:, None])
    hard = cos > c_y * math.cos(0.5) - (1 - c_y ** 2).sqrt() * math.sin(0.5)
    hard.scatter_(1, labels[:, None], False)
    assert hard.sum() >= 3          # and hard negatives were modulated with it


@pytest.mark.parametrize("arc", [True, False])
@pytest.mark.parametrize("plus", [False, True])
def test_elastic_matches_its_code(data, arc, plus):
    x, w, labels = data
    drawn = 0.5 + 0.05 * torch.randn(B, generator=torch.Generator().manual_seed(1),
                                     dtype=torch.float64)
    mg = M.margin("elastic_arc" if arc else "elastic_cos", plus=plus)
    _same(_ours(x, w, labels, mg, drawn=drawn)[:2],
          _theirs(elastic_code, x, w, labels, drawn, arc, plus))


def test_elastic_plus_orders_the_drawn_margins_as_its_code():
    cos = torch.tensor([0.1, 0.9, 0.5, 0.3], dtype=torch.float64)
    drawn = torch.tensor([0.4, 0.2, 0.3, 0.1], dtype=torch.float64)
    # sorted margins [0.1, 0.2, 0.3, 0.4]; rows by cosine, descending: [1, 2, 3, 0]
    torch.testing.assert_close(M.elastic_plus_order(drawn, cos),
                               torch.tensor([0.2, 0.3, 0.4, 0.1], dtype=torch.float64))


def test_elastic_draws_come_from_the_generator(data):
    x, w, labels = data
    mg = M.margin("elastic_arc", std=0.05)
    a = _ours(x, w, labels, mg, generator=torch.Generator().manual_seed(5))
    b = _ours(x, w, labels, mg, generator=torch.Generator().manual_seed(5))
    c = _ours(x, w, labels, mg, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0])
    drawn = 0.5 + 0.05 * torch.randn(B, generator=torch.Generator().manual_seed(5),
                                     dtype=torch.float64)
    torch.testing.assert_close(_ours(x, w, labels, mg, drawn=drawn)[0], a[0])


@pytest.mark.parametrize("m2,m3", [(0.0, 0.4), (0.5, 0.0)])
def test_interclass_filtering_matches_insightface(data, m2, m3):
    x, w, labels = data
    w = w.clone()
    w[(labels[0] + 1) % C] = w[labels[0]] + 0.1 * w[(labels[0] + 1) % C]  # a near-duplicate
    mg = M.margin("arcface", m=m2, m3=m3, straight_through=m2 > 0, interclass_threshold=0.2)
    theirs = _theirs(insightface_filtering_code, x, w, labels, m2, m3, 0.2)
    _same(_ours(x, w, labels, mg)[:2], theirs)
    cos = F.normalize(x) @ F.normalize(w).T
    dirty = (cos > 0.2) & (torch.arange(C)[None, :] != labels[:, None])
    assert dirty.sum() >= 3          # the filter was active on several negatives


@pytest.mark.parametrize("k", [1, 3])
def test_subcenter_matches_its_formula(data, k):
    x, w, labels = data
    w = torch.randn(C * k, D, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    w[labels * k + (k - 1)] += 2.0 * F.normalize(x)   # the last sub-centre near its rows
    mg = M.margin("arcface", m=0.5, sub_centers=k)
    ours = _ours(x, w, labels, mg)
    _same(ours[:2], _theirs(subcenter_code, x, w, labels, k, 0.5))
    if k > 1:    # the gradient reaches the arg-max sub-centre of each class only
        cos = (F.normalize(x) @ F.normalize(w).T).view(B, C, k)
        winners = set((torch.arange(C) * k + cos.argmax(2)).reshape(-1).tolist())
        touched = set(ours[1][1].abs().sum(1).nonzero().reshape(-1).tolist())
        assert touched <= winners and touched


def test_subcenter_matches_pytorch_metric_learning(data):
    """pytorch-metric-learning's SubCenterArcFaceLoss (W is D × C·K, columns c·K + k; margin in
    degrees) where its ArcFace has no fallback: on rows with θ + m < π the two agree."""
    losses = pytest.importorskip("pytorch_metric_learning.losses")
    x, w, labels = data
    k = 3
    pml = losses.SubCenterArcFaceLoss(num_classes=C, embedding_size=D, margin=28.6, scale=S,
                                      sub_centers=k).double()
    w = pml.W.detach().T.contiguous()
    mg = M.margin("arcface", m=math.radians(28.6), sub_centers=k)
    xo = x.clone().requires_grad_()
    theirs = pml(xo, labels)
    ours = _ours(x, w, labels, mg)
    torch.testing.assert_close(ours[0], theirs, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ours[1][0], torch.autograd.grad(theirs, xo)[0],
                               rtol=1e-8, atol=1e-10)


# ----------------------------------------------------------------------------- partial FC

@pytest.mark.parametrize("kind,settings", [("curricular", {}), ("adaface", {}),
                                           ("magface", {}), ("arcface", {"sub_centers": 3}),
                                           ("arcface", {"interclass_threshold": 0.3})])
def test_partial_fc_reads_the_index_rows(data, kind, settings):
    """With an index S the loss is the full-class loss over the classes of S: the same as
    the call on W's rows of S (all K rows of each class) with labels renumbered."""
    x, w, labels = data
    mg = M.margin(kind, **settings)
    k = mg.sub_centers
    w = torch.randn(C * k, D, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    index = torch.unique(torch.cat([labels, torch.tensor([0, 5])]))
    rows = (index[:, None] * k + torch.arange(k)).reshape(-1)
    local = torch.searchsorted(index, labels)
    a = _ours(x, w, labels, mg, index=index)
    b = _ours(x, w[rows], local, mg)
    torch.testing.assert_close(a[0], b[0])
    torch.testing.assert_close(a[1][0], b[1][0])
    torch.testing.assert_close(a[1][1][rows], b[1][1])
    outside = torch.ones(C * k, dtype=torch.bool)
    outside[rows] = False
    assert torch.equal(a[1][1][outside], torch.zeros_like(a[1][1][outside]))


# ----------------------------------------------------------------------------- gradcheck

@pytest.mark.parametrize("kind,settings", [
    ("arcface", {"m3": 0.1}), ("arcface", {"sub_centers": 2}), ("curricular", {}),
    ("adaface", {}), ("magface", {}), ("magface", {"easy_margin": False}),
    ("elastic_arc", {}), ("elastic_cos", {"plus": True})])
def test_gradcheck(data, kind, settings):
    x, w, labels = data
    mg = M.margin(kind, **settings)
    w = torch.randn(C * mg.sub_centers, D, generator=torch.Generator().manual_seed(8),
                    dtype=torch.float64)
    drawn = torch.full((B,), 0.45, dtype=torch.float64)
    state = M.MarginState(t=torch.tensor(0.3, dtype=torch.float64))

    def loss(xv, wv):
        return M.margin_family_rows(xv, wv, labels, mg, state, scale=8.0, drawn=drawn,
                                    training=False)[0]

    # AdaFace reads the norm without gradient (by design): its ∂L/∂x is not the derivative
    # of its loss in x, so only W is checked there (test_adaface_norm_enters_without_gradient)
    xv = x.clone().requires_grad_(kind != "adaface")
    assert torch.autograd.gradcheck(loss, (xv, w.clone().requires_grad_()))


# ----------------------------------------------------------------------------- statistics

def test_moving_statistics_survive_degenerate_batches(data):
    """A B = 1 batch has no std (the authors' code would make the moving std NaN for ever):
    the std keeps its value and the mean moves; all rows of one norm give std 0, finite
    margins; a non-finite norm is left out of the statistics (its row's loss is NaN)."""
    x, w, labels = data
    mg = M.margin("adaface", momentum=0.5)
    _, _, st = _ours(x[:1], w, labels[:1], mg, M.MarginState())
    assert st.norm_std == 100.0 and st.norm_mean != 20.0
    same = F.normalize(x) * 7.0
    loss, grads, st = _ours(same, w, labels, mg, M.MarginState())
    assert torch.isfinite(loss) and st.norm_std == 50.0   # 0.5·0 + 0.5·100
    bad = x.clone()
    bad[2, 0] = math.nan
    rows, st = M.margin_family_rows(bad, w, labels, mg, M.MarginState(), scale=S)
    assert torch.isfinite(st.norm_mean) and torch.isfinite(st.norm_std)
    assert torch.isnan(rows[2]) and torch.isfinite(rows[torch.arange(B) != 2]).all()
    cur, _ = M.margin("curricular"), None
    _, st = M.margin_family_rows(bad, w, labels, cur, M.MarginState(t=torch.tensor(0.2)),
                                 scale=S)
    assert st.t == 0.2               # a NaN mean target cosine leaves t as it was


def test_statistics_update_in_training_only(data):
    x, w, labels = data
    for kind in ("curricular", "adaface"):
        st0 = M.MarginState()
        _, st = M.margin_family_rows(x, w, labels, M.margin(kind), st0, training=False)
        assert (st.t, st.norm_mean, st.norm_std) == (st0.t, st0.norm_mean, st0.norm_std)


def test_global_batch_statistics_override_the_local_ones(data):
    """Class-parallel training reduces the statistics over the ranks and hands them in: with
    the statistics of the whole batch, a shard of rows gets the whole batch's margins."""
    x, w, labels = data
    mg = M.margin("adaface", momentum=1.0)
    norms = x.norm(dim=1).clip(1e-3, 100.0)
    whole = M.row_inputs(mg, x, torch.zeros(B, dtype=torch.float64), M.MarginState())
    part = M.row_inputs(mg, x[:4], torch.zeros(4, dtype=torch.float64), M.MarginState(),
                        batch_stats=M.norm_statistics(norms))
    torch.testing.assert_close(part.a, whole.a[:4])
    torch.testing.assert_close(part.state.norm_std, whole.state.norm_std)


# ----------------------------------------------------------------------------- settings

@pytest.mark.parametrize("settings,message", [
    (dict(kind="sphereface"), "kind must be one of"),
    (dict(kind="elastic_arc", std=-0.1), "std must be ≥ 0"),
    (dict(sub_centers=0), "sub_centers must be a positive integer"),
    (dict(sub_centers=2.0), "sub_centers must be an integer"),
    (dict(kind="magface", norm_bounds=(110.0, 10.0)), "norm_bounds must hold lower < upper"),
    (dict(kind="magface", margin_bounds=(0.8, 0.8)), "margin_bounds must hold lower < upper"),
    (dict(kind="curricular", momentum=0.0), r"momentum must lie in \(0, 1\]"),
    (dict(m=math.nan), "m must be finite"),
    (dict(m=4.0), r"m must lie in \[0, π\)"),
    (dict(interclass_threshold=1.5), r"interclass_threshold must lie in \[0, 1\]"),
    (dict(kind="adaface", straight_through=True), "straight_through applies to"),
    (dict(margin=0.5), "unexpected setting 'margin'"),
])
def test_bad_settings_are_refused_by_name(settings, message):
    with pytest.raises((TypeError, ValueError), match=message):
        M.margin(**settings)


def test_defaults_are_the_authors():
    assert (M.margin("adaface").m, M.margin("adaface").momentum) == (0.4, 1.0)
    assert M.margin("elastic_cos").m == 0.35 and M.margin("elastic_arc").m == 0.5
    mf = M.margin("magface")
    assert (mf.norm_bounds, mf.margin_bounds, mf.lambda_g, mf.easy_margin) == \
        ((10.0, 110.0), (0.45, 0.8), 20.0, True)
