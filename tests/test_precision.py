"""Precision modes (exact / fast), the GPU input paths' CPU behaviour, and the speed benchmarks in miniature.

What a CPU can check: exact mode switches TF32 off around the network and restores the caller's flags (both
PyTorch flag APIs), fast mode runs under bfloat16 autocast, the mode is recorded and mismatches are refused, the
FD moves only a little between modes but the two are never confused, ``decode="gpu"`` falls back to PIL without
a GPU and its device-decode path (run here with torchvision's CPU JPEG decoder, whose pixels equal Pillow's) gives
the same statistics, invalid combinations fail with one-line errors, and the benchmark scripts still run.
"""
from __future__ import annotations

import json
import shutil
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import fd_eval
from _checkpoints import save_dinov2_checkpoint
from _images import photo_crops, save_images
from fd_eval.cli import main
from fd_eval.errors import BadImageError, FDEvalError, StatsMismatchError
from fd_eval.extractors import precision
from fd_eval.extractors.precision import LazyCompiled, Precision, exact_numerics, fast_numerics, tf32_state
from fd_eval.run import pipeline
from fd_eval.sources import gpu_decode

MODEL = "dinov2-vits14"
N = 6
BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("precision")
    ckpt, _ = save_dinov2_checkpoint(root / "dinov2_vits14_pretrain.pth", "vits14", "official", seed=5)
    dirs = {}
    for name, seed in (("gen", 1), ("ref", 2)):
        dirs[name] = save_images(photo_crops(N, 64, 80, seed=seed), root / name)
    jpg = save_images(photo_crops(N, 72, 64, seed=3), root / "jpg", "jpg", quality=90)
    Image.fromarray(photo_crops(1, 64, 64, seed=4)[0]).save(jpg / "zz_png.png")  # a PNG among the JPEGs
    ex = fd_eval.load_extractor(MODEL, weights=ckpt)
    opts = dict(extractors=[ex], num_workers=0, progress=False)
    stats = {(name, mode): fd_eval.compute_stats(dirs[name], precision=mode, **opts)[MODEL]
             for name in ("gen", "ref") for mode in ("exact", "fast")}
    ex.set_precision("exact")
    return {"root": root, "ckpt": ckpt, "ex": ex, "jpg": jpg, "stats": stats, **dirs}


def _fd(a, b) -> float:
    return fd_eval.frechet_distance(a.mu, a.sigma, b.mu, b.sigma)


# --- flags ----------------------------------------------------------------------------------------------------
USER_SETTINGS = [
    lambda: None,  # PyTorch's defaults: cuDNN TF32 on, matmul TF32 off
    lambda: setattr(torch.backends.cudnn, "allow_tf32", False),
    lambda: setattr(torch.backends.cuda.matmul, "allow_tf32", True),
    lambda: torch.set_float32_matmul_precision("medium"),  # also asks oneDNN (CPU) for bf16 matmuls
]
if precision._NEW_API:
    USER_SETTINGS += [lambda: setattr(torch.backends, "fp32_precision", "tf32"),
                      lambda: setattr(torch.backends.cuda.matmul, "fp32_precision", "tf32")]


def _all_levels() -> dict:
    """Every fp32 precision setting, parents first (the new API), or the legacy pair."""
    b = torch.backends
    if not precision._NEW_API:
        return {"legacy": (b.cudnn.allow_tf32, torch.get_float32_matmul_precision())}
    return {"global": b, "cudnn": b.cudnn, "mkldnn": b.mkldnn, **precision._leaves()}


@pytest.fixture
def restore_flags():
    """Undo whatever user setting a test applies, so no other test runs with it."""
    levels = _all_levels()
    saved = {k: (v if k == "legacy" else v.fp32_precision) for k, v in levels.items()}
    yield
    if "legacy" in saved:
        torch.backends.cudnn.allow_tf32, mm = saved["legacy"]
        torch.set_float32_matmul_precision(mm)
        return
    for k, obj in levels.items():
        obj.fp32_precision = saved[k]
    assert {k: o.fp32_precision for k, o in levels.items()} == saved


@pytest.mark.parametrize("user", range(len(USER_SETTINGS)))
def test_exact_numerics_switches_tf32_off_and_restores_the_callers_flags(user, restore_flags):
    USER_SETTINGS[user]()
    before = tf32_state()
    legacy_before = _legacy()
    with exact_numerics():
        inside = tf32_state()
        if precision._NEW_API:
            assert all(v == "ieee" for v in inside.values()), inside
        else:
            assert inside == {"cudnn.allow_tf32": False, "float32_matmul_precision": "highest"}
    assert tf32_state() == before and _legacy() == legacy_before
    with pytest.raises(ZeroDivisionError), exact_numerics():
        1 / 0
    assert tf32_state() == before
    with fast_numerics("cpu"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        if precision._NEW_API:
            assert tf32_state()["cuda.matmul"] == "tf32" and tf32_state()["cudnn.conv"] == "tf32"
    assert not torch.is_autocast_enabled("cpu")
    assert tf32_state() == before and _legacy() == legacy_before


def _legacy() -> tuple:
    out = []
    for get in (lambda: torch.backends.cudnn.allow_tf32, lambda: torch.backends.cuda.matmul.allow_tf32,
                torch.get_float32_matmul_precision):
        try:
            out.append(get())
        except RuntimeError:  # the new API holds a state the legacy getter cannot express
            out.append("unreadable")
    return tuple(out)


def test_the_network_runs_inside_the_mode_and_the_flags_come_back(world, restore_flags):
    ex = world["ex"]
    torch.set_float32_matmul_precision("high")  # a training loop that enabled TF32 matmuls
    user = tf32_state()
    seen = []
    hook = ex.model.blocks[0].norm1.register_forward_pre_hook(  # the runner calls the model's own submodules
        lambda m, a: seen.append((tf32_state(), torch.is_autocast_enabled("cpu"), a[0].dtype)))
    try:
        x = torch.from_numpy(photo_crops(2, 64, 64, seed=9)).permute(0, 3, 1, 2).contiguous()
        f_exact = ex(x)
        ex.set_precision("fast")
        f_fast = ex(x)
    finally:
        ex.set_precision("exact")
        hook.remove()
    exact_state, exact_autocast, exact_dtype = seen[0]
    assert not exact_autocast and exact_dtype == torch.float32
    if precision._NEW_API:
        assert exact_state["cuda.matmul"] == "ieee" and exact_state["mkldnn.matmul"] == "ieee"
    assert seen[1][1] is True  # fast: bfloat16 autocast
    assert tf32_state() == user  # the training loop's flags survive both modes
    assert f_exact.dtype == f_fast.dtype == torch.float32
    rel = float((f_fast - f_exact).abs().max() / f_exact.abs().max())
    assert 1e-3 < rel < 3e-2, rel  # bfloat16 rounding: visible, small (measured 5.6e-3)
    assert torch.equal(ex(x), f_exact)  # back to exact: bit-identical


@pytest.mark.slow
def test_inception_fast_is_tf32_and_channels_last_not_bfloat16(tmp_path):
    from _inception_utils import save_inception_checkpoint

    ckpt = save_inception_checkpoint(tmp_path / "pt_inception.pth", seed=1)
    ex = fd_eval.load_extractor("inception-v3-tf", weights=ckpt, precision="fast")
    assert ex.preprocess_spec.model_dtype == "tf32" and ex.metadata()["precision"]["autocast"] is None
    w = ex.model.Conv2d_1a_3x3.conv.weight
    assert ex.channels_last and w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
    seen = []
    hook = ex.model.register_forward_pre_hook(lambda m, a: seen.append(
        (torch.is_autocast_enabled("cpu"), tf32_state(), a[0].is_contiguous(memory_format=torch.channels_last))))
    x = torch.from_numpy(photo_crops(2, 64, 64, seed=8)).permute(0, 3, 1, 2).contiguous()
    try:
        f_fast = ex(x)
        ex.set_precision("exact")
        f_exact = ex(x)
    finally:
        hook.remove()
    (ac_fast, flags_fast, cl_fast), (ac_exact, flags_exact, cl_exact) = seen
    assert not ac_fast and cl_fast and not ac_exact and not cl_exact
    assert ex.model.Conv2d_1a_3x3.conv.weight.is_contiguous()
    if precision._NEW_API:
        assert flags_fast["cudnn.conv"] == "tf32" and flags_exact["cudnn.conv"] == "ieee"
    # a CPU has no TF32: fast Inception is float32 here, channels_last kernels differ only in rounding
    assert float((f_fast - f_exact).abs().max() / f_exact.abs().max()) < 1e-4


# --- recorded, compared, refused ----------------------------------------------------------------------------
def test_mode_is_recorded_and_exact_is_the_default(world):
    st = world["stats"]
    exact, fast = st[("gen", "exact")], st[("gen", "fast")]
    assert exact.metadata["preprocess"]["model_dtype"] == "float32" and exact.metadata["precision"]["mode"] == "exact"
    assert fast.metadata["preprocess"]["model_dtype"] == "bfloat16" and fast.metadata["precision"]["mode"] == "fast"
    default = fd_eval.compute_stats(world["gen"], MODEL, weights=world["ckpt"], num_workers=0, progress=False)[MODEL]
    assert np.array_equal(default.mu, exact.mu) and np.array_equal(default.sigma, exact.sigma)
    assert fd_eval.load_extractor(MODEL, weights=world["ckpt"]).preprocess_spec.model_dtype == "float32"


@pytest.mark.slow
def test_fast_moves_fd_a_little_and_is_refused_against_exact_unless_allowed(world):
    st = world["stats"]
    fd_exact = _fd(st[("gen", "exact")], st[("ref", "exact")])
    fd_fast = _fd(st[("gen", "fast")], st[("ref", "fast")])
    fd_mixed = _fd(st[("gen", "fast")], st[("ref", "exact")])
    assert fd_exact > 1
    for v in (fd_fast, fd_mixed):  # measured 3.6e-4 (both fast) and 1.2e-3 (fast against exact)
        assert 1e-5 < abs(v - fd_exact) / fd_exact < 1e-2, (v, fd_exact)
    with pytest.raises(StatsMismatchError, match=r"precision: .*fast \(bfloat16\).*exact \(float32\).*"
                                                 r"--precision exact.*--allow-mismatch"):
        fd_eval.compare_stats(st[("gen", "fast")], st[("ref", "exact")])
    res, warns = fd_eval.compare_stats(st[("gen", "fast")], st[("ref", "exact")], allow_mismatch=True)
    assert res.fd == pytest.approx(fd_mixed) and any("precision" in w for w in warns)
    assert fd_eval.compare_stats(st[("gen", "fast")], st[("ref", "fast")])[1] == []
    # a reference that records no preprocessing (pytorch-fid / GPIC npz) is float32: refused as well
    bare = fd_eval.Stats(st[("ref", "exact")].mu, st[("ref", "exact")].sigma, N, {}, origin="ref.npz")
    with pytest.raises(StatsMismatchError, match="does not record its precision"):
        fd_eval.compare_stats(st[("gen", "fast")], bare)
    fd_eval.compare_stats(st[("gen", "exact")], bare)  # exact vs unrecorded: allowed, as before


@pytest.mark.slow
def test_compute_fd_provenance_and_cli(world, tmp_path):
    out = tmp_path / "fast.json"
    r = CliRunner().invoke(main, ["compute", str(world["gen"]), "--ref", str(world["ref"]), "-m", MODEL,
                                  "--weights", str(world["ckpt"]), "--precision", "fast", "--num-workers", "0",
                                  "-q", "--json", str(out)])
    assert r.exit_code == 0, r.output + repr(r.exception)
    doc = json.loads(out.read_text())
    st = world["stats"]
    assert doc["results"][MODEL]["fd"] == pytest.approx(_fd(st[("gen", "fast")], st[("ref", "fast")]), rel=1e-9)
    prov = doc["provenance"]["precision"]
    assert prov["mode"] == "fast" and prov[MODEL]["model_dtype"] == "bfloat16" and prov[MODEL]["compile"] == "off"
    exp = prov[MODEL]["expected_fd_difference_vs_exact"]
    assert "random weights" in exp["note"] and exp["fd_rel_mixed_max"] > 0
    assert doc["provenance"]["extractors"][MODEL]["preprocess"]["model_dtype"] == "bfloat16"
    res = fd_eval.compute_fd(world["gen"], st[("ref", "exact")], MODEL, weights=world["ckpt"], num_workers=0,
                             progress=False)
    assert res.provenance["precision"][MODEL]["expected_fd_difference_vs_exact"]["fd_rel"] == 0.0


@pytest.mark.parametrize("args, match", [
    (["--decode", "gpu"], "--resize torch"),
    (["--precision", "fast", "--decode", "gpu", "--resize", "torch", "--ref-transform", "center-crop-256"],
     "cannot be combined"),
])
def test_invalid_combinations_are_one_line_errors(world, args, match):
    r = CliRunner().invoke(main, ["compute", str(world["gen"]), "--ref", str(world["ref"]), "-m", MODEL,
                                  "--weights", str(world["ckpt"]), "-q", *args])
    assert r.exit_code == 1 and match in r.output and r.output.count("\n") == 1, r.output


def test_invalid_api_values():
    with pytest.raises(FDEvalError, match="unknown precision"):
        fd_eval.load_extractor(MODEL, precision="half")
    with pytest.raises(FDEvalError, match="unknown decode"):
        pipeline.check_decode("nvjpeg", [])
    assert Precision("exact", compile=True).compile  # allowed since exact's 3xTF32 path may gain from it
    inception_like = types.SimpleNamespace(name="inception-v3-tf", resizes_on_host=False)
    pipeline.check_decode("gpu", [inception_like])  # device resize: always allowed


# --- decode="gpu" -----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_gpu_decode_falls_back_to_pil_on_cpu_and_its_device_path_gives_the_same_statistics(world, monkeypatch):
    ex = fd_eval.load_extractor(MODEL, weights=world["ckpt"], resize="torch")
    opts = dict(extractors=[ex], num_workers=0, progress=False, batch_size=4)
    ref = fd_eval.compute_stats(world["jpg"], **opts)[MODEL]
    fallback = fd_eval.compute_stats(world["jpg"], decode="gpu", **opts)[MODEL]  # no CUDA: PIL in the workers
    assert np.array_equal(fallback.mu, ref.mu) and fallback.metadata["preprocess"] == ref.metadata["preprocess"]
    monkeypatch.setattr(gpu_decode, "DEVICE_DECODE_TYPES", ("cuda", "cpu"))  # torchvision's CPU JPEG decoder
    dev = fd_eval.compute_stats(world["jpg"], decode="gpu", **opts)[MODEL]
    assert dev.metadata["preprocess"]["decode"].startswith("torchvision.io.decode_jpeg(mode=RGB, device='cpu')")
    np.testing.assert_allclose(dev.mu, ref.mu, rtol=0, atol=1e-6 * np.abs(ref.mu).max())
    np.testing.assert_allclose(dev.sigma, ref.sigma, rtol=0, atol=1e-5 * np.abs(ref.sigma).max())
    with pytest.raises(StatsMismatchError, match="decode"):  # another decoder: not silently comparable
        fd_eval.compare_stats(dev, ref)
    # a JPEG whose header parses but whose data is cut: the device decoder fails, PIL names the file
    data = (world["jpg"] / "000.jpg").read_bytes()
    bad_dir = world["root"] / "bad"
    bad_dir.mkdir(exist_ok=True)
    (bad_dir / "a.jpg").write_bytes(data)
    (bad_dir / "b.jpg").write_bytes(data[: len(data) // 3])
    (bad_dir / "c.jpg").write_bytes(data)
    with pytest.raises(BadImageError, match=r"b\.jpg.*truncated"):
        fd_eval.compute_stats(bad_dir, decode="gpu", **opts)
    skipped = fd_eval.compute_stats(bad_dir, decode="gpu", skip_bad=True, **opts)[MODEL]
    assert skipped.n == 2 and skipped.metadata["source"]["skipped"] == 1
    # a cut-off file never reaches the device decoder (it may not refuse it): PIL decides, as above
    assert not gpu_decode.device_decodable(data[: len(data) // 3], None) and gpu_decode.device_decodable(data, None)
    # the device decoder's own refusal falls back to PIL for that file only
    monkeypatch.setattr(gpu_decode, "device_decodable", lambda data, limit: data.startswith(gpu_decode.JPEG_SOI))
    with pytest.raises(BadImageError, match=r"b\.jpg.*truncated"):
        fd_eval.compute_stats(bad_dir, decode="gpu", **opts)


# --- torch.compile ------------------------------------------------------------------------------------------
def test_lazy_compile_pads_short_batches_and_falls_back_to_eager():
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.LayerNorm(7)).eval()
    x = torch.randn(9, 5)
    with torch.inference_mode():
        eager = model(x)
        calls = []

        def fake_compile(m, dynamic):  # a "compiler" that records the shapes it is called with
            def run(t):
                calls.append(t.shape[0])
                return m(t)
            return run

        lc = LazyCompiled(model, "m", compiler=fake_compile)
        torch.testing.assert_close(lc(x[:4]), eager[:4], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lc(x[:3]), eager[:3], rtol=1e-5, atol=1e-5)  # padded to 4
        torch.testing.assert_close(lc(x), eager, rtol=1e-5, atol=1e-5)  # chunks 4, 4, 1 (padded)
        assert set(calls) == {4}

        def broken(m, dynamic):
            raise RuntimeError("no C++ compiler\nmore")

        lc = LazyCompiled(model, "m", compiler=broken)
        with pytest.warns(RuntimeWarning, match="torch.compile failed .*no C\\+\\+ compiler"):
            out = lc(x[:2])
        assert torch.equal(out, model(x[:2])) and lc.failed.startswith("RuntimeError")


def test_regional_compile_compiles_each_block_and_leaves_the_module_unchanged():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = torch.nn.Linear(5, 6)
            self.blocks = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.GELU())
                                                for _ in range(3)])

        def forward(self, x):
            return self.blocks(self.inp(x))

    net = Net().eval()
    keys, blocks = list(net.state_dict()), net.blocks
    x = torch.randn(4, 5)
    compiled, seen = [], []

    def fake_compile(m, dynamic):
        compiled.append(m)

        def run(t):
            seen.append(net.blocks is not blocks)  # called while the compiled blocks are swapped in
            return m(t)
        return run

    with torch.inference_mode():
        eager = net(x)
        lc = LazyCompiled(net, "net", compiler=fake_compile, regions="blocks")
        torch.testing.assert_close(lc(x), eager, rtol=0, atol=0)
        torch.testing.assert_close(lc(x[:1]), eager[:1], rtol=0, atol=0)  # padded, no new compile
    assert compiled == list(blocks) and seen == [True] * 6
    assert net.blocks is blocks and list(net.state_dict()) == keys  # restored after every call

    def failing(m, dynamic):
        def run(t):
            raise RuntimeError("backend bug")
        return run

    lc = LazyCompiled(net, "net", compiler=failing, regions="blocks")
    with torch.inference_mode(), pytest.warns(RuntimeWarning, match="backend bug"):
        torch.testing.assert_close(lc(x), eager, rtol=0, atol=0)  # eager rerun
    assert net.blocks is blocks and lc.failed


@pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")),
                    reason="torch.compile on a CPU needs a C++ compiler")
@pytest.mark.slow
def test_real_regional_compile_of_dinov2_traces_one_graph(tmp_path):
    """torch.compile for real (inductor, CPU): ViT-S/14 with 2 blocks in fast mode compiles one block graph, used
    by both blocks; the features stay within bfloat16 noise of the eager fast ones."""
    from torch._dynamo.utils import counters

    from fd_eval.extractors import dinov2 as dv

    ckpt, _ = save_dinov2_checkpoint(tmp_path / "w.pth", "vits14", "official", seed=6, depth=2)
    ex = dv._build_extractor("vits14", False, weights=ckpt, _depth=2).set_precision("fast", compile=False)
    x = torch.from_numpy(photo_crops(3, 224, 224, seed=7)).permute(0, 3, 1, 2).contiguous()
    eager = ex.forward_prepared(x)
    torch._dynamo.reset()
    counters.clear()
    ex.set_precision("fast", compile=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback to eager would pass silently otherwise
        out = ex.forward_prepared(x)
        out2 = ex.forward_prepared(x[:2])  # padded to the compiled batch: no recompilation
    assert ex.compile_status() == "on"
    assert counters["stats"]["unique_graphs"] == 1 and counters["frames"]["ok"] == 1
    rel = float((out - eager).abs().max() / eager.abs().max())
    assert rel < 0.03, rel
    assert torch.equal(out2, out[:2])
    assert "blocks.0.attn.qkv.weight" in ex.model.state_dict()  # the module itself is unchanged
    ex.set_precision("exact")


def test_compile_policy(world):
    ex = world["ex"]
    try:
        ex.set_precision("fast")
        ex.plan_run(10**7)
        assert ex.compile_status() == "off"  # auto: never on a CPU
        ex.set_precision("fast", compile=True)
        assert ex.compile_status() == "on" and isinstance(ex.forward_model, LazyCompiled)
        ex.set_precision("fast", compile=False)
        assert ex.forward_model is ex.runner()
        ex.set_precision("exact", compile=True)  # allowed in exact mode (explicitly only)
        assert ex.compile_status() == "on"
    finally:
        ex.set_precision("exact")
    assert ex.forward_model is ex.runner() and ex.precision == Precision("exact")


# --- the other entry points ---------------------------------------------------------------------------------
def test_metric_and_build_carry_the_mode(world, tmp_path):
    ex = world["ex"]
    st = world["stats"]
    torch.backends.cudnn.allow_tf32 = True
    try:
        m = fd_eval.FDMetric(extractors=[ex], ref=st[("ref", "fast")], precision="fast", distributed=False)
        m.update(torch.from_numpy(photo_crops(3, 64, 64, seed=7)))
        doc = m.compute()
        assert doc["provenance"]["precision"]["mode"] == "fast" and torch.backends.cudnn.allow_tf32
        with pytest.raises(StatsMismatchError, match="precision"):
            fd_eval.FDMetric(extractors=[ex], ref=st[("ref", "fast")], precision="exact", distributed=False)
    finally:
        ex.set_precision("exact")
    built = fd_eval.build_stats(world["gen"], tmp_path / "s.safetensors", MODEL, weights=world["ckpt"],
                                precision="fast", num_workers=0, progress=False)[MODEL]
    assert built.metadata["precision"]["mode"] == "fast"
    np.testing.assert_allclose(built.mu, st[("gen", "fast")].mu, rtol=0, atol=1e-6)
    from fd_eval.metrics import build

    src = fd_eval.open_source(world["gen"])
    plan = build.plan_units(src)
    exact_id = build._identity([fd_eval.load_extractor(MODEL, weights=world["ckpt"])], None, None, None, plan)
    fast_id = build._identity([fd_eval.load_extractor(MODEL, weights=world["ckpt"], precision="fast")], None, None,
                              None, plan)
    assert any("model_dtype: then 'float32', now 'bfloat16'" in d for d in build._identity_diffs(exact_id, fast_id))


# --- the benchmarks do not rot ------------------------------------------------------------------------------
@pytest.mark.slow
def test_benchmarks_run_in_miniature(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import bench_pipeline
    import bench_precision

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        doc = bench_pipeline.main(["--quick", "--json", str(tmp_path / "p.json"), "--device", "cpu"])
    rows = doc["throughput"]["rows"]
    assert {"fd-eval exact", "fd-eval fast"} <= set(rows) and all(r["images_per_s"] > 0 for r in rows.values())
    if "baseline (gpic-eval/dgm-eval style)" in rows:  # same weights, same images: the same statistics
        assert rows["fd-eval exact"]["mu_rel_diff_vs_baseline"] < 1e-5
    assert doc["decode_resize"]["raw_images_per_s"] > 0 and len(doc["decode_resize"]["pipeline"]) == 4
    assert {r["pil_resize_on"] for r in doc["decode_resize"]["pipeline"]} == {"host", "device"}
    assert len(doc["memory"]["rows"]) == 4 and doc["fd_time"][0]["speedup_vs_sqrtm"] > 0
    assert json.loads((tmp_path / "p.json").read_text())["quick"] is True
    import bench_resize

    res = bench_resize.main(["--device", "cpu", "--n", "4", "--size", "64", "--repeats", "1"])
    assert res["bit_identical"] is True and res["pil_resize_tensor_images_per_s"] > 0
    prec = bench_precision.main(["--quick", "--json", str(tmp_path / "q.json")])
    m = prec["results"][0]["modes"]["fast"]
    assert 0 < m["fd_rel_same_max"] < 0.05 and 0 < m["feature_rel_rms_error"] < 0.05
