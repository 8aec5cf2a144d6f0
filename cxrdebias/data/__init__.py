"""Datasets: one module per source; every dataset yields the sample contract of :mod:`.base`.

Nothing is imported here on purpose: the torch-free modules (image reading, preprocessing)
must stay importable by the ONNX runtime and the viewer without pulling in torch.
"""
