"""Issue 2: every layer and model inverts, log-dets are exact, checkpoints are safe."""

import copy
import pickle
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import perturb_
from torch.autograd.functional import jacobian

import flowcore
from flowcore.flows.bijectors import ActNorm, AffineCoupling, InvConv1x1, Logit, Squeeze, spatial_masks
from flowcore.flows.likelihood import log_likelihood_terms
from flowcore.flows.nets import GlowST, ResNetST

TINY = dict(hidden=4, blocks=1)

MODEL_CONFIGS = {
    "realnvp_gray": dict(arch="realnvp", image_shape=[1, 4, 4], scales=2, **TINY),
    "realnvp_rgb": dict(arch="realnvp", image_shape=[3, 4, 4], scales=2, **TINY),
    "realnvp_horizontal": dict(arch="realnvp", image_shape=[1, 4, 4], mask="horizontal", couplings=4, **TINY),
    "realnvp_cycle": dict(arch="realnvp", image_shape=[3, 4, 4], mask="cycle", couplings=4, **TINY),
    "realnvp_checkerboard_single": dict(arch="realnvp", image_shape=[1, 4, 4], scales=1, couplings=4, **TINY),
    "realnvp_bottleneck": dict(arch="realnvp", image_shape=[1, 4, 4], scales=2, bottleneck=3, hidden=4, blocks=2),
    "realnvp_bottleneck_conv": dict(arch="realnvp", image_shape=[1, 4, 4], scales=2, bottleneck=3,
                                    bottleneck_channels=1, hidden=4, blocks=2),
    "glow_gray": dict(arch="glow", image_shape=[1, 4, 4], scales=2, steps=2, hidden=4),
    "glow_rgb": dict(arch="glow", image_shape=[3, 4, 4], scales=2, steps=2, hidden=4),
    "glow_highway": dict(arch="glow", image_shape=[1, 4, 4], scales=2, steps=2, hidden=4, net="highway", blocks=3),
}


def test_highway_st_net_is_the_papers_glow_net():
    from flowcore.flows.nets import HighwayLayer, HighwayST

    model = flowcore.build(MODEL_CONFIGS["glow_highway"])
    nets = [m for m in model.modules() if isinstance(m, HighwayST)]
    assert nets and all(sum(isinstance(m, HighwayLayer) for m in n.modules()) == 3 for n in nets)
    # a highway layer with a closed gate carries its input; with an open one it is ReLU(conv(x))
    layer = HighwayLayer(2)
    x = torch.randn(1, 2, 3, 3)
    with torch.no_grad():
        layer.gate.bias.fill_(-1e4)
        torch.testing.assert_close(layer(x), x)
        layer.gate.bias.fill_(1e4)
        torch.testing.assert_close(layer(x), torch.relu(layer.transform(x)))


def _layers(c: int = 3):
    """Every bijective layer type, on inputs of shape (N, c, 4, 4)."""
    layers = {
        "logit": Logit(0.05),
        "squeeze": Squeeze(),
        "actnorm": ActNorm(c),
        "invconv": InvConv1x1(c),
        "channel_tanh": AffineCoupling("channel", 0, 4, ResNetST(2, 2, 4, 1), "tanh"),
        "channel_sigmoid": AffineCoupling("channel", 1, 4, GlowST(2, 2, 4), "sigmoid"),
    }
    for mask in ("checkerboard", "horizontal", "cycle"):
        for idx in (0, 1):
            layers[f"{mask}{idx}"] = AffineCoupling(mask, idx, c, ResNetST(c + 1, c, 4, 1), "tanh")
    return layers


def _input(name: str, dtype, c: int = 3, n: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    channels = 4 if name.startswith("channel") else c
    x = torch.randn(n, channels, 4, 4, generator=g, dtype=dtype)
    if name == "logit":
        x = torch.rand(n, channels, 4, 4, generator=g, dtype=dtype) * 0.9 + 0.05
    return x


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float64, 1e-9)])
@pytest.mark.parametrize("name", list(_layers()))
def test_layer_inverts_without_prior_forward(name, dtype, tol):
    layer = perturb_(_layers()[name].to(dtype)).eval()
    x = _input(name, dtype)
    fresh = copy.deepcopy(layer)  # same weights, never called forward
    y, log_det = layer(x)
    assert log_det.shape == (x.shape[0],)
    assert (fresh.inverse(y) - x).abs().max().item() <= tol


def _brute_log_det(fn, x: torch.Tensor) -> torch.Tensor:
    out = []
    for i in range(x.shape[0]):
        xi = x[i : i + 1]
        j = jacobian(lambda a: fn(a).reshape(-1), xi).reshape(xi.numel(), xi.numel())
        out.append(torch.linalg.slogdet(j)[1])
    return torch.stack(out)


@pytest.mark.parametrize("name", list(_layers()))
def test_layer_log_det_matches_autograd(name):
    layer = perturb_(_layers()[name].double()).eval()
    x = _input(name, torch.float64)
    _, log_det = layer(x)
    brute = _brute_log_det(lambda a: layer(a)[0], x)
    torch.testing.assert_close(log_det, brute, atol=1e-6, rtol=0)


@pytest.mark.parametrize("key", list(MODEL_CONFIGS))
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float64, 1e-9)])
def test_model_inverts_and_keeps_image_layout(key, dtype, tol):
    model = perturb_(flowcore.build(MODEL_CONFIGS[key]).to(dtype)).eval()
    shape = MODEL_CONFIGS[key]["image_shape"]
    v = torch.rand(3, *shape, generator=torch.Generator().manual_seed(1), dtype=dtype) * 0.98 + 0.01
    z, log_det = model(v)
    assert z.shape == v.shape and log_det.shape == (3,)
    assert (model.inverse(z) - v).abs().max().item() <= tol


@pytest.mark.parametrize("key", list(MODEL_CONFIGS))
def test_model_log_det_matches_autograd(key):
    model = perturb_(flowcore.build(MODEL_CONFIGS[key]).double()).eval()
    shape = MODEL_CONFIGS[key]["image_shape"]
    v = torch.rand(2, *shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 0.98 + 0.01
    _, log_det = model(v)
    torch.testing.assert_close(log_det, _brute_log_det(lambda a: model(a)[0], v), atol=1e-6, rtol=0)


def test_tabular_model_inverts_and_log_det_is_exact():
    model = perturb_(flowcore.build(dict(arch="realnvp_tabular", dim=6, hidden=8, couplings=4)).double()).eval()
    # the standardisation is part of the flow: fitted to skewed data, its log-det must still be exact
    model.standardize.fit(torch.randn(50, 6, dtype=torch.float64) * torch.arange(1.0, 7.0, dtype=torch.float64) + 3)
    x = torch.randn(3, 6, dtype=torch.float64)
    z, log_det = model(x)
    assert (model.inverse(z) - x).abs().max().item() <= 1e-9
    brute = torch.stack([torch.linalg.slogdet(jacobian(lambda a: model(a[None])[0][0], xi))[1] for xi in x])
    torch.testing.assert_close(log_det, brute, atol=1e-6, rtol=0)


def test_log_prob_is_a_normalised_density_in_1d_terms():
    """log_prob = N(z) + log_det: check against the change of variables directly."""
    model = perturb_(flowcore.build(MODEL_CONFIGS["realnvp_gray"]).double()).eval()
    v = torch.rand(2, 1, 4, 4, dtype=torch.float64) * 0.9 + 0.05
    z, log_det = model(v)
    expected = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum((1, 2, 3)) + log_det
    torch.testing.assert_close(model.log_prob(v), expected)


def test_cycle_mask_routes_one_quadrant_per_layer():
    h = w = 4
    quadrants = [spatial_masks("cycle", k, h, w)[0][0, 0].bool() for k in range(4)]
    # the four quadrants partition the image
    assert torch.stack(quadrants).sum(0).eq(1).all()
    for k in range(4):
        cond, trans = spatial_masks("cycle", k, h, w)
        assert torch.equal(cond[0, 0].bool(), quadrants[k % 4])
        assert torch.equal(trans[0, 0].bool(), quadrants[(k + 1) % 4])
    # Jacobian of one coupling: the transformed quadrant depends only on itself and the previous one
    layer = perturb_(AffineCoupling("cycle", 0, 1, ResNetST(2, 1, 4, 1), "tanh").double()).eval()
    x = torch.randn(1, 1, h, w, dtype=torch.float64)
    j = jacobian(lambda a: layer(a)[0].reshape(-1), x).reshape(h * w, h * w)
    q = [m.reshape(-1) for m in quadrants]
    off = ~torch.eye(h * w, dtype=torch.bool)
    dep = (j.abs() > 0) & off  # cross-pixel dependencies
    assert dep[q[1]][:, q[0]].any()  # quadrant 1 reads quadrant 0
    assert not dep[q[1]][:, q[2] | q[3]].any()
    assert not dep[q[0] | q[2] | q[3]].any()  # nothing else changes
    # information from quadrant 0 needs four couplings to come back to quadrant 0
    chain = [
        perturb_(AffineCoupling("cycle", k, 1, ResNetST(2, 1, 4, 1), "tanh").double(), seed=k).eval() for k in range(4)
    ]

    def run(a, n):
        for layer in chain[:n]:
            a = layer(a)[0]
        return a.reshape(-1)

    for n in (1, 2, 3, 4):
        jn = jacobian(lambda a, n=n: run(a, n), x).reshape(h * w, h * w)
        reaches_self = (jn[q[0]][:, q[0]].abs() * off[q[0]][:, q[0]]).sum() > 0
        assert bool(reaches_self) == (n == 4), n


def test_single_scale_checkerboard_is_the_same_size_control_of_the_other_masks():
    from flowcore.flows.models import count_parameters

    sizes = {}
    for mask in ("checkerboard", "horizontal", "cycle"):
        model = flowcore.build(dict(arch="realnvp", image_shape=[1, 8, 8], scales=1, mask=mask, couplings=6, **TINY))
        couplings = [m for m in model.modules() if isinstance(m, AffineCoupling)]
        assert len(couplings) == 6 and all(c.mask == mask for c in couplings), mask
        sizes[mask] = count_parameters(model)
    assert len(set(sizes.values())) == 1, sizes


def test_channel_reduced_bottleneck_passes_everything_through_l_numbers():
    from flowcore.flows.nets import Bottleneck

    neck = Bottleneck(8, 5, 5, 3, channels=2)
    x = torch.randn(4, 8, 5, 5)
    assert neck(x).shape == x.shape
    # rank of the map <= l: the outputs of many inputs span at most l (+1 for the bias) dimensions
    with torch.no_grad():
        out = neck(torch.randn(64, 8, 5, 5)).flatten(1)
    assert torch.linalg.matrix_rank(out - out.mean(0)) <= 3
    small = sum(p.numel() for p in neck.parameters())
    assert small < sum(p.numel() for p in Bottleneck(8, 5, 5, 3).parameters()) / 3


@pytest.mark.parametrize("key", ["realnvp_gray", "realnvp_rgb", "realnvp_horizontal", "realnvp_cycle",
                                 "realnvp_checkerboard_single"])
def test_identity_initialised_model_aligns_latents_with_pixels(key):
    cfg = dict(MODEL_CONFIGS[key])
    cfg["image_shape"] = [cfg["image_shape"][0], 8, 8]
    model = flowcore.build(cfg).double().eval()
    v = torch.rand(1, *cfg["image_shape"], dtype=torch.float64) * 0.9 + 0.05
    z0, _ = model(v)
    for c, h, w in [(0, 0, 0), (0, 3, 5), (cfg["image_shape"][0] - 1, 7, 2)]:
        v2 = v.clone()
        v2[0, c, h, w] += 0.01
        changed = (model(v2)[0] - z0).abs() > 0
        assert changed.sum() == 1 and changed[0, c, h, w]


def _trained_like(key="realnvp_gray"):
    model = flowcore.build(MODEL_CONFIGS[key])
    perturb_(model)
    model.train()
    model(torch.rand(8, *MODEL_CONFIGS[key]["image_shape"]) * 0.9 + 0.05)  # BN stats, ActNorm init
    return model.eval()


@pytest.mark.parametrize("key", ["realnvp_gray", "glow_rgb"])
def test_save_load_round_trip_is_bit_exact(tmp_path, key):
    model = _trained_like(key)
    if key.startswith("glow"):
        actnorms = [m for m in model.modules() if isinstance(m, ActNorm)]
        assert all(bool(a.initialized) for a in actnorms)
    flowcore.save(model, tmp_path / "ck", note="test")
    loaded = flowcore.load(tmp_path / "ck")
    v = torch.rand(4, *MODEL_CONFIGS[key]["image_shape"]) * 0.9 + 0.05
    assert torch.equal(model.log_prob(v), loaded.log_prob(v))
    assert loaded.checkpoint_meta["note"] == "test"
    # ActNorm stays initialised after load: a training-mode forward must not re-initialise it from this batch
    actnorms = [m for m in loaded.modules() if isinstance(m, ActNorm)]
    before = [{k: t.clone() for k, t in m.state_dict().items()} for m in actnorms]
    loaded.train()
    loaded(torch.rand(4, *MODEL_CONFIGS[key]["image_shape"]) * 0.2 + 0.7)  # a batch unlike the training data
    for m, saved in zip(actnorms, before, strict=True):
        assert bool(m.initialized)
        for k, t in m.state_dict().items():
            assert torch.equal(t, saved[k]), k
    assert bool(actnorms) == key.startswith("glow")


class _Evil:
    def __reduce__(self):
        return (Path.touch, (Path(self.target),))


def test_malicious_pickle_is_refused_without_executing(tmp_path):
    model = _trained_like()
    folder = flowcore.save(model, tmp_path / "ck")
    marker = tmp_path / "pwned"
    evil = _Evil()
    evil.target = str(marker)
    (folder / "model.safetensors").write_bytes(pickle.dumps(evil))
    with pytest.raises(flowcore.CheckpointError, match="safetensors"):
        flowcore.load(folder)
    assert not marker.exists()


def test_broken_checkpoints_give_one_clear_error(tmp_path):
    model = _trained_like()
    folder = flowcore.save(model, tmp_path / "ck")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(flowcore.CheckpointError, match="safetensors"):
        flowcore.load(folder)
    folder = flowcore.save(model, tmp_path / "ck2")
    cfg = (folder / "config.json").read_text().replace('"hidden": 4', '"hidden": 6')
    (folder / "config.json").write_text(cfg)
    with pytest.raises(flowcore.CheckpointError, match="do not match"):
        flowcore.load(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(flowcore.CheckpointError, match="JSON"):
        flowcore.load(folder)
    (folder / "model.safetensors").unlink()
    (folder / "config.json").unlink()
    with pytest.raises(flowcore.CheckpointError, match="missing"):
        flowcore.load(folder)
    with pytest.raises(flowcore.CheckpointError, match="no checkpoint named"):
        flowcore.load("no_such_model_name")


def test_shared_model_is_thread_safe():
    model = _trained_like("glow_gray")
    batches = [torch.rand(5, 1, 4, 4, generator=torch.Generator().manual_seed(i)) * 0.9 + 0.05 for i in range(8)]
    serial = [model.log_prob(b) for b in batches]
    results: list = [None] * 8

    def work(i):
        for _ in range(20):
            results[i] = model.log_prob(batches[i])
            # an inverse right away, with no forward of its own, on another thread's data
            model.inverse(torch.randn(2, 1, 4, 4))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for a, b in zip(serial, results, strict=True):
        assert torch.equal(a, b)


def test_discrete_likelihood_convention():
    model = _trained_like().double()
    k = np.random.default_rng(0).integers(0, 256, size=(3, 4, 4), dtype=np.uint8)
    ll = flowcore.log_likelihood_nats(model, k, dequantization="midpoint")
    v = (torch.as_tensor(k, dtype=torch.float64)[:, None] + 0.5) / 256
    expected = model.log_prob(v).double().detach().numpy() - 16 * np.log(256)
    np.testing.assert_allclose(ll, expected, rtol=0, atol=1e-9)
    terms = log_likelihood_terms(model, k, dequantization="midpoint")
    np.testing.assert_allclose(terms["log_det"] + terms["prior_by_scale"].sum(1) - 16 * np.log(256), ll, atol=1e-9)
    assert terms["prior_by_scale"].shape == (3, 2)
    bpd = flowcore.bits_per_dim(model, k, dequantization="midpoint")
    np.testing.assert_allclose(bpd, -expected / (16 * np.log(2)), atol=1e-9)
    # seeded uniform dequantization is reproducible and averaging draws changes the estimate
    a = flowcore.log_likelihood_nats(model, k, n_draws=3, seed=5)
    assert np.array_equal(a, flowcore.log_likelihood_nats(model, k, n_draws=3, seed=5))
    assert not np.array_equal(a, flowcore.log_likelihood_nats(model, k, n_draws=1, seed=5))


def test_config_validation_messages():
    with pytest.raises(ValueError, match="unknown arch"):
        flowcore.build({"arch": "maf"})
    with pytest.raises(ValueError, match="squeezed"):
        flowcore.build({"arch": "realnvp", "image_shape": [1, 28, 28], "scales": 4})
    with pytest.raises(ValueError, match="unknown config keys"):
        flowcore.build({"arch": "realnvp", "widht": 3})


def test_likelihood_does_not_depend_on_batching():
    model = _trained_like()
    k = np.random.default_rng(1).integers(0, 256, size=(7, 4, 4), dtype=np.uint8)
    whole = flowcore.log_likelihood_nats(model, k, n_draws=2, seed=3, batch_size=256)
    np.testing.assert_allclose(flowcore.log_likelihood_nats(model, k, n_draws=2, seed=3, batch_size=3), whole,
                               rtol=0, atol=1e-4)
    one = [flowcore.log_likelihood_nats(model, k[i : i + 1], n_draws=2, seed=3)[0] for i in range(7)]
    np.testing.assert_allclose(one, whole, rtol=0, atol=1e-4)
    # order and company do not matter: reversed, or beside a copy of itself, an image keeps its score
    np.testing.assert_allclose(flowcore.log_likelihood_nats(model, k[::-1], n_draws=2, seed=3)[::-1], whole,
                               rtol=0, atol=1e-4)
    twins = flowcore.log_likelihood_nats(model, np.stack([k[2], k[5], k[2]]), n_draws=2, seed=3)
    assert twins[0] == twins[2]
    np.testing.assert_allclose(twins, whole[[2, 5, 2]], rtol=0, atol=1e-4)


def test_noise_is_keyed_by_content_and_seed():
    from flowcore.flows.likelihood import per_image_noise

    k = torch.as_tensor(np.random.default_rng(2).integers(0, 256, size=(3, 1, 4, 4), dtype=np.uint8))
    k[2] = k[0]
    u = per_image_noise(k, seed=0, draw=0)
    assert torch.equal(u[0], u[2]) and not torch.equal(u[0], u[1])
    assert not torch.equal(per_image_noise(k, seed=1, draw=0)[0], u[0])
    assert not torch.equal(per_image_noise(k, seed=0, draw=1)[0], u[0])
    changed = k.clone()
    changed[0, 0, 0, 0] ^= 1  # one pixel, one bit: unrelated noise
    assert not torch.equal(per_image_noise(changed, seed=0, draw=0)[0], u[0])


# flowcore's rooms, lowest first: a module imports only from its own room or from a lower one (cli.py and the
# package's __init__ sit above them all). inspection builds on flows alone, as data does.
LAYERS = {"flows": 0, "data": 1, "inspection": 1, "zoo": 2, "training": 3, "ood": 4, "release": 5, "": 5}


def flowcore_import_graph() -> dict[str, set[str]]:
    """Module -> the flowcore modules it imports, at module level *and* inside functions (a lazy import still
    ties two modules together), as dotted names below ``flowcore`` (``training.train``; ``cli``)."""
    import ast

    root = Path(flowcore.__file__).parent
    modules = {".".join(p.relative_to(root).with_suffix("").parts) for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for path in root.rglob("*.py"):
        name = ".".join(path.relative_to(root).with_suffix("").parts)
        package = name.rsplit(".", 1)[0] if path.name != "__init__.py" else name
        package = "" if package in ("__init__", "cli") or "." not in name and path.name != "__init__.py" else package
        package = package.removesuffix(".__init__").removesuffix("__init__")
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if package else []
                target = ".".join([*base, *(node.module.split(".") if node.module else [])])
                targets = [target, *(f"{target}.{a.name}".lstrip(".") for a in node.names)]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("flowcore."):
                targets = [node.module.removeprefix("flowcore.")]
                targets += [f"{targets[0]}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name.removeprefix("flowcore.") for a in node.names if a.name.startswith("flowcore.")]
            else:
                continue
            deps |= {t for t in targets if t in modules and t != name}
        graph[name.removesuffix(".__init__")] = {d.removesuffix(".__init__") for d in deps}
    return graph


def test_no_import_cycle_and_every_import_points_down():
    """No cycle among flowcore's modules, counting imports inside functions too, and every import goes to the
    module's own room or a lower one (LAYERS)."""
    graph = flowcore_import_graph()
    assert "training.train" in graph and "flows.models" in graph["training.train"]
    assert "ood.evaluate" in graph["ood.vectors"] or "data.datasets" in graph["ood.vectors"]
    state: dict[str, int] = {}

    def visit(name, trail):
        if state.get(name) == 1:
            raise AssertionError(f"import cycle: {' -> '.join([*trail, name])}")
        if state.get(name) == 2 or name not in graph:
            return
        state[name] = 1
        for dep in sorted(graph[name]):
            visit(dep, [*trail, name])
        state[name] = 2

    for module in sorted(graph):
        visit(module, [])

    def room(module: str) -> str:
        return module.split(".")[0] if "." in module or module in LAYERS else ""

    upward = [(m, d) for m, deps in graph.items() for d in deps if LAYERS[room(d)] > LAYERS[room(m)]]
    assert not upward, upward
    assert set(LAYERS) - {""} == {p.name for p in Path(flowcore.__file__).parent.iterdir()
                                  if (p / "__init__.py").is_file()}


def test_the_library_never_imports_its_dashboard():
    """The dashboard needs the [app] extra; the library must work without it."""
    import ast

    for path in Path(flowcore.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [("." * node.level) + (node.module or "")]
            assert not any(n.lstrip(".").startswith(("dashboard", "flowcore.dashboard")) for n in names), path.name


BF16_KEYS = ["realnvp_gray", "realnvp_rgb", "realnvp_cycle", "realnvp_bottleneck", "glow_gray", "glow_rgb",
             "glow_highway"]


def _bf16_model(key: str) -> tuple[torch.nn.Module, torch.Tensor]:
    """A perturbed model in training mode with bfloat16 st-nets (ActNorm initialised), and an input batch."""
    from flowcore.flows.precision import set_st_precision

    torch.manual_seed(0)  # seeded weights: the bf16/fp32 gap of a tiny perturbed net varies with them (1-11 %)
    model = perturb_(flowcore.build(MODEL_CONFIGS[key])).train()
    shape = MODEL_CONFIGS[key]["image_shape"]
    v = torch.rand(4, *shape, generator=torch.Generator().manual_seed(1)) * 0.98 + 0.01
    model(v)  # Glow's ActNorm initialises from the first training batch
    set_st_precision(model, "bf16")
    return model, v


@pytest.mark.parametrize("key", BF16_KEYS)
def test_bf16_st_nets_keep_the_flow_exactly_invertible(key):
    """Only the st-nets run in bfloat16: inverse(forward(v)) is v to float32 precision, in training mode (the mode
    bf16 is used in; BatchNorm sees the same conditioning half both ways), although the st-nets' outputs differ
    from float32 by bfloat16 rounding."""
    from flowcore.flows.precision import st_precision

    model, v = _bf16_model(key)
    seen = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
             for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    z, log_det = model(v)
    for h in hooks:
        h.remove()
    assert z.dtype == log_det.dtype == torch.float32
    assert torch.bfloat16 in seen  # the st-nets really ran in bfloat16
    assert (model.inverse(z) - v).abs().max().item() <= 1e-4
    with st_precision(model, "fp32"):
        z32, log_det32 = model(v)
    assert not torch.equal(z, z32)  # a different bijection, not a no-op ...
    assert (z - z32).abs().max().item() < 0.1  # ... within bfloat16 rounding of the float32 one


@pytest.mark.parametrize("key", ["realnvp_gray", "realnvp_cycle", "glow_rgb"])
def test_bf16_log_det_matches_autograd(key):
    model, v = _bf16_model(key)
    model.eval()  # the brute-force Jacobian sees one image at a time: BatchNorm must not use batch statistics
    _, log_det = model(v[:2])
    brute = _brute_log_det(lambda a: model(a)[0].double(), v[:2])
    torch.testing.assert_close(log_det.double(), brute.double(), atol=2e-3, rtol=1e-5)


@pytest.mark.parametrize("key", ["realnvp_rgb", "glow_rgb"])
def test_bf16_gradients_agree_with_float32(key):
    """One step's gradients with bfloat16 st-nets point where the float32 ones do, within bfloat16 tolerance."""
    from flowcore.flows.precision import set_st_precision

    model, v = _bf16_model(key)
    grads = {}
    for precision in ("fp32", "bf16"):
        set_st_precision(model, precision)
        model.zero_grad()
        (-model.log_prob(v).mean()).backward()
        grads[precision] = torch.cat([p.grad.flatten() for p in model.parameters()])
    g32, g16 = grads["fp32"], grads["bf16"]
    assert not torch.equal(g32, g16)
    assert ((g16 - g32).norm() / g32.norm()).item() < 0.05
    assert torch.nn.functional.cosine_similarity(g16, g32, dim=0).item() > 0.998


def test_precision_is_never_saved_and_is_validated(tmp_path):
    from flowcore.flows.precision import set_st_precision, st_precision, st_precision_of
    from flowcore.zoo.checkpoints import load, save

    model, v = _bf16_model("glow_gray")
    assert st_precision_of(model) == "bf16"
    with st_precision(model, "fp32"):
        assert st_precision_of(model) == "fp32"
    assert st_precision_of(model) == "bf16"
    save(model, tmp_path / "ck", name="t")
    assert st_precision_of(load(tmp_path / "ck")) == "fp32"  # scores are float32 whatever the training was
    with pytest.raises(ValueError, match="unknown precision 'fp16'"):
        set_st_precision(model, "fp16")


def test_one_layout_rule_reads_every_accepted_arrangement():
    """flows.layout is the one reader of image layouts: batches and single images, channels first or last, and
    back to channels-last (one channel dropped) for files and plots; the library's converters all go through it."""
    from flowcore.flows.layout import to_batch, to_channels_last, to_picture
    from flowcore.flows.likelihood import as_image_tensor

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (2, 3, 5, 7), dtype=np.uint8)  # N, C, H, W
    gray = rgb[:, :1]
    for batch in (rgb, gray):
        c = batch.shape[1]
        last = batch.transpose(0, 2, 3, 1)
        for given in (batch, last, torch.from_numpy(batch)):
            assert torch.equal(to_batch(given), torch.from_numpy(batch))
            assert torch.equal(to_batch(given, (c, 5, 7)), torch.from_numpy(batch))
        assert torch.equal(to_batch(batch[0], (c, 5, 7)), torch.from_numpy(batch[:1]))  # one image, channels first
        assert torch.equal(to_batch(last[0], (c, 5, 7)), torch.from_numpy(batch[:1]))  # one image, channels last
        want = last[..., 0] if c == 1 else last
        np.testing.assert_array_equal(to_channels_last(batch), want)
        np.testing.assert_array_equal(to_channels_last(torch.from_numpy(batch), (c, 5, 7)), want)
        np.testing.assert_array_equal(to_picture(batch[0]), want[0])
        np.testing.assert_array_equal(to_picture(last[0]), want[0])
    np.testing.assert_array_equal(to_batch(gray[:, 0]).numpy(), gray)  # (N, H, W) is one channel
    np.testing.assert_array_equal(to_batch(gray[0, 0], (1, 5, 7)).numpy(), gray[:1])  # (H, W) with the shape
    with pytest.raises(ValueError, match="do not match the model's image shape"):
        to_batch(rgb, (1, 5, 7))
    with pytest.raises(ValueError, match="expected a batch of images"):
        to_batch(np.zeros(5))
    with pytest.raises(ValueError, match="cannot draw"):
        to_picture(np.zeros((1, 2, 3, 4)))
    # the library's entry points agree with the rule
    np.testing.assert_array_equal(as_image_tensor(rgb.transpose(0, 2, 3, 1)).numpy(), rgb)
    with pytest.raises(ValueError, match="uint8"):
        as_image_tensor(rgb.astype(np.float32))
