"""Expert streaming for MoE models larger than memory (issue D): the expert store so far."""
