"""kvtool: instruction-based knowledge editing and vertical federated learning."""

import os

# torch's C++ distributed layer logs multi-line stack dumps when a two-party peer is late
# or gone; kvtool turns those failures into one line itself. Set before torch loads.
os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "FATAL")

__version__ = "0.1.0"
