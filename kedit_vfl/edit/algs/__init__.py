"""Editing methods behind one seam: each turns edit records into weight updates.

One file per method family: :mod:`.hypernetwork` (InstructEdit, and MEND: the same
editor without instructions), :mod:`.finetune` (FT-L and FT-M as EasyEdit defines them).
The evaluation protocols (one at a time, batches, sequences) and metrics are shared, so
methods differ only in how they compute an update.
"""
