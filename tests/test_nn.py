"""unitsface_kernels.nn: UniTSFaceHead, PartialFC and USSLoss against the functional API and
the eager reference (bank semantics and its deferred update, the data-dependent b, partial
FC, dtype policy, state, checks in the module user's words). The other official heads and
PartialFC.from_insightface: test_recipes.py.

Most tests use backend="reference" (fast); a few small ones run the Triton kernels (in the
interpreter on a CPU), which keep the bank for their backward pass: those check that the
bank update after the loss does not change the gradient.
"""

import pytest
import torch
import torch.nn.functional as F

from unitsface_kernels import (fused_margin_softmax_loss, fused_uss_loss, options, reference,
                               sample_classes, uss_bias_init)
from unitsface_kernels.nn import (NormalizedBCE, PartialFC, SampleToSampleBCE,
                                  SampleToSampleSoftmax, UniTSFaceHead, USSLoss, pair_cosine)

from helpers import LargestAllocation, fused_backends, grad_cosine, rel_err

# The modules run on CPU tensors here: the eager reference, Triton in its interpreter, and the
# native backend once it provides the op family.
BACKENDS = ["reference"] + fused_backends("cpu", "unitsface")
USS_BACKENDS = ["reference"] + fused_backends("cpu", "uss")


def batch(B=12, D=16, C=10, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g).to(dtype)
    labels = torch.randint(0, C, (B,), generator=g)
    return x, labels


def filled_head(C=10, D=16, seed=1, **kw):
    """A head whose bank holds one (random) row per class, all but two valid, b = 0."""
    head = UniTSFaceHead(D, C, **kw)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.weight.copy_(torch.randn(C, D, generator=g))
        head.bank.copy_(F.normalize(torch.randn(C, D, generator=g), dim=1).to(head.bank.dtype))
        head.bank_valid.fill_(True)
        head.bank_valid[[3, C - 3]] = False
    return head


# ----------------------------------------------------------------------------- the bank

def test_bank_update_semantics():
    head = UniTSFaceHead(16, 10, backend="reference")
    x = torch.randn(6, 16) * 3
    labels = torch.tensor([4, 1, 4, 9, 1, 4])
    head(x, labels, with_uss=False)
    valid = torch.zeros(10, dtype=torch.bool)
    valid[[1, 4, 9]] = True
    assert torch.equal(head.bank_valid, valid)
    for c, last in ((4, 5), (1, 4), (9, 3)):  # the last occurrence of a label wins
        torch.testing.assert_close(head.bank[c], F.normalize(x[last], dim=0))
    torch.testing.assert_close(head.bank[valid].norm(dim=1), torch.ones(3))
    assert torch.count_nonzero(head.bank[~valid]) == 0


def test_bank_left_alone_in_eval_mode():
    head = filled_head(backend="reference").eval()
    bank, valid = head.bank.clone(), head.bank_valid.clone()
    x, labels = batch()
    head(x, labels)
    assert torch.equal(head.bank, bank) and torch.equal(head.bank_valid, valid)
    assert head.bias.item() == 0.0  # nor is b initialised outside training


def test_bank_dtype_and_reset():
    head = UniTSFaceHead(16, 10, bank_dtype=torch.bfloat16, backend="reference")
    assert head.bank.dtype == torch.bfloat16 and head.bank_valid.dtype == torch.bool
    x, labels = batch()
    head(x, labels)  # float32 x against a bfloat16 bank: the bank is cast for the call
    last = {int(c): i for i, c in enumerate(labels)}
    want = F.normalize(x[list(last.values())], dim=1).to(torch.bfloat16)
    assert torch.equal(head.bank[list(last)], want)
    assert int(head.bank_valid.sum()) == len(last)
    head.reset_bank()
    assert not head.bank_valid.any() and torch.count_nonzero(head.bank) == 0


# ----------------------------------------------------------------------------- b

def test_bias_initialised_from_data():
    head = filled_head(backend="reference")
    x, labels = batch()
    want = reference.eager_uss_bias_init(x, labels, head.bank.clone(), None,
                                         head.bank_valid.clone(), scale=64.0)
    assert uss_bias_init(x, labels, head.bank, None, head.bank_valid,
                         backend="reference") == pytest.approx(float(want))
    head(x, labels)
    assert head.bias.item() == pytest.approx(float(want), rel=1e-6)
    assert head.threshold == pytest.approx(float(want) / 64.0, rel=1e-6)
    b1 = head.bias.item()
    head(*batch(seed=5))  # b > 0: no second initialisation
    assert head.bias.item() == b1


def test_bias_init_with_partial_fc_uses_the_sampled_classes():
    head = filled_head(C=40, sample_rate=0.25, backend="reference")
    x, labels = batch(C=40)
    torch.manual_seed(3)
    index = sample_classes(labels, 40, 10)
    want = reference.eager_uss_bias_init(x, labels, head.bank[index], index, head.bank_valid[index])
    torch.manual_seed(3)
    head(x, labels)
    assert head.bias.item() == pytest.approx(float(want), rel=1e-6)


def test_bias_waits_for_a_bank():
    head = UniTSFaceHead(16, 10, backend="reference")
    x, labels = batch()
    loss = head(x, labels)  # empty bank: no negative yet, b stays 0, USS adds nothing
    assert head.bias.item() == 0.0 and torch.isfinite(loss)
    want = fused_margin_softmax_loss(x, head.weight, labels, backend="reference")
    torch.testing.assert_close(loss, want)
    head(*batch(seed=1))  # the bank now holds the first batch
    assert head.bias.item() > 0


def test_threshold_and_verify():
    head = UniTSFaceHead(2, 3, backend="reference")
    with torch.no_grad():
        head.bias.fill_(32.0)
    assert head.threshold == 0.5
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0], [2.0, 0.0]])
    b = torch.tensor([[0.6, 0.8], [0.4, 0.9165], [5.0, 0.1]])
    assert head.verify(a, b).tolist() == [True, False, True]
    torch.testing.assert_close(pair_cosine(a, b), F.cosine_similarity(a, b), atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------- the loss

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rate", [1.0, 0.5])
def test_head_matches_reference(backend, rate):
    """The head's loss and gradients are reference.unitsface_loss on the bank *before* the
    update (a fused backend keeps the bank for backward: the update must not change it)."""
    head = filled_head(C=12, sample_rate=rate, backend=backend, uss_form="pairs")
    with torch.no_grad():
        head.bias.fill_(20.0)
    x, labels = batch(B=8, C=12)
    x.requires_grad_(True)
    bank, valid = head.bank.clone(), head.bank_valid.clone()
    w = head.weight.detach().clone().requires_grad_(True)
    b = head.bias.detach().clone().requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    torch.manual_seed(7)
    index = None if rate == 1.0 else sample_classes(labels, 12, 6)
    want = reference.unitsface_loss(x2, labels, w, bank, b, bank_valid=valid, index=index)
    want.backward()

    torch.manual_seed(7)
    loss = head(x, labels)
    assert not torch.equal(head.bank, bank)  # updated after the loss
    loss.backward()
    assert loss.dtype == torch.float32
    assert rel_err(loss.detach(), want.detach()) < 1e-5
    for got, ref in ((x.grad, x2.grad), (head.weight.grad, w.grad)):
        assert grad_cosine(got, ref) > 0.9999 and rel_err(got, ref) < 1e-4
    assert head.bias.grad.item() == pytest.approx(b.grad.item(), rel=1e-4, abs=1e-5)


def test_head_without_uss_is_the_margin_softmax():
    head = filled_head(backend="reference", margin_arc=0.5, margin_cos=0.0)
    x, labels = batch()
    loss = head(x, labels, with_uss=False)
    want = fused_margin_softmax_loss(x, head.weight, labels, margin_arc=0.5, margin_cos=0.0,
                                     backend="reference")
    torch.testing.assert_close(loss, want)
    loss.backward()
    assert head.bias.grad is not None and head.bias.grad.item() == 0.0  # DDP-friendly
    assert head.bias.item() == 0.0  # no USS, no initialisation


def test_head_accepts_column_labels():
    head = filled_head(backend="reference").eval()
    x, labels = batch()
    torch.testing.assert_close(head(x, labels[:, None]), head(x, labels))


def test_autocast_bf16_input():
    """Under autocast the loss runs in x's dtype (bf16): the weight is cast for the call and
    its float32 master gets the gradient; the bank stays float32."""
    torch.manual_seed(0)
    proj = torch.nn.Linear(16, 16)
    head = filled_head(backend="reference")
    with torch.no_grad():
        head.bias.fill_(20.0)
    x, labels = batch()
    ref_head = filled_head(backend="reference")
    with torch.no_grad():
        ref_head.bias.fill_(20.0)
    want = ref_head(proj(x), labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        emb = proj(x)
        assert emb.dtype == torch.bfloat16
        loss = head(emb, labels)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert head.weight.grad.dtype == torch.float32 and proj.weight.grad is not None
    assert head.bank.dtype == torch.float32 and head.bank_valid.any()
    assert rel_err(loss.detach(), want.detach()) < 2e-2


# ----------------------------------------------------------------------------- PartialFC

@pytest.mark.parametrize("backend", BACKENDS)
def test_partial_fc_gradient_only_on_sampled_rows(backend):
    C, D = 40, 16
    torch.manual_seed(0)
    pfc = PartialFC(D, C, sample_rate=0.25, backend=backend)
    assert pfc.weight.shape == (C, D) and pfc.num_local == C and pfc.class_start == 0
    assert 0.005 < pfc.weight.std().item() < 0.015  # normal(0, 0.01)
    x, labels = batch(B=8, D=D, C=C)
    torch.manual_seed(11)
    index = sample_classes(labels, C, 10)
    torch.manual_seed(11)
    loss = pfc(x, labels)
    want = reference.margin_softmax_loss(x, pfc.weight, labels, index=index)
    assert rel_err(loss.detach(), want.detach()) < 1e-5
    loss.backward()
    outside = torch.ones(C, dtype=torch.bool)
    outside[index] = False
    assert torch.count_nonzero(pfc.weight.grad[outside]) == 0
    assert (pfc.weight.grad[index].norm(dim=1) > 0).all()


def test_partial_fc_eval_uses_all_classes():
    pfc = PartialFC(16, 40, sample_rate=0.1, backend="reference").eval()
    x, labels = batch(C=40)
    torch.testing.assert_close(
        pfc(x, labels), fused_margin_softmax_loss(x, pfc.weight, labels, backend="reference"))


# ----------------------------------------------------------------------------- USSLoss

@pytest.mark.parametrize("form,clamp", [("pairs", False), ("lse", False), ("pairs", True)])
def test_uss_loss_bank_mode_matches_functional(form, clamp):
    C, D = 10, 16
    mod = USSLoss(D, C, margin=0.2, form=form, official_clamp=clamp, backend="reference")
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        mod.bank.copy_(F.normalize(torch.randn(C, D, generator=g), dim=1))
        mod.bank_valid[:7] = True
    bank, valid = mod.bank.clone(), mod.bank_valid.clone()
    x, labels = batch(C=C)
    b0 = uss_bias_init(x, labels, bank, None, valid, backend="reference")
    loss = mod(x, labels)
    assert mod.bias.item() == pytest.approx(b0.item(), rel=1e-6)
    want = fused_uss_loss(x, labels, b0.reshape(1), bank, None, valid, margin=0.2, form=form,
                          official_clamp=clamp, backend="reference")
    torch.testing.assert_close(loss, want)
    assert mod.bank_valid[labels].all()  # updated after the loss
    loss.backward()
    assert mod.bias.grad is not None


@pytest.mark.parametrize("backend", USS_BACKENDS)
def test_uss_loss_inbatch_matches_functional(backend):
    mod = USSLoss(mode="inbatch", backend=backend)
    assert not hasattr(mod, "bank")
    x, labels = batch(B=10, C=4)
    x.requires_grad_(True)
    b0 = reference.eager_uss_bias_init(x.detach(), labels)
    loss = mod(x, labels)
    assert mod.bias.item() == pytest.approx(b0.item(), rel=1e-5)
    x2 = x.detach().clone().requires_grad_(True)
    b2 = b0.reshape(1).clone().requires_grad_(True)
    want = reference.uss_loss(x2, labels, b2)
    assert rel_err(loss.detach(), want.detach()) < 1e-5
    loss.backward()
    want.backward()
    assert grad_cosine(x.grad, x2.grad) > 0.9999
    assert mod.bias.grad.item() == pytest.approx(b2.grad.item(), rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("backend", fused_backends("cpu", "uss"))
def test_uss_loss_bank_gradient_unchanged_by_update(backend):
    mod = USSLoss(16, 10, backend=backend)
    with torch.no_grad():
        mod.bank.copy_(F.normalize(torch.randn(10, 16), dim=1))
        mod.bank_valid.fill_(True)
        mod.bias.fill_(20.0)
    bank = mod.bank.clone()
    x, labels = batch()
    x.requires_grad_(True)
    mod(x, labels).backward()
    x2 = x.detach().clone().requires_grad_(True)
    reference.uss_loss(x2, labels, torch.tensor([20.0]), bank).backward()
    assert grad_cosine(x.grad, x2.grad) > 0.9999


def test_bad_arguments():
    with pytest.raises(ValueError, match="sample_rate"):
        UniTSFaceHead(16, 10, sample_rate=0.0)
    with pytest.raises(ValueError, match="embedding_size"):
        USSLoss(mode="bank")
    with pytest.raises(ValueError, match="mode"):
        USSLoss(16, 10, mode="batch")
    with pytest.raises(TypeError, match="bank_dtype"):
        UniTSFaceHead(16, 10, bank_dtype=torch.int32)
    with pytest.raises(ValueError, match="backend"):
        PartialFC(16, 10, backend="cuda")
    with pytest.raises(ValueError, match="uss_form"):
        UniTSFaceHead(16, 10, uss_form="bce")


# ----------------------------------------------------------------------------- state

def test_state_dict_round_trip():
    head = filled_head(backend="reference")
    head(*batch())
    state = head.state_dict()
    assert set(state) == {"weight", "bias", "bank", "bank_valid"}
    other = UniTSFaceHead(16, 10, backend="reference")
    other.load_state_dict(state)
    for name in state:
        assert torch.equal(getattr(other, name), getattr(head, name)), name
    assert other.threshold == head.threshold
    head.eval(), other.eval()
    x, labels = batch(seed=4)
    torch.testing.assert_close(other(x, labels), head(x, labels))


@pytest.mark.parametrize("prefix", ["", "module.", None])
def test_load_official(prefix):
    C, D = 6, 8
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(C, D, generator=g)
    feat = 5 * torch.randn(C, D, generator=g)
    feat[2] = 0.0  # never written: a zero row, cos 0 as in the official head
    feat[4, 1] = float("nan")  # uninitialised memory
    bias = torch.tensor([23.5])
    if prefix is None:
        state = {"weight": weight, "feat_mem": feat, "bias": bias}
    else:
        state = {f"{prefix}sample_to_class_loss.weight": weight,
                 f"{prefix}sample_to_sample_loss.feat_mem": feat,
                 f"{prefix}sample_to_sample_loss.bias": bias,
                 f"{prefix}bn5.bias": torch.zeros(D)}
    head = UniTSFaceHead(D, C, backend="reference").load_official(state)
    assert torch.equal(head.weight.detach(), weight)
    assert head.bias.item() == 23.5 and head.threshold == 23.5 / 64
    # the bank's one rule (bank_update_): the row of each feature, valid when finite
    valid = torch.tensor([True, True, True, True, False, True])
    assert torch.equal(head.bank_valid, valid)
    torch.testing.assert_close(head.bank[valid], reference.bank_rows(feat[valid]))
    assert torch.count_nonzero(head.bank[2]) == 0
    # a training checkpoint {"state_dict": ...} is unwrapped
    again = UniTSFaceHead(D, C).load_official({"epoch": 3, "state_dict": state})
    torch.testing.assert_close(again.bank, head.bank, rtol=0, atol=0, equal_nan=True)


def test_bank_rule_matches_the_official_raw_feature_bank():
    """The official head stores raw features and normalises them when it reads them; our bank
    stores the row of each feature so that the loss reads the same F.normalize(feature), also
    below the eps (a tiny feature stays below it: its cosines are x̂·f/1e-5, not x̂·f̂)."""
    feat = torch.tensor([[3e-6, 4e-6], [3.0, 4.0], [0.0, 0.0]])
    head = USSLoss(2, 3, backend="reference").load_official({"feat_mem": feat,
                                                              "bias": torch.tensor([1.0])})
    x = torch.tensor([[0.6, 0.8]])
    official = F.linear(F.normalize(x, eps=1e-5), F.normalize(feat, eps=1e-5))
    ours = F.linear(F.normalize(x, eps=1e-5), F.normalize(head.bank, eps=1e-5))
    torch.testing.assert_close(ours, official)
    assert official[0, 0].item() == pytest.approx(0.5, rel=1e-6)  # not 1: below the eps
    assert head.bank_valid.all()


@pytest.mark.parametrize("state,error,match", [
    ({"sample_to_sample_loss.bias": torch.ones(1)}, KeyError, "sample_to_class_loss.weight"),
    ({"sample_to_class_loss.weight": torch.zeros(5, 8)}, ValueError, "shape"),
    ({"sample_to_class_loss.weight": torch.zeros(6, 8),
      "sample_to_sample_loss.bias": torch.zeros(1, 6)}, ValueError, "one unified threshold"),
    ({"weight": [[0.0] * 8] * 6}, TypeError, r"state_dict\['weight'\] must be a tensor, got list"),
    ({"weight": torch.zeros(6, 8), "bias": 1.5}, TypeError, "must be a tensor, got float"),
    (None, TypeError, "state_dict must be a mapping"),
    (torch.zeros(6, 8), TypeError, "state_dict must be a mapping"),
    ({"weight": torch.zeros(6, 8), "feat_mem": torch.zeros(6, 8, device="meta")}, ValueError,
     "meta device"),
    ({"weight": torch.zeros(6, 8, dtype=torch.long)}, TypeError, "floating"),
])
def test_load_official_errors_change_nothing(state, error, match):
    head = filled_head(C=6, D=8, backend="reference")
    with torch.no_grad():
        head.bias.fill_(3.0)
    before = {k: v.clone() for k, v in head.state_dict().items()}
    with pytest.raises(error, match=match):
        head.load_official(state)
    for k, v in head.state_dict().items():
        assert torch.equal(v, before[k]), k


# ----------------------------------------------------------------------------- deferred bank update

def _head_reference(head, x, labels, bank, valid, bias):
    """Loss and (x, W, b) gradients of the head's formula on a given bank (float64)."""
    x2 = x.detach().double().requires_grad_(True)
    w = head.weight.detach().double().requires_grad_(True)
    b = bias.detach().double().requires_grad_(True)
    loss = reference.unitsface_loss(x2, labels, w, bank.double(), b, bank_valid=valid,
                                    official_clamp=True)
    return (loss,) + torch.autograd.grad(loss, [x2, w, b])


@pytest.mark.parametrize("backend", BACKENDS)
def test_bank_update_waits_for_the_backward_without_a_copy(backend):
    """The loss reads the bank in place: after the forward the stored bank still holds the old
    rows (no copy was made), the update lands right after the backward, and the gradients
    are those of the old bank."""
    head = filled_head(backend=backend)
    with torch.no_grad():
        head.bias.fill_(20.0)
    bank0, valid0 = head.bank.clone(), head.bank_valid.clone()
    storage = head._buffers["bank"].data_ptr()
    x, labels = batch()
    x.requires_grad_(True)
    loss = head(x, labels)
    assert torch.equal(head._buffers["bank"], bank0)  # not yet: the backward needs these rows
    loss.backward()
    assert head._pending is None and head._buffers["bank"].data_ptr() == storage
    want = reference.bank_rows(x.detach())
    for c in labels.unique():
        last = int((labels == c).nonzero().max())
        torch.testing.assert_close(head._buffers["bank"][c], want[last])
    ref_loss, gx, gw, gb = _head_reference(head, x, labels, bank0, valid0, head.bias)
    assert rel_err(loss.detach(), ref_loss) < 1e-5
    assert rel_err(x.grad, gx) < 1e-4 and rel_err(head.weight.grad, gw) < 1e-4


def test_outside_reads_see_the_update_and_the_backward_keeps_the_old_rows():
    head = filled_head(backend="reference")
    with torch.no_grad():
        head.bias.fill_(20.0)
    bank0, valid0 = head.bank.clone(), head.bank_valid.clone()
    x, labels = batch()
    x.requires_grad_(True)
    loss = head(x, labels)
    assert head.bank_valid[labels].all() and not torch.equal(head.bank, bank0)  # flushed
    assert "bank" in head.state_dict()
    loss.backward()  # its graph kept the old rows (the module continued with a copy)
    ref_loss, gx, _, _ = _head_reference(head, x, labels, bank0, valid0, head.bias)
    assert rel_err(x.grad, gx) < 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_forwards_before_one_backward(backend):
    """The second call reads the bank updated by the first, and the first call's backward
    still uses the rows it read."""
    head = filled_head(backend=backend)
    with torch.no_grad():
        head.bias.fill_(20.0)
    bank0, valid0 = head.bank.clone(), head.bank_valid.clone()
    (x1, y1), (x2, y2) = batch(seed=1), batch(seed=2)
    x1.requires_grad_(True), x2.requires_grad_(True)
    total = head(x1, y1) + head(x2, y2)
    total.backward()
    bank1, valid1 = bank0.clone(), valid0.clone()
    reference.eager_bank_update_(bank1, valid1, x1.detach(), y1)
    _, g1, _, _ = _head_reference(head, x1, y1, bank0, valid0, head.bias)
    _, g2, _, _ = _head_reference(head, x2, y2, bank1, valid1, head.bias)
    assert rel_err(x1.grad, g1) < 1e-4 and rel_err(x2.grad, g2) < 1e-4
    reference.eager_bank_update_(bank1, valid1, x2.detach(), y2)
    torch.testing.assert_close(head.bank, bank1)


def test_a_forward_without_backward_is_applied_in_place_by_the_next_call():
    head = filled_head(backend="reference")
    storage = head._buffers["bank"].data_ptr()
    x, labels = batch()
    head(x, labels)  # the loss is dropped: its graph is gone
    head(*batch(seed=3))
    assert head._buffers["bank"].data_ptr() == storage
    assert head.bank_valid[labels].all()


def test_no_bank_sized_copy_in_a_training_step():
    """Partial FC at 1M-class scale in miniature: nothing of the bank's size is allocated in
    forward and backward (a bf16 bank: the fp32 weight's gradient is another matter)."""
    C, D = 4096, 16
    head = UniTSFaceHead(D, C, sample_rate=0.05, bank_dtype=torch.bfloat16,
                         backend="reference")
    x, labels = batch(B=8, D=D, C=C)
    head(x, labels)
    x2, labels2 = batch(B=8, D=D, C=C, seed=4)
    x2 = x2.to(torch.bfloat16).requires_grad_(True)
    with LargestAllocation(dtype=torch.bfloat16) as seen:
        loss = head(x2, labels2)
        loss.backward()
        head(*batch(B=8, D=D, C=C, seed=5))
    assert seen.largest < C * D // 4, (seen.largest, seen.where)


# ----------------------------------------------------------------------------- checks

def test_errors_speak_the_module_users_words_and_change_nothing():
    head = filled_head(C=6, D=8, backend="reference")
    x, labels = batch(B=4, D=8, C=6)
    before = {k: v.clone() for k, v in head.state_dict().items()}
    with pytest.raises(ValueError, match="x has embedding size 5 but this UniTSFaceHead has "
                                         "embedding_size=8"):
        head(torch.randn(4, 5), labels)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 6\).*num_classes=6.*"
                                         r"got labels\[3\] = 6"):
        head(x, torch.tensor([0, 1, 1, 6]))
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        head(x, labels.float())
    with pytest.raises(TypeError, match="with_uss must be a bool"):
        head(x, labels, with_uss="no")
    for k, v in head.state_dict().items():
        assert torch.equal(v, before[k]), k
    with pytest.raises(ValueError, match="embeddings has embedding size 5"):
        PartialFC(8, 6)(torch.randn(4, 5), labels)


def test_any_integer_label_dtype():
    head = filled_head(C=6, D=8, backend="reference")
    x, labels = batch(B=4, D=8, C=6)
    twin = filled_head(C=6, D=8, backend="reference")
    for dtype in (torch.int16, torch.uint8, torch.int32):
        torch.testing.assert_close(head(x, labels.to(dtype)), twin(x, labels))


@pytest.mark.parametrize("cls,kw,match", [
    (UniTSFaceHead, dict(margin_arc=4.0), r"margin_arc must lie in \[0, π\)"),
    (UniTSFaceHead, dict(uss_weight=float("nan")), "uss_weight must be finite"),
    (UniTSFaceHead, dict(scale=float("inf")), "scale must be finite"),
    (UniTSFaceHead, dict(official_clamp=None), "official_clamp must be a bool"),
    (UniTSFaceHead, dict(sample_rate=1.5), "sample_rate"),
    (PartialFC, dict(arcface_grad="approx"), "arcface_grad must be one of"),
    (PartialFC, dict(margin_cos=float("nan")), "margin_cos must be finite"),
    (USSLoss, dict(margin=float("inf")), "margin must be finite"),
    (USSLoss, dict(form="bce"), "form must be one of"),
    (PartialFC, dict(eps=0.0), r"eps must lie in \(0, 1\]"),
    (UniTSFaceHead, dict(eps=1e-3), "eps must be ≤ 1e-05 for a head with a memory bank"),
    (USSLoss, dict(eps=1e-3), "eps must be ≤ 1e-05 for a head with a memory bank"),
])
def test_settings_are_checked_when_built(cls, kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        cls(8, 6, **kw)


def test_a_module_holds_its_settings_object():
    """The settings are built and checked once, held in ``options`` (what every call hands
    down to the kernels) and shown read-only in the constructor's words."""
    head = UniTSFaceHead(8, 6, margin_arc=0.3, margin_cos=0.0, arcface_grad="straight_through",
                         uss_form="lse", eps=1e-7, backend="reference")
    o = head.options
    assert isinstance(o, options.UnitsfaceOptions)
    assert (o.margin_arc, o.arcface_straight_through, o.uss_lse, o.eps) == (0.3, True, True, 1e-7)
    assert (head.arcface_grad, head.uss_form, head.eps, head.scale) == ("straight_through", "lse",
                                                                        1e-7, 64.0)
    assert "eps=1e-07" in repr(head) and "arcface_grad='straight_through'" in repr(head)
    with pytest.raises(AttributeError):
        head.scale = 32.0
    uss = USSLoss(mode="inbatch", form="lse", eps=1e-9)
    assert uss.options == options.uss_options(scale=64.0, margin=0.1, form="lse",
                                              official_clamp=True, in_batch=True, eps=1e-9)
    assert (uss.form, uss.eps) == ("lse", 1e-9)
    assert PartialFC(8, 6).options == options.softmax_options(
        scale=64.0, margin_arc=0.0, margin_cos=0.4, arcface_grad="exact", easy_margin=False)


def _filled(module, C=10, D=16, seed=1):
    """`module` with random weight/bank (all valid) where it has them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in ("weight", "bank"):
            if hasattr(module, name):
                getattr(module, name).copy_(torch.randn(C, D, generator=g))
        if hasattr(module, "bank_valid"):
            module.bank_valid.fill_(True)
    return module


MODULES = {
    "head": lambda backend: filled_head(sample_rate=0.5, backend=backend),
    "partial_fc": lambda backend: _filled(PartialFC(16, 10, 0.5, backend=backend)),
    "uss_bank": lambda backend: _filled(USSLoss(16, 10, backend=backend)),
    "uss_inbatch": lambda backend: USSLoss(mode="inbatch", embedding_size=16, backend=backend),
    "normalized_bce": lambda backend: _filled(NormalizedBCE(16, 10, backend=backend)),
    "s2s_softmax": lambda backend: _filled(SampleToSampleSoftmax(16, 10, backend=backend)),
    "s2s_bce": lambda backend: _filled(SampleToSampleBCE(16, 10, backend=backend)),
}


@pytest.mark.parametrize("backend", ["reference"] + fused_backends("cpu", "unitsface"))
@pytest.mark.parametrize("kind", list(MODULES))
def test_a_module_call_checks_once_and_resolves_once(kind, backend, monkeypatch):
    """One training step of a module (partial FC, b₀ from the data, the loss, backward, the
    deferred bank update) checks its batch once, reads values back for its checks once, and
    resolves its backend once: the walk down to the kernels never comes back to the argument
    checks of the functions' layer."""
    from unitsface_kernels import backends, validation

    family = "unitsface" if kind in ("head", "partial_fc", "s2s_softmax") else "uss"
    if backend != "reference" and backend not in fused_backends("cpu", family):
        pytest.skip(f"no {backend} {family} ops here")
    module = MODULES[kind](backend)
    x, labels = batch()
    x.requires_grad_()
    calls = dict.fromkeys(["embeddings", "labels", "reference_rows", "bias", "mask",
                           "index_tensor", "run", "resolve"], 0)

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    for name in ("embeddings", "labels", "reference_rows", "bias", "mask", "index_tensor"):
        monkeypatch.setattr(validation, name, counted(name, getattr(validation, name)))
    monkeypatch.setattr(validation.ValueChecks, "run",
                        counted("run", validation.ValueChecks.run))
    monkeypatch.setattr(backends, "resolve", counted("resolve", backends.resolve))
    bias = module.bias.detach().clone() if hasattr(module, "bias") else None
    module(x, labels).backward()
    if kind in ("head", "uss_bank", "uss_inbatch", "s2s_bce"):
        assert not torch.equal(module.bias.detach(), bias)  # b₀ was taken from the data
    # one read-back for the batch's labels (none in-batch: no class ids), and partial FC's
    # own for its sample size (sampling counts the batch's classes: a data-dependent size)
    values = {"uss_inbatch": 0, "head": 2, "partial_fc": 2}.get(kind, 1)
    assert calls == dict(embeddings=1, labels=1, reference_rows=0, bias=0, mask=0,
                         index_tensor=0, run=values, resolve=1)


def test_no_import_circle():
    """The package's modules import each other without a circle (lazy imports inside
    functions included): the layers only go down."""
    import ast
    import pathlib

    import unitsface_kernels

    root = pathlib.Path(unitsface_kernels.__file__).parent
    names, trees = {}, {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        names[name], trees[name] = path, ast.parse(path.read_text())

    def bound(package):
        """The names a package's __init__ defines itself (not submodules)."""
        out = set()
        for node in trees[package].body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                out |= {(a.asname or a.name).split(".")[0] for a in node.names}
            elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                out.add(node.name)
            elif isinstance(node, ast.Assign):
                out |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        return out

    def targets(module, imported):
        """`from module import imported`: the submodule when it is one (an extension such
        as _C, absent here, is a leaf), else the module."""
        if f"{module}.{imported}" in names:
            return {f"{module}.{imported}"}
        if names[module].name == "__init__.py" and imported not in bound(module):
            return set()
        return {module}

    graph = {}
    for name, path in names.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        edges = set()
        for node in ast.walk(trees[name]):
            if isinstance(node, ast.ImportFrom):
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = ((f"{base}.{node.module}" if node.module else base) if node.level
                          else node.module)
                if module in names:
                    for alias in node.names:
                        edges |= targets(module, alias.name)
            elif isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name in names}
        graph[name] = edges - {name}

    state = {}

    def visit(name, path):
        state[name] = "open"
        for nxt in sorted(graph.get(name, ())):
            if state.get(nxt) == "open":
                cycle = path[path.index(nxt):] + [nxt]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert len(graph) > 20 and "unitsface_kernels.nn.calls" in graph


def test_sizes_are_integers():
    with pytest.raises(TypeError, match="num_classes must be an integer, got float 6.5"):
        UniTSFaceHead(8, 6.5)
    with pytest.raises(TypeError, match="embedding_size must be an integer"):
        PartialFC(8.0, 6)


def test_verify_takes_lists():
    head = UniTSFaceHead(2, 3, backend="reference")
    with torch.no_grad():
        head.bias.fill_(32.0)
    assert head.verify([[1.0, 0.0]], [[0.6, 0.8]]).tolist() == [True]
    with pytest.raises(ValueError, match="a has embedding size 3 but this UniTSFaceHead"):
        head.verify([[1.0, 0.0, 0.0]], [[0.6, 0.8]])


def test_modules_are_the_official_heads_by_default():
    """official_clamp=True in the modules (the functions keep False)."""
    head = filled_head(backend="reference")
    with torch.no_grad():
        head.bias.fill_(20.0)
        head.bank[0] = -F.normalize(torch.ones(16), dim=0)
    x, labels = batch()
    x[:3] = torch.ones(16)
    labels[:3] = 0
    bank, valid = head.bank.clone(), head.bank_valid.clone()
    clamped = reference.unitsface_loss(x, labels, head.weight.detach(), bank, head.bias.detach(),
                                       bank_valid=valid, official_clamp=True)
    plain = reference.unitsface_loss(x, labels, head.weight.detach(), bank, head.bias.detach(),
                                     bank_valid=valid)
    assert plain - clamped > 1.0
    torch.testing.assert_close(head(x, labels), clamped)


# ----------------------------------------------------------------------------- training

def test_short_training_run_loss_falls():
    torch.manual_seed(0)
    C, D, per = 20, 32, 8
    centres = torch.randn(C, 24)
    mix = torch.randn(24, 48) / 24 ** 0.5
    labels = torch.arange(C).repeat_interleave(per)
    data = torch.tanh((centres[labels] + 0.3 * torch.randn(len(labels), 24)) @ mix)
    net = torch.nn.Sequential(torch.nn.Linear(48, 64), torch.nn.PReLU(), torch.nn.Linear(64, D))
    head = UniTSFaceHead(D, C, sample_rate=0.5, backend="reference")
    opt = torch.optim.SGD(list(net.parameters()) + list(head.parameters()), lr=0.05,
                          momentum=0.9)
    losses = []
    for epoch in range(6):
        for idx in torch.randperm(len(labels)).split(40):
            loss = head(net(data[idx]), labels[idx], with_uss=epoch > 0)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(net.parameters()) + list(head.parameters()), 10)
            opt.step()
            if epoch > 0:
                losses.append(loss.item())
    assert head.bank_valid.all() and head.threshold > 0
    assert sum(losses[-4:]) < 0.5 * sum(losses[:4]), losses


def test_torch_compile_with_partial_fc():
    """Partial-FC sampling stays outside the graph (a clean break), so a compiled head with
    sample_rate < 1 draws the same classes as the eager one under the same seed."""
    head = filled_head(C=40, sample_rate=0.25, backend="reference")
    with torch.no_grad():
        head.bias.fill_(20.0)
    twin = filled_head(C=40, sample_rate=0.25, backend="reference")
    twin.load_state_dict(head.state_dict())
    x, labels = batch(C=40)
    compiled = torch.compile(head, backend="eager")
    torch.manual_seed(9)
    got = compiled(x, labels)
    torch.manual_seed(9)
    torch.testing.assert_close(got, twin(x, labels))
    got.backward()
    assert head.weight.grad is not None


def test_torch_compile():
    head = filled_head(backend="reference")
    with torch.no_grad():
        head.bias.fill_(20.0)
    x, labels = batch()
    twin = filled_head(backend="reference")
    twin.load_state_dict(head.state_dict())
    compiled = torch.compile(head, backend="eager")
    loss = compiled(x, labels)
    torch.testing.assert_close(loss, twin(x, labels))
    loss.backward()
    assert head.weight.grad is not None
    assert torch.equal(head.bank, twin.bank)


# ----------------------------------------------------------------------------- CUDA

@pytest.mark.cuda
@pytest.mark.parametrize("backend", fused_backends("cuda", "unitsface"))
@pytest.mark.parametrize("rate", [1.0, 0.5])
def test_cuda_head_matches_reference(backend, rate):
    """The head on a GPU: loss and gradients equal the float64 reference on the bank before
    the update, and the bank is updated afterwards."""
    C, D = 300, 64
    head = filled_head(C=C, D=D, sample_rate=rate, backend=backend).cuda()
    with torch.no_grad():
        head.bias.fill_(20.0)
    x, labels = batch(B=64, D=D, C=C)
    x, labels = x.cuda().requires_grad_(True), labels.cuda()
    bank, valid = head.bank.clone(), head.bank_valid.clone()
    w = head.weight.detach().double().requires_grad_(True)
    b = head.bias.detach().double().requires_grad_(True)
    x2 = x.detach().double().requires_grad_(True)
    torch.manual_seed(7)
    index = None if rate == 1.0 else sample_classes(labels, C, C // 2)
    want = reference.unitsface_loss(x2, labels, w, bank.double(), b, bank_valid=valid,
                                    index=index)
    want.backward()
    torch.manual_seed(7)
    loss = head(x, labels)
    loss.backward()
    assert not torch.equal(head.bank, bank)
    assert rel_err(loss.detach(), want.detach()) < 1e-5
    for got, ref in ((x.grad, x2.grad), (head.weight.grad, w.grad)):
        assert grad_cosine(got, ref) > 0.9999


@pytest.mark.cuda
@pytest.mark.parametrize("backend", fused_backends("cuda", "unitsface"))
def test_cuda_autocast_bf16_training_step(backend):
    torch.manual_seed(0)
    proj = torch.nn.Linear(64, 64).cuda()
    head = filled_head(C=300, D=64, backend=backend, sample_rate=0.5).cuda()
    x, labels = batch(B=64, D=64, C=300)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = head(proj(x.cuda()), labels.cuda())
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert head.weight.grad.dtype == torch.float32 and torch.isfinite(head.weight.grad).all()
    assert head.bias.item() > 0  # initialised from the data on the first USS call
