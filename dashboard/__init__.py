"""Dash dashboard."""
