"""Traffic control for connections to Services (issue 9), as sans-IO logic.

``config`` compiles a TrafficPolicy; ``balancer`` (peak-EWMA + P2C and the simple ones),
``outlier`` (ejection), ``budget`` (retry budget), ``fault`` and ``split`` are the mechanisms;
``service`` combines them for one Service and drives a connection's attempts; ``control`` keeps
one per Service in step with the state and says which policy is in force. The outbound proxy is
the only caller that does I/O.
"""
