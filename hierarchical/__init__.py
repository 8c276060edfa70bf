"""The hierarchical classifier's library: option fields (`options`), data, evaluation and training."""
