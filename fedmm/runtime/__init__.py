"""What runs a federation's processes: a simulation, a deployed server, a deployed site.

- ``fedmm.runtime.simulation``: ``fedmm simulate``, through a private SuperLink and
  Flower's Ray-backed simulation engine;
- ``fedmm.runtime.deploy``: ``fedmm server`` / ``fedmm site``, supervisors of Flower's
  SuperLink and of a site's SuperNode plus its long-lived ClientApp executor;
- ``fedmm.runtime.executor``: that executor (``python -m fedmm.runtime.executor``);
- ``fedmm.runtime.supernode``, ``fedmm.runtime.grid``, ``fedmm.runtime.flower_waits``:
  Flower's SuperNode and Grid with their fixed waits shortened;
- ``fedmm.runtime.loopback``: a whole deployment on 127.0.0.1, for tests and benchmarks;
- ``fedmm.runtime.local``: :class:`LocalGrid`, a ServerApp's protocol against ClientApps in
  one process (tests and benchmarks of SecAgg+).

The only package that starts processes. May import every other part of ``fedmm``
except ``fedmm.cli``; never the top-level ``server``/``clients`` (Flower loads them).
"""

__all__: list[str] = []
