"""One options object (RunOptions) for every entry point, and the one extraction loop with pluggable consumers:
bad run options are one-line errors everywhere, keywords and ``options=`` are the same run, consumers see every
image's features with its source index, and compute_stats / build_stats give bit-identical statistics."""
import dataclasses

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import fd_eval
import fd_eval.extractors.dinov2 as dv
from _checkpoints import save_dinov2_checkpoint
from _gpic_shards import make_shards
from _images import photo_crops, save_images
from fd_eval.cli import main
from fd_eval.errors import FDEvalError
from fd_eval.run import pipeline
from fd_eval.run.options import OPTION_FIELDS, RunOptions, make_options

N, BS, DEPTH = 7, 3, 2


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("options")
    ckpt, _ = save_dinov2_checkpoint(root / "dinov2_vits14_pretrain.pth", "vits14", "official", seed=5, depth=DEPTH)
    images = photo_crops(N, 40, 48, seed=11)
    folder = save_images(images, root / "png")
    make_shards(root / "shards", photo_crops(6, 36, 36, seed=12), 3)
    ex = dv._build_extractor("vits14", False, weights=ckpt, _depth=DEPTH)
    return {"root": root, "folder": str(folder), "tar": str(root / "shards" / "gpic_test_{00000..00001}.tar"),
            "ex": ex, "images": images}


def _same(a, b):
    assert a.n == b.n and np.array_equal(a.mu, b.mu) and np.array_equal(a.sigma, b.sigma)


# --- validation ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, match", [
    ({"batch_size": 0}, r"--batch-size \(batch_size\) must be a positive integer, got 0"),
    ({"batch_size": True}, "must be a positive integer"),
    ({"num_workers": -1}, r"--num-workers \(num_workers\) must be a non-negative integer, got -1"),
    ({"device": "gpu0"}, "unknown device 'gpu0'; use cuda, cuda:N, cpu or auto"),
    ({"device": "meta"}, "unsupported device 'meta'"),
    ({"decode": "nvjpeg"}, "unknown decode mode 'nvjpeg'"),
    ({"precision": "half"}, "unknown precision 'half'"),
    ({"resize": "bilinear"}, "unknown resize 'bilinear'"),
])
def test_bad_run_options_are_one_line_errors(kw, match):
    with pytest.raises(FDEvalError, match=match) as e:
        RunOptions(**kw)
    assert "\n" not in str(e.value)


def test_cuda_without_a_gpu_is_one_line_for_every_entry_point(world, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    calls = [
        lambda: fd_eval.compute_stats(world["folder"], extractors=[world["ex"]], device="cuda"),
        lambda: fd_eval.compute_fd(world["folder"], ref=world["folder"], device="cuda"),
        lambda: fd_eval.build_stats(world["folder"], world["root"] / "x.safetensors", extractors=[world["ex"]],
                                    device="cuda"),
        lambda: fd_eval.ceiling(world["folder"], ref=world["folder"], extractors=[world["ex"]], device="cuda"),
        lambda: fd_eval.split_half(world["folder"], extractors=[world["ex"]], n=2, device="cuda"),
        lambda: fd_eval.FDMetric(extractors=[world["ex"]], ref=world["folder"], device="cuda:1"),
        lambda: fd_eval.evaluate_generator(lambda i, b: None, 4, 2, ref=world["folder"], extractors=[world["ex"]],
                                           device="cuda"),
    ]
    for call in calls:
        with pytest.raises(FDEvalError, match=r"^device 'cuda(:1)?': no usable CUDA GPU here") as e:
            call()
        assert "\n" not in str(e.value)
    for cmd in (["stats", world["folder"], "-o", str(world["root"] / "y.safetensors")],
                ["compute", world["folder"], "--ref", world["folder"]],
                ["ceiling", "--real", world["folder"]]):
        res = CliRunner().invoke(main, [*cmd, "--device", "cuda"])
        assert res.exit_code == 1 and res.output.startswith("Error: device 'cuda': no usable CUDA GPU here")
        assert res.output.count("\n") == 1 and "Traceback" not in res.output
    out = str(world["root"] / "z.safetensors")
    res = CliRunner().invoke(main, ["stats", world["folder"], "-o", out, "--batch-size", "0"])
    assert res.exit_code == 1 and res.output == "Error: --batch-size (batch_size) must be a positive integer, got 0\n"


def test_unknown_keywords_are_type_errors_naming_the_fields(world):
    with pytest.raises(TypeError, match=r"compute_stats\(\) got unexpected keyword argument\(s\) 'batchsize'; "
                                        r"its run options are the fields of fd_eval.RunOptions: device, batch_size"):
        fd_eval.compute_stats(world["folder"], extractors=[world["ex"]], batchsize=4)
    with pytest.raises(TypeError, match="FDMetric"):
        fd_eval.FDMetric(extractors=[world["ex"]], ref=world["folder"], nope=1)
    with pytest.raises(TypeError, match="options must be an fd_eval.RunOptions"):
        make_options({"device": "cpu"}, {}, "compute_fd")
    assert set(OPTION_FIELDS) >= {"device", "batch_size", "num_workers", "precision", "compile", "decode", "resize",
                                  "skip_bad", "progress", "offline"}
    # keywords override the options object; the object is frozen
    opts = make_options(RunOptions(batch_size=8, progress=False), {"batch_size": 2}, "x")
    assert (opts.batch_size, opts.progress) == (2, False)
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.batch_size = 3  # type: ignore[misc]


def test_options_object_and_keywords_are_the_same_run(world):
    kw = dict(device="cpu", batch_size=BS, num_workers=0, progress=False)
    a = fd_eval.compute_stats(world["folder"], extractors=[world["ex"]], **kw)["dinov2-vits14"]
    b = fd_eval.compute_stats(world["folder"], extractors=[world["ex"]], options=RunOptions(**kw))["dinov2-vits14"]
    _same(a, b)


# --- the loop and its consumers -----------------------------------------------------------------------------
class Rows:
    """A FeatureConsumer that keeps every (features, index) it is fed."""

    def __init__(self):
        self.feats, self.index = [], []

    def update(self, features, index):
        assert features.dtype == torch.float32 and index.dtype == torch.int64
        assert index.device == features.device and index.shape == (features.shape[0],)
        self.feats.append(features.clone())
        self.index.append(index.clone())


@pytest.mark.parametrize("chunk", [None, 1])
def test_consumers_see_every_image_with_its_source_index(world, monkeypatch, chunk):
    """Extra consumers beside the moments: every row once, in source order, with its index into the full source,
    also under a rank's shard and with loader items smaller than the model batch (the runner joins them)."""
    if chunk is not None:
        monkeypatch.setattr(pipeline, "loader_chunk", lambda bs, dev: chunk)
    ex = world["ex"]
    src = fd_eval.open_source(world["folder"])
    rows = Rows()
    assert isinstance(rows, pipeline.FeatureConsumer)
    ext = pipeline.extract(src, [ex], device="cpu", batch_size=BS, num_workers=0, progress=False,
                           keep_features=True, consumers=[[rows]])
    idx = torch.cat(rows.index)
    assert idx.tolist() == list(range(N))
    assert [len(i) for i in rows.index] == [BS, BS, N - 2 * BS]  # model batches of exactly batch_size
    assert torch.equal(torch.cat(rows.feats), ext.accumulators[0].features())
    # one rank's block: indices into the whole source, not into the block
    part = Rows()
    run = fd_eval.RunOptions(device="cpu", batch_size=BS, num_workers=0).resolve()
    pipeline.run_units(src, [ex], [pipeline.shard_indices(N, 1, 2)], lambda k: [[part]], run)
    assert torch.cat(part.index).tolist() == pipeline.shard_indices(N, 1, 2).tolist()
    # the same images give the same rows wherever they sit in a batch
    full = dict(zip(idx.tolist(), torch.cat(rows.feats)))
    for i, f in zip(torch.cat(part.index).tolist(), torch.cat(part.feats)):
        torch.testing.assert_close(f, full[i], rtol=1e-5, atol=1e-5)


def test_run_units_calls_back_per_unit_with_fresh_consumers(world):
    src = fd_eval.open_source(world["folder"])
    units = [np.array([0, 1, 2, 3]), np.array([5, 6])]
    made, done = [], []

    def consumers(k):
        made.append(k)
        return [fd_eval.MomentAccumulator(world["ex"].feature_dim)]

    run = fd_eval.RunOptions(device="cpu", batch_size=BS, num_workers=0).resolve()
    pipeline.run_units(src, [world["ex"]], units, consumers, run, on_unit=done.append)
    assert made == [0, 1] and [d.k for d in done] == [0, 1] and [d.n_images for d in done] == [4, 2]
    assert [d.consumers[0][0].n for d in done] == [4, 2]
    # a unit's moments equal extract() over that unit alone (batches never straddle units)
    alone = pipeline.extract(fd_eval.sources.SubsetSource(src, units[1]), [world["ex"]], device="cpu",
                             batch_size=BS, num_workers=0, progress=False).accumulators[0]
    assert torch.equal(alone.mean, done[1].consumers[0][0].mean) and torch.equal(alone.m2, done[1].consumers[0][0].m2)


@pytest.mark.parametrize("spec", ["folder", "tar"])
def test_compute_stats_and_build_stats_are_bit_identical(world, tmp_path, spec):
    """One unit (a folder block of all images; a single tar shard) runs exactly compute_stats's batches."""
    kw = dict(batch_size=BS, num_workers=0, progress=False)
    source = world["folder"] if spec == "folder" else world["tar"].replace("{00000..00001}", "00000")
    a = fd_eval.compute_stats(source, extractors=[world["ex"]], **kw)["dinov2-vits14"]
    b = fd_eval.build_stats(source, tmp_path / "s.safetensors", extractors=[world["ex"]], checkpoint_every=100,
                            **kw)["dinov2-vits14"]
    _same(a, b)
    _same(a, fd_eval.load_stats(tmp_path / "s.safetensors"))
