"""Workload identity in the agent: SPIFFE IDs, keys and certificates, the CA client, the
identity manager (fetch, renewal, states) and the TLS contexts the proxy builds from them."""
