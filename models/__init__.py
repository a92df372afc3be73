"""The models shipped with Sparrow: small GGUF files trained by the project, with their cards (*.md) and measured
results (results.json). Data, not code: the store (sparrow.runtime.store.SHIPPED_DIR) resolves them by name."""
