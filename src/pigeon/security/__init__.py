"""Keys, permissions and the environment variables that carry them."""
