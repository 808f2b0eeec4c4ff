"""Built-in models: tiny diffusers pipelines built from config (no download), see `tiny`."""
