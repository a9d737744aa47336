"""Property-based checking of provider implementations against the native ops."""
