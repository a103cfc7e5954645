"""Binary in, binary out: answers any payload with its bytes reversed."""


def handler(event, context):
    if isinstance(event, bytes):
        return event[::-1]
    return event
