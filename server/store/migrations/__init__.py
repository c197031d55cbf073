"""SQL migrations, one folder per dialect."""
