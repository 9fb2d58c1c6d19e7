"""The mesh CA: Istio's ``IstioCertificateService`` over gRPC/TLS, signing SPIFFE certificates.

``proto`` (wire contract), ``authority`` and ``storage`` (the root), ``issuer`` (decisions),
``auth`` and ``kube`` (who may ask for what), ``server`` (gRPC shell), ``cli`` (``nodemesh ca``).
"""
