"""Fine-tuning from a pretrained HF CLIP directory (``backbone: DIR``), including our own exports."""

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader
from transformers import CLIPConfig, CLIPModel

from conftest import quiet_trainer
from superclip_pl.interop.export import export_checkpoint
from superclip_pl.train.module import LitSuperCLIP
from test_export import fit_and_save


@pytest.fixture(scope="module")
def hf_clip_dir(tmp_path_factory, tokenizer):
    """A tiny stand-in for a hub CLIP: ``CLIPModel.save_pretrained`` + its tokenizer in one directory,
    with HF's own defaults (quick_gelu, layer_norm_eps 1e-5) rather than our presets'."""
    out = tmp_path_factory.mktemp("hf_clip")
    tower = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    config = CLIPConfig(
        text_config=dict(
            **tower,
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(**tower, image_size=16, patch_size=4),
        projection_dim=24,
    )
    torch.manual_seed(3)
    clip = CLIPModel(config)
    with torch.no_grad():
        clip.logit_scale.fill_(3.0)  # not the init value, so that a re-initialisation would show
    clip.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


def fit(module: LitSuperCLIP, batch: dict, steps: int = 1) -> Trainer:
    trainer = quiet_trainer(
        max_steps=steps,
    )
    trainer.fit(module, DataLoader([batch] * steps, batch_size=None))
    return trainer


def assert_same_weights(actual: dict, expected: dict) -> None:
    assert set(actual) == set(expected)
    for k, v in expected.items():
        # our scalars are held as shape (1,) (FSDP2 needs 1-d parameters); HF holds them 0-d
        torch.testing.assert_close(
            actual[k].reshape(v.shape), v, rtol=0, atol=0, msg=lambda m, k=k: f"{k}: {m}"
        )


def test_fine_tuning_starts_from_exactly_the_pretrained_weights(hf_clip_dir, tokenizer):
    module = LitSuperCLIP(tokenizer=hf_clip_dir, backbone=hf_clip_dir)
    reference = CLIPModel.from_pretrained(hf_clip_dir).eval()
    assert_same_weights(module.model.clip.state_dict(), reference.state_dict())
    config = module.model.config
    assert config.vision_config.hidden_act == "quick_gelu" and config.projection_dim == 24  # its config, kept
    assert module.image_size == 16
    assert module.model.head.proj.out_features == len(tokenizer) == module.model.vocab_size
    assert module.model.head.proj.in_features == 32
    pixels = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = F.normalize(reference.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
        torch.testing.assert_close(module.model.eval().encode_image(pixels), expected, rtol=0, atol=0)
        assert float(module.model.logit_scale()) == pytest.approx(torch.tensor(3.0).exp().item())


def test_one_training_step_from_the_pretrained_model_then_export(hf_clip_dir, batch, tmp_path):
    torch.manual_seed(0)
    module = LitSuperCLIP(tokenizer=hf_clip_dir, backbone=hf_clip_dir, warmup_steps=0)
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    trainer = fit(module, batch)
    assert trainer.global_step == 1 and int(module.samples_seen) == 8
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert torch.isfinite(trainer.callback_metrics["train/class_loss"])
    after = module.model.state_dict()
    for k in (
        "clip.vision_model.encoder.layers.0.mlp.fc1.weight",
        "clip.text_projection.weight",
        "head.proj.weight",
    ):
        assert not torch.equal(after[k], before[k]), f"{k} was not trained"
    # the export of a fine-tuned run takes its architecture from the pretrained directory's config
    trainer.save_checkpoint(tmp_path / "tuned.ckpt")
    exported = CLIPModel.from_pretrained(export_checkpoint(tmp_path / "tuned.ckpt", tmp_path / "export"))
    assert exported.config.vision_config.hidden_act == "quick_gelu" and exported.config.projection_dim == 24
    assert_same_weights(exported.state_dict(), module.model.clip.state_dict())


def test_an_export_of_our_checkpoint_continues_training(tmp_path, tokenizer_dir, tokenizer, batch):
    """Round trip: train -> checkpoint -> export -> ``backbone: EXPORT`` starts from the trained towers."""
    trained = fit_and_save(tokenizer_dir, tokenizer, tmp_path / "run.ckpt")
    out = export_checkpoint(tmp_path / "run.ckpt", tmp_path / "export")
    module = LitSuperCLIP(tokenizer=str(out), backbone=str(out), warmup_steps=0)
    assert_same_weights(module.model.clip.state_dict(), trained.model.clip.state_dict())
    assert module.model.head.proj.out_features == len(tokenizer)
    with torch.no_grad():  # no dropout in these towers: train mode computes the same
        pixels = batch["pixel_values"]
        torch.testing.assert_close(
            module.model.encode_image(pixels), trained.model.encode_image(pixels), rtol=0, atol=0
        )
    trainer = fit(module, batch)
    assert trainer.global_step == 1 and torch.isfinite(trainer.callback_metrics["train/loss"])


def test_a_half_precision_export_fine_tunes_in_float32(tmp_path, tokenizer_dir, tokenizer, batch):
    fit_and_save(tokenizer_dir, tokenizer, tmp_path / "run.ckpt")
    out = export_checkpoint(tmp_path / "run.ckpt", tmp_path / "export", dtype="bfloat16")
    module = LitSuperCLIP(tokenizer=str(out), backbone=str(out), warmup_steps=0)
    assert {p.dtype for p in module.parameters()} == {torch.float32}
    trainer = fit(module, batch)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])


def test_a_pretrained_backbone_starts_in_train_mode(hf_clip_dir):
    module = LitSuperCLIP(tokenizer=hf_clip_dir, backbone=hf_clip_dir)
    assert all(m.training for m in module.modules())
