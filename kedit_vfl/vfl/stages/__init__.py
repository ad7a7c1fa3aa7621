"""The training stages (MPD, split training, distillation), their runner and training loop."""
