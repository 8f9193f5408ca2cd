"""FLIP's patch dropout: the kept tokens (against open_clip's ``PatchDropout`` and a hand computation on
the HF modules), training-only, the same masks in both encodings of negatives across accumulation,
FLOPs of the kept tokens, and resuming a masked run unmasked."""

import copy

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader
from transformers import CLIPModel

import distributed_accumulation as runs
import superclip_pl.patch_dropout as patch_dropout
from conftest import MICRO, quiet_trainer
from openclip_ref import open_clip
from superclip_pl.train.flops import set_flops_per_batch, training_step_flops
from superclip_pl.train.module import LitSuperCLIP
from test_accumulation import assert_same_step, run
from test_module import Batches

P = 16  # MICRO: 16 px images, 4 px patches


@pytest.mark.parametrize(("prob", "num_patches"), [(0.5, 16), (0.75, 16), (0.5, 15), (0.9, 7)])
def test_kept_tokens_are_open_clip_s_for_the_same_draws(prob, num_patches):
    tokens = torch.randn(3, 1 + num_patches, 8)
    ours = patch_dropout.PatchDropout(prob).train()
    torch.manual_seed(5)
    kept = ours(tokens)
    torch.manual_seed(5)
    reference = open_clip().transformer.PatchDropout(prob)(tokens)
    assert torch.equal(kept, reference)
    n = max(1, int(num_patches * (1 - prob)))
    assert kept.shape == (3, 1 + n, 8) and torch.equal(kept[:, 0], tokens[:, 0])  # the class token stays
    assert torch.equal(ours.eval()(tokens), tokens)  # evaluation: every patch


class Draws:
    """Records what ``patch_dropout.draw_kept`` draws."""

    def __init__(self, monkeypatch):
        self.kept, draw = [], patch_dropout.draw_kept

        def recorded(*args, **kwargs):
            self.kept.append(draw(*args, **kwargs))
            return self.kept[-1]

        monkeypatch.setattr(patch_dropout, "draw_kept", recorded)


def test_each_training_image_keeps_its_class_token_and_half_its_patches(tokenizer_dir, batch, monkeypatch):
    """8 of 16 patches per image, distinct, drawn per sample and per step; the same seed draws the same."""
    lengths, draws = [], Draws(monkeypatch)
    for _ in range(2):
        torch.manual_seed(0)
        module = LitSuperCLIP(tokenizer_dir, backbone_config=MICRO, patch_dropout=0.5, warmup_steps=0)
        encoder = module.model.clip.vision_model.encoder
        record = lambda m, args, kwargs: lengths.append(kwargs["inputs_embeds"].shape)
        encoder.register_forward_pre_hook(record, with_kwargs=True)
        quiet_trainer(max_steps=2).fit(module, DataLoader(Batches([batch] * 2), batch_size=None))
    first, second = draws.kept[:2], draws.kept[2:]
    assert lengths == [(8, 1 + P // 2, 32)] * 4  # the encoder sees the class token + 8 patches
    for kept in first:
        assert kept.shape == (8, P // 2)
        assert all(len(set(row.tolist())) == P // 2 and min(row) >= 0 and max(row) < P for row in kept)
        assert len({tuple(sorted(row.tolist())) for row in kept}) == 8  # each sample its own
    assert not torch.equal(first[0].sort().values, first[1].sort().values)  # each step its own
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))  # seeded


@pytest.mark.parametrize(("loss", "weight"), [("siglip", 1.0), ("contrastive", 0.0), ("siglip", 0.0)])
def test_both_losses_train_masked_with_or_without_the_head(tokenizer_dir, batch, loss, weight):
    lengths = []
    module = LitSuperCLIP(
        tokenizer_dir, backbone_config=MICRO, loss=loss, class_loss_weight=weight, patch_dropout=0.5
    )
    record = lambda m, args, kwargs: lengths.append(kwargs["inputs_embeds"].shape[1])
    module.model.clip.vision_model.encoder.register_forward_pre_hook(record, with_kwargs=True)
    trainer = quiet_trainer(max_steps=1)
    trainer.fit(module, DataLoader(Batches([batch]), batch_size=None))
    assert lengths == [1 + P // 2] and torch.isfinite(trainer.callback_metrics["train/loss"])


def test_head_features_are_the_mean_of_the_kept_tokens_after_the_final_layernorm(tokenizer_dir, batch):
    torch.manual_seed(0)
    model = LitSuperCLIP(tokenizer_dir, backbone_config=MICRO, patch_dropout=0.5).model.train()
    pixels = batch["pixel_values"]  # (8, 3, 16, 16)
    torch.manual_seed(1)
    out = model(pixels, batch["input_ids"], batch["attention_mask"])
    torch.manual_seed(1)
    kept = torch.randn(8, P).topk(P // 2, dim=-1).indices  # the draw, as open_clip makes it
    vision, emb = model.clip.vision_model, model.clip.vision_model.embeddings
    with torch.no_grad():
        patches = emb.patch_embedding(pixels).flatten(2).transpose(1, 2)  # (B, P, W)
        tokens = torch.cat([emb.class_embedding.expand(8, 1, -1), patches], 1) + emb.position_embedding.weight
        tokens = torch.cat([tokens[:, :1], tokens[torch.arange(8)[:, None], 1 + kept]], 1)  # (B, 1 + 8, W)
        hidden = vision.pre_layrnorm(tokens)
        for layer in vision.encoder.layers:
            hidden = layer(hidden, None)
        hidden = vision.post_layernorm(hidden)
        image = F.normalize(model.clip.visual_projection(hidden[:, 0]), dim=-1)
        logits = model.head(hidden[:, 1:].mean(dim=1))
    torch.testing.assert_close(out["image_embeds"], image)
    torch.testing.assert_close(out["vocab_logits"], logits)


def test_zero_is_today_s_model_and_evaluation_is_never_masked(tokenizer_dir, batch):
    args = (batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
    torch.manual_seed(0)
    off = LitSuperCLIP(tokenizer_dir, backbone_config=MICRO, patch_dropout=0.0)
    torch.manual_seed(0)
    on = LitSuperCLIP(tokenizer_dir, backbone_config=MICRO, patch_dropout=0.5)
    assert off.state_dict().keys() == on.state_dict().keys()  # no state: checkpoints interchangeable
    plain = CLIPModel(off.model.config)  # HF's own, no hook
    shapes = {k: v.shape for k, v in plain.state_dict().items()}
    plain.load_state_dict({k: v.reshape(shapes[k]) for k, v in off.model.clip.state_dict().items()})
    state = torch.get_rng_state()
    with torch.no_grad():
        train = off.model.train()(*args)
        assert torch.equal(torch.get_rng_state(), state)  # 0 draws nothing
        reference = plain.get_image_features(pixel_values=args[0]).pooler_output
        assert torch.equal(train["image_embeds"], F.normalize(reference, dim=-1))
        evaluated = [m.model.eval()(*args) for m in (off, on)]
        assert all(torch.equal(evaluated[0][k], evaluated[1][k]) for k in ("image_embeds", "vocab_logits"))
        predicted = [m.predict_step({"keys": [], **batch}, 0)["image_embeds"] for m in (off, on)]
        assert torch.equal(*predicted)
        copied = copy.deepcopy(on.model).train()  # EMA-style copies mask with their own module
        on.model.eval()
        assert copied.clip.vision_model(pixel_values=args[0]).last_hidden_state.shape[1] == 1 + P // 2
        assert on.model.clip.vision_model(pixel_values=args[0]).last_hidden_state.shape[1] == 1 + P


def test_bad_fraction_fails_in_one_line(tokenizer_dir):
    with pytest.raises(ValueError, match=r"^patch_dropout=1\.0 must be in \[0, 1\)"):
        LitSuperCLIP(tokenizer_dir, backbone_config=MICRO, patch_dropout=1.0)


def test_flops_count_the_kept_tokens(tokenizer_dir):
    """At 0.75 a 16-patch image keeps 4: the step's FLOPs are those of a 2 x 2-patch image, plus the
    patch embedding of the 12 dropped patches (computed before the drop: forward and weight gradient)."""
    batch, length, width = 4, 12, 32
    module = LitSuperCLIP(tokenizer_dir, backbone_config=MICRO, patch_dropout=0.75)
    set_flops_per_batch(module, (batch, length))
    small = copy.deepcopy(MICRO)
    small["vision_config"]["image_size"] = 8
    unmasked = LitSuperCLIP(tokenizer_dir, backbone_config=small).model.config
    patch_embedding = 2 * 2 * batch * (P - 4) * (3 * 4 * 4) * width
    assert module.flops_per_batch == training_step_flops(unmasked, True, batch, length) + patch_embedding


def test_accumulated_negatives_encode_each_micro_batch_twice_with_its_masks(
    tmp_path, tokenizer_dir, monkeypatch
):
    """4 micro-batches of 4: the re-encodings draw the first encodings' masks, and the step is that of
    one batch of 16 with the same masks (loss and gradients to 1e-5)."""
    (micro,) = run(tokenizer_dir, tmp_path / "micro", "micro", "contrastive", options="patch_dropout")
    draws = micro["draws"]
    assert len(draws) == 8 and all(d.shape == (4, P // 2) for d in draws)
    assert all(torch.equal(draws[4 + k], draws[k]) for k in range(4))
    masks = torch.cat(draws[:4])
    monkeypatch.setattr(patch_dropout, "draw_kept", lambda *args: masks)
    (whole,) = run(tokenizer_dir, tmp_path / "whole", "whole", "contrastive", options="patch_dropout")
    assert_same_step(micro, whole)


@pytest.mark.slow
def test_two_gloo_ranks_with_masks_are_one_process_with_the_same_masks(tmp_path, tokenizer_dir, monkeypatch):
    ranks = run(tokenizer_dir, tmp_path / "ddp", "ddp", "contrastive", options="patch_dropout")
    for state in ranks:  # 4 micro-batches of 2 per rank
        assert all(torch.equal(state["draws"][4 + k], state["draws"][k]) for k in range(4))
    masks = torch.cat([d for state in ranks for d in state["draws"][:4]])  # rank 0's 8 pairs, then rank 1's
    monkeypatch.setattr(patch_dropout, "draw_kept", lambda *args: masks)
    (whole,) = run(tokenizer_dir, tmp_path / "whole", "whole", "contrastive", options="patch_dropout")
    for state in ranks:
        assert_same_step(state, whole)


def test_dropout_in_the_towers_is_the_same_in_both_encodings(tokenizer_dir):
    """Attention dropout 0.5 (and patch dropout): each re-encoding repeats its first encoding exactly,
    although two encodings of one batch in training mode differ."""
    config = copy.deepcopy(MICRO)
    for tower in ("vision_config", "text_config"):
        config[tower]["attention_dropout"] = 0.5
    torch.manual_seed(0)
    module = LitSuperCLIP(tokenizer_dir, backbone_config=config, patch_dropout=0.5, warmup_steps=0)
    outputs = []
    keys = ("image_embeds", "text_embeds")
    module.model.register_forward_hook(lambda m, args, out: outputs.append({k: out[k] for k in keys}))
    data = runs.pairs(module.tokenizer)
    loader = DataLoader(runs.MicroBatches(data, [4, 4]), batch_size=None)
    quiet_trainer(max_steps=1, accumulate_grad_batches=2).fit(module, loader)
    assert len(outputs) == 4  # 2 without a graph, then 2 re-encoded
    for k in range(2):
        for key in keys:
            torch.testing.assert_close(outputs[2 + k][key], outputs[k][key], rtol=1e-6, atol=1e-7)
    first = {k: v[:4] for k, v in data.items()}
    with torch.no_grad():
        again = [
            module.model(*(first[k] for k in ("pixel_values", "input_ids", "attention_mask"))) for _ in "ab"
        ]
    assert not torch.allclose(again[0]["image_embeds"], again[1]["image_embeds"])
    assert not torch.allclose(again[0]["text_embeds"], again[1]["text_embeds"])


class SwitchOff(Callback):
    """Stop masking in place at optimizer step ``at``: the run that FLIP's switch makes, uninterrupted."""

    def __init__(self, at: int):
        self.at = at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at:
            pl_module.model.patch_dropout.prob = 0.0


class Losses(Callback):
    def __init__(self):
        self.values = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.values.append(float(outputs["loss"]))


def test_resuming_a_masked_run_with_zero_continues_it_exactly_unmasked(tmp_path, tokenizer_dir, batch):
    """2 masked steps, then a resume with 0 for 2 more: the losses and the final state (weights, AdamW,
    IDF counts) of one run that stops masking after step 2."""
    loader = DataLoader(Batches([batch] * 8), batch_size=None)  # every step the same batch
    torch.manual_seed(0)  # a 4-step run (its schedule), checkpointed at step 2
    masked = LitSuperCLIP(tokenizer_dir, backbone_config=MICRO, patch_dropout=0.5, warmup_steps=0)
    every = ModelCheckpoint(tmp_path, "{step}", every_n_train_steps=2, save_top_k=-1)
    quiet_trainer(max_steps=4, callbacks=[every], enable_checkpointing=True).fit(masked, loader)

    resumed = LitSuperCLIP(tokenizer_dir, backbone_config=MICRO, patch_dropout=0.0, warmup_steps=0)
    losses = Losses()
    quiet_trainer(max_steps=4, callbacks=[losses]).fit(resumed, loader, ckpt_path=tmp_path / "step=2.ckpt")

    torch.manual_seed(0)
    straight = LitSuperCLIP(tokenizer_dir, backbone_config=MICRO, patch_dropout=0.5, warmup_steps=0)
    reference = Losses()
    quiet_trainer(max_steps=4, callbacks=[SwitchOff(2), reference]).fit(straight, loader)
    assert losses.values == reference.values[2:] and len(losses.values) == 2
    for (name, a), b in zip(resumed.state_dict().items(), straight.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_flip_fragments_parse_onto_a_run_config(tokenizer_dir, tmp_path, monkeypatch):
    from pathlib import Path

    from superclip_pl.cli.main import build_cli

    monkeypatch.chdir(tmp_path)  # nothing may be written into the repository
    configs = Path(__file__).resolve().parent.parent / "configs"
    run = ["--config", str(configs / "demo.yaml"), "--data.init_args.tokenizer", tokenizer_dir]
    masked = build_cli([*run, "--config", str(configs / "flip" / "masked.yaml")], run=False).model
    assert (masked.hparams.patch_dropout, masked.hparams.min_lr_ratio) == (0.5, 0.01)
    assert masked.model.patch_dropout.prob == 0.5
    fragments = [configs / "flip" / "masked.yaml", configs / "flip" / "unmasked.yaml"]
    tuned = build_cli([*run, *(a for f in fragments for a in ("--config", str(f)))], run=False).model
    assert tuned.model.patch_dropout.prob == 0.0
