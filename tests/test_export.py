"""``superclip export``: the HF directory holds our weights (and not the head), loads offline in the
zero-shot pipeline, and scores like our own zero-shot classifier; bad input fails in one line."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from torch.utils.data import DataLoader
from transformers import AutoImageProcessor, AutoProcessor, CLIPModel, CLIPProcessor, pipeline

from conftest import COLOURS, MICRO, SHAPES, quiet_trainer
from superclip_pl.cli.main import main
from superclip_pl.eval.metrics import build_classifier
from superclip_pl.interop.export import export_checkpoint
from superclip_pl.model import MAX_LOGIT_SCALE
from superclip_pl.tokenizer import tokenize
from superclip_pl.train.module import LitSuperCLIP
from superclip_pl.transforms import CLIP_MEAN, CLIP_STD, eval_transform

HERE = os.path.dirname(__file__)
LABELS = ["red circle", "blue square", "green star", "yellow triangle"]


def fit_and_save(tokenizer_dir: str, tokenizer, ckpt_path, steps: int = 2) -> LitSuperCLIP:
    """A MICRO model fitted ``steps`` steps on one fixed batch, saved by the Trainer to ``ckpt_path``."""
    torch.manual_seed(0)
    module = LitSuperCLIP(tokenizer_dir, backbone_config=MICRO, warmup_steps=0, weight_decay=0.0)
    caps = [f"a {c} {s} on the left" for c, s in zip(COLOURS * 2, SHAPES + SHAPES[::-1], strict=True)]
    batch = {
        "pixel_values": torch.randn(8, 3, 16, 16),
        **tokenizer(caps, padding="longest", return_tensors="pt"),
    }
    trainer = quiet_trainer(
        max_steps=steps,
    )
    trainer.fit(module, DataLoader([batch] * steps, batch_size=None))
    trainer.save_checkpoint(ckpt_path)
    return module


@pytest.fixture(scope="module")
def run(tmp_path_factory, tokenizer_dir, tokenizer):
    """A checkpoint in the log-dir layout ``version_0/checkpoints/last.ckpt`` (with a metrics.json)
    and its export."""
    root = tmp_path_factory.mktemp("run")
    ckpt = root / "version_0" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    fit_and_save(tokenizer_dir, tokenizer, ckpt)
    (root / "version_0" / "metrics.json").write_text(json.dumps({"zeroshot/colours/top1": 0.625}))
    out = export_checkpoint(ckpt, root / "export")
    return ckpt, out


def safetensors_weights(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)


def test_export_holds_the_towers_without_the_head_and_describes_the_run(run, tokenizer):
    ckpt, out = run
    weights = safetensors_weights(out)
    hf = CLIPModel.from_pretrained(out)
    assert set(weights) == set(hf.state_dict())  # exactly a CLIPModel: nothing missing, nothing extra
    assert not any("head" in k or "logit_bias" in k for k in weights)
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    assert any(k.startswith("model.head.") for k in state)  # ... although the checkpoint has a head
    for k, v in weights.items():
        torch.testing.assert_close(v, state["model.clip." + k].reshape(v.shape), rtol=0, atol=0)
    text = hf.config.text_config
    ids = (text.bos_token_id, text.eos_token_id, text.pad_token_id)
    assert ids == (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert isinstance(AutoProcessor.from_pretrained(out), CLIPProcessor)
    processor = AutoImageProcessor.from_pretrained(out)
    assert processor.size.shortest_edge == 16 and (processor.crop_size.height, processor.crop_size.width) == (
        16,
        16,
    )
    assert tuple(processor.image_mean) == CLIP_MEAN and tuple(processor.image_std) == CLIP_STD
    assert processor.resample == Image.Resampling.BICUBIC and processor.do_center_crop
    card = (out / "README.md").read_text()
    assert "pipeline_tag: zero-shot-image-classification" in card
    assert "| class_loss_weight | `1.0` |" in card and '| backbone | `"tiny"` |' in card
    assert "global step 2" in card and "samples seen 16" in card
    assert "| zeroshot/colours/top1 | 0.6250 |" in card  # from version_0/metrics.json


def test_exported_embeddings_equal_the_checkpoint_s(run, tokenizer):
    ckpt, out = run
    ours = LitSuperCLIP.load_from_checkpoint(ckpt).model.eval()
    hf = CLIPModel.from_pretrained(out).eval()
    pixels = torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    text = tokenize(tokenizer, ["a red circle", "a photo of a small blue star", "green"])
    with torch.no_grad():
        hf_image = F.normalize(hf.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
        hf_text = F.normalize(hf.get_text_features(**text).pooler_output, dim=-1)
        torch.testing.assert_close(hf_image, ours.encode_image(pixels), rtol=0, atol=1e-5)
        torch.testing.assert_close(hf_text, ours.encode_text(**text), rtol=0, atol=1e-5)
        torch.testing.assert_close(hf.logit_scale.exp(), ours.logit_scale())


def test_pipeline_scores_equal_our_zero_shot_scores(run, tokenizer):
    """The pipeline preprocesses with the exported processor and tokenizer; both reproduce ours exactly
    (same pixels, same token ids), so probabilities differ only by float32 rounding (~1e-7)."""
    ckpt, out = run
    model = LitSuperCLIP.load_from_checkpoint(ckpt).model.eval()
    classifier = pipeline("zero-shot-image-classification", model=str(out))
    rng = np.random.default_rng(0)
    images = [Image.new("RGB", (16, 16), c) for c in ("red", "blue", "yellow")]
    # non-square and larger images exercise the shortest-side resize and the centre crop
    images += [
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in [(40, 24), (24, 37)]
    ]
    transform = eval_transform(model.image_size)
    pixels = torch.stack([transform(im) for im in images])
    with torch.no_grad():
        weights = build_classifier(
            lambda prompts: model.encode_text(**tokenize(tokenizer, prompts)),
            LABELS,
            ["This is a photo of {c}."],
        )
        ours = (model.logit_scale() * model.encode_image(pixels) @ weights).softmax(dim=-1)  # (5, C)
    for image, pixel, probs in zip(images, pixels, ours, strict=True):
        theirs_pixels = classifier.image_processor(images=[image], return_tensors="pt")["pixel_values"][0]
        assert torch.equal(theirs_pixels, pixel)
        scores = {r["label"]: r["score"] for r in classifier(image, candidate_labels=LABELS)}
        theirs = torch.tensor([scores[label] for label in LABELS])
        torch.testing.assert_close(theirs, probs, rtol=0, atol=1e-6)
        assert LABELS[int(theirs.argmax())] == LABELS[int(probs.argmax())]


def test_half_precision_export(run, tmp_path):
    ckpt, out = run
    half = export_checkpoint(ckpt, tmp_path / "bf16", dtype="bfloat16")
    weights = safetensors_weights(half)
    assert {v.dtype for v in weights.values() if v.is_floating_point()} == {torch.bfloat16}
    assert json.loads((half / "config.json").read_text())["dtype"] == "bfloat16"
    full = safetensors_weights(out)
    for k, v in weights.items():
        torch.testing.assert_close(v, full[k].to(torch.bfloat16), rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_distributed_checkpoint_directory_exports_like_the_file(run, tmp_path):
    """A directory in the layout of Lightning's ModelParallelStrategy (DCP shards + meta.pt) with the
    FSDP2 (1,)-shaped logit scale, above the clamp: exported as the 0-d clamped scale."""
    ckpt, out = run
    full = torch.load(ckpt, weights_only=True)
    state = full.pop("state_dict")
    state["model.clip.logit_scale"] = torch.tensor([5.0])  # > log(100) = 4.605
    full.pop("optimizer_states")
    dcp.save({"state_dict": state}, checkpoint_id=str(tmp_path / "dcp"), no_dist=True)
    torch.save(full, tmp_path / "dcp" / "meta.pt")
    exported = safetensors_weights(export_checkpoint(tmp_path / "dcp", tmp_path / "out"))
    reference = safetensors_weights(out)
    assert set(exported) == set(reference)
    assert exported["logit_scale"].shape == () and float(exported["logit_scale"]) == pytest.approx(
        MAX_LOGIT_SCALE
    )
    for k in set(reference) - {"logit_scale"}:
        torch.testing.assert_close(exported[k], reference[k], rtol=0, atol=0)


def test_siglip_checkpoint_exports_without_its_logit_bias(tmp_path, tokenizer_dir):
    module = LitSuperCLIP(tokenizer_dir, backbone_config=MICRO, loss="siglip")
    with torch.no_grad():
        module.model.logit_bias.fill_(-7.5)
    # the parts of a Lightning checkpoint that export reads
    torch.save(
        {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, tmp_path / "s.ckpt"
    )
    out = export_checkpoint(tmp_path / "s.ckpt", tmp_path / "out")
    weights = safetensors_weights(out)
    assert "logit_bias" not in weights and not any("head" in k for k in weights)
    assert float(weights["logit_scale"]) == pytest.approx(float(module.model.clip.logit_scale))
    card = (out / "README.md").read_text()
    assert "sigmoid (SigLIP) loss" in card and "(-7.5000)" in card


@pytest.mark.slow
def test_real_fsdp2_checkpoint_exports_and_loads(tmp_path, tokenizer_dir):
    """Two processes train one step under ModelParallelStrategy (FSDP2) and save a sharded checkpoint."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": HERE}
    script = os.path.join(HERE, "fsdp2_checkpoint.py")
    subprocess.run(
        [sys.executable, script, tokenizer_dir, str(tmp_path / "ckpt")], check=True, env=env, timeout=300
    )
    assert (tmp_path / "ckpt").is_dir()
    out = export_checkpoint(tmp_path / "ckpt", tmp_path / "out")
    gathered = torch.load(
        tmp_path / "full.pt", weights_only=True
    )  # the script's full_tensor() of each weight
    weights = safetensors_weights(out)
    for k, v in weights.items():
        torch.testing.assert_close(v, gathered["model.clip." + k].reshape(v.shape), rtol=0, atol=0)
    scores = pipeline("zero-shot-image-classification", model=str(out))(
        Image.new("RGB", (20, 20), "red"), candidate_labels=LABELS[:2]
    )
    assert sum(r["score"] for r in scores) == pytest.approx(1.0)


def test_cli_help_explains_the_export(capsys):
    assert main(["export", "--help"]) == 0
    text = capsys.readouterr().out
    assert "--ckpt_path" in text and "--output_dir" in text and "bfloat16" in text and "--overwrite" in text


def one_line_error(capsys, argv: list[str]) -> str:
    assert main(["export", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err and err.startswith("superclip export: error: ")
    return err


def test_bad_input_fails_in_one_clear_line(run, tmp_path, capsys, tokenizer_dir):
    ckpt, _ = run
    out = ["--output_dir", str(tmp_path / "out")]
    missing = tmp_path / "nope.ckpt"
    assert f"checkpoint '{missing}' does not exist" in one_line_error(
        capsys, ["--ckpt_path", str(missing), *out]
    )
    junk = tmp_path / "junk.ckpt"
    junk.write_text("not a checkpoint")
    assert "is not a SuperCLIP checkpoint" in one_line_error(capsys, ["--ckpt_path", str(junk), *out])
    other = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"layer.weight": torch.zeros(2)}, "hyper_parameters": {"lr": 0.1}}, other)
    assert "is not a SuperCLIP checkpoint" in one_line_error(capsys, ["--ckpt_path", str(other), *out])
    not_dcp = tmp_path / "some_dir"
    not_dcp.mkdir()
    assert "not a Lightning distributed checkpoint" in one_line_error(
        capsys, ["--ckpt_path", str(not_dcp), *out]
    )
    moved = tmp_path / "moved.ckpt"
    state = torch.load(ckpt, weights_only=True)
    state["hyper_parameters"]["tokenizer"] = str(tmp_path / "gone")
    torch.save(state, moved)
    err = one_line_error(capsys, ["--ckpt_path", str(moved), *out])
    assert "gone" in err and "pass --tokenizer" in err
    assert main(["export", "--ckpt_path", str(moved), *out, "--tokenizer", tokenizer_dir]) == 0
    assert (tmp_path / "out" / "model.safetensors").is_file()
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    err = one_line_error(capsys, ["--ckpt_path", str(ckpt), "--output_dir", str(full)])
    assert "exists and is not empty" in err and "--overwrite" in err
    assert not (full / "model.safetensors").exists()
    assert main(["export", "--ckpt_path", str(ckpt), "--output_dir", str(full), "--overwrite"]) == 0
    assert (full / "model.safetensors").is_file() and (full / "keep.txt").read_text() == "mine"
