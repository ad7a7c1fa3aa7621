"""InstructEdit: one instruction-conditioned MEND-style editor per language model."""
