"""The model runtime: one engine thread per model, fed by a queue; all MLX work happens there."""
