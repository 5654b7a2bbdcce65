"""Build and development commands (stub generation, the demo checkpoint); never imported by the services."""
