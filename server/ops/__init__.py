"""The operator's commands (`qpu-gateway ...`) and the demo."""
