import copy
import math
import sys

import pytest
import torch
from torch import nn

import modelpress as mp
from modelpress.ops.lsq import affine_range, lsq_fake_quantize, lsq_grad_factor, round_ste, scale_grad
from modelpress.ops.observers import MinMaxObserver
from modelpress.ops.quant import (
    affine_params,
    dequantize_per_channel,
    fake_quantize,
    quantize_symmetric,
)
from modelpress.techniques.qat import FakeQuantLayer, QATConfig, qat
from modelpress.techniques.quantized import QuantizedLayer
from modelpress.techniques.static_int8 import calibrate_inputs


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny models: one intra-op thread is fastest, and two threads spinning on a loaded 2-core machine made
    # the training loops here 25x slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------------------
# LSQ maths


def test_round_ste_rounds_forward_and_passes_gradient():
    x = torch.tensor([-1.5, -0.4, 0.5, 1.6, 2.5], requires_grad=True)
    y = round_ste(x)
    (y * torch.arange(5.0)).sum().backward()
    assert y.tolist() == torch.round(x.detach()).tolist()  # half to even, as QuantizeLinear
    assert x.grad.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_scale_grad_is_identity_forward_and_scales_backward():
    s = torch.tensor([2.0, 3.0], requires_grad=True)
    y = scale_grad(s, 0.25)
    y.sum().backward()
    assert torch.equal(y.detach(), s.detach())
    assert s.grad.tolist() == [0.25, 0.25]
    assert lsq_grad_factor(10, 7) == pytest.approx(1 / math.sqrt(70))
    with pytest.raises(ValueError, match="at least 1"):
        lsq_grad_factor(0, 127)


def test_lsq_gradients_follow_the_paper():
    # Esser et al. eq. 3: d x_hat / d s = round(v) - v inside, -Qn below, Qp above; d x_hat / d x = 1 inside.
    s0, qmin, qmax = 0.5, -7, 7
    x = torch.tensor([0.3, -1.1, 2.9, 5.0, -9.0], requires_grad=True)
    s = torch.tensor(s0, requires_grad=True)
    y = lsq_fake_quantize(x, s, qmin=qmin, qmax=qmax, grad_factor=0.1)
    v = x.detach() / s0
    assert torch.allclose(y.detach(), torch.clamp(torch.round(v), qmin, qmax) * s0)
    grads_s = [torch.autograd.grad(y[i], s, retain_graph=True)[0].item() for i in range(5)]
    expected = [float(torch.round(v[i]) - v[i]) for i in range(3)] + [qmax, qmin]
    assert grads_s == pytest.approx([0.1 * e for e in expected], abs=1e-6)
    y.sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 1.0, 0.0, 0.0]


def test_lsq_forward_is_the_runtime_grid():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(6, 5, 3, generator=gen)
    scale = w.abs().amax(dim=(1, 2)) / 127 * 0.8  # some values clip
    got = lsq_fake_quantize(w, scale, qmin=-127, qmax=127, axis=0)  # QuantizedLayer's weight grid
    assert torch.equal(got, dequantize_per_channel(quantize_symmetric(w, scale, axis=0), scale, axis=0))
    x = 3 * torch.randn(4, 7, generator=gen) + 1
    s, z = affine_params(-2.0, 5.0, symmetric=False, signed=False)  # clips both tails
    got = lsq_fake_quantize(x, s, z, qmin=0, qmax=255)
    assert torch.equal(got, fake_quantize(x, s, z, axis=None, signed=False))
    # asymmetric: x gets gradient only inside the clipping window [-z s, (255 - z) s]
    xg = x.clone().requires_grad_(True)
    lsq_fake_quantize(xg, s, z, qmin=0, qmax=255).sum().backward()
    v = x / s
    inside = (v >= -z) & (v <= 255 - z)
    assert torch.equal(xg.grad, inside.float())


def test_affine_range_reproduces_the_grid():
    gen = torch.Generator().manual_seed(0)
    scales = torch.exp(torch.empty(300).uniform_(-10, 2, generator=gen))
    zps = torch.randint(0, 256, (300,), generator=gen)
    rel = []
    for s, z in zip(scales.tolist(), zps.tolist(), strict=True):
        s32 = float(torch.tensor(s))
        got_s, got_z = affine_params(*affine_range(s32, z), symmetric=False, signed=False)
        assert int(got_z) == z
        rel.append(abs(float(got_s) - s32) / s32)
    assert max(rel) <= 2**-23  # exact, or one fp32 ulp where no fp32 width divides to the scale
    assert sum(r == 0 for r in rel) > 250
    with pytest.raises(ValueError, match="outside the codes"):
        affine_range(0.1, 300)


# ---------------------------------------------------------------------------------------------------------
# The fake-quant layer and its conversion


@pytest.mark.parametrize("bits", [8, 7, 4])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_converted_layer_computes_what_training_saw(bits, kind):
    torch.manual_seed(0)
    layer = nn.Linear(24, 16) if kind == "linear" else nn.Conv2d(4, 8, 3, padding=1)
    x = 1.5 * torch.randn(32, 24) if kind == "linear" else torch.randn(8, 4, 6, 6)
    lo, hi = float(x.min()), float(x.max())
    ptq = QuantizedLayer(copy.deepcopy(layer), bits=bits, input_range=(lo, hi))
    fq = FakeQuantLayer(layer, bits=bits, input_range=(lo, hi))
    with torch.no_grad():
        # step 0 is the PTQ layer
        assert torch.allclose(fq(x), ptq(x), atol=1e-6)
        # as if trained: scales and weights moved
        fq.weight_log_scale.add_(0.2 * torch.randn(fq.weight_log_scale.shape))
        fq.input_log_scale.add_(-0.3)  # a narrower input window: some inputs now clip
        layer.weight.add_(0.01 * torch.randn(layer.weight.shape))
        trained = fq(x)
        converted = fq.to_quantized()
        assert converted.bits == bits and converted.scheme == ("w4a8" if bits == 4 else "w8a8")
        assert converted.input_zero_point == fq.input_zero_point
        assert converted.input_scale == pytest.approx(float(fq.input_log_scale.exp()), rel=2e-7)
        assert torch.allclose(converted(x), trained, atol=1e-5)
    assert int(converted.qweight.abs().max()) <= 2 ** (bits - 1) - 1


def test_gradients_reach_weights_and_scales():
    torch.manual_seed(0)
    fq = FakeQuantLayer(nn.Linear(8, 4), bits=8, input_range=(-1.0, 2.0))
    fq(3 * torch.randn(16, 8)).pow(2).sum().backward()
    for p in (fq.inner.weight, fq.inner.bias, fq.weight_log_scale, fq.input_log_scale):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------------------
# Training on a tiny task where 4-bit weights hurt


@pytest.fixture(scope="module")
def task():
    """A seeded 8-class task (labels from a random linear map) and a small fp32 MLP trained on it."""
    gen = torch.Generator().manual_seed(2)
    teacher = torch.randn(8, 8, generator=gen)

    def draw(n):
        x = torch.randn(n, 8, generator=gen)
        return x, (x @ teacher.T).argmax(-1)

    x_train, y_train = draw(1024)
    x_test, y_test = draw(2048)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(200):
        loss = nn.functional.cross_entropy(model(x_train), y_train)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval().requires_grad_(True)
    labeled = [(x_train[i : i + 128], y_train[i : i + 128]) for i in range(0, 1024, 128)]
    return model, labeled, (x_test, y_test)


def _ptq(model, bits, batches):
    """Static PTQ exactly as QAT starts: max|w| weight scales, min/max input ranges."""
    model = copy.deepcopy(model)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    observers = calibrate_inputs(
        model, linears, mp.Dataset(batches), batches=len(batches), observer=lambda _n: MinMaxObserver()
    )
    for name, module in linears.items():
        lo, hi = observers[name].range()
        model[int(name)] = QuantizedLayer(module, bits=bits, input_range=(float(lo), float(hi)))
    return model


def _scores(model, reference, test):
    x, y = test
    with torch.no_grad():
        out, ref = model(x), reference(x)
    accuracy = float((out.argmax(-1) == y).float().mean())
    return accuracy, float((out - ref).pow(2).mean() / ref.pow(2).mean())  # the distill loss


def test_qat_distill_recovers_4bit_ptq_without_labels(task):
    model, labeled, test = task
    inputs = [x for x, _ in labeled]
    ptq = _ptq(model, 4, inputs)
    fp32_acc, _ = _scores(model, model, test)
    ptq_acc, ptq_loss = _scores(ptq, model, test)
    assert ptq_acc < fp32_acc - 0.01  # 4-bit PTQ visibly loses accuracy here
    small = qat(copy.deepcopy(model), QATConfig(bits=4, epochs=10, lr=1e-4), mp.Dataset(inputs))
    assert all(isinstance(small[i], QuantizedLayer) and small[i].scheme == "w4a8" for i in (0, 2))
    qat_acc, qat_loss = _scores(small, model, test)
    assert qat_loss < 0.8 * ptq_loss  # the objective fell on held-out data
    assert qat_acc > ptq_acc


def test_qat_task_loss_uses_labels_and_beats_ptq(task):
    model, labeled, test = task
    ptq_acc, _ = _scores(_ptq(model, 4, [x for x, _ in labeled]), model, test)
    config = QATConfig(bits=4, loss="task", epochs=10, lr=3e-4, scale_lr=3e-3)
    small = qat(copy.deepcopy(model), config, mp.Dataset(labeled))
    qat_acc, _ = _scores(small, model, test)
    assert qat_acc > ptq_acc


def test_qat_is_deterministic_and_logs_progress(task, caplog):
    model, labeled, _ = task
    inputs = [x for x, _ in labeled]
    config = QATConfig(epochs=2, steps=5)
    with caplog.at_level("INFO", logger="modelpress.techniques.qat"):
        a = qat(copy.deepcopy(model), config, mp.Dataset(inputs))
    b = qat(copy.deepcopy(model), config, mp.Dataset(inputs))
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    assert "qat: 5 steps, mean loss" in caplog.text  # `steps` caps the two epochs of 8 items


def test_loss_fn_replaces_the_builtin_loss(task):
    model, labeled, _ = task
    seen = []

    def kl(out, target):
        seen.append(target.shape)
        return nn.functional.kl_div(out.log_softmax(-1), target.softmax(-1), reduction="batchmean")

    qat(copy.deepcopy(model), QATConfig(steps=3), mp.Dataset([x for x, _ in labeled]), loss_fn=kl)
    assert seen == [torch.Size([128, 8])] * 3  # called with the fp32 model's outputs


# ---------------------------------------------------------------------------------------------------------
# The artifact


def _cnn():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    ).eval()
    gen = torch.Generator().manual_seed(1)
    data = [torch.randn(4, 3, 8, 8, generator=gen) for _ in range(4)]
    return model, data


@pytest.mark.parametrize(("bits", "reduce_range", "stored"), [(8, True, 7), (4, None, 4)])
def test_exports_and_matches_in_onnxruntime(bits, reduce_range, stored, tmp_path, monkeypatch):
    model, data = _cnn()
    small = mp.compress(model, [QATConfig(bits=bits, reduce_range=reduce_range, epochs=2)], data)
    assert all(isinstance(small[i], QuantizedLayer) and small[i].bits == stored for i in (0, 3, 7))
    assert not any(isinstance(m, FakeQuantLayer) for m in small.modules())
    path = mp.export_onnx(small, (data[0],), tmp_path / "q.onnx")
    report = mp.check_parity(
        small, mp.open_session(path, "onnxruntime"), [(d,) for d in data], reference=model
    )
    assert report.passed


def test_config_round_trips_through_yaml(monkeypatch, tmp_path):
    config = QATConfig(
        bits=4,
        loss="task",
        epochs=3,
        steps=100,
        lr=1e-5,
        reduce_range=True,
        targets=("re:.*fc",),
        ignore=("h",),
    )
    path = tmp_path / "recipe.yaml"
    path.write_text(mp.dump_recipe([config]))
    assert mp.load_recipe(path) == [config]


@pytest.mark.parametrize(
    ("vnni", "reduce_range", "stored"), [(False, None, 7), (True, None, 8), (False, False, 8)]
)
def test_reduce_range_follows_the_cpu_unless_set(vnni, reduce_range, stored, monkeypatch):
    monkeypatch.setattr(sys.modules["modelpress.techniques.qat"], "cpu_has_vnni", lambda: vnni)
    small = qat(
        nn.Linear(6, 3), QATConfig(steps=1, reduce_range=reduce_range), mp.Dataset([torch.randn(4, 6)])
    )
    assert small.bits == stored and int(small.qweight.abs().max()) == 2 ** (stored - 1) - 1


def test_transposed_conv_stays_weight_only_and_root_layer_works():
    torch.manual_seed(0)
    model = nn.Sequential(nn.ConvTranspose2d(4, 3, 3), nn.Flatten(), nn.Linear(3 * 5 * 5, 2))
    data = [torch.randn(2, 4, 3, 3) for _ in range(2)]
    small = qat(model, QATConfig(steps=2), mp.Dataset(data))
    assert small[0].scheme == "w8" and small[2].scheme == "w8a8"
    root = qat(nn.Linear(6, 3), QATConfig(steps=2), mp.Dataset([torch.randn(4, 6)]))
    assert isinstance(root, QuantizedLayer) and root.scheme == "w8a8"


# ---------------------------------------------------------------------------------------------------------
# Bad input


def test_needs_data_and_says_what_kind():
    model, data = _cnn()
    with pytest.raises(mp.DataError, match="qat needs training data"):
        qat(model, QATConfig())
    with pytest.raises(mp.DataError, match="calibration data is empty"):
        qat(model, QATConfig(), mp.Dataset([]))
    with pytest.raises(mp.DataError, match=r"loss='task' needs \(inputs, labels\) items.*is a Tensor"):
        qat(model, QATConfig(loss="task"), mp.Dataset(data))
    assert not any(isinstance(m, (FakeQuantLayer, QuantizedLayer)) for m in model.modules())


def test_bad_labels_and_nan_are_named():
    model, data = _cnn()
    labels = torch.zeros(4, 3, dtype=torch.long)  # not shaped like the logits (4, 5) minus the class dim
    with pytest.raises(
        mp.DataError, match=r"cannot pair logits of shape \(4, 5\) with labels of shape \(4, 3\)"
    ):
        qat(model, QATConfig(loss="task"), mp.Dataset([(data[0], labels)]))
    bad = data[1].clone()
    bad[0, 0, 0, 0] = float("nan")  # after the calibration batch: caught in training
    with pytest.raises(mp.DataError, match="loss is nan on training item 1"):
        qat(model, QATConfig(calibration_batches=1), mp.Dataset([data[0], bad]))
    assert not any(isinstance(m, FakeQuantLayer) for m in model.modules())  # wrappers removed again


def test_divergence_is_a_recipe_error():
    model, data = _cnn()
    calls = []

    def exploding(out, target):
        calls.append(1)
        loss = (out - target).pow(2).mean()
        return loss * float("inf") if len(calls) > 2 else loss

    with pytest.raises(mp.RecipeError, match=r"training diverged.*step 3.*Lower lr \(now 1e-05\)"):
        qat(model, QATConfig(), mp.Dataset(data), loss_fn=exploding)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"bits": 2}, "bits=2 is not supported"),
        ({"loss": "kl"}, "loss='kl' is unknown"),
        ({"lr": 0.0}, r"lr=0.0 must be in \(0, 1\)"),
        ({"lr": "1e-5"}, "write 1.0e-5"),
        ({"scale_lr": float("nan")}, "scale_lr=nan"),
        ({"epochs": 0}, "epochs=0 must be an integer of at least 1"),
        ({"steps": 0}, "steps=0 must be an integer of at least 1"),
        ({"calibration_batches": 0}, "calibration_batches=0"),
        ({"reduce_range": "yes"}, "reduce_range='yes' must be true, false or null"),
        ({"layers": ("embedding",)}, r"layers=\['embedding'\] is invalid"),
    ],
)
def test_config_validation(fields, message):
    with pytest.raises(mp.RecipeError, match=message):
        QATConfig(**fields)


def test_unknown_target_is_named():
    model, data = _cnn()
    with pytest.raises(mp.RecipeError, match=r"targets \['fc9'\] match no module"):
        qat(model, QATConfig(targets=("fc9",)), mp.Dataset(data))
