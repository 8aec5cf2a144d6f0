"""Datasets: one module per source. Every dataset yields the sample contract of :mod:`.base`."""

from cxrdebias.data.base import UNKNOWN_BIAS, Batch, TensorBatchLoader, TensorSamples

__all__ = ["UNKNOWN_BIAS", "Batch", "TensorBatchLoader", "TensorSamples"]
