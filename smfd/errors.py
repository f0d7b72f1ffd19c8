"""Error types whose messages are shown to users without a traceback."""


class SmfdError(Exception):
    """A user-facing error: bad input, bad model, bad config. The CLI prints the message and exits 2."""

    exit_code = 2


class ConfigError(SmfdError):
    """The configuration is invalid. Exit code 78 (EX_CONFIG) so systemd does not restart."""

    exit_code = 78
