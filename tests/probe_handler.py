"""The probe: a handler that tries, from inside an instance, what a hostile one would (read, write,
signal, connect, spawn, allocate, spin) and reports what happened. The isolation tests run it on
this machine (tests/test_isolation.py), the VM tests in a Debian 12 guest under systemd
(tests/vm/guest/checks.py). Event: {"try": ACTION, "arg": ...}."""
import os, signal, socket, subprocess, time

def attempt(what, action):
    try:
        return {"done": True, "result": action()}
    except BaseException as exc:
        return {"done": False, "error": type(exc).__name__, "message": str(exc)}

def read(path):
    with open(path, "rb") as fh:
        return fh.read(100).decode("utf-8", "replace")

def write(path):
    with open(path, "w") as fh:
        fh.write("owned")
    return path

def spawn(n):
    children = []
    try:
        for _ in range(n):
            children.append(subprocess.Popen(["sleep", "30"]))
    except OSError as exc:
        return {"started": len(children), "error": type(exc).__name__}
    finally:
        for child in children:
            child.kill()
            child.wait()
    return {"started": len(children)}

def open_files(n):
    files = []
    try:
        for _ in range(n):
            files.append(open("/dev/null"))
    except OSError as exc:
        return {"opened": len(files), "error": type(exc).__name__}
    finally:
        for fh in files:
            fh.close()
    return {"opened": len(files)}

def spin(seconds):
    start, cpu = time.monotonic(), time.process_time()
    while time.monotonic() - start < seconds:
        pass
    return {"wall": time.monotonic() - start, "cpu": time.process_time() - cpu}

def runaway():
    """A child in a session (and process group) of its own."""
    child = subprocess.Popen(["sleep", "600"], start_new_session=True)
    return {"pid": child.pid, "pgid": os.getpgid(child.pid), "mine": os.getpgrp(),
            "cgroup": read(f"/proc/{child.pid}/cgroup").strip()}

def ping(arg):
    """Open an instance's socket as the supervisor does, with a key of one's own (`arg`: the
    socket's path), or as a stranger who claims a frame of 4 GB, or says nothing ([path, how])."""
    import struct
    path, how = (arg, "key") if isinstance(arg, str) else arg
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(path)
        started = time.monotonic()
        if how == "key":
            key = b"0123456789abcdef0123456789abcdef"
            sock.sendall(struct.pack(">I", len(key)) + key)
        elif how == "huge":
            sock.sendall(struct.pack(">I", 0xFFFFFFFF) + b"x" * 1024)
        try:
            answer = sock.recv(64)
        except ConnectionResetError:   # closed with what was sent still unread
            answer = b""
    if not answer:
        raise PermissionError(f"the instance closed the connection unanswered after {time.monotonic() - started:.1f}s")
    return repr(answer)

def handler(event, context):
    what = event["try"]
    arg = event.get("arg")
    if what == "whoami":
        return {"uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups(), "ppid": os.getppid(),
                "tmp": os.environ.get("TMPDIR")}
    if what == "allocate":
        block = bytearray(arg)
        return {"allocated": len(block)}
    if what == "crash":
        os._exit(3)
    actions = {
        "read": lambda: read(arg),
        "write": lambda: write(arg),
        "kill": lambda: os.kill(arg, signal.SIGKILL),
        "connect": lambda: socket.socket(socket.AF_UNIX).connect(arg),
        "ping": lambda: ping(arg),
        "list": lambda: os.listdir(arg),
        "spawn": lambda: spawn(arg),
        "open": lambda: open_files(arg),
        "write_tmp": lambda: write(os.path.join(os.environ["TMPDIR"], "mine")),
        "invoke": lambda: context.invoke(arg, {"from": context.function_name}),
        "spin": lambda: spin(arg),
        "runaway": runaway,
        "cgroup": lambda: read("/proc/self/cgroup").strip(),
    }
    return attempt(what, actions[what])
