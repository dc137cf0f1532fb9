"""Tests for flowcore.inspection.probes: coupling traces, latents, Jacobians, patch resampling, sampling."""

from __future__ import annotations

import copy
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from torch.nn.modules.batchnorm import _BatchNorm

from flowcore import build
from flowcore.flows.bijectors import ActNorm, AffineCoupling, Chain, squeeze
from flowcore.flows.likelihood import dequantize, per_image_noise
from flowcore.inspection.probes import (
    coupling_trace,
    default_box,
    jacobian_footprint,
    jacobian_map,
    latents,
    receptive_field_size,
    resample_patch,
    sample,
)

torch.set_num_threads(1)

REALNVP = {"arch": "realnvp", "image_shape": [1, 8, 8], "hidden": 8, "blocks": 1, "scales": 2}
HORIZONTAL = {
    "arch": "realnvp",
    "image_shape": [1, 8, 8],
    "hidden": 8,
    "blocks": 1,
    "mask": "horizontal",
    "couplings": 4,
}
CYCLE = {"arch": "realnvp", "image_shape": [1, 8, 8], "hidden": 8, "blocks": 1, "mask": "cycle", "couplings": 4}
GLOW = {"arch": "glow", "image_shape": [1, 8, 8], "hidden": 8, "steps": 2, "scales": 2}
RGB = {"arch": "realnvp", "image_shape": [3, 8, 8], "hidden": 8, "blocks": 1, "scales": 2}

NAMES = {
    "realnvp": [f"scale0.pre.{i}" for i in range(3)]
    + [f"scale0.post.{i}" for i in range(3)]
    + [f"scale1.pre.{i}" for i in range(4)],
    "horizontal": [f"scale0.pre.{i}" for i in range(4)],
    "cycle": [f"scale0.pre.{i}" for i in range(4)],
    "glow": ["scale0.step0.coupling", "scale0.step1.coupling", "scale1.step0.coupling", "scale1.step1.coupling"],
    "rgb": [f"scale0.pre.{i}" for i in range(3)]
    + [f"scale0.post.{i}" for i in range(3)]
    + [f"scale1.pre.{i}" for i in range(4)],
}
CONFIGS = {"realnvp": REALNVP, "horizontal": HORIZONTAL, "cycle": CYCLE, "glow": GLOW, "rgb": RGB}


def tiny(config: dict, seed: int = 0, noise: float = 0.1, dtype=torch.float32):
    """A non-trivial tiny model: the zero-initialised st-nets make a fresh flow the identity."""
    model = build(config).to(dtype).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(noise * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


def pixels(shape, n: int = 2, seed: int = 1, dtype=torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (0.05 + 0.9 * torch.rand((n, *shape), generator=gen)).to(dtype)


def uint8_images(shape, n: int, seed: int = 2) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, *shape), dtype=np.uint8)


# ------------------------------------------------------------------------- independent reference walk


def manual_walk(model, v):
    """Run the body layer by layer with each layer's own forward: ``(coupling, input, path)`` per coupling.

    ``path`` goes from the image layout to the coupling's layout: "squeeze" and "half" (the second
    half of the channels, kept for the next scale).
    """
    out = []
    x, _ = model.logit(v)
    ms, path = model.body, ()
    while True:
        for layer in ms.pre.layers:
            if isinstance(layer, AffineCoupling):
                out.append((layer, x, path))
            x, _ = layer(x)
        if ms.post is None:
            break
        x, path = squeeze(x), path + ("squeeze",)
        for step in ms.post.layers:
            for layer in step.layers if isinstance(step, Chain) else [step]:
                if isinstance(layer, AffineCoupling):
                    out.append((layer, x, path))
                x, _ = layer(x)
        if ms.next is None:
            break
        x, path, ms = x.chunk(2, dim=1)[1], path + ("half",), ms.next
    return out


def to_layer(img: torch.Tensor, path) -> torch.Tensor:
    for op in path:
        img = squeeze(img) if op == "squeeze" else img.chunk(2, dim=1)[1]
    return img


def region_of(shape, path) -> torch.Tensor:
    """Bool (C, H, W): image positions present in the layout reached by ``path``."""
    c, h, w = shape
    idx = torch.arange(c * h * w, dtype=torch.float64).reshape(1, c, h, w)
    region = torch.zeros(c * h * w, dtype=torch.bool)
    region[to_layer(idx, path).long().flatten()] = True
    return region.reshape(c, h, w)


# ------------------------------------------------------------------------------------------------ trace


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_trace_matches_layer_by_layer_forward(arch):
    cfg = CONFIGS[arch]
    model = tiny(cfg)
    v = pixels(cfg["image_shape"])
    shape = tuple(cfg["image_shape"])
    records = coupling_trace(model, v)
    with torch.no_grad():
        z, _ = model(v)
        reference = manual_walk(model, v)
    assert [r.name for r in records] == NAMES[arch]
    assert len(records) == len(reference)
    for rec, (layer, x_in, path) in zip(records, reference, strict=True):
        for field in ("input", "log_s", "scale", "t", "output", "transformed", "region"):
            assert tuple(getattr(rec, field).shape) == (2, *shape), (rec.name, field)
        assert rec.transformed.dtype == torch.bool and rec.region.dtype == torch.bool
        assert (rec.mask, rec.index) == (layer.mask, layer.index)
        assert rec.layer_shape == tuple(x_in.shape[1:])
        with torch.no_grad():
            y_ref, ld_ref = layer(x_in)
            log_s_ref, t_ref, trans = layer.scale_shift(x_in)
        trans = (trans != 0).expand_as(x_in)
        # values in the layer's own layout agree with the layer's own forward
        torch.testing.assert_close(to_layer(rec.input, path), x_in, rtol=0, atol=1e-6)
        torch.testing.assert_close(to_layer(rec.output, path), y_ref, rtol=0, atol=1e-6)
        torch.testing.assert_close(rec.log_det, ld_ref, rtol=1e-6, atol=1e-6)
        assert torch.equal(to_layer(rec.transformed, path), trans)
        torch.testing.assert_close(to_layer(rec.log_s, path)[trans], log_s_ref[trans])
        torch.testing.assert_close(to_layer(rec.t, path)[trans], t_ref[trans])
        # s / t are NaN exactly where nothing is transformed, never silently 0 / 1
        assert torch.equal(torch.isfinite(rec.log_s), rec.transformed)
        assert torch.equal(torch.isfinite(rec.t), rec.transformed)
        assert torch.equal(torch.isfinite(rec.scale), rec.transformed)
        torch.testing.assert_close(rec.scale[rec.transformed], rec.log_s[rec.transformed].exp())
        assert rec.transformed.any() and not torch.equal(rec.input, rec.output)
        # factored-out positions hold the actual latents; untransformed positions pass through
        region = region_of(shape, path)
        assert torch.equal(rec.region, region.expand(2, *shape))
        assert not (rec.transformed & ~rec.region).any()
        outside = ~rec.region
        assert torch.equal(rec.input[outside], z[outside]) and torch.equal(rec.output[outside], z[outside])
        keep = ~rec.transformed
        assert torch.equal(rec.input[keep], rec.output[keep])
    # the last coupling's output is the model's latent
    torch.testing.assert_close(records[-1].output, z, rtol=0, atol=1e-6)
    if arch != "glow":  # RealNVP: nothing but couplings, squeezes and splits between records
        for a, b in zip(records, records[1:], strict=False):
            assert torch.equal(a.output, b.input), (a.name, b.name)


def test_trace_mask_semantics_in_image_layout():
    model = tiny(REALNVP)
    recs = {r.name: r for r in coupling_trace(model, pixels([1, 8, 8], n=1))}
    hh, ww = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    for i in range(3):  # checkerboard: parity i conditions, the other parity is transformed
        assert torch.equal(recs[f"scale0.pre.{i}"].transformed[0, 0], (hh + ww + i) % 2 == 1)
    # scale-0 channel coupling 0 transforms squeezed channels 2, 3 = the odd rows
    assert torch.equal(recs["scale0.post.0"].transformed[0, 0], (hh % 2 == 1))
    assert torch.equal(recs["scale0.post.1"].transformed[0, 0], (hh % 2 == 0))
    # after the split, scale 1 only sees the odd rows
    assert torch.equal(recs["scale1.pre.0"].region[0, 0], (hh % 2 == 1))
    assert int(recs["scale1.pre.0"].transformed.sum()) == 16

    hor = coupling_trace(tiny(HORIZONTAL), pixels([1, 8, 8], n=1))
    assert torch.equal(hor[0].transformed[0, 0], hh >= 4) and torch.equal(hor[1].transformed[0, 0], hh < 4)
    cyc = coupling_trace(tiny(CYCLE), pixels([1, 8, 8], n=1))
    quadrants = [(hh < 4) & (ww < 4), (hh < 4) & (ww >= 4), (hh >= 4) & (ww >= 4), (hh >= 4) & (ww < 4)]
    for k, rec in enumerate(cyc):
        assert torch.equal(rec.transformed[0, 0], quadrants[(k + 1) % 4])
        assert torch.isnan(rec.log_s[0, 0][quadrants[k % 4]]).all()


def test_trace_accepts_uint8_and_single_images():
    model = tiny(RGB)
    k = uint8_images((3, 8, 8), 1)
    a = coupling_trace(model, k[0])  # (C, H, W) uint8: midpoint dequantization
    b = coupling_trace(model, dequantize(torch.as_tensor(k), "midpoint"))
    c = coupling_trace(model, k.transpose(0, 2, 3, 1))  # channels-last batch
    for x, y, w in zip(a, b, c, strict=True):
        assert torch.equal(x.output, y.output) and torch.equal(x.output, w.output)
    with pytest.raises(ValueError):
        coupling_trace(model, np.zeros((1, 3, 4, 4), np.float32))


# ----------------------------------------------------------------------------------------------- latents


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [m.training for m in model.modules()]


def _assert_unchanged(model, snap):
    state, flags = snap
    now = model.state_dict()
    assert state.keys() == now.keys()
    for key, value in state.items():
        assert torch.equal(value, now[key]), key
    assert [m.training for m in model.modules()] == flags


def test_latents_train_mode_batchnorm_uses_batch_stats_without_touching_the_model():
    model = tiny(REALNVP, noise=0.2)
    for m in model.modules():  # "trained" running statistics far from those of the batch
        if isinstance(m, _BatchNorm):
            m.running_mean.fill_(3.0)
            m.running_var.fill_(25.0)
            m.num_batches_tracked.fill_(7)
    imgs = uint8_images((1, 8, 8), 6)
    snap = _snapshot(model)
    z_eval = latents(model, imgs, n_draws=2, seed=5)
    z_train = latents(model, imgs, n_draws=2, seed=5, batchnorm="train")
    _assert_unchanged(model, snap)
    assert z_eval.shape == z_train.shape == (6, 1, 8, 8) and z_eval.dtype == np.float64
    assert np.abs(z_eval - z_train).max() > 1e-2

    # independent reference: the documented seeding, a train-mode deepcopy / the eval model
    ref_train = copy.deepcopy(model).train()
    k = torch.as_tensor(imgs)
    want_train = torch.zeros(6, 1, 8, 8, dtype=torch.float64)
    want_eval = torch.zeros_like(want_train)
    with torch.no_grad():
        for j in range(2):
            v = dequantize(k, "uniform", noise=per_image_noise(k, seed=5, draw=j))
            want_train += ref_train(v)[0].double() / 2
            want_eval += model(v)[0].double() / 2
    np.testing.assert_allclose(z_train, want_train.numpy(), atol=1e-5)
    np.testing.assert_allclose(z_eval, want_eval.numpy(), atol=1e-5)

    # a shared model left in training mode is evaluated in eval mode and not switched
    model.train()
    snap = _snapshot(model)
    np.testing.assert_allclose(latents(model, imgs, n_draws=2, seed=5), z_eval, atol=1e-6)
    _assert_unchanged(model, snap)
    assert model.training


def test_latents_glow_train_mode_never_initialises_actnorm():
    model = tiny(GLOW)
    for m in model.modules():
        if isinstance(m, ActNorm):
            m.initialized.fill_(0)
    model.train()  # even a training-mode shared model must not initialise during inspection
    snap = _snapshot(model)
    imgs = uint8_images((1, 8, 8), 4)
    z_train = latents(model, imgs, n_draws=1, batchnorm="train")
    z_eval = latents(model, imgs, n_draws=1, batchnorm="eval")
    coupling_trace(model, imgs)
    _assert_unchanged(model, snap)
    np.testing.assert_array_equal(z_train, z_eval)  # Glow has no BatchNorm


def test_latents_midpoint_and_errors():
    model = tiny(REALNVP)
    imgs = uint8_images((1, 8, 8), 3)
    z = latents(model, imgs[:, 0], dequantization="midpoint")  # (N, H, W) grayscale batch
    with torch.no_grad():
        want = model(dequantize(torch.as_tensor(imgs), "midpoint"))[0]
    np.testing.assert_allclose(z, want.double().numpy(), atol=1e-6)
    with pytest.raises(ValueError):
        latents(model, imgs.astype(np.float32))
    with pytest.raises(ValueError):
        latents(model, imgs, batchnorm="bogus")


# --------------------------------------------------------------------------------------------- Jacobians


@pytest.mark.parametrize("arch", ["realnvp", "glow"])
def test_jacobian_map_equals_full_jacobian(arch):
    model = tiny(CONFIGS[arch], dtype=torch.float64)
    v = pixels([1, 8, 8], n=1, dtype=torch.float64)
    full = torch.autograd.functional.jacobian(lambda x: model(x)[0], v)[0, :, :, :, 0]  # (C,H,W, C,H,W)
    for index in [(0, 0, 0), (0, 3, 5), (0, 7, 2)]:
        got = jacobian_map(model, v[0], index)
        assert got.shape == (1, 8, 8)
        np.testing.assert_allclose(got, full[index].numpy(), rtol=1e-10, atol=1e-12)
    foot = jacobian_footprint(model, v, max_batch=7)
    np.testing.assert_allclose(foot, full.reshape(64, 64).abs().mean(0).reshape(1, 8, 8).numpy(), atol=1e-12)
    sel = [(0, 1, 1), (0, 6, 3)]
    np.testing.assert_allclose(
        jacobian_footprint(model, v, indices=sel), (full[0, 1, 1].abs() + full[0, 6, 3].abs()).numpy() / 2
    )
    # with respect to the body input (logit space)
    y = model.logit(v)[0].detach()
    body = torch.autograd.functional.jacobian(lambda x: model.body(x)[0], y)[0, :, :, :, 0]
    np.testing.assert_allclose(jacobian_map(model, v, (0, 3, 5), wrt="logit"), body[0, 3, 5].numpy(), atol=1e-12)


def test_identity_flow_footprint_is_the_pixel_itself():
    model = build(RGB).double().eval()  # freshly built: the body is the identity
    v = pixels([3, 8, 8], n=1, dtype=torch.float64)[0]
    a = model.logit.alpha
    for c, h, w in [(0, 0, 0), (1, 4, 5), (2, 7, 7)]:
        jac = jacobian_map(model, v, (c, h, w))
        expected = np.zeros((3, 8, 8))
        p = a + (1 - 2 * a) * float(v[c, h, w])
        expected[c, h, w] = (1 - 2 * a) / (p * (1 - p))
        np.testing.assert_allclose(jac, expected, rtol=1e-12, atol=0)
        assert receptive_field_size(model, v, (c, h, w)) == 1
    assert receptive_field_size(tiny(RGB, dtype=torch.float64), v, (1, 4, 5)) > 1


def test_jacobian_leaves_shared_model_alone():
    model = tiny(REALNVP).train()
    snap = _snapshot(model)
    v = pixels([1, 8, 8], n=1)
    j_train = jacobian_map(model, v, (0, 2, 2))
    model.eval()
    np.testing.assert_array_equal(j_train, jacobian_map(model, v, (0, 2, 2)))
    model.train()
    _assert_unchanged(model, snap)
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(IndexError):
        jacobian_map(model, v, (1, 0, 0))
    with pytest.raises(ValueError):
        jacobian_map(model, pixels([1, 8, 8], n=2), (0, 0, 0))


# ------------------------------------------------------------------------------------ resampling, samples


def test_default_box():
    assert default_box(32, 32) == (11, 11, 10, 10)
    assert default_box(28, 28) == (9, 9, 9, 9)
    assert default_box(8, 8) == (2, 2, 3, 3)


@pytest.mark.parametrize("arch", ["realnvp", "glow", "rgb"])
def test_resample_patch(arch):
    cfg = CONFIGS[arch]
    model = tiny(cfg, noise=0.05)
    shape = tuple(cfg["image_shape"])
    v = pixels(shape, n=1)[0]
    # temperature 0 and an empty box reproduce the input
    same = resample_patch(model, v, box=(3, 3, 0, 0), n=2, temperature=0.0)
    assert same.shape == (2, *shape) and same.dtype == np.float32
    np.testing.assert_allclose(same, np.broadcast_to(v.numpy(), same.shape), atol=1e-5)

    box = default_box(8, 8)
    top, left, bh, bw = box
    inside = np.zeros(shape, bool)
    inside[:, top : top + bh, left : left + bw] = True
    imgs, zs = resample_patch(model, v, box=box, n=4, temperature=0.7, seed=3, return_latents=True)
    with torch.no_grad():
        z0 = model(v[None])[0][0].numpy()
    assert zs.shape == (4, *shape)
    np.testing.assert_array_equal(zs[:, ~inside], np.broadcast_to(z0[~inside], (4, int((~inside).sum()))))
    assert (np.abs(zs[:, inside] - z0[inside]) > 0).all()
    assert not np.allclose(zs[0], zs[1])
    assert imgs.min() >= 0 and imgs.max() <= 1
    with torch.no_grad():
        inv = model.inverse(torch.as_tensor(zs)).clamp(0, 1).numpy()
    np.testing.assert_allclose(imgs, inv, atol=1e-6)
    # re-encoding the unclamped images gives back the kept latents outside the box
    raw = resample_patch(model, v, box=box, n=4, temperature=0.7, seed=3, clamp=False)
    with torch.no_grad():
        z_back = model(torch.as_tensor(raw))[0].numpy()
    np.testing.assert_allclose(z_back[:, ~inside], zs[:, ~inside], atol=1e-4)
    np.testing.assert_allclose(z_back, zs, atol=1e-4)
    # reproducible by seed
    np.testing.assert_array_equal(imgs, resample_patch(model, v, box=box, n=4, temperature=0.7, seed=3))
    assert not np.allclose(imgs, resample_patch(model, v, box=box, n=4, temperature=0.7, seed=4))


def test_resample_patch_uint8_and_errors():
    model = tiny(REALNVP, noise=0.05)
    k = uint8_images((1, 8, 8), 1)[0, 0]  # (H, W) grayscale
    out = resample_patch(model, k, box=(0, 0, 0, 0), n=1, temperature=0.0)
    np.testing.assert_allclose(out[0, 0], (k + 0.5) / 256, atol=1e-5)
    with pytest.raises(ValueError):
        resample_patch(model, k, box=(6, 6, 3, 3))
    with pytest.raises(ValueError):
        resample_patch(model, pixels([1, 8, 8], n=2))
    with pytest.raises(ValueError):
        resample_patch(model, k, device="cuda")
    with pytest.raises(TypeError):
        resample_patch(build({"arch": "realnvp_tabular", "dim": 4}), k)


@pytest.mark.parametrize("arch", ["realnvp", "rgb"])
def test_sample(arch):
    cfg = CONFIGS[arch]
    model = tiny(cfg, noise=0.05)
    c = cfg["image_shape"][0]
    imgs, k = sample(model, 5, temperature=0.8, seed=11, batch_size=2)
    assert imgs.shape == (5, c, 8, 8) and imgs.min() >= 0 and imgs.max() <= 1
    assert k.dtype == np.uint8 and k.shape == ((5, 8, 8) if c == 1 else (5, 8, 8, 3))
    want = np.clip(np.floor(imgs * 256), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(k, want[:, 0] if c == 1 else want.transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(imgs, sample(model, 5, temperature=0.8, seed=11, batch_size=2)[0])
    # another batch size: the same draws, equal up to float rounding of batched convolutions
    np.testing.assert_allclose(imgs, sample(model, 5, temperature=0.8, seed=11)[0], atol=1e-6)
    assert not np.allclose(imgs, sample(model, 5, temperature=0.8, seed=12)[0])
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        direct = model.inverse(0.8 * torch.randn((5, c, 8, 8), generator=gen)).clamp(0, 1).numpy()
    np.testing.assert_allclose(imgs, direct, atol=1e-6)
    cold, _ = sample(model, 3, temperature=0.0)
    np.testing.assert_array_equal(cold[0], cold[2])


# --------------------------------------------------------------------------------------------- threads


def test_threads_give_serial_results():
    model = tiny(REALNVP)
    inputs = [pixels([1, 8, 8], n=1, seed=100 + i)[0] for i in range(8)]

    def work(i):
        trace = coupling_trace(model, inputs[i])
        patches = resample_patch(model, inputs[i], n=2, seed=i)
        lat = latents(model, uint8_images((1, 8, 8), 3, seed=i), n_draws=1, batchnorm="train")
        return trace, patches, lat

    serial = [work(i) for i in range(8)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        parallel = list(pool.map(work, range(8)))
    for (t1, p1, l1), (t2, p2, l2) in zip(serial, parallel, strict=True):
        np.testing.assert_array_equal(p1, p2)
        np.testing.assert_array_equal(l1, l2)
        for a, b in zip(t1, t2, strict=True):
            assert a.name == b.name
            for field in ("input", "log_s", "t", "output", "transformed"):
                assert torch.equal(getattr(a, field).nan_to_num(7.0), getattr(b, field).nan_to_num(7.0))
    assert not model.training


def test_box_change_shares_match_an_independent_count():
    from flowcore.inspection.probes import box_change_shares

    rng = np.random.default_rng(0)
    original = rng.integers(0, 256, (3, 6, 5), dtype=np.uint8)
    base = (original + 0.5) / 256.0
    draws = np.repeat(base[None], 4, axis=0).copy()
    box = (1, 2, 3, 2)
    draws[:, :, 1:4, 2:4] += 0.5  # every box pixel changes in every draw
    draws[0, 2, 0, 0] += 0.2  # one outside pixel, one channel, one draw
    draws[1, 0, 5, 4] += 0.04  # below the threshold: not a change
    inside, outside = box_change_shares(original, draws, box, threshold=0.05)
    assert inside == 1.0
    assert outside == pytest.approx(1 / (4 * (30 - 6)))


def test_influence_concentration_counts_the_fewest_pixels_holding_the_mass():
    from flowcore.inspection.probes import influence_concentration

    a = np.zeros((7, 7))
    a[3, 3], a[3, 4], a[0, 0] = 6.0, 3.0, 1.0  # total 10: 90 % needs the two largest
    assert influence_concentration(a, (3, 3), mass=0.9, radius=1) == (2, pytest.approx(0.9))
    assert influence_concentration(a, (3, 3), mass=0.95, radius=3)[0] == 3
    assert influence_concentration(np.zeros((3, 3)), (1, 1)) == (0, 0.0)
