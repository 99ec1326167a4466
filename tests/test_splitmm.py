"""Matmul paths (fd_eval.core.splitmm) and the DINOv2 runner: TF32 rounding bit for bit, 3xTF32 against IEEE float32,
the CLS-only last block against the hub model, fp8 emulation and its refusal against exact statistics.

The GPU paths (cuBLAS TF32, torch._scaled_mm) are exercised by benchmarks/bench_gpu.py; on a CPU the same
splits run with IEEE float32 matmuls, whose products of TF32 operands are exact (the tensor-core arithmetic).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import fd_eval
from _checkpoints import save_dinov2_checkpoint
from _images import photo_crops
from fd_eval.core.splitmm import PreparedLinear, quantize_fp8_rows, round_tf32, split_tf32, trunc_tf32
from fd_eval.errors import FDEvalError, StatsMismatchError
from fd_eval.extractors import dinov2 as d
from fd_eval.extractors import precision


# --- TF32 rounding ------------------------------------------------------------------------------------------
def _reference_round(x: np.ndarray, mode: str) -> np.ndarray:
    """Nearest (ties to even) or truncated TF32 value, computed in float64 from the exponent (independent of the
    bit trick): keep 11 significant bits."""
    out = np.empty_like(x)
    for i, v in enumerate(x.astype(np.float64)):
        if not np.isfinite(v) or v == 0:
            out[i] = v
            continue
        e = max(np.floor(np.log2(abs(v))), -126)  # subnormals keep float32's fixed spacing
        ulp = 2.0 ** (e - 10)
        q = v / ulp
        r = np.trunc(q) if mode == "trunc" else np.round(q)  # numpy rounds half to even
        out[i] = np.float32(r * ulp)
    return out


def test_round_tf32_is_round_to_nearest_even_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, generator=g) * torch.exp(torch.randn(4000, generator=g) * 8)
    ulp = 2.0 ** -10
    ties = torch.tensor([1 + ulp / 2, 1 + 3 * ulp / 2, -(1 + ulp / 2), 2 - ulp / 4, 3.4e38, 1e-40, 0.0, -0.0])
    x = torch.cat([x, ties])
    for fn, mode in ((round_tf32, "nearest"), (trunc_tf32, "trunc")):
        got = fn(x).numpy()
        want = _reference_round(x.numpy(), mode)
        assert np.array_equal(got.view(np.int32), want.view(np.int32)), mode
    assert round_tf32(torch.tensor([1 + ulp / 2, 1 + 3 * ulp / 2])).tolist() == [1.0, 1 + 2 * ulp]  # ties to even
    assert torch.isinf(round_tf32(torch.tensor([3.4028235e38]))).all()  # rounds past TF32's largest finite
    special = torch.tensor([float("inf"), -float("inf"), float("nan")])
    assert torch.equal(round_tf32(special)[:2], special[:2]) and torch.isnan(round_tf32(special)[2])


def test_split_parts_are_tf32_and_sum_to_x():
    x = torch.randn(10000, generator=torch.Generator().manual_seed(1)) * 100
    hi, lo = split_tf32(x)
    for t in (hi, lo):
        assert ((t.view(torch.int32) & 0x1FFF) == 0).all()  # 13 low mantissa bits clear: TF32 values
    err = ((hi.double() + lo.double() - x.double()).abs() / x.double().abs()).max()
    assert err <= 2.0 ** -22


@pytest.mark.parametrize("form", ["cat", "sum"])
def test_split3_linear_is_as_accurate_as_ieee_and_plain_tf32_is_not(form):
    g = torch.Generator().manual_seed(2)
    w, b, x = torch.randn(96, 320, generator=g), torch.randn(96, generator=g), torch.randn(50, 320, generator=g)
    ref = x.double() @ w.double().T + b.double()

    def rel(y):
        return float((y.double() - ref).norm() / ref.norm())

    ieee = rel(torch.nn.functional.linear(x, w, b))
    split = rel(PreparedLinear(w, b, "split3", emulate=True, form=form)(x))
    tf32 = rel(torch.nn.functional.linear(round_tf32(x), round_tf32(w), b))
    assert split < 3 * ieee and split < 1e-6, (split, ieee)
    assert tf32 > 100 * split  # one TF32 product: ~1e-4


# --- the DINOv2 runner --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vits(tmp_path_factory):
    """ViT-S/14 (12 blocks, random weights) and its hub reference; photo-crop parity sets."""
    path, hub = save_dinov2_checkpoint(tmp_path_factory.mktemp("split") / "w.pth", "vits14", "official", seed=4)
    ex = d._build_extractor("vits14", False, weights=path)
    sets = [torch.from_numpy(photo_crops(12, 224, 224, seed=s)).permute(0, 3, 1, 2).contiguous() for s in (1, 2)]
    return ex, hub, sets


def _feats(ex, sets):
    return [torch.cat([ex(x[i:i + 6]) for i in range(0, len(x), 6)]).double() for x in sets]


def _fd(f1, f2):
    return fd_eval.frechet_distance(f1.mean(0).numpy(), np.cov(f1.numpy(), rowvar=False),
                                    f2.mean(0).numpy(), np.cov(f2.numpy(), rowvar=False))


def _rel_rms(a, b):
    return float(((a - b).pow(2).mean() / b.pow(2).mean()).sqrt())


@pytest.mark.slow
def test_emulated_3xtf32_matches_ieee_float32(vits, monkeypatch):
    ex, _, sets = vits
    ieee = _feats(ex.set_precision("exact"), sets)
    assert ex.matmul_description() == "ieee-fp32"
    monkeypatch.setenv(precision.MATMUL_ENV, "split3")
    ex.set_precision("exact")
    assert ex.matmul_description() == "3xtf32-cat-emulated"
    assert ex.metadata()["precision"]["matmul"] == "3xtf32-cat-emulated"
    split = _feats(ex, sets)
    for s, r in zip(split, ieee):
        assert 0 < _rel_rms(s, r) <= 1e-5, _rel_rms(s, r)  # not the same computation, as accurate
    fd_s, fd_r = _fd(*split), _fd(*ieee)
    assert abs(fd_s - fd_r) / fd_r <= 1e-6, (fd_s, fd_r)
    monkeypatch.setenv(precision.SPLIT3_FORM_ENV, "sum")  # three accumulated matmuls: as accurate
    ex.set_precision("exact")
    assert ex.matmul_description() == "3xtf32-sum-emulated"
    summed = _feats(ex, [sets[0][:6]])[0]
    assert 0 < _rel_rms(summed, ieee[0][:6]) <= 1e-5
    monkeypatch.setenv(precision.MATMUL_ENV, "ieee")
    ex.set_precision("exact")
    head = [sets[0][:6]]
    assert ex.matmul_description() == "ieee-fp32" and torch.equal(_feats(ex, head)[0], ieee[0][:6])
    ex.set_precision("fp32")
    assert torch.equal(_feats(ex, head)[0], ieee[0][:6]) and ex.metadata()["precision"]["mode"] == "fp32"
    monkeypatch.setenv(precision.MATMUL_ENV, "bogus")
    with pytest.raises(FDEvalError, match="FD_EVAL_MATMUL"):
        ex.set_precision("exact")


@pytest.mark.slow
def test_cls_only_last_block_matches_the_hub_model_and_is_batch_invariant(vits):
    ex, hub, sets = vits
    ex.set_precision("exact")
    x = sets[0]
    with torch.inference_mode():
        inp = ex.model_input(x)
        full = ex.model(inp)  # timm, every token through every block
        ref = hub(inp)
    ours = ex(x)
    tol = 1e-5  # tests/test_dinov2.py's bound
    assert float((ours - ref).abs().max() / ref.abs().max()) <= tol
    assert torch.equal(ours, full)  # on this CPU (oneDNN) even bit-identical: statistics do not change
    assert torch.equal(torch.cat([ex(x[:1]), ex(x[1:4]), ex(x[4:])]), ours)  # each row independent of its batch
    assert "blocks.11.mlp.fc2.weight" in ex.model.state_dict() and len(ex.runner().blocks) == 11


@pytest.mark.slow
def test_fp8_emulation_runs_and_is_refused_against_exact_statistics(vits):
    ex, _, sets = vits
    exact = _feats(ex.set_precision("exact"), sets)
    fp8 = _feats(ex.set_precision("fp8"), sets)
    assert ex.matmul_description() == "fp8-e4m3-rowwise-emulated"
    assert ex.preprocess_spec.model_dtype == "float8_e4m3" and ex.metadata()["precision"]["mode"] == "fp8"
    err = _rel_rms(fp8[0], exact[0])
    assert 1e-3 < err < 0.2, err  # e4m3 keeps 3 mantissa bits: visible, bounded
    assert precision.mode_of(ex.metadata()) == "fp8" and not precision.is_exact(ex.metadata())
    mk = fd_eval.Stats.from_features
    a = mk(fp8[0].numpy(), metadata=ex.metadata())
    b = mk(exact[0].numpy(), metadata=ex.set_precision("exact").metadata())
    with pytest.raises(StatsMismatchError, match="precision"):
        fd_eval.check_compatible(a, b)
    c = mk(exact[1].numpy(), metadata=ex.set_precision("fp32").metadata())
    fd_eval.check_compatible(b, c)  # fp32 and exact: both float32-accurate, comparable without a flag


def test_fp8_quantisation_round_trip():
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(3))
    x[3] = 0
    q, s = quantize_fp8_rows(x)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (64, 1)
    back = q.float() * s
    assert torch.equal(back[3], x[3]) and (back.abs().amax(1) - x.abs().amax(1)).abs().max() < 1e-5
    rel = ((back - x).abs() / x.abs().amax(1, keepdim=True))[torch.arange(64) != 3].max()
    assert rel <= 2.0 ** -4 + 1e-6  # half an e4m3 ulp at the row's scale


def test_precision_names_and_provenance():
    assert precision.resolve_precision("fp32").mode == "fp32" and precision.resolve_precision("fp8").fast
    assert not precision.Precision("fp32").fast and precision.Precision("fp32").model_dtype() == "float32"
    assert precision.expected_difference("fp32", "dinov2-vits14")["fd_rel"] == 0.0
    with pytest.raises(FDEvalError, match="unknown precision"):
        precision.resolve_precision("fp16")


def test_inception_refuses_fp8_and_stays_exact(tmp_path):
    from _inception_utils import save_inception_checkpoint

    w = save_inception_checkpoint(tmp_path / "pt_inception.pth", seed=0)
    with pytest.raises(FDEvalError, match="fp8 is for DINOv2 only"):
        fd_eval.load_extractor("inception-v3-tf", weights=str(w), precision="fp8")
    ex = fd_eval.load_extractor("inception-v3-tf", weights=str(w))
    with pytest.raises(FDEvalError, match="fp8"):
        ex.set_precision("fp8")
    assert ex.precision.mode == "exact" and ex.preprocess_spec.model_dtype == "float32"
    assert ex.set_precision("fp32").metadata()["precision"]["mode"] == "fp32"
