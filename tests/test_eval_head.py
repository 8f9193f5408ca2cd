"""The head report shown in TensorBoard: captions, top tokens, their IDF weights, hits in bold."""

import torch

from superclip_pl.eval.head import head_report


def test_head_report_lists_top_tokens_with_idf_and_marks_caption_tokens(tokenizer):
    ids = tokenizer(["a red circle", "a blue star"], padding="longest", return_tensors="pt")["input_ids"]
    red, star = tokenizer.convert_tokens_to_ids(["red</w>", "star</w>"])
    logits = torch.full((2, len(tokenizer)), -10.0)
    logits[0, red], logits[0, star] = 5.0, 4.0  # image 0: "red" (in its caption) then "star" (not)
    logits[1, star] = 6.0
    idf = torch.arange(len(tokenizer), dtype=torch.float32) / 10
    report = head_report(tokenizer, ids, logits, idf, top_k=2)
    lines = report.splitlines()
    assert lines[0] == "0. *a red circle*  "
    assert lines[1].startswith(f"   → **red** 0.73 (idf {red / 10:.1f}), star 0.27 (idf {star / 10:.1f})")
    assert lines[3].startswith("   → **star** 1.00")
    assert len(lines) == 4
