"""The torch side of ``slotsmith train``: the Wan model adapter, the slot's fp32
masters, flow matching, optimizers, resume state and the step loop.

Nothing in the light core imports this package at module level; the
trainer's entry (``slotsmith.train``) reaches it only when a run starts.
"""
