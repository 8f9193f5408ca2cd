"""Patch dropout across formats and through the command line: an open_clip config's ``patch_dropout``
imported as the training default, ``export --format open_clip`` writing ours (open_clip masks as we do,
draw for draw), the HF export unchanged, and ``superclip fit`` resuming a masked run unmasked."""

import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import CLIPConfig

from conftest import COLOURS, MICRO, SHAPES
from openclip_models import CAPTIONS, GLOBAL_BATCH, TextDecoder, build, model_cfg, save_as_reference
from openclip_ref import open_clip
from superclip_pl.cli.main import main
from superclip_pl.train.module import LitSuperCLIP
from test_cli import debug_fit, shapes  # noqa: F401  (the module-scoped shapes data set fixture)

SUPERCLIP = Path(sys.executable).parent / "superclip"  # the installed console script


def masked_forwards(ours, reference, decoder, pixels, enc) -> None:
    """Our training-mode forward against open_clip's, each from the same random state: the image
    embeddings and the head's logits on the kept patch tokens agree."""
    ours.train(), reference.train()
    torch.manual_seed(3)
    out = ours(pixels, enc["input_ids"], enc["attention_mask"])
    torch.manual_seed(3)
    image = reference.encode_image(pixels, normalize=True)
    reference.visual.output_tokens = True  # (pooled, patch tokens after ln_post): the kept ones
    torch.manual_seed(3)
    _, patches = reference.visual(pixels)
    reference.visual.output_tokens = False
    with torch.no_grad():
        torch.testing.assert_close(out["image_embeds"], image, rtol=0, atol=1e-5)
        torch.testing.assert_close(out["vocab_logits"], decoder(patches.mean(dim=1)), rtol=0, atol=1e-5)


def test_open_clip_patch_dropout_is_imported_as_the_training_default(tmp_path, capsys):
    reference, decoder, buffers = build(True, False, True)  # the released SuperCLIP's layout, a head
    reference.visual.patch_dropout = open_clip().transformer.PatchDropout(0.5)
    ckpt = save_as_reference(tmp_path / "epoch_3.pt", reference, decoder, buffers)
    cfg = model_cfg(False)
    cfg["vision_cfg"]["patch_dropout"] = 0.5
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    out = str(tmp_path / "imported")
    args = ["--ckpt_path", str(ckpt), "--idf_batch_size", str(GLOBAL_BATCH), "--model_config"]
    assert main(["import", *args, str(tmp_path / "cfg.json"), "--output_dir", out]) == 0
    assert CLIPConfig.from_pretrained(out).vision_config.patch_dropout == 0.5
    module = LitSuperCLIP(out, backbone=out)
    assert module.model.patch_dropout.prob == 0.5
    assert LitSuperCLIP(out, backbone=out, patch_dropout=0.0).model.patch_dropout.prob == 0.0
    pixels = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    enc = module.tokenizer(CAPTIONS[:4], padding="longest", return_tensors="pt")
    masked_forwards(module.model, reference, decoder.eval(), pixels, enc)

    cfg["vision_cfg"]["patch_dropout"] = 1.0
    (tmp_path / "bad.json").write_text(json.dumps(cfg))
    capsys.readouterr()
    assert main(["import", *args, str(tmp_path / "bad.json"), "--output_dir", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "vision_cfg.patch_dropout=1.0" in err


def test_export_writes_the_setting_for_open_clip_and_leaves_the_hf_files_unchanged(
    tmp_path, tokenizer_dir, tokenizer
):
    for p in (0.0, 0.5):
        torch.manual_seed(0)
        module = LitSuperCLIP(tokenizer_dir, backbone_config=MICRO, patch_dropout=p)
        ckpt = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
        torch.save(ckpt, tmp_path / f"{p}.ckpt")
        args = ["--ckpt_path", str(tmp_path / f"{p}.ckpt"), "--output_dir", str(tmp_path / f"hf{p}")]
        assert main(["export", *args]) == 0
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "hf0.0" / name).read_bytes() == (tmp_path / "hf0.5" / name).read_bytes(), name

    out = tmp_path / "open_clip"
    args = ["--ckpt_path", str(tmp_path / "0.5.ckpt"), "--output_dir", str(out), "--format", "open_clip"]
    assert main(["export", *args]) == 0
    model_cfg_ = json.loads((out / "open_clip_config.json").read_text())["model_cfg"]
    assert model_cfg_["vision_cfg"]["patch_dropout"] == 0.5
    reference, _, _ = open_clip().create_model_and_transforms(f"local-dir:{out}")
    assert reference.visual.patch_dropout.prob == 0.5
    decoder = TextDecoder(32, len(tokenizer))
    head = load_file(out / "text_decoder.safetensors")
    decoder.load_state_dict({k[len("text_decoder.") :]: v for k, v in head.items() if "decoder" in k})
    captions = [f"a {c} {s}" for c, s in zip(COLOURS, SHAPES, strict=True)]
    enc = tokenizer(captions, padding="longest", return_tensors="pt")
    pixels = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    masked_forwards(module.model, reference, decoder, pixels, enc)


def test_superclip_fit_resumes_a_masked_run_unmasked(shapes, tmp_path, monkeypatch, capsys):  # noqa: F811
    """A masked run, then its resume through the installed command with ``--model.patch_dropout 0``
    (FLIP's unmasked tuning: the checkpoint's hyperparameters do not override it); a bad fraction is
    one line and exit 2. No evaluation callbacks: the validation loss alone ends each fit."""
    monkeypatch.chdir(shapes)
    only_checkpoints = [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"save_last": True}}
    ]
    extra = [
        "--trainer.logger.init_args.save_dir",
        str(tmp_path),
        "--trainer.callbacks",
        json.dumps(only_checkpoints),
    ]
    assert main(debug_fit(4, 4, *extra, "--model.patch_dropout", "0.5")) == 0
    ckpt = tmp_path / "superclip" / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=True)["hyper_parameters"]["patch_dropout"] == 0.5
    args = [str(SUPERCLIP), *debug_fit(6, 6, *extra, "--model.patch_dropout", "0", "--ckpt_path", str(ckpt))]
    tuned = subprocess.run(args, cwd=shapes, capture_output=True, text=True, timeout=600)
    assert tuned.returncode == 0, tuned.stderr[-3000:]
    state = torch.load(ckpt, weights_only=True)
    assert state["global_step"] == 6 and state["hyper_parameters"]["patch_dropout"] == 0.0
    capsys.readouterr()
    assert main(debug_fit(4, 4, *extra, "--model.patch_dropout", "1.5")) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1].endswith("(FLIP: 0.5 or 0.75; 0: off)")
    assert "patch_dropout=1.5 must be in [0, 1)" in err
