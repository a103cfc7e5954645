"""Commands of the CLI besides the daemon itself (cli.py dispatches to them).

run.py   `openedge-function run`: one event through a real instance, no broker, no daemon
new.py   `openedge-function new`: a working function folder, added to the configuration
show.py  `openedge-function show`: the unit and an example configuration, for a wheel's install
"""
