"""The demo autoencoder and the latent DiT path: round trip, the codec through `generate` and `vary`,
determinism, and loading the autoencoder by name (beside the DiT, from configs/models/, from a run config)."""

from __future__ import annotations

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from shardlight.core.config import load_config
from shardlight.core.errors import InputError, ModelLoadError
from shardlight.models import autoencoder as autoencoder_module
from shardlight.models.autoencoder import Autoencoder, AutoencoderConfig, load_autoencoder, weights_digest
from shardlight.models.dit import build_dit
from shardlight.models.sampler import AutoencoderCodec, DiTGenerator
from shardlight.models.weights import MODEL_DIR, read_weights_metadata
from shardlight.training.synthetic import CLASS_NAMES
from shardlight.training.train_autoencoder import (
    AeRecipe,
    autoencoder_loss,
    quick_recipe,
    save_autoencoder,
    train_autoencoder,
)
from shardlight.training.train_dit import LATENT_RECIPE, save_dit, train_dit
from shardlight.training.train_dit import quick_recipe as quick_dit_recipe

TINY_AE = AutoencoderConfig(image_size=16, latent_channels=4, widths=(8,), stem_width=8)  # 16x16x3 <-> 8x8x4


@pytest.fixture(autouse=True, scope="module")
def one_thread(one_torch_thread):
    """Tiny torch ops run single-threaded here (see conftest.one_torch_thread)."""


def tiny_autoencoder(seed: int = 0) -> Autoencoder:
    torch.manual_seed(seed)
    return Autoencoder(TINY_AE).eval()


def write_latent_pair(folder: Path, ae_name: str = "tiny-ae", seed: int = 0) -> tuple[Path, Path]:
    """A tiny autoencoder file and a latent DiT file that names it (random weights, gates opened)."""
    folder.mkdir(parents=True, exist_ok=True)
    ae_path = folder / f"{ae_name}.safetensors"
    save_autoencoder(tiny_autoencoder(seed), ae_path, AeRecipe(), [], 0.0)
    torch.manual_seed(seed)
    dit = build_dit("DiT-Tiny/2", input_size=8, in_channels=4, num_classes=len(CLASS_NAMES), learn_sigma=False)
    with torch.no_grad():  # adaLN-Zero starts as the identity; random gates make outputs depend on t and y
        for layer in [b.modulation for b in dit.blocks] + [dit.final.modulation, dit.final.linear]:
            layer.weight.normal_(0, 0.05)
    recipe = replace(LATENT_RECIPE, model="DiT-Tiny/2", model_size=8, image_size=16, autoencoder=str(ae_path),
                     sample_steps=4)
    dit_path = folder / "latent-dit.safetensors"
    save_dit(dit, dit_path, recipe, [], 0.0)
    return ae_path, dit_path


def images(n: int, size: int = 16, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


# The autoencoder -----------------------------------------------------------------------------------

@torch.no_grad()
def test_shapes_and_latent_scale_round_trip():
    model = tiny_autoencoder()
    x = torch.rand(5, 3, 16, 16) * 2 - 1
    raw = model.encoder(x)[0]
    assert raw.shape == (5, 4, 8, 8) and TINY_AE.latent_size == 8
    model.set_latent_scale(raw)
    z = model.encode(x)
    assert abs(float(z.mean())) < 1e-5 and abs(float(z.std()) - 1) < 1e-4  # unit scale on what it was measured on
    assert torch.allclose(model.decode(z), model.decoder(raw).clamp(-1, 1), atol=1e-5)  # scale undone exactly


def test_saved_autoencoder_loads_identically_with_its_digest(tmp_path):
    model = tiny_autoencoder()
    model.set_latent_scale(torch.randn(100) * 3 + 1)
    path = tmp_path / "ae.safetensors"
    save_autoencoder(model, path, AeRecipe(), [], 0.0)
    loaded = load_autoencoder(str(path))
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert loaded.config == TINY_AE
    assert torch.allclose(loaded.decode(loaded.encode(x)), model.half().float().decode(model.encode(x)), atol=1e-3)
    assert read_weights_metadata(path)["weights_sha256"] == weights_digest(
        {k: v.half() for k, v in model.state_dict().items()})


def test_training_is_deterministic_and_reduces_the_loss():
    recipe = replace(quick_recipe(AeRecipe()), steps=8, whole_image_steps=2, lr=3e-3)
    (a, log_a), (b, _) = train_autoencoder(recipe), train_autoencoder(recipe)
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert log_a[-1]["l1"] < log_a[0]["l1"]


def test_the_scale_equivariance_term_asks_the_half_size_image_of_the_half_size_latent():
    model = tiny_autoencoder().train()
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    without = AeRecipe(scale_equivariance=0.0)
    plain, l1, kl = autoencoder_loss(model, x, without, torch.Generator().manual_seed(5))
    assert torch.allclose(plain, l1 + without.kl_weight * kl)
    weighted, l1_again, _ = autoencoder_loss(model, x, AeRecipe(scale_equivariance=2.0), torch.Generator().manual_seed(5))
    assert torch.equal(l1_again, l1)  # the same posterior draw
    _, _, z = model(x, torch.Generator().manual_seed(5))
    half = model.decoder(torch.nn.functional.avg_pool2d(z, 2))
    assert half.shape == (3, 3, 8, 8)
    expected = plain + 2.0 * (half - torch.nn.functional.avg_pool2d(x, 2)).abs().mean()
    assert torch.allclose(weighted, expected, rtol=1e-6)


# Training the latent DiT ---------------------------------------------------------------------------

class Killed(Exception):
    """Stands in for a run stopped (a session's end, a crash) right after a checkpoint."""


def test_training_resumes_from_its_checkpoint_exactly_as_if_never_stopped(tmp_path):
    """A CPU run of hours must survive being stopped: the resumed run's weights and loss log are bit for bit those
    of the uninterrupted run, and a checkpoint of another recipe is refused."""
    ae_path, _ = write_latent_pair(tmp_path)
    recipe = replace(quick_dit_recipe(LATENT_RECIPE), model="DiT-Tiny/2", model_size=8, autoencoder=str(ae_path),
                     steps=6, warmup_steps=2)
    data = (torch.randn(40, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.arange(40) % len(CLASS_NAMES))
    whole, whole_log = train_dit(recipe, log_every=3, data=data)
    state, seen = tmp_path / "state.pt", []

    def stop_at_4(step, ema, log):
        seen.append((step, len(log)))
        if step == 4:
            raise Killed

    with pytest.raises(Killed):
        train_dit(recipe, log_every=3, data=data, checkpoint=state, checkpoint_every=2, on_checkpoint=stop_at_4)
    assert seen == [(2, 0), (4, 1)] and state.is_file()
    resumed, log = train_dit(recipe, log_every=3, data=data, checkpoint=state, checkpoint_every=2)
    assert all(torch.equal(whole.state_dict()[k], resumed.state_dict()[k]) for k in whole.state_dict())
    assert [(e["step"], e["loss"]) for e in log] == [(e["step"], e["loss"]) for e in whole_log]
    with pytest.raises(InputError, match="another recipe") as err:
        train_dit(replace(recipe, lr=1e-3), data=data, checkpoint=state)
    assert "\n" not in str(err.value)


def test_a_bf16_recipe_trains_in_mixed_precision_and_a_wrong_precision_is_refused_in_one_line(tmp_path):
    """`precision: bf16` runs the forward under autocast (the fp32 weights are what is trained and shipped) and
    lands near the fp32 run from the same draws; an unknown precision names itself before any work."""
    ae_path, _ = write_latent_pair(tmp_path)
    recipe = replace(quick_dit_recipe(LATENT_RECIPE), model="DiT-Tiny/2", model_size=8, autoencoder=str(ae_path),
                     steps=4, warmup_steps=1)
    data = (torch.randn(40, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.arange(40) % len(CLASS_NAMES))
    full, full_log = train_dit(recipe, log_every=2, data=data)
    mixed, mixed_log = train_dit(replace(recipe, precision="bf16"), log_every=2, data=data)
    assert all(v.dtype == torch.float32 for v in mixed.state_dict().values())
    assert [e["step"] for e in mixed_log] == [2, 4]
    assert all(abs(a["loss"] - b["loss"]) < 0.05 * b["loss"] for a, b in zip(mixed_log, full_log))
    assert any(not torch.equal(full.state_dict()[k], v) for k, v in mixed.state_dict().items())  # bf16 really ran
    with pytest.raises(InputError, match="precision 'fp8'") as err:
        train_dit(replace(recipe, precision="fp8"), data=data)
    assert "\n" not in str(err.value)


# The latent codec in the sampler -------------------------------------------------------------------

def test_latent_dit_generates_and_varies_through_its_autoencoder(tmp_path):
    _, dit_path = write_latent_pair(tmp_path)
    gen = DiTGenerator(str(dit_path))
    assert isinstance(gen.codec, AutoencoderCodec) and gen.latent and gen.shape == (4, 8, 8)
    made = gen.generate([0, 5], seeds=[1, 2], steps=3)
    varied = gen.vary(images(2), [3, 4], seeds=[1, 2], strength=0.5, steps=4)
    assert [im.size for im in made + varied] == [(16, 16)] * 4
    again = DiTGenerator(str(dit_path)).generate([0, 5], seeds=[1, 2], steps=3)
    assert [im.tobytes() for im in made] == [im.tobytes() for im in again]  # same seeds, same pixels
    alone = gen.generate([5], seeds=[2], steps=3)[0]
    assert np.abs(np.asarray(alone, np.int16) - np.asarray(made[1], np.int16)).max() <= 1  # batch-independent


def test_the_latent_recipe_guides_away_from_the_same_colours_other_shapes(tmp_path, monkeypatch):
    _, dit_path = write_latent_pair(tmp_path)
    gen = DiTGenerator(str(dit_path))
    red_square = CLASS_NAMES.index("red square")
    expected = sorted(CLASS_NAMES.index(f"red {s}") for s in ("circle", "triangle", "star"))
    assert gen.negatives.shape == (len(CLASS_NAMES), 3) and sorted(gen.negatives[red_square].tolist()) == expected
    seen = []
    predict = gen.diffusion.predict_noise

    def spy(model, x, t, y, guidance, negatives=None):
        seen.append(negatives)
        return predict(model, x, t, y, guidance, negatives)

    monkeypatch.setattr(gen.diffusion, "predict_noise", spy)
    guided = gen.generate([red_square, 0], seeds=[1, 2])
    assert len(seen) == gen.default_steps and all(torch.equal(n, gen.negatives[[red_square, 0]]) for n in seen)
    gen.negatives = None  # the null class instead: another image from the same seeds
    plain = gen.generate([red_square, 0], seeds=[1, 2])
    assert not np.array_equal(np.asarray(guided[0]), np.asarray(plain[0]))


def test_a_malformed_negatives_table_is_one_line(tmp_path):
    from safetensors.torch import load_file, save_file

    _, dit_path = write_latent_pair(tmp_path)
    meta = read_weights_metadata(str(dit_path))
    weights = load_file(str(dit_path))
    bad_tables = ("[[1, 2], [3]]", "7", "[1, 2]", "[[1, 2", json.dumps([[99]] * len(CLASS_NAMES)),
                  json.dumps([[]] * len(CLASS_NAMES)))
    for bad in bad_tables:
        save_file(weights, str(dit_path), metadata={**meta, "guidance_negatives": bad})
        with pytest.raises(ModelLoadError, match="guidance_negatives must list"):
            DiTGenerator(str(dit_path))


def test_vary_at_low_strength_keeps_the_autoencoder_reconstruction(tmp_path):
    _, dit_path = write_latent_pair(tmp_path)
    gen = DiTGenerator(str(dit_path))
    sources = images(3, seed=4)
    rebuilt = gen.codec.decode(gen.codec.encode(sources, gen.device))
    near = gen.vary(sources, [0, 1, 2], seeds=[7, 8, 9], strength=0.02, steps=25)
    far = gen.vary(sources, [0, 1, 2], seeds=[7, 8, 9], strength=1.0, steps=25)

    def gap(a, b):
        return np.mean([np.abs(np.asarray(x, float) - np.asarray(y, float)).mean() for x, y in zip(a, b)])

    assert gap(near, rebuilt) < 0.5 * gap(far, rebuilt)


# Loading by name -----------------------------------------------------------------------------------

def test_autoencoder_is_found_by_name_beside_the_dit_then_in_configs_models(tmp_path, monkeypatch):
    ae_path, dit_path = write_latent_pair(tmp_path / "run")
    assert read_weights_metadata(dit_path)["autoencoder"] == "tiny-ae"
    shipped = tmp_path / "models"
    shipped.mkdir()
    ae_path.rename(shipped / ae_path.name)  # no longer beside the DiT: found in the models folder instead
    monkeypatch.setattr(autoencoder_module, "MODEL_DIR", shipped)
    assert DiTGenerator(str(dit_path)).codec.autoencoder.config == TINY_AE
    (shipped / ae_path.name).unlink()
    with pytest.raises(ModelLoadError, match="autoencoder 'tiny-ae' not found") as err:
        DiTGenerator(str(dit_path))
    assert "\n" not in str(err.value)


def test_a_different_autoencoder_under_the_same_name_is_refused(tmp_path):
    ae_path, dit_path = write_latent_pair(tmp_path)
    save_autoencoder(tiny_autoencoder(seed=1), ae_path, AeRecipe(), [], 0.0)  # retrained: other weights
    with pytest.raises(ModelLoadError, match="not the one the DiT was trained on") as err:
        DiTGenerator(str(dit_path))
    assert "\n" not in str(err.value)


def test_run_config_checkpoint_loads_the_latent_dit_and_its_autoencoder(tmp_path):
    _, dit_path = write_latent_pair(tmp_path / "models")
    config = tmp_path / "run.yaml"
    config.write_text("augment:\n  enabled: true\n  checkpoint: models/latent-dit.safetensors\n")
    augment = load_config(config).augment
    assert Path(augment.checkpoint) == dit_path  # resolved beside the YAML file
    gen = DiTGenerator(augment.checkpoint, augment.model, augment.vae)
    assert isinstance(gen.codec, AutoencoderCodec) and gen.generate([1], [0], steps=2)[0].size == (16, 16)


# The shipped autoencoder ---------------------------------------------------------------------------

SHIPPED_AE = MODEL_DIR / "shapes-ae.safetensors"


@pytest.mark.skipif(not SHIPPED_AE.is_file() or not (MODEL_DIR / "shapes-vit.safetensors").is_file(),
                    reason="shipped autoencoder or ViT weights missing")
def test_shipped_autoencoder_reconstructions_keep_their_class():
    """On a held-out pool no card used (seed 4242, 10 per class): the demo ViT still sees each class."""
    from shardlight.training.demo_models import decode, held_out_samples, metadata
    from shardlight.training.dit_eval import vit_accuracy
    from shardlight.training.train_autoencoder import psnr, reconstruct

    samples = held_out_samples(4242, 10)
    real, labels = [decode(s) for s in samples], [metadata(s)["label_id"] for s in samples]
    rebuilt = reconstruct(load_autoencoder("shapes-ae"), real)
    assert psnr(real, rebuilt).mean() > SHIPPED_PSNR_MIN
    assert vit_accuracy(rebuilt, labels, list(CLASS_NAMES))["vit_accuracy"] >= SHIPPED_VIT_MIN


SHIPPED_PSNR_MIN = 34.0  # floors below the shipped card's numbers, with margin for 240 images
SHIPPED_VIT_MIN = 0.95  # the card: 0.983 over 480 images (0.98 asked); 0.994 and 0.992 on two other pools


SHIPPED_LATENT_DIT = MODEL_DIR / "shapes-latent-dit.safetensors"
# The card (configs/models/shapes-latent-dit.md, 20 per class): the demo ViT says the conditioning class for 0.73 of
# its images (0.77 and 0.71 on two fresh seed sets; issue 24 asks 0.80); floors leave margin for 4 per class.
LATENT_VIT_MIN = 0.55


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.skipif(not SHIPPED_LATENT_DIT.is_file() or not SHIPPED_AE.is_file()
                    or not (MODEL_DIR / "shapes-vit.safetensors").is_file(), reason="shipped latent DiT/ViT missing")
def test_shipped_latent_dit_is_the_demo_config_s_and_generates_its_target_classes():
    """configs/demo.yaml loads the latent DiT (by file; its autoencoder by the name in its header), and the demo
    ViT recognises what it draws far above chance."""
    from shardlight.core.config import CONFIG_DIR
    from shardlight.training.dit_eval import generate_per_class, vit_accuracy

    augment = load_config(CONFIG_DIR / "demo.yaml").augment
    assert Path(augment.checkpoint) == SHIPPED_LATENT_DIT
    gen = DiTGenerator(augment.checkpoint, augment.model, augment.vae)
    assert isinstance(gen.codec, AutoencoderCodec) and gen.shape == (4, 16, 16)
    assert read_weights_metadata(SHIPPED_LATENT_DIT)["autoencoder_sha256"] == \
        read_weights_metadata(SHIPPED_AE)["weights_sha256"]  # trained on the shipped autoencoder's latents
    images, labels = generate_per_class(gen, per_class=4, seed=7)
    assert images[0].size == (64, 64)
    assert vit_accuracy(images, labels, gen.class_names)["vit_accuracy"] >= LATENT_VIT_MIN


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_train_demo_models_quick_trains_the_autoencoder_then_the_latent_dit(tmp_path):
    """`train-demo-models --ae --latent-dit` on a handful of images: both files self-describing, both cards."""
    from shardlight.training.demo_dit import train_demo_dit
    from shardlight.training.train_autoencoder import train_demo_autoencoder

    ae = train_demo_autoencoder(tmp_path, quick=True)
    dit = train_demo_dit(tmp_path, quick=True, device="cpu", latent=True)
    meta = read_weights_metadata(dit["weights"])
    assert Path(ae["weights"]).stat().st_size < 2e6 and "psnr_mean" in ae
    assert meta["space"] == "latent" and meta["autoencoder"] == "shapes-ae"
    assert meta["autoencoder_sha256"] == read_weights_metadata(ae["weights"])["weights_sha256"]
    assert "## Measured" in (tmp_path / "shapes-ae.md").read_text()
    assert "latent-space" in (tmp_path / "shapes-latent-dit.md").read_text()
    gen = DiTGenerator(dit["weights"])
    assert gen.shape == (4, 16, 16) and gen.generate([0], [0], steps=2)[0].size == (64, 64)
