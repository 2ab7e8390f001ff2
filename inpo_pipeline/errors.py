"""The one exception type whose message is shown to the user as is, on one line."""


class UserError(Exception):
    """Bad input or an unusable environment: the message names the problem and the fix."""
