"""Where a rule may answer an MQTT 5 request: the checks on a response topic.

A response topic comes from whoever published the request, and the daemon publishes there with
its own broker rights, which are usually wider than the requester's. Left unchecked, a requester
could have the daemon publish where it may not (`ctl/door/1/set`), feed its payload to another
rule's function by naming that rule's input, or hand paho a topic it refuses to publish to (a
wildcard), which would leave the message unsettled for ever. So a response topic is answered on
only when it is

- a topic paho and the broker take: not empty, no wildcard, no control character, at most
  65,535 bytes;
- not a `$`-topic (`$SYS/...`, `$share/...`): those are the broker's;
- one of the rule's `response.topics` filters when it has them; without them, not a topic any
  rule of the daemon subscribes to (the daemon never answers into its own input).

Otherwise the message is not run: its envelope (`ResponseRefused`) goes to the rule's error or
publish topic, or, with neither, a log line says so; either way it is acknowledged. The verdict of
a topic is remembered (a requester usually keeps its response topic), so a request pays one
dictionary lookup.
"""
from __future__ import annotations

import re
from typing import Dict, Iterable, Optional, Sequence, Tuple

from paho.mqtt.client import topic_matches_sub

__all__ = ["ReplyPolicy"]

_UNFIT = re.compile("[\x00-\x1f\x7f-\x9f+#\ud800-\udfff\ufffe\uffff]")
_TOPIC_MAX = 65535
_REMEMBERED = 4096     # verdicts kept; forgotten all at once beyond


def _unshared(topic_filter: str) -> str:
    """The topics a subscription receives: `$share/group/x/#` receives `x/#`."""
    if topic_filter.startswith("$share/"):
        return topic_filter.split("/", 2)[2]
    return topic_filter


class ReplyPolicy:
    """The checks of one rule. `allowed`: its `response.topics` (empty: any but `own`); `own`:
    what the daemon's rules subscribe to."""

    def __init__(self, allowed: Sequence[str], own: Iterable[str]) -> None:
        self.allowed: Tuple[str, ...] = tuple(allowed)
        self.own: Tuple[str, ...] = tuple(dict.fromkeys(_unshared(f) for f in own))
        self._verdicts: Dict[str, Optional[str]] = {}

    def refusal(self, topic: str) -> Optional[str]:
        """Why the rule does not answer on `topic`, or None when it does."""
        verdicts = self._verdicts
        try:
            return verdicts[topic]
        except KeyError:
            pass
        verdict = self._judge(topic)
        if len(verdicts) >= _REMEMBERED:
            verdicts.clear()
        verdicts[topic] = verdict
        return verdict

    def _judge(self, topic: str) -> Optional[str]:
        found = _UNFIT.search(topic)
        if found:
            what = "a wildcard" if found.group() in "+#" else f"the character U+{ord(found.group()):04X}"
            return f"it holds {what}: it is not a topic one can publish to"
        if len(topic.encode("utf-8", "surrogatepass")) > _TOPIC_MAX:
            return f"it is longer than MQTT's {_TOPIC_MAX} bytes"
        if topic.startswith("$"):
            return "it is a $-topic: those are the broker's"
        if self.allowed:
            if not any(topic_matches_sub(f, topic) for f in self.allowed):
                return f"it matches none of the rule's response.topics ({', '.join(self.allowed)})"
            return None
        for subscribed in self.own:
            if topic_matches_sub(subscribed, topic):
                return (f"the daemon subscribes to it ({subscribed}): an answer there would be input "
                        "again (list the topics answers may go to in the rule's response.topics)")
        return None
