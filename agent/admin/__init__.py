"""The admin API (127.0.0.1:15000) and the status CLI that reads it."""
