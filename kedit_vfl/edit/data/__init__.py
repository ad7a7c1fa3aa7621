"""Editing records: loaders for public formats, the embedded world, instruction pools."""
