"""Protocol adapters: wire formats in, one `GenerationRequest` to the engine, events back out."""
