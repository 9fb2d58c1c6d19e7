"""Policy: the CRD schemas and validation (``schema``), authorization and peer authentication
(``authz``, ``peerauth``) and traffic control, as pure functions of state data."""
