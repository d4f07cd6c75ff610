"""ml_collections configs; each file exports get_config(arg)."""
