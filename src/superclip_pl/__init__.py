"""superclip-pl: SuperCLIP (CLIP + a vocabulary classifier on the image tower) with PyTorch Lightning."""
