"""Instances: the runtime processes a pool runs, and what starting and watching them takes.

instance.py      one process: spawn, wait until it serves, signal, reap
stream.py        its stream (on the data plane's loop)
status.py        its status socket: spec out; loaded, ready, load errors and calls in
output.py        what it prints, into the daemon's log within the function's log.max
environment.py   its environment and its spec
lifecycle.py     its states, as a checked state machine (depends on nothing)
template.py      the template process instances fork from; the subreaper's reaping
fdwatch.py       the thread that reads every instance's sockets and pipes
memory.py        the memory limit, polled where no control group enforces it
spawner.py       what a pool needs to start its instances, in one place
"""
