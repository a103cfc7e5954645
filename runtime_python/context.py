"""The context handed to handlers: one object for every cloud's convention.

- OpenEdge: a dict, `context['functionName']`, `functionInvokeID`, `functionInstanceID`,
  `messageQOS`, `messageTopic`, `messageTimestamp`, `invokeid`.
- FunctionGraph: `getRequestID()`, `getRemainingTimeInMilliSeconds()`, `getUserData(key)`,
  `getLogger()`, `getFunctionName()`, `getRunningTimeInSeconds()`, `getMemorySize()`, ... and the
  credential getters.
- Function Compute: `request_id`, `credentials`, `function`, `service`, `region`, `account_id`.
- AWS-style: `aws_request_id`, `get_remaining_time_in_millis()`, `function_name`,
  `function_version`, `memory_limit_in_mb`.

One request id per invocation, the same under every name. What does not change between calls
lives on a per-function subclass, so a call only sets its request id and deadline.
"""
from __future__ import annotations

import os
import sys
import time
from types import SimpleNamespace
from typing import Any, Dict, List, Optional, Tuple, Type

# What a nested call leaves its caller to answer in, of the caller's own time.
_INVOKE_MARGIN_MS = 100


class Credentials(SimpleNamespace):
    """access_key_id, access_key_secret, security_token (Function Compute's names)."""


class FunctionMeta(SimpleNamespace):
    """name, handler, memory (MB), timeout (s), initializer."""


class ServiceMeta(SimpleNamespace):
    """name, log_project, log_store, qualifier, version_id."""


class Logger:
    """FunctionGraph's context logger: lines of `time - requestID - content`."""

    __slots__ = ("_request_id",)

    def __init__(self, request_id: str) -> None:
        self._request_id = request_id

    def _log(self, level: str, message: Any) -> None:
        now = time.time()
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}Z"
        print(f"{stamp} - {self._request_id} - {message}" if level == "INFO"
              else f"{stamp} - {self._request_id} - {level} - {message}", file=sys.stdout)

    def info(self, message: Any) -> None:
        self._log("INFO", message)

    def debug(self, message: Any) -> None:
        self._log("DEBUG", message)

    def warning(self, message: Any) -> None:
        self._log("WARNING", message)

    warn = warning

    def error(self, message: Any) -> None:
        self._log("ERROR", message)


class Context(dict):
    """One invocation's context (see the module docstring for every name it answers to)."""

    # Set on the per-function subclass made by `context_class`.
    function_name = ""
    function_version = "LATEST"
    memory_limit_in_mb = 0
    region = "local"
    account_id = ""
    credentials = Credentials(access_key_id="", access_key_secret="", security_token="")
    function = FunctionMeta(name="", handler="", memory=0, timeout=0, initializer="")
    service = ServiceMeta(name="", log_project="", log_store="", qualifier="LATEST", version_id="")
    _static: Dict[str, Any] = {}
    content_type = ""           # an HTTP invocation's Content-Type, or an MQTT 5 message's
    call_chain: Tuple[str, ...] = ()   # the functions waiting on this invocation (context.invoke)
    output_properties: Optional[List[Tuple[str, str]]] = None   # MQTT 5 user properties to publish

    def __init__(self, request_id: str, instance_id: str = "", topic: str = "", qos: int = 0,
                 timestamp_ms: int = 0, deadline: Optional[float] = None) -> None:
        super().__init__(
            functionName=self.function_name,
            functionInvokeID=request_id,
            invokeid=request_id,
            functionInstanceID=instance_id,
            messageQOS=qos,
            messageTopic=topic,
            messageTimestamp=timestamp_ms,
        )
        self.request_id = request_id
        self.aws_request_id = request_id
        self._deadline = deadline if deadline is not None else (
            time.monotonic() + self.function.timeout)

    # -- FunctionGraph -------------------------------------------------------------------------

    def getRequestID(self) -> str:
        return self.request_id

    def getRemainingTimeInMilliSeconds(self) -> int:
        return max(0, int((self._deadline - time.monotonic()) * 1000))

    def getUserData(self, key: str, default: Optional[str] = None) -> Optional[str]:
        return os.environ.get(key, default)

    def getFunctionName(self) -> str:
        return self.function_name

    def getRunningTimeInSeconds(self) -> int:
        return int(self.function.timeout)

    def getVersion(self) -> str:
        return self.function_version

    def getMemorySize(self) -> int:
        return self.memory_limit_in_mb

    def getCPUNumber(self) -> int:
        return self._static["cpu_millicores"]

    def getPackage(self) -> str:
        return self._static["package"]

    def getAlias(self) -> str:
        return self._static["alias"]

    def getAccessKey(self) -> str:
        return self.credentials.access_key_id

    def getSecretKey(self) -> str:
        return self.credentials.access_key_secret

    def getSecurityAccessKey(self) -> str:
        return self.credentials.access_key_id

    def getSecuritySecretKey(self) -> str:
        return self.credentials.access_key_secret

    def getSecurityToken(self) -> str:
        return self.credentials.security_token

    def getToken(self) -> str:
        return self._static["token"]

    def getLogger(self) -> Logger:
        return Logger(self.request_id)

    # -- MQTT 5 ---------------------------------------------------------------------------------

    def set_user_property(self, name: str, value: Any) -> None:
        """Add an MQTT 5 user property to this invocation's output (or error envelope), as many
        as wanted; the request's own are in `context['userProperties']`."""
        if self.output_properties is None:
            self.output_properties = []
        self.output_properties.append((str(name), str(value)))

    # -- calling other functions ---------------------------------------------------------------

    def invoke(self, function_name: str, event: Any = None, qualifier: Optional[str] = None,
               namespace: Optional[str] = None) -> Any:
        """Run another function (or this one) through the daemon and return its result; raises
        runtime_python.sdk.InvokeError when it fails. The call gives up in time for this
        invocation to answer within its own timeout, and the daemon refuses at once a call that
        could only wait for an instance its own callers hold."""
        from runtime_python.sdk import default_client
        left = self.getRemainingTimeInMilliSeconds()
        remaining = left - max(_INVOKE_MARGIN_MS, left // 20)
        return default_client().invoke(function_name, data=event, qualifier=qualifier,
                                       namespace=namespace, _chain=self.call_chain + (self.function_name,),
                                       _timeout=max(0.001, remaining / 1000))

    # -- AWS-style -------------------------------------------------------------------------------

    def get_remaining_time_in_millis(self) -> int:
        return self.getRemainingTimeInMilliSeconds()


def context_class(spec: Dict[str, Any]) -> Type[Context]:
    """A Context subclass carrying what the supervisor said of the function (its spec)."""
    creds = spec.get("credentials") or {}
    service = spec.get("service") or {}
    memory_mb = int(spec.get("memory_mb", 0))
    timeout_s = int(spec.get("timeout_ms", 0) // 1000)
    attributes = {
        "function_name": spec.get("name", ""),
        "function_version": spec.get("version", "LATEST"),
        "memory_limit_in_mb": memory_mb,
        "region": spec.get("region", "local"),
        "account_id": spec.get("account_id", ""),
        "credentials": Credentials(access_key_id=creds.get("access_key_id", ""),
                                   access_key_secret=creds.get("access_key_secret", ""),
                                   security_token=creds.get("security_token", "")),
        "function": FunctionMeta(name=spec.get("name", ""), handler=spec.get("handler", ""),
                                 memory=memory_mb, timeout=timeout_s,
                                 initializer=spec.get("initializer") or ""),
        "service": ServiceMeta(name=service.get("name", ""), log_project=service.get("log_project", ""),
                               log_store=service.get("log_store", ""),
                               qualifier=service.get("qualifier", "LATEST"),
                               version_id=service.get("version_id", "")),
        "_static": {"cpu_millicores": int(spec.get("cpu_millicores", 1000)),
                    "package": spec.get("package", "default"), "alias": spec.get("alias", ""),
                    "token": creds.get("token", "")},
    }
    return type("Context", (Context,), attributes)
