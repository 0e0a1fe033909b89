"""The web dashboard at /ui (see api/ui/routes.py)."""
