"""What people see around copy detection: ONNX weights refused in one line, progress bars that count images
embedded (not decoded), and C_T's null always explained by a warning."""
from __future__ import annotations

import numpy as np
import pytest

import fd_eval.run.pipeline as pl
from _images import photo_crops
from fd_eval import RunOptions
from fd_eval.errors import WeightsError
from fd_eval.extractors.weights import load_state_dict
from fd_eval.metrics import copies as cp
from fd_eval.sources import open_source
from test_copies import PixelExtractor


def test_onnx_weights_one_line_error(tmp_path):
    p = tmp_path / "model.onnx"
    p.write_bytes(b"\x08\x07\x12\x07pytorch\x1a\x052.1.0")
    with pytest.raises(WeightsError, match=r"model\.onnx: ONNX is not supported; pass the PyTorch weights") as e:
        load_state_dict(p)
    assert "\n" not in str(e.value) and "weights_only" not in str(e.value)


class Bar:
    def __init__(self, fed):
        self.n, self.fed, self.seen = 0, fed, []

    def update(self, k):
        self.n += k
        self.seen.append((self.n, self.fed[0]))


class Count:
    def __init__(self, fed):
        self.fed = fed

    def update(self, features, index):
        self.fed[0] += features.shape[0]


def test_progress_counts_images_embedded(monkeypatch):
    """Loader items of 2 images joined into model batches of 4 (as on a GPU): after every bar update the bar
    equals the images the network has embedded, never the images merely decoded."""
    monkeypatch.setattr(pl, "loader_chunk", lambda bs, dev: 2)
    src = open_source(photo_crops(11, 16, 16, seed=0))
    fed = [0]
    bar = Bar(fed)
    run = RunOptions(device="cpu", batch_size=4, num_workers=0).resolve()
    pl.run_units(src, [PixelExtractor()], [np.arange(11)], lambda k: [[Count(fed)]], run, bar=bar)
    assert bar.n == fed[0] == 11 and all(n == f for n, f in bar.seen)


def test_ct_null_is_always_warned():
    lt, lg = np.arange(30.0), np.arange(10.0)
    with pytest.warns(RuntimeWarning, match="no k-means cell holds more than 20 generated images"):
        assert cp.ct_from_distances(lt, np.arange(30) % 3, lg, np.arange(10) % 3, np.array([5, 5, 5])) is None
