"""Deployment: the model file, ONNX export, the torch-free onnxruntime runtime, Grad-CAM, overlays and the viewer's state."""
