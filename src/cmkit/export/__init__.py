"""Models in and out of cmkit: diffusers folders (both ways) and ONNX."""
