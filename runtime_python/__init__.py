"""The Python runtime of openedge-function: one process per function instance.

It loads `module.function` from the function's code directory, serves the supervisor on a Unix
socket (protobuf messages of protos/function.proto, framed as wire.py says), and for each request
builds the event and the context, calls the handler, and encodes the result or the error. It imports nothing from the supervisor, so a gateway can ship it alone.
"""
