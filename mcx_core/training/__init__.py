"""Trainers of the learned pieces: JT1 (GistNet), JT2 (LensNet), JT3 (LoRA), and what they share."""
