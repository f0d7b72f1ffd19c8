"""Intake stage: watch folders and feeds find input; intake makes it durable in the spool and the journal."""
