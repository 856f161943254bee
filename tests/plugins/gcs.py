"""GCS emulator fixtures (filled in by the storage work)."""
