"""Route modules. Each exposes `router: APIRouter`; app.py mounts them under /api/v1.

Routes stay thin: they validate input, call a service (registry crud, orchestrator) and shape
the response. No algorithm, SQL or MQTT code lives here.
"""
