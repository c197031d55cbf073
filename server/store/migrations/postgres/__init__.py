"""PostgreSQL migrations: the same numbered steps as ../sqlite, in PostgreSQL's dialect; each runs once per database."""
