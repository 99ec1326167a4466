"""SSCD extractor: parity with the authors' model definition on random weights, checkpoint handling.

The reference is written here from the definition in facebookresearch/sscd-copy-detection
(``sscd/models/model.py``: ``Model("TV_RESNET50", 512, 3.0)`` = torchvision ``resnet50(num_classes=512,
zero_init_residual=True)`` whose ``avgpool`` is ``GlobalGeMPool2d(3)``, then ``L2Norm``; ``gem_pooling.py``), fed by
the README's ``small_288`` transform (``Resize(288)``, ``ToTensor``, ``Normalize``). Its ``state_dict`` has the
release's ``.torchvision.pt`` layout (``backbone.*``), which is what fd-eval loads.
"""
from __future__ import annotations

import pytest
import torch
import torchvision.transforms as T
from PIL import Image
from torch import nn
from torchvision.models import resnet50

import fd_eval
from _images import photo_crops
from fd_eval.errors import FDEvalError, WeightsError
from fd_eval.extractors.sscd import SSCD_COPY_THRESHOLD, SSCDNet

SMALL_288 = T.Compose([T.Resize(288), T.ToTensor(),
                       T.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])])


class RefGeM(nn.Module):
    """GlobalGeMPool2d: (N, C, H, W) -> (N, C) = mean over H*W of clamp(x, 1e-6)^p, to the power 1/p."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x):
        n, c, h, w = x.size()
        return x.reshape(n, c, h * w).clamp(min=1e-6).pow(self.p).mean(dim=2).pow(1.0 / self.p)


class RefL2Norm(nn.Module):
    def forward(self, x):
        return nn.functional.normalize(x)


class RefModel(nn.Module):
    """The authors' TV_RESNET50 Model, written from its definition."""

    def __init__(self):
        super().__init__()
        self.backbone = resnet50(num_classes=512, zero_init_residual=True)
        self.backbone.avgpool = RefGeM(3.0)
        self.embeddings = RefL2Norm()

    def forward(self, x):
        return self.embeddings(self.backbone(x))


@pytest.fixture(scope="module")
def ref_and_path(tmp_path_factory):
    """A random RefModel (every tensor randomised, BN statistics included, so eval-mode BN is not the identity)
    saved as its state_dict (the release's torchvision-format layout)."""
    g = torch.Generator().manual_seed(0)
    ref = RefModel().eval()
    with torch.no_grad():
        for k, v in ref.state_dict().items():
            if not v.is_floating_point():
                continue
            if k.endswith("running_var") or (k.endswith("weight") and v.ndim == 1):
                v.copy_(0.5 + torch.rand(v.shape, generator=g))  # BN scales and variances: positive, O(1)
            elif k.endswith("bias") or k.endswith("running_mean"):
                v.copy_(0.1 * torch.randn(v.shape, generator=g))
            else:
                fan_in = max(1, v[0].numel())
                v.copy_(torch.randn(v.shape, generator=g) * (2.0 / fan_in) ** 0.5)
    path = tmp_path_factory.mktemp("sscd") / "sscd_disc_mixup.torchvision.pt"
    torch.save(ref.state_dict(), path)
    return ref, path


def test_parity_with_the_authors_definition(ref_and_path, one_thread):
    ref, path = ref_and_path
    assert all(k.startswith("backbone.") for k in ref.state_dict())  # the release's key layout
    ex = fd_eval.load_extractor("sscd-disc-mixup", weights=path)
    imgs = photo_crops(3, 256, 256, seed=3)
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous()
    got = ex(x)
    with torch.no_grad():
        want = ref(torch.stack([SMALL_288(Image.fromarray(a)) for a in imgs]))
    assert got.shape == (3, 512) and got.dtype == torch.float32
    assert torch.allclose(got.norm(dim=1), torch.ones(3), atol=1e-6)
    assert (got - want).abs().max().item() <= 2e-5
    # batch composition does not change an image's descriptor beyond float32 rounding
    assert (ex(x[1:2]) - got[1:2]).abs().max().item() <= 1e-5
    assert ex.metadata()["feature_dim"] == 512 and ex.preprocess_spec.size == (288, 288)
    assert ex.weights_sha256 is not None


def test_bare_resnet_keys_and_safetensors(ref_and_path, tmp_path):
    ref, _ = ref_and_path
    from safetensors.torch import save_file

    bare = {k.removeprefix("backbone."): v.contiguous() for k, v in ref.state_dict().items()}
    save_file(bare, str(tmp_path / "w.safetensors"))
    a = fd_eval.load_extractor("sscd-disc-mixup", weights=tmp_path / "w.safetensors", size=64)
    sd = a.model.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in ref.state_dict().items())


def test_bad_checkpoints(ref_and_path, tmp_path):
    ref, _ = ref_and_path
    sd = dict(ref.state_dict())
    del sd["backbone.layer1.0.conv1.weight"]
    torch.save(sd, tmp_path / "missing.pt")
    with pytest.raises(WeightsError, match="missing.pt: keys do not match the model: 1 missing"):
        fd_eval.load_extractor("sscd-disc-mixup", weights=tmp_path / "missing.pt")
    sd = dict(ref.state_dict())
    sd["backbone.fc.weight"] = torch.zeros(1024, 2048)
    torch.save(sd, tmp_path / "large.pt")
    with pytest.raises(FDEvalError, match=r"fc.weight has shape \(1024, 2048\), expected \(512, 2048\)"):
        fd_eval.load_extractor("sscd-disc-mixup", weights=tmp_path / "large.pt")
    with pytest.raises(FDEvalError, match="takes only the option 'size'"):
        fd_eval.load_extractor("sscd-disc-mixup", weights=tmp_path / "large.pt", resize="torch")


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_torchscript_archive_is_refused_not_executed(tmp_path, monkeypatch):
    """The release's .torchscript.pt would run code when loaded (torch.load(weights_only=True) hands TorchScript
    archives to torch.jit.load): it must be refused before any loader sees it."""
    scripted = torch.jit.script(nn.Linear(2, 2))
    scripted.save(str(tmp_path / "sscd_disc_mixup.torchscript.pt"))

    def no_jit(*a, **k):
        raise AssertionError("torch.jit.load called")

    monkeypatch.setattr(torch.jit, "load", no_jit)
    with pytest.raises(WeightsError, match="is a TorchScript archive .loading it runs its code.; pass the plain"):
        fd_eval.load_extractor("sscd-disc-mixup", weights=tmp_path / "sscd_disc_mixup.torchscript.pt")


def test_registered():
    assert "sscd-disc-mixup" in fd_eval.list_extractors()
    from fd_eval.extractors import extractor_entry

    assert extractor_entry("sscd-disc-mixup").feature_dim == 512
    assert SSCD_COPY_THRESHOLD == 0.75
    assert set(SSCDNet().state_dict()) == set(RefModel().state_dict())


# --- sscd-disc-mixup-short288: the README's Resize(288) for every image (short edge to 288, aspect kept) -------
def _hwc(h: int, w: int, seed: int):
    return photo_crops(1, h, w, seed=seed)[0]


def test_short288_equals_the_readme_transform_on_non_square_images(ref_and_path, one_thread):
    """A landscape and a portrait image: features == the reference model on SMALL_288 (torchvision Resize(288) on
    PIL, ToTensor, Normalize) to 1e-5; the squashing default differs on the same image."""
    ref, path = ref_and_path
    ex = fd_eval.load_extractor("sscd-disc-mixup-short288", weights=path)
    sq = fd_eval.load_extractor("sscd-disc-mixup", weights=path)
    assert ex.metadata()["preprocess"]["resize_mode"] == "short-edge"
    assert "resize_mode" not in sq.metadata()["preprocess"]  # the default's record is unchanged
    for h, w, seed in ((200, 300, 5), (301, 203, 6)):
        a = _hwc(h, w, seed)
        t = SMALL_288(Image.fromarray(a))
        assert min(t.shape[1:]) == 288 and t.shape[1] != t.shape[2]
        with torch.no_grad():
            want = ref(t[None])
        x = torch.from_numpy(a).permute(2, 0, 1)[None].contiguous()
        assert (ex(x) - want).abs().max().item() <= 1e-5
        assert (sq(x) - want).abs().max().item() > 1e-3


def test_short288_pipeline_mixed_sizes_any_batch_size(ref_and_path, tmp_path, one_thread):
    """A folder of square, landscape and portrait images (interleaved): every batch size gives each image the
    reference transform's features, in the source order (runs of one size go through the network separately)."""
    from _images import save_images

    ref, path = ref_and_path
    ex = fd_eval.load_extractor("sscd-disc-mixup-short288", weights=path)
    sizes = [(200, 300), (256, 256), (301, 203), (200, 300), (200, 300), (256, 256)]
    imgs = [_hwc(h, w, 10 + i) for i, (h, w) in enumerate(sizes)]
    folder = tmp_path / "mixed"
    for i, a in enumerate(imgs):
        save_images(a[None], folder / f"{i}")  # folder/i/000.png: sorted paths keep this order
    with torch.no_grad():
        want = torch.cat([ref(SMALL_288(Image.fromarray(a))[None]) for a in imgs]).numpy()
    got = {}
    for b in (1, 2, 4):
        st = fd_eval.compute_stats(folder, extractors=[ex], keep_features=True, batch_size=b, num_workers=0,
                                   progress=False)
        got[b] = st["sscd-disc-mixup-short288"].features
        assert abs(got[b] - want).max() <= 1e-5
    assert abs(got[1] - got[4]).max() <= 1e-5 and abs(got[2] - got[4]).max() <= 1e-5


def test_index_of_the_other_sscd_preprocessing_is_refused(ref_and_path, tmp_path):
    """An index made with the squashing default is refused for short288 (one line naming both), and the
    preprocessing record alone tells them apart."""
    from fd_eval.errors import InputError
    from fd_eval.index.build import index_from_features

    _, path = ref_and_path
    sq = fd_eval.load_extractor("sscd-disc-mixup", weights=path)
    short = fd_eval.load_extractor("sscd-disc-mixup-short288", weights=path)
    idx = index_from_features(tmp_path / "i", "sscd-disc-mixup", sq.metadata(),
                              torch.nn.functional.normalize(torch.randn(10, 512), dim=1), unit_rows=5)
    with pytest.raises(InputError, match="holds sscd-disc-mixup features, not sscd-disc-mixup-short288"):
        idx.check_extractor("sscd-disc-mixup-short288", short.metadata())
    with pytest.raises(InputError, match="preprocessing .*resize_mode=None \\(index\\) vs .*'short-edge'"):
        idx.check_extractor("sscd-disc-mixup", {**short.metadata(), "extractor": "sscd-disc-mixup"})
    idx.check_extractor("sscd-disc-mixup", sq.metadata())  # the same preprocessing: accepted
