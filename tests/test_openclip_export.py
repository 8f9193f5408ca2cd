"""``superclip export --format open_clip`` (open_clip loads it and computes what we compute), the round
trip open_clip -> import -> export -> import, and fine-tuning an imported SuperCLIP through
``superclip fit --model.backbone DIR`` with its head and IDF counts."""

import json
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from safetensors.torch import load_file

from conftest import COLOURS, MICRO, SHAPES
from openclip_models import GLOBAL_BATCH, TextDecoder, build, model_cfg, reference_idf, save_as_reference
from openclip_ref import open_clip
from superclip_pl.cli.main import build_cli, main
from superclip_pl.head_file import HEAD_FILE, read_extras
from superclip_pl.losses import DocumentFrequency, classification_loss
from superclip_pl.model import SuperCLIP
from superclip_pl.train.module import LitSuperCLIP
from test_cli import debug_fit, shapes  # noqa: F401  (the module-scoped shapes data set fixture)
from test_export import fit_and_save


def test_our_checkpoint_exported_for_open_clip_computes_what_we_compute(tmp_path, tokenizer_dir, tokenizer):
    module = fit_and_save(tokenizer_dir, tokenizer, tmp_path / "run.ckpt").eval()
    out = tmp_path / "open_clip"
    assert main(["export", "--ckpt_path", str(tmp_path / "run.ckpt"), "--output_dir", str(out),
                 "--format", "open_clip", "--idf_batch_size", "8"]) == 0  # fmt: skip
    assert all(f.stat().st_mode & 0o044 == 0o044 for f in out.iterdir() if f.is_file())  # group-readable
    oc = open_clip()
    model, _, _ = oc.create_model_and_transforms(f"local-dir:{out}")
    model.eval()
    captions = [f"a {c} {s}" for c, s in zip(COLOURS, SHAPES, strict=True)]
    ids = oc.get_tokenizer(f"local-dir:{out}")(captions)  # our tokenizer, saved in the dir, at 77 tokens
    enc = tokenizer(captions, padding="longest", return_tensors="pt")
    assert ids[:, : enc["input_ids"].shape[1]].tolist() == enc["input_ids"].tolist()
    pixels = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = module.model(pixels, enc["input_ids"], enc["attention_mask"])
        torch.testing.assert_close(
            model.encode_image(pixels, normalize=True), ours["image_embeds"], rtol=0, atol=1e-5
        )
        torch.testing.assert_close(
            model.encode_text(ids, normalize=True), ours["text_embeds"], rtol=0, atol=1e-5
        )
        torch.testing.assert_close(model.logit_scale.exp(), ours["logit_scale"], rtol=1e-6, atol=0)
        # the head, in the reference's names beside the towers, on open_clip's patch tokens
        head = load_file(out / "text_decoder.safetensors")
        decoder = TextDecoder(32, len(tokenizer))
        decoder.load_state_dict({k[len("text_decoder.") :]: v for k, v in head.items() if "decoder" in k})
        model.visual.output_tokens = True
        _, patches = model.visual(pixels)
        torch.testing.assert_close(decoder(patches.mean(dim=1)), ours["vocab_logits"], rtol=0, atol=1e-5)
    assert head["cap_fq"].dtype == head["num_samples"].dtype == torch.float64
    assert float(head["num_samples"]) == 2  # 2 steps of 8 captions
    idf = reference_idf(head["cap_fq"], head["num_samples"], 8)
    # the special tokens (here pad = end of text) get the reference's counts: weight 0 there
    special = sorted({tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id})
    words = [t for t in range(len(tokenizer)) if t not in special]
    torch.testing.assert_close(idf[words], module.doc_freq.idf().double()[words], rtol=1e-6, atol=1e-6)
    assert idf[special].abs().max() < 1e-9
    config = json.loads((out / "open_clip_config.json").read_text())
    assert config["superclip"]["clstext_cfg"]["layers"] == 0 and config["model_cfg"]["custom_text"]


def test_siglip_model_exported_for_open_clip_keeps_its_logit_bias(tmp_path, tokenizer_dir):
    module = LitSuperCLIP(tokenizer_dir, backbone_config=MICRO, loss="siglip", class_loss_weight=0)
    with torch.no_grad():
        module.model.logit_bias.fill_(-7.5)
    torch.save(
        {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, tmp_path / "s.ckpt"
    )
    out = tmp_path / "out"
    assert (
        main(
            [
                "export",
                "--ckpt_path",
                str(tmp_path / "s.ckpt"),
                "--output_dir",
                str(out),
                "--format",
                "open_clip",
            ]
        )
        == 0
    )
    model, _, _ = open_clip().create_model_and_transforms(f"local-dir:{out}")
    assert float(model.logit_bias) == -7.5 and not (out / "text_decoder.safetensors").exists()  # no head


def test_import_export_import_gives_identical_tensors(tmp_path):
    reference, decoder, buffers = build(False, True, True)  # top-level text, QuickGELU, a head
    ckpt = save_as_reference(tmp_path / "ref.pt", reference, decoder, buffers)
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(model_cfg(True)))
    first, exported, second = tmp_path / "first", tmp_path / "exported", tmp_path / "second"
    args = ["--model_config", str(cfg), "--idf_batch_size", str(GLOBAL_BATCH)]
    assert main(["import", "--ckpt_path", str(ckpt), "--output_dir", str(first), *args]) == 0
    assert (
        main(["export", "--ckpt_path", str(first), "--output_dir", str(exported), "--format", "open_clip"])
        == 0
    )
    assert main(["import", "--ckpt_path", str(exported), "--output_dir", str(second)]) == 0
    for name in ("model.safetensors", HEAD_FILE):
        a, b = load_file(first / name), load_file(second / name)
        assert set(a) == set(b)
        for k in a:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert json.loads((first / "config.json").read_text()) == json.loads((second / "config.json").read_text())
    # and the exported tensors are the reference's, in its names (text tower moved under text.)
    exported_towers = load_file(exported / "open_clip_model.safetensors")
    for k, v in reference.state_dict().items():
        name = k if k.startswith("visual.") or k == "logit_scale" else "text." + k
        torch.testing.assert_close(exported_towers[name], v, rtol=0, atol=0)
    head = load_file(exported / "text_decoder.safetensors")
    # df / B against the reference's running sum of float32 per-step fractions (k / 3 is not exact in
    # float32; k / 16384, the released runs' batch, is): equal to float32 rounding
    torch.testing.assert_close(head["cap_fq"], buffers["cap_fq"], rtol=1e-7, atol=0)
    model, _, _ = open_clip().create_model_and_transforms(f"local-dir:{exported}")  # loads strictly
    with torch.no_grad():
        pixels = torch.randn(2, 3, 32, 32)
        torch.testing.assert_close(
            model.eval().encode_image(pixels), reference.encode_image(pixels), rtol=0, atol=1e-5
        )


class FirstStep(Callback):
    """Records the first training batch, the head and counts the run starts from, and its class loss."""

    seen: dict = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 0:
            FirstStep.seen.update(
                batch={k: v.clone() for k, v in batch.items() if torch.is_tensor(v)},
                head={k: v.clone() for k, v in pl_module.model.head.state_dict().items()},
                counts={k: v.clone() for k, v in pl_module.doc_freq.state_dict().items()},
            )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 1:
            FirstStep.seen["class_loss"] = float(trainer.callback_metrics["train/class_loss"])


@pytest.mark.slow
def test_imported_superclip_fine_tunes_with_its_head_and_counts(shapes, tmp_path, monkeypatch):  # noqa: F811
    reference, decoder, buffers = build(True, False, True)  # the released layout, at the debug size (32 px)
    ckpt = save_as_reference(tmp_path / "released.pt", reference, decoder, buffers)
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(model_cfg(False)))
    backbone = str(tmp_path / "backbone")
    args = ["--model_config", str(cfg), "--idf_batch_size", str(GLOBAL_BATCH)]
    assert main(["import", "--ckpt_path", str(ckpt), "--output_dir", backbone, *args]) == 0
    monkeypatch.chdir(shapes)
    FirstStep.seen.clear()
    fit = build_cli(
        debug_fit(3, 3, "--model.backbone", backbone, "--model.backbone_config", "null",
                  "--data.tokenizer", backbone, "--trainer.callbacks+=test_openclip_export.FirstStep")
    )  # fmt: skip
    assert fit.trainer.global_step == 3
    seen = FirstStep.seen
    head, counts = read_extras(backbone)
    for k, v in head.items():  # the run started from the imported head and counts
        assert torch.equal(seen["head"][k], v), k
    assert all(torch.equal(seen["counts"][k], v) for k, v in counts.items()) and int(counts["num_docs"]) == 12
    model = SuperCLIP.from_pretrained(backbone).eval()
    batch = seen["batch"]
    with torch.no_grad():
        logits = model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])["vocab_logits"]
    doc_freq = DocumentFrequency(model.vocab_size)
    doc_freq.load_state_dict(counts)
    ignore = sorted(set(fit.model.tokenizer.all_special_ids))
    doc_freq.update(batch["input_ids"], ignore)  # the first step counts its own batch first
    expected = classification_loss(logits, batch["input_ids"], doc_freq.idf(), ignore)
    assert seen["class_loss"] == pytest.approx(float(expected), rel=1e-5)
    uniform = classification_loss(logits * 0, batch["input_ids"], doc_freq.idf(), ignore)
    assert abs(seen["class_loss"] - float(uniform)) > 1e-3  # (a head that knows nothing scores otherwise)
    assert int(fit.model.doc_freq.num_docs) == 12 + 3 * 8  # counting went on from the imported counts
    ckpt_dir = Path(fit.trainer.log_dir) / "checkpoints" / "last.ckpt"
    assert main(["export", "--ckpt_path", str(ckpt_dir), "--output_dir", str(tmp_path / "again"),
                 "--format", "open_clip"]) == 0  # fmt: skip
