"""The local transformers engine: continuous batching over one in-process model."""
