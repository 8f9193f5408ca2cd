"""SuperCLIP against HF CLIPModel on the same weights, the head as DESIGN.md defines it, bad input."""

import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPModel

from conftest import MICRO
from superclip_pl.losses import classification_loss
from superclip_pl.model import PRESETS, SuperCLIP, clip_config


@pytest.fixture
def model(tokenizer):
    torch.manual_seed(0)
    return SuperCLIP.build("tiny", tokenizer, overrides=MICRO).eval()


def test_encoders_equal_hf_features(model, batch):
    clip: CLIPModel = model.clip
    with torch.no_grad():
        img = clip.get_image_features(pixel_values=batch["pixel_values"]).pooler_output
        txt = clip.get_text_features(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).pooler_output
        torch.testing.assert_close(model.encode_image(batch["pixel_values"]), F.normalize(img, dim=-1))
        torch.testing.assert_close(
            model.encode_text(batch["input_ids"], batch["attention_mask"]), F.normalize(txt, dim=-1)
        )
        out = model(**batch)
    torch.testing.assert_close(out["image_embeds"], F.normalize(img, dim=-1))
    torch.testing.assert_close(out["text_embeds"], F.normalize(txt, dim=-1))


def test_text_pooling_uses_the_tokenizers_eos(model, tokenizer, batch):
    cfg = model.config.text_config
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
    )
    assert cfg.vocab_size == len(tokenizer)
    # padding beyond the first EOS does not change the text embedding (pooled at the first EOS)
    ids, mask = batch["input_ids"][:1], batch["attention_mask"][:1]
    pad = torch.full((1, 5), tokenizer.pad_token_id)
    with torch.no_grad():
        a = model.encode_text(ids, mask)
        b = model.encode_text(torch.cat([ids, pad], 1), torch.cat([mask, torch.zeros_like(pad)], 1))
    torch.testing.assert_close(a, b)


def test_head_is_patch_mean_after_post_layernorm(model, batch):
    with torch.no_grad():
        out = model(**batch)
        hidden = model.clip.vision_model(pixel_values=batch["pixel_values"]).last_hidden_state
        feats = model.clip.vision_model.post_layernorm(hidden[:, 1:]).mean(1)  # CLS excluded
        expected = model.head.proj(
            F.layer_norm(
                feats, (feats.shape[-1],), model.head.norm.weight, model.head.norm.bias, model.head.norm.eps
            )
        )
    assert out["vocab_logits"].shape == (8, model.vocab_size)
    torch.testing.assert_close(out["vocab_logits"], expected)


def test_head_init():
    torch.manual_seed(0)
    cfg = clip_config("tiny", overrides={"text_config": {"vocab_size": 4096}})
    head = SuperCLIP(cfg).head
    width = cfg.vision_config.hidden_size
    assert torch.all(head.proj.bias == 0)
    assert abs(head.proj.weight.std().item() - width**-0.5) < 0.05 * width**-0.5
    assert abs(head.proj.weight.mean().item()) < 1e-3


def test_no_head_for_plain_clip(tokenizer, batch):
    model = SuperCLIP.build("tiny", tokenizer, overrides=MICRO, head=False)
    assert model.head is None
    assert not any("head" in n for n, _ in model.named_parameters())
    assert model(**batch)["vocab_logits"] is None


def test_class_loss_gradient_reaches_vision_tower_only(model, batch):
    model.train()
    out = model(**batch)
    loss = classification_loss(
        out["vocab_logits"],
        batch["input_ids"],
        torch.ones(model.vocab_size),
        [model.config.text_config.bos_token_id, model.config.text_config.eos_token_id],
    )
    loss.backward()
    vision = [p.grad for p in model.clip.vision_model.parameters()]
    assert all(g is not None for g in vision) and sum(g.abs().sum() for g in vision) > 0
    assert all(p.grad is None for p in model.clip.text_model.parameters())
    assert model.head.proj.weight.grad.abs().sum() > 0


def test_presets_have_the_paper_widths():
    b16 = clip_config("ViT-B-16")
    assert (b16.vision_config.hidden_size, b16.vision_config.num_hidden_layers) == (768, 12)
    assert (b16.text_config.hidden_size, b16.text_config.num_hidden_layers) == (512, 12)
    assert (b16.projection_dim, b16.vision_config.image_size, b16.vision_config.patch_size) == (512, 224, 16)
    assert b16.text_config.max_position_embeddings == 77
    assert set(PRESETS) >= {"tiny", "ViT-B-16", "ViT-L-16"}


def test_pretrained_directory_loads_its_weights(tmp_path, tokenizer, batch):
    torch.manual_seed(1)
    source = SuperCLIP.build("tiny", tokenizer, overrides=MICRO)
    hf = CLIPModel(source.config)
    state = source.clip.state_dict()
    state["logit_scale"] = state["logit_scale"].reshape(())  # HF's 0-d scalar (ours is (1,) for FSDP2)
    hf.load_state_dict(state)
    hf.save_pretrained(tmp_path)
    loaded = SuperCLIP.build(str(tmp_path), tokenizer).eval()
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.encode_image(batch["pixel_values"]), source.eval().encode_image(batch["pixel_values"])
        )
    assert loaded.head is not None and loaded.vocab_size == len(tokenizer)


def test_tokenizer_larger_than_text_vocab_fails_clearly(tmp_path, tokenizer):
    cfg = clip_config("tiny", tokenizer, overrides=MICRO)
    cfg.text_config.vocab_size = 40
    CLIPModel(cfg).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"tokenizer has \d+ tokens but the text tower's vocab_size is 40"):
        SuperCLIP.build(str(tmp_path), tokenizer)


def test_a_vocab_size_the_user_sets_is_kept_when_it_holds_the_tokenizer(tokenizer):
    padded = -(-(len(tokenizer) + 1) // 64) * 64  # above the tokenizer, a multiple of 64
    cfg = clip_config("tiny", tokenizer, overrides={"text_config": {"vocab_size": padded}})
    assert cfg.text_config.vocab_size == padded
    assert clip_config("tiny", tokenizer).text_config.vocab_size == len(
        tokenizer
    )  # none set: the tokenizer's
    with pytest.raises(ValueError, match=r"^backbone_config.text_config.vocab_size=8 is less than"):
        clip_config("tiny", tokenizer, overrides={"text_config": {"vocab_size": 8}})


def test_missing_eos_in_text_config_fails_clearly(tmp_path, tokenizer):
    cfg = clip_config("tiny", tokenizer, overrides=MICRO)
    cfg.text_config.eos_token_id = 7
    CLIPModel(cfg).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="eos_token_id=7 but the tokenizer's eos_token_id"):
        SuperCLIP.build(str(tmp_path), tokenizer)


def test_unknown_backbone_fails_clearly():
    with pytest.raises(ValueError, match="cannot load a CLIP model from 'ViT-Q-99'.*presets are"):
        SuperCLIP.build("ViT-Q-99")
