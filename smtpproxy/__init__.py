"""smtpproxy: a recording man-in-the-middle SMTP proxy.

See, keep, replay and compare what really happens on the wire between a mail
client and an SMTP server.
"""

from .events import Side
from .protocol import Conversation
from .recording import Recording, read_recording

__version__ = "0.1.0"
__all__ = ["Conversation", "Recording", "Side", "__version__", "read_recording"]
