"""The vision-language engine: image-text-to-text checkpoints through transformers, requests batched by generate."""
