"""Store stage: versioned memory checkpoints and the patches between them."""
