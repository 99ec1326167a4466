"""Copy detection: exact top-K (ties by key), merge of partitions, AuthPct and C_T against their definitions, and
the end-to-end check on planted copies.

References are brute force: every (generated, training) similarity at once, sorted by (similarity desc, key asc).
The planted-copy checks run twice: with a pixel-thumbnail extractor (discriminative without trained weights, so
'novel images are not found' is testable at SSCD's threshold) and with the real SSCD architecture on random weights
(rank-1 recovery of exact copies and JPEG re-encodes; random weights do not discriminate novel images).
"""
from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import fd_eval
from _images import photo_crops, save_images
from fd_eval.errors import EmptySourceError, InputError
from fd_eval.extractors import Extractor
from fd_eval.extractors.preprocess import PreprocessSpec
from fd_eval.metrics import copies as cp


# --- helpers -------------------------------------------------------------------------------------------------
def brute_topk(q: torch.Tensor, t: torch.Tensor, keys: torch.Tensor, k: int, exclude=None):
    """(sims float32 (Q, k), keys (Q, k)) by sorting every pair: similarity desc, then key asc."""
    qn = torch.nn.functional.normalize(q.double(), dim=1)
    tn = torch.nn.functional.normalize(t.double(), dim=1).float().double()  # float32 unit training vectors
    s = (qn @ tn.T).float().numpy()
    out_s, out_k = [], []
    for r in range(len(q)):
        pairs = sorted(((-float(s[r, c]), int(keys[c])) for c in range(len(t))
                        if exclude is None or int(keys[c]) != int(exclude[r])))[:k]
        out_s.append([-a for a, _ in pairs])
        out_k.append([b for _, b in pairs])
    return torch.tensor(out_s, dtype=torch.float32), torch.tensor(out_k)


def feed(consumer, t: torch.Tensor, keys: torch.Tensor, bs: int) -> None:
    for i in range(0, len(t), bs):
        consumer.update(t[i:i + bs], keys[i:i + bs])


def tied_features(n_q=7, n_t=50, d=16, seed=0):
    """Queries and training rows with many exact ties: training rows repeat, and some queries equal rows."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(12, d, generator=g).round()  # small integers: many equal similarities
    t = base[torch.randint(0, 12, (n_t,), generator=g)]
    q = torch.cat([t[:3], torch.randn(n_q - 3, d, generator=g)])
    keys = torch.randperm(1000, generator=g)[:n_t].to(torch.int64)  # keys not in stream order
    return q, t, keys


# --- packing and top-K ---------------------------------------------------------------------------------------
def test_pack_orders_by_similarity_then_key():
    g = torch.Generator().manual_seed(1)
    sims = torch.tensor([1.0, -1.0, 0.0, -0.0, 0.5, 0.5, -0.25, 1e-30, -1e-30, 0.75] * 2)
    keys = torch.randint(0, cp.MAX_KEY + 1, (20,), generator=g)
    keys[:3] = torch.tensor([0, cp.MAX_KEY, 7])
    packed = cp.pack(sims, keys)
    s, k, v = cp.unpack(packed)
    assert v.all() and torch.equal(k, keys) and torch.equal(s, sims + 0.0)
    order = torch.argsort(packed, descending=True).tolist()
    want = sorted(range(20), key=lambda i: (-float(sims[i]), int(keys[i])))
    assert order == want
    e = cp.unpack(torch.full((2,), cp.EMPTY))
    assert not e[2].any() and e[1].tolist() == [-1, -1]


@pytest.mark.parametrize("bs", [1, 7, 50])
def test_topk_equals_brute_force_with_ties(bs):
    q, t, keys = tied_features()
    c = cp.TopKConsumer(q, 5, keep_top1_features=True)
    feed(c, t, keys, bs)
    s, k, v = cp.unpack(c.state.packed)
    ws, wk = brute_topk(q, t, keys, 5)
    assert v.all() and torch.equal(k, wk) and torch.equal(s, ws)
    # the kept top-1 feature is the top-1 training row's unit vector
    row = {int(kk): i for i, kk in enumerate(keys)}
    want = torch.nn.functional.normalize(t[[row[int(x)] for x in k[:, 0]]].double(), dim=1).float()
    assert torch.equal(c.state.top1_features, want)
    assert c.state.n_seen == len(t)
    c.check_keys()
    c.update(t[:2], torch.tensor([1, -1]))
    with pytest.raises(fd_eval.FDEvalError, match="training keys must lie in 0..4294967294"):
        c.check_keys()


def test_fewer_training_images_than_k_and_exclusion():
    q, t, keys = tied_features(n_t=3)
    c = cp.TopKConsumer(q, 5)
    feed(c, t, keys, 2)
    s, k, v = cp.unpack(c.state.packed)
    assert v[:, :3].all() and not v[:, 3:].any() and (k[:, 3:] == -1).all() and torch.isnan(s[:, 3:]).all()
    q, t, keys = tied_features()
    ex = keys[torch.arange(len(q)) % len(keys)]
    c = cp.TopKConsumer(q, 3, exclude=ex)
    feed(c, t, keys, 9)
    s, k, _ = cp.unpack(c.state.packed)
    ws, wk = brute_topk(q, t, keys, 3, exclude=ex)
    assert torch.equal(k, wk) and torch.equal(s, ws) and not (k == ex[:, None]).any()


def test_merge_of_two_halves_equals_one_pass():
    """Any partition of the training set (shards, ranks), merged in any order, equals one pass: bit-identical."""
    q, t, keys = tied_features(n_t=61, seed=3)
    one = cp.TopKConsumer(q, 4, keep_top1_features=True)
    feed(one, t, keys, 8)
    perm = torch.randperm(61, generator=torch.Generator().manual_seed(0))
    parts = [perm[:25], perm[25:]]
    halves = []
    for p in parts:
        h = cp.TopKConsumer(q, 4, keep_top1_features=True)
        feed(h, t[p], keys[p], 8)
        halves.append(h.state)
    for merged in (halves[0].merge(halves[1]), halves[1].merge(halves[0])):
        assert torch.equal(merged.packed, one.state.packed)
        assert torch.equal(merged.top1_features, one.state.top1_features)
        assert merged.n_seen == 61
    assert torch.equal(cp.merge_topk(halves[0].packed, halves[1].packed), one.state.packed)
    # a saved shard state round-trips
    back = cp.TopKState.from_state_dict(halves[0].state_dict())
    assert torch.equal(back.packed, halves[0].packed) and back.n_seen == halves[0].n_seen


# --- AuthPct and C_T ------------------------------------------------------------------------------------------
def test_authpct_matches_dgm_eval_definition():
    g = torch.Generator().manual_seed(5)
    train = torch.nn.functional.normalize(torch.randn(40, 8, generator=g), dim=1)
    gen = torch.nn.functional.normalize(torch.cat([train[:6] + 0.05 * torch.randn(6, 8, generator=g),
                                                   torch.randn(14, 8, generator=g)]), dim=1)
    keys = torch.arange(40)
    first = cp.TopKConsumer(gen, 1, keep_top1_features=True)
    feed(first, train, keys, 16)
    _, k1, _ = cp.unpack(first.state.packed)
    second = cp.TopKConsumer(first.state.top1_features, 1, exclude=k1[:, 0])
    feed(second, train, keys, 16)
    got = cp.authpct(cp.unpack(first.state.packed)[0][:, 0], cp.unpack(second.state.packed)[0][:, 0])
    # dgm-eval compute_authpct, written from its definition, in float64 on the same unit vectors
    real = torch.cdist(train.double(), train.double())
    real.fill_diagonal_(float("inf"))
    gd = torch.cdist(train.double(), gen.double())
    gmin = gd.min(dim=0)
    want = float(100 * (real.min(dim=0).values[gmin.indices] < gmin.values).double().mean())
    assert got == pytest.approx(want, abs=1e-12) and 0 < got < 100


def test_cell_distances_equal_brute_force_and_ct_closed_form():
    g = torch.Generator().manual_seed(2)
    centres = torch.tensor([[10.0, 0, 0], [0, 10.0, 0], [0, 0, 10.0]])
    blob = lambda n: centres[torch.arange(n) % 3] + torch.randn(n, 3, generator=g)  # noqa: E731
    test, train, gen = blob(90), blob(120), blob(75)
    model = cp.fit_cells(test)
    assert sorted(model.cells(model.project(centres)).tolist()) == [0, 1, 2]  # k-means found the three blobs
    cons = cp.CellNNConsumer(model, torch.cat([test, gen]))
    feed(cons, train, torch.arange(120), 17)
    z, tz = model.project(torch.cat([test, gen])), model.project(train)
    zc, tc = model.cells(z), model.cells(tz)
    d = torch.cdist(z, tz).masked_fill(zc[:, None] != tc[None], float("inf")).min(1).values
    assert torch.allclose(cons.dist, d, rtol=0, atol=1e-12)
    assert cons.train_counts.tolist() == torch.bincount(tc, minlength=3).tolist()
    halves = [cp.CellNNConsumer(model, torch.cat([test, gen])) for _ in range(2)]
    feed(halves[0], train[:50], torch.arange(50), 17)
    feed(halves[1], train[50:], torch.arange(50, 120), 17)
    halves[0].merge(halves[1])
    assert torch.equal(halves[0].dist, cons.dist) and torch.equal(halves[0].train_counts, cons.train_counts)
    # closed form: every generated distance below every test distance in each cell -> U = 0 in each cell
    lt, lg = np.full(90, 2.0), np.full(75, 1.0)
    ct = cp.ct_from_distances(lt, np.arange(90) % 3, lg, np.arange(75) % 3, np.array([40, 40, 40]))
    n, m = 30, 25
    assert ct == pytest.approx((0 - (n * m / 2 - 0.5)) / math.sqrt(n * m * (n + m + 1) / 12), rel=1e-12)
    # against U counted pair by pair (ties count 1/2), on random distances in uneven cells
    rng = np.random.default_rng(0)
    lt, lg = rng.random(60).round(2), rng.random(80).round(2)
    tc, gc = rng.integers(0, 3, 60), np.r_[np.zeros(50, int), rng.integers(1, 3, 30)]
    zs, ws = [], []
    for i in range(3):
        a, b = lt[tc == i], lg[gc == i]
        u = sum((x > y) + 0.5 * (x == y) for x in b for y in a)
        if len(b) > 20:
            zs.append((u - (len(a) * len(b) / 2 - 0.5)) / math.sqrt(len(a) * len(b) * (len(a) + len(b) + 1) / 12))
            ws.append(np.mean(tc == i))
    assert len(zs) >= 1
    got = cp.ct_from_distances(lt, tc, lg, gc, np.array([5, 5, 5]))
    assert got == pytest.approx(float(np.dot(ws, zs) / np.sum(ws)), rel=1e-12)
    with pytest.warns(RuntimeWarning, match="holds no training image"):
        assert cp.ct_from_distances(lt, np.arange(90) % 3, lg, np.arange(75) % 3, np.array([40, 0, 40])) is None


# --- end to end -----------------------------------------------------------------------------------------------
class _Thumb(nn.Module):
    def forward(self, x):
        x = x.flatten(1)
        return x - x.mean(1, keepdim=True)


class PixelExtractor(Extractor):
    """Test-only: Pillow bilinear 16x16 thumbnail, mean-centred pixels (768-d): near-duplicates match, unrelated
    images do not, without any trained weights."""

    def __init__(self):
        spec = PreprocessSpec("pil", "bilinear", True, (16, 16), 255.0, (0.0,) * 3, (1.0,) * 3)
        super().__init__("pixels-16", 768, spec, _Thumb(), None)

    def model_input(self, x):
        return x.float() / 255


def jpeg75(a: np.ndarray) -> np.ndarray:
    b = io.BytesIO()
    Image.fromarray(a).save(b, "JPEG", quality=75)
    return np.asarray(Image.open(b).convert("RGB"))


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """train: 24 photo crops; gen: 2 exact copies (train 3, 17), 2 JPEG q=75 re-encodes (train 5, 22), 4 novel."""
    root = tmp_path_factory.mktemp("planted")
    train = photo_crops(24, 128, 128, seed=1)
    rng = np.random.default_rng(99)  # novel: smooth random colour fields, unrelated to any photo
    novel = [np.asarray(Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((128, 128),
                                                                                              Image.BICUBIC))
             for _ in range(4)]
    gen = [train[3], train[17], jpeg75(train[5]), jpeg75(train[22])] + novel
    return save_images(np.stack(gen), root / "gen"), save_images(train, root / "train"), [3, 17, 5, 22]


def test_planted_copies_pixels(planted, tmp_path):
    gen, train, src = planted
    out = tmp_path / "copies.json"
    r = fd_eval.find_copies(gen, train, extractors=[PixelExtractor()], top_k=3, threshold=0.75, num_workers=0,
                            progress=False, json_path=out, sheet=tmp_path / "sheet.png", test=train)
    res = r.results["pixels-16"]
    top1 = [p["nearest"][0] for p in res["per_image"]]
    assert [t["index"] for t in top1[:4]] == src
    assert all(t["similarity"] > 0.75 for t in top1[:4]) and top1[0]["similarity"] == pytest.approx(1, abs=1e-6)
    assert all(t["similarity"] < 0.5 for t in top1[4:]), [t["similarity"] for t in top1[4:]]
    assert res["n_copies"] == 4 and res["copy_fraction"] == 0.5 and res["n_gen"] == 8 and res["n_train"] == 24
    assert top1[0]["key"].endswith("train/003.png") and res["per_image"][0]["name"].endswith("gen/000.png")
    assert [len(p["nearest"]) for p in res["per_image"]] == [3] * 8
    sims = [p["nearest"][0]["similarity"] for p in res["per_image"]]
    assert res["quantiles"]["0.0"] == pytest.approx(min(sims)) and res["quantiles"]["1.0"] == pytest.approx(max(sims))
    assert sum(res["histogram"]["counts"]) == 8 and len(res["histogram"]["edges"]) == 81
    # AuthPct: exact copies sit on their training image (d1 = 0 is never beaten): not authentic
    assert res["authpct"] is not None and res["authpct"] <= 75.0
    doc = json.loads(out.read_text())
    assert set(doc) == {"results", "provenance", "inputs"}
    # per-source accounting, as compute reports it: every candidate entry found, used, skipped or ignored
    acc = {k: (v["found"], v["used"], len(v["skipped"])) for k, v in doc["inputs"].items()}
    assert acc == {"generated": (8, 8, 0), "train": (24, 24, 0), "test": (24, 24, 0)}, doc["inputs"]
    # the provenance schema of every result (compute's): versions, extractors' weights and preprocessing
    assert {"versions", "device", "created", "extractors", "precision", "generated", "train", "test"} <= set(
        doc["provenance"])
    assert {"per_image", "threshold", "n_copies", "copy_fraction", "quantiles", "authpct", "ct"} <= set(
        doc["results"]["pixels-16"])
    assert doc["provenance"]["train"]["spec"] == str(train)
    with Image.open(tmp_path / "sheet.png") as im:
        assert im.format == "PNG" and im.size[0] > 2 * 160


def test_planted_copies_sscd_random_weights(planted, tmp_path, one_thread):
    """The real SSCD network (random weights, 64 px input to keep the test short): exact copies and JPEG
    re-encodes are rank 1."""
    from fd_eval.extractors.sscd import SSCDNet

    gen, train, src = planted
    torch.manual_seed(0)
    torch.save(SSCDNet().state_dict(), tmp_path / "w.pt")
    ex = fd_eval.load_extractor("sscd-disc-mixup", weights=tmp_path / "w.pt", size=64)
    r = fd_eval.find_copies(gen, train, extractors=[ex], top_k=2, num_workers=0, progress=False,
                            compute_authpct=False, batch_size=5)
    res = r.results["sscd-disc-mixup"]
    assert res["threshold"] == 0.75 and res["authpct"] is None and res["ct"] is None
    top1 = [p["nearest"][0] for p in res["per_image"][:4]]
    assert [t["index"] for t in top1] == src
    assert top1[0]["similarity"] >= 1 - 1e-6 and top1[1]["similarity"] >= 1 - 1e-6


def test_errors(planted, tmp_path, monkeypatch):
    gen, train, _ = planted
    (tmp_path / "empty").mkdir()
    with pytest.raises(EmptySourceError, match=r"training source \(--train\) is empty: .*empty: no images found"):
        fd_eval.find_copies(gen, tmp_path / "empty", extractors=[PixelExtractor()], progress=False)
    monkeypatch.setattr(cp, "available_memory", lambda dev: 1 << 20)
    need = f"{cp.memory_needed(8, 5, 768) / 2**30:.2f}"
    with pytest.raises(InputError, match=rf"gen: 8 generated images with top-K = 5 for pixels-16 need {need} GiB on "
                                         r"cpu, 0\.00 GiB free; lower --top"):
        fd_eval.find_copies(gen, train, extractors=[PixelExtractor()], top_k=5, threshold=0.5, progress=False)
    monkeypatch.undo()
    with pytest.warns(UserWarning, match="pixels-16 is not a copy detector: the default copy threshold 0.75 is SSCD"):
        fd_eval.find_copies(gen, train, extractors=[PixelExtractor()], top_k=1, num_workers=0, progress=False,
                            compute_authpct=False)


def test_find_copies_metrics_equal_direct_computation(one_thread):
    """AuthPct and C_T of the streaming pass equal dgm-eval's formulas on all features held at once (arrays as
    sources: no files)."""
    train = photo_crops(60, 32, 32, seed=4)
    test = photo_crops(60, 32, 32, seed=5)
    gen = np.concatenate([np.stack([jpeg75(a) for a in train[:35]]), photo_crops(35, 32, 32, seed=6)])
    ex = PixelExtractor()
    r = fd_eval.find_copies(gen, train, extractors=[ex], test=test, top_k=2, threshold=0.9, num_workers=0,
                            batch_size=7, progress=False)
    res = r.results["pixels-16"]
    nchw = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2).contiguous()  # noqa: E731
    fg, ft, fp = ex(nchw(gen)), ex(nchw(train)), ex(nchw(test))
    # AuthPct, dgm-eval's definition on the unit vectors
    g, t = torch.nn.functional.normalize(fg.double(), dim=1), torch.nn.functional.normalize(ft.double(), dim=1)
    real = torch.cdist(t, t)
    real.fill_diagonal_(float("inf"))
    gmin = torch.cdist(t, g).min(dim=0)
    want = float(100 * (real.min(dim=0).values[gmin.indices] < gmin.values).double().mean())
    assert res["authpct"] == pytest.approx(want, abs=1e-9)
    # C_T: cells fitted on the held-out features, in-cell nearest-training distances by brute force
    model = cp.fit_cells(fp)
    z, tz = model.project(torch.cat([fp, fg])), model.project(ft)
    zc, tc = model.cells(z), model.cells(tz)
    d = torch.cdist(z, tz).masked_fill(zc[:, None] != tc[None], float("inf")).min(1).values.numpy()
    want = cp.ct_from_distances(d[:60], zc[:60].numpy(), d[60:], zc[60:].numpy(),
                                torch.bincount(tc, minlength=3).numpy())
    assert want is not None and res["ct"] == pytest.approx(want, rel=1e-9)


def test_saved_feature_shards_and_authpct_from_them(planted, tmp_path):
    g = torch.Generator().manual_seed(7)
    f, i = torch.randn(11, 5, generator=g), torch.arange(100, 111)
    w = cp.FeatureShardWriter(tmp_path / "w", {"extractor": "x"}, rows=4)
    feed(w, f, i, 3)
    w.close()
    got = list(cp.read_feature_shards(tmp_path / "w"))
    assert [len(x) for x, _ in got] == [4, 4, 3] and w.shards == 3
    assert torch.equal(torch.cat([x for x, _ in got]), f) and torch.equal(torch.cat([y for _, y in got]), i)
    gen, train, _ = planted
    kw = dict(extractors=[PixelExtractor()], top_k=2, threshold=0.75, num_workers=0, progress=False)
    a = fd_eval.find_copies(gen, train, **kw)
    b = fd_eval.find_copies(gen, train, save_features=tmp_path / "feats", **kw)
    assert a.results["pixels-16"]["authpct"] == b.results["pixels-16"]["authpct"]
    assert a.results["pixels-16"]["per_image"] == b.results["pixels-16"]["per_image"]
    saved = list(cp.read_feature_shards(tmp_path / "feats" / "pixels-16"))
    assert sum(len(x) for x, _ in saved) == 24
    with pytest.raises(EmptySourceError, match="no saved feature shards"):
        list(cp.read_feature_shards(tmp_path))


def test_bad_arguments_fail_before_any_work(planted, monkeypatch):
    gen, train, _ = planted
    with pytest.raises(InputError, match="--top must be a positive integer, got 0"):
        fd_eval.find_copies(gen, train, top_k=0)
    with pytest.raises(InputError, match=r"--threshold is a cosine similarity in \[-1, 1\], got 75"):
        fd_eval.find_copies(gen, train, threshold=75)
    # the memory check comes before the (offline: failing) weights download, and names the model by registry
    monkeypatch.setattr(cp, "available_memory", lambda dev: 0)
    with pytest.raises(InputError, match="for sscd-disc-mixup, dinov2-vits14 need"):
        fd_eval.find_copies(gen, train, models=["sscd-disc-mixup", "dinov2-vits14"])
