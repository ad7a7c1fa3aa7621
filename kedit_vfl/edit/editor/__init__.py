"""The InstructEdit editor: its network, training, batches, artifacts, and applying edits."""
