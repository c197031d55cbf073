"""What the gateway tells its operator: JSON log lines on stderr, with secrets redacted."""
