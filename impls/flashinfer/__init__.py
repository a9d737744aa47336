"""FlashInfer provider."""
