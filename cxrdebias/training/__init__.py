"""Training: one loop for every method (trainer), run folders, provenance, device/precision, the CPU allocator."""
