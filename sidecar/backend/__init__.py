"""The model backend: its interface, the TF Serving client and per-model call coalescing."""
