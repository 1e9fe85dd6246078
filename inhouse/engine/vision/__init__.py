"""The vision-language engine: image-text-to-text checkpoints through transformers, one request at a time."""
