"""The SMTP protocol, sans I/O: the one parser of the project.

``Conversation`` (in ``conversation.py``) is the state machine of a session;
``text.py`` holds the stateless pieces it is built from; ``steps.py`` gives
each step its meaning (parsed arguments, the exchange of a command and its
reply, its position in the session). Nothing here imports
trio, ssl or sockets.
"""

from .conversation import (
    MAX_HOLD,
    MAX_LINE,
    MAX_PENDING,
    ClientState,
    Conversation,
    MessageHeads,
)
from .steps import (
    GREETING,
    NEW_TRANSACTION,
    Args,
    Exchange,
    Position,
    StepCounter,
    StepKind,
    auth_exchanges,
    exchanges,
    parse_args,
    parse_params,
)
from .text import (
    MAX_HEADER,
    MessageHead,
    Unstuffer,
    auth_response_fields,
    command_fields,
    decode_line,
    enhanced_code,
    format_reply,
    line_text,
    parse_capabilities,
    parse_path,
    reply_fields,
    split_command,
    summarise_headers,
)

__all__ = [
    "GREETING",
    "NEW_TRANSACTION",
    "Args",
    "Exchange",
    "Position",
    "StepCounter",
    "StepKind",
    "auth_exchanges",
    "exchanges",
    "parse_args",
    "parse_params",
    "MAX_HEADER",
    "MAX_HOLD",
    "MAX_LINE",
    "MAX_PENDING",
    "ClientState",
    "Conversation",
    "MessageHead",
    "MessageHeads",
    "Unstuffer",
    "auth_response_fields",
    "command_fields",
    "decode_line",
    "enhanced_code",
    "format_reply",
    "line_text",
    "parse_capabilities",
    "parse_path",
    "reply_fields",
    "split_command",
    "summarise_headers",
]
