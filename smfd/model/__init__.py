"""The model: loading a pretrained base and retrofitting product-key memory into it."""
