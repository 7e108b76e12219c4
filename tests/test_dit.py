"""The DiT model, its diffusion sampler, checkpoint loading and the shipped demo DiT."""

from __future__ import annotations

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # no model hub here: loading must fail fast and clearly without files

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from shardlight.core.errors import ModelLoadError  # noqa: E402
from shardlight.models.diffusion import Diffusion, make_betas, outline_weights, seeded_noise  # noqa: E402
from shardlight.models.dit import DIT_MODELS, DiT, DiTConfig, build_dit  # noqa: E402
from shardlight.models.sampler import (  # noqa: E402
    PUBLISHED_RENAMES,
    DiTGenerator,
    config_from_state_dict,
    convert_published_state_dict,
)
from shardlight.models.weights import MODEL_DIR  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def one_thread(one_torch_thread):
    """Tiny torch ops run single-threaded here (see conftest.one_torch_thread)."""


# Parameter counts from the paper's Table 1 (millions), for the 256x256 latent (32x32x4) models.
PAPER_PARAMS_M = {"S": 33, "B": 130, "L": 458, "XL": 675}


def tiny(**overrides) -> DiT:
    torch.manual_seed(0)
    cfg = dict(input_size=8, in_channels=3, num_classes=5, learn_sigma=False)
    return build_dit("DiT-Tiny/2", **{**cfg, **overrides})


def randomize_zero_init(model: DiT, seed: int = 1) -> DiT:
    """Give the zero-initialised adaLN-Zero layers random values, so outputs depend on t and y."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in [b.modulation for b in model.blocks] + [model.final.modulation, model.final.linear]:
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen) * 0.05)
            layer.bias.copy_(torch.randn(layer.bias.shape, generator=gen) * 0.05)
    return model.eval()


# Model ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(DIT_MODELS))
def test_every_registered_size_has_the_paper_shape(name):
    """At the paper's 32x32x4 latent input: output shape, token count and (for paper sizes) parameter count."""
    with torch.device("meta"):  # no memory, no init cost: shapes and counts only
        model = build_dit(name)
        out = model(torch.zeros(2, 4, 32, 32), torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long))
    patch = int(name.rsplit("/", 1)[1])
    assert out.shape == (2, 8, 32, 32)  # learn_sigma: ε and Σ
    assert model.pos_embed.shape[1] == (32 // patch) ** 2
    size = name.split("-")[1].split("/")[0]
    if size in PAPER_PARAMS_M:
        params = sum(p.numel() for p in model.parameters()) / 1e6
        assert abs(params - PAPER_PARAMS_M[size]) / PAPER_PARAMS_M[size] < 0.03, params


@pytest.mark.parametrize("name", ["DiT-Tiny/1", "DiT-Tiny/2", "DiT-Tiny/4", "DiT-S/2", "DiT-S/8", "DiT-B/4"])
def test_forward_on_small_inputs(name):
    torch.manual_seed(0)
    model = build_dit(name, input_size=16, in_channels=3, num_classes=7, learn_sigma=False).eval()
    x = torch.randn(2, 3, 16, 16)
    out = model(x, torch.tensor([0, 999]), torch.tensor([3, 7]))  # 7 = the null class
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_adaln_zero_starts_as_identity():
    model = tiny()
    for block in model.blocks:
        assert torch.count_nonzero(block.modulation.weight) == 0 and torch.count_nonzero(block.modulation.bias) == 0
    tokens, c = torch.randn(3, 16, model.config.hidden_size), torch.randn(3, model.config.hidden_size)
    for block in model.blocks:  # gates α = 0: each untrained block returns its residual stream unchanged
        assert torch.equal(block(tokens, c), tokens)
    x = torch.randn(3, 3, 8, 8)
    assert torch.count_nonzero(model(x, torch.tensor([1, 500, 999]), torch.tensor([0, 1, 5]))) == 0


def test_trained_gates_open_the_residual_branches():
    model = randomize_zero_init(tiny())
    tokens, c = torch.randn(3, 16, model.config.hidden_size), torch.randn(3, model.config.hidden_size)
    assert not torch.allclose(model.blocks[0](tokens, c), tokens)


def test_label_dropout_uses_the_null_class_only_in_training():
    model = tiny(class_dropout=1.0)
    y = torch.tensor([0, 1, 2])
    model.train()
    assert torch.equal(model.label_embed(y), model.label_embed.table.weight[[5, 5, 5]])
    model.eval()
    assert torch.equal(model.label_embed(y), model.label_embed.table.weight[[0, 1, 2]])


def test_unpatchify_inverts_patch_layout():
    """A token whose outputs are (row, col, channel)-ordered lands in the right pixels."""
    model = tiny()
    p, g, c = 2, 4, 3
    image = torch.arange(c * 8 * 8, dtype=torch.float32).reshape(1, c, 8, 8)
    tokens = image.reshape(1, c, g, p, g, p).permute(0, 2, 4, 3, 5, 1).reshape(1, g * g, p * p * c)
    assert torch.equal(model.unpatchify(tokens), image)


# Diffusion -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_schedules_decay_signal_to_noise(schedule):
    betas = make_betas(schedule)
    alpha_bar = torch.cumprod(1 - betas, 0)
    assert betas.shape == (1000,) and (betas > 0).all() and (betas < 1).all()
    assert alpha_bar[0] > 0.99 and alpha_bar[-1] < 0.01 and (alpha_bar.diff() < 0).all()


def test_training_loss_is_noise_mse_and_learns():
    torch.manual_seed(0)
    model, diffusion = tiny().train(), Diffusion("cosine")
    x0 = torch.rand(16, 3, 8, 8) * 2 - 1
    y = torch.arange(16) % 5
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = diffusion.training_loss(model, x0, y, torch.Generator().manual_seed(0)).item()
    assert abs(first - 1.0) < 0.2  # zero-initialised output: the loss is E[ε²] ≈ 1
    for step in range(60):
        loss = diffusion.training_loss(model, x0, y, torch.Generator().manual_seed(step))
        opt.zero_grad()
        loss.backward()
        opt.step()
    losses = [diffusion.training_loss(model, x0, y, torch.Generator().manual_seed(s)).item() for s in range(100, 110)]
    assert np.mean(losses) < 0.8 * first


def test_outline_weights_favour_edges_and_average_one():
    square = torch.zeros(2, 4, 16, 16)
    square[:, :, 5:11, 5:11] = 1.0
    square[1] *= 3.0  # the weights see change relative to the image's own mean change
    w = outline_weights(square, 2.0)
    assert w.shape == (2, 1, 16, 16)
    assert torch.allclose(w.mean(dim=(1, 2, 3)), torch.ones(2), atol=1e-5)
    assert torch.allclose(w[0], w[1])
    edge, inside, outside = w[0, 0, 5, 8], w[0, 0, 8, 8], w[0, 0, 0, 0]
    assert edge > 2.0 * inside and inside == outside and inside < 1  # flat regions inside and out weigh alike
    assert torch.equal(outline_weights(torch.full((1, 4, 8, 8), 0.3), 2.0), torch.ones(1, 1, 8, 8))


def test_outline_weighted_loss_is_the_plain_loss_reweighted():
    torch.manual_seed(0)
    model, diffusion = tiny().train(), Diffusion("cosine", prediction="v")
    flat, y = torch.full((4, 3, 8, 8), 0.5), torch.arange(4)
    plain = diffusion.training_loss(model, flat, y, torch.Generator().manual_seed(1))
    assert torch.allclose(diffusion.training_loss(model, flat, y, torch.Generator().manual_seed(1),
                                                  outline_weight=5.0), plain)  # nothing to weigh
    x0 = torch.rand(4, 3, 8, 8) * 2 - 1
    x0[:, :, :, :4] = -1.0  # a flat half: its errors count less than the textured half's
    with torch.no_grad():
        model.final.linear.weight.normal_(0, 0.1)  # nonzero predictions, so errors differ by position
        gen = torch.Generator().manual_seed(2)  # the loss's draws, in its order: timesteps, then noise
        t = torch.randint(0, diffusion.num_steps, (4,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        ab = diffusion.alpha_bar[t].float().view(-1, 1, 1, 1)
        error = (model(diffusion.add_noise(x0, t, noise), t, y) - (ab.sqrt() * noise - (1 - ab).sqrt() * x0)) ** 2
        weighted = diffusion.training_loss(model, x0, y, torch.Generator().manual_seed(2), outline_weight=2.0)
        assert torch.allclose(weighted, (error * outline_weights(x0, 2.0)).mean(), rtol=1e-5)
        assert not torch.allclose(weighted, error.mean(), rtol=1e-3)


def test_v_prediction_recovers_the_exact_noise():
    diffusion = Diffusion("cosine", prediction="v")
    x0, noise = torch.rand(2, 3, 8, 8) * 2 - 1, torch.randn(2, 3, 8, 8)
    for t in (0, 500, 999):
        ab = diffusion.alpha_bar[t].item()
        xt = diffusion.add_noise(x0, torch.full((2,), t), noise)
        v = ab ** 0.5 * noise - (1 - ab) ** 0.5 * x0
        assert torch.allclose(diffusion.to_eps(v, xt, t), noise, atol=1e-4)
    with pytest.raises(ValueError):
        Diffusion(prediction="x0")


def test_v_prediction_training_learns():
    torch.manual_seed(0)
    model, diffusion = tiny().train(), Diffusion("cosine", prediction="v")
    x0, y = torch.rand(16, 3, 8, 8) * 2 - 1, torch.arange(16) % 5
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    before = np.mean([diffusion.training_loss(model, x0, y, torch.Generator().manual_seed(s)).item()
                      for s in range(100, 110)])
    for step in range(60):
        loss = diffusion.training_loss(model, x0, y, torch.Generator().manual_seed(step))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = np.mean([diffusion.training_loss(model, x0, y, torch.Generator().manual_seed(s)).item()
                     for s in range(100, 110)])
    assert after < 0.9 * before


def test_sampler_is_deterministic_per_seed_and_batch_independent():
    model, diffusion = randomize_zero_init(tiny()), Diffusion("linear")
    y = torch.tensor([0, 1, 2])

    def sample(seeds, labels):
        return diffusion.sample(model, seeded_noise(seeds, (3, 8, 8)), labels, steps=5, guidance=3.0, clip=True)

    a, b = sample([1, 2, 3], y), sample([1, 2, 3], y)
    alone, other = sample([2], y[1:2]), sample([4, 2, 3], y)
    assert torch.equal(a, b)
    # the same seed alone in its batch: equal up to rounding, which differs with the batch's size (the BLAS
    # kernels block it differently) and grows through five guided steps (measured up to 2e-4 on AVX-512)
    assert torch.allclose(a[1], alone[0], atol=1e-3)
    assert (a[0] - other[0]).abs().mean() > 0.05  # another seed, another image


def test_guidance_scale_mixes_conditional_and_null_predictions():
    model, diffusion = randomize_zero_init(tiny()), Diffusion("linear")
    x, y, t = torch.randn(2, 3, 8, 8), torch.tensor([1, 4]), torch.full((2,), 500)
    cond = model(x, t, y)
    uncond = model(x, t, torch.full_like(y, 5))
    assert not torch.allclose(cond, uncond)
    for scale in (0.0, 1.0, 4.0):
        eps = diffusion.predict_noise(model, x, 500, y, scale)
        assert torch.allclose(eps, uncond + scale * (cond - uncond), atol=1e-5)
    assert torch.equal(diffusion.predict_noise(model, x, 500, y, 1.0), cond)  # scale 1 = conditional only


def test_guidance_away_from_negatives_starts_from_their_mean_prediction():
    model, diffusion = randomize_zero_init(tiny()), Diffusion("linear")
    x, y, t = torch.randn(2, 3, 8, 8), torch.tensor([1, 4]), torch.full((2,), 500)
    negatives = torch.tensor([[0, 2, 3], [3, 2, 1]])
    cond = model(x, t, y)
    base = sum(model(x, t, negatives[:, k]) for k in range(3)) / 3
    eps = diffusion.predict_noise(model, x, 500, y, 3.0, negatives)
    assert torch.allclose(eps, base + 3.0 * (cond - base), atol=1e-5)
    assert not torch.allclose(eps, diffusion.predict_noise(model, x, 500, y, 3.0), atol=1e-3)
    null = torch.full((2, 1), model.label_embed.null_class)  # the null class as the one negative: plain guidance
    assert torch.equal(diffusion.predict_noise(model, x, 500, y, 3.0, null), diffusion.predict_noise(model, x, 500, y, 3.0))


def test_guidance_one_equals_a_conditional_only_sampler():
    model, diffusion = randomize_zero_init(tiny()), Diffusion("cosine")
    noise, y = seeded_noise([5, 6], (3, 8, 8)), torch.tensor([2, 3])
    guided = diffusion.sample(model, noise.clone(), y, steps=4, guidance=1.0)
    x = noise.clone()  # the DDIM update written out with the conditional model only
    steps = diffusion.timesteps(4)
    for i, t in enumerate(steps):
        eps = model(x, torch.full((2,), t), y)
        ab = diffusion.alpha_bar[t].item()
        ab_prev = diffusion.alpha_bar[steps[i + 1]].item() if i + 1 < len(steps) else 1.0
        x0 = (x - (1 - ab) ** 0.5 * eps) / ab ** 0.5
        x = ab_prev ** 0.5 * x0 + (1 - ab_prev) ** 0.5 * eps
    assert torch.allclose(guided, x, atol=1e-4)


def test_vary_keeps_the_source_at_low_strength():
    model, diffusion = randomize_zero_init(tiny()), Diffusion("cosine")
    x0 = torch.rand(4, 3, 8, 8) * 2 - 1
    y, noise = torch.tensor([0, 1, 2, 3]), seeded_noise([1, 2, 3, 4], (3, 8, 8))
    near = diffusion.vary(model, x0, y, noise, strength=0.05, steps=20, clip=True)
    far = diffusion.vary(model, x0, y, noise, strength=1.0, steps=20, clip=True)
    assert (near - x0).abs().mean() < 0.5 * (far - x0).abs().mean()
    with pytest.raises(ValueError):
        diffusion.vary(model, x0, y, noise, strength=0.0)


# Loading -------------------------------------------------------------------------------------------

def to_published(state: dict) -> dict:
    """Our names -> the published checkpoint's names, written out independently of PUBLISHED_RENAMES."""
    out = {}
    for name, tensor in state.items():
        name = (name.replace("patchify.proj.", "x_embedder.proj.")
                .replace("time_embed.mlp.", "t_embedder.mlp.")
                .replace("label_embed.table.", "y_embedder.embedding_table.")
                .replace("final.modulation.", "final_layer.adaLN_modulation.1.")
                .replace("final.linear.", "final_layer.linear.")
                .replace(".modulation.", ".adaLN_modulation.1."))
        out[name] = tensor
    return out


def published_xl2_shapes() -> dict[str, tuple]:
    """Key names and shapes of the released DiT-XL/2-256 checkpoint (1000 classes + null, 4-channel latents)."""
    d = 1152
    shapes = {"pos_embed": (1, 256, 1152), "x_embedder.proj.weight": (d, 4, 2, 2),
                       "x_embedder.proj.bias": (d,), "t_embedder.mlp.0.weight": (d, 256),
                       "t_embedder.mlp.0.bias": (d,), "t_embedder.mlp.2.weight": (d, d), "t_embedder.mlp.2.bias": (d,),
                       "y_embedder.embedding_table.weight": (1001, d),
                       "final_layer.linear.weight": (32, d), "final_layer.linear.bias": (32,),
                       "final_layer.adaLN_modulation.1.weight": (2 * d, d),
                       "final_layer.adaLN_modulation.1.bias": (2 * d,)}
    for i in range(28):
        shapes.update({f"blocks.{i}.attn.qkv.weight": (3 * d, d), f"blocks.{i}.attn.qkv.bias": (3 * d,),
                       f"blocks.{i}.attn.proj.weight": (d, d), f"blocks.{i}.attn.proj.bias": (d,),
                       f"blocks.{i}.mlp.fc1.weight": (4 * d, d), f"blocks.{i}.mlp.fc1.bias": (4 * d,),
                       f"blocks.{i}.mlp.fc2.weight": (d, 4 * d), f"blocks.{i}.mlp.fc2.bias": (d,),
                       f"blocks.{i}.adaLN_modulation.1.weight": (6 * d, d),
                       f"blocks.{i}.adaLN_modulation.1.bias": (6 * d,)})
    return shapes


def test_published_xl2_key_names_map_onto_this_implementation():
    with torch.device("meta"):
        published = {k: torch.empty(s) for k, s in published_xl2_shapes().items()}
        ours = build_dit("DiT-XL/2", input_size=32).state_dict()
    converted = convert_published_state_dict(published)
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in ours.items()}
    assert config_from_state_dict(converted, "DiT-XL/2") == DiTConfig()  # the paper's XL/2-256 defaults
    assert len(PUBLISHED_RENAMES) == 6


def test_published_checkpoint_loads_and_predicts_identically(tmp_path):
    """A small model saved under the published names loads back (from a .pt) to the same function."""
    model = randomize_zero_init(build_dit("DiT-Tiny/2", input_size=8, in_channels=4, num_classes=10))
    path = tmp_path / "DiT-Tiny-2-8.pt"
    torch.save(to_published(model.state_dict()), path)
    from shardlight.models.sampler import _load_dit

    loaded, _ = _load_dit("DiT-Tiny/2", str(path))
    assert loaded.config == model.config
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.tensor([3, 10])
    assert torch.equal(loaded(x, t, y), model(x, t, y))
    with pytest.raises(ModelLoadError, match="not DiT-S/2"):
        _load_dit("DiT-S/2", str(path))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_published_names_load_into_a_random_xl2(tmp_path):
    """The full-size XL/2: a random state dict under the published names loads strictly."""
    torch.manual_seed(0)
    target = build_dit("DiT-XL/2", input_size=32)
    published = {k: torch.randn(s) * 0.01 for k, s in published_xl2_shapes().items()}
    target.load_state_dict(convert_published_state_dict(published))
    assert torch.equal(target.blocks[27].modulation.weight, published["blocks.27.adaLN_modulation.1.weight"])


def test_missing_weights_are_one_line_errors(tmp_path):
    for checkpoint in (None, str(tmp_path / "DiT-XL-2-256x256.pt")):
        with pytest.raises(ModelLoadError) as err:
            DiTGenerator(checkpoint, "DiT-XL/2")
        assert "\n" not in str(err.value) and "DiT" in str(err.value)


def test_latent_model_without_vae_is_one_line_error(tmp_path):
    model = build_dit("DiT-Tiny/2", input_size=8, in_channels=4, num_classes=10)
    path = tmp_path / "latent.pt"
    torch.save(to_published(model.state_dict()), path)
    with pytest.raises(ModelLoadError, match="augment.vae") as err:
        DiTGenerator(str(path), "DiT-Tiny/2")
    assert "\n" not in str(err.value)
    with pytest.raises(ModelLoadError, match="VAE folder not found") as err:
        DiTGenerator(str(path), "DiT-Tiny/2", vae=str(tmp_path / "sd-vae-ft-ema"))
    assert "\n" not in str(err.value)


# The shipped demo DiT --------------------------------------------------------------------------------

SHIPPED = {name: MODEL_DIR / f"{name}.safetensors" for name in ("shapes-dit", "shapes-vit")}
# Measured on the shipped files (configs/models/shapes-dit.md, 20 per class): the demo ViT says the
# conditioning class for 0.71 of generated images (issue 4's target is 0.80: not met, docs/dit.md), the
# reference CNN (0.93 on real held-out images) for 0.62. Floors leave margin for this test's 4 per class.
VIT_MIN = 0.55
CNN_MIN = 0.45
CHANCE = 1 / 24


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.skipif(not all(p.is_file() for p in SHIPPED.values()), reason="shipped demo DiT/ViT weights missing")
def test_shipped_dit_generates_its_target_classes():
    from shardlight.training.dit_eval import (
        generate_per_class,
        reference_accuracy,
        train_reference_classifier,
        vit_accuracy,
    )
    from shardlight.training.train_dit import DitRecipe

    gen = DiTGenerator(str(SHIPPED["shapes-dit"]))
    assert len(gen.class_names) == 24 and gen.shape == (3, 32, 32)
    images, labels = generate_per_class(gen, per_class=4, seed=7)
    assert images[0].size == (64, 64)
    vit = vit_accuracy(images, labels, gen.class_names)["vit_accuracy"]
    cnn = reference_accuracy(train_reference_classifier(DitRecipe()), images, labels, 32)
    assert vit >= VIT_MIN and cnn >= CNN_MIN and min(vit, cnn) > 2 * CHANCE, (vit, cnn)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_train_demo_dit_quick_writes_weights_and_card(tmp_path):
    """The whole recipe on a handful of images: weights with a self-describing header, and a model card."""
    from shardlight.models.weights import read_weights_metadata
    from shardlight.training.demo_dit import train_demo_dit

    result = train_demo_dit(tmp_path, quick=True, device="cpu")
    weights = tmp_path / "shapes-dit.safetensors"
    meta = read_weights_metadata(weights)
    assert result["weights"] == str(weights) and weights.stat().st_size < 10e6
    assert meta["architecture"] == "DiT-Tiny/4" and meta["prediction"] == "v" and meta["schedule"] == "cosine"
    assert json.loads(meta["class_names"])[0] == "red circle" and meta["image_size"] == "64"
    card = (tmp_path / "shapes-dit.md").read_text()
    assert "## Hyper-parameters" in card and "reference_cnn_accuracy" in card
    assert DiTGenerator(str(weights)).generate([0], [0], steps=2)[0].size == (64, 64)


def test_min_snr_weighting_is_the_x0_error_times_min_snr():
    """Min-SNR-γ on a v-prediction model: weight · v-error must equal min(SNR, γ) · x₀-error per sample."""
    diffusion = Diffusion("cosine", 1000, prediction="v")
    torch.manual_seed(0)
    x0 = torch.rand(6, 3, 8, 8) * 2 - 1
    model = lambda x, t, y: torch.zeros_like(x) + 0.1 * x  # noqa: E731 - any deterministic denoiser
    gamma = 5.0
    loss = diffusion.training_loss(model, x0, torch.zeros(6, dtype=torch.long),
                                   generator=torch.Generator().manual_seed(3), min_snr_gamma=gamma)
    # Redo the same draws and compute the x₀ error from the v prediction independently.
    g = torch.Generator().manual_seed(3)
    t = torch.randint(0, 1000, (6,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    ab = diffusion.alpha_bar[t].float().view(-1, 1, 1, 1)
    xt = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    x0_hat = ab.sqrt() * xt - (1 - ab).sqrt() * model(xt, t, None)
    snr = (ab / (1 - ab)).flatten()
    expected = (snr.clamp(max=gamma) * ((x0_hat - x0) ** 2).mean(dim=(1, 2, 3))).mean()
    assert torch.allclose(loss, expected, rtol=1e-4)
