"""Build hook: generate the protobuf messages from protos/function.proto before packaging."""
import os
import subprocess
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO = os.path.join(HERE, "protos", "function.proto")
STUB = os.path.join(HERE, "runtime_python", "_pb", "function_pb2.py")


def generate_stubs() -> None:
    """Run protoc (from grpcio-tools) unless the stubs are newer than the .proto."""
    if os.path.exists(STUB) and os.path.getmtime(STUB) >= os.path.getmtime(PROTO):
        return
    subprocess.check_call(
        [sys.executable, "-m", "grpc_tools.protoc", "-Iruntime_python/_pb=protos",
         "--python_out=.", "runtime_python/_pb/function.proto"],
        cwd=HERE,
    )


class BuildPyWithStubs(build_py):
    def run(self) -> None:
        generate_stubs()
        super().run()


setup(cmdclass={"build_py": BuildPyWithStubs})
