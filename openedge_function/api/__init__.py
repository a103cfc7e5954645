"""The HTTP side of the daemon (`server:`, and the control socket), apart from the MQTT message path.

server.py    waitress and the WSGI application: the invoke API, HTTP functions, /healthz, /metrics
calls.py     calls to a function by name, from HTTP and from other functions (context.invoke)
metrics.py   Prometheus metrics, read from the pools and rules when scraped
status.py    health and status, read from the running daemon
control.py   the local control socket: the same API over a Unix socket, with reload and restart
"""
