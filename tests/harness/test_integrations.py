"""SRD called from Quantus, Captum and pytorch-grad-cam (real calls into each library)."""
import numpy as np
import pytest
import torch
import torch.nn as nn

import srd_fx
from srd_fx.integrations import SRDAttribution, SRDCAM, explain_func, srd_cam, srd_maps

quantus = pytest.importorskip("quantus")
captum_attr = pytest.importorskip("captum.attr")
pytest.importorskip("pytorch_grad_cam")


def tiny_cnn(num_classes=5):
    """conv-relu-pool x2, conv-relu, global average pooling, linear: 32x32 input, 8x8 encoder output
    ("low"), the first ReLU at 32x32 is "high"."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes)).eval()


@pytest.fixture(scope="module")
def model():
    return tiny_cnn()


@pytest.fixture(scope="module")
def data(model):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 32, 32, generator=g)
    y = torch.tensor([0, 1, 2, 3])
    return x, y


@pytest.fixture(scope="module")
def reference(model, data):
    """Maps from an explainer compiled here, independently of the wrappers' cache."""
    x, y = data
    with torch.no_grad():
        out = srd_fx.compile(model, layers=("input", "low", "high", "4"))(x, y)
    assert (out.R_L.sum((1, 2)) > 0).all()  # every sample has relevance to distribute
    return out


def _up(maps, size):
    return torch.nn.functional.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


# ----------------------------------------------------------------------------- shared -------------
def test_srd_maps_conserve_relevance_and_match_compile(model, data, reference):
    x, y = data
    maps = srd_maps(model, x, y)
    torch.testing.assert_close(maps, reference.saliency, rtol=0, atol=0)
    torch.testing.assert_close(maps.sum((1, 2)) + reference.lost, reference.R_L.sum((1, 2)), rtol=1e-5, atol=1e-7)
    low = srd_maps(model, x, y, layer="low", to_input_size=False)
    assert low.shape == (4, 8, 8)
    torch.testing.assert_close(low, reference.relevance["low"])
    with pytest.raises(TypeError, match="unknown SRD option"):
        srd_maps(model, x, y, layr="low")
    with pytest.raises(ValueError, match="3 targets for a batch of 4"):
        srd_maps(model, x, [0, 1, 2])


# ----------------------------------------------------------------------------- Quantus ------------
def test_quantus_metric_computes_srd_through_explain_func(model, data, reference):
    x, y = data
    xs, ys = x.numpy(), y.numpy()
    a = explain_func(model, xs, ys)
    assert a.shape == (4, 1, 32, 32) and a.dtype == np.float32
    np.testing.assert_array_equal(a[:, 0], reference.saliency.numpy())
    kw = dict(disable_warnings=True, normalise=True, abs=True)
    called = quantus.Sparseness(**kw)(model=model, x_batch=xs, y_batch=ys, a_batch=None,
                                      explain_func=explain_func, device="cpu")
    given = quantus.Sparseness(**kw)(model=model, x_batch=xs, y_batch=ys,
                                     a_batch=reference.saliency.numpy()[:, None], device="cpu")
    np.testing.assert_allclose(called, given, rtol=1e-6)
    assert all(0 < s < 1 for s in called)


@pytest.mark.filterwarnings("ignore:The settings for perturbing input")  # zero noise on purpose
def test_quantus_robustness_metric_perturbs_and_reexplains(model, data):
    """MaxSensitivity calls explain_func on perturbed inputs: zero noise gives exactly 0, noise a
    positive finite sensitivity."""
    x, y = data
    args = dict(model=model, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=None, explain_func=explain_func,
                device="cpu")
    np.random.seed(0)
    zero = quantus.MaxSensitivity(nr_samples=2, lower_bound=0.0, disable_warnings=True)(**args)
    np.random.seed(0)
    noisy = quantus.MaxSensitivity(nr_samples=2, lower_bound=0.2, disable_warnings=True)(**args)
    assert np.all(np.asarray(zero) == 0.0)
    assert np.all(np.isfinite(noisy)) and np.all(np.asarray(noisy) > 0)


def test_quantus_evaluate_with_layer_kwarg(model, data, reference):
    """quantus.evaluate adds its own ``method`` keyword; ``layer`` comes from explain_func_kwargs."""
    x, y = data
    res = quantus.evaluate(metrics={"Sparseness": quantus.Sparseness(disable_warnings=True, normalise=False)},
                           xai_methods={"SRD-low": explain_func}, model=model, x_batch=x.numpy(),
                           y_batch=y.numpy(), explain_func_kwargs={"layer": "low"})
    direct = quantus.Sparseness(disable_warnings=True, normalise=False)(
        model=model, x_batch=x.numpy(), y_batch=y.numpy(),
        a_batch=_up(reference.relevance["low"], (32, 32)).numpy()[:, None], device="cpu")
    np.testing.assert_allclose(res["SRD-low"]["Sparseness"], direct, rtol=1e-5)


# ----------------------------------------------------------------------------- Captum -------------
def test_captum_attribute_matches_srd(model, data, reference):
    x, y = data
    srd = SRDAttribution(model)
    assert isinstance(srd, captum_attr.Attribution)
    a = srd.attribute(x, target=y)
    assert a.shape == (4, 1, 32, 32)
    torch.testing.assert_close(a[:, 0], reference.saliency, rtol=0, atol=0)
    (t,) = srd.attribute((x,), target=y)  # captum's tuple-of-inputs form
    torch.testing.assert_close(t, a)
    high = SRDAttribution(model, layer="high").attribute(x, target=y)
    torch.testing.assert_close(high[:, 0], reference.relevance["high"])
    low = SRDAttribution(model, layer="low").attribute(x, target=y, upsample=False)
    torch.testing.assert_close(low[:, 0], reference.relevance["low"])


def test_captum_noise_tunnel_wraps_srd(model, data, reference):
    """captum's NoiseTunnel (SmoothGrad) around SRD: zero noise averages identical maps; with noise
    the average of the noisy maps differs but relevance stays finite."""
    x, y = data
    nt = captum_attr.NoiseTunnel(SRDAttribution(model))
    same = nt.attribute(x, nt_type="smoothgrad", nt_samples=3, stdevs=0.0, target=y)
    torch.testing.assert_close(same[:, 0], reference.saliency, rtol=1e-6, atol=1e-9)
    torch.manual_seed(0)
    noisy = nt.attribute(x, nt_type="smoothgrad", nt_samples=3, stdevs=0.3, target=y)
    assert torch.isfinite(noisy).all() and not torch.allclose(noisy, same)


def test_captum_sensitivity_metric_calls_srd(model, data):
    from captum.metrics import sensitivity_max
    x, y = data
    attr = SRDAttribution(model).attribute
    zero = sensitivity_max(attr, x, target=y, perturb_radius=0.0, n_perturb_samples=2)
    torch.manual_seed(0)
    some = sensitivity_max(attr, x, target=y, perturb_radius=0.2, n_perturb_samples=2)
    assert torch.equal(zero, torch.zeros(4))
    assert torch.isfinite(some).all() and (some > 0).all()


# ----------------------------------------------------------------------------- pytorch-grad-cam ---
def test_gradcam_style_call_and_scaling(model, data, reference):
    from pytorch_grad_cam.utils.image import scale_cam_image, show_cam_on_image
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    x, y = data
    targets = [ClassifierOutputTarget(int(k)) for k in y]
    with SRDCAM(model) as cam:
        g = cam(input_tensor=x, targets=targets)
    assert g.shape == (4, 32, 32) and g.dtype == np.float32
    expected = scale_cam_image(np.maximum(reference.saliency.numpy(), 0))  # the library's own scaling
    np.testing.assert_allclose(g, expected, rtol=1e-5, atol=1e-6)
    assert (g.max((1, 2)) > 0.99).all() and g.min() >= 0  # 1 up to the library's 1e-7 guard
    low = srd_cam(model, x, targets, layer="low")  # coarse map: scaled, then resized like the library
    np.testing.assert_allclose(low, scale_cam_image(np.maximum(reference.relevance["low"].numpy(), 0), (32, 32)),
                               atol=1e-5)
    rgb = (x[0].permute(1, 2, 0).numpy() - x.min().item()) / (x.max() - x.min()).item()
    vis = show_cam_on_image(rgb.astype(np.float32), g[0], use_rgb=True)
    assert vis.shape == (32, 32, 3) and vis.dtype == np.uint8


def test_gradcam_metric_scores_srd_maps(model, data):
    """pytorch-grad-cam's CamMultImageConfidenceChange on SRD maps equals the change of the target
    logit when the input is multiplied by the map, computed here directly."""
    from pytorch_grad_cam.metrics.cam_mult_image import CamMultImageConfidenceChange
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    x, y = data
    targets = [ClassifierOutputTarget(int(k)) for k in y]
    cams = SRDCAM(model, layer="high")(input_tensor=x, targets=targets)
    scores = CamMultImageConfidenceChange()(x, cams, targets, model)
    with torch.no_grad():
        before = model(x)[torch.arange(4), y]
        after = model(x * torch.from_numpy(cams)[:, None])[torch.arange(4), y]
    np.testing.assert_allclose(scores, (after - before).numpy(), rtol=1e-5, atol=1e-6)


def test_gradcam_target_layers_and_bad_targets(model, data, reference):
    from pytorch_grad_cam.utils.model_targets import SemanticSegmentationTarget
    x, y = data
    by_module = SRDCAM(model, target_layers=[model[4]])(x, [int(k) for k in y])
    by_name = SRDCAM(model, layer="4")(x, [int(k) for k in y])
    np.testing.assert_array_equal(by_module, by_name)
    r = np.maximum(reference.relevance["4"].numpy(), 0)
    r = (r - r.min((1, 2), keepdims=True)) / (1e-7 + (r - r.min((1, 2), keepdims=True)).max((1, 2), keepdims=True))
    np.testing.assert_allclose(by_module, _up(torch.from_numpy(r), (32, 32)).numpy(), atol=1e-6)
    with pytest.raises(TypeError, match="ClassifierOutputTarget"):
        SRDCAM(model)(x, [SemanticSegmentationTarget(1, np.ones((32, 32)))] * 4)
    with pytest.raises(ValueError, match="not a submodule"):
        SRDCAM(model, target_layers=[nn.ReLU()])
