"""One module per evaluation task; each exposes `run(...) -> dict` over already-built methods."""
