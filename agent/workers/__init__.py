"""``nodemesh agent --workers N``: the node proxy in N processes, one event loop each.

One Python event loop saturates one core, so a single-process agent caps a node's mesh traffic
at what one core can relay. With ``--workers N`` the agent's main process keeps everything that
talks to the outside world or the kernel's maps (state source, CA and identity manager,
reconciler, readiness, ``/metrics`` and the admin API, handover) and starts N worker processes
(``worker``) that run the accept loops and the node proxy. The kernel spreads new connections
over them: each port's listeners form one ``SO_REUSEPORT`` group and the capture programs'
``bpf_sk_assign`` to the registered member re-selects within the group by flow hash (Linux ≥
6.5). Modules: ``wire`` (the channel's messages, sans-IO), ``channel`` (its asyncio shell),
``replica`` (state commits replayed in a worker), ``certs`` (certificates from the main
process), ``merge`` (one ``/metrics``, ``/connections``, ``/requests``, ``/routes`` and
``/traffic`` from many processes, sans-IO), ``views`` (their asyncio side), ``supervisor``
(start, feed, ask, restart), ``worker`` (the worker process). See ARCHITECTURE.md, "Workers".
"""
