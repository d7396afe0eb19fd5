"""Launchers: where a sweep's models run. ``local`` runs each in a fresh local process."""
