"""Expert streaming for MoE models larger than memory: the expert store and cache policies so far."""
