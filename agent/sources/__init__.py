"""Sources: the only writers of the state store.

``document`` parses the cluster document (the lab topology and the local-file source's input);
``kube`` and ``localfile`` feed a ``StateStore`` from the Kubernetes API or from that document.
"""
