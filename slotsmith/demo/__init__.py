"""``slotsmith demo`` and the tiny models it (and the tests) build in code."""
