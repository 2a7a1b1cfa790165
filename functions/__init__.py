"""Thin adapters from Functions triggers to the shared/ library: no business logic here."""
