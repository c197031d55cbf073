"""The job engine: admission, the service functions, workers, events, approvals, pauses and cancels."""
