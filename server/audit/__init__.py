"""The audit log: its hash chain, the spool for rows the database cannot take yet, operator identity."""
