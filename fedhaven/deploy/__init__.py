"""Deployment helpers: the files a real SuperLink and its SuperNodes need."""
