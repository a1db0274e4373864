"""HTTP side of the server: FastAPI app factory, thin routes, auth and live updates."""
