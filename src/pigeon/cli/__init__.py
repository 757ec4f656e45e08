"""The ``pigeon`` command."""
