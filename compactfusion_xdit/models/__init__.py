"""Built-in models: tiny diffusers pipelines built from config (no download), see `tiny`; and
``digits-flux``, a small Flux trained on scikit-learn's digits and shipped with the package, see `digits`."""
