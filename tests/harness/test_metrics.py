"""The Quantus metrics, as configured for the paper, on hand-made maps with known values."""
import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from srd_fx.eval import metrics as M


H = 32


class Linear(nn.Module):
    """f(x) = sum_{c,h,w} W[k,h,w] x[c,h,w] (+ bias): a model whose logit drops are known exactly."""

    def __init__(self, weight):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)  # (K, H, W), shared by the channels

    def forward(self, x):
        return torch.einsum("bchw,khw->bk", x, self.weight) + 1.0


@pytest.fixture
def model():
    torch.manual_seed(1)
    return Linear(torch.rand(3, H, H)).eval()


def _batch(B=4):
    x = torch.rand(B, 3, H, H) + 0.1
    y = torch.arange(B) % 3
    s = torch.zeros(B, H, H, dtype=torch.bool)
    s[:, 8:20, 8:20] = True
    return x, y, s


# ----------------------------------------------------------------------------- prepare -------------
def test_prepare_divides_by_max_and_clamps():
    a = torch.tensor([[[2.0, -6.0], [1.0, 0.0]]])
    p = M.prepare(a)
    assert torch.equal(p, torch.tensor([[[1.0, -1.0], [0.5, 0.0]]]))  # -3 clamped to -1
    # a map with no positive value is scaled by its magnitude; an all-zero map stays zero
    assert torch.equal(M.prepare(torch.tensor([[[-2.0, -1.0]]])), torch.tensor([[[-1.0, -0.5]]]))
    assert torch.equal(M.prepare(torch.zeros(1, 3, 3)), torch.zeros(1, 3, 3))


def test_prepare_resizes_low_resolution_maps_bilinearly():
    low = torch.zeros(1, 4, 4)
    low[0, 1, 2] = 3.0
    p = M.prepare(low, (64, 64))
    assert p.shape == (1, 64, 64)
    ref = torch.nn.functional.interpolate(low[:, None], size=(64, 64), mode="bilinear", align_corners=False)[:, 0]
    assert torch.allclose(p, ref / ref.max())
    # the peak lands on the upsampled cell (rows 16..31, cols 32..47)
    r, c = divmod(int(p[0].argmax()), 64)
    assert 16 <= r < 32 and 32 <= c < 48


def test_prepare_refuses_nan():
    with pytest.raises(FloatingPointError):
        M.prepare(torch.tensor([[[float("nan"), 1.0]]]))


# ----------------------------------------------------------------------------- localisation --------
def test_pointing_game_inside_outside_and_tolerance(model):
    x, y, s = _batch()
    a = torch.zeros(4, H, H)
    a[0, 10, 10] = 1    # inside the mask
    a[1, 2, 2] = 1      # far outside
    a[2, 14, 22] = 1    # 3 px right of the mask (cols 8..19)
    a[3, 14, 24] = 1    # 5 px right of the mask
    assert M.pointing_game(model, x, y, a, s, tolerance=0).tolist() == [1, 0, 0, 0]
    assert M.pointing_game(model, x, y, a, s, tolerance=3).tolist() == [1, 0, 1, 0]
    assert M.pointing_game(model, x, y, a, s, tolerance=5).tolist() == [1, 0, 1, 1]


def test_default_tolerance_is_15px_at_224():
    st = M.MetricSettings()
    assert st.tolerance(224) == 15 and st.tolerance(64) == 4
    assert M.MetricSettings(pointing_tolerance=0).tolerance(224) == 0


def test_attribution_localisation_known_ratios(model):
    x, y, s = _batch()
    a = torch.zeros(4, H, H)
    a[0, 8:20, 8:20] = torch.rand(12, 12)          # entirely inside -> 1
    a[1, 10, 10] = 1.0
    a[1, 0, 0] = 1.0                               # half the positive mass inside -> 0.5
    a[2, 10, 10] = 1.0
    a[2, 0:4, 0:4] = -1.0                          # negative relevance outside does not count -> 1
    a[3, 10, 10], a[3, 0, 0], a[3, 0, 1], a[3, 0, 2] = 1.0, 1.0, 1.0, 1.0   # 1/4 inside
    got = M.attribution_localisation(model, x, y, a, s)
    assert np.allclose(got, [1.0, 0.5, 1.0, 0.25], atol=1e-6)


def test_localisation_refuses_empty_masks(model):
    x, y, s = _batch()
    s[1] = False
    with pytest.raises(ValueError, match="empty"):
        M.attribution_localisation(model, x, y, torch.rand(4, H, H), s)


# ----------------------------------------------------------------------------- sparseness ----------
def test_sparseness_gini_known_values(model):
    x, y, _ = _batch()
    d = H * H
    a = torch.zeros(4, H, H)
    a[0, 3, 5] = 1.0                               # one-hot: Gini (d-1)/d
    a[1] = 0.5                                     # constant: Gini 0
    a[2, :8] = 1.0                                 # a quarter of the pixels equal, the rest 0: 1 - 1/4
    a[3, :8] = -1.0                                # the Gini index is taken of |map|
    got = M.sparseness(model, x, y, a)
    assert got[0] > 0.998 and abs(got[0] - (d - 1) / d) < 1e-3   # Quantus adds 1e-7 to every entry
    assert abs(got[1]) < 1e-6
    assert abs(got[2] - 0.75) < 1e-3 and abs(got[3] - 0.75) < 1e-3


# ----------------------------------------------------------------------------- fidelity ------------
def test_fidelity_of_exact_contributions_is_one(model):
    """For a linear model f(x) = sum W x, setting features to 0 drops the logit by the sum of their
    contributions W x; the exact contribution map therefore correlates perfectly (Bhatt et al.)."""
    x, y, _ = _batch()
    x = x[:, :1].expand(-1, 3, -1, -1).contiguous()      # equal channels: one map per pixel is exact
    contrib = model.weight[y] * x[:, 0]                   # (B, H, W), positive
    st = M.MetricSettings(fidelity_runs=30)
    assert np.allclose(M.fidelity(model, x, y, contrib, st), 1.0, atol=1e-5)
    # a map that orders the pixels backwards (a constant minus the contribution) correlates -1
    backwards = contrib.amax((1, 2), keepdim=True) - contrib
    assert np.allclose(M.fidelity(model, x, y, backwards, st), -1.0, atol=1e-5)
    rand = M.fidelity(model, x, y, torch.rand(4, H, H), st)
    assert np.all(np.abs(rand) < 0.6)


class Counting(nn.Module):
    """The real model, counting the images it is run on."""

    def __init__(self, model):
        super().__init__()
        self.model, self.images = model, 0

    def forward(self, x):
        self.images += len(x)
        return self.model(x)


def test_shared_fidelity_equals_quantus_and_runs_the_model_once_per_batch(model):
    import quantus
    x, y, _ = _batch()
    maps = [torch.rand(4, H, H) for _ in range(3)]
    st = M.MetricSettings(fidelity_runs=10, seed=3)
    counting = Counting(model).eval()
    shared = M.fidelity_metric(st)
    got = [M.fidelity(counting, x, y, a, st, metric=shared) for a in maps]
    assert counting.images == 4 * (1 + 10)          # the clean batch + 10 perturbed batches, once
    for a, g in zip(maps, got):
        plain = M.fidelity(model, x, y, a, st, metric=M.fidelity_metric(st, shared=False))
        assert isinstance(M.fidelity_metric(st, shared=False), quantus.FaithfulnessCorrelation)
        assert np.array_equal(g, plain)
    # another seed draws other subsets: different scores
    assert not np.array_equal(M.fidelity(model, x, y, maps[0], M.MetricSettings(fidelity_runs=10, seed=4)), got[0])
    # a new batch is not confused with the kept one
    x2 = x.flip(0)
    assert np.array_equal(M.fidelity(model, x2, y, maps[0], st, metric=shared),
                          M.fidelity(model, x2, y, maps[0], st, metric=M.fidelity_metric(st, shared=False)))


# ----------------------------------------------------------------------------- stability -----------
def test_stability_of_constant_and_identity_explanations(model):
    x, y, _ = _batch()
    st = M.MetricSettings(stability_samples=5)
    const = torch.rand(1, H, H)
    a0 = const.expand(4, -1, -1)
    assert np.allclose(M.stability(model, x, y, a0, lambda m, xx, tt: const.expand(len(xx), -1, -1), st), 0.0)
    # phi(x) = x[:, 0]: ||dphi|| / ||dx|| = ||noise_0|| / ||noise|| ~ 1/sqrt(3) for i.i.d. noise on 3 channels
    got = M.stability(model, x, y, x[:, 0], lambda m, xx, tt: xx[:, 0], st)
    assert np.allclose(got, 1 / math.sqrt(3), atol=0.03)
    # and it scales with the explanation
    got2 = M.stability(model, x, y, 2 * x[:, 0], lambda m, xx, tt: 2 * xx[:, 0], st)
    assert np.allclose(got2, 2 * got, rtol=0.05)


def test_shape_errors_are_explained(model):
    x, y, s = _batch()
    with pytest.raises(ValueError, match="prepare"):
        M.sparseness(model, x, y, torch.rand(4, 8, 8))


# ----------------------------------------------------------------------------- fidelity protocols --
class Recording(nn.Module):
    """The real model, keeping every input it is run on."""

    def __init__(self, model):
        super().__init__()
        self.model, self.inputs = model, []

    def forward(self, x):
        self.inputs.append(x.detach().clone())
        return self.model(x)


def test_fidelity_protocols_map_to_quantus_settings():
    from quantus.functions.perturb_func import baseline_replacement_by_indices, batch_baseline_replacement_by_indices
    # the default keeps its meaning: 200 channel values set to 0, clamped maps
    assert M.fidelity_settings("quantus-0.6") == M.MetricSettings()
    want = {"quantus-0.6": (False, 200, 0.0, False, True), "quantus-0.5": (True, 224, "black", True, False),
            "paper": (True, 200, 0.0, False, True)}
    for name, (pixels, k, base, normalise, clamp) in want.items():
        st = M.fidelity_settings(name)
        met = M.fidelity_metric(st, shape=(2, 3, 64, 64))
        assert (met.subset_size, met.nr_runs, met.normalise, met.abs, met.pixels) == (k, 100, normalise, False, pixels)
        assert st.fidelity_clamp is clamp
        assert met.perturb_func.keywords["perturb_baseline"] == base
        if pixels:   # Quantus 0.5: whole pixels, all channels (spatial axes indexed)
            assert met.perturb_func.func is baseline_replacement_by_indices
            assert met.perturb_func.keywords["indexed_axes"] == (1, 2)
        else:        # Quantus 0.6: single channel values of the flattened input
            assert met.perturb_func.func is batch_baseline_replacement_by_indices
    # a fraction counts pixels for pixel subsets and channel values for channel-value subsets
    assert M.fidelity_settings("paper", fraction=0.0045).subset_size((3, 224, 224)) == round(0.0045 * 224 * 224)
    assert M.fidelity_settings("quantus-0.6", fraction=0.018).subset_size((3, 64, 64)) == round(0.018 * 3 * 64 * 64)
    assert M.fidelity_settings("paper", subset=50).subset_size((3, 64, 64)) == 50
    with pytest.raises(ValueError, match="not both"):
        M.fidelity_settings("paper", subset=10, fraction=0.1)
    with pytest.raises(ValueError, match="fraction"):
        M.fidelity_settings("paper", fraction=1.5)
    with pytest.raises(ValueError, match="protocol"):
        M.fidelity_settings("quantus-0.4")
    with pytest.raises(ValueError, match="between 1 and 1024"):
        M.fidelity_settings("paper", subset=2000).subset_size((3, 32, 32))


def test_paper_protocol_zeroes_all_channels_of_200_pixels(model):
    x, y, _ = _batch()                        # every value >= 0.1: a 0 can only come from the perturbation
    rec = Recording(model).eval()
    st = dataclasses.replace(M.fidelity_settings("paper"), fidelity_runs=5)
    M.fidelity(rec, x, y, torch.rand(4, H, H), st)
    assert len(rec.inputs) == 1 + 5           # the clean batch, then one perturbed batch per run
    assert torch.equal(rec.inputs[0], x)
    for xp in rec.inputs[1:]:
        changed = xp != x
        assert torch.equal(changed, xp == 0)              # what changed was set to 0, nothing else
        assert torch.equal(changed.all(1), changed.any(1))   # all channels of a pixel, or none
        assert changed.all(1).flatten(1).sum(1).tolist() == [200] * 4
    # Quantus 0.6 (the default): 200 single channel values, not whole pixels
    rec = Recording(model).eval()
    M.fidelity(rec, x, y, torch.rand(4, H, H), dataclasses.replace(M.MetricSettings(), fidelity_runs=3))
    for xp in rec.inputs[1:]:
        changed = xp != x
        assert changed.flatten(1).sum(1).tolist() == [200] * 4
        assert not torch.equal(changed.all(1), changed.any(1))
    # Quantus 0.5: 224 whole pixels set to the image's minimum
    rec = Recording(model).eval()
    M.fidelity(rec, x, y, torch.rand(4, H, H), dataclasses.replace(M.fidelity_settings("quantus-0.5"), fidelity_runs=3))
    low = x.flatten(1).min(1).values[:, None, None, None].expand_as(x)
    for xp in rec.inputs[1:]:
        changed = (xp != x) | ((xp == low) & (x == low))
        pix = (xp == low).all(1)
        assert pix.flatten(1).sum(1).min() >= 224 and torch.equal(xp[~pix[:, None].expand_as(x)],
                                                                     x[~pix[:, None].expand_as(x)])


def test_pixel_fidelity_of_exact_pixel_contributions_is_one(model):
    """With whole pixels zeroed, a linear model's logit drops by the pixel's summed contribution
    sum_c W x_c, so that map correlates perfectly even with unequal channels; with single channel
    values (Quantus 0.6) the same map does not."""
    x, y, _ = _batch()
    contrib = model.weight[y] * x.sum(1)
    st = dataclasses.replace(M.fidelity_settings("paper"), fidelity_runs=30)
    assert np.allclose(M.fidelity(model, x, y, contrib, st), 1.0, atol=1e-5)
    chan = M.fidelity(model, x, y, contrib, dataclasses.replace(M.MetricSettings(), fidelity_runs=30))
    assert np.all(chan < 0.999)


@pytest.mark.parametrize("protocol", list(M.FIDELITY_PROTOCOLS))
def test_every_protocol_scores_real_methods_on_a_real_model(protocol):
    from srd_fx.eval import data as D
    from srd_fx.eval import evaluation as E
    from srd_fx.eval.models import build
    torch.manual_seed(0)
    model = build("resnet", "relu", size=32).eval()
    images = torch.rand(3, 3, 32, 32)
    with torch.no_grad():   # explain the predicted class (a random class may get an all-zero SRD map)
        labels = model(D.normalize(images)).argmax(1)
    masks = torch.ones(3, 32, 32, dtype=torch.bool)
    st = dataclasses.replace(M.fidelity_settings(protocol, fraction=0.05), fidelity_runs=8)
    res = E.evaluate(model, images, labels, masks, methods=["InputXGradient", "SRD-input", "SRD-low"],
                     metrics=["Fidelity"], settings=st, progress=False)
    for method, d in res.items():
        assert d["Fidelity"].shape == (3,) and np.isfinite(d["Fidelity"]).all(), method
        assert np.all(np.abs(d["Fidelity"]) <= 1 + 1e-9)
