"""sar_rs.torch: autograd Functions over the Rust kernels (gradcheck in f64), SarLoss against
reference(), buffers in state_dict, CUDA refused. Skipped, with the reason, without torch."""
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed: sar_rs.torch tests skipped")
import sar_rs  # noqa: E402
import sar_rs.torch as st  # noqa: E402
from sar_rs.testing import make_case  # noqa: E402


def _case(kind="random", seed=0):
    inputs, opts = make_case(kind, np.random.default_rng(seed))
    return {k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()}, opts


def test_gradcheck_anchor_ce_both_weight_modes():
    torch.manual_seed(0)
    z = torch.randn(4, 4, dtype=torch.float64)
    z[0, 0] += 6  # anchor 0 confident (outside U), the others uncertain
    z.requires_grad_(True)
    # Attached weights: the gradient is the true derivative of L_aux.
    assert torch.autograd.gradcheck(lambda x: st.anchor_ce(x, 0.9, "attached"), (z,), eps=1e-6, atol=1e-7)
    # Detached weights: the derivative of sum_c w_c * nll_c with w held constant, so gradcheck
    # runs on that function with w taken from the kernel.
    w = torch.from_numpy(sar_rs.anchor_ce(z.detach().numpy())["weights"])
    frozen = lambda x: (w * -torch.log_softmax(x, dim=1).diagonal()).sum()  # noqa: E731
    assert torch.autograd.gradcheck(frozen, (z,), eps=1e-6, atol=1e-7)
    (g_kernel,) = torch.autograd.grad(st.anchor_ce(z, 0.9, "detached"), z)
    (g_frozen,) = torch.autograd.grad(frozen(z), z)
    torch.testing.assert_close(g_kernel, g_frozen, rtol=1e-12, atol=1e-14)
    assert st.anchor_ce(z, 0.9, "detached").item() == st.anchor_ce(z, 0.9, "attached").item()


def test_gradcheck_p2a_nchw_and_rows():
    torch.manual_seed(1)
    f = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 3, (2, 7, 7))
    y[0, 0, :] = 255
    a = torch.randn(3, 3, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: st.p2a(x, y, a), (f,))
    r = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: st.p2a(x, torch.tensor([0, 1, 2, 255, 1]), a), (r,))


def test_gradcheck_whole_step():
    inputs, opts = _case("random", 2)
    z = inputs["anchor_logits"].clone().requires_grad_(True)
    f = inputs["features"].clone().requires_grad_(True)
    c = z.shape[0]

    def fn(z, f):
        return st.sar_step(z, f, inputs["embedded_anchors"], inputs["semantic_anchors"],
                           torch.ones(c, dtype=torch.bool), inputs["labels"], opts)[0]

    assert torch.autograd.gradcheck(fn, (z, f), eps=1e-6, atol=1e-7)


def test_sar_loss_equals_reference_and_keeps_buffers():
    inputs, opts = _case("random", 3)
    c, d = inputs["embedded_anchors"].shape
    loss_fn = st.SarLoss(c, d, dtype=torch.float64, **opts)
    loss_fn.semantic_anchors.copy_(inputs["semantic_anchors"])
    loss_fn.initialized.fill_(True)
    z = inputs["anchor_logits"].clone().requires_grad_(True)
    f = inputs["features"].clone().requires_grad_(True)
    loss = loss_fn(f, inputs["labels"], inputs["embedded_anchors"], z)
    loss.backward()
    ref = sar_rs.reference({k: v.numpy() for k, v in inputs.items()}, opts)
    o = sar_rs.options(opts)
    assert loss.item() == float(ref["loss_sar"])
    np.testing.assert_array_equal(z.grad.numpy(), o["lambda_aux"] * ref["grad_anchor_logits"])
    np.testing.assert_array_equal(f.grad.numpy(), o["lambda_p2a"] * ref["grad_features"])
    np.testing.assert_array_equal(loss_fn.semantic_anchors.numpy(), ref["semantic_anchors"])
    sd = loss_fn.state_dict()
    assert set(sd) == {"semantic_anchors", "initialized", "gate_passed"}
    assert bool(sd["gate_passed"]) == bool(ref["gate"])
    # eval mode leaves the buffers alone
    loss_fn.eval()
    before = loss_fn.semantic_anchors.clone()
    loss_fn(f, inputs["labels"], inputs["embedded_anchors"] * 3, z)
    assert torch.equal(before, loss_fn.semantic_anchors)


def test_sar_loss_trains_a_tiny_model_in_float32():
    torch.manual_seed(0)
    c, d = 3, 8
    anchors = torch.from_numpy(sar_rs.generate_anchors("normal", 0, c, d, np.float32))
    embed = torch.nn.Sequential(torch.nn.Linear(d, d), torch.nn.ReLU())
    classifier = torch.nn.Linear(d, c)
    sar = st.SarLoss(c, d)
    opt = torch.optim.SGD(list(embed.parameters()) + list(classifier.parameters()), lr=0.5)
    for _ in range(30):
        feats = torch.randn(16, d)
        y = torch.randint(0, c, (16,))
        e = embed(anchors)
        loss = torch.nn.functional.cross_entropy(classifier(feats), y) + sar(feats, y, e, classifier(e))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert sar.initialized.all(), "the anchors separate and the gate passes within 30 steps"


def test_cuda_tensors_are_refused_clearly():
    if not torch.cuda.is_available():
        # a meta tensor stands in for any non-CPU device
        z = torch.zeros(2, 2, device="meta")
    else:
        z = torch.zeros(2, 2, device="cuda")
    with pytest.raises(ValueError, match="runs on CPU tensors"):
        st.anchor_ce(z)
