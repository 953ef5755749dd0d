"""No host synchronisation inside a call (issue 26; docs/design.md §5), checked on the CPU on the
code path that CUDA tensors take.

:class:`Syncs` records, while a call runs, everything that would make the host wait for a CUDA
stream: a value read back (``aten._local_scalar_dense``: ``.item()``, ``bool()``, ``int()``,
``float()``; ``.tolist()``, ``.cpu()``, ``.numpy()``), a tensor built from host data
(``aten.lift_fresh``: ``torch.tensor``/``as_tensor``, a pageable host-to-device copy on CUDA),
an op whose output shape depends on the data (nonzero, unique, masked_select, boolean-mask
indexing, coalesce, repeat_interleave without an output size), and ``torch.cuda.synchronize``
and the stream and event waits. Triton kernels run under the interpreter, which copies their
arguments through the host: a launch is paused from recording (on a GPU it is a launch), while
the host functions of the Triton ops are recorded (the mode would be off inside a custom op).
Where the code branches on the device type, the test takes the CUDA branch (SparseSGD's row
blocks). Not seen: what runs inside a native C++ op (the dispatcher does not re-enter the
mode; only what the Python side does around it), and a copy between devices (on the CPU it
cannot be told from a copy on one device).

In the async checks mode (:class:`unitsface_kernels.checks`, or a CUDA graph being captured)
every public function, module step and SparseSGD(capturable=True) step records nothing; in the
default eager mode a public function reads back at most once.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import unitsface_kernels as uk
import unitsface_kernels.nn as unn
from helpers import INTERPRETING, make_case
from unitsface_kernels import contract, native, optim
from unitsface_kernels.optim import SparseSGD

_DATA_DEPENDENT = {"nonzero", "argwhere", "_unique", "_unique2", "unique_dim",
                   "unique_consecutive", "masked_select", "_coalesce", "nonzero_numpy"}


class Syncs(TorchDispatchMode):
    """The host synchronisations of the code run while active (see the module docstring)."""

    def __init__(self, monkeypatch):
        super().__init__()
        self.events: list[str] = []
        self.active = False
        self.depth = self.paused = 0
        for name in ("tolist", "cpu", "numpy"):
            self._wrap(monkeypatch, torch.Tensor, name, f"Tensor.{name}")
        for owner, name in ((torch.cuda, "synchronize"), (torch.cuda.Stream, "synchronize"),
                            (torch.cuda.Event, "synchronize"), (torch.cuda.Stream, "query"),
                            (torch.cuda.Event, "query")):
            self._wrap(monkeypatch, owner, name, f"{owner.__name__}.{name}")
        if INTERPRETING:
            from triton.runtime.interpreter import GridExecutor

            launch = GridExecutor.__call__

            def paused_launch(executor, *args, **kwargs):
                self.paused += 1
                try:
                    return launch(executor, *args, **kwargs)
                finally:
                    self.paused -= 1

            monkeypatch.setattr(GridExecutor, "__call__", paused_launch)

    def _wrap(self, monkeypatch, owner, name, label):
        original = getattr(owner, name)

        def recording(*args, **kwargs):
            if self.active and not self.paused:
                self.events.append(label)
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, recording)

    def __enter__(self):  # re-entered inside a Triton op (below): one recording
        if not self.depth:
            self.events, self.active = [], True
        self.depth += 1
        return super().__enter__()

    def __exit__(self, *exc):
        self.depth -= 1
        self.active = self.depth > 0
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if func.namespace == "unitsface" and name.endswith("_triton"):
            # the op's Python host function, recorded too (else the mode is off inside it)
            family, direction = name.split("_")[:2]
            host = contract._triton_kernels(family)[direction == "bwd"]
            with self:
                return host(*args, **kwargs)
        if not self.paused:
            if name == "_local_scalar_dense":
                self.events.append("read-back (item/bool/int/float)")
            elif name == "lift_fresh":
                self.events.append("tensor from host data (torch.tensor)")
            elif name in _DATA_DEPENDENT:
                self.events.append(f"data-dependent shape: {name}")
            elif name == "repeat_interleave" and kwargs.get("output_size") is None:
                self.events.append("data-dependent shape: repeat_interleave")
            elif name in ("index", "index_put", "index_put_") and any(
                    isinstance(i, torch.Tensor) and i.dtype == torch.bool
                    for i in (args[1] if len(args) > 1 else ()) if i is not None):
                self.events.append(f"data-dependent shape: boolean-mask {name}")
        return func(*args, **kwargs)

    @property
    def read_backs(self) -> int:
        return sum(e.startswith(("read-back", "Tensor.tolist", "Tensor.cpu", "Tensor.numpy"))
                   for e in self.events)


@pytest.fixture
def cuda_path(monkeypatch):
    """The CUDA branch where the code branches on the device type."""
    monkeypatch.setattr(optim, "_row_blocks", lambda rows, p: (rows,))


def _backends(family):
    out = ["reference"]
    out.append("triton" if INTERPRETING else pytest.param("triton", marks=pytest.mark.skip(
        reason="needs TRITON_INTERPRET=1 (set by conftest without a GPU)")))
    out.append("native" if native.has_family(family, "cpu") else pytest.param(
        "native", marks=pytest.mark.skip(reason="the native extension is not built")))
    return out


# ----------------------------------------------------------------------------- functions

def _function_calls(backend):
    """(name, call) of every public function: each call does its forward and backward."""
    uss_bank = make_case("uss", 9, 23, 16, mode="bank", seed=1)
    uss_inbatch = make_case("uss", 12, 0, 16, mode="inbatch", seed=2)
    uss_centres = make_case("uss", 9, 23, 16, mode="centres", seed=3, vector_bias=True)
    soft = make_case("softmax", 9, 40, 16, sampled=True, seed=4)
    obj = make_case("unitsface", 9, 40, 16, sampled=True, seed=5)

    def leaf(t):
        return t.detach().clone().requires_grad_()

    def uss(case, **kw):
        def call():
            x, bias = leaf(case["x"]), leaf(case["bias"])
            ref = None if case["ref"] is None else (
                leaf(case["ref"]) if case["mode"] == "centres" else case["ref"])
            ref_labels = (torch.arange(ref.shape[0]) % 5 if case["mode"] == "centres"
                          else None)
            uk.fused_uss_loss(x, case["labels"], bias, ref, ref_labels, case["ref_valid"],
                              backend=backend, **kw).backward()
        return call

    def softmax(sparse_grad):
        def call():
            x, w = leaf(soft["x"]), leaf(soft["centres"])
            uk.fused_margin_softmax_loss(x, w, soft["labels"], index=soft["index"],
                                         sparse_grad=sparse_grad, margin_arc=0.5,
                                         margin_cos=0.0, backend=backend).backward()
        return call

    def unitsface(**kw):
        def call():
            x, w, b = leaf(obj["x"]), leaf(obj["centres"]), leaf(obj["bias"])
            uk.fused_unitsface_loss(x, obj["labels"], w, obj["bank"], b,
                                    bank_valid=obj["bank_valid"], index=obj["index"],
                                    backend=backend, **kw).backward()
        return call

    def bias_init():
        uk.uss_bias_init(uss_bank["x"], uss_bank["labels"], uss_bank["ref"],
                         ref_valid=uss_bank["ref_valid"], backend=backend)

    return [("fused_uss_loss bank pairs", uss(uss_bank)),
            ("fused_uss_loss bank lse", uss(uss_bank, form="lse", official_clamp=True)),
            ("fused_uss_loss in-batch", uss(uss_inbatch)),
            ("fused_uss_loss centres", uss(uss_centres)),
            ("fused_uss_loss number bias", lambda: uk.fused_uss_loss(
                leaf(uss_bank["x"]), uss_bank["labels"], 3.0, uss_bank["ref"],
                backend=backend).backward()),
            ("fused_margin_softmax_loss", softmax(False)),
            ("fused_margin_softmax_loss sparse", softmax(True)),
            ("fused_unitsface_loss pairs", unitsface()),
            ("fused_unitsface_loss lse sparse", unitsface(uss_form="lse", sparse_grad=True)),
            ("uss_bias_init", bias_init)]


def _margin_calls(backend):
    """(name, call) of the public functions with a margin of the family (forward and
    backward), the moving statistics updated in place."""
    from unitsface_kernels import margins as M

    obj = make_case("unitsface", 9, 40, 16, sampled=True, seed=6)
    g = torch.Generator().manual_seed(7)
    sub = torch.randn(40 * 2, 16, generator=g)

    def leaf(t):
        return t.detach().clone().requires_grad_()

    def softmax(mg, centres, **kw):
        def call():
            uk.fused_margin_softmax_loss(leaf(obj["x"]), leaf(centres), obj["labels"],
                                         index=obj["index"], margin=mg, backend=backend,
                                         **kw).backward()
        return call

    def unitsface(mg, **kw):
        def call():
            uk.fused_unitsface_loss(leaf(obj["x"]), obj["labels"], leaf(obj["centres"]),
                                    obj["bank"], leaf(obj["bias"]),
                                    bank_valid=obj["bank_valid"], index=obj["index"],
                                    margin=mg, backend=backend, **kw).backward()
        return call

    return [("curricular K=2 filter sparse", softmax(
                M.margin("curricular", sub_centers=2, interclass_threshold=0.3), sub,
                margin_state=M.MarginState(), sparse_grad=True)),
            ("adaface objective", unitsface(M.margin("adaface"), margin_state=M.MarginState())),
            ("magface objective", unitsface(M.margin("magface"))),
            ("elastic_cos+ generator", softmax(M.margin("elastic_cos", plus=True),
                                               obj["centres"], generator=g)),
            ("elastic_arc drawn", softmax(M.margin("elastic_arc"), obj["centres"],
                                          margin_drawn=torch.full((9,), 0.5)))]


def _other_calls():
    labels = torch.tensor([3, 7, 7, 1])

    def update(bank_dtype):
        def call():
            bank = torch.zeros(10, 16, dtype=bank_dtype)
            valid = torch.zeros(10, dtype=torch.bool)
            uk.bank_update_(bank, valid, torch.randn(4, 16), labels)
        return call

    return [("sample_classes", lambda: uk.sample_classes(labels, 50, 10)),
            ("sample_classes fixed_size", lambda: uk.sample_classes(labels, 50, 10,
                                                                    fixed_size=True)),
            ("bank_update_", update(torch.float32)),
            ("bank_update_ bf16", update(torch.bfloat16))]


@pytest.mark.parametrize("backend", _backends("unitsface"))
def test_functions_async_mode_never_synchronise(backend, cuda_path, monkeypatch):
    calls = _function_calls(backend)
    syncs, found = Syncs(monkeypatch), {}
    with uk.checks("async"):
        for name, call in calls:
            with syncs:
                call()
            if syncs.events:
                found[name] = syncs.events
    assert not found


@pytest.mark.parametrize("backend", _backends("unitsface"))
def test_margin_calls_never_synchronise(backend, cuda_path, monkeypatch):
    """The margin family's calls: nothing in the async mode, one summary read back in the
    eager one (its per-row inputs and moving statistics stay on the device)."""
    syncs, found = Syncs(monkeypatch), {}
    for mode in ("async", "eager"):
        with uk.checks(mode):
            for name, call in _margin_calls(backend):
                with syncs:
                    call()
                others = [e for e in syncs.events
                          if not e.startswith(("read-back", "Tensor.tolist"))]
                if others or syncs.read_backs > (mode == "eager"):
                    found[f"{name} ({mode})"] = syncs.events
    assert not found


@pytest.mark.parametrize("bank_op", ["native", "reference"])
def test_sampling_and_bank_update_async_mode_never_synchronise(bank_op, cuda_path, monkeypatch):
    if bank_op == "reference":  # a build without the op: the eager reference update
        has_op = native.has_op
        monkeypatch.setattr(native, "has_op", lambda name, device: name != "bank_update_"
                            and has_op(name, device))
    elif not native.has_op("bank_update_", "cpu"):
        pytest.skip("the native extension is not built")
    syncs, found = Syncs(monkeypatch), {}
    with uk.checks("async"):
        for name, call in _other_calls():
            with syncs:
                call()
            if syncs.events:
                found[name] = syncs.events
    assert not found


@pytest.mark.parametrize("backend", _backends("unitsface"))
def test_functions_eager_mode_read_back_at_most_once(backend, cuda_path, monkeypatch):
    """The default mode: one summary read back per call (docs/design.md §5), nothing else."""
    syncs, found = Syncs(monkeypatch), {}
    for name, call in _function_calls(backend) + _other_calls():
        with syncs:
            call()
        others = [e for e in syncs.events if not e.startswith(("read-back", "Tensor.tolist"))]
        if syncs.read_backs > 1 or others:
            found[name] = syncs.events
    assert not found


# ----------------------------------------------------------------------------- modules

def _modules(backend):
    """(name, module, takes_uss_flag) of every public module, in training mode with partial FC
    where it has it (and a sparse gradient)."""
    d, c = 16, 40
    kw = dict(backend=backend)
    return [
        ("UniTSFaceHead", unn.UniTSFaceHead(d, c, sample_rate=0.25, sparse_grad=True, **kw)),
        ("UniTSFaceHead lse dense", unn.UniTSFaceHead(d, c, sample_rate=0.25, uss_form="lse",
                                                      **kw)),
        ("PartialFC", unn.PartialFC(d, c, sample_rate=0.25, sparse_grad=True, **kw)),
        ("USSLoss bank", unn.USSLoss(d, c, **kw)),
        ("USSLoss in-batch", unn.USSLoss(mode="inbatch", **kw)),
        ("NormalizedBCE", unn.NormalizedBCE(d, c, **kw)),
        ("UnifiedCrossEntropy", unn.UnifiedCrossEntropy(d, c, **kw)),
        ("SampleToSampleSoftmax", unn.SampleToSampleSoftmax(d, c, **kw)),
        ("SampleToSampleBCE", unn.SampleToSampleBCE(d, c, **kw)),
    ]


def _addresses(module, opt) -> dict:
    """Where every piece of state of a module and its optimizer lives."""
    tensors = dict(module.named_parameters()) | dict(module.named_buffers())
    if opt is not None:
        for i, p in enumerate(opt.param_groups[0]["params"]):
            lazy = p._unitsface_lazy
            tensors |= {f"{i}.{k}": v for k, v in vars(lazy).items() if torch.is_tensor(v)}
            tensors |= {f"{i}.{k}": v for k, v in opt.state[p].items() if torch.is_tensor(v)}
    return {k: v.data_ptr() for k, v in tensors.items()}


def _capturing(monkeypatch):
    """As while torch.cuda.graph captures: the checks choose the async mode themselves."""
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)


@pytest.mark.parametrize("backend", _backends("unitsface"))
def test_module_steps_never_synchronise_when_capturing(backend, cuda_path, monkeypatch):
    """Forward, backward (the deferred bank update runs after it), and a SparseSGD
    (capturable) step of every module, after an eager warm-up step: nothing synchronises, and
    every parameter, buffer and optimizer state stays where it was (updated in place). The
    threshold starts at 0, so its initialisation runs in the recorded step too."""
    g = torch.Generator().manual_seed(0)
    syncs, found = Syncs(monkeypatch), {}
    for name, module in _modules(backend):
        params = list(module.parameters())
        opt = SparseSGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4,
                        capturable=True) if params else None
        batches = [(torch.randn(8, 16, generator=g), torch.randint(0, 10, (8,), generator=g))
                   for _ in range(2)]
        for step, (x, labels) in enumerate(batches):
            before = _addresses(module, opt)
            if hasattr(module, "bias"):
                with torch.no_grad():
                    module.bias.zero_()  # b ≤ 0: the initialisation takes part
            with pytest.MonkeyPatch.context() as capture:
                if step:
                    _capturing(capture)
                with syncs:
                    if opt is not None:
                        opt.zero_grad(set_to_none=True)
                    module(x.requires_grad_(), labels).backward()
                    if opt is not None:
                        opt.step()
            if step and syncs.events:
                found[name] = syncs.events
            if step:  # a replayed graph reads and writes the addresses it was captured with
                assert _addresses(module, opt) == before, name
        if hasattr(module, "bias"):
            assert float(module.bias.detach().mean()) > 0, name  # initialised on the device
    assert not found


EAGER_READ_BACKS = {"UniTSFaceHead": 4, "UniTSFaceHead lse dense": 4, "PartialFC": 2,
                    "USSLoss bank": 3, "USSLoss in-batch": 2, "NormalizedBCE": 1,
                    "UnifiedCrossEntropy": 1, "SampleToSampleSoftmax": 1,
                    "SampleToSampleBCE": 3}
"""Read-backs of a training forward and backward of each module in the default eager mode,
its threshold being initialised (b ≤ 0): the module's label check, partial-FC sampling's, the
b ≤ 0 test and b₀'s finiteness (one each, where the module has them). The loss, b₀ and the
bank update after the backward read nothing: the call checked its batch when it began and
hands it down unchecked (issue 28)."""


@pytest.mark.parametrize("backend", _backends("unitsface"))
def test_module_steps_eager_mode_read_backs(backend, cuda_path, monkeypatch):
    """The eager mode's read-backs per module step stay what they are (a new one fails), and
    nothing else synchronises."""
    g = torch.Generator().manual_seed(0)
    syncs, found = Syncs(monkeypatch), {}
    for name, module in _modules(backend):
        x, labels = torch.randn(8, 16, generator=g), torch.randint(0, 10, (8,), generator=g)
        with syncs:
            module(x.requires_grad_(), labels).backward()
        others = [e for e in syncs.events if not e.startswith(("read-back", "Tensor.tolist"))
                  and not (backend == "triton" and e.startswith("tensor from host data"))]
        if syncs.read_backs != EAGER_READ_BACKS[name] or others:
            found[name] = (syncs.read_backs, syncs.events)
    assert not found


def test_verify_reads_nothing_back(monkeypatch):
    head = unn.UniTSFaceHead(16, 40, backend="reference")
    with torch.no_grad():
        head.bias.fill_(20.0)
    a, b = torch.randn(5, 16), torch.randn(5, 16)
    with Syncs(monkeypatch) as syncs:
        same = head.verify(a, b)
    assert not syncs.events
    assert torch.equal(same, unn.pair_cosine(a, b) > head.threshold)


def test_capturing_chooses_the_async_mode(cuda_path, monkeypatch):
    """While capturing, a bad label is a device assert (RuntimeError on CPU), not a read-back
    and a ValueError."""
    head = unn.PartialFC(16, 40, sample_rate=0.25, backend="reference")
    x, labels = torch.randn(4, 16), torch.tensor([1, 2, 3, 40])
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 40\).*got labels\[3\] = 40"):
        head(x, labels)
    _capturing(monkeypatch)
    with Syncs(monkeypatch) as syncs, pytest.raises(RuntimeError,
                                                    match=r"labels must lie in \[0, 40\)"):
        head(x, labels)
    assert not syncs.events


def test_the_recorder_sees_each_kind_of_sync(monkeypatch):
    """The recorder is not blind: each kind of synchronising call is recorded."""
    t = torch.arange(6)
    syncs = Syncs(monkeypatch)
    calls = [lambda: t.tolist(), lambda: t[0].item(), lambda: bool(t[1]), lambda: t.cpu(),
             lambda: torch.tensor([1.0]), lambda: t.nonzero(), lambda: t.unique(),
             lambda: t[t > 2], lambda: t.repeat_interleave(t),
             lambda: torch.sparse_coo_tensor(t[None, :2], torch.ones(2), (6,)).coalesce()]
    for call in calls:
        with syncs:
            call()
        assert syncs.events, call
    with syncs:
        try:
            torch.cuda.synchronize()
        except (AssertionError, RuntimeError):  # no CUDA here: recorded before it raises
            pass
    assert syncs.events == ["torch.cuda.synchronize"]
    with syncs:
        torch._assert_async(t[1] == 1, "fine")
        torch.topk(t.float(), 3).indices.sort()
    assert not syncs.events


@pytest.mark.parametrize("backend", _backends("unitsface"))
@pytest.mark.parametrize("name", ["UniTSFaceHead", "PartialFC", "USSLoss bank",
                                  "SampleToSampleBCE"])
def test_async_mode_steps_equal_eager_steps(name, backend):
    """The same module trained in the eager and in the async checks mode (threshold chosen on
    the device, fixed-size sampling, the batch never holding more classes than the sample):
    bit for bit the same losses, threshold, bank and weights."""
    runs = []
    for mode in ("eager", "async"):
        torch.manual_seed(0)
        module = dict(_modules(backend))[name]
        opt = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
        g = torch.Generator().manual_seed(1)
        losses = []
        with uk.checks(mode):
            for step in range(4):
                x = torch.randn(8, 16, generator=g)
                labels = torch.randint(0, 10, (8,), generator=g)
                torch.manual_seed(10 + step)  # the same partial-FC draw
                opt.zero_grad()
                loss = module(x, labels)
                loss.backward()
                opt.step()
                losses.append(loss.detach())
        runs.append((torch.stack(losses), module.state_dict()))
    assert torch.equal(runs[0][0], runs[1][0])
    assert runs[0][1].keys() == runs[1][1].keys()
    for key in runs[0][1]:
        assert torch.equal(runs[0][1][key], runs[1][1][key]), key
    if "bias" in runs[0][1]:
        assert float(runs[0][1]["bias"].mean()) > 0  # initialised from the data


# ----------------------------------------------------------------------------- on a GPU

def _cuda_backends():
    native_cuda = native.has_family("unitsface", "cuda")
    return ["triton", "native" if native_cuda else pytest.param(
        "native", marks=pytest.mark.skip(reason="the native extension has no CUDA ops"))]


@pytest.mark.cuda
@pytest.mark.parametrize("backend", _cuda_backends())
def test_captured_step_equals_eager_steps(backend):
    """A UniTSFaceHead + SparseSGD(capturable) step with partial FC captured whole with
    torch.cuda.graph after warm-up and replayed over new batches copied into static inputs:
    the same losses, threshold (initialised inside the graph), bank and weights as the same
    steps run eagerly, bit for bit (the kernels merge their partial results in a fixed
    order), under a learning-rate schedule of a tensor lr. Needs a GPU: to be run there."""
    import copy

    device = torch.device("cuda")
    torch.manual_seed(0)
    heads = [unn.UniTSFaceHead(32, 300, sample_rate=0.1, sparse_grad=True,
                               backend=backend).to(device)]
    heads.append(copy.deepcopy(heads[0]))
    opts = [SparseSGD(h.parameters(), lr=torch.tensor(0.1, dtype=torch.float64, device=device),
                      momentum=0.9, weight_decay=5e-4, capturable=True) for h in heads]
    schedules = [torch.optim.lr_scheduler.StepLR(o, 2, 0.5) for o in opts]
    g = torch.Generator().manual_seed(1)

    def batch():  # 8 identities at most: never more classes than |S| = 30
        ids = torch.randint(0, 300, (8,), generator=g)
        return (torch.randn(16, 32, generator=g).to(device),
                ids[torch.randint(0, 8, (16,), generator=g)].to(device))

    def step(head, opt, x, labels):
        loss = head(x, labels)
        loss.backward()
        opt.step()
        return loss

    warm, data = [batch() for _ in range(3)], [batch() for _ in range(6)]
    with uk.checks("async"):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        for k, (head, opt) in enumerate(zip(heads, opts)):
            with torch.cuda.stream(side if k == 0 else torch.cuda.current_stream()):
                for i, (x, labels) in enumerate(warm):
                    torch.cuda.manual_seed(i)
                    opt.zero_grad(set_to_none=True)
                    step(head, opt, x, labels)
            torch.cuda.current_stream().wait_stream(side)
        with torch.no_grad():  # b ≤ 0 again: the replays initialise it on the device
            for head in heads:
                head.bias.zero_()
        static_x, static_labels = (t.clone() for t in data[0])
        graph = torch.cuda.CUDAGraph()
        opts[0].zero_grad(set_to_none=True)
        with torch.cuda.graph(graph):
            static_loss = step(heads[0], opts[0], static_x, static_labels)
        torch.cuda.manual_seed(99)
        replayed = []
        for x, labels in data:
            static_x.copy_(x)
            static_labels.copy_(labels)
            graph.replay()
            replayed.append(static_loss.detach().clone())
            schedules[0].step()
        torch.cuda.manual_seed(99)
        eager = []
        for x, labels in data:
            opts[1].zero_grad(set_to_none=True)
            eager.append(step(heads[1], opts[1], x, labels).detach())
            schedules[1].step()
    assert torch.equal(torch.stack(replayed), torch.stack(eager))
    for opt in opts:
        opt.catch_up_all()
    for name in ("weight", "bias", "bank", "bank_valid"):
        assert torch.equal(getattr(heads[0], name), getattr(heads[1], name)), name
    assert float(heads[0].bias) > 0  # initialised from the data inside the graph
