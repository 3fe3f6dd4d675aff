"""The scheduler: requests, pages and prefix cache on the host; never imports JAX."""
