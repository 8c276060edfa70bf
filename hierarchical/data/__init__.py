"""Rows to batches: arguments, sources, label rules, checks, hierarchy readers, decoding, augmentation, collation,
device preprocessing, download."""
