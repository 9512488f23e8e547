"""srd_fx.methods.concepts: the PFV index against brute-force search (scikit-learn), the sub-concept sharing
ratios against the pair-by-pair reference (tests/naive_srd.py), conservation of ERFs and shares, and
the ``srd-fx concepts`` command end to end."""
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.metrics.pairwise import cosine_similarity
from sklearn.neighbors import NearestNeighbors

import naive_srd as N
import srd_fx
from srd_fx.methods.concepts import PFVIndex, erf_box, explain_pfv, feature_extractor, plot_concepts, sub_concepts


class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(6, 8, 3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.act2 = nn.ReLU()
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1)
        self.act3 = nn.ReLU()
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.act2(self.bn2(self.conv2(self.act1(self.conv1(x)))))
        x = self.act3(self.conv3(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def _small(dtype=torch.float64):
    m = N.randomize_bn(SmallNet()).to(dtype).eval()
    return m, srd_fx.compile(m)


def _hooked(m, module, x):
    got = []
    h = module.register_forward_hook(lambda mod, i, o: got.append(o.detach().clone()))
    with torch.no_grad():
        m(x)
    h.remove()
    return got[0]


def test_index_returns_true_nearest_neighbours():
    m, e = _small()
    X = torch.randn(10, 3, 12, 12, dtype=torch.float64)
    # built batch by batch (4 images) and searched chunk by chunk (3 images of 36 PFVs)
    idx = PFVIndex.build(e, X, "act2", batch_size=4, dtype=torch.float64)
    assert idx.spatial == (6, 6) and len(idx) == 360 and idx.n_images == 10
    # the indexed PFVs are the pre-activations of act2 (bn2's output), image-major, row-major
    pre = _hooked(m, m.bn2, X).permute(0, 2, 3, 1).reshape(-1, 8).numpy()
    assert np.allclose(idx.vector(3, (2, 5)).numpy(), pre[3 * 36 + 2 * 6 + 5], rtol=0, atol=1e-12)
    assert [idx.row(i, p) for i, p in idx.locate([0, 41, 359])] == [0, 41, 359]

    queries = torch.from_numpy(pre[[5, 100, 250]]) + 0.3 * torch.randn(3, 8, dtype=torch.float64)
    sims, rows = idx.search(queries, k=7, chunk_size=3 * 36)
    nn_ = NearestNeighbors(n_neighbors=7, metric="cosine", algorithm="brute").fit(pre)
    dist, ref = nn_.kneighbors(queries.numpy())
    assert (rows.numpy() == ref).all()
    assert np.allclose(sims.numpy(), 1 - dist, atol=1e-12)

    # excluding each query's own image, and at most one PFV per image
    C = cosine_similarity(queries.numpy(), pre).reshape(3, 10, 36)
    own = np.array([0, 2, 6])
    C[np.arange(3), own] = -np.inf
    sims, rows = idx.search(queries, k=4, exclude_images=torch.tensor(own), distinct_images=True, chunk_size=50)
    best_img = np.argsort(-C.max(2), axis=1)[:, :4]
    ref_rows = best_img * 36 + np.take_along_axis(C.argmax(2), best_img, 1)
    assert (rows.numpy() == ref_rows).all()
    assert all(i != own[q] for q in range(3) for i, _ in idx.locate(rows[q]))

    # k larger than the candidates: padded with -inf / -1
    s, r = idx.search(queries[0], k=12, exclude_images=0, distinct_images=True)
    assert torch.isinf(s[9:]).all() and (r[9:] == -1).all() and (r[:9] >= 0).all()


def test_post_activation_index_skips_dead_pfvs_and_round_trips(tmp_path):
    m, e = _small(torch.float32)
    with torch.no_grad():
        m.bn2.bias.fill_(-2.5)  # many all-negative pre-activations: all-zero PFVs after the ReLU
    X = torch.randn(6, 3, 12, 12)
    idx = PFVIndex.build(e, X, "act2", value="post", batch_size=6)
    post = _hooked(m, m.act2, X).permute(0, 2, 3, 1).reshape(-1, 8)
    assert torch.allclose(idx.norms, post.norm(dim=1), atol=1e-6)
    dead = post.norm(dim=1) == 0
    assert dead.any(), "the check needs some all-zero post-activation PFVs"
    _, rows = idx.search(post[~dead][:4], k=len(idx))
    hit = rows[rows >= 0]
    assert not dead[hit].any() and len(hit) == 4 * int((~dead).sum())
    idx.save(tmp_path / "i.pt")
    back = PFVIndex.load(tmp_path / "i.pt")
    assert torch.equal(back.vectors, idx.vectors) and back.layer == "act2" and back.value == "post"
    with pytest.raises(srd_fx.InputError, match="zero norm"):
        idx.search(torch.zeros(8))


@pytest.mark.parametrize("layer", ["block1_act2", "block2_act2", "block1_act1", "relu"])
def test_sub_concepts_are_the_pair_by_pair_sharing_ratios(layer):
    m, net = N.resnet_tiny()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    e = srd_fx.compile(m)
    got = sub_concepts(e, x, layer)                  # every position of the layer
    bi = [b.name for b in net.blocks].index(layer)
    blk = net.blocks[bi]
    assert sorted(got) == sorted(blk.inputs)
    for b in range(2):
        _, per_block = N.sample_mus(net, x[b:b + 1])
        mus, info = per_block[bi]
        for name, mu in zip(blk.inputs, mus):        # mu[j, i] = mu(i -> j)
            g = got[name][b].reshape(mu.shape[0], -1)
            assert torch.allclose(g, mu, rtol=0, atol=1e-10), (layer, name, (g - mu).abs().max())
        total = sum(got[n][b].flatten(1).sum(1) for n in blk.inputs)
        ok = ~info["degenerate"]
        assert ok.any() and torch.allclose(total[ok], torch.ones_like(total[ok]), atol=1e-10)
    if layer == "block1_act2":
        # the skip input 'relu' also reaches the block through block1_act1: the plain seeded
        # read-out there is not the one-block share, so the subtraction is doing real work
        plain = e.erf(x, layer, read=["relu"])["relu"]
        assert (plain - got["relu"]).abs().max() > 1e-3


def test_explain_pfv_conserves_erfs_and_matches_the_index():
    m, e = _small()
    X = torch.randn(8, 3, 12, 12, dtype=torch.float64)
    idx = PFVIndex.build(e, X, "act3", dtype=torch.float64)
    res = explain_pfv(e, idx, X, image=2, k=3, n_sub=5, distinct_images=False)
    q = res.query
    # the default position is the most relevant PFV of the layer, and its share is R_j / sum R
    assert q.position == tuple(int(v) for v in torch.unravel_index(res.relevance.argmax(), res.relevance.shape))
    assert q.score == pytest.approx(float(res.relevance[q.position] / res.relevance.sum()), abs=1e-12)
    # ERFs of a one-hot seed sum to 1 (non-degenerate norms), the neighbours' equal plain erf calls
    assert float(q.erf.sum()) == pytest.approx(1, abs=1e-10)
    sims, rows = idx.search(idx.vector(2, q.position), 3, exclude_images=2)
    assert [(nb.image, nb.position) for nb in res.neighbours] == idx.locate(rows)
    for nb, s in zip(res.neighbours, sims.tolist()):
        assert nb.image != 2 and nb.score == pytest.approx(s)
        assert float(nb.erf.sum()) == pytest.approx(1, abs=1e-10)
        assert torch.allclose(nb.erf, e.erf(X[nb.image:nb.image + 1], "act3", [nb.position])[0, 0], atol=1e-12)
    # the sub-concepts are the largest entries of the share map, and the shares sum to 1
    (key, shares), = res.shares.items()
    assert key == "act2" and float(shares.sum()) == pytest.approx(1, abs=1e-10)
    nonzero = shares.flatten()[shares.flatten() != 0]
    assert [s.score for s in res.sub_concepts] == sorted(nonzero.tolist(), reverse=True)[:5]
    for s in res.sub_concepts:
        assert s.score == pytest.approx(float(shares[s.position]))
        assert float(s.erf.sum()) == pytest.approx(1, abs=1e-10)
    fig = plot_concepts(res, X)
    assert len(fig.axes) == 2 * max(2 + 3, 1 + 1 + 5)   # query, its crop, 3 NNs / share map, 5 subs
    import matplotlib.pyplot as plt
    plt.close(fig)


def test_erf_box():
    e = torch.zeros(20, 30)
    e[10, 4] = 1
    assert erf_box(e, min_size=6) == (8, 2, 14, 8)         # grown around the pixel
    assert erf_box(e, min_size=1) == (10, 4, 11, 5)
    e = torch.zeros(20, 30)
    e[19, 0] = 1
    assert erf_box(e, min_size=6) == (14, 0, 20, 6)        # clipped to the image
    e = torch.zeros(20, 30)
    e[2:5, 20:29] = 1.0
    e[15, 0] = -5            # negative mass is ignored
    e[19, 29] = 0.01          # a faint pixel outside 90 % of the mass
    assert erf_box(e, mass=0.9, min_size=1) == (2, 20, 5, 29)
    assert erf_box(e, mass=1.0, min_size=1) == (2, 20, 20, 30)
    assert erf_box(torch.full((5, 5), -1.0)) == (0, 0, 5, 5)


def test_bad_inputs_are_refused_with_a_reason():
    m, e = _small(torch.float32)
    X = torch.randn(4, 3, 12, 12)
    idx = PFVIndex.build(e, X, "act2")
    with pytest.raises(srd_fx.InputError, match="outside the layer's grid"):
        idx.row(0, (6, 0))
    with pytest.raises(srd_fx.InputError, match="queries must be"):
        idx.search(torch.randn(3, 5))
    with pytest.raises(srd_fx.InputError, match="one size"):
        PFVIndex.build(e, [torch.randn(3, 12, 12), torch.randn(3, 16, 16)], "act2", batch_size=2)
    with pytest.raises(srd_fx.InputError, match="exclude_images"):
        idx.search(torch.randn(2, 8), exclude_images=[0, 1, 2])
    with pytest.raises(srd_fx.NonFiniteError):
        idx.search(torch.full((8,), float("nan")))
    with pytest.raises(srd_fx.InputError, match="input has no PFVs"):
        feature_extractor(e, "input")
    with pytest.raises(srd_fx.InputError, match="outside layer"):
        sub_concepts(e, X[:1], "act2", [(9, 9)])


def test_cli_writes_the_figure(tmp_path, capsys):
    from PIL import Image
    from srd_fx.cli import main
    png, js = tmp_path / "c.png", tmp_path / "c.json"
    rc = main(["concepts", "--arch", "vgg", "--epochs", "1", "--n-train", "32", "--n-test", "8",
               "--n-index", "6", "--image", "1", "-k", "2", "--cache-dir", str(tmp_path / "cache"),
               "--out", str(png), "--json", str(js)])
    assert rc == 0
    w, h = Image.open(png).size
    assert w > 500 and h > 300
    rec = json.loads(js.read_text())
    assert rec["query"]["image"] == 1 and rec["n_index"] == 6
    assert rec["query"]["erf_sum"] == pytest.approx(1, abs=1e-4)
    assert len(rec["neighbours"]) == 2 and all(n["image"] != 1 for n in rec["neighbours"])
    assert rec["neighbours"][0]["cosine"] >= rec["neighbours"][1]["cosine"]
    assert sum(rec["share_sums"].values()) == pytest.approx(1, abs=1e-4)
    assert "wrote" in capsys.readouterr().out
