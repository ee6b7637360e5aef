"""Training: SFT and the one PreferenceTrainer (configs in `noisepo.training.config`)."""
