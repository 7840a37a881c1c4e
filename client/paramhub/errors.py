"""The one error table of paramhub (defined in the shared kernel, paramhub.common.errors, which
the server imports too); this is the name users import it by."""

from paramhub.common.errors import *  # noqa: F401,F403
from paramhub.common.errors import __all__, error_class_for_code  # noqa: F401
