"""The one exception type for mistakes a user can fix: the CLI prints it as one line."""


class UserError(Exception):
    """Bad input from the user (arguments, files, configs). Carries a message meant for people."""
