"""Deployment: code that changes under a running daemon.

codewatch.py   code directories watched (inotify, else polled); changes debounced
packages.py    each function's requirements.txt, installed for it alone, cached
handover.py    new code proves it loads, then takes over from the old
"""
