"""VFed-SSD: vertical federated learning with MPD pretraining and split distillation."""
