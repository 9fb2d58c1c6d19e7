"""The base layer: pieces every other package may use and that import nothing of the agent.

Shared numbers (ports, marks, tables), the metric registry, the small HTTP server, the agent
component's life cycle, duration parsing and the CA's wire messages. Keeping them here, below
everything else, is what lets the packages above import them without importing each other (see
ARCHITECTURE.md, "Layers").
"""
