"""pigeon: message queues for Python."""
