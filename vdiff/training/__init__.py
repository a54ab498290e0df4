"""Training-side code for the demo models that ship with vdiff (tools/train_tiny.py drives it)."""
