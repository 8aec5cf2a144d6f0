"""Experiments: the protocol registry (one per ``data.kind``), the one runner, the CXR evaluate / analyze commands, the paper tables and the demo."""
