"""Input sources: watch folders and feeds, plus the text extraction they share.

Sources only find input; `smfd.intake.Intake` makes it durable (spool + journal).
"""
