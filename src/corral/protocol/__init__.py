"""The agent wire protocol: frames (header line + raw payload) and the names of ops and events.

Standard library only: the agent imports this package inside sandboxes whose images have nothing else.
"""

from corral.protocol.frames import MAX_HEADER, MAX_PAYLOAD, Decoder, Frame, ProtocolError, encode
from corral.protocol.messages import CHUNK_SIZE, PROTOCOL_VERSION, TERMINAL_EVENTS, AgentErrorCode, Event, Op

__all__ = [
    "CHUNK_SIZE",
    "MAX_HEADER",
    "MAX_PAYLOAD",
    "PROTOCOL_VERSION",
    "TERMINAL_EVENTS",
    "AgentErrorCode",
    "Decoder",
    "Event",
    "Frame",
    "Op",
    "ProtocolError",
    "encode",
]
