"""What an operator installs: the wheel carries everything the daemon needs but its dependencies
(the runtime, the generated stubs, the unit, an example configuration). The Debian package is
built and installed, in a VM, by tests/test_vm.py."""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile

from tests.helpers import ROOT


def test_the_wheel_is_whole_and_runs_from_itself(tmp_path):
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir",
                            str(tmp_path), ROOT], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr
    [wheel] = [name for name in os.listdir(tmp_path) if name.endswith(".whl")]
    assert wheel.endswith("-py3-none-any.whl"), wheel   # pure Python: one for every architecture
    with zipfile.ZipFile(tmp_path / wheel) as archive:
        names = set(archive.namelist())
        archive.extractall(tmp_path / "unpacked")
    for needed in ("runtime_python/server.py", "runtime_python/wire.py", "runtime_python/_pb/function_pb2.py",
                   "openedge_function/share/openedge-function.service",
                   "openedge_function/share/application.yml", "openedge_function/config/model.py",
                   "openedge_function/instances/spawner.py", "openedge_function/api/page/index.html",
                   "openedge_function/api/page/console.js", "openedge_function/api/page/console.css",
                   "openedge_function/api/page/login.html"):
        assert needed in names, needed
    assert not [name for name in names if name.startswith("tests/")]
    # Unpacked, with nothing of this checkout on the path: the unit it writes, the example it
    # ships (which loads), and a function run through its own runtime.
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "unpacked")}
    cli = [sys.executable, "-m", "openedge_function"]
    unit = subprocess.run(cli + ["show", "unit"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert unit.returncode == 0 and "Delegate=yes" in unit.stdout, unit.stderr
    example = subprocess.run(cli + ["show", "config"], env=env, cwd=tmp_path, capture_output=True, text=True,
                             timeout=60)
    (tmp_path / "application.yml").write_text(example.stdout)
    check = subprocess.run(cli + ["--check", "-c", "application.yml"], env=env, cwd=tmp_path,
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0 and "0 functions, 0 rules" in check.stdout, check.stderr
    code = tmp_path / "fn"
    code.mkdir()
    (code / "index.py").write_text("def handler(event, context):\n    return {'n': event['n'] + 1}\n")
    for path in (tmp_path, code, tmp_path / "unpacked"):
        os.chmod(path, 0o755)
    ran = subprocess.run(cli + ["run", str(code), '{"n": 41}'], env=env, cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert ran.returncode == 0 and ran.stdout.strip() == '{"n": 42}', ran.stderr
    imported = subprocess.run([sys.executable, "-c", "import openedge_function, runtime_python; "
                               "print(openedge_function.__file__, runtime_python.__file__)"],
                              env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert str(tmp_path / "unpacked") in imported.stdout and ROOT not in imported.stdout

    # As the README installs it: a venv of its own, the wheel and its dependencies from PyPI.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    installed = subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", "--disable-pip-version-check",
                                str(tmp_path / wheel)], capture_output=True, text=True, timeout=600)
    assert installed.returncode == 0, installed.stderr[-2000:]
    binary = str(venv / "bin" / "openedge-function")
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    unit = subprocess.run([binary, "show", "unit"], env=clean, cwd=tmp_path, capture_output=True, text=True,
                          timeout=60)
    assert f"ExecStart={binary} -c /etc/openedge-function/application.yml" in unit.stdout, unit.stdout
    os.chmod(venv, 0o755)
    ran = subprocess.run([binary, "run", str(code), '{"n": 1}'], env=clean, cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert ran.returncode == 0 and ran.stdout.strip() == '{"n": 2}', ran.stderr
