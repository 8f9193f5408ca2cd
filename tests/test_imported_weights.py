"""What fine-tuning an imported model needs: position embeddings resampled to another resolution, the
head pooling the released checkpoints were trained with, and IDF counts written the way the reference
counts its special tokens."""

import json

import torch
from safetensors.torch import load_file, save_file
from transformers import CLIPModel

from openclip_models import CAPTIONS, GLOBAL_BATCH, build, model_cfg, reference_idf, save_as_reference
from openclip_ref import open_clip
from superclip_pl.cli.main import main
from superclip_pl.head_file import HEAD_FILE, read_head_pooling
from superclip_pl.model import SuperCLIP
from superclip_pl.resolution import resample_position_embeddings
from superclip_pl.train.module import LitSuperCLIP


def cubic(d: float, a: float = -0.5) -> float:
    """The cubic convolution kernel (Keys 1981); a = -0.5 is the anti-aliased (PIL) one."""
    d = abs(d)
    if d < 1:
        return (a + 2) * d**3 - (a + 3) * d**2 + 1
    return a * d**3 - 5 * a * d**2 + 8 * a * d - 4 * a if d < 2 else 0.0


def bicubic_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in) anti-aliased bicubic resampling, as PIL computes its coefficients (the kernel
    stretched by the scale when shrinking, taps inside the grid only, each row normalised)."""
    scale = n_in / n_out
    stretch = max(scale, 1.0)
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        centre = (i + 0.5) * scale
        first, last = max(int(centre - 2 * stretch + 0.5), 0), min(int(centre + 2 * stretch + 0.5), n_in)
        for j in range(first, last):
            m[i, j] = cubic((j - centre + 0.5) / stretch)
        m[i] /= m[i].sum()
    return m


def test_resampled_position_embeddings_are_a_bicubic_resize_of_the_grid():
    torch.manual_seed(0)
    weight = torch.randn(1 + 4 * 4, 8, dtype=torch.float64)
    grid = weight[1:].reshape(4, 4, 8)
    for size in (6, 3):  # up and down
        m = bicubic_matrix(4, size)
        expected = torch.einsum("ia,jb,abc->ijc", m, m, grid).reshape(size * size, 8)
        out = resample_position_embeddings(weight, size)
        torch.testing.assert_close(out[0], weight[0], rtol=0, atol=0)  # the class position kept
        torch.testing.assert_close(out[1:], expected, rtol=1e-6, atol=1e-6)
    # as open_clip resizes a checkpoint's grid when it loads it at another size (--force-image-size)
    oc = open_clip()
    cfg = model_cfg(False)
    for grid_size in (3, 6):
        model = oc.CLIP(**cfg | {"vision_cfg": cfg["vision_cfg"] | {"image_size": 8 * grid_size}})
        state = {"visual.positional_embedding": weight.float()}
        oc.model.resize_pos_embed(state, model)
        ours = resample_position_embeddings(weight.float(), grid_size)
        torch.testing.assert_close(ours, state["visual.positional_embedding"])


def test_a_backbone_fine_tuned_at_another_size_runs_and_exports_at_it(tmp_path, tokenizer_dir, tokenizer):
    clip = CLIPModel.from_pretrained(str(_hf_dir(tmp_path, tokenizer)))
    before = clip.vision_model.embeddings.position_embedding.weight.detach()  # 16 px, patch 4: 4 x 4
    module = LitSuperCLIP(tokenizer=str(tmp_path / "hf"), backbone=str(tmp_path / "hf"), image_size=24)
    assert module.image_size == 24 and module.model.config.vision_config.image_size == 24
    after = module.model.clip.vision_model.embeddings.position_embedding.weight.detach()
    torch.testing.assert_close(after, resample_position_embeddings(before, 6))
    pixels = torch.randn(2, 3, 24, 24)
    ids = tokenizer(["a red circle", "a blue star"], padding=True, return_tensors="pt")
    with torch.no_grad():
        ours = module.model.eval()(pixels, ids["input_ids"], ids["attention_mask"])
    ckpt = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    torch.save(ckpt, tmp_path / "r.ckpt")
    out = tmp_path / "exported"
    assert main(["export", "--ckpt_path", str(tmp_path / "r.ckpt"), "--output_dir", str(out)]) == 0
    exported = CLIPModel.from_pretrained(out).eval()  # an ordinary HF model at 24 px
    assert exported.config.vision_config.image_size == 24
    with torch.no_grad():
        image = exported.get_image_features(pixel_values=pixels).pooler_output
    torch.testing.assert_close(torch.nn.functional.normalize(image, dim=-1), ours["image_embeds"])


def _hf_dir(tmp_path, tokenizer):
    from transformers import CLIPConfig

    tower = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    ids = {f"{k}_token_id": getattr(tokenizer, f"{k}_token_id") for k in ("bos", "eos", "pad")}
    config = CLIPConfig(
        text_config=dict(**tower, vocab_size=len(tokenizer), **ids),
        vision_config=dict(**tower, image_size=16, patch_size=4),
        projection_dim=24,
    )
    torch.manual_seed(3)
    CLIPModel(config).save_pretrained(tmp_path / "hf")
    tokenizer.save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


def imported_reference(tmp_path, *extra: str) -> tuple[str, object, object]:
    """A reference SuperCLIP checkpoint (the released layout) imported: (directory, open_clip model, head)."""
    reference, decoder, buffers = build(True, False, True)
    ckpt = save_as_reference(tmp_path / "released.pt", reference, decoder, buffers)
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(model_cfg(False)))
    out = str(tmp_path / "imported")
    args = ["--model_config", str(cfg), "--idf_batch_size", str(GLOBAL_BATCH), *extra]
    assert main(["import", "--ckpt_path", str(ckpt), "--output_dir", out, *args]) == 0
    return out, reference, decoder


def test_pre_fix_pooling_is_the_reference_s_old_avg_pool(tmp_path):
    out, reference, decoder = imported_reference(tmp_path, "--head_pooling", "skip_first_patch")
    assert read_head_pooling(out) == "skip_first_patch"
    assert SuperCLIP.from_pretrained(out).head_pooling == "skip_first_patch"  # what the directory records
    # --model.backbone DIR takes it from the directory
    module = LitSuperCLIP(tokenizer=out, backbone=out)
    assert module.model.head_pooling == module.hparams.head_pooling == "skip_first_patch"
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    reference.visual.output_tokens = True
    with torch.no_grad():
        _, tokens = reference.visual(pixels)  # the patch tokens after ln_post, (B, P, W)
        # hustvl/SuperCLIP before bc640a6: `pooled, tokens = x[:, 1:].mean(dim=1), x[:, 1:]` on those tokens
        old = decoder(tokens[:, 1:].mean(dim=1))
        new = decoder(tokens.mean(dim=1))
        ours = module.model.eval()(pixels, None)["vocab_logits"]
        fixed = SuperCLIP.from_pretrained(out, head_pooling="all_patches").eval()
        today = fixed(pixels, None)["vocab_logits"]
    torch.testing.assert_close(ours, old, rtol=0, atol=1e-5)
    torch.testing.assert_close(today, new, rtol=0, atol=1e-5)
    assert (old - new).abs().max() > 1e-3
    # recorded in what export writes, and read back by import
    exported = tmp_path / "open_clip"
    assert main(["export", "--ckpt_path", out, "--output_dir", str(exported), "--format", "open_clip"]) == 0
    written = json.loads((exported / "open_clip_config.json").read_text())
    assert written["superclip"]["head_pooling"] == "skip_first_patch"
    again = tmp_path / "again"
    assert main(["import", "--ckpt_path", str(exported), "--output_dir", str(again)]) == 0
    assert read_head_pooling(str(again)) == "skip_first_patch"


def test_exported_idf_gives_the_reference_weight_0_on_special_tokens(tmp_path):
    out, _, _ = imported_reference(tmp_path)
    # counts as this project keeps them: the special tokens never counted
    tokens = open_clip().tokenize(CAPTIONS * 2)  # (12, 77): <start>, words, <end>, then 0s
    tensors = load_file(f"{out}/{HEAD_FILE}")
    df = torch.zeros_like(tensors["doc_freq.df"])
    for row in tokens:
        df[row[(row != 0) & (row < 49406)].unique()] += 1
    tensors["doc_freq.df"], tensors["doc_freq.num_docs"] = df, torch.tensor(12)
    save_file(tensors, f"{out}/{HEAD_FILE}", metadata={"format": "pt", "idf_batch_size": str(GLOBAL_BATCH)})
    exported = tmp_path / "open_clip"
    assert main(["export", "--ckpt_path", out, "--output_dir", str(exported), "--format", "open_clip"]) == 0
    head = load_file(exported / "text_decoder.safetensors")
    cap_fq, num_samples = head["cap_fq"].clone(), head["num_samples"].clone()
    special = [0, 49406, 49407]  # open_clip's padding, start and end of text
    assert reference_idf(cap_fq, num_samples, GLOBAL_BATCH)[special].abs().max() < 1e-9
    # a step of the reference's trainer on these buffers (SuperClipLoss.reweight_targets): padding and
    # special tokens in every caption's targets, IDF weights from the updated buffers
    batch = tokens[:GLOBAL_BATCH]
    targets = torch.zeros(GLOBAL_BATCH, 49408).scatter_(1, batch, 1.0)
    cap_fq += targets.sum(dim=0, keepdim=True) / GLOBAL_BATCH
    num_samples += 1
    weighted = targets * reference_idf(cap_fq, num_samples, GLOBAL_BATCH).float()
    assert weighted[:, special].abs().sum() < 1e-6 * weighted.sum()  # no soft-target mass on them
    assert weighted.sum() > 0
