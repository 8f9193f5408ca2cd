"""Long captions for the head (`class_max_length`) and images normalised on the device."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import CLIPImageProcessorPil

from conftest import COLOURS, MICRO, SHAPES, quiet_trainer
from superclip_pl.data.decode import Collate
from superclip_pl.tokenizer import load_tokenizer, tokenize
from superclip_pl.train.module import LitSuperCLIP
from superclip_pl.transforms import CLIP_MEAN, CLIP_STD, eval_transform, normalize


def long_caption(tokenizer, tokens: int = 150) -> str:
    words, caption = [f"{c} {s}" for c in COLOURS for s in SHAPES], ""
    i = 0
    while len(tokenizer(caption)["input_ids"]) < tokens:
        caption += f" {words[i % len(words)]} number {'left' if i % 3 else 'right'}"
        i += 1
    return caption.strip()


def test_class_max_length_reaches_past_the_text_towers_77_tokens(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    caption = long_caption(tok, 150)
    short = "a red star"
    full = tok([caption])["input_ids"][0]
    assert len(full) >= 150
    batch = tokenize(tok, [caption, short], max_length=77, class_max_length=200)
    assert batch["input_ids"].shape == (2, 77) and batch["input_ids"][0, -1] == tok.eos_token_id
    assert batch["class_ids"].shape == (2, len(full))  # the whole caption (< 200 tokens)
    assert batch["class_ids"][0].tolist() == full
    late = set(full[77:]) - set(batch["input_ids"][0].tolist())
    assert late  # targets include tokens that occur only past position 77
    # the text tower's input is what tokenising at 77 alone gives
    alone = tokenize(tok, [caption, short], max_length=77)
    assert torch.equal(batch["input_ids"], alone["input_ids"])
    assert torch.equal(batch["attention_mask"], alone["attention_mask"])
    # the default adds nothing: the targets are today's input_ids
    assert "class_ids" not in tokenize(tok, [caption], 77, class_max_length=77)
    assert "class_ids" not in Collate(tok, 77)(
        [{"pixel_values": torch.zeros(3, 2, 2, dtype=torch.uint8), "text": caption, "key": "k"}]
    )


def test_the_module_counts_and_targets_the_class_ids(tokenizer_dir, batch):
    tok = load_tokenizer(tokenizer_dir)
    module = LitSuperCLIP(tokenizer_dir, backbone_config=MICRO, warmup_steps=0, class_max_length=200)
    long = tokenize(tok, [long_caption(tok, 150)] * 8, max_length=77, class_max_length=200)
    step = {**batch, "class_ids": long["class_ids"]}
    trainer = quiet_trainer(max_steps=1)
    trainer.fit(module, torch.utils.data.DataLoader([step], batch_size=None))
    counted = module.doc_freq.df.nonzero().flatten().tolist()
    expected = set(long["class_ids"].flatten().tolist()) - set(module.ignore_ids)
    assert set(counted) == expected  # document frequencies count the long targets, not input_ids
    # the class loss is the one of the class ids
    from superclip_pl.losses import classification_loss

    module.eval()
    with torch.no_grad():
        terms = module.compute_losses(step)
        out = module.model(step["pixel_values"], step["input_ids"], step["attention_mask"])
        expected_loss = classification_loss(
            out["vocab_logits"], step["class_ids"], module.doc_freq.idf(), module.ignore_ids
        )
    torch.testing.assert_close(terms["class_loss"], expected_loss)
    with pytest.raises(ValueError, match="class_max_length=0 must be >= 1"):
        LitSuperCLIP(tokenizer_dir, backbone_config=MICRO, class_max_length=0)


def test_class_max_length_is_linked_from_the_model_to_the_data(tokenizer_dir, tmp_path, monkeypatch):
    from pathlib import Path

    from superclip_pl.cli.main import build_cli

    monkeypatch.chdir(tmp_path)
    debug = Path(__file__).resolve().parent.parent / "configs" / "debug.yaml"
    args = ["--config", str(debug), "--data.init_args.tokenizer", tokenizer_dir]
    cli = build_cli([*args, "--model.class_max_length", "200"], run=False)
    assert cli.model.hparams.class_max_length == 200 == cli.datamodule.class_max_length
    assert build_cli(args, run=False).datamodule.class_max_length is None


# ---------------------------------------------------------------- normalisation on the device


def test_device_normalisation_is_bit_identical_to_the_image_processor():
    levels = torch.arange(256, dtype=torch.uint8).expand(3, 256).reshape(3, 16, 16)
    # the processor's rounding: rescale in float64, cast to float32, normalise in float32
    rescaled = (levels.double() * (1 / 255)).float()
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    torch.testing.assert_close(normalize(levels), (rescaled - mean) / std, rtol=0, atol=0)
    rng = np.random.default_rng(0)
    from PIL import Image

    image = Image.fromarray(rng.integers(0, 256, (70, 50, 3), dtype=np.uint8))
    processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    expected = processor(image, return_tensors="pt")["pixel_values"]
    shipped = eval_transform(32, normalized=False)(image)
    assert shipped.dtype == torch.uint8
    torch.testing.assert_close(normalize(shipped[None]), expected, rtol=0, atol=0)


def test_the_data_module_normalises_uint8_batches_after_the_transfer(tokenizer_dir):
    from superclip_pl.data import ImageTextDataModule

    dm = ImageTextDataModule(tokenizer_dir)
    pixels = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    out = dm.on_after_batch_transfer({"pixel_values": pixels.clone(), "keys": ["a", "b"]}, 0)
    torch.testing.assert_close(out["pixel_values"], normalize(pixels), rtol=0, atol=0)
    floats = torch.randn(2, 3, 4, 4)
    assert dm.on_after_batch_transfer({"pixel_values": floats}, 0)["pixel_values"] is floats
    assert dm.on_after_batch_transfer({}, 0) == {}
