"""The shipped model bundle (data only; read by core.bundle)."""
