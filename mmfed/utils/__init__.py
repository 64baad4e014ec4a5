"""Small shared helpers: seeding, atomic file writes, logging."""
