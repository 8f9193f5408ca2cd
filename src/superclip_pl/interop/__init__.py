"""Other formats: the HF ``CLIPModel`` directory (``clipdir``, ``export``, ``modelcard``), open_clip and
reference-SuperCLIP checkpoints (``openclip`` keys, ``openclip_config``, ``importer``,
``openclip_export``) and OpenAI's CLIP BPE (``clip_bpe``). Each module is imported on first use."""
