"""Loading `module.function` from a code directory, with errors that say exactly what failed."""
from __future__ import annotations

import importlib
import os
import sys
import traceback
from typing import Callable, List


class LoadError(Exception):
    """The handler or initializer could not be loaded; the message says what and why."""

    def __init__(self, message: str, stack_trace: List[str]) -> None:
        super().__init__(message)
        self.message = message
        self.stack_trace = stack_trace


def load(entry: str, codedir: str, what: str = "handler") -> Callable:
    """Import `module.function` (module may be dotted) with `codedir` first on sys.path."""
    if codedir not in sys.path:
        sys.path.insert(0, codedir)
    module_name, _, attr = entry.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise LoadError(f"{what} {entry}: no module named {exc.name!r} in {codedir}", []) from None
        raise LoadError(f"{what} {entry}: importing {module_name!r} failed: {exc}",
                        user_frames(exc, codedir)) from None
    except SyntaxError as exc:
        where = f"{relative(exc.filename or '?', codedir)}, line {exc.lineno}"
        raise LoadError(f"{what} {entry}: syntax error in {where}: {exc.msg}",
                        traceback.format_exception_only(type(exc), exc)) from None
    except BaseException as exc:  # an exception at import time, whatever it is
        raise LoadError(f"{what} {entry}: importing {module_name!r} raised "
                        f"{type(exc).__name__}: {exc}", user_frames(exc, codedir)) from None
    where = relative(getattr(module, "__file__", None) or module_name, codedir)
    try:
        function = getattr(module, attr)
    except AttributeError:
        import difflib   # only when it is needed: instances start without it
        names = [name for name, value in vars(module).items() if callable(value) and not name.startswith("_")]
        close = difflib.get_close_matches(attr, names, 1)
        raise LoadError(f"{what} {entry}: module {module_name!r} has no attribute {attr!r} (in {where}"
                        f"{f'; did you mean {close[0]!r}?' if close else ''})", []) from None
    if not callable(function):
        raise LoadError(f"{what} {entry}: {attr!r} is a {type(function).__name__}, not a function "
                        f"(in {where})", [])
    return function


def check_call(function: Callable, entry: str, codedir: str, what: str, arguments: str) -> None:
    """Raise LoadError when `function` cannot be called with `arguments` (e.g. "event, context"),
    naming where it is defined. (A check's, not an instance's: inspect is imported here.)"""
    import inspect
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return   # a builtin, or something else Python cannot tell: called as it is
    try:
        signature.bind(*arguments.split(", "))
    except TypeError:
        code = getattr(inspect.unwrap(function), "__code__", None)
        where = (f" ({relative(code.co_filename, codedir)}, line {code.co_firstlineno})"
                 if code is not None else "")
        raise LoadError(f"{what} {entry}{where}: takes {signature} but is called with ({arguments})",
                        []) from None


_OWN_DIR = os.path.dirname(os.path.abspath(__file__))
_IMPORT_MACHINERY = ("<frozen importlib", "importlib/__init__.py")


def user_frames(exc: BaseException, codedir: str) -> List[str]:
    """The traceback lines of `exc` without the runtime's own frames or import machinery."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if not f.filename.startswith(_OWN_DIR)
              and not any(m in f.filename for m in _IMPORT_MACHINERY)]
    lines: List[str] = []
    for frame in frames:
        lines.append(f'  File "{relative(frame.filename, codedir)}", line {frame.lineno}, in {frame.name}')
        if frame.line:
            lines.append(f"    {frame.line}")
    return lines


def relative(path: str, codedir: str) -> str:
    """Paths inside the code directory are shown relative to it, as the user wrote them."""
    if path.startswith(codedir.rstrip(os.sep) + os.sep):
        return path[len(codedir.rstrip(os.sep)) + 1:]
    return path
