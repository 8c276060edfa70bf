#!/usr/bin/env python
"""Export a saved hierarchical model to ONNX and check the export against PyTorch.

    pip install -r requirements-onnx.txt
    python -m hierarchical.export_onnx outputs/model                        # checked on generated images
    python -m hierarchical.export_onnx outputs/model --images my_photos/    # checked on your images

Writes `outputs/model/model.onnx` (input `pixel_values`, outputs `logits` and `coarse_logits`, dynamic batch). The
parts, and `OnnxHierarchicalClassifier` that predicts with ONNX Runtime, live in `hierarchical/training/onnx_export.py`.
"""

from hierarchical.training.onnx_export import cli

if __name__ == "__main__":
    cli()
