"""Deployment: code that changes under a running daemon.

codewatch.py   code directories watched (inotify, else polled); changes debounced
packages.py    each function's requirements.txt, installed for it alone, cached
handover.py    new code proves it loads, then takes over from the old
lastgood.py    the last code of each function that loaded, kept to start from while its code does not
check.py       a function's code loaded in a throwaway instance: --check, and min: 0 at start
"""
