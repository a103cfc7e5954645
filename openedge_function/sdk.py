"""Call functions through a running daemon: `from openedge_function.sdk import Client`.

The client lives in the runtime package (standard library only), so handlers get the same one
whether or not the daemon's package is installed where they run; this is its name here.
"""
from runtime_python.sdk import (ADDRESS_ENV, DEFAULT_ADDRESS, TOKEN_ENV, Client, InvokeError,
                                TencentServerlessSDKException, default_client, invoke)

__all__ = ["Client", "InvokeError", "TencentServerlessSDKException", "invoke", "default_client",
           "ADDRESS_ENV", "TOKEN_ENV", "DEFAULT_ADDRESS"]
