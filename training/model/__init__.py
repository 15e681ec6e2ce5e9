"""The Z-Image transformer (architecture only), its weight layouts and its LoRA."""
