"""Model catalog, weights files, loading and the device runner. Nothing here imports FastAPI."""
