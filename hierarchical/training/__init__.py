"""The run: arguments, model loading and head surgery, trainer, callbacks, checkpoints, remote resources, run summary,
model card, the run itself, ONNX export."""
