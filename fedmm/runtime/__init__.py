"""What runs a federation's processes: a simulation, a deployed server, a deployed site.

- ``fedmm.runtime.embedded``: ``fedmm simulate`` by default, Flower's simulation engine run in
  the CLI's own process (no SuperLink, no app build; the data loaded once), its sites in that
  process too (``fedmm.runtime.sites_in_process``) or, with ``--ray``, in Ray's workers;
- ``fedmm.runtime.simulation``: ``fedmm simulate --superlink``, through a private SuperLink
  and ``flwr run`` (as ``flwr run .`` does);
- ``fedmm.runtime.ray_cluster``: the Ray a simulation runs on: private, or an existing cluster
  (``--ray-address``), with each site's resources and a check of every node;
- ``fedmm.runtime.deploy``: ``fedmm server`` / ``fedmm site``, supervisors of Flower's
  SuperLink and of a site's SuperNode plus its long-lived ClientApp executor;
- ``fedmm.runtime.executor``: that executor (``python -m fedmm.runtime.executor``);
- ``fedmm.runtime.supernode``, ``fedmm.runtime.superlink``, ``fedmm.runtime.grid``,
  ``fedmm.runtime.flower_waits``: Flower's SuperNode, SuperLink and Grid with their fixed waits
  and heartbeats shortened;
- ``fedmm.runtime.loopback``: a whole deployment on 127.0.0.1, for tests and benchmarks;
- ``fedmm.runtime.local``: :class:`LocalGrid`, a ServerApp's protocol against ClientApps in
  one process (tests and benchmarks of SecAgg+).

The only package that starts processes. May import every other part of ``fedmm``
except ``fedmm.cli``; never the top-level ``server``/``clients`` (Flower loads them).
"""

__all__: list[str] = []
