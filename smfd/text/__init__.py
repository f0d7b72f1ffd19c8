"""Text stage: cutting documents into fact-sized chunks and restating them (no model needed)."""
