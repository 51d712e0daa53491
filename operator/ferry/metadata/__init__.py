"""The maintenance-event endpoint: GET /v1/maintenance_event for the droplet that asks.

cache.py (pure) <- server.py (aiohttp; feeds the cache from ferry.storage.watch.Reflector).
"""
