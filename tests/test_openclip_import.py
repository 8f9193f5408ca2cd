"""``superclip import``: open_clip and reference-SuperCLIP checkpoints -> our backbone directory, checked
against open_clip's own forward (open_clip runs with torchvision stubbed: see ``openclip_ref.py``)."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, CLIPConfig, pipeline

from openclip_models import CAPTIONS, GLOBAL_BATCH, VOCAB, build, model_cfg, reference_idf, save_as_reference
from openclip_ref import open_clip
from superclip_pl.cli.main import main
from superclip_pl.head_file import HEAD_FILE, read_extras
from superclip_pl.interop.clip_bpe import clip_bpe_tokenizer
from superclip_pl.losses import DocumentFrequency
from superclip_pl.model import SuperCLIP

BATCH = GLOBAL_BATCH  # the global batch the reference's IDF buffers were accumulated at
# (text layout, activation, head): the released SuperCLIP (text., GELU, head), OpenAI-style CLIPs
# (top-level text, QuickGELU), and the two other corners, one of them with a head
CASES = [(True, False, True), (False, True, False), (True, True, False), (False, False, True)]


def test_clip_bpe_tokenizer_gives_open_clip_s_ids():
    tok = clip_bpe_tokenizer()  # from the bpe_simple_vocab_16e6.txt.gz inside open_clip_torch
    assert (len(tok), tok.bos_token_id, tok.eos_token_id, tok.model_max_length) == (VOCAB, 49406, 49407, 77)
    texts = [*CAPTIONS, "HELLO   World\tnew\nline", "café naïve 東京 🙂 <b>&amp;</b>", "word " * 100]
    ref = open_clip().tokenize(texts)  # (B, 77), padded with 0
    ours = tok(texts, padding="max_length", truncation=True, max_length=77, return_tensors="pt")["input_ids"]
    for r, o in zip(ref, ours, strict=True):
        n = int((r != 0).sum())  # open_clip pads with 0, we with <|endoftext|> (the pooled token either way)
        assert o[:n].tolist() == r[:n].tolist() and (o[n:] == 49407).all()
    assert ref[-1, -1] == ours[-1, -1] == 49407  # truncated: the end-of-text token stays last


def import_(tmp_path, ckpt, *extra: str) -> str:
    out = tmp_path / "imported"
    assert main(["import", "--ckpt_path", str(ckpt), "--output_dir", str(out), *extra]) == 0
    return str(out)


@pytest.mark.parametrize("custom_text,quick_gelu,superclip", CASES)
def test_imported_model_computes_what_open_clip_computes(tmp_path, custom_text, quick_gelu, superclip):
    reference, decoder, buffers = build(custom_text, quick_gelu, superclip)
    ckpt = save_as_reference(tmp_path / "epoch_3.pt", reference, decoder, buffers)
    config_file = tmp_path / "model_cfg.json"
    config_file.write_text(json.dumps(model_cfg(quick_gelu)))
    out = import_(tmp_path, ckpt, "--model_config", str(config_file), "--idf_batch_size", str(BATCH))

    config = CLIPConfig.from_pretrained(out)
    assert (
        config.vision_config.hidden_act
        == config.text_config.hidden_act
        == ("quick_gelu" if quick_gelu else "gelu")
    )
    assert (config.text_config.bos_token_id, config.text_config.eos_token_id) == (49406, 49407)
    model = SuperCLIP.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    pixels = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    enc = tokenizer(CAPTIONS, padding="longest", return_tensors="pt")
    with torch.no_grad():
        ours = model(pixels, enc["input_ids"], enc["attention_mask"])
        image = model.clip.get_image_features(pixel_values=pixels).pooler_output
        text = model.clip.get_text_features(**enc).pooler_output
        torch.testing.assert_close(image, reference.encode_image(pixels), rtol=0, atol=1e-5)
        torch.testing.assert_close(
            text, reference.encode_text(open_clip().tokenize(CAPTIONS)), rtol=0, atol=1e-5
        )
        torch.testing.assert_close(model.logit_scale(), reference.logit_scale.exp(), rtol=1e-6, atol=0)
        if superclip:
            reference.visual.output_tokens = True  # (pooled, patch tokens after ln_post)
            _, patches = reference.visual(pixels)
            expected = decoder(patches.mean(dim=1))
            torch.testing.assert_close(ours["vocab_logits"], expected, rtol=0, atol=1e-5)
    head, counts = read_extras(out)
    if superclip:
        doc_freq = DocumentFrequency(VOCAB)
        doc_freq.load_state_dict(counts)
        assert int(doc_freq.num_docs) == 12  # 4 steps x a global batch of 3
        expected = reference_idf(buffers["cap_fq"], buffers["num_samples"], BATCH)
        torch.testing.assert_close(doc_freq.idf().double(), expected, rtol=1e-6, atol=1e-6)
    else:  # a CLIP checkpoint: no head file, fine-tuning starts a fresh head
        assert head is None and counts is None and not (tmp_path / "imported" / HEAD_FILE).exists()
        torch.testing.assert_close(model.head.proj.bias, torch.zeros(VOCAB))
    classifier = pipeline("zero-shot-image-classification", model=out)
    from PIL import Image

    scores = classifier(Image.new("RGB", (40, 36), (200, 30, 30)), candidate_labels=["red", "blue"])
    assert sorted(s["label"] for s in scores) == ["blue", "red"]


def test_shapes_alone_give_the_released_config(tmp_path):
    """Without --model_config the sizes come from the tensors and the heads as width // 64; the
    released architectures' names give the rest."""
    reference, decoder, buffers = build(True, False, True)
    ckpt = save_as_reference(tmp_path / "sc.pt", reference, decoder, buffers)
    out = import_(tmp_path, ckpt, "--idf_batch_size", str(BATCH))
    config = CLIPConfig.from_pretrained(out)
    assert (config.vision_config.hidden_size, config.vision_config.num_attention_heads) == (48, 1)
    assert (
        config.text_config.num_attention_heads,
        config.projection_dim,
        config.vision_config.image_size,
    ) == (1, 24, 32)
    code = main(  # a name: its sizes are checked against the tensors
        [
            "import",
            "--ckpt_path",
            str(ckpt),
            "--output_dir",
            str(tmp_path / "b16"),
            "--model_config",
            "SuperCLIP-ViT-B-16",
        ]
    )
    assert code == 2


def hub_standin(cache, repo: str, files: dict) -> None:
    """The hub cache layout ``hf_hub_download`` reads offline: refs/main -> snapshots/<commit>/."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = cache / ("models--" + repo.replace("/", "--"))
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    for name, src in files.items():
        (root / "snapshots" / commit / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, root / "snapshots" / commit / name)


def test_hub_repo_ids_go_through_hf_hub_download(tmp_path, monkeypatch):
    import huggingface_hub
    import huggingface_hub.constants

    reference, decoder, buffers = build(True, False, True)
    ckpt = save_as_reference(tmp_path / "superclip_b16.pt", reference, decoder, buffers)
    config_file = tmp_path / "open_clip_config.json"
    config_file.write_text(
        json.dumps({"model_cfg": model_cfg(False), "superclip": {"idf_batch_size": BATCH}})
    )
    cache = tmp_path / "hub"
    hub_standin(
        cache,
        "someone/superclip-test",
        {"weights/superclip_b16.pt": ckpt, "open_clip_config.json": config_file},
    )
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    asked = []
    real = huggingface_hub.hf_hub_download
    monkeypatch.setattr(
        huggingface_hub,
        "hf_hub_download",
        lambda repo, name, **kw: asked.append(name) or real(repo, name, **kw),
    )
    out = import_(tmp_path, "someone/superclip-test/weights/superclip_b16.pt")
    assert asked == ["weights/superclip_b16.pt", "open_clip_config.json"]
    model = SuperCLIP.from_pretrained(out).eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        image = model.clip.get_image_features(pixel_values=pixels).pooler_output
        torch.testing.assert_close(image, reference.encode_image(pixels), rtol=0, atol=1e-5)
    assert int(read_extras(out)[1]["num_docs"]) == 12  # the batch recorded in the config was used

    code = main(["import", "--ckpt_path", "someone/superclip-test", "--output_dir", str(tmp_path / "x")])
    assert code == 2  # ORG/REPO alone looks for open_clip's file names


def one_line_error(capsys, argv: list[str]) -> str:
    code = main(["import", *argv])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err and err.startswith("superclip import: error:")
    return err


def test_bad_input_fails_in_one_line_naming_the_key_or_shape(tmp_path, capsys):
    reference, decoder, buffers = build(True, False, True)
    ckpt = save_as_reference(tmp_path / "good.pt", reference, decoder, buffers)
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    out = ["--output_dir", str(tmp_path / "out")]
    cfg = model_cfg(False)

    def saved(name, sd):
        torch.save({"state_dict": sd}, tmp_path / name)
        return str(tmp_path / name)

    def config(**changes):
        path = tmp_path / f"cfg{len(changes)}{sorted(changes)}.json"
        path.write_text(json.dumps({**cfg, **changes}))
        return str(path)

    resnet = open_clip().CLIP(24, {"layers": [1, 1, 1, 1], "width": 16, "image_size": 32}, cfg["text_cfg"])
    err = one_line_error(capsys, ["--ckpt_path", saved("rn.pt", resnet.state_dict()), *out])
    assert "missing key visual.positional_embedding" in err
    hf = tmp_path / "hf.safetensors"
    save_file({"vision_model.embeddings.class_embedding": torch.zeros(4)}, hf)
    assert "missing key token_embedding.weight" in one_line_error(capsys, ["--ckpt_path", str(hf), *out])
    extra = saved("extra.pt", {**state, "module.visual.adapter.weight": torch.zeros(3)})
    assert "unmapped key visual.adapter.weight" in one_line_error(capsys, ["--ckpt_path", extra, *out])
    deep_head = saved("mlp_head.pt", {**state, "module.text_decoder.mlps.0.c_fc.weight": torch.zeros(3)})
    assert "unmapped key text_decoder.mlps.0.c_fc.weight" in one_line_error(
        capsys, ["--ckpt_path", deep_head, *out]
    )

    wide = config(vision_cfg={**cfg["vision_cfg"], "width": 64})
    err = one_line_error(capsys, ["--ckpt_path", str(ckpt), "--model_config", wide, *out])
    assert "vision_cfg.width=64 but the checkpoint's tensors give 48" in err
    heads = config(text_cfg={**cfg["text_cfg"], "heads": 3})
    assert "whole number of heads" in one_line_error(
        capsys, ["--ckpt_path", str(ckpt), "--model_config", heads, *out]
    )
    avg = config(vision_cfg={**cfg["vision_cfg"], "pool_type": "avg"})
    assert "vision_cfg.pool_type='avg'" in one_line_error(
        capsys, ["--ckpt_path", str(ckpt), "--model_config", avg, *out]
    )
    err = one_line_error(capsys, ["--ckpt_path", str(ckpt), "--model_config", "ViT-B-99", *out])
    assert "'ViT-B-99' is neither a JSON file nor one of" in err

    narrow = {k: (v[:, :16] if k == "module.visual.proj" else v) for k, v in state.items()}
    err = one_line_error(
        capsys, ["--ckpt_path", saved("narrow.pt", narrow), "--model_config", config(), *out]
    )
    assert "embed_dim=24 but visual.proj has 16 columns" in err
    err = one_line_error(capsys, ["--ckpt_path", str(ckpt), "--idf_batch_size", "5", *out])
    assert "cap_fq x 5 is not a whole number of captions" in err and "--idf_batch_size" in err

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    assert "not a zip archive; truncated?" in one_line_error(capsys, ["--ckpt_path", str(truncated), *out])
    cut = tmp_path / "cut.safetensors"
    save_file({k[len("module.") :]: v for k, v in state.items()}, tmp_path / "whole.safetensors")
    cut.write_bytes((tmp_path / "whole.safetensors").read_bytes()[:5000])
    assert "is not a readable safetensors file" in one_line_error(capsys, ["--ckpt_path", str(cut), *out])
    assert "does not exist" in one_line_error(capsys, ["--ckpt_path", str(tmp_path / "none.pt"), *out])
    assert not (tmp_path / "out").exists()  # nothing is written before everything is checked
    # and a bare safetensors state dict imports, head and counts included
    assert (
        main(["import", "--ckpt_path", str(tmp_path / "whole.safetensors"), *out, "--idf_batch_size", "3"])
        == 0
    )
    head = {f"head.{m}.{p}" for m in ("norm", "proj") for p in ("weight", "bias")}
    assert set(load_file(tmp_path / "out" / HEAD_FILE)) == head | {"doc_freq.df", "doc_freq.num_docs"}


def test_installed_command_exit_statuses(tmp_path):
    """The console script as users call it: 0 after an import, 2 and one line for a bad file."""
    import subprocess
    import sys
    from pathlib import Path

    reference, _, _ = build(False, True, False)
    ckpt = save_as_reference(tmp_path / "clip.pt", reference)
    command = str(Path(sys.executable).parent / "superclip")
    good = subprocess.run(
        [command, "import", "--ckpt_path", str(ckpt), "--output_dir", str(tmp_path / "out")],
        capture_output=True,
        text=True,
    )
    assert good.returncode == 0, good.stderr[-2000:]
    assert (tmp_path / "out" / "model.safetensors").is_file()
    (tmp_path / "cut.pt").write_bytes(ckpt.read_bytes()[:1000])
    bad = subprocess.run(
        [command, "import", "--ckpt_path", str(tmp_path / "cut.pt"), "--output_dir", str(tmp_path / "o2")],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "truncated?" in bad.stderr
