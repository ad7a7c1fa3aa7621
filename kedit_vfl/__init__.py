"""kvtool: instruction-based knowledge editing and vertical federated learning."""

__version__ = "0.3.0"
