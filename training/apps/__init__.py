"""Applications built on the layers (may import any of them; nothing imports an app): the CPU demo."""
