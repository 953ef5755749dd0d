"""unitsface_kernels.nn: UniTSFaceHead, PartialFC and USSLoss against the functional API and
the eager reference (bank semantics, the data-dependent b, partial FC, dtype policy, state).

Most tests use backend="reference" (fast); a few small ones run the Triton kernels (in the
interpreter on a CPU), which keep the bank for their backward pass: those check that the
bank update after the loss does not change the gradient.
"""

import pytest
import torch
import torch.nn.functional as F

from unitsface_kernels import (fused_margin_softmax_loss, fused_uss_loss, reference,
                               sample_classes, uss_bias_init)
from unitsface_kernels.nn import PartialFC, UniTSFaceHead, USSLoss, pair_cosine

from helpers import fused_backends, grad_cosine, rel_err

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
        head.bank_valid[[3, 7]] = False
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
    assert head.bank_valid.any()
    head.reset_bank()
    assert not head.bank_valid.any() and torch.count_nonzero(head.bank) == 0


# ----------------------------------------------------------------------------- b

def test_bias_initialised_from_data():
    head = filled_head(backend="reference")
    x, labels = batch()
    want = reference.uss_bias_init(x, labels, head.bank.clone(), None, head.bank_valid.clone(),
                                   scale=64.0)
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
    want = reference.uss_bias_init(x, labels, head.bank[index], index, head.bank_valid[index])
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
    b0 = reference.uss_bias_init(x.detach(), labels)
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
    feat[2] = 0.0  # never written
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
    valid = torch.tensor([True, True, False, True, False, True])
    assert torch.equal(head.bank_valid, valid)
    torch.testing.assert_close(head.bank[valid], F.normalize(feat[valid], dim=1))
    assert torch.count_nonzero(head.bank[~valid]) == 0
    # a training checkpoint {"state_dict": ...} is unwrapped
    again = UniTSFaceHead(D, C).load_official({"epoch": 3, "state_dict": state})
    assert torch.equal(again.bank, head.bank)


def test_load_official_errors():
    head = UniTSFaceHead(8, 6)
    with pytest.raises(KeyError, match="sample_to_class_loss.weight"):
        head.load_official({"sample_to_sample_loss.bias": torch.ones(1)})
    with pytest.raises(ValueError, match="shape"):
        head.load_official({"sample_to_class_loss.weight": torch.zeros(5, 8)})
    with pytest.raises(ValueError, match="unified threshold"):
        head.load_official({"sample_to_class_loss.weight": torch.zeros(6, 8),
                            "sample_to_sample_loss.bias": torch.zeros(1, 6)})


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
