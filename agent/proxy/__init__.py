"""The node proxy: outbound capture (15001), inbound HBONE (15008) and plaintext (15006).

Protocol logic is sans-IO (``hbone``: HTTP/2 CONNECT tunnels) and decisions come from
``agent.policy``; the asyncio modules (``outbound``, ``inbound``, ``plaintext``, ``pool``,
``relay``) only move bytes between sockets and the codec.
"""
