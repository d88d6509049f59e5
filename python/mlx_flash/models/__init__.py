"""Model names, loading, and (later) scheduling of several models under a memory ceiling."""
