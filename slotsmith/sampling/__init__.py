"""``slotsmith sample``: pictures and videos from a base plus slots, in memory, offline."""
