"""Former name of :mod:`tools.common`, kept for modules not yet moved over; import ``tools.common`` instead."""

from tools.common import *  # noqa: F401,F403
