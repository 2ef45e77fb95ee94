"""Tasks: the task-file reader (files.py), the kinds it reads (kinds.py: one module each, on a common base)."""
