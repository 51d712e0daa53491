"""The ``sim`` driver: ferry's own small VM process per droplet (see ``driver.py``)."""

from ferry.drivers.sim.driver import SimDriver, stats_from_dict

__all__ = ["SimDriver", "stats_from_dict"]
