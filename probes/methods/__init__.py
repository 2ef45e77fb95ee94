"""The probes themselves, one module each; catalog.py names them and says what each takes and needs."""
