"""Training: the resumable training loop (pixels, negative training, fine-tuning) and torchrun support."""
