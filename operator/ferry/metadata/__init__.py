"""The maintenance-event endpoint: GET /v1/maintenance_event for the droplet that asks.

cache.py (pure) <- reflector.py (list/watch loop) <- source.py (pykube) ; server.py (aiohttp).
"""
