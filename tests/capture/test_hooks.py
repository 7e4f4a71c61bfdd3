"""Layer capture: im2col order, bias coordinate, per-example gradients (docs/notes.md §0, §12.10-11)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import secondorder as so
from secondorder.capture import hooks as C
from tests.helpers import classification_data, tiny_mlp


def conv_input(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, 2, 5, 6, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("stride,padding,dilation", [(1, 0, 1), (2, 1, 1), (1, 2, 2), (2, "same", 1)])
def test_conv_rows_reproduce_the_convolution_in_weight_view_order(stride, padding, dilation):
    torch.manual_seed(0)
    stride_ = 1 if padding == "same" else stride
    conv = nn.Conv2d(2, 4, 3, stride=stride_, padding=padding, dilation=dilation).double()
    a = conv_input()
    h = conv(a)
    rows = C.input_rows(conv, a)  # (m|T|, J k k + 1)
    wbar = C.grad_matrix(conv, conv.weight, conv.bias)  # (I, J k k + 1)
    torch.testing.assert_close(rows @ wbar.t(), C.output_rows(conv, h))
    assert rows.shape[1] == C.input_dim(conv)
    assert C.num_locations(conv, h) == h.shape[2] * h.shape[3]


def test_explicit_patch_order_is_channel_then_kernel_row_then_column():
    conv = nn.Conv2d(2, 1, 2, bias=False).double()
    a = conv_input()
    rows = C.input_rows(conv, a)
    # location t = (0, 0) of example 0: patch a[0, c, 0:2, 0:2] flattened channel-major
    torch.testing.assert_close(rows[0], a[0, :, 0:2, 0:2].reshape(-1))
    # location (0, 1)
    torch.testing.assert_close(rows[1], a[0, :, 0:2, 1:3].reshape(-1))


def test_linear_rows_append_the_homogeneous_coordinate():
    lin = nn.Linear(3, 2).double()
    a = torch.randn(4, 3, dtype=torch.float64)
    rows = C.input_rows(lin, a)
    assert torch.equal(rows[:, -1], torch.ones(4, dtype=torch.float64))
    lin_nb = nn.Linear(3, 2, bias=False).double()
    assert C.input_rows(lin_nb, a).shape == (4, 3)


def test_per_example_pre_activation_gradients_are_m_times_autograd_grad():
    """g_n = m * dL/dh_n = dl_n/dh_n for the batch-mean loss (checked with torch.func per example)."""
    x, y = classification_data(n=6)
    model = tiny_mlp()
    loss_fn = nn.CrossEntropyLoss()
    closure = so.Closure(model, x, y, loss_fn)
    cap = C.Capture(C.supported_modules(model))
    with cap.record(inputs=True, outputs=True, output_grads=True) as recs:
        closure.forward().loss.backward()
    first = model[0]
    g = recs["0"].output_grads * closure.batch_factor

    def loss_from_h0(h0, n):
        rest = model[1:]
        return loss_fn(rest(h0.unsqueeze(0)), y[n : n + 1])

    with torch.no_grad():
        h = first(x)
    for n in range(6):
        exact = torch.func.grad(loss_from_h0)(h[n], n)
        torch.testing.assert_close(g[n], exact)


def test_per_example_weight_gradient_is_sum_over_locations_of_outer_products():
    """Thm 3(i): vec(DW_n) = sum_t abar_t (x) Dh_t (weight.view(I, J k k) layout plus the bias column)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, stride=2, padding=1).double()
    a = conv_input()
    m = a.shape[0]
    cap = C.Capture({"conv": conv})
    with cap.record(inputs=True, outputs=True, output_grads=True) as recs:
        loss = conv(a).pow(2).mean(dim=(1, 2, 3)).mean()
        loss.backward()
    rec = recs["conv"]
    rows = C.input_rows(conv, rec.inputs).reshape(m, -1, C.input_dim(conv))
    gh = C.output_rows(conv, rec.output_grads * m).reshape(m, -1, 3)
    per_example = torch.einsum("nto,nti->noi", gh, rows)  # (m, I, D)
    torch.testing.assert_close(per_example.mean(0), C.grad_matrix(conv, conv.weight.grad, conv.bias.grad))

    def loss_n(w, b, an):
        return torch.nn.functional.conv2d(an.unsqueeze(0), w, b, stride=2, padding=1).pow(2).mean()

    gw, gb = torch.func.vmap(torch.func.grad(loss_n, argnums=(0, 1)), in_dims=(None, None, 0))(
        conv.weight.detach(), conv.bias.detach(), a
    )
    for n in range(m):
        torch.testing.assert_close(per_example[n], C.grad_matrix(conv, gw[n], gb[n]))


def test_a_layer_that_never_runs_is_an_error():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    cap = C.Capture({"0": model[0], "1": model[1], "unused": nn.Linear(3, 3)})
    with pytest.raises(C.HookNeverFiredError, match="unused"):
        with cap.record():
            model(torch.randn(2, 3))


def test_weight_sharing_is_refused():
    lin = nn.Linear(3, 3)
    cap = C.Capture({"lin": lin})
    with pytest.raises(RuntimeError, match="weight sharing"):
        with cap.record():
            lin(lin(torch.randn(2, 3)))


def test_hooks_exist_only_inside_the_recording_phase():
    model = tiny_mlp()
    cap = C.Capture(C.supported_modules(model))
    with cap.record():
        assert all(len(m._forward_hooks) == 1 for m in cap.modules.values())
        model(torch.randn(2, 6, dtype=torch.float64))
    assert all(len(m._forward_hooks) == 0 for m in cap.modules.values())


def test_unsupported_layers_are_not_modeled():
    model = nn.Sequential(
        nn.Conv2d(4, 4, 3, groups=2),  # modeled since layer blocks: one block per group
        nn.Conv2d(4, 4, 3, padding_mode="circular", padding=1),
        nn.Conv2d(4, 4, 2, padding="same"),
        nn.Conv2d(4, 4, 3),
        nn.Linear(3, 3),
    )
    assert sorted(C.supported_modules(model)) == ["0", "3", "4"]
    assert sorted(C.layer_blocks(model)) == ["0[0]", "0[1]", "3", "4"]


def test_ddp_wrapper_is_unwrapped():
    model = tiny_mlp()
    assert C.unwrap(nn.DataParallel(model)) is model


def test_recorded_activations_are_freed_after_the_phase():
    """Regression: the gradient hook must not keep the record (and the activations) alive."""
    import gc
    import weakref

    model = tiny_mlp()
    cap = C.Capture(C.supported_modules(model))
    with cap.record(inputs=True, outputs=True, output_grads=True) as recs:
        out = model(torch.randn(4, 6, dtype=torch.float64))
        out.sum().backward()
    assert recs["0"].output_grads is not None
    watch = weakref.ref(recs["0"].outputs)
    del recs, out
    gc.collect()
    assert watch() is None
